//! Finding the GEMMs of every Linear in a training graph, structurally.
//!
//! A Linear at path `P` computes `matmul(x, transpose(W))` with `W` a trainable `[out, in]`
//! parameter (`model::linear`), recorded with origin `P`; autodiff differentiates that node with
//! origin `backward:P` (`autodiff::linalg::matmul`). The rule:
//!
//! 1. **Forward / input gradient**: a `MatMul` whose right operand is a *Linear weight* — a
//!    trainable rank-2 parameter seen through any chain of `Permute`/`Reshape` (and of the
//!    `Cast`/`QuantizeDequantize` this pass adds) — and whose left
//!    operand is not. Forward when its origin is a module path, input gradient
//!    (`cotangent · W`, the right operand being `transpose(transpose(W))`) when its origin is
//!    `backward:…`.
//! 2. **Weight gradient**: a `MatMul` with a `backward` origin from which the gradient output
//!    `grad.<W>` of a rank-2 trainable parameter is reached through `Permute`, `Reshape` and
//!    `Add` only (autodiff writes `dW = permute(xᵀ · cotangent)`, summed over the parameter's
//!    uses). Its operands are `xᵀ` (`[in, tokens]`) and the cotangent (`[tokens, out]`): K is
//!    the token axis.
//! 3. **Grouped expert GEMMs**: a `GroupedMatMul` whose weights are a `Stack` of trainable
//!    parameters (or a rank-3 parameter) seen through `Permute`/`Reshape` — forward or input
//!    gradient by origin, as in 1 — and every `GroupedMatMulWeightGrad`, which only autodiff
//!    emits, for the stacked weights' gradient.
//!
//! The Linear's path is the GEMM's origin without `backward:`. The output head, the embedding
//! and the MoE router match, and are kept above FP8 by name ([`precision_floor`]).
//!
//! Every other `MatMul` multiplies two activations: attention's scores (`q·kᵀ`) and weighted
//! values (`p·v`) and their gradients, which have no parameter operand and feed no gradient
//! output. Those are [`activation_products`], which SPEC §2 keeps in BF16 or FP32.

use std::collections::HashSet;

use crate::graph::{Graph, NodeId, Op};

use super::Precision;

/// Which of a Linear's three GEMMs a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmRole {
    /// `y = x · Wᵀ`.
    Forward,
    /// `dx = dy · W`.
    InputGradient,
    /// `dW = dyᵀ · x`, contracting over tokens.
    WeightGradient,
}

/// How an operand lies relative to the GEMM's contraction axis K, which decides its FP8 tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperandLayout {
    /// An activation or output gradient with K as its last axis (a left operand, or the
    /// `x`/cotangent of a grouped GEMM): tiles of 1×`activation_tile`.
    KLast,
    /// An activation or output gradient with K as its second-to-last axis (the right operand of
    /// a weight-gradient GEMM, `[tokens, out]`): tiles of `activation_tile`×1.
    KRows,
    /// A weight, or stacked expert weights: `weight_block`×`weight_block` blocks.
    Weight,
    /// `[tokens, slots, channels]` operand of a grouped weight gradient, K = each expert's
    /// token-slots. Fine-grained scaling: tiles of `activation_tile`×1 along each expert's K,
    /// which the op applies itself (`ExpertTiles`: the tiles depend on the routing); per-tensor
    /// scaling: one scale over all token-slots.
    TokenSlots,
}

/// One GEMM of a Linear (or of the stacked expert Linears).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearGemm {
    pub node: NodeId,
    pub role: GemmRole,
    /// The Linear's module path: the node's origin without `backward:`.
    pub path: String,
    /// A grouped expert GEMM (`GroupedMatMul` / `GroupedMatMulWeightGrad`).
    pub grouped: bool,
    /// The layouts of operands 0 and 1 (a grouped GEMM's expert ids are not rounded).
    pub operands: [OperandLayout; 2],
}

/// Module names whose GEMMs SPEC §2 keeps above FP8, matched against the last segment of a
/// Linear's path: the output head and the embedding (which a tied head multiplies by) in BF16
/// at most — an FP8 policy runs them in BF16, as DeepSeek-V3 does, and a BF16 one like every
/// other Linear (as `torch.autocast` does) — and the MoE router (`mlp.gate`; the experts'
/// `gate_proj` is an ordinary Linear) in f32 whatever the policy.
const KEPT_IN_BF16: [&str; 2] = ["lm_head", "embed_tokens"];
const KEPT_IN_F32: [&str; 1] = ["gate"];

/// The least precise arithmetic SPEC §2 allows the GEMMs of the Linear at `path`: `Fp32` for
/// the routers, `Bf16` for the head and the embedding, `Fp8` (anything) for the others. A GEMM
/// runs in the more precise of this and its policy's precision.
pub fn precision_floor(path: &str) -> Precision {
    let last = path.rsplit('.').next().unwrap_or(path);
    if KEPT_IN_F32.contains(&last) {
        Precision::Fp32
    } else if KEPT_IN_BF16.contains(&last) {
        Precision::Bf16
    } else {
        Precision::Fp8
    }
}

