//! Replays a schedule under given op costs: per-rank timelines, bubbles, activation memory,
//! and the checks that it can run at all (no deadlock, every transfer matched).
//!
//! Execution model. Each rank runs its ops in order, one at a time. A compute op starts when the
//! rank is free and its inputs are there: a forward needs the previous stage's activation, a
//! backward its own forward and the next stage's gradient, a W its input-gradient backward.
//! Data between stages on the same rank is there as soon as it is made; between ranks it comes
//! through a receive. A send is asynchronous and costs the sender nothing; its message arrives
//! `comm` later. A receive blocks the rank until its message has arrived.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::check::{check_static, payload_name};
use super::schedule::{Chunk, Message, Method, Payload, Schedule, ScheduleOp};

/// Op times, in any one unit.
///
/// `b` is the *full* backward of a chunk (input and weight gradients), as in Table 2; `w` is the
/// weight-gradient part of it, so a split backward runs as an input-gradient pass of `b - w`
/// and a W pass of `w`. `f_and_b` is one overlapped forward-and-backward pair; `f + b` means
/// overlapping gains nothing. `comm` is the latency of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    pub f: f64,
    pub b: f64,
    pub w: f64,
    pub f_and_b: f64,
    pub comm: f64,
}

impl Costs {
    /// Costs without overlap gain (`f_and_b = f + b`) and free transfers.
    pub fn new(f: f64, b: f64, w: f64) -> Self {
        Costs {
            f,
            b,
            w,
            f_and_b: f + b,
            comm: 0.0,
        }
    }

    pub fn with_overlap(self, f_and_b: f64) -> Self {
        Costs { f_and_b, ..self }
    }

    pub fn with_comm(self, comm: f64) -> Self {
        Costs { comm, ..self }
    }

    fn check(&self) -> Result<(), SimError> {
        for (field, value) in [
            ("f", self.f),
            ("b", self.b),
            ("w", self.w),
            ("f_and_b", self.f_and_b),
            ("comm", self.comm),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(SimError::InvalidCost {
                    field,
                    value,
                    expected: "a finite time >= 0",
                });
            }
        }
        if self.w > self.b {
            return Err(SimError::InvalidCost {
                field: "w",
                value: self.w,
                expected: "at most b (W is the weight-gradient part of the full backward b)",
            });
        }
        Ok(())
    }

    /// How long `op` occupies its rank; transfers take no rank time.
    pub fn duration(&self, op: &ScheduleOp) -> f64 {
        match op {
            ScheduleOp::F(_) => self.f,
            ScheduleOp::B(_) => self.b,
            ScheduleOp::BInput(_) => self.b - self.w,
            ScheduleOp::W(_) => self.w,
            ScheduleOp::FB { .. } => self.f_and_b,
            ScheduleOp::Send { .. } | ScheduleOp::Recv { .. } => 0.0,
        }
    }
}

impl Default for Costs {
    /// F = 1, B = 2, W = 1: the backward costs twice the forward, half of it weight gradients.
    fn default() -> Self {
        Costs::new(1.0, 2.0, 1.0)
    }
}

/// One op of a rank's program at its simulated time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimedOp {
    /// Position in the rank's program.
    pub index: usize,
    pub op: ScheduleOp,
    pub start: f64,
    pub end: f64,
}

/// What one rank did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankReport {
    /// Time spent computing.
    pub busy: f64,
    /// Idle time within the step: `makespan - busy` (see [`SimReport`]).
    pub bubble: f64,
    /// Most micro-batch stage activations held at once: from the start of a chunk's forward to
    /// the end of its full backward or W pass. Both halves of an overlapped pair hold theirs for
    /// the pair's whole length, which is DualPipe's PP+1.
    pub peak_activations: usize,
    /// Distinct stages whose parameters the rank holds.
    pub parameter_copies: usize,
    pub ops: Vec<TimedOp>,
}

/// The simulated step.
///
/// The step runs from time 0, when every rank may start, to `makespan`, when the last rank
/// finishes; a rank's bubble is the part of that span it does not compute (idle time between a
/// rank's own first and last op would not do: 1F1B's last rank has none). Table 2's bubble is
/// [`SimReport::bubble`], that of the worst rank. The ranks of 1F1B, ZB1P, and DualPipe without
/// overlap gain all compute the same amount, so there every rank's bubble is the same; with
/// overlap gain DualPipe's middle ranks run the most overlapped pairs, compute the least and
/// idle the most.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub method: Method,
    pub pp: usize,
    pub micro_batches: usize,
    pub costs: Costs,
    pub makespan: f64,
    pub ranks: Vec<RankReport>,
}

