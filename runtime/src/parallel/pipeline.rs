//! A training step run by pipeline ranks under a schedule.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fathom_compiler::GraphError;
use fathom_compiler::model::LossWeights;
use fathom_compiler::partition::{
    Phase, PhaseGraphs, StagePlan, layer_costs, names, split_phases, stage_graph,
};
use fathom_compiler::pipeline::{
    Chunk, Message, Payload, Schedule, ScheduleOp, SimReport, generate,
};
use fathom_compiler::precision::{PrecisionPolicy, apply_precision};
use fathom_compiler::spec::ModelSpec;
use thiserror::Error;

use crate::exec::{Backend, ExecError, Executable};
use crate::interp::Feeds;
use crate::optim::Grads;
use crate::tensor::{Data, HostTensor};
use crate::weights::Weights;

use super::comm::{Comm, CommError, Tag, ThreadComm};
use super::fault::{Fault, FaultKind};
use super::settings::PipelineSettings;
use super::timeline::{self, RankClock};

/// Why a pipelined step failed.
#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("pipeline setting: {0}")]
    Settings(String),
    #[error("cannot build the pipeline stages: {0}")]
    Graph(#[from] GraphError),
    #[error("cannot compile stage {stage}'s {phase} piece: {source}")]
    Compile {
        stage: usize,
        phase: Phase,
        source: Box<ExecError>,
    },
    #[error("pipeline rank {rank} failed at op {index} ({op}): {failure}")]
    Rank {
        rank: usize,
        index: usize,
        op: String,
        failure: Box<RankFailure>,
    },
    #[error("pipeline rank {rank} failed after its schedule: {failure}")]
    Reduce {
        rank: usize,
        failure: Box<RankFailure>,
    },
    #[error("pipeline rank {rank} panicked: {message}")]
    Panicked { rank: usize, message: String },
}

/// What went wrong on a rank.
#[derive(Debug, Error)]
pub enum RankFailure {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Exec(Box<ExecError>),
    #[error("{0}")]
    Schedule(String),
    #[error("injected failure ({})", Fault::ENV)]
    Injected,
    #[error("abandoned: another rank failed first")]
    Cancelled,
}

impl From<ExecError> for RankFailure {
    fn from(error: ExecError) -> Self {
        RankFailure::Exec(Box::new(error))
    }
}

impl RankFailure {
    /// Failures that only report another rank's failure: a stopped peer or an abandoned step.
    fn is_consequence(&self) -> bool {
        matches!(
            self,
            RankFailure::Cancelled | RankFailure::Comm(CommError::PeerStopped { .. })
        )
    }
}

/// What a pipelined step computed.
#[derive(Debug)]
pub struct PipelineStep {
    /// Gradients of every trainable parameter, averaged over the micro-batches.
    pub grads: Grads,
    /// Per micro-batch, in order: the loss outputs of a whole-model training graph
    /// (`loss`, `loss.next_token`, `loss.mtp`, `loss.balance`), as f32 scalars.
    pub losses: Vec<BTreeMap<String, HostTensor>>,
    /// Tokens routed to each expert, per balancing bias, summed over micro-batches.
    pub loads: BTreeMap<String, Vec<f64>>,
    /// When each rank ran each op (milliseconds), in the simulator's form: draw it with
    /// `fathom_compiler::pipeline::svg::timeline_svg`, or simulate the schedule with its
    /// measured `costs` to compare.
    pub timeline: SimReport,
}

/// One stage's compiled pieces.
struct StageProgram {
    /// `None` for a piece without outputs (the first stage's input-gradient piece).
    pieces: [Option<Executable>; 3],
    parameters: Vec<String>,
    reads_ids: bool,
    first: bool,
    last: bool,
    carried_bytes: u64,
}

