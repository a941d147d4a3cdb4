//! A stage graph cut into the pieces a pipeline schedule runs at different times.
//!
//! Every node goes to the earliest phase that needs its value (so the weight-gradient matmuls,
//! needed only by `grad.<parameter>` outputs, wait for W, while the activation gradients the
//! previous stage waits for run in B). A value computed in one phase and used in a later one
//! is handed over: an output `carry.<n>` of the earlier piece and an input of the same name in
//! the later one; what F hands to B and W is exactly the activation memory a micro-batch holds
//! between its forward and its backward. Nodes computed from parameters and constants alone
//! (weight transposes and casts, rotary tables, masks) and the graph's inputs are not handed
//! over but recomputed or re-fed in each piece that reads them.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::GraphError;
use crate::graph::{Graph, Node, NodeId, Op, Output};

/// When a piece of a stage's work runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// The forward pass (F).
    Forward,
    /// The backward pass up to the gradient of the stage's input (B).
    InputGrad,
    /// The gradients of the parameters (W).
    WeightGrad,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Forward, Phase::InputGrad, Phase::WeightGrad];

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Forward => "forward",
            Phase::InputGrad => "input-gradient",
            Phase::WeightGrad => "weight-gradient",
        })
    }
}

/// The three pieces; `graphs[p as usize]` runs in phase p. A piece may have no outputs (the
/// first stage's B, for one: its input has no gradient to send), and then need not run.
#[derive(Clone, Debug)]
pub struct PhaseGraphs {
    pub graphs: [Graph; 3],
}

impl PhaseGraphs {
    pub fn get(&self, phase: Phase) -> &Graph {
        &self.graphs[phase as usize]
    }

    /// Bytes a micro-batch keeps from its forward until its backward: the values F hands on.
    pub fn carried_bytes(&self, from: Phase) -> u64 {
        let graph = self.get(from);
        graph
            .outputs
            .iter()
            .filter(|o| o.name.starts_with(CARRY))
            .map(|o| graph.ty(o.node).size_bytes() as u64)
            .sum()
    }
}

/// The prefix of the names that hand values from one piece to a later one.
pub const CARRY: &str = "carry.";

/// Cuts `graph` into phases. `input_phase` says when each input (by name) becomes available,
/// `output_phase` when each output is wanted. Errors name an output that would need an input
/// not yet available in its phase.
pub fn split_phases(
    graph: &Graph,
    input_phase: impl Fn(&str) -> Phase,
    output_phase: impl Fn(&str) -> Phase,
) -> Result<PhaseGraphs, GraphError> {
    let n = graph.nodes.len();
    // Leaves and values of parameters and constants alone are re-created where used.
    let mut replicable = vec![false; n];
    let mut available = vec![Phase::Forward; n];
    for (i, node) in graph.nodes.iter().enumerate() {
        match &node.op {
            Op::Input { name } => {
                replicable[i] = true;
                available[i] = input_phase(name);
            }
            Op::Parameter { .. } | Op::Constant(_) => replicable[i] = true,
            _ => {
                replicable[i] = node.inputs.iter().all(|j| {
                    replicable[j.index()] && !matches!(graph.node(*j).op, Op::Input { .. })
                });
                available[i] = node
                    .inputs
                    .iter()
                    .map(|j| available[j.index()])
                    .max()
                    .unwrap_or(Phase::Forward);
            }
        }
    }

    // `used[i]`: the phases (bits) in which node i's value is read.
    let mut used = vec![0u8; n];
    for output in &graph.outputs {
        used[output.node.index()] |= output_phase(&output.name).bit();
    }
    // `computed[i]`: the phases that compute node i: all its uses for replicable nodes, the
    // earliest use otherwise.
    let mut computed = vec![0u8; n];
    for i in (0..n).rev() {
        if used[i] == 0 {
            continue;
        }
        computed[i] = if replicable[i] {
            used[i]
        } else {
            used[i] & used[i].wrapping_neg()
        };
        for input in &graph.nodes[i].inputs {
            used[input.index()] |= computed[i];
        }
    }
    with_their_forwards(graph, &mut computed);
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Some(earliest) = Phase::ALL.into_iter().find(|p| computed[i] & p.bit() != 0)
            && earliest < available[i]
        {
            let wanted = graph
                .outputs
                .iter()
                .find(|o| o.node.index() == i)
                .map_or(String::new(), |o| format!(" (output `{}`)", o.name));
            return Err(GraphError::InvalidRequest(format!(
                "node {i} ({} in `{}`){wanted} is needed in the {earliest} phase but depends on \
                 an input that arrives only in the {} phase",
                node.op.name(),
                node.origin,
                available[i]
            )));
        }
    }

    let graphs =
        Phase::ALL.map(|phase| piece(graph, phase, &computed, &used, &replicable, &output_phase));
    Ok(PhaseGraphs { graphs })
}

