//! DualPipe and DualPipeV compute orders, phase by phase as in deepseek-ai/DualPipe's
//! `dualpipe.py` and `dualpipev.py` (written from their step structure, not translated).
//!
//! Both run the same eight steps on every rank. A rank works on two *local phases*: phase 0 is
//! the chunk stream that reaches it first, phase 1 the other. With `half` = PP/2 (DualPipe) or
//! the device count (DualPipeV), `k` = the rank's distance from the nearer end of the pipeline
//! (DualPipe) or its index (DualPipeV) and `n` micro-batches per phase:
//!
//! | step | ops            | repeats          |
//! |------|----------------|------------------|
//! | 1    | F0             | 2(half-k-1)      |
//! | 2    | F0 F1          | k+1              |
//! | 3    | B1 W F1        | half-k-1         |
//! | 4    | F0&B1 F1&B0    | n-2·half+k+1     |
//! | 5    | B1 F1&B0       | half-k-1         |
//! | 6    | B1 B0          | k+1              |
//! | 7    | W B0           | half-k-1         |
//! | 8    | W              | k+1              |
//!
//! `&` is an overlapped pair. Step 3's backward is split (its W follows at once); in step 6 the
//! second half of the backwards are split, and their W passes, with step 7's, are run first in
//! first out in steps 7 and 8. The rank next to the middle (DualPipe's two middle ranks,
//! DualPipeV's last rank) runs its first F0&B1 as F0 then B1: the gradient for B1 arrives late
//! there, and running F0 alone first fills that wait.

use std::collections::VecDeque;

use super::schedule::{Chunk, ScheduleOp};

/// DualPipe on `pp` ranks: micro-batches 0..n enter at rank 0, n..2n at rank PP-1 (n = half of
/// them); rank r holds stage r of the first stream and stage PP-1-r of the second.
pub(super) fn dualpipe(pp: usize, micro_batches: usize) -> Vec<Vec<ScheduleOp>> {
    let half = pp / 2;
    let n = micro_batches / 2;
    (0..pp)
        .map(|r| {
            let second_half = r >= half;
            // Local phase 0 is the stream entering at this rank's own end of the pipeline.
            let chunk = |phase: usize, index: usize| {
                let stream = phase ^ usize::from(second_half);
                let stage = if stream == 0 { r } else { pp - 1 - r };
                Chunk::new(stream * n + index, stage)
            };
            let shape = Shape {
                half,
                k: r.min(pp - 1 - r),
                per_phase: n,
                split_first_pair: r + 1 == half || r == half,
            };
            phases(&shape, chunk)
        })
        .collect()
}

/// DualPipeV on `pp / 2` ranks: every micro-batch goes down stages 0..PP/2 on ranks 0..PP/2 and
/// back up stages PP/2..PP on the same ranks in reverse; rank r holds stages r and PP-1-r.
pub(super) fn dualpipe_v(pp: usize, micro_batches: usize) -> Vec<Vec<ScheduleOp>> {
    let devices = pp / 2;
    (0..devices)
        .map(|r| {
            let chunk = |phase: usize, index: usize| {
                let stage = if phase == 0 { r } else { pp - 1 - r };
                Chunk::new(index, stage)
            };
            let shape = Shape {
                half: devices,
                k: r,
                per_phase: micro_batches,
                split_first_pair: r + 1 == devices,
            };
            phases(&shape, chunk)
        })
        .collect()
}

/// What distinguishes one rank's program from another's (see the module table).
struct Shape {
    half: usize,
    k: usize,
    per_phase: usize,
    split_first_pair: bool,
}

/// A rank's compute ops in order; `chunk(phase, i)` is the i-th chunk of a local phase.
struct Program<C> {
    chunk: C,
    next_f: [usize; 2],
    next_b: [usize; 2],
    /// Split backwards whose W is still to run, oldest first.
    pending_w: VecDeque<Chunk>,
    ops: Vec<ScheduleOp>,
}

impl<C: Fn(usize, usize) -> Chunk> Program<C> {
    fn next_forward(&mut self, phase: usize) -> Chunk {
        let c = (self.chunk)(phase, self.next_f[phase]);
        self.next_f[phase] += 1;
        c
    }

    fn next_backward(&mut self, phase: usize) -> Chunk {
        let c = (self.chunk)(phase, self.next_b[phase]);
        self.next_b[phase] += 1;
        c
    }

    fn f(&mut self, phase: usize) {
        let c = self.next_forward(phase);
        self.ops.push(ScheduleOp::F(c));
    }

    /// A backward; `split` runs only its input-gradient part now and queues its W.
    fn b(&mut self, phase: usize, split: bool) {
        let c = self.next_backward(phase);
        if split {
            self.pending_w.push_back(c);
            self.ops.push(ScheduleOp::BInput(c));
        } else {
            self.ops.push(ScheduleOp::B(c));
        }
    }

    fn w(&mut self) {
        // Never empty when the step counts are right; the simulator's coverage check would
        // report the missing W if they were not.
        if let Some(c) = self.pending_w.pop_front() {
            self.ops.push(ScheduleOp::W(c));
        }
    }

    fn fb(&mut self, forward_phase: usize, backward_phase: usize) {
        let f = self.next_forward(forward_phase);
        let b = self.next_backward(backward_phase);
        self.ops.push(ScheduleOp::FB { f, b });
    }
}

fn phases(shape: &Shape, chunk: impl Fn(usize, usize) -> Chunk) -> Vec<ScheduleOp> {
    let &Shape {
        half,
        k,
        per_phase,
        split_first_pair,
    } = shape;
    let mut p = Program {
        chunk,
        next_f: [0; 2],
        next_b: [0; 2],
        pending_w: VecDeque::new(),
        ops: Vec::new(),
    };
    let edge = half - k - 1;
    for _ in 0..2 * edge {
        p.f(0);
    }
    for _ in 0..k + 1 {
        p.f(0);
        p.f(1);
    }
    for _ in 0..edge {
        p.b(1, true);
        p.w();
        p.f(1);
    }
    for i in 0..per_phase + k + 1 - 2 * half {
        if i == 0 && split_first_pair {
            p.f(0);
            p.b(1, false);
        } else {
            p.fb(0, 1);
        }
        p.fb(1, 0);
    }
    for _ in 0..edge {
        p.b(1, false);
        p.fb(1, 0);
    }
    // The later half of these backwards split off their W, to fill the drain below: from the
    // middle pair on, starting with its B1 when the pair count is even, with its B0 when odd.
    let pairs = k + 1;
    let mut split = false;
    for i in 0..pairs {
        let turn = i == pairs / 2;
        split |= turn && pairs.is_multiple_of(2);
        p.b(1, split);
        split |= turn;
        p.b(0, split);
    }
    for _ in 0..edge {
        p.w();
        p.b(0, true);
    }
    for _ in 0..k + 1 {
        p.w();
    }
    p.ops
}
