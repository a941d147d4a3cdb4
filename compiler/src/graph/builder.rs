//! Building graphs: one method per op, each checked by inference as it is added.

use std::collections::HashMap;

use crate::dtype::{DType, Shape, TensorType};
use crate::error::GraphError;

use super::infer::infer_type;
use super::op::{
    Accumulation, AttentionConfig, BinaryOp, CompareOp, ConstantData, Op, QuantFormat, ReduceOp,
    UnaryOp,
};
use super::{Graph, Node, NodeId, Output};

/// A handle to a node of the graph being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tensor(pub NodeId);

impl Tensor {
    pub fn id(self) -> NodeId {
        self.0
    }
}

/// Builds a [`Graph`]. Every method infers the new node's type and fails with an error naming
/// the node, its origin and the operand types when the operands do not fit.
#[derive(Debug)]
pub struct GraphBuilder {
    graph: Graph,
    /// The origin recorded on new nodes (see [`GraphBuilder::within`]).
    origin: String,
    leaf_names: HashMap<String, NodeId>,
}

impl GraphBuilder {
    pub fn new(name: impl Into<String>) -> Self {
        GraphBuilder {
            graph: Graph {
                name: name.into(),
                ..Graph::default()
            },
            origin: String::new(),
            leaf_names: HashMap::new(),
        }
    }

    /// Continues building on `graph`: new nodes are appended after its nodes, and its inputs
    /// and parameters keep their names (a new leaf may not reuse one).
    pub fn from_graph(graph: Graph) -> Self {
        let leaf_names = graph
            .node_ids()
            .filter_map(|id| match &graph.node(id).op {
                Op::Input { name } | Op::Parameter { name, .. } => Some((name.clone(), id)),
                _ => None,
            })
            .collect();
        GraphBuilder {
            graph,
            origin: String::new(),
            leaf_names,
        }
    }

