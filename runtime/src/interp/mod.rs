//! The reference interpreter: a plain, slow, obviously correct evaluator of a [`Graph`] on host
//! tensors. It is the oracle every backend is checked against.
//!
//! Numerics:
//! - float tensors hold f32 values exactly representable in their dtype; every op computes in
//!   f32 (f64 for sums, dot products and transcendental functions) and rounds its result to
//!   f32 and then to the node's dtype (round to nearest even; FP8 saturates);
//! - sums and dot products accumulate in f64, in index order;
//! - integers wrap (two's complement) to their dtype; integer division truncates toward zero.
//!
//! Evaluation runs only the nodes the requested results depend on, in graph (topological)
//! order, and frees each intermediate value after its last use. Fed tensors are borrowed, not
//! copied.
//!
//! ```
//! # use std::collections::HashMap;
//! # use fathom_compiler::{DType, GraphBuilder, TensorType};
//! # use fathom_runtime::HostTensor;
//! # use fathom_runtime::interp::{evaluate, Feeds};
//! let mut b = GraphBuilder::new("double");
//! let x = b.input("x", TensorType::new(DType::F32, [2])).unwrap();
//! let y = b.add(x, x).unwrap();
//! b.output("y", y).unwrap();
//! let graph = b.finish();
//!
//! let inputs = HashMap::from([("x", HostTensor::f32([2], vec![1.0, 2.5]))]);
//! let outputs = evaluate(&graph, &Feeds::new(&inputs, &())).unwrap();
//! assert_eq!(outputs.get("y").unwrap().as_f32(), Some(&[2.0, 5.0][..]));
//! ```

mod attention;
mod elementwise;
mod error;
mod eval;
mod indexing;
mod layout;
mod leaves;
mod linalg;
mod loss;
mod movement;
mod numeric;
mod quantize;
#[cfg(test)]
mod tests;

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};

use fathom_compiler::{Graph, NodeId, Op};

pub use error::InterpError;
pub use numeric::round_to_dtype;

use crate::tensor::HostTensor;
use eval::At;

use crate::parallel::ExpertExchange;

/// Where the interpreter finds fed tensors by name. Implemented for maps from names to owned or
/// borrowed tensors, and for `()` (nothing); implement it for other weight stores.
pub trait TensorSource {
    fn tensor(&self, name: &str) -> Option<&HostTensor>;
}

impl<K, T, S> TensorSource for HashMap<K, T, S>
where
    K: Borrow<str> + Hash + Eq,
    T: Borrow<HostTensor>,
    S: BuildHasher,
{
    fn tensor(&self, name: &str) -> Option<&HostTensor> {
        self.get(name).map(Borrow::borrow)
    }
}

impl<K, T> TensorSource for BTreeMap<K, T>
where
    K: Borrow<str> + Ord,
    T: Borrow<HostTensor>,
{
    fn tensor(&self, name: &str) -> Option<&HostTensor> {
        self.get(name).map(Borrow::borrow)
    }
}

/// No tensors at all.
impl TensorSource for () {
    fn tensor(&self, _name: &str) -> Option<&HostTensor> {
        None
    }
}

/// The tensors for a graph's `Input` and `Parameter` nodes, by name, borrowed from the caller.
#[derive(Clone, Copy)]
pub struct Feeds<'a> {
    pub inputs: &'a dyn TensorSource,
    pub parameters: &'a dyn TensorSource,
    /// Set on the ranks of an expert-parallel run: grouped expert GEMMs run where their experts
    /// live (see [`crate::parallel::ExpertExchange`]). Only the compiled CPU backend honours it;
    /// the interpreter refuses it.
    pub experts: Option<&'a dyn ExpertExchange>,
    /// `Some(v)`: the parameters are the tensors, with the values, of every other run fed
    /// version `v` (a trainer passes a counter it moves on whenever it changes its weights). A
    /// backend that keeps the parameters in device memory uploads them once per version; with
    /// `None` it uploads them every run. The other backends read the parameters where they lie.
    pub parameters_version: Option<u64>,
}

impl<'a> Feeds<'a> {
    /// `Feeds::new(&inputs, &parameters)`; pass `&()` for none.
    pub fn new(inputs: &'a dyn TensorSource, parameters: &'a dyn TensorSource) -> Self {
        Feeds {
            inputs,
            parameters,
            experts: None,
            parameters_version: None,
        }
    }

    /// These feeds, their parameters being version `version` (see
    /// [`Feeds::parameters_version`]).
    pub fn with_parameters_version(self, version: u64) -> Self {
        Feeds {
            parameters_version: Some(version),
            ..self
        }
    }

    /// These feeds on a rank of an expert-parallel group.
    pub fn with_experts(self, experts: &'a dyn ExpertExchange) -> Self {
        Feeds {
            experts: Some(experts),
            ..self
        }
    }
}

impl fmt::Debug for Feeds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feeds").finish_non_exhaustive()
    }
}

/// A graph's named outputs, in the graph's order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outputs {
    entries: Vec<(String, HostTensor)>,
}

