//! Adjoints of the elementwise ops and reductions: `Unary`, `Binary`, `Select`, `Cast`,
//! `QuantizeDequantize`, `Reduce`. Each follows the formula PyTorch's `derivatives.yaml` uses for the same function.

use crate::dtype::DType;
use crate::error::GraphError;
use crate::graph::{BinaryOp, CompareOp, GraphBuilder, ReduceOp, Tensor, UnaryOp};

use super::Adjoint;
use super::reduce_to::sum_to;

/// `[x]`, `y = f(x)`, cotangent `g`:
/// neg `-g`; exp `g·y`; log `g/x`; sqrt `g/(2y)`; rsqrt `-0.5·g·y³`; recip `-g·y²`;
/// abs `g·sign(x)` (0 at 0); sigmoid `g·y·(1-y)`.
pub(super) fn unary(
    g: &mut GraphBuilder,
    op: UnaryOp,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (x, y, cot) = (a.inputs[0], a.out, a.cot);
    let dtype = g.dtype(x);
    let dx = match op {
        UnaryOp::Neg => g.neg(cot)?,
        UnaryOp::Exp => g.mul(cot, y)?,
        UnaryOp::Log => g.div(cot, x)?,
        UnaryOp::Sqrt => {
            let half = g.div(cot, y)?;
            g.scale(half, 0.5)?
        }
        UnaryOp::Rsqrt => {
            let y2 = g.mul(y, y)?;
            let y3 = g.mul(y2, y)?;
            let gy3 = g.mul(cot, y3)?;
            g.scale(gy3, -0.5)?
        }
        UnaryOp::Recip => {
            let y2 = g.mul(y, y)?;
            let gy2 = g.mul(cot, y2)?;
            g.neg(gy2)?
        }
        UnaryOp::Abs => {
            let zero = g.scalar(0.0, dtype)?;
            let positive = mask(g, CompareOp::Gt, x, zero, dtype)?;
            let negative = mask(g, CompareOp::Lt, x, zero, dtype)?;
            let sign = g.sub(positive, negative)?;
            g.mul(cot, sign)?
        }
        UnaryOp::Sigmoid => {
            let one = g.scalar(1.0, dtype)?;
            let complement = g.sub(one, y)?;
            let slope = g.mul(y, complement)?;
            g.mul(cot, slope)?
        }
    };
    Ok(vec![Some(dx)])
}

/// `cast(compare(a, b))`: 1 where the comparison holds, else 0.
fn mask(
    g: &mut GraphBuilder,
    op: CompareOp,
    a: Tensor,
    b: Tensor,
    dtype: DType,
) -> Result<Tensor, GraphError> {
    let holds = g.compare(op, a, b)?;
    g.cast(holds, dtype)
}

/// `[a, b]` broadcast to `y`; each operand's cotangent is summed back to its shape:
/// add `(g, g)`; sub `(g, -g)`; mul `(g·b, g·a)`; div `(g/b, -g·(y/b))`;
/// max `(g·([a>b] + ½[a=b]), g·([a<b] + ½[a=b]))`, min the same with the comparisons swapped:
/// ties split the cotangent evenly, as `torch.maximum`/`torch.minimum` do.
pub(super) fn binary(
    g: &mut GraphBuilder,
    op: BinaryOp,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (lhs, rhs, y, cot) = (a.inputs[0], a.inputs[1], a.out, a.cot);
    let lhs_dims = g.dims(lhs).to_vec();
    let rhs_dims = g.dims(rhs).to_vec();
    let dtype = g.dtype(y);
    let (mut dl, mut dr) = (None, None);
    match op {
        BinaryOp::Add => {
            if a.wanted[0] {
                dl = Some(cot);
            }
            if a.wanted[1] {
                dr = Some(cot);
            }
        }
        BinaryOp::Sub => {
            if a.wanted[0] {
                dl = Some(cot);
            }
            if a.wanted[1] {
                dr = Some(g.neg(cot)?);
            }
        }
        BinaryOp::Mul => {
            if a.wanted[0] {
                dl = Some(g.mul(cot, rhs)?);
            }
            if a.wanted[1] {
                dr = Some(g.mul(cot, lhs)?);
            }
        }
        BinaryOp::Div => {
            if a.wanted[0] {
                dl = Some(g.div(cot, rhs)?);
            }
            if a.wanted[1] {
                let ratio = g.div(y, rhs)?;
                let scaled = g.mul(cot, ratio)?;
                dr = Some(g.neg(scaled)?);
            }
        }
        BinaryOp::Max | BinaryOp::Min => {
            let (lhs_wins, rhs_wins) = if op == BinaryOp::Max {
                (CompareOp::Gt, CompareOp::Lt)
            } else {
                (CompareOp::Lt, CompareOp::Gt)
            };
            let tie = mask(g, CompareOp::Eq, lhs, rhs, dtype)?;
            let half_tie = g.scale(tie, 0.5)?;
            if a.wanted[0] {
                let chosen = mask(g, lhs_wins, lhs, rhs, dtype)?;
                let weight = g.add(chosen, half_tie)?;
                dl = Some(g.mul(cot, weight)?);
            }
            if a.wanted[1] {
                let chosen = mask(g, rhs_wins, lhs, rhs, dtype)?;
                let weight = g.add(chosen, half_tie)?;
                dr = Some(g.mul(cot, weight)?);
            }
        }
    }
    let dl = dl.map(|t| sum_to(g, t, &lhs_dims)).transpose()?;
    let dr = dr.map(|t| sum_to(g, t, &rhs_dims)).transpose()?;
    Ok(vec![dl, dr])
}

