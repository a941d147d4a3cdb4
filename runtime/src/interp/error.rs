//! What can go wrong while interpreting a graph.

use fathom_compiler::{GraphError, NodeId, TensorType};
use thiserror::Error;

/// An error of [`evaluate`](super::evaluate) or [`evaluate_nodes`](super::evaluate_nodes).
///
/// Bad feeds (missing, mistyped or malformed tensors) and bad data (an index out of range, an
/// integer division by zero) are reported here; the interpreter never panics on them.
#[derive(Debug, Error, PartialEq)]
pub enum InterpError {
    /// The graph does not validate (see [`fathom_compiler::Graph::validate`]).
    #[error("invalid graph: {0}")]
    InvalidGraph(#[from] GraphError),

    /// The feeds ask for expert parallelism, which only the compiled CPU backend runs.
    #[error(
        "expert parallelism needs the compiled CPU backend; the interpreter runs every expert itself"
    )]
    ExpertParallelism,

    /// A requested node is not in the graph.
    #[error("node {node} is not in the graph, which has {len} nodes")]
    UnknownNode { node: NodeId, len: usize },

    /// An `Input` or `Parameter` node whose tensor was not fed.
    #[error("missing {kind} `{name}` (node {node}, declared {declared})")]
    Missing {
        /// `"input"` or `"parameter"`.
        kind: &'static str,
        name: String,
        node: NodeId,
        declared: TensorType,
    },

    /// A fed tensor whose element type or shape differs from what the graph declares.
    #[error("{kind} `{name}` was fed as {fed} but the graph declares {declared}")]
    TypeMismatch {
        kind: &'static str,
        name: String,
        declared: TensorType,
        fed: TensorType,
    },

    /// A fed tensor whose data does not fit its own type: wrong element count, storage of the
    /// wrong kind, or values not representable in its dtype (a `bf16` tensor holding an f32 that
    /// is not a bf16 value, an `i32` tensor holding an i64 beyond the i32 range).
    #[error("{kind} `{name}` ({ty}) is malformed: {detail}")]
    MalformedFeed {
        kind: &'static str,
        name: String,
        ty: TensorType,
        detail: String,
    },

    /// An index operand (`Gather`, `TakeAlong`, `GroupedMatMul` expert ids, `OneHot`) holds a
    /// value outside `0..bound`.
    #[error(
        "{op} {node}{}: index {index} is out of range 0..{bound}",
        origin_suffix(origin)
    )]
    IndexOutOfRange {
        node: NodeId,
        op: &'static str,
        origin: String,
        index: i64,
        bound: usize,
    },

    /// An integer `Div` by zero.
    #[error("{op} {node}{}: integer division by zero", origin_suffix(origin))]
    DivisionByZero {
        node: NodeId,
        op: &'static str,
        origin: String,
    },

    /// An inconsistency that a validated graph and checked feeds should rule out: a bug in the
    /// interpreter or in shape inference.
    #[error("{op} {node}{}: internal error: {detail}", origin_suffix(origin))]
    Internal {
        node: NodeId,
        op: &'static str,
        origin: String,
        detail: String,
    },
}

fn origin_suffix(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!(" (in {origin})")
    }
}
