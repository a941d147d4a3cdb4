//! Schedule generators: the settings each method needs, 1F1B and ZB1P, and the transfers
//! between ranks that every method shares.

use super::ScheduleError;
use super::dualpipe;
use super::schedule::{Chunk, Message, Method, Payload, Schedule, ScheduleOp, rank_of};

/// Builds the schedule of one training step of `micro_batches` micro-batches through `pp`
/// pipeline stages (Table 2's PP; DualPipeV runs them on `pp / 2` ranks).
pub fn generate(
    method: Method,
    pp: usize,
    micro_batches: usize,
) -> Result<Schedule, ScheduleError> {
    check_settings(method, pp, micro_batches)?;
    let compute = match method {
        Method::OneFOneB => (0..pp).map(|r| one_f_one_b(r, pp, micro_batches)).collect(),
        Method::Zb1p => (0..pp).map(|r| zb_h1(r, pp, micro_batches)).collect(),
        Method::DualPipe => dualpipe::dualpipe(pp, micro_batches),
        Method::DualPipeV => dualpipe::dualpipe_v(pp, micro_batches),
    };
    let ranks = with_transfers(method, pp, micro_batches, compute);
    Ok(Schedule {
        method,
        pp,
        micro_batches,
        ranks,
    })
}

fn check_settings(method: Method, pp: usize, micro_batches: usize) -> Result<(), ScheduleError> {
    let invalid = |setting, value, expected: &str| ScheduleError::Invalid {
        method,
        setting,
        value,
        expected: expected.to_owned(),
    };
    if pp < 2 {
        return Err(invalid("pp", pp, "at least 2 pipeline stages"));
    }
    match method {
        Method::OneFOneB | Method::Zb1p => {
            // Fewer micro-batches than stages never fill the pipeline; Table 2 assumes it full.
            if micro_batches < pp {
                return Err(invalid(
                    "micro-batches",
                    micro_batches,
                    &format!("at least PP = {pp} micro-batches"),
                ));
            }
        }
        Method::DualPipe => {
            // Rank r pairs stage r with stage PP-1-r, and half the micro-batches enter at each end.
            if !pp.is_multiple_of(2) {
                return Err(invalid("pp", pp, "an even number of stages"));
            }
            if !micro_batches.is_multiple_of(2) {
                return Err(invalid(
                    "micro-batches",
                    micro_batches,
                    "an even number of micro-batches (half enter from each end)",
                ));
            }
            if micro_batches < 2 * pp {
                return Err(invalid(
                    "micro-batches",
                    micro_batches,
                    &format!("at least 2·PP = {} micro-batches", 2 * pp),
                ));
            }
        }
        Method::DualPipeV => {
            // dualpipev.py asserts num_chunks >= 2 * num_ranks, its ranks being PP/2 devices;
            // unlike DualPipe it does not need an even count.
            if !pp.is_multiple_of(2) {
                return Err(invalid(
                    "pp",
                    pp,
                    "an even number of stages (two per device, folded into a V)",
                ));
            }
            if micro_batches < pp {
                return Err(invalid(
                    "micro-batches",
                    micro_batches,
                    &format!("at least 2·devices = PP = {pp} micro-batches"),
                ));
            }
        }
    }
    Ok(())
}

/// 1F1B on rank `r`: PP-1-r warm-up forwards, then alternate one forward and one (full)
/// backward, then drain the remaining backwards.
fn one_f_one_b(r: usize, pp: usize, micro_batches: usize) -> Vec<ScheduleOp> {
    let warmup = pp - 1 - r;
    let mut ops: Vec<ScheduleOp> = (0..warmup)
        .map(|mb| ScheduleOp::F(Chunk::new(mb, r)))
        .collect();
    for mb in 0..micro_batches {
        if mb + warmup < micro_batches {
            ops.push(ScheduleOp::F(Chunk::new(mb + warmup, r)));
        }
        ops.push(ScheduleOp::B(Chunk::new(mb, r)));
    }
    ops
}