/// Moves each attention statistic (`CausalAttentionLse`, which only gradients read) to the
/// earliest phase computing the forward of the same operands: a fused forward computes it
/// with its output, and the backward receives it like any other activation, rather than
/// running the attention's scores again to get it.
fn with_their_forwards(graph: &Graph, computed: &mut [u8]) {
    let lowest = |bits: u8| bits & bits.wrapping_neg();
    let mut forwards: HashMap<(&[NodeId], String), u8> = HashMap::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        match &node.op {
            Op::CausalAttention(config) if computed[i] != 0 => {
                let key = (node.inputs.as_slice(), format!("{config}"));
                forwards.insert(key, lowest(computed[i]));
            }
            Op::CausalAttentionLse(config) if computed[i] != 0 => {
                let key = (node.inputs.as_slice(), format!("{config}"));
                if let Some(&phase) = forwards.get(&key)
                    && phase < lowest(computed[i])
                {
                    computed[i] = phase;
                }
            }
            _ => {}
        }
    }
}

/// The piece of `graph` computed in `phase`.
fn piece(
    graph: &Graph,
    phase: Phase,
    computed: &[u8],
    used: &[u8],
    replicable: &[bool],
    output_phase: &impl Fn(&str) -> Phase,
) -> Graph {
    let bit = phase.bit();
    let mut nodes: Vec<Node> = Vec::new();
    let mut local: Vec<Option<NodeId>> = vec![None; graph.nodes.len()];
    let push = |nodes: &mut Vec<Node>, node: Node| {
        nodes.push(node);
        NodeId(nodes.len() as u32 - 1)
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        if computed[i] & bit == 0 {
            continue;
        }
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for j in &node.inputs {
            let id = match local[j.index()] {
                Some(id) => id,
                // Computed by an earlier piece: read it from the hand-over.
                None => {
                    let id = push(&mut nodes, carry_input(graph, *j));
                    local[j.index()] = Some(id);
                    id
                }
            };
            inputs.push(id);
        }
        let id = push(
            &mut nodes,
            Node {
                op: node.op.clone(),
                inputs,
                ty: node.ty.clone(),
                origin: node.origin.clone(),
            },
        );
        local[i] = Some(id);
    }
    let mut outputs = Vec::new();
    for output in &graph.outputs {
        if output_phase(&output.name) != phase {
            continue;
        }
        let j = output.node;
        let node = match local[j.index()] {
            Some(id) => id,
            None => {
                let id = push(&mut nodes, carry_input(graph, j));
                local[j.index()] = Some(id);
                id
            }
        };
        outputs.push(Output {
            name: output.name.clone(),
            node,
        });
    }
    // Values this piece computes that a later piece reads.
    let later = !((bit << 1) - 1);
    for (i, id) in local.iter().enumerate() {
        if let Some(id) = id
            && !replicable[i]
            && computed[i] & bit != 0
            && used[i] & later != 0
        {
            outputs.push(Output {
                name: carry_name(NodeId(i as u32)),
                node: *id,
            });
        }
    }
    Graph {
        name: format!("{}.{}", graph.name, phase_suffix(phase)),
        nodes,
        outputs,
    }
}

fn phase_suffix(phase: Phase) -> &'static str {
    match phase {
        Phase::Forward => "F",
        Phase::InputGrad => "B",
        Phase::WeightGrad => "W",
    }
}

fn carry_name(id: NodeId) -> String {
    format!("{CARRY}{}", id.index())
}

fn carry_input(graph: &Graph, id: NodeId) -> Node {
    let node = graph.node(id);
    Node {
        op: Op::Input {
            name: carry_name(id),
        },
        inputs: Vec::new(),
        ty: node.ty.clone(),
        origin: node.origin.clone(),
    }
}
