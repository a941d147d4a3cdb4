//! One node's evaluation: the dispatch from [`Op`] to the function named after it, and the
//! context those functions use to read operands and report errors.

use fathom_compiler::graph::Node;
use fathom_compiler::{DType, NodeId, Op};

use super::error::InterpError;
use super::{attention, elementwise, indexing, leaves, linalg, loss, movement, quantize};
use crate::tensor::{Data, HostTensor};

/// The node being evaluated: for its result type and for error messages.
#[derive(Clone, Copy, Debug)]
pub(super) struct At<'g> {
    pub id: NodeId,
    pub node: &'g Node,
}

impl At<'_> {
    /// The result's extents, as the graph records them (the graph has been validated, so they
    /// are what inference gives for the operands).
    pub fn out_dims(&self) -> &[usize] {
        self.node.ty.dims()
    }

    pub fn out_dtype(&self) -> DType {
        self.node.ty.dtype
    }

    /// The result: `data` with the node's type.
    pub fn tensor(&self, data: Data) -> HostTensor {
        HostTensor {
            ty: self.node.ty.clone(),
            data,
        }
    }

    pub fn internal(&self, detail: impl Into<String>) -> InterpError {
        InterpError::Internal {
            node: self.id,
            op: self.node.op.name(),
            origin: self.node.origin.clone(),
            detail: detail.into(),
        }
    }

    /// `index` as a position in `0..bound`, or the error naming this node.
    pub fn index(&self, index: i64, bound: usize) -> Result<usize, InterpError> {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < bound)
            .ok_or_else(|| InterpError::IndexOutOfRange {
                node: self.id,
                op: self.node.op.name(),
                origin: self.node.origin.clone(),
                index,
                bound,
            })
    }

    pub fn division_by_zero(&self) -> InterpError {
        InterpError::DivisionByZero {
            node: self.id,
            op: self.node.op.name(),
            origin: self.node.origin.clone(),
        }
    }

    pub fn floats<'t>(&self, t: &'t HostTensor) -> Result<&'t [f32], InterpError> {
        t.as_f32()
            .ok_or_else(|| self.internal(format!("expected a float operand, got {}", t.ty)))
    }

    pub fn ints<'t>(&self, t: &'t HostTensor) -> Result<&'t [i64], InterpError> {
        t.as_i64()
            .ok_or_else(|| self.internal(format!("expected an integer operand, got {}", t.ty)))
    }

    pub fn bools<'t>(&self, t: &'t HostTensor) -> Result<&'t [bool], InterpError> {
        t.as_bool()
            .ok_or_else(|| self.internal(format!("expected a bool operand, got {}", t.ty)))
    }

    /// Wraps the result of a data-movement helper, which is `None` only on a bug.
    pub fn picked(&self, data: Option<Data>) -> Result<HostTensor, InterpError> {
        data.map(|d| self.tensor(d))
            .ok_or_else(|| self.internal("operand data does not match its type"))
    }
}

/// Evaluates a computing node (anything but `Input` and `Parameter`) on its operand values.
pub(super) fn compute(at: At<'_>, x: &[&HostTensor]) -> Result<HostTensor, InterpError> {
    let arity_ok = match at.node.op.arity() {
        Some(n) => n == x.len(),
        None => !x.is_empty(),
    };
    if !arity_ok {
        return Err(at.internal(format!("got {} operands", x.len())));
    }
    match &at.node.op {
        Op::Input { .. } | Op::Parameter { .. } => {
            Err(at.internal("a leaf reached the compute dispatch"))
        }
        Op::Constant(data) => Ok(leaves::constant(at, data)),
        Op::Unary(op) => elementwise::unary(at, *op, x[0]),
        Op::Binary(op) => elementwise::binary(at, *op, x[0], x[1]),
        Op::Compare(op) => elementwise::compare(at, *op, x[0], x[1]),
        Op::Select => elementwise::select(at, x[0], x[1], x[2]),
        Op::Cast { to } => elementwise::cast(at, *to, x[0]),
        Op::StopGradient => Ok(movement::reshape(at, x[0])),
        Op::Reduce { op, axis, .. } => linalg::reduce(at, *op, *axis, x[0]),
        Op::MatMul {
            accumulation,
            triangular,
        } => linalg::matmul(at, (*accumulation, *triangular), x[0], x[1]),
        Op::Reshape { .. } => Ok(movement::reshape(at, x[0])),
        Op::Permute { perm } => movement::permute(at, perm, x[0]),
        Op::Expand { .. } => movement::expand(at, x[0]),
        Op::Slice { axis, start, .. } => movement::slice(at, *axis, *start, x[0]),
        Op::Concat { axis } => movement::concat(at, *axis, x),
        Op::Gather => indexing::gather(at, x[0], x[1]),
        Op::IndexAdd { rows } => indexing::index_add(at, *rows, x[0], x[1]),
        Op::TakeAlong { axis } => indexing::take_along(at, *axis, x[0], x[1]),
        Op::TopK { k } => indexing::top_k(at, *k, x[0]),
        Op::OneHot { depth, dtype } => indexing::one_hot(at, *depth, *dtype, x[0]),
        Op::GroupedMatMul { accumulation } => {
            linalg::grouped_matmul(at, *accumulation, x[0], x[1], x[2])
        }
        Op::GroupedMatMulWeightGrad {
            experts,
            accumulation,
            rounding,
        } => linalg::grouped_matmul_weight_grad(
            at,
            *experts,
            *accumulation,
            *rounding,
            x[0],
            x[1],
            x[2],
        ),
        Op::Stack => movement::stack(at, x),
        Op::CrossEntropy => loss::cross_entropy(at, x[0], x[1]),
        // The forward's loss (x[2]) is a shortcut for compiled kernels; the definition needs
        // only the logits.
        Op::CrossEntropyGrad => loss::cross_entropy_grad(at, x[0], x[1], x[3]),
        Op::CausalAttention(config) => attention::causal_attention(at, config, x),
        Op::CausalAttentionLse(config) => attention::causal_attention_lse(at, config, x),
        Op::CausalAttentionGrad { config, operand } => {
            attention::causal_attention_grad(at, config, *operand, x)
        }
        Op::QuantizeDequantize {
            format,
            tile_rows,
            tile_cols,
            pow2_scales,
        } => {
            quantize::quantize_dequantize(at, *format, (*tile_rows, *tile_cols), *pow2_scales, x[0])
        }
    }
}
