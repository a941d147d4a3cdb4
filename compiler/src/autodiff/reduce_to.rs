//! Shape helpers shared by the rules: summing a broadcast cotangent back to an operand's shape,
//! and zero tensors.

use crate::dtype::DType;
use crate::error::GraphError;
use crate::graph::{GraphBuilder, ReduceOp, Tensor};

/// Sums `t`, whose shape `dims` broadcasts to (NumPy rules), back down to `dims`: over the
/// axes broadcasting prepended and the axes where `dims` has extent 1 but `t` does not (each
/// kept with extent 1), then reshapes to `dims`. Returns `t` itself when it already has that
/// shape. The adjoint of every implicit or explicit broadcast.
pub(super) fn sum_to(
    g: &mut GraphBuilder,
    t: Tensor,
    dims: &[usize],
) -> Result<Tensor, GraphError> {
    let from = g.dims(t).to_vec();
    if from == dims {
        return Ok(t);
    }
    let lead = from.len().checked_sub(dims.len()).ok_or_else(|| {
        GraphError::InvalidRequest(format!(
            "autodiff: cannot sum a cotangent of shape {from:?} down to {dims:?}"
        ))
    })?;
    let mut summed = t;
    for (axis, &extent) in from.iter().enumerate() {
        let target = if axis < lead { 1 } else { dims[axis - lead] };
        if target == 1 && extent != 1 {
            summed = g.reduce(ReduceOp::Sum, summed, axis, true)?;
        }
    }
    if g.dims(summed) != dims {
        summed = g.reshape(summed, dims)?;
    }
    Ok(summed)
}

/// Zeros of extents `dims`: a scalar 0 constant expanded.
pub(super) fn zeros(
    g: &mut GraphBuilder,
    dtype: DType,
    dims: &[usize],
) -> Result<Tensor, GraphError> {
    let zero = g.scalar(0.0, dtype)?;
    g.expand(zero, dims)
}
