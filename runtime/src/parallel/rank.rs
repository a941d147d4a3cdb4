//! One rank's work during a step: its schedule's ops in order, with the transfers, and the
//! gradient all-reduce among the holders of each parameter at the end.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use fathom_compiler::partition::{Phase, names};
use fathom_compiler::pipeline::{Chunk, Message, Payload, ScheduleOp};

use crate::exec::{ExecError, Executable};
use crate::interp::Feeds;
use crate::optim::{Grads, add_expert_load};
use crate::tensor::HostTensor;
use crate::weights::Weights;

use super::comm::{Comm, Tag};
use super::error::{PipelineError, RankFailure};
use super::experts::CommExchange;
use super::fault::FaultKind;
use super::pipeline::{Pipeline, stages_run};
use super::timeline::RankClock;

/// What one rank hands back.
pub(super) struct RankResult {
    pub(super) rank: usize,
    /// Reduced gradients of the parameters this rank holds (every holder has the same sums).
    pub(super) grads: Grads,
    pub(super) summary: RankSummary,
    pub(super) clock: RankClock,
}

/// What a rank's stages measured besides gradients: small enough for ranks in other processes
/// to exchange whole.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct RankSummary {
    /// Loss parts of the micro-batches whose stages ran here, by micro-batch.
    pub(super) losses: BTreeMap<usize, BTreeMap<String, f64>>,
    /// Tokens routed to each expert, per balancing bias.
    pub(super) loads: BTreeMap<String, Vec<f64>>,
}

/// One rank's state during a step, whether the rank is a thread (with a [`super::ThreadComm`])
/// or a process (with a [`super::TcpComm`]).
pub(super) struct RankWorker<'a, C: Comm> {
    pipeline: &'a Pipeline,
    /// Locked only while a grouped expert GEMM exchanges rows (the worker owns it otherwise).
    comm: Mutex<C>,
    /// The ranks sharing this one's experts (itself included), in member order; empty without
    /// expert parallelism.
    expert_group: Vec<usize>,
    /// Expert exchanges so far: numbers each one so that its messages meet their partners.
    exchanges: AtomicU64,
    /// The rank within its replica (the schedule's rank) and the replica.
    local: usize,
    replica: usize,
    weights: &'a Weights,
    /// The weights' version, when the caller numbers them (`Feeds::parameters_version`).
    weights_version: Option<u64>,
    /// The replica's micro-batches.
    micro_batches: &'a [HostTensor],
    /// Transfers produced here or received, until they are consumed or sent on.
    mailbox: HashMap<Message, HostTensor>,
    /// Per chunk in flight: its inputs and what its earlier pieces handed on.
    held: HashMap<Chunk, BTreeMap<String, HostTensor>>,
    /// The weight gradients summed over the micro-batches so far, by output name
    /// (`grad.<parameter>`); a GPU's sums join them at the end of the step.
    grads: Grads,
    summary: RankSummary,
    clock: RankClock,
}

impl<'a, C: Comm> RankWorker<'a, C> {
    pub(super) fn new(
        pipeline: &'a Pipeline,
        comm: C,
        weights: &'a Weights,
        micro_batches: &'a [HostTensor],
        start: Instant,
    ) -> Self {
        let per_replica = pipeline.schedule.ranks.len();
        let (replica, local) = (comm.rank() / per_replica, comm.rank() % per_replica);
        let ep = pipeline.expert_parallel;
        let expert_group = match ep {
            1 => Vec::new(),
            _ => {
                let first = replica - replica % ep;
                (first..first + ep)
                    .map(|r| r * per_replica + local)
                    .collect()
            }
        };
        let count = pipeline.schedule.micro_batches;
        RankWorker {
            pipeline,
            comm: Mutex::new(comm),
            expert_group,
            exchanges: AtomicU64::new(0),
            local,
            replica,
            weights,
            weights_version: None,
            micro_batches: &micro_batches[replica * count..(replica + 1) * count],
            mailbox: HashMap::new(),
            held: HashMap::new(),
            grads: Grads::new(),
            summary: RankSummary::default(),
            clock: RankClock::new(start),
        }
    }

    /// The worker feeding its stages weights of version `version` (`None`: unnumbered).
    pub(super) fn with_weights_version(self, version: Option<u64>) -> Self {
        RankWorker {
            weights_version: version,
            ..self
        }
    }

