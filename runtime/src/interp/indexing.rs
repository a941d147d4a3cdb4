//! Index-driven ops: `Gather`, `TakeAlong`, `TopK`, `OneHot`. Indices must lie in `0..bound`
//! (negative indices do not count from the end); anything else is
//! [`InterpError::IndexOutOfRange`].

use std::cmp::Ordering;

use fathom_compiler::DType;

use super::error::InterpError;
use super::eval::At;
use super::layout::{pick, split_at_axis};
use crate::tensor::{Data, HostTensor};

/// `indices.shape ++ table.shape[1..]`: for each index, the table's row of that number.
pub(super) fn gather(
    at: At<'_>,
    table: &HostTensor,
    indices: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let (_, rows, row_len) = split_at_axis(table.dims(), 0);
    let rows: Vec<usize> = at
        .ints(indices)?
        .iter()
        .map(|&i| at.index(i, rows))
        .collect::<Result<_, _>>()?;
    let offsets = rows.iter().flat_map(|&r| r * row_len..(r + 1) * row_len);
    at.picked(pick(&table.data, offsets))
}

/// `[rows] ++ row`: the sum, in index order and in f64, of the value rows sent to each row.
pub(super) fn index_add(
    at: At<'_>,
    rows: usize,
    values: &HostTensor,
    indices: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let ids = at.ints(indices)?;
    let v = at.floats(values)?;
    let width = v.len() / ids.len().max(1);
    let mut sums = vec![0f64; rows * width];
    for (i, &id) in ids.iter().enumerate() {
        let r = at.index(id, rows)?;
        for (s, &x) in sums[r * width..][..width]
            .iter_mut()
            .zip(&v[i * width..][..width])
        {
            *s += f64::from(x);
        }
    }
    let dtype = at.out_dtype();
    let out = sums
        .into_iter()
        .map(|s| super::numeric::round_f64(dtype, s))
        .collect();
    Ok(at.tensor(Data::Float(out)))
}

/// NumPy's `take_along_axis`: `out[o, j, i] = x[o, indices[o, j, i], i]`, seeing `x` and
/// `indices` as `[outer, extent, inner]` arrays split at `axis`.
pub(super) fn take_along(
    at: At<'_>,
    axis: usize,
    x: &HostTensor,
    indices: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let (outer, x_len, inner) = split_at_axis(x.dims(), axis);
    let (_, len, _) = split_at_axis(indices.dims(), axis);
    let idx = at.ints(indices)?;
    let mut offsets = Vec::with_capacity(idx.len());
    for o in 0..outer {
        for j in 0..len {
            for i in 0..inner {
                let chosen = at.index(idx[(o * len + j) * inner + i], x_len)?;
                offsets.push((o * x_len + chosen) * inner + i);
            }
        }
    }
    at.picked(pick(&x.data, offsets.into_iter()))
}

/// The `i64` positions of the `k` largest elements of each last-axis row, largest first. Equal
/// values go lower position first (`torch.topk` on the CPU); NaN counts as larger than every
/// number, as in torch.
pub(super) fn top_k(at: At<'_>, k: usize, x: &HostTensor) -> Result<HostTensor, InterpError> {
    let row_len = x.dims().last().copied().unwrap_or(1);
    let out = match &x.data {
        Data::Float(v) => top_k_rows(v, row_len, k, float_descending),
        Data::Int(v) => top_k_rows(v, row_len, k, |a, b| b.cmp(&a)),
        Data::Bool(v) => top_k_rows(v, row_len, k, |a, b| b.cmp(&a)),
    };
    Ok(at.tensor(Data::Int(out)))
}

/// `Less` when `a` ranks before `b`: NaN first, then larger numbers first.
fn float_descending(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

fn top_k_rows<T: Copy>(
    values: &[T],
    row_len: usize,
    k: usize,
    rank: impl Fn(T, T) -> Ordering,
) -> Vec<i64> {
    let mut out = Vec::with_capacity(values.len() / row_len.max(1) * k);
    for row in values.chunks(row_len.max(1)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // A stable sort keeps equal values in position order.
        order.sort_by(|&i, &j| rank(row[i], row[j]));
        out.extend(order[..k.min(row.len())].iter().map(|&i| i as i64));
    }
    out
}

/// `indices.shape ++ [depth]` of `dtype`: 1 at each index, 0 elsewhere.
pub(super) fn one_hot(
    at: At<'_>,
    depth: usize,
    dtype: DType,
    indices: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let hot: Vec<usize> = at
        .ints(indices)?
        .iter()
        .map(|&i| at.index(i, depth))
        .collect::<Result<_, _>>()?;
    let is_hot = hot.iter().flat_map(|&h| (0..depth).map(move |d| d == h));
    let data = match dtype {
        DType::Bool => Data::Bool(is_hot.collect()),
        DType::I32 | DType::I64 => Data::Int(is_hot.map(i64::from).collect()),
        _ => Data::Float(is_hot.map(|h| if h { 1.0 } else { 0.0 }).collect()),
    };
    Ok(at.tensor(data))
}