/// Whether the GEMMs of the Linear at `path` stay in f32 whatever the policy says (the MoE
/// routers).
pub fn is_kept_in_f32(path: &str) -> bool {
    precision_floor(path) == Precision::Fp32
}

/// Every Linear GEMM of `graph`, in node order, kept-in-f32 ones included.
pub fn linear_gemms(graph: &Graph) -> Vec<LinearGemm> {
    let weight_gradients = weight_gradient_matmuls(graph);
    let mut found = Vec::new();
    for (id, node) in graph.node_ids().zip(&graph.nodes) {
        let (backward, path) = split_origin(&node.origin);
        let by_origin = if backward {
            GemmRole::InputGradient
        } else {
            GemmRole::Forward
        };
        use OperandLayout::{KLast, KRows, TokenSlots, Weight};
        let (role, grouped, operands) = match &node.op {
            Op::MatMul { .. } => {
                let (a, b) = (node.inputs[0], node.inputs[1]);
                if is_linear_weight(graph, b) && !is_linear_weight(graph, a) {
                    (by_origin, false, [KLast, Weight])
                } else if backward && weight_gradients.contains(&id) {
                    (GemmRole::WeightGradient, false, [KLast, KRows])
                } else {
                    continue;
                }
            }
            Op::GroupedMatMul { .. } if is_expert_weights(graph, node.inputs[1]) => {
                (by_origin, true, [KLast, Weight])
            }
            Op::GroupedMatMulWeightGrad { .. } => {
                (GemmRole::WeightGradient, true, [TokenSlots, TokenSlots])
            }
            _ => continue,
        };
        found.push(LinearGemm {
            node: id,
            role,
            path: path.to_owned(),
            grouped,
            operands,
        });
    }
    found
}

/// A product of two activations (attention's), with the module path it belongs to: the
/// node's origin without `backward:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivationProduct {
    pub node: NodeId,
    pub path: String,
}

/// Every `MatMul` of `graph` that is none of a Linear's GEMMs, and every causal attention op
/// (forward, statistic, gradient: products of activations inside), in node order.
pub fn activation_products(graph: &Graph) -> Vec<ActivationProduct> {
    let linear: HashSet<NodeId> = linear_gemms(graph).iter().map(|gemm| gemm.node).collect();
    graph
        .node_ids()
        .zip(&graph.nodes)
        .filter(|(id, node)| match node.op {
            Op::MatMul { .. } => !linear.contains(id),
            _ => node.op.attention_config().is_some(),
        })
        .map(|(node, n)| ActivationProduct {
            node,
            path: split_origin(&n.origin).1.to_owned(),
        })
        .collect()
}

/// `(is a backward node, module path)` of an origin: `backward:P` -> `(true, P)`.
fn split_origin(origin: &str) -> (bool, &str) {
    if origin == "backward" {
        (true, "")
    } else if let Some(path) = origin.strip_prefix("backward:") {
        (true, path)
    } else {
        (false, origin)
    }
}

/// The node under any chain of permutes and reshapes (and of the roundings this pass inserts,
/// so that a rewritten graph is read the same way).
fn through_movements(graph: &Graph, mut id: NodeId) -> NodeId {
    while let Op::Permute { .. }
    | Op::Reshape { .. }
    | Op::Cast { .. }
    | Op::QuantizeDequantize { .. } = graph.node(id).op
    {
        id = graph.node(id).inputs[0];
    }
    id
}

fn is_trainable_of_rank(graph: &Graph, id: NodeId, rank: usize) -> bool {
    graph.is_trainable(id) && graph.ty(id).rank() == rank
}

/// A trainable `[out, in]` parameter, possibly transposed or reshaped.
fn is_linear_weight(graph: &Graph, id: NodeId) -> bool {
    is_trainable_of_rank(graph, through_movements(graph, id), 2)
}

/// Stacked expert weights `[experts, n, k]`, possibly transposed.
fn is_expert_weights(graph: &Graph, id: NodeId) -> bool {
    let source = through_movements(graph, id);
    match &graph.node(source).op {
        Op::Stack => graph
            .node(source)
            .inputs
            .iter()
            .all(|&part| is_trainable_of_rank(graph, part, 2)),
        _ => is_trainable_of_rank(graph, source, 3),
    }
}

/// The `MatMul`s that the gradient outputs of rank-2 trainable parameters are made of, through
/// permutes, reshapes and sums.
fn weight_gradient_matmuls(graph: &Graph) -> HashSet<NodeId> {
    let mut found = HashSet::new();
    let mut seen = HashSet::new();
    for (param, name, ty) in graph.parameters() {
        if !graph.is_trainable(param) || ty.rank() != 2 {
            continue;
        }
        let Some(gradient) = graph.output(&format!("grad.{name}")) else {
            continue;
        };
        let mut stack = vec![gradient];
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            let node = graph.node(id);
            match &node.op {
                Op::MatMul { .. } => {
                    found.insert(id);
                }
                Op::Permute { .. }
                | Op::Reshape { .. }
                | Op::Binary(crate::graph::BinaryOp::Add) => stack.extend(&node.inputs),
                _ => {}
            }
        }
    }
    found
}
