//! The messages of ZeRO-1 between ranks that are processes: after each rank updated the
//! elements whose optimizer state it keeps ([`crate::optim::ShardedAdamW`]), the new weights
//! go to every other holder of the parameter (an all-gather within its holders), and for a
//! checkpoint rank 0 gathers every rank's weights and moments.

use std::ops::Range;

use crate::optim::{AdamW, MomentPart, ParamStore, ShardPlan, ShardedAdamW};
use crate::tensor::{Data, HostTensor};
use crate::weights::Weights;

use super::comm::{Comm, CommError, Tag};
use super::error::PipelineError;
use super::process::collective;

/// Sends the weights of the elements this rank updated to the other holders of each of its
/// parameters, and writes theirs in: afterwards every holder has the whole updated parameter.
pub fn share_updates<C: Comm>(
    comm: &mut C,
    plan: &ShardPlan,
    weights: &mut Weights,
) -> Result<(), PipelineError> {
    let me = comm.rank();
    let fail = collective(me, "sharing the updated weights (ZeRO-1)");
    for (name, pieces) in plan.pieces() {
        let group = plan.holders(name);
        if group.len() < 2 || !group.contains(&me) {
            continue;
        }
        let range_of = |rank: usize| {
            pieces
                .iter()
                .find(|p| p.owner == rank)
                .map(|p| p.range.clone())
        };
        let mine = match (range_of(me), weights.get(name).and_then(HostTensor::as_f32)) {
            (Some(range), Some(values)) => values[range].to_vec(),
            _ => Vec::new(),
        };
        let parts = group
            .iter()
            .map(|_| HostTensor::f32([mine.len()], mine.clone()))
            .collect();
        let received = comm
            .all_to_all_in(group, &format!("zero.{name}"), parts)
            .map_err(&fail)?;
        for (&member, tensor) in group.iter().zip(received) {
            if member == me {
                continue;
            }
            let range = range_of(member).unwrap_or(0..0);
            write_range(weights, name, range, &tensor)
                .map_err(|what| fail(CommError::Mismatch { rank: me, what }))?;
        }
    }
    Ok(())
}

/// Gathers on rank 0 the weights and optimizer state every rank keeps: rank 0 gets the whole
/// weights and the whole optimizer (for a checkpoint), the other ranks `None` after sending
/// their shares.
pub fn gather_state<C: Comm>(
    comm: &mut C,
    weights: &Weights,
    optimizer: &ShardedAdamW,
) -> Result<Option<(Weights, AdamW)>, PipelineError> {
    let me = comm.rank();
    let fail = collective(me, "gathering the checkpoint on rank 0");
    let plan = optimizer.plan();
    let tag = |name: &str, round| Tag::Collective {
        key: format!("checkpoint.{name}"),
        round,
    };
    if me != 0 {
        let parts = optimizer
            .shards()
            .get(&me)
            .map(AdamW::parts)
            .unwrap_or_default();
        for part in parts {
            let values = weights
                .get(&part.param)
                .and_then(HostTensor::as_f32)
                .map(|v| v[part.range.clone()].to_vec())
                .unwrap_or_default();
            let tensors = [values, part.m, part.v];
            for (round, values) in (0..).zip(tensors) {
                let tensor = HostTensor::f32([values.len()], values);
                comm.send(0, tag(&part.param, round), tensor)
                    .map_err(&fail)?;
            }
        }
        return Ok(None);
    }
    let mut gathered = weights.clone();
    let mut remote = Vec::new();
    for (name, pieces) in plan.pieces() {
        for piece in pieces.iter().filter(|p| p.owner != 0) {
            let mut take = |round| -> Result<HostTensor, PipelineError> {
                comm.recv(piece.owner, &tag(name, round)).map_err(&fail)
            };
            let (values, m, v) = (take(0)?, take(1)?, take(2)?);
            write_range(&mut gathered, name, piece.range.clone(), &values)
                .map_err(|what| fail(CommError::Mismatch { rank: me, what }))?;
            let floats = |t: HostTensor| match t.data {
                Data::Float(values) => values,
                _ => Vec::new(),
            };
            remote.push(MomentPart {
                param: name.to_owned(),
                dims: gathered
                    .get(name)
                    .map(|t| t.dims().to_vec())
                    .unwrap_or_default(),
                range: piece.range.clone(),
                m: floats(m),
                v: floats(v),
            });
        }
    }
    let whole = optimizer.joined(remote).map_err(|e| {
        fail(CommError::Mismatch {
            rank: me,
            what: e.to_string(),
        })
    })?;
    Ok(Some((gathered, whole)))
}

