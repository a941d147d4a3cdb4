//! Reverse-mode automatic differentiation as a graph transform.
//!
//! [`backward`] appends to a graph the nodes that compute the gradient of a scalar loss with
//! respect to chosen nodes (typically every trainable parameter), written with the same closed
//! set of ops as the forward pass, so every later stage (the interpreter, fusion, code
//! generation) runs the backward pass as it runs the forward one.
//!
//! Semantics are PyTorch's (`torch.autograd`), so gradients match the Hugging Face model's:
//! - only nodes on a path `loss <- ... <- wrt` are differentiated, users before operands
//!   (reverse id order); a node used several times sums its cotangents (left to right, in
//!   the order its users were visited) just before its own rule;
//! - integer and bool values carry no gradient: `TopK`, `OneHot` (its operand is integer),
//!   `Compare`, the indices of `Gather`, `TakeAlong` and `GroupedMatMul`, the condition of
//!   `Select`, casts from or to non-float types. Routing decisions are therefore constants of
//!   the backward pass; the gradient flows through the gate values `take_along(scores,
//!   experts)`, exactly as in torch;
//! - `Input`, `Constant` and `Parameter` are leaves; a buffer (`trainable: false`) is never a
//!   gradient target unless asked for explicitly in `wrt`;
//! - ties: `max`/`min` split the cotangent half and half between equal operands
//!   (`torch.maximum`); a max reduction splits it evenly among the positions equal to the
//!   maximum (`torch.amax`);
//! - gradients have the type of the node they are for, and are computed in that node's
//!   element type (a bf16 forward gets a bf16 backward).
//!
//! The rules, one per op, are in `elementwise.rs`, `linalg.rs`, `movement.rs` and
//! `indexing.rs`; each names its formula. The weight gradient of a grouped matmul needs an op
//! of its own, [`Op::GroupedMatMulWeightGrad`]; everything else is written with forward ops
//! (a gather's scatter-add, for one, is a one-hot matmul).
//!
//! Backward nodes record the origin of the forward node they differentiate, prefixed:
//! `backward:model.layers.0.mlp` (`backward` for top-level nodes), so the printed graph shows
//! where the backward pass starts and which module each part of it belongs to.

mod elementwise;
mod indexing;
mod linalg;
mod movement;
mod reduce_to;
#[cfg(test)]
mod tests;

use crate::error::GraphError;
use crate::graph::{Graph, GraphBuilder, NodeId, Op, Tensor};

/// The result of [`backward`].
#[derive(Clone, Debug, PartialEq)]
pub struct Backward {
    /// The forward graph with the gradient nodes appended (the forward nodes keep their ids).
    pub graph: Graph,
    /// For each requested node, in the order asked: `(wrt, gradient)`, the gradient having the
    /// wrt node's type.
    pub gradients: Vec<(NodeId, NodeId)>,
}

/// The origin recorded on the backward nodes of a forward node from `origin`.
pub fn backward_origin(origin: &str) -> String {
    if origin.is_empty() {
        "backward".to_owned()
    } else {
        format!("backward:{origin}")
    }
}

/// The origin of the forward node whose backward nodes carry `origin`: [`backward_origin`]
/// undone (an origin that is not a backward one is returned as it is).
pub fn forward_origin(origin: &str) -> &str {
    match origin {
        "backward" => "",
        _ => origin.strip_prefix("backward:").unwrap_or(origin),
    }
}

/// The gradients of `loss` (a scalar float node) with respect to the `wrt` nodes, appended to
/// the graph as new nodes; returns the extended graph and, for each wrt node, its gradient
/// node (same type as the wrt node). A wrt node that the loss does not depend on (or only
/// through integer values) gets a zero gradient: an `expand` of a scalar 0 constant.
///
/// Errors: `loss` or a wrt node outside the graph, a loss that is not a float scalar, a wrt
/// node that is not floating point ([`GraphError::InvalidRequest`]).
pub fn backward(graph: Graph, loss: NodeId, wrt: &[NodeId]) -> Result<Backward, GraphError> {
    check_request(&graph, loss, wrt)?;
    let mut g = GraphBuilder::from_graph(graph);
    let seed = |g: &mut GraphBuilder| {
        let node = g.graph().node(loss);
        let (dtype, origin) = (node.ty.dtype, backward_origin(&node.origin));
        g.within(&origin, |g| g.scalar(1.0, dtype))
    };
    let wrt_tensors: Vec<Tensor> = wrt.iter().map(|&w| Tensor(w)).collect();
    let gradients = differentiate(&mut g, loss, seed, &wrt_tensors)?;
    Ok(Backward {
        graph: g.finish(),
        gradients: wrt
            .iter()
            .zip(gradients)
            .map(|(&w, gradient)| (w, gradient.id()))
            .collect(),
    })
}

