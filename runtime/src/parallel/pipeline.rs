//! A training step run by pipeline ranks under a schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fathom_compiler::compile::CompileOptions;
use fathom_compiler::model::LossWeights;
use fathom_compiler::partition::{
    Phase, PhaseGraphs, StagePlan, layer_costs, names, split_phases, stage_graph,
};
use fathom_compiler::passes::{
    RecomputePolicy, common_subexpressions, dead_code, fold_constants, recompute,
};
use fathom_compiler::pipeline::{Chunk, Schedule, ScheduleOp, SimReport, generate};
use fathom_compiler::precision::{PrecisionPolicy, apply_precision};
use fathom_compiler::spec::ModelSpec;

use crate::exec::{Backend, Executable};
use crate::optim::{Grads, ShardPlan, add_expert_load};
use crate::tensor::HostTensor;
use crate::weights::Weights;

use super::comm::{Comm, ThreadComm};
use super::error::{PipelineError, is_consequence, panic_message};
use super::experts::owner;
use super::fault::Fault;
use super::rank::{RankResult, RankSummary, RankWorker, floats};
use super::settings::PipelineSettings;
use super::timeline;

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

/// One micro-batch's loss outputs, by name.
pub(super) type LossOutputs = BTreeMap<String, HostTensor>;

/// One stage's compiled pieces.
pub(super) struct StageProgram {
    /// `None` for a piece without outputs (the first stage's input-gradient piece).
    pub(super) pieces: [Option<Executable>; 3],
    pub(super) parameters: Vec<String>,
    /// The weight-gradient piece's outputs (`grad.<parameter>`), which each rank sums over its
    /// micro-batches.
    pub(super) weight_grads: Vec<String>,
    pub(super) reads_ids: bool,
    pub(super) first: bool,
    pub(super) last: bool,
    pub(super) carried_bytes: u64,
}

