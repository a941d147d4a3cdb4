//! A pipeline schedule as data: per rank, the ordered list of what that rank does.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ScheduleError;

/// A pipeline-parallel schedule family (DeepSeek-V3 report, Table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    /// One forward, one backward: the classic non-interleaved schedule.
    OneFOneB,
    /// Zero-bubble ZB-H1 (Qi et al. 2023): backward split into B and W, W deferred into bubbles.
    Zb1p,
    /// DualPipe: bidirectional, every rank holds two stages, forward and backward overlapped.
    DualPipe,
    /// DualPipeV: DualPipe cut in half, a V-shaped schedule on PP/2 devices.
    DualPipeV,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::OneFOneB,
        Method::Zb1p,
        Method::DualPipe,
        Method::DualPipeV,
    ];

    /// The name the CLI and the printed table use.
    pub fn name(self) -> &'static str {
        match self {
            Method::OneFOneB => "1f1b",
            Method::Zb1p => "zb1p",
            Method::DualPipe => "dualpipe",
            Method::DualPipeV => "dualpipev",
        }
    }

    /// How many devices (ranks) run `pp` pipeline stages.
    pub fn devices(self, pp: usize) -> usize {
        match self {
            Method::DualPipeV => pp / 2,
            _ => pp,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|method| method.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| ScheduleError::UnknownMethod(text.to_owned()))
    }
}

/// One micro-batch on one pipeline stage: the unit of F, B and W work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Chunk {
    pub mb: usize,
    pub stage: usize,
}

impl Chunk {
    pub fn new(mb: usize, stage: usize) -> Self {
        Chunk { mb, stage }
    }
}

/// What a point-to-point transfer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Payload {
    /// A stage's forward output, going to the next stage.
    Activation,
    /// The gradient of a stage's input, going back to the previous stage.
    Gradient,
}

/// One transfer between neighbouring stages: `chunk` is the stage that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Message {
    pub payload: Payload,
    pub chunk: Chunk,
}

/// One step of one rank's program, executed in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleOp {
    /// Forward of a chunk.
    F(Chunk),
    /// Full backward: input and weight gradients together.
    B(Chunk),
    /// The input-gradient half of a split backward; its weight half is a later [`ScheduleOp::W`].
    BInput(Chunk),
    /// The weight-gradient half of a split backward.
    W(Chunk),
    /// A forward and a full backward of two different micro-batches, run overlapped so that each
    /// one's communication hides behind the other's computation (DualPipe).
    FB { f: Chunk, b: Chunk },
    /// Start sending to `peer` (asynchronous: the rank goes on at once).
    Send { peer: usize, msg: Message },
    /// Wait until the matching send from `peer` has arrived.
    Recv { peer: usize, msg: Message },
}

impl ScheduleOp {
    /// Whether the op occupies the rank's compute (as opposed to communication).
    pub fn is_compute(&self) -> bool {
        !matches!(self, ScheduleOp::Send { .. } | ScheduleOp::Recv { .. })
    }

    /// The short cell text of the schedule table: `F3`, `B3`, `W3`, `F5B1`; the input-gradient
    /// half of a split backward is `B3` too (its `W3` follows later on the same rank).
    pub fn cell(&self) -> String {
        match self {
            ScheduleOp::F(c) => format!("F{}", c.mb),
            ScheduleOp::B(c) | ScheduleOp::BInput(c) => format!("B{}", c.mb),
            ScheduleOp::W(c) => format!("W{}", c.mb),
            ScheduleOp::FB { f, b } => format!("F{}B{}", f.mb, b.mb),
            ScheduleOp::Send { peer, msg } => format!("S{}>{peer}", msg.chunk.mb),
            ScheduleOp::Recv { peer, msg } => format!("R{}<{peer}", msg.chunk.mb),
        }
    }
}

