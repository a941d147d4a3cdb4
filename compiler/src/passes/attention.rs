//! Causal attention written as the primitives it is made of, for a backend that has no fused
//! attention (the CPU) or a form of it the backend does not run.
//!
//! [`expand_attention`] replaces each `CausalAttention`, `CausalAttentionLse` and
//! `CausalAttentionGrad` the caller does not keep by:
//!
//! - the forward: the scores `q · kᵀ` as a lower-triangular product, scaled, the entries above
//!   the diagonal replaced by the lowest f32 (exactly zero weight), a softmax, and the
//!   probabilities times the values read as a lower triangle, heads before tokens;
//! - the statistic: `max + log Σ exp(scores − max)` of the same scores;
//! - a gradient: the forward's primitives differentiated by autodiff ([`vjp`]) for the
//!   cotangent, all four operands' gradients at once for the first of an attention's
//!   gradients, which its others then read.
//!
//! Expansions of the same operands share their primitives: the forward's, when the gradient
//! is in the same graph (a training step), else (a pipeline's backward phase, which receives
//! the operands but not the forward's values) a forward of the gradient's own. What is left is
//! what differentiating the primitives would have given.
//!
//! With `products_in` (bf16), every product the expansion writes reads bf16-rounded operands,
//! as the precision pass rounds attention's products (`precision::round_products_in_bf16`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use crate::autodiff::{forward_origin, vjp};
use crate::dtype::{DType, TensorType};
use crate::error::GraphError;
use crate::graph::{
    AttentionConfig, Graph, GraphBuilder, MatMulPart, Node, NodeId, Op, Tensor, Triangle,
    Triangular,
};
use crate::precision::round_products_in_bf16;

/// `graph` with every attention op that `keep` refuses expanded into primitives (see the module
/// docs); `graph` itself when there is none. The other nodes, their order and origins, and the
/// outputs are kept.
///
/// Errors: an op whose products read a type other than bf16 (the one rounding the precision
/// pass asks for).
pub fn expand_attention(
    graph: &Graph,
    keep: impl Fn(&Graph, &Node) -> bool,
) -> Result<Cow<'_, Graph>, GraphError> {
    let expands = |node: &Node| node.op.attention_config().is_some() && !keep(graph, node);
    if !graph.nodes.iter().any(expands) {
        return Ok(Cow::Borrowed(graph));
    }
    let mut expansion = Expansion {
        g: GraphBuilder::new(graph.name.clone()),
        masks: HashMap::new(),
        forwards: HashMap::new(),
        gradients: HashMap::new(),
        rounded_products: HashSet::new(),
    };
    let mut new_ids: Vec<Tensor> = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let inputs: Vec<Tensor> = node.inputs.iter().map(|i| new_ids[i.index()]).collect();
        let t = if expands(node) {
            expansion.expand(node, &inputs)?
        } else {
            let declared = node.inputs.is_empty().then(|| node.ty.clone());
            let op = node.op.clone();
            expansion
                .g
                .within(&node.origin, |g| g.push(op, &inputs, declared))?
        };
        new_ids.push(t);
    }
    let mut g = expansion.g;
    for output in &graph.outputs {
        g.output(&output.name, new_ids[output.node.index()])?;
    }
    let expanded = g.finish();
    Ok(Cow::Owned(if expansion.rounded_products.is_empty() {
        expanded
    } else {
        round_products_in_bf16(&expanded, &expansion.rounded_products)?
    }))
}

struct Expansion {
    g: GraphBuilder,
    /// One causal mask per sequence length, made at its first use.
    masks: HashMap<usize, Tensor>,
    /// The forward primitives of each attention's operands.
    forwards: HashMap<AttentionKey, Forward>,
    /// The four operands' gradients of an attention for a cotangent.
    gradients: HashMap<(AttentionKey, Tensor), Vec<Tensor>>,
    /// The products whose operands are rounded to bf16 afterwards.
    rounded_products: HashSet<NodeId>,
}

impl Expansion {
    fn expand(&mut self, node: &Node, inputs: &[Tensor]) -> Result<Tensor, GraphError> {
        let config = *node.op.attention_config().expect("an attention op");
        let first_new = self.g.graph().nodes.len();
        let operands = [inputs[0], inputs[1], inputs[2], inputs[3]];
        let result = match &node.op {
            Op::CausalAttention(_) => self.forward(&node.origin, operands, config)?.out,
            Op::CausalAttentionLse(_) => {
                let forward = self.forward(&node.origin, operands, config)?;
                self.g
                    .within(&node.origin, |g| log_sum_exp(g, forward.scores))?
            }
            Op::CausalAttentionGrad { operand, .. } => {
                let forward = self.forward(forward_origin(&node.origin), operands, config)?;
                let key = (AttentionKey::of(operands, config), inputs[6]);
                if !self.gradients.contains_key(&key) {
                    // `vjp` records each gradient node with the origin of what it
                    // differentiates.
                    let all = vjp(&mut self.g, forward.out, key.1, &operands)?;
                    self.gradients.insert(key, all);
                }
                self.gradients[&key][operand.index()]
            }
            _ => unreachable!("attention_config is set for attention ops only"),
        };
        match config.products_in {
            None => {}
            Some(DType::BF16) => {
                let graph = self.g.graph();
                self.rounded_products.extend(
                    (first_new..graph.nodes.len())
                        .map(|i| NodeId(i as u32))
                        .filter(|&id| matches!(graph.node(id).op, Op::MatMul { .. })),
                );
            }
            Some(other) => {
                return Err(GraphError::InvalidRequest(format!(
                    "expanding {} {}: its products read {other} operands; only bf16 is \
                     supported",
                    node.op.name(),
                    node.origin
                )));
            }
        }
        Ok(result)
    }