/// A training step compiled for a pipeline schedule.
pub struct Pipeline {
    schedule: Schedule,
    /// Data-parallel replicas of the whole pipeline, each on its own micro-batches.
    replicas: usize,
    plan: StagePlan,
    stages: Vec<StageProgram>,
    /// Every trainable parameter of the model (unused ones get zero gradients, as in the
    /// whole-model graph).
    parameters: Vec<String>,
    losses: LossWeights,
    timeout: Duration,
    fault: Option<Fault>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("method", &self.schedule.method)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// What the pipeline needs to know about the run.
#[derive(Debug)]
pub struct PipelineRun<'a> {
    pub spec: &'a ModelSpec,
    pub batch: usize,
    pub seq: usize,
    pub micro_batches: usize,
    pub losses: LossWeights,
    pub precision: &'a PrecisionPolicy,
    pub backend: Backend,
    /// Every trainable parameter of the whole model, in order.
    pub parameters: &'a [String],
}

impl Pipeline {
    /// Builds the schedule, balances the layers over the stages, and compiles every stage's
    /// forward, input-gradient and weight-gradient pieces.
    pub fn new(
        settings: &PipelineSettings,
        run: PipelineRun<'_>,
    ) -> Result<Pipeline, PipelineError> {
        let schedule = match settings.stages {
            1 => single_stage(run.micro_batches),
            stages => generate(settings.schedule, stages, run.micro_batches)
                .map_err(|e| PipelineError::Settings(e.to_string()))?,
        };
        if settings.data_parallel == 0 {
            return Err(PipelineError::Settings(
                "`data_parallel` must be at least 1".into(),
            ));
        }
        if !(settings.timeout_seconds.is_finite() && settings.timeout_seconds > 0.0) {
            return Err(PipelineError::Settings(format!(
                "`timeout_seconds` must be a positive number of seconds, got {}",
                settings.timeout_seconds
            )));
        }
        let with_mtp = run.losses.mtp.is_some() && run.spec.mtp_depth > 0;
        let costs = layer_costs(run.spec, run.seq, with_mtp)?;
        let plan = StagePlan::balanced(&costs, settings.stages)?;
        let tiling = run.spec.fp8.clone().unwrap_or_default();
        let mut stages = Vec::with_capacity(plan.stages());
        for stage in 0..plan.stages() {
            let built = stage_graph(run.spec, &plan, stage, run.batch, run.seq, run.losses)?;
            let graph = apply_precision(&built.graph, run.precision, &tiling)
                .map_err(|e| PipelineError::Settings(format!("precision: {e}")))?;
            let pieces = split_phases(&graph, input_phase, output_phase)?;
            stages.push(compile_stage(
                stage,
                &plan,
                built.parameters,
                &pieces,
                run.backend,
            )?);
        }
        Ok(Pipeline {
            schedule,
            replicas: settings.data_parallel,
            plan,
            stages,
            parameters: run.parameters.to_vec(),
            losses: run.losses,
            timeout: Duration::from_secs_f64(settings.timeout_seconds),
            fault: Fault::from_env().map_err(PipelineError::Settings)?,
        })
    }