impl SimReport {
    /// The largest bubble of any rank.
    pub fn bubble(&self) -> f64 {
        self.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max)
    }

    /// The largest activation peak of any rank.
    pub fn peak_activations(&self) -> usize {
        self.ranks
            .iter()
            .map(|r| r.peak_activations)
            .max()
            .unwrap_or(0)
    }

    /// The most stage parameter copies any rank holds.
    pub fn parameter_copies(&self) -> usize {
        self.ranks
            .iter()
            .map(|r| r.parameter_copies)
            .max()
            .unwrap_or(0)
    }
}

/// One rank of a deadlocked schedule: the op it cannot start, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Stuck {
    pub rank: usize,
    pub index: usize,
    pub op: ScheduleOp,
    pub waiting_for: String,
}

impl fmt::Display for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} at op {} ({}) waits for {}",
            self.rank, self.index, self.op, self.waiting_for
        )
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum SimError {
    #[error("cost `{field}` = {value}: expected {expected}")]
    InvalidCost {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("{method} with PP={pp} runs on {expected} ranks, but the schedule has {found}")]
    RankCount {
        method: Method,
        pp: usize,
        expected: usize,
        found: usize,
    },
    #[error("rank {rank} op {index} ({op}) is misplaced: {reason}")]
    Misplaced {
        rank: usize,
        index: usize,
        op: ScheduleOp,
        reason: String,
    },
    #[error("micro-batch {} on stage {} gets {detail}", chunk.mb, chunk.stage)]
    Coverage { chunk: Chunk, detail: String },
    #[error("deadlock: {}", list(stuck))]
    Deadlock { stuck: Vec<Stuck> },
    #[error("rank {rank} op {index} ({op}) repeats an earlier send of the same data")]
    DuplicateSend {
        rank: usize,
        index: usize,
        op: ScheduleOp,
    },
    #[error("rank {rank} op {index} ({op}) is never received")]
    UnmatchedSend {
        rank: usize,
        index: usize,
        op: ScheduleOp,
    },
}

