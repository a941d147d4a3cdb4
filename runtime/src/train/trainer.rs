//! The training loop's state and its step.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use fathom_compiler::pipeline::SimReport;
use fathom_compiler::precision::apply_precision;
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::training::{TrainingGraph, training_graph};

use crate::data::Batches;
use crate::exec::{ExecError, Executable};
use crate::interp::Feeds;
use crate::optim::{
    AdamW, Grads, LoadStats, ShardPlan, ShardedAdamW, add_expert_load, clip_coefficient,
    clip_to_norm, global_norm, norm_of_square_sums, update_balancing_bias,
};
use crate::parallel::{
    Comm, Pipeline, PipelineError, PipelineRun, any_rank, gather_state, global_norm_over,
    share_updates,
};
use crate::tensor::{Data, HostTensor};
use crate::weights::Weights;

use super::checkpoint::{Checkpoint, TrainerState};
use super::{StepReport, TrainError, TrainSettings};

/// What computes a step's losses and gradients.
enum Engine {
    /// The whole training graph on one rank, once per micro-batch.
    Whole(Executable),
    /// Pipeline stages on ranks that run a schedule over all the micro-batches at once.
    Pipeline(Box<Pipeline>),
    /// One rank of the pipeline, the others being processes of their own, joined by TCP (or
    /// NCCL on GPUs).
    Rank(Box<Pipeline>, Box<dyn Comm>),
}

impl Engine {
    fn new(
        spec: &ModelSpec,
        settings: &TrainSettings,
        program: &TrainingGraph,
        group: Option<Box<dyn Comm>>,
    ) -> Result<Engine, TrainError> {
        if !settings.pipeline.is_parallel() && group.is_none() {
            return Ok(Engine::Whole(Executable::new(
                program.graph.clone(),
                settings.backend,
            )?));
        }
        let run = PipelineRun {
            spec,
            batch: settings.batch,
            seq: settings.seq,
            micro_batches: settings.micro_batches,
            losses: settings.losses,
            precision: &settings.precision,
            backend: settings.backend,
            parameters: &program.parameters,
        };
        let setting = |e| match e {
            PipelineError::Settings(reason) => TrainError::Settings {
                field: "pipeline".into(),
                reason,
            },
            other => TrainError::Pipeline(other),
        };
        let Some(comm) = group else {
            let pipeline = Pipeline::new(&settings.pipeline, run).map_err(setting)?;
            return Ok(Engine::Pipeline(Box::new(pipeline)));
        };
        let pipeline = Pipeline::for_rank(&settings.pipeline, run, comm.rank(), comm.world())
            .map_err(setting)?;
        Ok(Engine::Rank(Box::new(pipeline), comm))
    }

    /// Who keeps the optimizer state of which parameter elements, and the ranks whose shards
    /// this process keeps.
    fn shard_plan(&self, sizes: &BTreeMap<String, usize>) -> (ShardPlan, BTreeSet<usize>) {
        match self {
            Engine::Whole(_) => {
                let plan = ShardPlan::single(sizes.iter().map(|(n, &s)| (n.as_str(), s)));
                (plan, BTreeSet::from([0]))
            }
            Engine::Pipeline(pipeline) => {
                let plan = pipeline.shard_plan(sizes);
                let owners = plan.owners();
                (plan, owners)
            }
            Engine::Rank(pipeline, comm) => {
                (pipeline.shard_plan(sizes), BTreeSet::from([comm.rank()]))
            }
        }
    }
}

