//! Pipeline-parallel schedules as data: 1F1B, ZB1P (zero-bubble ZB-H1), DualPipe and DualPipeV.
//!
//! A [`Schedule`] lists, per rank, the ordered ops of one training step: forward chunks,
//! backward chunks (whole, or split into input-gradient B and weight-gradient W), overlapped
//! forward-and-backward pairs, and explicit sends and receives between neighbouring stages.
//! [`generate`] builds the schedules; [`simulate`] replays them under given op costs, checks
//! them (matched transfers, no deadlock, one F, B and W per micro-batch and stage) and measures
//! bubbles and activation memory, which the tests hold against Table 2 of the DeepSeek-V3
//! report ([`formula`]). [`svg`] draws the simulated timeline.

mod check;
mod dualpipe;
pub mod formula;
mod generate;
mod schedule;
mod simulate;
pub mod svg;

use thiserror::Error;

pub use generate::generate;
pub use schedule::{Chunk, Message, Method, Payload, Schedule, ScheduleOp};
pub use simulate::{Costs, RankReport, SimError, SimReport, Stuck, TimedOp, simulate};

/// A schedule that cannot be built: the setting named and what it needs.
#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    #[error("unknown pipeline method `{0}`: expected one of 1f1b, zb1p, dualpipe, dualpipev")]
    UnknownMethod(String),
    #[error("{method}: `{setting}` = {value}, but {method} needs {expected}")]
    Invalid {
        method: Method,
        setting: &'static str,
        value: usize,
        expected: String,
    },
}
