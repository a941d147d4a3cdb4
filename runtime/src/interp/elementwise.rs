//! Elementwise ops: `Unary`, `Binary`, `Compare`, `Select`, `Cast`.
//!
//! Operands broadcast to the result's shape with NumPy rules (see [`StridedOffsets::broadcast`]).

use fathom_compiler::DType;
use fathom_compiler::graph::{BinaryOp, CompareOp, UnaryOp};

use super::error::InterpError;
use super::eval::At;
use super::layout::{StridedOffsets, pick_from};
use super::numeric::{float_to_int, int_to_float, round_f64, round_to_dtype, wrap_int};
use crate::tensor::{Data, HostTensor};

/// `f(x)` per element, computed in f64 and rounded to the dtype.
pub(super) fn unary(at: At<'_>, op: UnaryOp, x: &HostTensor) -> Result<HostTensor, InterpError> {
    let dtype = at.out_dtype();
    let values = at.floats(x)?;
    let out = values
        .iter()
        .map(|&v| round_f64(dtype, unary_value(op, f64::from(v))))
        .collect();
    Ok(at.tensor(Data::Float(out)))
}

fn unary_value(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sigmoid => sigmoid(x),
    }
}

/// `1 / (1 + exp(-x))`, written so that `exp` never overflows.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `f(a[i], b[j])` for every element of the broadcast result, in row-major order.
fn zip_broadcast<A: Copy, B: Copy, R>(
    at: At<'_>,
    (a, a_dims): (&[A], &[usize]),
    (b, b_dims): (&[B], &[usize]),
    mut f: impl FnMut(A, B) -> R,
) -> Vec<R> {
    let a_offsets = StridedOffsets::broadcast(a_dims, at.out_dims());
    let b_offsets = StridedOffsets::broadcast(b_dims, at.out_dims());
    a_offsets
        .zip(b_offsets)
        .map(|(i, j)| f(a[i], b[j]))
        .collect()
}

/// `a op b` with broadcasting. Floats compute in f32, as kernels do, and round to the dtype;
/// `max`/`min` propagate NaN. Integers wrap; `div` truncates toward zero and fails on a zero
/// divisor.
pub(super) fn binary(
    at: At<'_>,
    op: BinaryOp,
    a: &HostTensor,
    b: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let dtype = at.out_dtype();
    let data = match (&a.data, &b.data) {
        (Data::Float(av), Data::Float(bv)) => {
            let out = zip_broadcast(at, (av, a.dims()), (bv, b.dims()), |x, y| {
                round_to_dtype(dtype, binary_float(op, x, y))
            });
            Data::Float(out)
        }
        (Data::Int(av), Data::Int(bv)) => {
            let out = zip_broadcast(at, (av, a.dims()), (bv, b.dims()), |x, y| {
                binary_int(op, x, y).map(|v| wrap_int(dtype, v))
            });
            let out: Option<Vec<i64>> = out.into_iter().collect();
            Data::Int(out.ok_or_else(|| at.division_by_zero())?)
        }
        _ => return Err(at.internal(format!("cannot apply to {} and {}", a.ty, b.ty))),
    };
    Ok(at.tensor(data))
}

fn binary_float(op: BinaryOp, x: f32, y: f32) -> f32 {
    match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Max | BinaryOp::Min if x.is_nan() || y.is_nan() => f32::NAN,
        BinaryOp::Max => x.max(y),
        BinaryOp::Min => x.min(y),
    }
}

/// `None` for a division by zero.
fn binary_int(op: BinaryOp, x: i64, y: i64) -> Option<i64> {
    Some(match op {
        BinaryOp::Add => x.wrapping_add(y),
        BinaryOp::Sub => x.wrapping_sub(y),
        BinaryOp::Mul => x.wrapping_mul(y),
        BinaryOp::Div if y == 0 => return None,
        BinaryOp::Div => x.wrapping_div(y),
        BinaryOp::Max => x.max(y),
        BinaryOp::Min => x.min(y),
    })
}

