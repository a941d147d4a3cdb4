//! What the ranks really did during a step, in the simulator's terms, so that the measured
//! timeline can be drawn like a simulated one and set beside the simulator's prediction.

use std::collections::BTreeSet;
use std::time::Instant;

use fathom_compiler::pipeline::{Costs, RankReport, Schedule, ScheduleOp, SimReport, TimedOp};

/// One rank's ops with their wall-clock times (milliseconds from the step's start).
#[derive(Debug)]
pub(super) struct RankClock {
    start: Instant,
    ops: Vec<TimedOp>,
    peak_held: usize,
}

impl RankClock {
    pub(super) fn new(start: Instant) -> Self {
        RankClock {
            start,
            ops: Vec::new(),
            peak_held: 0,
        }
    }

    /// Milliseconds since the step started.
    pub(super) fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// Records that the rank's op number `index` ran from `start` until now.
    pub(super) fn record(&mut self, index: usize, op: ScheduleOp, start: f64) {
        let end = self.now();
        self.ops.push(TimedOp {
            index,
            op,
            start,
            end,
        });
    }

    /// Notes how many micro-batches' activations the rank holds now.
    pub(super) fn holding(&mut self, chunks: usize) {
        self.peak_held = self.peak_held.max(chunks);
    }

    fn report(self, makespan: f64) -> RankReport {
        let busy = self
            .ops
            .iter()
            .filter(|t| t.op.is_compute())
            .map(|t| t.end - t.start)
            .sum::<f64>();
        let stages: BTreeSet<usize> = self
            .ops
            .iter()
            .filter_map(|t| match t.op {
                ScheduleOp::F(c) | ScheduleOp::FB { f: c, .. } => Some(c.stage),
                _ => None,
            })
            .collect();
        RankReport {
            busy,
            bubble: makespan - busy,
            peak_activations: self.peak_held,
            parameter_copies: stages.len(),
            ops: self.ops,
        }
    }
}

/// The measured step as a [`SimReport`]: times in milliseconds, the costs the mean measured
/// length of each kind of op (what to feed the simulator to predict this step).
pub(super) fn measured(schedule: &Schedule, clocks: Vec<RankClock>) -> SimReport {
    let makespan = clocks
        .iter()
        .flat_map(|c| c.ops.last().map(|t| t.end))
        .fold(0.0, f64::max);
    let mean = |pick: fn(&ScheduleOp) -> bool| {
        let lengths: Vec<f64> = clocks
            .iter()
            .flat_map(|c| &c.ops)
            .filter(|t| pick(&t.op))
            .map(|t| t.end - t.start)
            .collect();
        match lengths.len() {
            0 => 0.0,
            n => lengths.iter().sum::<f64>() / n as f64,
        }
    };
    let f = mean(|op| matches!(op, ScheduleOp::F(_)));
    let b = mean(|op| matches!(op, ScheduleOp::B(_)));
    let b_input = mean(|op| matches!(op, ScheduleOp::BInput(_)));
    let w = mean(|op| matches!(op, ScheduleOp::W(_)));
    let f_and_b = mean(|op| matches!(op, ScheduleOp::FB { .. }));
    // The simulator's B is the full backward; a split one is B + W.
    let b = if b > 0.0 { b } else { b_input + w };
    let mut costs = Costs::new(f, b, w.min(b));
    if f_and_b > 0.0 {
        costs = costs.with_overlap(f_and_b);
    }
    SimReport {
        method: schedule.method,
        pp: schedule.pp,
        micro_batches: schedule.micro_batches,
        costs,
        makespan,
        ranks: clocks.into_iter().map(|c| c.report(makespan)).collect(),
    }
}