/// The vector-Jacobian product of `output` for its `cotangent` (of `output`'s type) with
/// respect to the `wrt` nodes, appended to `g`: what [`backward`] computes for the loss
/// `Σ output ⊙ cotangent` without building that loss. The compiler's expansions use it to
/// write a fused op's gradient as the autodiff of the primitives the op is made of.
pub fn vjp(
    g: &mut GraphBuilder,
    output: Tensor,
    cotangent: Tensor,
    wrt: &[Tensor],
) -> Result<Vec<Tensor>, GraphError> {
    if g.graph().ty(output.id()) != g.graph().ty(cotangent.id()) {
        return Err(GraphError::InvalidRequest(format!(
            "autodiff: the cotangent {} of {} must have its type {}",
            cotangent.id(),
            output.id(),
            g.graph().ty(output.id())
        )));
    }
    differentiate(g, output.id(), |_| Ok(cotangent), wrt)
}

/// Appends to `g` the gradients of `output` with respect to `wrt`, for the cotangent `seed`
/// makes (called only when `output` depends on a wrt node). A wrt node that `output` does not
/// depend on (or only through integer values) gets a zero gradient: an `expand` of a scalar 0
/// constant.
fn differentiate(
    g: &mut GraphBuilder,
    output: NodeId,
    seed: impl FnOnce(&mut GraphBuilder) -> Result<Tensor, GraphError>,
    wrt: &[Tensor],
) -> Result<Vec<Tensor>, GraphError> {
    let wrt_ids: Vec<NodeId> = wrt.iter().map(|w| w.id()).collect();
    let active = active_nodes(g.graph(), output, &wrt_ids);
    let len = output.index() + 1;
    // Each active node's cotangent contributions, one per use, in the order its users were
    // visited; summed when the node itself is visited (after all its users), so the sum is
    // recorded with the node's own origin, next to the node's rule.
    let mut contributions: Vec<Vec<Tensor>> = vec![Vec::new(); len];
    let mut cotangents: Vec<Option<Tensor>> = vec![None; len];
    if active[output.index()] {
        contributions[output.index()].push(seed(g)?);
    }

    for index in (0..len).rev() {
        if !active[index] {
            continue;
        }
        let node = g.graph().nodes[index].clone();
        let origin = backward_origin(&node.origin);
        let parts = std::mem::take(&mut contributions[index]);
        let Some(cot) = g.within(&origin, |g| sum_all(g, &parts))? else {
            continue;
        };
        cotangents[index] = Some(cot);
        let wanted: Vec<bool> = node
            .inputs
            .iter()
            .enumerate()
            .map(|(k, input)| flows_through(&node.op, k) && active[input.index()])
            .collect();
        if !wanted.contains(&true) {
            continue;
        }
        let inputs: Vec<Tensor> = node.inputs.iter().map(|&i| Tensor(i)).collect();
        let adjoint = Adjoint {
            op: &node.op,
            inputs: &inputs,
            out: Tensor(NodeId(index as u32)),
            cot,
            wanted: &wanted,
        };
        let results = g.within(&origin, |g| rule(g, &adjoint))?;
        for ((input, result), wanted) in node.inputs.iter().zip(results).zip(&wanted) {
            if let Some(contribution) = result.filter(|_| *wanted) {
                contributions[input.index()].push(contribution);
            }
        }
    }

    let mut gradients = Vec::with_capacity(wrt.len());
    for &w in &wrt_ids {
        let gradient = match cotangents.get(w.index()).copied().flatten() {
            Some(cot) if active[w.index()] => cot,
            _ => {
                let node = g.graph().node(w);
                let (ty, origin) = (node.ty.clone(), backward_origin(&node.origin));
                g.within(&origin, |g| reduce_to::zeros(g, ty.dtype, ty.dims()))?
            }
        };
        gradients.push(gradient);
    }
    Ok(gradients)
}

