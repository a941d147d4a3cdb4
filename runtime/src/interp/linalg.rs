//! Accumulating ops: `Reduce`, `MatMul`, `GroupedMatMul`, `GroupedMatMulWeightGrad`. Float
//! sums and dot products accumulate in f64, in index order, and round once to f32 and then to
//! the dtype; a GEMM with a limited accumulation (`Accumulation::Limited`) sums its products
//! as [`LimitedSum::dot`] defines instead.

use std::borrow::Cow;

use fathom_compiler::DType;
use fathom_compiler::graph::{
    Accumulation, ExpertTiles, MatMulPart, ReduceOp, Triangle, Triangular,
};

use super::error::InterpError;
use super::eval::At;
use super::layout::{StridedOffsets, split_at_axis};
use super::numeric::{round_f64, wrap_int};
use crate::fp8::{LimitedSum, round_in_expert_tiles};
use crate::tensor::{Data, HostTensor};

/// Reduces `axis`. Seen as an `[outer, len, inner]` array, the result is `[outer, inner]` in
/// row-major order whether or not the axis is kept.
///
/// Floats: `sum` and `mean` accumulate in f64 (`mean` divides the f64 sum); `max` propagates
/// NaN. Integers: `sum` wraps, `mean` truncates toward zero. An empty axis gives 0 for `sum`,
/// NaN (floats) or 0 (integers) for `mean`, and the type's least value for `max`.
pub(super) fn reduce(
    at: At<'_>,
    op: ReduceOp,
    axis: usize,
    x: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let (outer, len, inner) = split_at_axis(x.dims(), axis);
    let dtype = at.out_dtype();
    // The offsets of the elements reduced into result element (o, i).
    let lane = move |o: usize, i: usize| (0..len).map(move |r| (o * len + r) * inner + i);
    let lanes = (0..outer).flat_map(|o| (0..inner).map(move |i| (o, i)));
    let data = match &x.data {
        Data::Float(v) => Data::Float(
            lanes
                .map(|(o, i)| reduce_floats(op, dtype, lane(o, i).map(|j| v[j]), len))
                .collect(),
        ),
        Data::Int(v) => Data::Int(
            lanes
                .map(|(o, i)| reduce_ints(op, dtype, lane(o, i).map(|j| v[j]), len))
                .collect(),
        ),
        Data::Bool(_) => return Err(at.internal("cannot reduce bools")),
    };
    Ok(at.tensor(data))
}

fn reduce_floats(op: ReduceOp, dtype: DType, values: impl Iterator<Item = f32>, len: usize) -> f32 {
    match op {
        ReduceOp::Sum => round_f64(dtype, values.map(f64::from).sum()),
        ReduceOp::Mean => {
            let sum: f64 = values.map(f64::from).sum();
            round_f64(dtype, sum / len as f64)
        }
        ReduceOp::Max => values.fold(f32::NEG_INFINITY, |m, v| {
            if m.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                m.max(v)
            }
        }),
    }
}

fn reduce_ints(op: ReduceOp, dtype: DType, values: impl Iterator<Item = i64>, len: usize) -> i64 {
    match op {
        ReduceOp::Sum => wrap_int(dtype, values.fold(0, i64::wrapping_add)),
        ReduceOp::Mean => {
            let total = wrap_int(dtype, values.fold(0, i64::wrapping_add));
            i64::try_from(len)
                .ok()
                .and_then(|n| total.checked_div(n))
                .unwrap_or(0)
        }
        ReduceOp::Max => values.max().unwrap_or(match dtype {
            DType::I32 => i64::from(i32::MIN),
            _ => i64::MIN,
        }),
    }
}

/// The f64 dot product of `a` with the first `a.len()` elements of `b`, summed in order.
fn dot(a: &[f32], b: impl Iterator<Item = f32>) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| f64::from(x) * f64::from(y))
        .sum()
}