/// A training step compiled for a pipeline schedule.
pub struct Pipeline {
    pub(super) schedule: Schedule,
    /// Data-parallel replicas of the whole pipeline, each on its own micro-batches.
    pub(super) replicas: usize,
    /// Consecutive replicas that share their routed experts, each owning a block of them.
    pub(super) expert_parallel: usize,
    /// Routed experts per MoE layer (0 without MoE).
    pub(super) routed_experts: usize,
    pub(super) plan: StagePlan,
    pub(super) stages: Vec<StageProgram>,
    /// Every trainable parameter of the model (unused ones get zero gradients, as in the
    /// whole-model graph).
    pub(super) parameters: Vec<String>,
    pub(super) losses: LossWeights,
    pub(super) timeout: Duration,
    pub(super) fault: Option<Fault>,
    /// ZeRO-1: shard the optimizer state over each parameter's holders.
    pub(super) zero: bool,
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
        Self::build(settings, run, None)
    }

    /// [`Pipeline::new`] for a process that runs only the global rank `rank` of a group of
    /// `world` processes (see [`Pipeline::run_rank`]): compiles only the stages that rank runs.
    /// The group must have one process per rank of the pipeline.
    pub fn for_rank(
        settings: &PipelineSettings,
        run: PipelineRun<'_>,
        rank: usize,
        world: usize,
    ) -> Result<Pipeline, PipelineError> {
        Self::build(settings, run, Some((rank, world)))
    }

    fn build(
        settings: &PipelineSettings,
        run: PipelineRun<'_>,
        only_rank: Option<(usize, usize)>,
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
        let routed_experts = run.spec.moe.as_ref().map_or(0, |m| m.routed_experts);
        check_expert_parallel(settings, routed_experts, run.backend)?;
        if !(settings.timeout_seconds.is_finite() && settings.timeout_seconds > 0.0) {
            return Err(PipelineError::Settings(format!(
                "`timeout_seconds` must be a positive number of seconds, got {}",
                settings.timeout_seconds
            )));
        }
        if settings.zero > 1 {
            return Err(PipelineError::Settings(format!(
                "`zero` = {}: ZeRO stage 0 (off) or 1 (sharded optimizer state); stages 2 and 3 \
                 are not implemented",
                settings.zero
            )));
        }
        let ranks = schedule.ranks.len() * settings.data_parallel;
        if let Some((_, world)) = only_rank.filter(|&(rank, world)| world != ranks || rank >= world)
        {
            return Err(PipelineError::Settings(format!(
                "{} stage(s) × {} replica(s) under {} run on {ranks} ranks, but the group has \
                 {world} processes (WORLD_SIZE): start one process per rank",
                settings.stages, settings.data_parallel, settings.schedule
            )));
        }
        // The stages a process running one rank needs compiled (the parameters of the others
        // still tell it who holds what).
        let runs_stage = |stage: usize| match only_rank {
            None => true,
            Some((rank, _)) => {
                stages_run(&schedule.ranks[rank % schedule.ranks.len()]).contains(&stage)
            }
        };
        let with_mtp = run.losses.mtp.is_some() && run.spec.mtp_depth > 0;
        let costs = layer_costs(run.spec, run.seq, with_mtp)?;
        let plan = StagePlan::balanced(&costs, settings.stages)?;
        let tiling = run.spec.fp8.clone().unwrap_or_default();
        let options = CompileOptions::from_env();
        // Recomputation decides what F hands to B, so it runs on the whole stage graph before
        // the split (and not again on each piece): a recomputed RMSNorm output is then
        // computed in B from its carried input instead of being carried itself.
        let piece_options = CompileOptions {
            recompute: RecomputePolicy::None,
            ..options.clone()
        };
        let mut stages = Vec::with_capacity(plan.stages());
        for stage in 0..plan.stages() {
            let built = stage_graph(run.spec, &plan, stage, run.batch, run.seq, run.losses)?;
            let graph = apply_precision(&built.graph, run.precision, &tiling)
                .map_err(|e| PipelineError::Settings(format!("precision: {e}")))?;
            let graph = recompute(
                &fold_constants(&common_subexpressions(&dead_code(&graph))),
                options.recompute,
            );
            let pieces = split_phases(&graph, input_phase, output_phase)?;
            stages.push(compile_stage(
                stage,
                &plan,
                built.parameters,
                &pieces,
                run.backend,
                &piece_options,
                runs_stage(stage),
            )?);
        }
        Ok(Pipeline {
            schedule,
            replicas: settings.data_parallel,
            expert_parallel: settings.expert_parallel,
            routed_experts,
            plan,
            stages,
            parameters: run.parameters.to_vec(),
            losses: run.losses,
            timeout: Duration::from_secs_f64(settings.timeout_seconds),
            fault: Fault::from_env().map_err(PipelineError::Settings)?,
            zero: settings.zero == 1,
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
        if self.expert_parallel > 1 {
            out.push_str(&format!(
                "; groups of {} replicas split the routed experts ({} of each MoE layer per \
                 replica)",
                self.expert_parallel,
                self.routed_experts / self.expert_parallel
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
    /// with `weights`, of version `weights_version` when the caller numbers its weights
    /// ([`crate::interp::Feeds::parameters_version`]: a stage on a GPU then uploads them, and
    /// makes their FP8 codes, once per version instead of for every micro-batch).
    pub fn run(
        &self,
        weights: &Weights,
        weights_version: Option<u64>,
        micro_batches: &[HostTensor],
    ) -> Result<PipelineStep, PipelineError> {
        self.check_micro_batches(micro_batches.len())?;
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
                                RankWorker::new(self, comm, weights, micro_batches, start)
                                    .with_weights_version(weights_version);
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

    /// Refuses a step of another number of micro-batches than the pipeline runs.
    pub(super) fn check_micro_batches(&self, count: usize) -> Result<(), PipelineError> {
        match count == self.micro_batches_per_step() {
            true => Ok(()),
            false => Err(PipelineError::Settings(format!(
                "the pipeline runs {} micro-batches a step, got {count}",
                self.micro_batches_per_step()
            ))),
        }
    }

    /// For each parameter, the ranks that hold a copy (sorted): the ranks running its stage,
    /// in every replica.
    pub(super) fn holders(&self) -> BTreeMap<String, Vec<usize>> {
        let mut holders: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        let per_replica = self.schedule.ranks.len();
        for (rank, ops) in self.schedule.ranks.iter().enumerate() {
            for stage in stages_run(ops) {
                for p in &self.stages[stage].parameters {
                    // A routed expert lives on the member of each expert-parallel group that
                    // owns it; everything else on every replica.
                    let owner = routed_expert(p)
                        .map(|e| owner(e, self.routed_experts, self.expert_parallel));
                    for replica in 0..self.replicas {
                        if owner.is_some_and(|o| o != replica % self.expert_parallel) {
                            continue;
                        }
                        let global = replica * per_replica + rank;
                        holders.entry(p.clone()).or_default().insert(global);
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
        let holders = self.holders();
        let mut grads = Grads::new();
        let mut summaries = Vec::with_capacity(ok.len());
        let mut clocks = Vec::with_capacity(ok.len());
        for result in ok {
            clocks.push(result.clock);
            summaries.push(result.summary);
            // Every holder has the same sum: take the first holder's.
            let rank = result.rank;
            grads.extend(
                result
                    .grads
                    .into_iter()
                    .filter(|(name, _)| holders[name].first() == Some(&rank)),
            );
        }
        self.zero_unused(&mut grads, &holders, weights);
        let (losses, loads) = self.merge(&summaries);
        Ok(PipelineStep {
            grads,
            losses,
            loads,
            timeline: timeline::measured(&self.schedule, clocks),
        })
    }

    /// Zero gradients for the parameters no stage reads (the MTP modules with the MTP loss
    /// off), as the whole-model graph gives them. Rank 0 keeps their optimizer state.
    pub(super) fn zero_unused(
        &self,
        grads: &mut Grads,
        holders: &BTreeMap<String, Vec<usize>>,
        weights: &Weights,
    ) {
        for name in self.parameters.iter().filter(|p| !holders.contains_key(*p)) {
            let len = weights.get(name).map_or(0, |w| floats(w).len());
            grads.insert(name.clone(), vec![0.0; len]);
        }
    }

    /// The loss outputs of every micro-batch and the expert loads, from every rank's summary
    /// (in rank order, which fixes the order of the sums).
    pub(super) fn merge(
        &self,
        summaries: &[RankSummary],
    ) -> (Vec<LossOutputs>, BTreeMap<String, Vec<f64>>) {
        let mut loads: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut parts: Vec<BTreeMap<String, f64>> =
            vec![BTreeMap::new(); self.micro_batches_per_step()];
        for summary in summaries {
            for (bias, load) in &summary.loads {
                add_expert_load(&mut loads, bias, load.iter().copied());
            }
            for (&mb, values) in &summary.losses {
                for (name, value) in values {
                    *parts[mb].entry(name.clone()).or_insert(0.0) += value;
                }
            }
        }
        let losses = parts.iter().map(|p| self.loss_outputs(p)).collect();
        (losses, loads)
    }

    /// Who keeps the optimizer state of which elements: every parameter's holders (rank 0
    /// for the parameters no stage reads), sharded over them under ZeRO-1. `sizes`: every
    /// trainable parameter's element count.
    pub fn shard_plan(&self, sizes: &BTreeMap<String, usize>) -> ShardPlan {
        let mut holders = self.holders();
        for name in sizes.keys() {
            holders.entry(name.clone()).or_insert_with(|| vec![0]);
        }
        holders.retain(|name, _| sizes.contains_key(name));
        ShardPlan::new(sizes, holders, self.zero)
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

/// The expert index of a routed expert's parameter (`model.layers.3.mlp.experts.7.up_proj.weight`).
fn routed_expert(parameter: &str) -> Option<usize> {
    let (_, rest) = parameter.split_once(".mlp.experts.")?;
    rest.split('.').next()?.parse().ok()
}

/// Expert parallelism needs whole blocks of experts per member, groups of whole replicas, and
/// the compiled CPU backend (which runs the exchanges).
fn check_expert_parallel(
    settings: &PipelineSettings,
    routed_experts: usize,
    backend: Backend,
) -> Result<(), PipelineError> {
    let ep = settings.expert_parallel;
    let bad = |reason: String| Err(PipelineError::Settings(reason));
    if ep == 0 {
        return bad("`expert_parallel` must be at least 1".into());
    }
    if ep == 1 {
        return Ok(());
    }
    if !settings.data_parallel.is_multiple_of(ep) {
        return bad(format!(
            "`expert_parallel` = {ep} must divide `data_parallel` = {} (experts are shared by \
             groups of data-parallel replicas)",
            settings.data_parallel
        ));
    }
    if routed_experts == 0 || !routed_experts.is_multiple_of(ep) {
        return bad(format!(
            "`expert_parallel` = {ep} must divide the model's {routed_experts} routed experts"
        ));
    }
    if backend != Backend::Cpu {
        return bad(format!(
            "expert parallelism runs on the compiled CPU backend, not `{backend:?}`"
        ));
    }
    Ok(())
}

/// The stages whose forward a rank's ops run (and so whose parameters it holds).
pub(super) fn stages_run(ops: &[ScheduleOp]) -> BTreeSet<usize> {
    ops.iter()
        .filter_map(|op| match op {
            ScheduleOp::F(c) | ScheduleOp::FB { f: c, .. } => Some(c.stage),
            _ => None,
        })
        .collect()
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
    options: &CompileOptions,
    compile: bool,
) -> Result<StageProgram, PipelineError> {
    let mut compiled: [Option<Executable>; 3] = [None, None, None];
    for phase in Phase::ALL {
        let graph = pieces.get(phase);
        if graph.outputs.is_empty() || !compile {
            continue;
        }
        let executable =
            Executable::with_options(graph.clone(), backend, options).map_err(|source| {
                PipelineError::Compile {
                    stage,
                    phase,
                    source: Box::new(source),
                }
            })?;
        compiled[phase as usize] = Some(executable);
    }
    let (first, last) = (plan.is_first(stage), plan.is_last(stage));
    let weight_grads = (pieces.get(Phase::WeightGrad).outputs.iter())
        .map(|output| output.name.clone())
        .collect();
    Ok(StageProgram {
        pieces: compiled,
        parameters,
        weight_grads,
        reads_ids: first || last,
        first,
        last,
        carried_bytes: pieces.carried_bytes(Phase::Forward),
    })
}