/// `[condition, if_true, if_false]`: the cotangent goes to the branch each element was taken
/// from (zeros to the other), summed back to the branch's shape; none to the condition.
pub(super) fn select(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (cond, cot) = (a.inputs[0], a.cot);
    let zero = g.scalar(0.0, g.dtype(cot))?;
    let mut out = vec![None];
    for (branch, &input) in a.inputs.iter().enumerate().skip(1) {
        if !a.wanted[branch] {
            out.push(None);
            continue;
        }
        let taken = if branch == 1 {
            g.select(cond, cot, zero)?
        } else {
            g.select(cond, zero, cot)?
        };
        let dims = g.dims(input).to_vec();
        out.push(Some(sum_to(g, taken, &dims)?));
    }
    Ok(out)
}

/// `[x]` quantized and dequantized: the straight-through estimator, `dx = g` unchanged. The
/// rounding is a step function whose derivative is zero almost everywhere, which would stop
/// all learning; FP8 training treats it as the identity. The GEMMs of the backward pass get
/// their own quantization from the precision pass, not from this rule.
pub(super) fn straight_through(a: &Adjoint<'_>) -> Result<Vec<Option<Tensor>>, GraphError> {
    Ok(vec![Some(a.cot)])
}

/// `[x]`: the cotangent cast back to `x`'s element type (nothing to do for a same-type cast).
pub(super) fn cast(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let from = g.dtype(a.inputs[0]);
    let dx = if g.dtype(a.cot) == from {
        a.cot
    } else {
        g.cast(a.cot, from)?
    };
    Ok(vec![Some(dx)])
}

/// `[x]` reduced over `axis`. Sum: the cotangent expanded back over the axis; mean: the same
/// divided by the axis's extent; max: the cotangent goes to the positions equal to the
/// maximum, split evenly among ties (`torch.amax`'s rule).
pub(super) fn reduce(
    g: &mut GraphBuilder,
    op: ReduceOp,
    axis: usize,
    keep_dim: bool,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let x = a.inputs[0];
    let dims = g.dims(x).to_vec();
    let dtype = g.dtype(x);
    let mut kept = dims.clone();
    kept[axis] = 1;
    // Results without the axis get it back with extent 1, so that they broadcast against `x`;
    // a dropped leading axis needs nothing (broadcasting prepends it).
    let keep = |g: &mut GraphBuilder, t: Tensor| {
        if keep_dim || axis == 0 {
            Ok(t)
        } else {
            g.reshape(t, &kept)
        }
    };
    let cot = keep(g, a.cot)?;
    let dx = match op {
        ReduceOp::Sum => g.expand(cot, &dims)?,
        ReduceOp::Mean => {
            let count = g.scalar(dims[axis] as f64, dtype)?;
            let share = g.div(cot, count)?;
            g.expand(share, &dims)?
        }
        ReduceOp::Max => {
            let max = keep(g, a.out)?;
            let hit = mask(g, CompareOp::Eq, x, max, dtype)?;
            let ties = g.reduce(ReduceOp::Sum, hit, axis, true)?;
            let share = g.div(cot, ties)?;
            g.mul(hit, share)?
        }
    };
    Ok(vec![Some(dx)])
}