fn list(stuck: &[Stuck]) -> String {
    stuck
        .iter()
        .map(Stuck::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A sent message: when it arrives, and whether a receive has taken it.
struct InFlight {
    arrival: f64,
    received: bool,
    rank: usize,
    index: usize,
    op: ScheduleOp,
}

/// What has happened so far, shared by all ranks.
#[derive(Default)]
struct State {
    /// End of each chunk's forward.
    forward_done: HashMap<Chunk, f64>,
    /// End of each chunk's input-gradient computation (full or split backward).
    gradient_done: HashMap<Chunk, f64>,
    /// Messages received: (receiving rank, message) -> time the receive completed.
    received: HashMap<(usize, Message), f64>,
    /// Messages sent: (from, to, message).
    sent: BTreeMap<(usize, usize, Message), InFlight>,
}

/// Replays `schedule` under `costs`. Fails on a schedule that is misplaced, incomplete,
/// deadlocks, or sends what nobody receives.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<SimReport, SimError> {
    costs.check()?;
    check_static(schedule)?;
    let ranks = schedule.ranks.len();
    let mut state = State::default();
    let mut clock = vec![0.0_f64; ranks];
    let mut timed: Vec<Vec<TimedOp>> = vec![Vec::new(); ranks];
    loop {
        let mut progressed = false;
        for rank in 0..ranks {
            while let Some(op) = schedule.ranks[rank].get(timed[rank].len()) {
                let Ok(ready) = inputs_ready(schedule, &state, rank, op) else {
                    break;
                };
                let index = timed[rank].len();
                let start = clock[rank].max(ready);
                let end = start + costs.duration(op);
                record(&mut state, costs, rank, index, op, end)?;
                clock[rank] = end;
                timed[rank].push(TimedOp {
                    index,
                    op: *op,
                    start,
                    end,
                });
                progressed = true;
            }
        }
        let unfinished: Vec<usize> = (0..ranks)
            .filter(|&r| timed[r].len() < schedule.ranks[r].len())
            .collect();
        if unfinished.is_empty() {
            break;
        }
        if !progressed {
            let stuck = unfinished
                .into_iter()
                .map(|rank| {
                    let index = timed[rank].len();
                    let op = schedule.ranks[rank][index];
                    let waiting_for = inputs_ready(schedule, &state, rank, &op)
                        .err()
                        .map(|wait| wait.describe(rank))
                        .unwrap_or_default();
                    Stuck {
                        rank,
                        index,
                        op,
                        waiting_for,
                    }
                })
                .collect();
            return Err(SimError::Deadlock { stuck });
        }
    }
    if let Some(unmatched) = state.sent.values().find(|m| !m.received) {
        return Err(SimError::UnmatchedSend {
            rank: unmatched.rank,
            index: unmatched.index,
            op: unmatched.op,
        });
    }
    let makespan = clock.iter().copied().fold(0.0, f64::max);
    let ranks = timed
        .into_iter()
        .map(|ops| rank_report(ops, makespan))
        .collect();
    Ok(SimReport {
        method: schedule.method,
        pp: schedule.pp,
        micro_batches: schedule.micro_batches,
        costs: *costs,
        makespan,
        ranks,
    })
}

/// What a blocked op waits for; turned into words only for a deadlock report, since the
/// replay asks about blocked ops far more often than it reports them.
enum Wait {
    /// Data a stage on this rank has not made yet.
    Local {
        payload: Payload,
        producer: Chunk,
    },
    /// Data from another rank that no earlier receive has brought.
    Received {
        payload: Payload,
        producer: Chunk,
    },
    OwnForward(Chunk),
    InputGradient(Chunk),
    /// A send's data, not yet computed.
    Sent(Payload),
    /// A receive whose sender has not sent (again).
    Sender {
        peer: usize,
        again: bool,
    },
}

impl Wait {
    fn describe(&self, rank: usize) -> String {
        let data = |payload: Payload, c: &Chunk| {
            format!(
                "the {} of micro-batch {} from stage {}",
                payload_name(payload),
                c.mb,
                c.stage
            )
        };
        match self {
            Wait::Local { payload, producer } => {
                format!(
                    "{}, not yet computed on this rank",
                    data(*payload, producer)
                )
            }
            Wait::Received { payload, producer } => format!(
                "{}, which no earlier receive on rank {rank} brings",
                data(*payload, producer)
            ),
            Wait::OwnForward(c) => {
                format!(
                    "its own forward of micro-batch {} on stage {}",
                    c.mb, c.stage
                )
            }
            Wait::InputGradient(c) => format!(
                "the input-gradient backward of micro-batch {} on stage {}",
                c.mb, c.stage
            ),
            Wait::Sent(payload) => {
                format!("the {} it sends, not yet computed", payload_name(*payload))
            }
            Wait::Sender { peer, again: true } => {
                format!("a second send from rank {peer}, which never comes")
            }
            Wait::Sender { peer, again: false } => {
                format!("rank {peer} to send it, which it has not")
            }
        }
    }
}

/// When everything `op` needs is there, or what it still waits for.
fn inputs_ready(
    schedule: &Schedule,
    state: &State,
    rank: usize,
    op: &ScheduleOp,
) -> Result<f64, Wait> {
    let made = |payload: Payload| match payload {
        Payload::Activation => &state.forward_done,
        Payload::Gradient => &state.gradient_done,
    };
    // The data `chunk` needs from its neighbour stage, made here or received.
    let neighbour = |payload: Payload, chunk: Chunk| -> Result<f64, Wait> {
        let stage = match payload {
            Payload::Activation => chunk.stage.checked_sub(1),
            Payload::Gradient => Some(chunk.stage + 1).filter(|&s| s < schedule.pp),
        };
        let Some(stage) = stage else {
            return Ok(0.0); // the first stage's input, or the last stage's loss, is local
        };
        let producer = Chunk::new(chunk.mb, stage);
        if schedule.rank_of(producer) == rank {
            made(payload)
                .get(&producer)
                .copied()
                .ok_or(Wait::Local { payload, producer })
        } else {
            let msg = Message {
                payload,
                chunk: producer,
            };
            state
                .received
                .get(&(rank, msg))
                .copied()
                .ok_or(Wait::Received { payload, producer })
        }
    };
    let own_forward = |c: Chunk| {
        state
            .forward_done
            .get(&c)
            .copied()
            .ok_or(Wait::OwnForward(c))
    };
    let backward = |c: Chunk| Ok(own_forward(c)?.max(neighbour(Payload::Gradient, c)?));
    match *op {
        ScheduleOp::F(c) => neighbour(Payload::Activation, c),
        ScheduleOp::B(c) | ScheduleOp::BInput(c) => backward(c),
        ScheduleOp::W(c) => state
            .gradient_done
            .get(&c)
            .copied()
            .ok_or(Wait::InputGradient(c)),
        ScheduleOp::FB { f, b } => Ok(neighbour(Payload::Activation, f)?.max(backward(b)?)),
        ScheduleOp::Send { msg, .. } => made(msg.payload)
            .get(&msg.chunk)
            .copied()
            .ok_or(Wait::Sent(msg.payload)),
        ScheduleOp::Recv { peer, msg } => match state.sent.get(&(peer, rank, msg)) {
            Some(m) if !m.received => Ok(m.arrival),
            Some(_) => Err(Wait::Sender { peer, again: true }),
            None => Err(Wait::Sender { peer, again: false }),
        },
    }
}

/// Notes what `op`, ending at `end`, has made or taken.
fn record(
    state: &mut State,
    costs: &Costs,
    rank: usize,
    index: usize,
    op: &ScheduleOp,
    end: f64,
) -> Result<(), SimError> {
    match *op {
        ScheduleOp::F(c) => {
            state.forward_done.insert(c, end);
        }
        ScheduleOp::B(c) | ScheduleOp::BInput(c) => {
            state.gradient_done.insert(c, end);
        }
        ScheduleOp::W(_) => {}
        ScheduleOp::FB { f, b } => {
            state.forward_done.insert(f, end);
            state.gradient_done.insert(b, end);
        }
        ScheduleOp::Send { peer, msg } => {
            let key = (rank, peer, msg);
            if state.sent.contains_key(&key) {
                return Err(SimError::DuplicateSend {
                    rank,
                    index,
                    op: *op,
                });
            }
            let flight = InFlight {
                arrival: end + costs.comm,
                received: false,
                rank,
                index,
                op: *op,
            };
            state.sent.insert(key, flight);
        }
        ScheduleOp::Recv { peer, msg } => {
            if let Some(m) = state.sent.get_mut(&(peer, rank, msg)) {
                m.received = true;
            }
            state.received.insert((rank, msg), end);
        }
    }
    Ok(())
}

fn rank_report(ops: Vec<TimedOp>, makespan: f64) -> RankReport {
    let busy: f64 = ops
        .iter()
        .filter(|t| t.op.is_compute())
        .map(|t| t.end - t.start)
        .sum();
    // Ops of one rank run one after another, so program order is time order.
    let (mut held, mut peak) = (0_usize, 0_usize);
    let mut stages = Vec::new();
    for t in &ops {
        let (takes, frees, chunks): (usize, usize, Vec<Chunk>) = match t.op {
            ScheduleOp::F(c) => (1, 0, vec![c]),
            ScheduleOp::B(c) | ScheduleOp::W(c) => (0, 1, vec![c]),
            ScheduleOp::BInput(c) => (0, 0, vec![c]),
            ScheduleOp::FB { f, b } => (1, 1, vec![f, b]),
            ScheduleOp::Send { .. } | ScheduleOp::Recv { .. } => (0, 0, vec![]),
        };
        held += takes;
        peak = peak.max(held);
        held = held.saturating_sub(frees);
        stages.extend(chunks.iter().map(|c| c.stage));
    }
    stages.sort_unstable();
    stages.dedup();
    RankReport {
        busy,
        bubble: makespan - busy,
        peak_activations: peak,
        parameter_copies: stages.len(),
        ops,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::generate;

    #[test]
    fn two_stages_of_1f1b_take_the_textbook_time() {
        let schedule = generate(Method::OneFOneB, 2, 2).unwrap();
        let report = simulate(&schedule, &Costs::default()).unwrap();
        // (PP-1)(F+B) + m(F+B) = 3 + 6.
        assert_eq!(report.makespan, 9.0);
        // The critical path (rank 0's F0, rank 1's F0 B0 F1 B1, rank 0's B1) crosses two
        // transfers: F0's activation down and B1's gradient back up.
        let report = simulate(&schedule, &Costs::default().with_comm(0.5)).unwrap();
        assert_eq!(report.makespan, 10.0);
    }
}