    /// The forward's primitives, recorded with `origin` when they are made.
    fn forward(
        &mut self,
        origin: &str,
        operands: [Tensor; 4],
        config: AttentionConfig,
    ) -> Result<Forward, GraphError> {
        let key = AttentionKey::of(operands, config);
        if let Some(&done) = self.forwards.get(&key) {
            return Ok(done);
        }
        let [q, k_nope, k_rope, v] = operands;
        let tokens = self.g.dims(q)[1];
        let mask = match self.masks.get(&tokens) {
            Some(&mask) => mask,
            None => {
                let mask = self.g.within("", |g| causal_mask(g, tokens))?;
                self.masks.insert(tokens, mask);
                mask
            }
        };
        self.g
            .within(origin, |g| {
                let (b, t, h, _) = dims4(g, q);
                let rope = g.dims(k_rope)[2];
                let heads_first = [0, 2, 1, 3];
                // Heads before tokens: [b, h, t, ·].
                let query = g.permute(q, &heads_first)?;
                let k_nope = g.permute(k_nope, &heads_first)?;
                let value = g.permute(v, &heads_first)?;
                // One rope key per token, shared by every head.
                let k_rope = g.reshape(k_rope, &[b, 1, t, rope])?;
                let k_rope = g.expand(k_rope, &[b, h, t, rope])?;
                let key = g.concat(&[k_nope, k_rope], 3)?;

                // The mask keeps the lower triangle: the scores above it are never read, so they
                // need not be computed (they are zeros), and the probabilities there are exactly
                // zero, so the weighted sum reads them as a lower triangle. A backend may skip up
                // to half of either product, and of their gradients.
                let causal = |part| Some(Triangular::new(part, Triangle::Lower));
                let key_t = g.transpose(key)?;
                let scores = g.matmul_triangular(query, key_t, causal(MatMulPart::Output))?;
                let scores = g.scale(scores, config.scale)?;
                // Masked scores become the lowest f32, as HF's additive mask makes them, so they
                // get exactly zero weight.
                let lowest = g.scalar(f32::MIN as f64, DType::F32)?;
                let scores = g.select(mask, scores, lowest)?;
                let probs = g.softmax(scores)?;
                let out = g.matmul_triangular(probs, value, causal(MatMulPart::Left))?;
                let out = g.permute(out, &heads_first)?;
                Ok(Forward { scores, out })
            })
            .inspect(|done| {
                self.forwards.insert(key, *done);
            })
    }
}

/// An attention's operands and configuration (its scale's bits: a key must be `Eq`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AttentionKey {
    operands: [Tensor; 4],
    scale: u64,
    products_in: Option<DType>,
}

impl AttentionKey {
    fn of(operands: [Tensor; 4], config: AttentionConfig) -> Self {
        AttentionKey {
            operands,
            scale: config.scale.to_bits(),
            products_in: config.products_in,
        }
    }
}

/// What a forward expansion leaves for the others to read.
#[derive(Clone, Copy)]
struct Forward {
    /// `[b, h, t, t]`: scaled, the lowest f32 above the diagonal.
    scores: Tensor,
    /// `[b, t, h, dv]`.
    out: Tensor,
}

fn dims4(g: &GraphBuilder, x: Tensor) -> (usize, usize, usize, usize) {
    let d = g.dims(x);
    (d[0], d[1], d[2], d[3])
}

/// `bool [t, t]`, true where query `i` may attend to key `j` (`j <= i`).
fn causal_mask(g: &mut GraphBuilder, tokens: usize) -> Result<Tensor, GraphError> {
    let mask: Vec<f64> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j <= i { 1.0 } else { 0.0 }))
        .collect();
    let ty = TensorType::new(DType::Bool, [tokens, tokens]);
    g.constant("causal_mask", ty, mask)
}

/// `[b, h, t]`: `max + log Σ exp(scores − max)` over each row of `[b, h, t, t]` scores, with
/// the nodes a softmax of them computes (common-subexpression elimination merges them).
fn log_sum_exp(g: &mut GraphBuilder, scores: Tensor) -> Result<Tensor, GraphError> {
    let (b, h, t, _) = dims4(g, scores);
    let max = g.reduce(crate::graph::ReduceOp::Max, scores, 3, true)?;
    let shifted = g.sub(scores, max)?;
    let e = g.exp(shifted)?;
    let sum = g.reduce(crate::graph::ReduceOp::Sum, e, 3, true)?;
    let log = g.unary(crate::graph::UnaryOp::Log, sum)?;
    let lse = g.add(max, log)?;
    g.reshape(lse, &[b, h, t])
}