/// `(..., m, k) @ (..., k, n) -> (..., m, n)`; the batch axes broadcast. Each result element is
/// an f64 dot product rounded once. A triangular operand is read with zeros outside its
/// triangle; a triangular result has them written there.
pub(super) fn matmul(
    at: At<'_>,
    (accumulation, triangular): (Accumulation, Option<Triangular>),
    a: &HostTensor,
    b: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let triangle_of = |part| triangular.filter(|t| t.part == part).map(|t| t.triangle);
    let (left, right, output) = (
        triangle_of(MatMulPart::Left),
        triangle_of(MatMulPart::Right),
        triangle_of(MatMulPart::Output),
    );
    let (av, bv) = (at.floats(a)?, at.floats(b)?);
    let (a_dims, b_dims, out) = (a.dims(), b.dims(), at.out_dims());
    let (ra, rb, ro) = (a_dims.len(), b_dims.len(), out.len());
    let (m, k, n) = (a_dims[ra - 2], a_dims[ra - 1], b_dims[rb - 1]);
    let batch = &out[..ro - 2];
    // Offsets of each batch's matrix, counted in matrices.
    let a_batches = StridedOffsets::broadcast(&a_dims[..ra - 2], batch);
    let b_batches = StridedOffsets::broadcast(&b_dims[..rb - 2], batch);
    let dtype = at.out_dtype();
    let mut values = Vec::with_capacity(at.node.ty.numel());
    for (ab, bb) in a_batches.zip(b_batches) {
        let a_mat = &*triangle_part(&av[ab * m * k..][..m * k], k, left);
        let b_mat = &*triangle_part(&bv[bb * k * n..][..k * n], n, right);
        let start = values.len();
        if let Some(limited) = LimitedSum::new(accumulation, k) {
            for i in 0..m {
                let row = &a_mat[i * k..][..k];
                values.extend((0..n).map(|j| {
                    let column = (0..k).map(|p| b_mat[p * n + j]);
                    round_f64(
                        dtype,
                        f64::from(limited.dot(row.iter().copied().zip(column))),
                    )
                }));
            }
        } else {
            multiply_exact(a_mat, b_mat, (m, n, k), dtype, &mut values);
        }
        if let Some(triangle) = output {
            zero_outside(&mut values[start..], n, triangle);
        }
    }
    Ok(at.tensor(Data::Float(values)))
}

/// `a (m×k) · b (k×n)` appended to `values`.
fn multiply_exact(
    a_mat: &[f32],
    b_mat: &[f32],
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    values: &mut Vec<f32>,
) {
    // Row by row, accumulating `a[i, p] * b[p, :]` in f64 for p = 0, 1, …: every output
    // element sums its products in index order, like `dot`, but b is read contiguously.
    let mut accumulator = vec![0f64; n];
    for i in 0..m {
        accumulator.fill(0.0);
        for (p, &a_ip) in a_mat[i * k..][..k].iter().enumerate() {
            let a_ip = f64::from(a_ip);
            for (acc, &b_pj) in accumulator.iter_mut().zip(&b_mat[p * n..][..n]) {
                *acc += a_ip * f64::from(b_pj);
            }
        }
        values.extend(accumulator.iter().map(|&x| round_f64(dtype, x)));
    }
}

/// A row-major matrix of `columns` columns with zeros outside `triangle` (borrowed as it is
/// without one).
fn triangle_part(matrix: &[f32], columns: usize, triangle: Option<Triangle>) -> Cow<'_, [f32]> {
    match triangle {
        None => Cow::Borrowed(matrix),
        Some(triangle) => {
            let mut copy = matrix.to_vec();
            zero_outside(&mut copy, columns, triangle);
            Cow::Owned(copy)
        }
    }
}

fn zero_outside(matrix: &mut [f32], columns: usize, triangle: Triangle) {
    for (i, row) in matrix.chunks_mut(columns).enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            if !triangle.keeps(i, j) {
                *x = 0.0;
            }
        }
    }
}