impl Outputs {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Takes the output out.
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        let position = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(position).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> + '_ {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl IntoIterator for Outputs {
    type Item = (String, HostTensor);
    type IntoIter = std::vec::IntoIter<(String, HostTensor)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// Evaluates the graph's named outputs.
pub fn evaluate(graph: &Graph, feeds: &Feeds<'_>) -> Result<Outputs, InterpError> {
    let nodes: Vec<NodeId> = graph.outputs.iter().map(|o| o.node).collect();
    let tensors = evaluate_nodes(graph, feeds, &nodes)?;
    let names = graph.outputs.iter().map(|o| o.name.clone());
    Ok(Outputs {
        entries: names.zip(tensors).collect(),
    })
}

/// Evaluates the given nodes (outputs or intermediates, repeats allowed), returning their
/// values in the same order. Only the nodes they depend on run, so only their inputs and
/// parameters need be fed.
pub fn evaluate_nodes(
    graph: &Graph,
    feeds: &Feeds<'_>,
    nodes: &[NodeId],
) -> Result<Vec<HostTensor>, InterpError> {
    graph.validate()?;
    if feeds.experts.is_some() {
        return Err(InterpError::ExpertParallelism);
    }
    let len = graph.nodes.len();
    if let Some(&node) = nodes.iter().find(|n| n.index() >= len) {
        return Err(InterpError::UnknownNode { node, len });
    }
    let mut values = run(graph, feeds, nodes)?;
    // Move each value out at its last request, clone it for earlier repeats.
    let last_request: HashMap<NodeId, usize> = nodes
        .iter()
        .enumerate()
        .map(|(position, &node)| (node, position))
        .collect();
    let mut results = Vec::with_capacity(nodes.len());
    for (position, node) in nodes.iter().enumerate() {
        let slot = &mut values[node.index()];
        let value = if last_request[node] == position {
            slot.take()
        } else {
            slot.clone()
        };
        let value = value.ok_or_else(|| internal(graph, *node, "requested value was freed"))?;
        results.push(value.into_owned());
    }
    Ok(results)
}

/// Runs every node `targets` depend on, in order, freeing intermediates after their last use.
/// Returns the values, `Some` for the targets.
fn run<'f>(
    graph: &Graph,
    feeds: &Feeds<'f>,
    targets: &[NodeId],
) -> Result<Vec<Option<Cow<'f, HostTensor>>>, InterpError> {
    let len = graph.nodes.len();
    // Which nodes the targets need: walk users before operands (reverse topological order).
    let mut needed = vec![false; len];
    for t in targets {
        needed[t.index()] = true;
    }
    for (i, node) in graph.nodes.iter().enumerate().rev() {
        if needed[i] {
            for operand in &node.inputs {
                needed[operand.index()] = true;
            }
        }
    }
    // The last needed node that reads each node; targets are never freed.
    let mut last_use: Vec<Option<usize>> = vec![None; len];
    for (i, node) in graph.nodes.iter().enumerate().filter(|(i, _)| needed[*i]) {
        for operand in &node.inputs {
            last_use[operand.index()] = Some(i);
        }
    }
    let mut keep = vec![false; len];
    for t in targets {
        keep[t.index()] = true;
    }

    let mut values: Vec<Option<Cow<'f, HostTensor>>> = (0..len).map(|_| None).collect();
    for (i, node) in graph.nodes.iter().enumerate().filter(|(i, _)| needed[*i]) {
        let at = At {
            id: NodeId(i as u32),
            node,
        };
        let value = match &node.op {
            Op::Input { name } => Cow::Borrowed(leaves::fed(at, "input", name, feeds.inputs)?),
            Op::Parameter { name, .. } => {
                Cow::Borrowed(leaves::fed(at, "parameter", name, feeds.parameters)?)
            }
            _ => {
                let operands = node
                    .inputs
                    .iter()
                    .map(|o| values[o.index()].as_deref())
                    .collect::<Option<Vec<&HostTensor>>>()
                    .ok_or_else(|| at.internal("an operand was freed before its last use"))?;
                let result = eval::compute(at, &operands)?;
                check_result(at, &result)?;
                Cow::Owned(result)
            }
        };
        values[i] = Some(value);
        for operand in &node.inputs {
            if last_use[operand.index()] == Some(i) && !keep[operand.index()] {
                values[operand.index()] = None;
            }
        }
    }
    Ok(values)
}

/// A self-check: the computed value has the recorded type and its data fits it.
fn check_result(at: At<'_>, result: &HostTensor) -> Result<(), InterpError> {
    if result.ty != at.node.ty {
        return Err(at.internal(format!(
            "computed {} but the graph records {}",
            result.ty, at.node.ty
        )));
    }
    leaves::check_data(&result.ty, &result.data)
        .map_err(|detail| at.internal(format!("computed a malformed {}: {detail}", result.ty)))
}

fn internal(graph: &Graph, node: NodeId, detail: &str) -> InterpError {
    At {
        id: node,
        node: graph.node(node),
    }
    .internal(detail)
}