impl fmt::Display for ScheduleOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = |msg: &Message| match msg.payload {
            Payload::Activation => "activation",
            Payload::Gradient => "gradient",
        };
        match self {
            ScheduleOp::F(c) => write!(f, "forward of micro-batch {} on stage {}", c.mb, c.stage),
            ScheduleOp::B(c) => write!(f, "backward of micro-batch {} on stage {}", c.mb, c.stage),
            ScheduleOp::BInput(c) => write!(
                f,
                "input-gradient backward of micro-batch {} on stage {}",
                c.mb, c.stage
            ),
            ScheduleOp::W(c) => write!(
                f,
                "weight-gradient backward of micro-batch {} on stage {}",
                c.mb, c.stage
            ),
            ScheduleOp::FB { f: fw, b } => write!(
                f,
                "overlapped forward of micro-batch {} on stage {} and backward of micro-batch {} \
                 on stage {}",
                fw.mb, fw.stage, b.mb, b.stage
            ),
            ScheduleOp::Send { peer, msg } => write!(
                f,
                "send of the {} of micro-batch {} from stage {} to rank {peer}",
                what(msg),
                msg.chunk.mb,
                msg.chunk.stage
            ),
            ScheduleOp::Recv { peer, msg } => write!(
                f,
                "receive of the {} of micro-batch {} from stage {} on rank {peer}",
                what(msg),
                msg.chunk.mb,
                msg.chunk.stage
            ),
        }
    }
}

/// A complete schedule of one training step: `ranks[r]` is rank r's program.
///
/// `pp` counts pipeline stages (Table 2's PP). It equals the number of ranks except for
/// DualPipeV, which runs `pp` stages on `pp / 2` ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub method: Method,
    pub pp: usize,
    pub micro_batches: usize,
    pub ranks: Vec<Vec<ScheduleOp>>,
}

impl Schedule {
    /// The rank that runs `chunk`, following the method's placement of stages.
    ///
    /// DualPipe sends the first half of the micro-batches from rank 0 and the second half from
    /// rank PP-1, so rank r holds stage r (first half) and a second copy of stage PP-1-r. DualPipeV
    /// folds the stages into a V: stage s < PP/2 on rank s, the rest back up on rank PP-1-s.
    pub fn rank_of(&self, chunk: Chunk) -> usize {
        rank_of(self.method, self.pp, self.micro_batches, chunk)
    }

    /// Whether `chunk` belongs to the second stream: DualPipe's micro-batches entering at the
    /// last rank, or DualPipeV's way back up the V. Pictures draw them in a darker shade.
    pub fn second_stream(&self, chunk: Chunk) -> bool {
        second_stream(self.method, self.pp, self.micro_batches, chunk)
    }

    /// The schedule as a text table: one row per rank, one cell per compute op in order.
    /// Transfers are left out (they are in the JSON form and in [`ScheduleOp`]'s Display).
    pub fn table(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .ranks
            .iter()
            .map(|ops| {
                ops.iter()
                    .filter(|op| op.is_compute())
                    .map(ScheduleOp::cell)
                    .collect()
            })
            .collect();
        let width = cells.iter().flatten().map(String::len).max().unwrap_or(1);
        let label = format!("rank {}", self.ranks.len().saturating_sub(1)).len();
        let mut out = format!(
            "{} schedule: PP={} on {} ranks, {} micro-batches\n",
            self.method,
            self.pp,
            self.ranks.len(),
            self.micro_batches
        );
        for (rank, row) in cells.iter().enumerate() {
            let name = format!("rank {rank}");
            out.push_str(&format!("{name:<label$} |"));
            for cell in row {
                out.push_str(&format!(" {cell:<width$}"));
            }
            // Padding of the last cell is noise in snapshots and terminals.
            let trimmed = out.trim_end().len();
            out.truncate(trimmed);
            out.push('\n');
        }
        out
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table())
    }
}

/// See [`Schedule::rank_of`].
pub(crate) fn rank_of(method: Method, pp: usize, micro_batches: usize, chunk: Chunk) -> usize {
    match method {
        Method::OneFOneB | Method::Zb1p => chunk.stage,
        Method::DualPipe if chunk.mb < micro_batches / 2 => chunk.stage,
        Method::DualPipe => pp - 1 - chunk.stage,
        Method::DualPipeV if chunk.stage < pp / 2 => chunk.stage,
        Method::DualPipeV => pp - 1 - chunk.stage,
    }
}

/// See [`Schedule::second_stream`].
pub(crate) fn second_stream(method: Method, pp: usize, micro_batches: usize, chunk: Chunk) -> bool {
    match method {
        Method::OneFOneB | Method::Zb1p => false,
        Method::DualPipe => chunk.mb >= micro_batches / 2,
        Method::DualPipeV => chunk.stage >= pp / 2,
    }
}