/// `a op b` with broadcasting, as bools. Float comparisons follow IEEE 754 (anything compared
/// with NaN is false); `false < true`.
pub(super) fn compare(
    at: At<'_>,
    op: CompareOp,
    a: &HostTensor,
    b: &HostTensor,
) -> Result<HostTensor, InterpError> {
    fn typed<T: Copy + PartialOrd>(
        at: At<'_>,
        op: CompareOp,
        a: (&[T], &[usize]),
        b: (&[T], &[usize]),
    ) -> Vec<bool> {
        zip_broadcast(at, a, b, |x, y| compare_values(op, x, y))
    }
    let out = match (&a.data, &b.data) {
        (Data::Float(av), Data::Float(bv)) => typed(at, op, (av, a.dims()), (bv, b.dims())),
        (Data::Int(av), Data::Int(bv)) => typed(at, op, (av, a.dims()), (bv, b.dims())),
        (Data::Bool(av), Data::Bool(bv)) => typed(at, op, (av, a.dims()), (bv, b.dims())),
        _ => return Err(at.internal(format!("cannot compare {} and {}", a.ty, b.ty))),
    };
    Ok(at.tensor(Data::Bool(out)))
}

fn compare_values<T: PartialOrd>(op: CompareOp, x: T, y: T) -> bool {
    match op {
        CompareOp::Eq => x == y,
        CompareOp::Lt => x < y,
        CompareOp::Le => x <= y,
        CompareOp::Gt => x > y,
        CompareOp::Ge => x >= y,
    }
}

/// `condition ? if_true : if_false`, all three broadcast to the result's shape.
pub(super) fn select(
    at: At<'_>,
    condition: &HostTensor,
    if_true: &HostTensor,
    if_false: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let cond = at.bools(condition)?;
    let out = at.out_dims();
    let c = StridedOffsets::broadcast(condition.dims(), out);
    let t = StridedOffsets::broadcast(if_true.dims(), out);
    let f = StridedOffsets::broadcast(if_false.dims(), out);
    let picks = c
        .zip(t.zip(f))
        .map(|(ci, (ti, fi))| if cond[ci] { (0, ti) } else { (1, fi) });
    at.picked(pick_from(&[&if_true.data, &if_false.data], picks))
}

/// Converts the element type: floats round to the target float type (saturating for FP8),
/// truncate toward zero into integers (saturating, NaN to 0); integers round into floats and
/// wrap into narrower integers; bools become 0 and 1; anything becomes a bool as `!= 0`
/// (NaN is true).
pub(super) fn cast(at: At<'_>, to: DType, x: &HostTensor) -> Result<HostTensor, InterpError> {
    let data = match &x.data {
        Data::Float(v) if to.is_float() => Data::Float(map(v, |e| round_to_dtype(to, e))),
        Data::Float(v) if to.is_integer() => Data::Int(map(v, |e| float_to_int(to, e))),
        Data::Float(v) => Data::Bool(map(v, |e| e != 0.0)),
        Data::Int(v) if to.is_float() => Data::Float(map(v, |e| int_to_float(to, e))),
        Data::Int(v) if to.is_integer() => Data::Int(map(v, |e| wrap_int(to, e))),
        Data::Int(v) => Data::Bool(map(v, |e| e != 0)),
        Data::Bool(v) if to.is_float() => Data::Float(map(v, |e| if e { 1.0 } else { 0.0 })),
        Data::Bool(v) if to.is_integer() => Data::Int(map(v, i64::from)),
        Data::Bool(v) => Data::Bool(v.clone()),
    };
    Ok(at.tensor(data))
}

fn map<T: Copy, R>(values: &[T], f: impl FnMut(T) -> R) -> Vec<R> {
    values.iter().copied().map(f).collect()
}
