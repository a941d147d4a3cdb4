//! Ranks that are processes (one per pipeline rank, started by `torchrun`, `mpirun` or Slurm):
//! each runs its rank's schedule with the same [`RankWorker`] the threads run, then the
//! process-wide parts of a step that the threaded runner does in one place: the loss parts and
//! expert loads go to every rank (small), and the gradient norm is summed from every rank's
//! share of it, in the order one process would sum it, so that a run's numbers do not depend
//! on how its ranks are spread over processes.
//!
//! What goes over the [`Comm`] besides tensors (the summaries, the norm's parts) travels as
//! JSON packed into an i64 tensor, with every f64 as its bits: JSON numbers would not bring
//! back a NaN, and decimal round trips are not guaranteed to be exact.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::optim::{Grads, ShardPlan, norm_of_square_sums, square_sums};
use crate::tensor::{Data, HostTensor};
use crate::weights::Weights;

use super::comm::{Comm, CommError};
use super::error::PipelineError;
use super::pipeline::Pipeline;
use super::rank::{RankSummary, RankWorker};

/// What a rank that is a process computed in a step.
#[derive(Debug)]
pub struct RankStep {
    /// Reduced gradients of the parameters this rank holds; on rank 0 also zeros for the
    /// parameters no stage reads.
    pub grads: Grads,
    /// Every micro-batch's loss outputs, as [`super::PipelineStep::losses`].
    pub losses: Vec<BTreeMap<String, HostTensor>>,
    /// Tokens routed to each expert, per balancing bias, summed over every rank.
    pub loads: BTreeMap<String, Vec<f64>>,
}

impl Pipeline {
    /// Runs rank `comm.rank()`'s part of one step over `micro_batches` (every micro-batch of
    /// the step, as [`Pipeline::run`] takes them): its schedule, the gradient all-reduce among
    /// each parameter's holders, and the exchange of loss parts and loads with every rank. The
    /// other ranks run the same call in their processes.
    pub fn run_rank<C: Comm>(
        &self,
        comm: &mut C,
        weights: &Weights,
        weights_version: Option<u64>,
        micro_batches: &[HostTensor],
    ) -> Result<RankStep, PipelineError> {
        let rank = comm.rank();
        if comm.world() != self.world() {
            return Err(PipelineError::Settings(format!(
                "the pipeline runs on {} ranks, the process group has {} (WORLD_SIZE)",
                self.world(),
                comm.world()
            )));
        }
        self.check_micro_batches(micro_batches.len())?;
        let holders = self.holders();
        // Nobody else can cancel this process's rank: a failed peer shows as a closed
        // connection or a receive timeout instead.
        let cancel = AtomicBool::new(false);
        let mut worker = RankWorker::new(self, &mut *comm, weights, micro_batches, Instant::now())
            .with_weights_version(weights_version);
        let result = worker.run(&cancel, &holders)?;
        drop(worker);
        let mut grads = result.grads;
        if rank == 0 {
            self.zero_unused(&mut grads, &holders, weights);
        }
        let summaries: Vec<RankSummary> =
            all_gather(comm, "step.summary", &Wire::from(&result.summary))
                .map_err(collective(rank, "sharing the loss parts and expert loads"))?
                .into_iter()
                .map(|w: Wire| w.into())
                .collect();
        let (losses, loads) = self.merge(&summaries);
        Ok(RankStep {
            grads,
            losses,
            loads,
        })
    }
}

/// The global gradient norm from every rank's gradients (each parameter counted once, by its
/// first holder), bit-identical to [`crate::optim::global_norm`] over all of them.
pub fn global_norm_over<C: Comm>(
    comm: &mut C,
    plan: &ShardPlan,
    grads: &Grads,
) -> Result<f64, PipelineError> {
    let me = comm.rank();
    let mine: Grads = grads
        .iter()
        .filter(|(name, _)| plan.holders(name).first() == Some(&me))
        .map(|(n, g)| (n.clone(), g.clone()))
        .collect();
    let sums: BTreeMap<String, Vec<u64>> = square_sums(&mine)
        .into_iter()
        .map(|(n, s)| (n, s.into_iter().map(f64::to_bits).collect()))
        .collect();
    let gathered: Vec<BTreeMap<String, Vec<u64>>> = all_gather(comm, "step.norm", &sums)
        .map_err(collective(me, "summing the gradient norm"))?;
    let merged: BTreeMap<String, Vec<f64>> = gathered
        .into_iter()
        .flatten()
        .map(|(n, s)| (n, s.into_iter().map(f64::from_bits).collect()))
        .collect();
    if let Some((name, _)) = plan.pieces().find(|(n, _)| !merged.contains_key(*n)) {
        return Err(PipelineError::Settings(format!(
            "no rank sent the gradient norm part of `{name}`"
        )));
    }
    Ok(norm_of_square_sums(merged.values().flatten()))
}