    /// Makes rank `fault.rank` fail or stall at its op `fault.op_index` (tests of the failure
    /// paths; `FATHOM_INJECT_FAULT` does the same from the environment).
    pub fn inject(&mut self, fault: Option<Fault>) {
        self.fault = fault;
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn plan(&self) -> &StagePlan {
        &self.plan
    }

    /// One line per stage: its layers, cost share and the bytes a micro-batch keeps between
    /// its forward and backward.
    pub fn describe(&self) -> String {
        let total: f64 = self.plan.costs.iter().sum();
        let ranks = self.schedule.ranks.len();
        let mut out = format!(
            "{} pipeline: {} stage{} on {ranks} rank{}, {} micro-batches per step",
            self.schedule.method,
            self.plan.stages(),
            plural(self.plan.stages()),
            plural(ranks),
            self.schedule.micro_batches
        );
        if self.replicas > 1 {
            out.push_str(&format!(
                "; {} data-parallel replicas ({} ranks, {} micro-batches in all)",
                self.replicas,
                self.world(),
                self.micro_batches_per_step()
            ));
        }
        out.push('\n');
        for (s, (range, cost)) in self.plan.ranges.iter().zip(&self.plan.costs).enumerate() {
            let stage = &self.stages[s];
            let ends = match (stage.first, stage.last) {
                (true, true) => " + embedding + head",
                (true, false) => " + embedding",
                (false, true) => " + head",
                (false, false) => "",
            };
            out.push_str(&format!(
                "  stage {s}: layers {}..{}{ends}, {:.0}% of the forward FLOPs, {:.1} MiB held \
                 per micro-batch\n",
                range.start,
                range.end,
                100.0 * cost / total,
                stage.carried_bytes as f64 / (1 << 20) as f64
            ));
        }
        out
    }

    /// Ranks in all: the schedule's ranks times the data-parallel replicas.
    pub fn world(&self) -> usize {
        self.schedule.ranks.len() * self.replicas
    }

    /// Micro-batches one step consumes: the schedule's, for each replica.
    pub fn micro_batches_per_step(&self) -> usize {
        self.schedule.micro_batches * self.replicas
    }

    /// Runs one step over `micro_batches` (token ids, one tensor each, as many as
    /// [`Self::micro_batches_per_step`]: replica d takes the d-th run of the schedule's count)
    /// with `weights`.
    pub fn run(
        &self,
        weights: &Weights,
        micro_batches: &[HostTensor],
    ) -> Result<PipelineStep, PipelineError> {
        if micro_batches.len() != self.micro_batches_per_step() {
            return Err(PipelineError::Settings(format!(
                "the pipeline runs {} micro-batches a step, got {}",
                self.micro_batches_per_step(),
                micro_batches.len()
            )));
        }
        let holders = self.holders();
        let cancel = AtomicBool::new(false);
        let start = Instant::now();
        let comms = ThreadComm::group(self.world(), self.timeout);
        let results: Vec<Result<RankResult, PipelineError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let rank = comm.rank();
                    let (holders, cancel) = (&holders, &cancel);
                    let handle = std::thread::Builder::new()
                        .name(format!("pipeline-rank-{rank}"))
                        .spawn_scoped(scope, move || {
                            let mut worker =
                                RankWorker::new(self, comm, weights, micro_batches, start);
                            let result = worker.run(cancel, holders);
                            if result.is_err() {
                                cancel.store(true, Ordering::SeqCst);
                            }
                            result
                        });
                    (rank, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(rank, handle)| match handle {
                    Ok(handle) => handle.join().unwrap_or_else(|panic| {
                        cancel.store(true, Ordering::SeqCst);
                        Err(PipelineError::Panicked {
                            rank,
                            message: panic_message(panic.as_ref()),
                        })
                    }),
                    Err(e) => Err(PipelineError::Panicked {
                        rank,
                        message: format!("cannot start the thread: {e}"),
                    }),
                })
                .collect()
        });
        self.combine(results, weights)
    }

    /// For each parameter, the ranks that hold a copy (sorted): the ranks running its stage,
    /// in every replica.
    fn holders(&self) -> BTreeMap<String, Vec<usize>> {
        let mut holders: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        let per_replica = self.schedule.ranks.len();
        for (rank, ops) in self.schedule.ranks.iter().enumerate() {
            for op in ops {
                if let ScheduleOp::F(c) | ScheduleOp::FB { f: c, .. } = op {
                    for p in &self.stages[c.stage].parameters {
                        for replica in 0..self.replicas {
                            let global = replica * per_replica + rank;
                            holders.entry(p.clone()).or_default().insert(global);
                        }
                    }
                }
            }
        }
        holders
            .into_iter()
            .map(|(p, ranks)| (p, ranks.into_iter().collect()))
            .collect()
    }

    /// Merges the ranks' results, or reports the failure that started it all.
    fn combine(
        &self,
        results: Vec<Result<RankResult, PipelineError>>,
        weights: &Weights,
    ) -> Result<PipelineStep, PipelineError> {
        let mut failures = Vec::new();
        let mut ok = Vec::new();
        for result in results {
            match result {
                Ok(r) => ok.push(r),
                Err(e) => failures.push(e),
            }
        }
        if !failures.is_empty() {
            let root = failures
                .iter()
                .position(|e| !is_consequence(e))
                .unwrap_or(0);
            return Err(failures.swap_remove(root));
        }
        let micro = self.micro_batches_per_step();
        let mut grads = Grads::new();
        let mut loads: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut parts: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); micro];
        let mut clocks = Vec::with_capacity(ok.len());
        for result in ok {
            clocks.push(result.clock);
            grads.extend(result.grads);
            for (bias, load) in result.loads {
                let sum = loads.entry(bias).or_insert_with(|| vec![0.0; load.len()]);
                for (s, l) in sum.iter_mut().zip(load) {
                    *s += l;
                }
            }
            for (mb, values) in result.losses {
                for (name, value) in values {
                    *parts[mb].entry(name).or_insert(0.0) += value;
                }
            }
        }
        // Parameters no stage reads (the MTP modules with the MTP loss off) get zeros, as
        // the whole-model graph gives them.
        for name in &self.parameters {
            if !grads.contains_key(name) {
                let len = weights.get(name).map_or(0, |w| floats(w).len());
                grads.insert(name.clone(), vec![0.0; len]);
            }
        }
        let losses = parts.iter().map(|p| self.loss_outputs(p)).collect();
        Ok(PipelineStep {
            grads,
            losses,
            loads,
            timeline: timeline::measured(&self.schedule, clocks),
        })
    }

    /// The whole-model loss outputs of one micro-batch from the stages' parts.
    fn loss_outputs(&self, parts: &BTreeMap<String, f64>) -> BTreeMap<String, HostTensor> {
        let scalar = |v: f64| HostTensor::f32(Vec::<usize>::new(), vec![v as f32]);
        let mut out = BTreeMap::new();
        let next_token = parts.get("loss.next_token").copied().unwrap_or(f64::NAN);
        let mut total = next_token;
        out.insert("loss.next_token".to_owned(), scalar(next_token));
        if let Some(&mtp) = parts.get("loss.mtp") {
            out.insert("loss.mtp".to_owned(), scalar(mtp));
            total += self.losses.mtp.unwrap_or(0.0) * mtp;
        }
        if let Some(&balance) = parts.get("loss.balance") {
            out.insert("loss.balance".to_owned(), scalar(balance));
            total += self.losses.balance.unwrap_or(0.0) * balance;
        }
        out.insert("loss".to_owned(), scalar(total));
        out
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One stage on one rank: each micro-batch's forward, then its backward.
fn single_stage(micro_batches: usize) -> Schedule {
    let ops = (0..micro_batches)
        .flat_map(|mb| {
            [
                ScheduleOp::F(Chunk::new(mb, 0)),
                ScheduleOp::B(Chunk::new(mb, 0)),
            ]
        })
        .collect();
    Schedule {
        method: fathom_compiler::pipeline::Method::OneFOneB,
        pp: 1,
        micro_batches,
        ranks: vec![ops],
    }
}

fn is_consequence(error: &PipelineError) -> bool {
    match error {
        PipelineError::Rank { failure, .. } | PipelineError::Reduce { failure, .. } => {
            failure.is_consequence()
        }
        _ => false,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

fn input_phase(name: &str) -> Phase {
    match name {
        names::GRAD_HIDDEN_OUT => Phase::InputGrad,
        _ => Phase::Forward,
    }
}

fn output_phase(name: &str) -> Phase {
    match name {
        names::GRAD_HIDDEN_IN => Phase::InputGrad,
        _ if name.starts_with("grad.") => Phase::WeightGrad,
        _ => Phase::Forward,
    }
}

fn compile_stage(
    stage: usize,
    plan: &StagePlan,
    parameters: Vec<String>,
    pieces: &PhaseGraphs,
    backend: Backend,
) -> Result<StageProgram, PipelineError> {
    let mut compiled: [Option<Executable>; 3] = [None, None, None];
    for phase in Phase::ALL {
        let graph = pieces.get(phase);
        if graph.outputs.is_empty() {
            continue;
        }
        let executable =
            Executable::new(graph.clone(), backend).map_err(|source| PipelineError::Compile {
                stage,
                phase,
                source: Box::new(source),
            })?;
        compiled[phase as usize] = Some(executable);
    }
    let (first, last) = (plan.is_first(stage), plan.is_last(stage));
    Ok(StageProgram {
        pieces: compiled,
        parameters,
        reads_ids: first || last,
        first,
        last,
        carried_bytes: pieces.carried_bytes(Phase::Forward),
    })
}

/// What one rank hands back.
struct RankResult {
    /// Reduced gradients of the parameters this rank is the first holder of.
    grads: Grads,
    /// Loss parts of the micro-batches whose stages ran here, by micro-batch.
    losses: BTreeMap<usize, BTreeMap<String, f64>>,
    loads: BTreeMap<String, Vec<f64>>,
    clock: RankClock,
}

/// One rank's state during a step.
struct RankWorker<'a> {
    pipeline: &'a Pipeline,
    comm: ThreadComm,
    /// The rank within its replica (the schedule's rank) and the replica.
    local: usize,
    replica: usize,
    weights: &'a Weights,
    /// The replica's micro-batches.
    micro_batches: &'a [HostTensor],
    /// Transfers produced here or received, until they are consumed or sent on.
    mailbox: HashMap<Message, HostTensor>,
    /// Per chunk in flight: its inputs and what its earlier pieces handed on.
    held: HashMap<Chunk, BTreeMap<String, HostTensor>>,
    grads: Grads,
    losses: BTreeMap<usize, BTreeMap<String, f64>>,
    loads: BTreeMap<String, Vec<f64>>,
    clock: RankClock,
}

impl<'a> RankWorker<'a> {
    fn new(
        pipeline: &'a Pipeline,
        comm: ThreadComm,
        weights: &'a Weights,
        micro_batches: &'a [HostTensor],
        start: Instant,
    ) -> Self {
        let per_replica = pipeline.schedule.ranks.len();
        let (replica, local) = (comm.rank() / per_replica, comm.rank() % per_replica);
        let count = pipeline.schedule.micro_batches;
        RankWorker {
            pipeline,
            comm,
            local,
            replica,
            weights,
            micro_batches: &micro_batches[replica * count..(replica + 1) * count],
            mailbox: HashMap::new(),
            held: HashMap::new(),
            grads: Grads::new(),
            losses: BTreeMap::new(),
            loads: BTreeMap::new(),
            clock: RankClock::new(start),
        }
    }

    fn run(
        &mut self,
        cancel: &AtomicBool,
        holders: &BTreeMap<String, Vec<usize>>,
    ) -> Result<RankResult, PipelineError> {
        let rank = self.comm.rank();
        let ops = &self.pipeline.schedule.ranks[self.local];
        for (index, op) in ops.iter().enumerate() {
            let failed = |failure| PipelineError::Rank {
                rank,
                index,
                op: op.to_string(),
                failure: Box::new(failure),
            };
            if cancel.load(Ordering::SeqCst) {
                return Err(failed(RankFailure::Cancelled));
            }
            if let Some(fault) = self
                .pipeline
                .fault
                .filter(|f| (f.rank, f.op_index) == (rank, index))
            {
                match fault.kind {
                    FaultKind::Fail => return Err(failed(RankFailure::Injected)),
                    FaultKind::Stall => {
                        while !cancel.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        return Err(failed(RankFailure::Cancelled));
                    }
                }
            }
            let started = self.clock.now();
            let done = self.op(op);
            self.clock.record(index, *op, started);
            done.map_err(failed)?;
            self.clock.holding(self.held.len());
        }
        if !self.held.is_empty() || !self.mailbox.is_empty() {
            let failure = RankFailure::Schedule(format!(
                "the schedule ended with {} chunks without a weight-gradient pass and {} \
                 transfers never used",
                self.held.len(),
                self.mailbox.len()
            ));
            return Err(PipelineError::Reduce {
                rank,
                failure: Box::new(failure),
            });
        }
        let grads = self
            .reduce(holders)
            .map_err(|failure| PipelineError::Reduce {
                rank,
                failure: Box::new(failure),
            })?;
        Ok(RankResult {
            grads,
            losses: std::mem::take(&mut self.losses),
            loads: std::mem::take(&mut self.loads),
            clock: std::mem::replace(&mut self.clock, RankClock::new(Instant::now())),
        })
    }

    fn op(&mut self, op: &ScheduleOp) -> Result<(), RankFailure> {
        match *op {
            ScheduleOp::F(c) => self.forward(c),
            ScheduleOp::B(c) => {
                self.input_grad(c)?;
                self.weight_grad(c)
            }
            ScheduleOp::BInput(c) => self.input_grad(c),
            ScheduleOp::W(c) => self.weight_grad(c),
            // Overlapping the two only pays when communication runs beside computation; on
            // CPU threads they run one after the other, which computes the same.
            ScheduleOp::FB { f, b } => {
                self.forward(f)?;
                self.input_grad(b)?;
                self.weight_grad(b)
            }
            ScheduleOp::Send { peer, msg } => {
                let peer = self.global(peer);
                let tensor = self.mailbox.remove(&msg).ok_or_else(|| {
                    RankFailure::Schedule(format!(
                        "nothing to send: the {} is not here",
                        Tag::Pipeline(msg)
                    ))
                })?;
                Ok(self.comm.send(peer, Tag::Pipeline(msg), tensor)?)
            }
            ScheduleOp::Recv { peer, msg } => {
                let peer = self.global(peer);
                let tensor = self.comm.recv(peer, &Tag::Pipeline(msg))?;
                self.mailbox.insert(msg, tensor);
                Ok(())
            }
        }
    }

    /// The global rank of the schedule's rank `local` in this replica.
    fn global(&self, local: usize) -> usize {
        self.replica * self.pipeline.schedule.ranks.len() + local
    }

    /// Takes a transfer that must already be here (received, or produced on this rank).
    fn take(&mut self, msg: Message) -> Result<HostTensor, RankFailure> {
        self.mailbox.remove(&msg).ok_or_else(|| {
            RankFailure::Schedule(format!(
                "the {} is needed but has not been received",
                Tag::Pipeline(msg)
            ))
        })
    }

    fn forward(&mut self, c: Chunk) -> Result<(), RankFailure> {
        let stage = &self.pipeline.stages[c.stage];
        let mut inputs = BTreeMap::new();
        if stage.reads_ids {
            inputs.insert(
                names::INPUT_IDS.to_owned(),
                self.micro_batches[c.mb].clone(),
            );
        }
        if !stage.first {
            let from = Message {
                payload: Payload::Activation,
                chunk: Chunk::new(c.mb, c.stage - 1),
            };
            inputs.insert(names::HIDDEN_IN.to_owned(), self.take(from)?);
        }
        let outputs = self.piece(c.stage, Phase::Forward, &inputs)?;
        for (name, tensor) in outputs {
            if name == names::HIDDEN_OUT {
                let msg = Message {
                    payload: Payload::Activation,
                    chunk: c,
                };
                self.mailbox.insert(msg, tensor);
            } else if let Some(bias) = name.strip_prefix("expert_load.") {
                let load = floats(&tensor);
                let sum = self
                    .loads
                    .entry(bias.to_owned())
                    .or_insert_with(|| vec![0.0; load.len()]);
                for (s, &l) in sum.iter_mut().zip(load) {
                    *s += l as f64;
                }
            } else if name.starts_with("loss") {
                let value = floats(&tensor).first().copied().unwrap_or(f32::NAN);
                *self
                    .losses
                    .entry(self.replica * self.micro_batches.len() + c.mb)
                    .or_default()
                    .entry(name)
                    .or_insert(0.0) += value as f64;
            } else {
                inputs.insert(name, tensor);
            }
        }
        self.held.insert(c, inputs);
        Ok(())
    }

    fn input_grad(&mut self, c: Chunk) -> Result<(), RankFailure> {
        let stage = &self.pipeline.stages[c.stage];
        if !stage.last {
            let from = Message {
                payload: Payload::Gradient,
                chunk: Chunk::new(c.mb, c.stage + 1),
            };
            let gradient = self.take(from)?;
            self.held_mut(c)?
                .insert(names::GRAD_HIDDEN_OUT.to_owned(), gradient);
        }
        let inputs = self.held.remove(&c).unwrap_or_default();
        let outputs = self.piece(c.stage, Phase::InputGrad, &inputs);
        let mut inputs = inputs;
        for (name, tensor) in outputs? {
            if name == names::GRAD_HIDDEN_IN {
                let msg = Message {
                    payload: Payload::Gradient,
                    chunk: c,
                };
                self.mailbox.insert(msg, tensor);
            } else {
                inputs.insert(name, tensor);
            }
        }
        self.held.insert(c, inputs);
        Ok(())
    }

    fn weight_grad(&mut self, c: Chunk) -> Result<(), RankFailure> {
        let inputs = self.held.remove(&c).ok_or_else(|| {
            RankFailure::Schedule(format!(
                "weight-gradient pass of micro-batch {} on stage {} before its forward",
                c.mb, c.stage
            ))
        })?;
        let outputs = self.piece(c.stage, Phase::WeightGrad, &inputs)?;
        let scale = 1.0 / self.pipeline.micro_batches_per_step() as f32;
        for (name, tensor) in outputs {
            if let Some(param) = name.strip_prefix("grad.") {
                let g = floats(&tensor);
                match self.grads.get_mut(param) {
                    Some(acc) => acc.iter_mut().zip(g).for_each(|(a, &x)| *a += scale * x),
                    None => {
                        self.grads
                            .insert(param.to_owned(), g.iter().map(|&x| scale * x).collect());
                    }
                }
            }
        }
        Ok(())
    }

    fn held_mut(&mut self, c: Chunk) -> Result<&mut BTreeMap<String, HostTensor>, RankFailure> {
        self.held.get_mut(&c).ok_or_else(|| {
            RankFailure::Schedule(format!(
                "backward of micro-batch {} on stage {} before its forward",
                c.mb, c.stage
            ))
        })
    }

    fn piece(
        &self,
        stage: usize,
        phase: Phase,
        inputs: &BTreeMap<String, HostTensor>,
    ) -> Result<BTreeMap<String, HostTensor>, RankFailure> {
        match &self.pipeline.stages[stage].pieces[phase as usize] {
            Some(executable) => Ok(executable.run(&Feeds::new(inputs, self.weights))?),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Sums each parameter's gradient over the ranks holding it; the first holder keeps it.
    fn reduce(&mut self, holders: &BTreeMap<String, Vec<usize>>) -> Result<Grads, RankFailure> {
        let rank = self.comm.rank();
        let mut kept = Grads::new();
        for (name, group) in holders {
            if !group.contains(&rank) {
                continue;
            }
            let mut values = self.grads.remove(name).ok_or_else(|| {
                RankFailure::Schedule(format!(
                    "no gradient of `{name}` on rank {rank}, which holds it"
                ))
            })?;
            self.comm.all_reduce_sum(group, name, &mut values)?;
            if group[0] == rank {
                kept.insert(name.clone(), values);
            }
        }
        Ok(kept)
    }
}

fn floats(tensor: &HostTensor) -> &[f32] {
    match &tensor.data {
        Data::Float(values) => values,
        _ => &[],
    }
}
