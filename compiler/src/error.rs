//! Errors of graph construction and validation.

use thiserror::Error;

use crate::graph::NodeId;

#[derive(Debug, Error, PartialEq)]
pub enum GraphError {
    /// An op was given operands it cannot take. `detail` names both shapes.
    #[error("{op} {node}{}: {detail}", origin_suffix(origin))]
    Invalid {
        node: NodeId,
        op: &'static str,
        origin: String,
        detail: String,
    },
    #[error("node {node} uses {operand}, which does not come before it")]
    NotTopological { node: NodeId, operand: NodeId },
    #[error("two {kind}s are named `{name}`")]
    DuplicateName { kind: &'static str, name: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid model spec: `{field}`: {message}")]
    Spec { field: String, message: String },
    #[error("output `{name}` refers to {node}, which is not in the graph")]
    UnknownOutput { name: String, node: NodeId },
}

fn origin_suffix(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!(" (in {origin})")
    }
}