/// A training run in progress: model, optimizer, data and the compiled training graph.
pub struct Trainer {
    spec: ModelSpec,
    settings: TrainSettings,
    program: TrainingGraph,
    engine: Engine,
    weights: Weights,
    /// The AdamW state, sharded over the ranks holding each parameter (ZeRO-1; one shard on
    /// one rank when the run is not parallel). Of a process's rank only its own shard.
    optimizer: ShardedAdamW,
    data: Box<dyn Batches>,
    step: u64,
    /// Moves on before anything changes the weights: runs fed the same version see the same
    /// weights, so a GPU keeps them in device memory between them (`Feeds::parameters_version`).
    weights_version: u64,
    /// When a pipelined run's ranks ran each op during the last step.
    last_timeline: Option<SimReport>,
    /// Whether the GPU running the whole graph keeps the optimizer (`GpuExecutor::keep_optimizer`):
    /// then the trainable parameters and their moments live in device memory, and `weights` and
    /// `optimizer` hold their values as of the last [`Trainer::weights`] or checkpoint.
    optimizer_on_device: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A fresh run from `weights` (every parameter and buffer of `spec`'s model).
    pub fn new(
        spec: ModelSpec,
        settings: TrainSettings,
        weights: Weights,
        data: Box<dyn Batches>,
    ) -> Result<Self, TrainError> {
        Self::fresh(spec, settings, weights, data, None)
    }

    /// [`Trainer::new`] for one rank of a run whose ranks are processes (`group` connects it
    /// to the others, `torchrun`-style; one process per pipeline rank and replica). Every
    /// process reads the same data and starts from the same weights; each runs its rank's
    /// schedule and keeps its shard of the optimizer state, and rank 0 writes checkpoints.
    pub fn new_rank(
        spec: ModelSpec,
        settings: TrainSettings,
        weights: Weights,
        data: Box<dyn Batches>,
        group: Box<dyn Comm>,
    ) -> Result<Self, TrainError> {
        Self::fresh(spec, settings, weights, data, Some(group))
    }

    fn fresh(
        spec: ModelSpec,
        settings: TrainSettings,
        weights: Weights,
        data: Box<dyn Batches>,
        group: Option<Box<dyn Comm>>,
    ) -> Result<Self, TrainError> {
        let program = Self::program(&spec, &settings, &weights, data.as_ref())?;
        let trainable = program.parameters.iter().map(|name| {
            (
                name.as_str(),
                weights.get(name).expect("checked against the graph"),
            )
        });
        let whole = AdamW::new(settings.optimizer, trainable)?;
        Self::assemble(spec, settings, program, weights, whole, data, 0, group)
    }

    /// Continues the run saved in `checkpoint`; `data` must be the run's data source, which is
    /// moved to the saved position.
    pub fn resume(checkpoint: Checkpoint, data: Box<dyn Batches>) -> Result<Self, TrainError> {
        Self::restore(checkpoint, data, None)
    }

    /// [`Trainer::resume`] for one rank of a run whose ranks are processes (see
    /// [`Trainer::new_rank`]): each process reads the checkpoint and keeps its shard.
    pub fn resume_rank(
        checkpoint: Checkpoint,
        data: Box<dyn Batches>,
        group: Box<dyn Comm>,
    ) -> Result<Self, TrainError> {
        Self::restore(checkpoint, data, Some(group))
    }

    fn restore(
        checkpoint: Checkpoint,
        mut data: Box<dyn Batches>,
        group: Option<Box<dyn Comm>>,
    ) -> Result<Self, TrainError> {
        let Checkpoint {
            spec,
            weights,
            optimizer_state,
            state,
            path,
        } = checkpoint;
        data.seek(&state.data_position)?;
        let program = Self::program(&spec, &state.settings, &weights, data.as_ref())?;
        let optimizer = AdamW::from_state(state.settings.optimizer, optimizer_state)?;
        let mismatch = |reason: String| TrainError::Checkpoint {
            path: path.join("optimizer.safetensors"),
            reason,
        };
        optimizer.check_params(&weights).map_err(|e| {
            mismatch(format!(
                "the optimizer state does not match the weights: {e}"
            ))
        })?;
        let with_state: BTreeSet<&str> = optimizer.trainable().collect();
        if let Some(missing) = program
            .parameters
            .iter()
            .find(|p| !with_state.contains(p.as_str()))
        {
            return Err(mismatch(format!(
                "no AdamW moments for the parameter `{missing}`"
            )));
        }
        if with_state.len() != program.parameters.len() {
            let extra = with_state
                .iter()
                .find(|name| !program.parameters.iter().any(|p| p == *name))
                .map_or("?", |n| n);
            return Err(mismatch(format!(
                "AdamW moments for `{extra}`, which the model does not train"
            )));
        }
        let step = state.step;
        Self::assemble(
            spec,
            state.settings,
            program,
            weights,
            optimizer,
            data,
            step,
            group,
        )
    }

    /// The trainer around a whole optimizer, cut into the shards this process keeps.
    #[allow(clippy::too_many_arguments)] // the parts of a trainer, each used once
    fn assemble(
        spec: ModelSpec,
        settings: TrainSettings,
        program: TrainingGraph,
        weights: Weights,
        whole: AdamW,
        data: Box<dyn Batches>,
        step: u64,
        group: Option<Box<dyn Comm>>,
    ) -> Result<Self, TrainError> {
        let mut engine = Engine::new(&spec, &settings, &program, group)?;
        let sizes: BTreeMap<String, usize> = program
            .parameters
            .iter()
            .map(|name| (name.clone(), weights.get(name).map_or(0, |t| t.ty.numel())))
            .collect();
        let (plan, local) = engine.shard_plan(&sizes);
        let optimizer = ShardedAdamW::new(&whole, plan, local)?;
        let optimizer_on_device = keep_optimizer_on_gpu(&mut engine, &program, &whole, &weights);
        drop(whole);
        Ok(Trainer {
            spec,
            settings,
            program,
            engine,
            weights,
            optimizer,
            data,
            step,
            weights_version: 0,
            last_timeline: None,
            optimizer_on_device,
        })
    }

    /// Validates the settings against the data and weights and builds the training graph.
    fn program(
        spec: &ModelSpec,
        settings: &TrainSettings,
        weights: &Weights,
        data: &dyn Batches,
    ) -> Result<TrainingGraph, TrainError> {
        settings.validate()?;
        if data.batch_shape() != (settings.batch, settings.seq) {
            let (batch, seq) = data.batch_shape();
            return Err(TrainError::Settings {
                field: "batch".into(),
                reason: format!(
                    "the data source yields [{batch}, {seq}] batches, the settings ask for [{}, {}]",
                    settings.batch, settings.seq
                ),
            });
        }
        let mut program =
            training_graph(spec, settings.batch, settings.seq, settings.losses)?.without_logits();
        // FP8 tiles come from the model (DeepSeek-V3's 128 when it names none).
        let tiling = spec.fp8.clone().unwrap_or_default();
        program.graph =
            apply_precision(&program.graph, &settings.precision, &tiling).map_err(|e| {
                TrainError::Settings {
                    field: "precision".into(),
                    reason: e.to_string(),
                }
            })?;
        weights.check_against(&program.graph, |_| false)?;
        Ok(program)
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// The weights as the last step left them (brought back from the GPU when it keeps the
    /// optimizer).
    pub fn weights(&mut self) -> Result<&Weights, TrainError> {
        self.sync_from_device()?;
        Ok(&self.weights)
    }

    /// Whether the GPU keeps the optimizer: it does when it runs the whole graph, unless
    /// [`Trainer::keep_optimizer_on_host`] said otherwise or it could not.
    pub fn optimizer_on_device(&self) -> bool {
        self.optimizer_on_device
    }

    /// Keeps the optimizer on the host from now on: the same results, with every step's
    /// gradients downloaded and its parameters uploaded again (a reference for the device's
    /// optimizer, or to rule it out).
    pub fn keep_optimizer_on_host(&mut self) -> Result<(), TrainError> {
        self.sync_from_device()?;
        if let Engine::Whole(Executable::Cuda(executor)) = &mut self.engine {
            executor.release_optimizer();
        }
        self.optimizer_on_device = false;
        Ok(())
    }

    /// Brings the trainable parameters and the optimizer state back from the GPU that keeps
    /// them (nothing when none does).
    fn sync_from_device(&mut self) -> Result<(), TrainError> {
        let Engine::Whole(Executable::Cuda(executor)) = &self.engine else {
            return Ok(());
        };
        let Some(kept) = executor.optimizer_state().map_err(ExecError::from)? else {
            return Ok(());
        };
        for (name, tensor) in kept.params {
            self.weights.insert(name, tensor);
        }
        let plan = self.optimizer.plan().clone();
        self.optimizer = ShardedAdamW::new(&kept.optimizer, plan, BTreeSet::from([0]))?;
        Ok(())
    }

    /// The pipeline's stages and schedule, when the run is pipelined.
    pub fn pipeline(&self) -> Option<&Pipeline> {
        match &self.engine {
            Engine::Pipeline(pipeline) | Engine::Rank(pipeline, _) => Some(pipeline),
            Engine::Whole(_) => None,
        }
    }

    /// This process's rank when the run's ranks are processes.
    pub fn process_rank(&self) -> Option<usize> {
        match &self.engine {
            Engine::Rank(_, comm) => Some(comm.rank()),
            _ => None,
        }
    }

    /// Whether this process logs and writes checkpoints: rank 0, or the only process.
    pub fn is_leader(&self) -> bool {
        self.process_rank().is_none_or(|rank| rank == 0)
    }

    /// The optimizer's shards kept by this process (when the GPU keeps the optimizer, the
    /// moments' values as of the last [`Trainer::weights`] or checkpoint).
    pub fn optimizer(&self) -> &ShardedAdamW {
        &self.optimizer
    }

    /// Bytes of AdamW moments each rank keeps, by rank (from the shard plan, so a process
    /// knows the other ranks' too).
    pub fn optimizer_bytes_per_rank(&self) -> BTreeMap<usize, u64> {
        // Two moments per element.
        let per_element = 2 * self.settings.optimizer.moments.bytes();
        let mut bytes = BTreeMap::new();
        for (_, pieces) in self.optimizer.plan().pieces() {
            for piece in pieces {
                *bytes.entry(piece.owner).or_insert(0) += (piece.range.len() * per_element) as u64;
            }
        }
        bytes
    }

    /// One line on where the optimizer state lives and how much each rank keeps.
    pub fn describe_optimizer(&self) -> String {
        let bytes = self.optimizer_bytes_per_rank();
        let total: u64 = bytes.values().sum();
        let largest = bytes.values().copied().max().unwrap_or(0);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let how = match (self.settings.pipeline.zero, self.pipeline()) {
            (_, None) if self.optimizer_on_device => "on the GPU, beside the parameters".to_owned(),
            (_, None) => "on one rank".to_owned(),
            (0, Some(_)) => "ZeRO off: each parameter's on its first holder".to_owned(),
            _ => "ZeRO-1: sharded over each parameter's holders".to_owned(),
        };
        format!(
            "optimizer state (AdamW moments): {:.2} MiB in all, {:.2} MiB on the largest of {} \
             rank(s) ({how})",
            mib(total),
            mib(largest),
            bytes.len()
        )
    }

    /// Whether any rank asks to stop (each process's Ctrl-C), agreed by every process so that
    /// they stop after the same step; `asks` itself when the ranks are not processes.
    pub fn any_rank_stops(&mut self, asks: bool) -> Result<bool, TrainError> {
        match &mut self.engine {
            Engine::Rank(_, comm) => Ok(any_rank(comm, asks)?),
            _ => Ok(asks),
        }
    }

    /// The measured timeline of the last pipelined step (milliseconds; see
    /// [`crate::parallel::PipelineStep::timeline`]).
    pub fn last_timeline(&self) -> Option<&SimReport> {
        self.last_timeline.as_ref()
    }

    /// Makes a pipeline rank fail or stall (tests of the failure paths); no effect on an
    /// unpipelined run.
    pub fn inject_fault(&mut self, fault: Option<crate::parallel::Fault>) {
        if let Engine::Pipeline(pipeline) | Engine::Rank(pipeline, _) = &mut self.engine {
            pipeline.inject(fault);
        }
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Whether the run has taken all its steps.
    pub fn is_done(&self) -> bool {
        self.step >= self.settings.steps
    }

    /// One optimizer step over `micro_batches` micro-batches.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        let started = Instant::now();
        let micro = self.settings.micro_batches_per_step();
        let scale = 1.0 / micro as f64;
        let mut grads = Grads::new();
        let mut losses = LossSums::default();
        let mut loads: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let batches = (0..micro)
            .map(|_| self.data.next_batch())
            .collect::<Result<Vec<_>, _>>()?;
        match &mut self.engine {
            Engine::Whole(executable) => {
                // The gradients are summed over the micro-batches by the executable (on a GPU,
                // in device memory), under their outputs' names.
                let gradients = self.program.gradient_outputs();
                let summed: Vec<String> = gradients.iter().map(|(_, g)| g.clone()).collect();
                let mut sums = Grads::new();
                for ids in batches {
                    let inputs = HashMap::from([("input_ids", ids)]);
                    let feeds = Feeds::new(&inputs, &self.weights)
                        .with_parameters_version(self.weights_version);
                    let mut outputs =
                        executable.run_summing(&feeds, &summed, scale as f32, 0, &mut sums)?;
                    losses.add(&outputs, scale);
                    for bias in &self.program.balancing_biases {
                        let load = take_floats(&mut outputs, &format!("expert_load.{bias}"));
                        add_expert_load(&mut loads, bias, load.into_iter().map(f64::from));
                    }
                }
                // A GPU keeping the optimizer steps from its sums where they lie (below).
                if !self.optimizer_on_device {
                    executable.finish_sums(0, &mut sums)?;
                    for (name, output) in gradients {
                        let sum = sums.remove(&output).ok_or_else(|| {
                            ExecError::Sum(format!("no gradient `{output}` was summed"))
                        })?;
                        grads.insert(name, sum);
                    }
                }
            }
            Engine::Pipeline(pipeline) => {
                let result = pipeline.run(&self.weights, Some(self.weights_version), &batches)?;
                for outputs in &result.losses {
                    losses.add(outputs, scale);
                }
                grads = result.grads;
                loads = result.loads;
                self.last_timeline = Some(result.timeline);
            }
            Engine::Rank(pipeline, comm) => {
                let version = Some(self.weights_version);
                let result = pipeline.run_rank(comm, &self.weights, version, &batches)?;
                for outputs in &result.losses {
                    losses.add(outputs, scale);
                }
                grads = result.grads;
                loads = result.loads;
            }
        }
        let step = self.step + 1;
        let diverged = |what, value| TrainError::Diverged { step, what, value };
        if !losses.total.is_finite() {
            self.discard_device_sums()?;
            return Err(diverged("loss", losses.total));
        }
        let grad_norm = match &mut self.engine {
            // A process has only its ranks' gradients: the norm is summed with the others.
            Engine::Rank(_, comm) => global_norm_over(comm, self.optimizer.plan(), &grads)?,
            // The GPU keeping the optimizer sums the squares; the host adds them as
            // `global_norm` does.
            Engine::Whole(Executable::Cuda(executor)) if self.optimizer_on_device => {
                let sums = executor.gradient_square_sums(0).map_err(ExecError::from)?;
                norm_of_square_sums(sums.values().flatten())
            }
            _ => global_norm(&grads),
        };
        if !grad_norm.is_finite() {
            self.discard_device_sums()?;
            return Err(diverged("gradient norm", grad_norm));
        }
        let learning_rate = self.settings.schedule.lr(self.step);
        // The optimizer and the balancing biases change the weights from here on.
        self.weights_version += 1;
        match &mut self.engine {
            Engine::Whole(Executable::Cuda(executor)) if self.optimizer_on_device => {
                let clip = clip_coefficient(grad_norm, self.settings.clip_norm)?;
                (executor.step_optimizer(0, clip, learning_rate)).map_err(ExecError::from)?;
            }
            engine => {
                clip_to_norm(&mut grads, grad_norm, self.settings.clip_norm)?;
                self.optimizer
                    .step(&mut self.weights, &grads, learning_rate)?;
                if let Engine::Rank(_, comm) = engine {
                    share_updates(comm, self.optimizer.plan(), &mut self.weights)?;
                }
            }
        }
        // The gradients' storage goes back to the compiled program for its next run.
        if let Engine::Whole(executable) = &self.engine {
            for (_, g) in grads {
                executable.recycle(g);
            }
        }

        let mut max_load_violation: Option<f64> = None;
        for (bias, load) in &loads {
            let violation = LoadStats {
                counts: load.clone(),
            }
            .max_violation();
            max_load_violation = Some(max_load_violation.map_or(violation, |m| m.max(violation)));
            let gamma = self.settings.bias_update_speed;
            let mut tensor = self
                .weights
                .remove(bias)
                .expect("checked against the graph");
            if let Data::Float(values) = &mut tensor.data {
                update_balancing_bias(values, load, gamma)?;
            }
            self.weights.insert(bias.clone(), tensor);
        }
        self.step = step;
        Ok(StepReport {
            step,
            loss: losses.total,
            loss_next_token: losses.next_token,
            loss_mtp: losses.mtp,
            loss_balance: losses.balance,
            learning_rate,
            grad_norm,
            max_load_violation,
            expert_loads: loads,
            tokens: self.settings.tokens_per_step(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Drops the gradient sums a GPU keeping the optimizer holds for a step that is not taken.
    fn discard_device_sums(&self) -> Result<(), TrainError> {
        if let Engine::Whole(Executable::Cuda(executor)) = &self.engine
            && self.optimizer_on_device
        {
            executor.discard_sums(0).map_err(ExecError::from)?;
        }
        Ok(())
    }

    /// Everything a checkpoint holds, with the whole optimizer state joined from its shards.
    /// When the ranks are processes every one must call this (it gathers on rank 0), and only
    /// rank 0 gets the state; the others get `None`.
    pub fn checkpoint_state(&mut self) -> Result<Option<CheckpointState<'_>>, TrainError> {
        self.sync_from_device()?;
        let state = TrainerState {
            step: self.step,
            data_position: self.data.position(),
            settings: self.settings.clone(),
        };
        let (weights, optimizer) = match &mut self.engine {
            Engine::Rank(_, comm) => match gather_state(comm, &self.weights, &self.optimizer)? {
                Some((weights, optimizer)) => (Cow::Owned(weights), optimizer),
                None => return Ok(None),
            },
            _ => (
                Cow::Borrowed(&self.weights),
                self.optimizer.joined(Vec::new())?,
            ),
        };
        Ok(Some((state, weights, optimizer.state_tensors())))
    }
}

type Outputs = BTreeMap<String, HostTensor>;

/// What a checkpoint holds: the run's state, the weights and the optimizer state tensors.
pub type CheckpointState<'a> = (TrainerState, Cow<'a, Weights>, Vec<(String, HostTensor)>);

/// Loss outputs averaged over micro-batches.
#[derive(Default)]
struct LossSums {
    total: f64,
    next_token: f64,
    mtp: Option<f64>,
    balance: Option<f64>,
}

impl LossSums {
    fn add(&mut self, outputs: &Outputs, scale: f64) {
        let scalar = |name: &str| {
            outputs
                .get(name)
                .and_then(HostTensor::as_f32)
                .map(|v| v[0] as f64 * scale)
        };
        self.total += scalar("loss").unwrap_or(f64::NAN);
        self.next_token += scalar("loss.next_token").unwrap_or(f64::NAN);
        if let Some(v) = scalar("loss.mtp") {
            *self.mtp.get_or_insert(0.0) += v;
        }
        if let Some(v) = scalar("loss.balance") {
            *self.balance.get_or_insert(0.0) += v;
        }
    }
}

/// Moves a float output out of the interpreter's results.
fn take_floats(outputs: &mut Outputs, name: &str) -> Vec<f32> {
    match outputs.remove(name).map(|t| t.data) {
        Some(Data::Float(values)) => values,
        _ => panic!("the training graph has a float output `{name}`"),
    }
}

/// Gives the optimizer to the GPU when one runs the whole graph (`GpuExecutor::keep_optimizer`),
/// so that a step's gradients and parameters stay in device memory; whether it took it. When it
/// cannot, says why in one line and the optimizer stays on the host (same results, slower).
fn keep_optimizer_on_gpu(
    engine: &mut Engine,
    program: &TrainingGraph,
    whole: &AdamW,
    weights: &Weights,
) -> bool {
    let Engine::Whole(Executable::Cuda(executor)) = engine else {
        return false;
    };
    match executor.keep_optimizer(whole, &program.gradient_outputs(), weights) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("fathom: the optimizer stays on the host: {e}");
            false
        }
    }
}
