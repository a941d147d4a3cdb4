//! Recomputation (activation checkpointing) on a training graph: forward values that are cheap
//! to compute again are recomputed next to the backward nodes that read them instead of being
//! kept alive from the forward pass to the backward pass.
//!
//! The DeepSeek-V3 policy (report §3.3, SPEC.md §2) recomputes every RMSNorm and the MLA
//! up-projections (`q_b_proj`, `kv_b_proj`): the nodes created by those modules, and the cheap
//! element-wise and view nodes that follow them (the per-head split, RoPE, the concatenation of
//! each head's key), up to the next matmul or other heavy op. Their inputs — the residual
//! stream, the latents `c_q`/`c_kv` before their norm, weights — are kept as before. Backward
//! nodes then read the recomputed copies, which are placed right before their first backward
//! reader, so the forward originals die with their last forward reader.
//!
//! The copies are the same ops on the same inputs, so the graph computes the same values bit
//! for bit. Run it after common-subexpression elimination, which would merge the copies back.

use serde::{Deserialize, Serialize};

use crate::graph::{Graph, Node, NodeId, Op, Output};

/// Which forward values the training step recomputes in backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputePolicy {
    /// Keep every forward value the backward pass reads.
    None,
    /// RMSNorm outputs and the MLA up-projections (with the per-head views and RoPE after
    /// them) are recomputed, as in DeepSeek-V3's training.
    #[default]
    DeepSeekV3,
}

impl std::str::FromStr for RecomputePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(RecomputePolicy::None),
            "deepseek_v3" | "deepseek-v3" => Ok(RecomputePolicy::DeepSeekV3),
            other => Err(format!(
                "unknown recompute policy `{other}` (expected `none` or `deepseek_v3`)"
            )),
        }
    }
}

/// Origins of the copies: `recompute:` and the forward origin.
pub const RECOMPUTE_PREFIX: &str = "recompute:";

/// The graph with the values `policy` names recomputed for backward (the same graph for a
/// forward-only graph or [`RecomputePolicy::None`]).
pub fn recompute(graph: &Graph, policy: RecomputePolicy) -> Graph {
    if policy == RecomputePolicy::None {
        return graph.clone();
    }
    let n = graph.nodes.len();
    let backward: Vec<bool> = graph
        .nodes
        .iter()
        .map(|node| node.origin.starts_with("backward:"))
        .collect();
    // Recomputable: forward nodes of the target modules, and cheap nodes fed by them; not
    // those computed from parameters and constants alone (a weight rounded to bf16), which
    // do not grow with the batch: the backward reads the forward's.
    let mut recomputable = vec![false; n];
    let mut of_weights = vec![false; n];
    for (i, node) in graph.nodes.iter().enumerate() {
        of_weights[i] = match node.op {
            Op::Input { .. } => false,
            Op::Parameter { .. } | Op::Constant(_) => true,
            _ => node.inputs.iter().all(|j| of_weights[j.index()]),
        };
        if backward[i] || is_leaf(&node.op) || of_weights[i] {
            continue;
        }
        recomputable[i] = is_target(&node.origin)
            || (is_cheap(&node.op) && node.inputs.iter().any(|j| recomputable[j.index()]));
    }
    // Copies, created at their first backward reader; `before[i]` lists the copies to place
    // just before node i, in creation order (inputs first).
    let mut copy_of: Vec<Option<usize>> = vec![None; n];
    let mut copies: Vec<usize> = Vec::new();
    let mut before: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in graph.nodes.iter().enumerate() {
        if !backward[i] {
            continue;
        }
        for input in &node.inputs {
            if recomputable[input.index()] {
                request(
                    graph,
                    &recomputable,
                    input.index(),
                    i,
                    &mut copy_of,
                    &mut copies,
                    &mut before,
                );
            }
        }
    }
    if copies.is_empty() {
        return graph.clone();
    }

    let mut nodes: Vec<Node> = Vec::with_capacity(n + copies.len());
    let mut new_id: Vec<Option<NodeId>> = vec![None; n];
    // New id of the copy of original node i.
    let mut copy_id: Vec<Option<NodeId>> = vec![None; n];
    for i in 0..n {
        for &c in &before[i] {
            let original = &graph.nodes[c];
            let inputs = original
                .inputs
                .iter()
                .map(|j| {
                    if recomputable[j.index()] {
                        copy_id[j.index()].expect("copies of inputs come first")
                    } else {
                        new_id[j.index()].expect("inputs come first")
                    }
                })
                .collect();
            copy_id[c] = Some(NodeId(nodes.len() as u32));
            nodes.push(Node {
                op: original.op.clone(),
                inputs,
                ty: original.ty.clone(),
                origin: format!("{RECOMPUTE_PREFIX}{}", original.origin),
            });
        }
        let node = &graph.nodes[i];
        let inputs = node
            .inputs
            .iter()
            .map(|j| match (backward[i], copy_id[j.index()]) {
                (true, Some(copy)) => copy,
                _ => new_id[j.index()].expect("inputs come first"),
            })
            .collect();
        new_id[i] = Some(NodeId(nodes.len() as u32));
        nodes.push(Node {
            op: node.op.clone(),
            inputs,
            ty: node.ty.clone(),
            origin: node.origin.clone(),
        });
    }
    let outputs = graph
        .outputs
        .iter()
        .map(|o| Output {
            name: o.name.clone(),
            node: new_id[o.node.index()].expect("every node is kept"),
        })
        .collect();
    Graph {
        name: graph.name.clone(),
        nodes,
        outputs,
    }
}

