//! The tensor graph: an arena of typed nodes in topological order.

mod builder;
mod infer;
pub(crate) mod op;
mod print;
#[cfg(test)]
mod tests;
mod triangle;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use builder::{GraphBuilder, Tensor};
pub use infer::infer_type;
pub use op::{
    Accumulation, AttentionConfig, AttentionOperand, BinaryOp, CompareOp, ConstantData,
    ExpertTiles, Op, QuantFormat, ReduceOp, UnaryOp,
};
pub use triangle::{MatMulPart, Triangle, Triangular};

/// The permutation that undoes `perm` (a `Permute` by it, then by this, is the identity).
pub fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inverse = vec![0; perm.len()];
    for (axis, &p) in perm.iter().enumerate() {
        inverse[p] = axis;
    }
    inverse
}

use crate::dtype::TensorType;
use crate::error::GraphError;

/// Index of a node in its graph's arena. Ids are dense and stable: they are the order in which
/// nodes were added, which is also a topological order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One operation with its operands and its inferred result type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub ty: TensorType,
    /// The module path that created the node (`model.layers.3.self_attn`), for error messages,
    /// printed graphs and, later, kernel names. Empty at the top level.
    pub origin: String,
}

/// A named graph result (`logits`, `mtp_logits.1`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub name: String,
    pub node: NodeId,
}

/// A whole computation: nodes in topological order plus named outputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub outputs: Vec<Output>,
}

impl Graph {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.node(id).ty
    }

    pub fn node_ids(&self) -> impl DoubleEndedIterator<Item = NodeId> + '_ {
        (0..self.nodes.len() as u32).map(NodeId)
    }

    /// The parameters, in declaration order, with their checkpoint names.
    pub fn parameters(&self) -> impl Iterator<Item = (NodeId, &str, &TensorType)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Parameter { name, .. } => Some((NodeId(i as u32), name.as_str(), &n.ty)),
                _ => None,
            })
    }

    /// The run-time inputs, in declaration order.
    pub fn inputs(&self) -> impl Iterator<Item = (NodeId, &str, &TensorType)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Input { name } => Some((NodeId(i as u32), name.as_str(), &n.ty)),
                _ => None,
            })
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|o| o.name == name).map(|o| o.node)
    }

    /// Whether node `id` is one of the graph's outputs.
    pub fn is_output(&self, id: NodeId) -> bool {
        self.outputs.iter().any(|o| o.node == id)
    }

    /// Whether `id` is a trainable parameter (not a buffer, not a computed value).
    pub fn is_trainable(&self, id: NodeId) -> bool {
        matches!(
            self.node(id).op,
            Op::Parameter {
                trainable: true,
                ..
            }
        )
    }

    /// Number of trainable parameter elements (buffers excluded, as PyTorch counts).
    pub fn parameter_count(&self) -> u64 {
        self.parameters()
            .filter(|(id, _, _)| self.is_trainable(*id))
            .map(|(_, _, ty)| ty.numel() as u64)
            .sum()
    }

    /// Re-checks a graph that did not come from the builder (deserialised, or rewritten by a
    /// pass): operands precede their users, arities and names are right, and every node's
    /// recorded type is what inference gives.
    pub fn validate(&self) -> Result<(), GraphError> {
        let mut parameter_names = std::collections::HashSet::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let id = NodeId(index as u32);
            if let Some(bad) = node.inputs.iter().find(|input| input.index() >= index) {
                return Err(GraphError::NotTopological {
                    node: id,
                    operand: *bad,
                });
            }
            if let Op::Parameter { name, .. } = &node.op
                && !parameter_names.insert(name.as_str())
            {
                return Err(GraphError::DuplicateName {
                    kind: "parameter",
                    name: name.clone(),
                });
            }
            let operand_types: Vec<&TensorType> = node.inputs.iter().map(|&i| self.ty(i)).collect();
            let inferred =
                infer_type(&node.op, &operand_types, Some(&node.ty)).map_err(|detail| {
                    GraphError::Invalid {
                        node: id,
                        op: node.op.name(),
                        origin: node.origin.clone(),
                        detail,
                    }
                })?;
            if inferred != node.ty {
                return Err(GraphError::Invalid {
                    node: id,
                    op: node.op.name(),
                    origin: node.origin.clone(),
                    detail: format!("recorded type {} but inference gives {inferred}", node.ty),
                });
            }
        }
        for output in &self.outputs {
            if output.node.index() >= self.nodes.len() {
                return Err(GraphError::UnknownOutput {
                    name: output.name.clone(),
                    node: output.node,
                });
            }
        }
        Ok(())
    }
}