/// Whether any rank asks to stop (Ctrl-C reaches the processes at different moments): every
/// rank gets the same answer, so they stop after the same step.
pub fn any_rank<C: Comm>(comm: &mut C, asks: bool) -> Result<bool, PipelineError> {
    let me = comm.rank();
    let everyone: Vec<usize> = (0..comm.world()).collect();
    let mut flag = [f32::from(u8::from(asks))];
    comm.all_reduce_sum(&everyone, "step.stop", &mut flag)
        .map_err(collective(me, "agreeing whether to stop"))?;
    Ok(flag[0] > 0.0)
}

pub(super) fn collective(rank: usize, what: &'static str) -> impl Fn(CommError) -> PipelineError {
    move |source| PipelineError::Collective { rank, what, source }
}

/// Sends `value` to every rank and returns every rank's, by rank.
fn all_gather<C: Comm, T: Serialize + DeserializeOwned>(
    comm: &mut C,
    key: &str,
    value: &T,
) -> Result<Vec<T>, CommError> {
    let me = comm.rank();
    let bytes = serde_json::to_vec(value).map_err(|e| CommError::Mismatch {
        rank: me,
        what: format!("cannot encode `{key}`: {e}"),
    })?;
    let packed = pack(&bytes);
    let received = comm.all_to_all(key, vec![packed; comm.world()])?;
    received
        .iter()
        .map(|tensor| {
            let bytes = unpack(tensor).ok_or_else(|| CommError::Mismatch {
                rank: me,
                what: format!("`{key}`: a malformed message"),
            })?;
            serde_json::from_slice(&bytes).map_err(|e| CommError::Mismatch {
                rank: me,
                what: format!("`{key}`: {e}"),
            })
        })
        .collect()
}

/// Bytes as an i64 tensor: the length, then 8 bytes a value.
fn pack(bytes: &[u8]) -> HostTensor {
    let mut words = vec![bytes.len() as i64];
    words.extend(bytes.chunks(8).map(|c| {
        let mut word = [0u8; 8];
        word[..c.len()].copy_from_slice(c);
        i64::from_le_bytes(word)
    }));
    HostTensor::i64([words.len()], words)
}

fn unpack(tensor: &HostTensor) -> Option<Vec<u8>> {
    let Data::Int(words) = &tensor.data else {
        return None;
    };
    let (&len, words) = words.split_first()?;
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.truncate(
        usize::try_from(len)
            .ok()
            .filter(|&l| l <= words.len() * 8)?,
    );
    Some(bytes)
}

/// A [`RankSummary`] with its f64 values as bits.
#[derive(Serialize, Deserialize)]
struct Wire {
    losses: BTreeMap<usize, BTreeMap<String, u64>>,
    loads: BTreeMap<String, Vec<u64>>,
}

impl From<&RankSummary> for Wire {
    fn from(s: &RankSummary) -> Self {
        Wire {
            losses: s
                .losses
                .iter()
                .map(|(&mb, parts)| {
                    (
                        mb,
                        parts
                            .iter()
                            .map(|(n, v)| (n.clone(), v.to_bits()))
                            .collect(),
                    )
                })
                .collect(),
            loads: s
                .loads
                .iter()
                .map(|(n, l)| (n.clone(), l.iter().map(|v| v.to_bits()).collect()))
                .collect(),
        }
    }
}

impl From<Wire> for RankSummary {
    fn from(w: Wire) -> Self {
        RankSummary {
            losses: w
                .losses
                .into_iter()
                .map(|(mb, parts)| {
                    (
                        mb,
                        parts
                            .into_iter()
                            .map(|(n, v)| (n, f64::from_bits(v)))
                            .collect(),
                    )
                })
                .collect(),
            loads: w
                .loads
                .into_iter()
                .map(|(n, l)| (n, l.into_iter().map(f64::from_bits).collect()))
                .collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn packed_bytes_come_back_whatever_their_length() {
        for len in [0, 1, 7, 8, 9, 100] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            assert_eq!(unpack(&pack(&bytes)).unwrap(), bytes);
        }
        assert_eq!(unpack(&HostTensor::i64([1], vec![9])), None);
    }

    #[test]
    fn summaries_keep_every_bit_of_their_values() {
        let summary = RankSummary {
            losses: BTreeMap::from([(3, BTreeMap::from([("loss.mtp".to_owned(), f64::NAN)]))]),
            loads: BTreeMap::from([("bias".to_owned(), vec![0.1 + 0.2, -0.0, 1e-310])]),
        };
        let text = serde_json::to_vec(&Wire::from(&summary)).unwrap();
        let back: RankSummary = serde_json::from_slice::<Wire>(&text).unwrap().into();
        assert!(back.losses[&3]["loss.mtp"].is_nan());
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.loads["bias"]), bits(&summary.loads["bias"]));
    }
}