/// Makes sure node `i` has a copy placed no later than before node `reader`, creating it (and
/// the copies of its recomputable inputs) there if it has none yet.
fn request(
    graph: &Graph,
    recomputable: &[bool],
    i: usize,
    reader: usize,
    copy_of: &mut Vec<Option<usize>>,
    copies: &mut Vec<usize>,
    before: &mut Vec<Vec<usize>>,
) {
    if copy_of[i].is_some() {
        return;
    }
    for input in &graph.nodes[i].inputs {
        if recomputable[input.index()] {
            request(
                graph,
                recomputable,
                input.index(),
                reader,
                copy_of,
                copies,
                before,
            );
        }
    }
    copy_of[i] = Some(copies.len());
    copies.push(i);
    before[reader].push(i);
}

fn is_leaf(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. } | Op::Parameter { .. } | Op::Constant(_)
    )
}

/// Nodes made by an RMSNorm module (`*layernorm`, `norm`, MTP's `enorm`/`hnorm`) or by an MLA
/// up-projection.
fn is_target(origin: &str) -> bool {
    let module = origin.rsplit('.').next().unwrap_or(origin);
    module.ends_with("layernorm")
        || matches!(
            module,
            "norm" | "enorm" | "hnorm" | "q_b_proj" | "kv_b_proj"
        )
}

/// Element-wise and view ops: as cheap to recompute as to read back.
fn is_cheap(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Select
            | Op::Cast { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_norms_and_up_projections() {
        for origin in [
            "model.layers.0.input_layernorm",
            "model.layers.3.self_attn.kv_a_layernorm",
            "model.norm",
            "model.layers.4.enorm",
            "model.layers.1.self_attn.q_b_proj",
            "model.layers.1.self_attn.kv_b_proj",
        ] {
            assert!(is_target(origin), "{origin}");
        }
        for origin in [
            "model.layers.1.self_attn.q_a_proj",
            "model.layers.1.self_attn",
            "lm_head",
            "",
        ] {
            assert!(!is_target(origin), "{origin}");
        }
    }

    #[test]
    fn policies_parse() {
        assert_eq!("none".parse(), Ok(RecomputePolicy::None));
        assert_eq!("deepseek_v3".parse(), Ok(RecomputePolicy::DeepSeekV3));
        assert!("all".parse::<RecomputePolicy>().is_err());
    }
}