    pub(super) fn run(
        &mut self,
        cancel: &AtomicBool,
        holders: &BTreeMap<String, Vec<usize>>,
    ) -> Result<RankResult, PipelineError> {
        let rank = self.comm().rank();
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
                        // Until the step is abandoned (threads), or at most a receive timeout
                        // (a process, which no other rank can cancel).
                        let stalled = Instant::now();
                        while !cancel.load(Ordering::SeqCst)
                            && stalled.elapsed() < self.pipeline.timeout
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        // A hung rank would not leave when the step is abandoned: stay silent
                        // for one more receive timeout, so that every rank waiting on this one
                        // reports it (rather than seeing it leave), then let the thread end.
                        std::thread::sleep(self.pipeline.timeout);
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
            rank,
            grads,
            summary: std::mem::take(&mut self.summary),
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
                Ok(self.comm().send(peer, Tag::Pipeline(msg), tensor)?)
            }
            ScheduleOp::Recv { peer, msg } => {
                let peer = self.global(peer);
                let tensor = self.comm().recv(peer, &Tag::Pipeline(msg))?;
                self.mailbox.insert(msg, tensor);
                Ok(())
            }
        }
    }

    fn comm(&mut self) -> &mut C {
        self.comm.get_mut().unwrap_or_else(PoisonError::into_inner)
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
                let load = floats(&tensor).iter().map(|&l| f64::from(l));
                add_expert_load(&mut self.summary.loads, bias, load);
            } else if name.starts_with("loss") {
                let value = floats(&tensor).first().copied().unwrap_or(f32::NAN);
                *self
                    .summary
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
        let scale = 1.0 / self.pipeline.micro_batches_per_step() as f32;
        let owner = self.comm().rank();
        let summed = &self.pipeline.stages[c.stage].weight_grads;
        // Summed under their outputs' names (`grad.<parameter>`), on a GPU in device memory
        // until the step's end (`reduce`).
        let mut grads = std::mem::take(&mut self.grads);
        let run = self.with_piece(c.stage, Phase::WeightGrad, &inputs, |executable, feeds| {
            executable.run_summing(feeds, summed, scale, owner, &mut grads)
        });
        self.grads = grads;
        run.map(drop)
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
        self.with_piece(stage, phase, inputs, Executable::run)
    }

    /// `run` on the piece `phase` of `stage` with its feeds (`inputs`, the weights, the expert
    /// exchange), or no outputs for a piece without any.
    fn with_piece(
        &self,
        stage: usize,
        phase: Phase,
        inputs: &BTreeMap<String, HostTensor>,
        run: impl FnOnce(&Executable, &Feeds<'_>) -> Result<BTreeMap<String, HostTensor>, ExecError>,
    ) -> Result<BTreeMap<String, HostTensor>, RankFailure> {
        let Some(executable) = &self.pipeline.stages[stage].pieces[phase as usize] else {
            return Ok(BTreeMap::new());
        };
        let mut feeds = Feeds::new(inputs, self.weights);
        if let Some(version) = self.weights_version {
            feeds = feeds.with_parameters_version(version);
        }
        if self.expert_group.len() < 2 {
            return Ok(run(executable, &feeds)?);
        }
        let exchange = CommExchange {
            comm: &self.comm,
            group: &self.expert_group,
            member: self.replica % self.expert_group.len(),
            counter: &self.exchanges,
        };
        Ok(run(executable, &feeds.with_experts(&exchange))?)
    }

    /// Sums each parameter's gradient over the ranks holding it; every holder keeps the sum.
    fn reduce(&mut self, holders: &BTreeMap<String, Vec<usize>>) -> Result<Grads, RankFailure> {
        let rank = self.comm().rank();
        // The sums a GPU kept in device memory: one download per gradient and step.
        for stage in stages_run(&self.pipeline.schedule.ranks[self.local]) {
            let piece = &self.pipeline.stages[stage].pieces[Phase::WeightGrad as usize];
            if let Some(executable) = piece {
                executable.finish_sums(rank, &mut self.grads)?;
            }
        }
        let mut kept = Grads::new();
        for (name, group) in holders {
            if !group.contains(&rank) {
                continue;
            }
            let summed = self.grads.remove(&format!("grad.{name}"));
            let mut values = summed.ok_or_else(|| {
                RankFailure::Schedule(format!(
                    "no gradient of `{name}` on rank {rank}, which holds it"
                ))
            })?;
            self.comm().all_reduce_sum(group, name, &mut values)?;
            kept.insert(name.clone(), values);
        }
        Ok(kept)
    }
}

/// A tensor's f32 values; none for an integer or bool tensor.
pub(super) fn floats(tensor: &HostTensor) -> &[f32] {
    tensor.as_f32().unwrap_or_default()
}