    /// The graph so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn finish(self) -> Graph {
        self.graph
    }

    pub fn ty(&self, t: Tensor) -> &TensorType {
        self.graph.ty(t.0)
    }

    pub fn dims(&self, t: Tensor) -> &[usize] {
        self.ty(t).dims()
    }

    pub fn dtype(&self, t: Tensor) -> DType {
        self.ty(t).dtype
    }

    /// Runs `body` with `origin` recorded on every node it adds, then restores the previous one.
    /// Modules call this with their checkpoint path so nodes say where they came from.
    pub fn within<T>(
        &mut self,
        origin: &str,
        body: impl FnOnce(&mut Self) -> Result<T, GraphError>,
    ) -> Result<T, GraphError> {
        let saved = std::mem::replace(&mut self.origin, origin.to_owned());
        let result = body(self);
        self.origin = saved;
        result
    }

    /// Appends a node after inferring its type (`declared` for leaves).
    pub fn push(
        &mut self,
        op: Op,
        inputs: &[Tensor],
        declared: Option<TensorType>,
    ) -> Result<Tensor, GraphError> {
        let id = NodeId(self.graph.nodes.len() as u32);
        let operand_types: Vec<&TensorType> = inputs.iter().map(|t| self.ty(*t)).collect();
        let ty = infer_type(&op, &operand_types, declared.as_ref()).map_err(|detail| {
            GraphError::Invalid {
                node: id,
                op: op.name(),
                origin: self.origin.clone(),
                detail,
            }
        })?;
        self.graph.nodes.push(Node {
            op,
            inputs: inputs.iter().map(|t| t.0).collect(),
            ty,
            origin: self.origin.clone(),
        });
        Ok(Tensor(id))
    }

    fn leaf(
        &mut self,
        kind: &'static str,
        op: Op,
        name: &str,
        ty: TensorType,
    ) -> Result<Tensor, GraphError> {
        if self.leaf_names.contains_key(name) {
            return Err(GraphError::DuplicateName {
                kind,
                name: name.to_owned(),
            });
        }
        let t = self.push(op, &[], Some(ty))?;
        self.leaf_names.insert(name.to_owned(), t.0);
        Ok(t)
    }

    /// A run-time input such as `input_ids`.
    pub fn input(&mut self, name: &str, ty: TensorType) -> Result<Tensor, GraphError> {
        let op = Op::Input { name: name.into() };
        self.leaf("input", op, name, ty)
    }

    /// A trainable parameter with its checkpoint name (`model.layers.0.self_attn.o_proj.weight`).
    pub fn parameter(&mut self, name: &str, ty: TensorType) -> Result<Tensor, GraphError> {
        let op = Op::Parameter {
            name: name.into(),
            trainable: true,
        };
        self.leaf("parameter", op, name, ty)
    }

    /// A tensor loaded with the weights but not trained by gradients (a PyTorch buffer).
    pub fn buffer(&mut self, name: &str, ty: TensorType) -> Result<Tensor, GraphError> {
        let op = Op::Parameter {
            name: name.into(),
            trainable: false,
        };
        self.leaf("parameter", op, name, ty)
    }

    /// Values known now: RoPE tables, masks.
    pub fn constant(
        &mut self,
        label: &str,
        ty: TensorType,
        values: Vec<f64>,
    ) -> Result<Tensor, GraphError> {
        let data = ConstantData {
            label: label.into(),
            values,
        };
        self.push(Op::Constant(data), &[], Some(ty))
    }

    /// A scalar of the given element type.
    pub fn scalar(&mut self, value: f64, dtype: DType) -> Result<Tensor, GraphError> {
        self.constant(
            "scalar",
            TensorType::new(dtype, Shape::scalar()),
            vec![value],
        )
    }

    /// Names a result of the graph.
    pub fn output(&mut self, name: &str, t: Tensor) -> Result<(), GraphError> {
        if self.graph.outputs.iter().any(|o| o.name == name) {
            return Err(GraphError::DuplicateName {
                kind: "output",
                name: name.into(),
            });
        }
        self.graph.outputs.push(Output {
            name: name.into(),
            node: t.0,
        });
        Ok(())
    }

    pub fn unary(&mut self, op: UnaryOp, x: Tensor) -> Result<Tensor, GraphError> {
        self.push(Op::Unary(op), &[x], None)
    }

    pub fn binary(&mut self, op: BinaryOp, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.push(Op::Binary(op), &[a, b], None)
    }

    pub fn compare(&mut self, op: CompareOp, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.push(Op::Compare(op), &[a, b], None)
    }

    pub fn add(&mut self, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.binary(BinaryOp::Add, a, b)
    }

    pub fn sub(&mut self, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.binary(BinaryOp::Sub, a, b)
    }

    pub fn mul(&mut self, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.binary(BinaryOp::Mul, a, b)
    }

    pub fn div(&mut self, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.binary(BinaryOp::Div, a, b)
    }

    /// `x * value`, with the scalar in `x`'s element type.
    pub fn scale(&mut self, x: Tensor, value: f64) -> Result<Tensor, GraphError> {
        let s = self.scalar(value, self.dtype(x))?;
        self.mul(x, s)
    }

    /// `x + value`, with the scalar in `x`'s element type.
    pub fn offset(&mut self, x: Tensor, value: f64) -> Result<Tensor, GraphError> {
        let s = self.scalar(value, self.dtype(x))?;
        self.add(x, s)
    }

    pub fn neg(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        self.unary(UnaryOp::Neg, x)
    }

    pub fn exp(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        self.unary(UnaryOp::Exp, x)
    }

    pub fn rsqrt(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        self.unary(UnaryOp::Rsqrt, x)
    }

    pub fn sigmoid(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        self.unary(UnaryOp::Sigmoid, x)
    }

    /// `x * sigmoid(x)`.
    pub fn silu(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        let s = self.sigmoid(x)?;
        self.mul(x, s)
    }

    pub fn select(&mut self, cond: Tensor, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.push(Op::Select, &[cond, a, b], None)
    }

    pub fn cast(&mut self, x: Tensor, to: DType) -> Result<Tensor, GraphError> {
        self.push(Op::Cast { to }, &[x], None)
    }

    /// `x`, through which no gradient flows (see [`Op::StopGradient`]).
    pub fn stop_gradient(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        self.push(Op::StopGradient, &[x], None)
    }

    pub fn reduce(
        &mut self,
        op: ReduceOp,
        x: Tensor,
        axis: usize,
        keep_dim: bool,
    ) -> Result<Tensor, GraphError> {
        self.push(Op::Reduce { op, axis, keep_dim }, &[x], None)
    }

    /// The last axis of `x` (0 for a scalar, which every reduction then rejects).
    pub fn last_axis(&self, x: Tensor) -> usize {
        self.ty(x).rank().saturating_sub(1)
    }

    pub fn matmul(&mut self, a: Tensor, b: Tensor) -> Result<Tensor, GraphError> {
        self.matmul_triangular(a, b, None)
    }

    /// A matmul with one operand read, or the result kept, as a triangular matrix (see
    /// [`crate::graph::Triangular`]); `None` is [`GraphBuilder::matmul`].
    pub fn matmul_triangular(
        &mut self,
        a: Tensor,
        b: Tensor,
        triangular: Option<crate::graph::Triangular>,
    ) -> Result<Tensor, GraphError> {
        let op = Op::MatMul {
            accumulation: Accumulation::Exact,
            triangular,
        };
        self.push(op, &[a, b], None)
    }

    pub fn reshape(&mut self, x: Tensor, shape: &[usize]) -> Result<Tensor, GraphError> {
        self.push(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
            None,
        )
    }

    pub fn permute(&mut self, x: Tensor, perm: &[usize]) -> Result<Tensor, GraphError> {
        self.push(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
            None,
        )
    }

    /// Swaps the last two axes.
    pub fn transpose(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        let rank = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..rank).collect();
        if rank >= 2 {
            perm.swap(rank - 1, rank - 2);
        }
        self.permute(x, &perm)
    }

    pub fn expand(&mut self, x: Tensor, shape: &[usize]) -> Result<Tensor, GraphError> {
        self.push(
            Op::Expand {
                shape: shape.to_vec(),
            },
            &[x],
            None,
        )
    }

    pub fn slice(
        &mut self,
        x: Tensor,
        axis: usize,
        start: usize,
        end: usize,
    ) -> Result<Tensor, GraphError> {
        self.push(Op::Slice { axis, start, end }, &[x], None)
    }

    pub fn concat(&mut self, parts: &[Tensor], axis: usize) -> Result<Tensor, GraphError> {
        self.push(Op::Concat { axis }, parts, None)
    }

    pub fn gather(&mut self, table: Tensor, indices: Tensor) -> Result<Tensor, GraphError> {
        self.push(Op::Gather, &[table, indices], None)
    }

    /// Sums value rows into `rows` rows by index (the adjoint of [`GraphBuilder::gather`]).
    pub fn index_add(
        &mut self,
        values: Tensor,
        indices: Tensor,
        rows: usize,
    ) -> Result<Tensor, GraphError> {
        self.push(Op::IndexAdd { rows }, &[values, indices], None)
    }

    pub fn take_along(
        &mut self,
        x: Tensor,
        indices: Tensor,
        axis: usize,
    ) -> Result<Tensor, GraphError> {
        self.push(Op::TakeAlong { axis }, &[x, indices], None)
    }

    /// The cross-entropy of every row of `logits` against `labels` (see [`Op::CrossEntropy`]).
    pub fn cross_entropy(&mut self, logits: Tensor, labels: Tensor) -> Result<Tensor, GraphError> {
        self.push(Op::CrossEntropy, &[logits, labels], None)
    }

    /// The gradient of [`GraphBuilder::cross_entropy`] (see [`Op::CrossEntropyGrad`]); `loss`
    /// is that op's result for these logits and labels.
    pub fn cross_entropy_grad(
        &mut self,
        logits: Tensor,
        labels: Tensor,
        loss: Tensor,
        cotangent: Tensor,
    ) -> Result<Tensor, GraphError> {
        self.push(
            Op::CrossEntropyGrad,
            &[logits, labels, loss, cotangent],
            None,
        )
    }

    /// Causal attention with MLA's shared rope key (see [`Op::CausalAttention`]): `q`
    /// `[b, t, h, nope + rope]`, `k_nope` `[b, t, h, nope]`, `k_rope` `[b, t, rope]`, `v`
    /// `[b, t, h, dv]` -> `[b, t, h, dv]`.
    pub fn causal_attention(
        &mut self,
        [q, k_nope, k_rope, v]: [Tensor; 4],
        scale: f64,
    ) -> Result<Tensor, GraphError> {
        let config = AttentionConfig {
            scale,
            products_in: None,
        };
        self.push(Op::CausalAttention(config), &[q, k_nope, k_rope, v], None)
    }

    pub fn top_k(&mut self, x: Tensor, k: usize) -> Result<Tensor, GraphError> {
        self.push(Op::TopK { k }, &[x], None)
    }

    pub fn one_hot(
        &mut self,
        indices: Tensor,
        depth: usize,
        dtype: DType,
    ) -> Result<Tensor, GraphError> {
        self.push(Op::OneHot { depth, dtype }, &[indices], None)
    }

    pub fn grouped_matmul(
        &mut self,
        x: Tensor,
        weights: Tensor,
        expert_ids: Tensor,
    ) -> Result<Tensor, GraphError> {
        let op = Op::GroupedMatMul {
            accumulation: Accumulation::Exact,
        };
        self.push(op, &[x, weights, expert_ids], None)
    }

    /// The weight gradient of a grouped matmul (see [`Op::GroupedMatMulWeightGrad`]):
    /// `[experts, n, k]` from the cotangent `[tokens, slots, n]` of its result.
    pub fn grouped_matmul_weight_grad(
        &mut self,
        cotangent: Tensor,
        x: Tensor,
        expert_ids: Tensor,
        experts: usize,
    ) -> Result<Tensor, GraphError> {
        let op = Op::GroupedMatMulWeightGrad {
            experts,
            accumulation: Accumulation::Exact,
            rounding: None,
        };
        self.push(op, &[cotangent, x, expert_ids], None)
    }

    /// `dequant(quant(x))` in `tile_rows`×`tile_cols` tiles of the last two axes (see
    /// [`Op::QuantizeDequantize`]).
    pub fn quantize_dequantize(
        &mut self,
        x: Tensor,
        format: QuantFormat,
        (tile_rows, tile_cols): (usize, usize),
        pow2_scales: bool,
    ) -> Result<Tensor, GraphError> {
        let op = Op::QuantizeDequantize {
            format,
            tile_rows,
            tile_cols,
            pow2_scales,
        };
        self.push(op, &[x], None)
    }

    pub fn stack(&mut self, parts: &[Tensor]) -> Result<Tensor, GraphError> {
        self.push(Op::Stack, parts, None)
    }

    /// Softmax over the last axis, computed stably as `exp(x - max) / sum`.
    pub fn softmax(&mut self, x: Tensor) -> Result<Tensor, GraphError> {
        let axis = self.last_axis(x);
        // The shift changes nothing but the range exp sees: no gradient flows through it.
        let max = self.reduce(ReduceOp::Max, x, axis, true)?;
        let max = self.stop_gradient(max)?;
        let shifted = self.sub(x, max)?;
        let e = self.exp(shifted)?;
        let sum = self.reduce(ReduceOp::Sum, e, axis, true)?;
        self.div(e, sum)
    }
}