/// [`backward`] with respect to every trainable parameter, in declaration order, each gradient
/// also named as a graph output `grad.<parameter name>`
/// (`grad.model.layers.0.self_attn.o_proj.weight`).
pub fn backward_parameters(graph: Graph, loss: NodeId) -> Result<Backward, GraphError> {
    let (wrt, names): (Vec<NodeId>, Vec<String>) = graph
        .parameters()
        .filter(|(id, _, _)| graph.is_trainable(*id))
        .map(|(id, name, _)| (id, format!("grad.{name}")))
        .unzip();
    let Backward { graph, gradients } = backward(graph, loss, &wrt)?;
    let mut g = GraphBuilder::from_graph(graph);
    for (name, &(_, gradient)) in names.iter().zip(&gradients) {
        g.output(name, Tensor(gradient))?;
    }
    Ok(Backward {
        graph: g.finish(),
        gradients,
    })
}

/// `parts[0] + parts[1] + ...`, added left to right; `None` for no parts.
fn sum_all(g: &mut GraphBuilder, parts: &[Tensor]) -> Result<Option<Tensor>, GraphError> {
    let Some((&first, rest)) = parts.split_first() else {
        return Ok(None);
    };
    let mut total = first;
    for &part in rest {
        total = g.add(total, part)?;
    }
    Ok(Some(total))
}

fn check_request(graph: &Graph, loss: NodeId, wrt: &[NodeId]) -> Result<(), GraphError> {
    let len = graph.nodes.len();
    let bad = |what: &str| GraphError::InvalidRequest(format!("autodiff: {what}"));
    if let Some(id) = std::iter::once(&loss)
        .chain(wrt)
        .find(|id| id.index() >= len)
    {
        return Err(bad(&format!(
            "node {id} is not in the graph, which has {len} nodes"
        )));
    }
    let loss_ty = graph.ty(loss);
    if loss_ty.rank() != 0 || !loss_ty.dtype.is_float() {
        return Err(bad(&format!(
            "the loss {loss} must be a float scalar, not {loss_ty}"
        )));
    }
    if let Some(id) = wrt.iter().find(|id| !graph.ty(**id).dtype.is_float()) {
        let ty = graph.ty(*id);
        return Err(bad(&format!(
            "cannot differentiate with respect to {id} of type {ty}"
        )));
    }
    Ok(())
}

