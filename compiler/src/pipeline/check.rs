//! Static checks of a schedule, before it is replayed: every op on the rank that holds its
//! stage, transfers between the right ranks, and one F, B and W for every micro-batch and stage.

use std::collections::BTreeMap;

use super::schedule::{Chunk, Payload, Schedule, ScheduleOp};
use super::simulate::SimError;

/// How many passes of each kind a chunk gets.
#[derive(Debug, Default, Clone, Copy)]
struct Passes {
    forward: usize,
    full_backward: usize,
    input_backward: usize,
    weight_backward: usize,
}

pub(super) fn check_static(schedule: &Schedule) -> Result<(), SimError> {
    let expected_ranks = schedule.method.devices(schedule.pp);
    if schedule.ranks.len() != expected_ranks {
        return Err(SimError::RankCount {
            method: schedule.method,
            pp: schedule.pp,
            expected: expected_ranks,
            found: schedule.ranks.len(),
        });
    }
    let mut passes: BTreeMap<Chunk, Passes> = BTreeMap::new();
    for (rank, ops) in schedule.ranks.iter().enumerate() {
        for (index, op) in ops.iter().enumerate() {
            let misplaced = |reason: String| SimError::Misplaced {
                rank,
                index,
                op: *op,
                reason,
            };
            let in_range = |c: Chunk| {
                if c.mb >= schedule.micro_batches || c.stage >= schedule.pp {
                    Err(misplaced(format!(
                        "there are {} micro-batches and {} stages",
                        schedule.micro_batches, schedule.pp
                    )))
                } else {
                    Ok(())
                }
            };
            let here = |c: Chunk| {
                in_range(c)?;
                let holder = schedule.rank_of(c);
                if holder == rank {
                    Ok(())
                } else {
                    Err(misplaced(format!(
                        "stage {} of micro-batch {} runs on rank {holder}",
                        c.stage, c.mb
                    )))
                }
            };
            let mut count = |c: Chunk, add: fn(&mut Passes)| add(passes.entry(c).or_default());
            match *op {
                ScheduleOp::F(c) => {
                    here(c)?;
                    count(c, |p| p.forward += 1);
                }
                ScheduleOp::B(c) => {
                    here(c)?;
                    count(c, |p| p.full_backward += 1);
                }
                ScheduleOp::BInput(c) => {
                    here(c)?;
                    count(c, |p| p.input_backward += 1);
                }
                ScheduleOp::W(c) => {
                    here(c)?;
                    count(c, |p| p.weight_backward += 1);
                }
                ScheduleOp::FB { f, b } => {
                    here(f)?;
                    here(b)?;
                    count(f, |p| p.forward += 1);
                    count(b, |p| p.full_backward += 1);
                }
                ScheduleOp::Send { peer, msg } | ScheduleOp::Recv { peer, msg } => {
                    let sending = matches!(op, ScheduleOp::Send { .. });
                    in_range(msg.chunk)?;
                    let Some(consumer) = consumer(schedule, msg.payload, msg.chunk) else {
                        return Err(misplaced(format!(
                            "stage {} has no neighbour to pass its {} to",
                            msg.chunk.stage,
                            payload_name(msg.payload)
                        )));
                    };
                    let (from, to) = (schedule.rank_of(msg.chunk), schedule.rank_of(consumer));
                    let (me, other) = if sending { (from, to) } else { (to, from) };
                    if me != rank || other != peer || from == to {
                        return Err(misplaced(format!(
                            "that {} goes from rank {from} to rank {to}",
                            payload_name(msg.payload)
                        )));
                    }
                }
            }
        }
    }
    for mb in 0..schedule.micro_batches {
        for stage in 0..schedule.pp {
            let chunk = Chunk::new(mb, stage);
            let p = passes.get(&chunk).copied().unwrap_or_default();
            let whole = p.full_backward == 1 && p.input_backward == 0 && p.weight_backward == 0;
            let split = p.full_backward == 0 && p.input_backward == 1 && p.weight_backward == 1;
            if p.forward != 1 || !(whole || split) {
                return Err(SimError::Coverage {
                    chunk,
                    detail: format!(
                        "{} forward, {} full backward, {} input-gradient backward and {} \
                         weight-gradient passes, where exactly one forward and either one full \
                         backward or one input-gradient and one weight-gradient pass are needed",
                        p.forward, p.full_backward, p.input_backward, p.weight_backward
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The chunk that uses what `producer` makes: the next stage's forward takes an activation,
/// the previous stage's backward a gradient.
pub(super) fn consumer(schedule: &Schedule, payload: Payload, producer: Chunk) -> Option<Chunk> {
    let stage = match payload {
        Payload::Activation => producer.stage + 1,
        Payload::Gradient => producer.stage.checked_sub(1)?,
    };
    (stage < schedule.pp).then(|| Chunk::new(producer.mb, stage))
}

pub(super) fn payload_name(payload: Payload) -> &'static str {
    match payload {
        Payload::Activation => "activation",
        Payload::Gradient => "gradient",
    }
}