/// ZB-H1 on rank `r` (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"; derived here from its
/// bubble and memory, not copied from its figure): the warm-up and forward order of 1F1B, every
/// backward split into B and W, and rank r holding back its W passes by r micro-batches. The
/// held-back W passes fill the cool-down, where 1F1B waits for gradients; holding back r of them
/// while warming up r fewer forwards keeps the in-flight micro-batches at PP, as in 1F1B.
fn zb_h1(r: usize, pp: usize, micro_batches: usize) -> Vec<ScheduleOp> {
    let warmup = pp - 1 - r;
    let chunk = |mb| Chunk::new(mb, r);
    let mut ops: Vec<ScheduleOp> = (0..warmup).map(|mb| ScheduleOp::F(chunk(mb))).collect();
    let mut next_w = 0;
    for mb in 0..micro_batches {
        if mb + warmup < micro_batches {
            ops.push(ScheduleOp::F(chunk(mb + warmup)));
        }
        ops.push(ScheduleOp::BInput(chunk(mb)));
        if mb >= r {
            ops.push(ScheduleOp::W(chunk(next_w)));
            next_w += 1;
        }
    }
    ops.extend((next_w..micro_batches).map(|mb| ScheduleOp::W(chunk(mb))));
    ops
}

/// Adds the transfers to each rank's compute ops: a receive just before the op that needs the
/// data (so the rank waits only when it must) and a send just after the op that made it (sends
/// are asynchronous, so sending at once never delays the sender). Neighbouring stages on the
/// same rank (DualPipeV's turn at the bottom of the V) pass data without a transfer.
fn with_transfers(
    method: Method,
    pp: usize,
    micro_batches: usize,
    compute: Vec<Vec<ScheduleOp>>,
) -> Vec<Vec<ScheduleOp>> {
    let place = |chunk| rank_of(method, pp, micro_batches, chunk);
    compute
        .into_iter()
        .map(|ops| {
            let mut out = Vec::with_capacity(ops.len() * 3);
            for op in ops {
                let (forwards, backwards): (Vec<Chunk>, Vec<Chunk>) = match op {
                    ScheduleOp::F(c) => (vec![c], vec![]),
                    ScheduleOp::B(c) | ScheduleOp::BInput(c) => (vec![], vec![c]),
                    ScheduleOp::FB { f, b } => (vec![f], vec![b]),
                    _ => (vec![], vec![]),
                };
                let transfer = |payload, from: Chunk, to: Chunk, send: bool| {
                    let (producer, consumer) = (place(from), place(to));
                    if producer == consumer {
                        return None;
                    }
                    let msg = Message {
                        payload,
                        chunk: from,
                    };
                    Some(if send {
                        ScheduleOp::Send {
                            peer: consumer,
                            msg,
                        }
                    } else {
                        ScheduleOp::Recv {
                            peer: producer,
                            msg,
                        }
                    })
                };
                for &c in &forwards {
                    if c.stage > 0 {
                        let prev = Chunk::new(c.mb, c.stage - 1);
                        out.extend(transfer(Payload::Activation, prev, c, false));
                    }
                }
                for &c in &backwards {
                    if c.stage + 1 < pp {
                        let next = Chunk::new(c.mb, c.stage + 1);
                        out.extend(transfer(Payload::Gradient, next, c, false));
                    }
                }
                out.push(op);
                for &c in &forwards {
                    if c.stage + 1 < pp {
                        let next = Chunk::new(c.mb, c.stage + 1);
                        out.extend(transfer(Payload::Activation, c, next, true));
                    }
                }
                for &c in &backwards {
                    if c.stage > 0 {
                        let prev = Chunk::new(c.mb, c.stage - 1);
                        out.extend(transfer(Payload::Gradient, c, prev, true));
                    }
                }
            }
            out
        })
        .collect()
}