/// `out[t, s, :] = weights[expert_ids[t, s]] @ x[t, s or 0, :]`, with `weights` `[experts, n, k]`
/// (each expert's `[n, k]` matrix is applied transposed, as a linear layer's weight is). An
/// `x` with one slot serves every slot. Expert ids outside `0..experts` are an error.
pub(super) fn grouped_matmul(
    at: At<'_>,
    accumulation: Accumulation,
    x: &HostTensor,
    weights: &HostTensor,
    expert_ids: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let (xv, wv, ids) = (at.floats(x)?, at.floats(weights)?, at.ints(expert_ids)?);
    let (tokens, slots) = (expert_ids.dims()[0], expert_ids.dims()[1]);
    let x_slots = x.dims()[1];
    let (experts, n, k) = (weights.dims()[0], weights.dims()[1], weights.dims()[2]);
    let dtype = at.out_dtype();
    let limited = LimitedSum::new(accumulation, k);
    let mut values = Vec::with_capacity(at.node.ty.numel());
    for t in 0..tokens {
        for s in 0..slots {
            let expert = at.index(ids[t * slots + s], experts)?;
            let x_slot = if x_slots == 1 { 0 } else { s };
            let x_row = &xv[(t * x_slots + x_slot) * k..][..k];
            for row in 0..n {
                let w_row = &wv[(expert * n + row) * k..][..k];
                let sum = match limited {
                    Some(limited) => {
                        f64::from(limited.dot(x_row.iter().copied().zip(w_row.iter().copied())))
                    }
                    None => dot(w_row, x_row.iter().copied()),
                };
                values.push(round_f64(dtype, sum));
            }
        }
    }
    Ok(at.tensor(Data::Float(values)))
}

/// `out[e] = Σ cotangent[t, s]ᵀ · x[t, s or 0]` over the token-slots `(t, s)` routed to expert
/// `e`, an `[n, k]` matrix per expert (the weight gradient of [`grouped_matmul`]). Each result
/// element accumulates in f64, in `(t, s)` order, and rounds once; an expert that got no token
/// gets exact zeros. Expert ids outside `0..experts` are an error. With `rounding`, each
/// expert's rows of both operands are first rounded in its own tiles ([`ExpertTiles`]).
pub(super) fn grouped_matmul_weight_grad(
    at: At<'_>,
    experts: usize,
    accumulation: Accumulation,
    rounding: Option<ExpertTiles>,
    cotangent: &HostTensor,
    x: &HostTensor,
    expert_ids: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let (cv, xv, ids) = (at.floats(cotangent)?, at.floats(x)?, at.ints(expert_ids)?);
    let (tokens, slots) = (expert_ids.dims()[0], expert_ids.dims()[1]);
    let (x_slots, k) = (x.dims()[1], x.dims()[2]);
    let n = cotangent.dims()[2];
    let dtype = at.out_dtype();
    // Per expert, K is its token-slots in (t, s) order: each is a row of the cotangent and of x.
    let mut members: Vec<Vec<(usize, usize)>> = vec![Vec::new(); experts];
    for t in 0..tokens {
        for s in 0..slots {
            let expert = at.index(ids[t * slots + s], experts)?;
            let x_slot = if x_slots == 1 { 0 } else { s };
            members[expert].push((t * slots + s, t * x_slots + x_slot));
        }
    }
    let mut values = Vec::with_capacity(experts * n * k);
    for rows in &members {
        // The expert's rows, gathered (and rounded in its own tiles).
        let gathered = |source: &[f32], width: usize, row_of: fn(&(usize, usize)) -> usize| {
            let matrix: Vec<f32> = rows
                .iter()
                .flat_map(|r| &source[row_of(r) * width..][..width])
                .copied()
                .collect();
            let mut matrix = matrix;
            if let Some(tiles) = rounding {
                round_in_expert_tiles(&mut matrix, width, tiles)
                    .map_err(|e| at.internal(e.to_string()))?;
            }
            Ok::<_, InterpError>(matrix)
        };
        let c_rows = gathered(cv, n, |&(c, _)| c)?;
        let x_rows = gathered(xv, k, |&(_, x)| x)?;
        let (c_rows, x_rows) = (&c_rows, &x_rows);
        let pairs = move |row: usize, col: usize| {
            (0..rows.len()).map(move |r| (c_rows[r * n + row], x_rows[r * k + col]))
        };
        match LimitedSum::new(accumulation, rows.len()) {
            Some(limited) => {
                for row in 0..n {
                    values.extend(
                        (0..k).map(|col| round_f64(dtype, f64::from(limited.dot(pairs(row, col))))),
                    );
                }
            }
            None => {
                for row in 0..n {
                    values.extend((0..k).map(|col| {
                        let sum: f64 = pairs(row, col)
                            .map(|(c, x)| f64::from(c) * f64::from(x))
                            .sum();
                        round_f64(dtype, sum)
                    }));
                }
            }
        }
    }
    Ok(at.tensor(Data::Float(values)))
}