/// Whether a gradient flows from the op's result into operand `k`: not into indices, expert
/// ids, conditions, nor through ops whose result or operand is integer or bool.
fn flows_through(op: &Op, k: usize) -> bool {
    match op {
        Op::Input { .. } | Op::Parameter { .. } | Op::Constant(_) => false,
        Op::Compare(_) | Op::TopK { .. } | Op::OneHot { .. } | Op::StopGradient => false,
        Op::Select => k > 0,
        Op::Gather | Op::TakeAlong { .. } | Op::IndexAdd { .. } => k == 0,
        Op::CrossEntropy => k == 0,
        // Not into the labels; differentiating it is refused by `rule`.
        Op::CrossEntropyGrad => k != 1,
        Op::CausalAttention(_) => true,
        // Refused by `rule`.
        Op::CausalAttentionLse(_) | Op::CausalAttentionGrad { .. } => true,
        Op::GroupedMatMul { .. } | Op::GroupedMatMulWeightGrad { .. } => k < 2,
        Op::Cast { .. } => true, // both types are checked to be float by `active_nodes`
        Op::QuantizeDequantize { .. } => true, // straight through
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Reduce { .. }
        | Op::MatMul { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Expand { .. }
        | Op::Slice { .. }
        | Op::Concat { .. }
        | Op::Stack => true,
    }
}

/// The nodes on a path `loss <- ... <- wrt` along which a gradient flows: float nodes that
/// depend on a wrt node through float edges ([`flows_through`]), and that the loss depends on
/// the same way.
fn active_nodes(graph: &Graph, loss: NodeId, wrt: &[NodeId]) -> Vec<bool> {
    let len = loss.index() + 1;
    let mut depends = vec![false; len];
    for w in wrt.iter().filter(|w| w.index() < len) {
        depends[w.index()] = true;
    }
    for (i, node) in graph.nodes[..len].iter().enumerate() {
        if node.ty.dtype.is_float() && !depends[i] {
            depends[i] = node.inputs.iter().enumerate().any(|(k, input)| {
                flows_through(&node.op, k)
                    && depends[input.index()]
                    && graph.ty(*input).dtype.is_float()
            });
        }
    }
    let mut active = vec![false; len];
    active[loss.index()] = depends[loss.index()];
    for (i, node) in graph.nodes[..len].iter().enumerate().rev() {
        if active[i] {
            for (k, input) in node.inputs.iter().enumerate() {
                if flows_through(&node.op, k) && depends[input.index()] {
                    active[input.index()] = true;
                }
            }
        }
    }
    active
}

/// What a rule sees: the forward node, its result and the result's cotangent.
struct Adjoint<'a> {
    op: &'a Op,
    inputs: &'a [Tensor],
    out: Tensor,
    cot: Tensor,
    /// Which operands need a cotangent; a rule may skip the others (and returns `None` there).
    wanted: &'a [bool],
}

/// The cotangent contributions of a node's operands, one per operand (`None`: no gradient).
fn rule(g: &mut GraphBuilder, a: &Adjoint<'_>) -> Result<Vec<Option<Tensor>>, GraphError> {
    match a.op {
        Op::Unary(op) => elementwise::unary(g, *op, a),
        Op::Binary(op) => elementwise::binary(g, *op, a),
        Op::Select => elementwise::select(g, a),
        Op::Cast { .. } => elementwise::cast(g, a),
        Op::QuantizeDequantize { .. } => elementwise::straight_through(a),
        Op::Reduce { op, axis, keep_dim } => elementwise::reduce(g, *op, *axis, *keep_dim, a),
        Op::MatMul { triangular, .. } => linalg::matmul(g, *triangular, a),
        Op::GroupedMatMul { .. } => linalg::grouped_matmul(g, a),
        Op::GroupedMatMulWeightGrad { .. } => linalg::grouped_matmul_weight_grad(g, a),
        Op::Reshape { .. } => movement::reshape(g, a),
        Op::Permute { perm } => movement::permute(g, perm, a),
        Op::Expand { .. } => movement::expand(g, a),
        Op::Slice { axis, start, end } => movement::slice(g, *axis, *start, *end, a),
        Op::Concat { axis } => movement::concat(g, *axis, a),
        Op::Stack => movement::stack(g, a),
        Op::Gather => indexing::gather(g, a),
        Op::IndexAdd { .. } => indexing::index_add(g, a),
        Op::TakeAlong { axis } => indexing::take_along(g, *axis, a),
        Op::CrossEntropy => {
            let (logits, labels) = (a.inputs[0], a.inputs[1]);
            let grad = g.cross_entropy_grad(logits, labels, a.out, a.cot)?;
            Ok(vec![Some(grad), None])
        }
        Op::CrossEntropyGrad => Err(GraphError::InvalidRequest(
            "second derivatives of cross_entropy are not supported (its gradient, \
             cross_entropy_grad, has no derivative rule)"
                .into(),
        )),
        Op::CausalAttention(config) => linalg::causal_attention(g, *config, a),
        Op::CausalAttentionLse(_) | Op::CausalAttentionGrad { .. } => {
            Err(GraphError::InvalidRequest(format!(
                "second derivatives of causal_attention are not supported ({} has no \
                 derivative rule)",
                a.op.name()
            )))
        }
        Op::Input { .. }
        | Op::Parameter { .. }
        | Op::Constant(_)
        | Op::Compare(_)
        | Op::TopK { .. }
        | Op::OneHot { .. }
        | Op::StopGradient => Ok(vec![None; a.inputs.len()]),
    }
}