/// Writes `tensor`'s values into the elements `range` of the weight `name`.
fn write_range(
    weights: &mut Weights,
    name: &str,
    range: Range<usize>,
    tensor: &HostTensor,
) -> Result<(), String> {
    let values = tensor.as_f32().unwrap_or_default();
    if values.len() != range.len() {
        return Err(format!(
            "`{name}`: {} values for elements {range:?}",
            values.len()
        ));
    }
    weights
        .update_param(name, |t| match &mut t.data {
            Data::Float(w) if range.end <= w.len() => {
                w[range].copy_from_slice(values);
                Ok(())
            }
            _ => Err(format!("`{name}` has no elements {range:?}")),
        })
        .unwrap_or_else(|| Err(format!("no weight `{name}`")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::optim::{AdamWConfig, Grads};
    use crate::parallel::ThreadComm;

    fn weights() -> Weights {
        let mut w = Weights::default();
        for (name, count) in [("a", 10), ("b", 3), ("c", 1)] {
            let values = (0..count).map(|i| (i as f32 * 0.7).sin()).collect();
            w.insert(name, HostTensor::f32([count], values));
        }
        w
    }

    fn grads(w: &Weights, step: usize) -> Grads {
        w.iter()
            .map(|(n, t)| {
                let len = t.as_f32().unwrap().len();
                let g = (0..len).map(|i| ((i + step) as f32).cos()).collect();
                (n.to_owned(), g)
            })
            .collect()
    }

    /// Three ranks, as processes would: each holds its own weights and shard, updates its
    /// elements and shares them; every holder ends with the whole optimizer's update, and
    /// rank 0 gathers the whole state.
    #[test]
    fn shards_on_separate_ranks_update_share_and_gather_like_one_optimizer() {
        let config = AdamWConfig::default();
        let mut reference = weights();
        let whole = AdamW::new(config, reference.iter()).unwrap();
        let mut whole_after = whole.clone();
        // `a` on all three ranks, `b` on ranks 1 and 2, `c` on rank 0 alone.
        let holders: BTreeMap<String, Vec<usize>> =
            [("a", vec![0, 1, 2]), ("b", vec![1, 2]), ("c", vec![0])]
                .into_iter()
                .map(|(n, h)| (n.to_owned(), h))
                .collect();
        let sizes = reference
            .iter()
            .map(|(n, t)| (n.to_owned(), t.as_f32().unwrap().len()))
            .collect();
        let plan = ShardPlan::new(&sizes, holders.clone(), true);
        for step in 0..2 {
            let g = grads(&reference, step);
            whole_after.step(&mut reference, &g, 1e-2).unwrap();
        }
        let comms = ThreadComm::group(3, Duration::from_secs(10));
        let results: Vec<(Weights, Option<(Weights, AdamW)>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|mut comm| {
                    let (plan, whole) = (plan.clone(), &whole);
                    s.spawn(move || {
                        let rank = comm.rank();
                        let mut w = weights();
                        let mut shard = ShardedAdamW::new(whole, plan.clone(), [rank]).unwrap();
                        for step in 0..2 {
                            // Every holder has the same reduced gradients (as after the
                            // all-reduce); the rank sees only those of what it holds.
                            let mut g = grads(&w, step);
                            g.retain(|n, _| plan.holders(n).contains(&rank));
                            shard.step(&mut w, &g, 1e-2).unwrap();
                            share_updates(&mut comm, &plan, &mut w).unwrap();
                        }
                        let gathered = gather_state(&mut comm, &w, &shard).unwrap();
                        (w, gathered)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (w, _)) in results.iter().enumerate() {
            for (name, group) in &holders {
                if group.contains(&rank) {
                    assert_eq!(w.get(name), reference.get(name), "rank {rank}: `{name}`");
                }
            }
        }
        let (gathered_weights, gathered_state) = results[0].1.clone().unwrap();
        assert!(results[1].1.is_none() && results[2].1.is_none());
        for (name, tensor) in reference.iter() {
            assert_eq!(gathered_weights.get(name), Some(tensor), "`{name}`");
        }
        assert_eq!(gathered_state, whole_after);
    }
}
