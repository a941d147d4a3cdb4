//! Adjoints of the index-driven ops that pass values through: `Gather` and `TakeAlong`. The
//! indices get no cotangent (they are integers); the values' cotangent is a scatter-add, built
//! from `one_hot` and a contraction so that no scatter op is needed.

use crate::error::GraphError;
use crate::graph::{GraphBuilder, ReduceOp, Tensor};

use super::Adjoint;

/// `[table (rows, ...), indices]` -> `indices.shape ++ table.shape[1..]`: the table's
/// cotangent is the scatter-add of the result's rows, `index_add(g, indices, rows)`. Rows looked
/// up several times sum their cotangents; rows never looked up get zeros.
pub(super) fn gather(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (table, indices) = (a.inputs[0], a.inputs[1]);
    let rows = g.dims(table)[0];
    Ok(vec![Some(g.index_add(a.cot, indices, rows)?), None])
}

/// `[x, indices]` along `axis`: `dx[.., l, ..] = Σ_j g[.., j, ..]·[indices[.., j, ..] = l]`,
/// as `one_hot(indices, extent)` (a new last axis `l`) times the cotangent, summed over `axis`
/// (`j`), with the one-hot axis then moved to `axis`.
pub(super) fn take_along(
    g: &mut GraphBuilder,
    axis: usize,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (x, indices) = (a.inputs[0], a.inputs[1]);
    let x_dims = g.dims(x).to_vec();
    let rank = x_dims.len();
    let hot = g.one_hot(indices, x_dims[axis], g.dtype(x))?;
    let mut column = g.dims(a.cot).to_vec();
    column.push(1);
    let cot = g.reshape(a.cot, &column)?;
    let spread = g.mul(hot, cot)?;
    let summed = g.reduce(ReduceOp::Sum, spread, axis, false)?;
    let dx = if axis + 1 == rank {
        summed
    } else {
        // `summed` is x's axes without `axis`, then `axis` last: move it back.
        let perm: Vec<usize> = (0..rank)
            .map(|i| match i.cmp(&axis) {
                std::cmp::Ordering::Less => i,
                std::cmp::Ordering::Equal => rank - 1,
                std::cmp::Ordering::Greater => i - 1,
            })
            .collect();
        g.permute(summed, &perm)?
    };
    Ok(vec![Some(dx), None])
}

/// `[values, indices]` -> `[rows] ++ row`: each value row's cotangent is the cotangent of the
/// row it was added to, a `gather`.
pub(super) fn index_add(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let indices = a.inputs[1];
    Ok(vec![Some(g.gather(a.cot, indices)?), None])
}
