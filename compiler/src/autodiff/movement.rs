//! Adjoints of data movement: `Reshape`, `Permute`, `Expand`, `Slice`, `Concat`, `Stack`.
//! Each moves the cotangent back to where the elements came from.

use crate::error::GraphError;
use crate::graph::{GraphBuilder, Tensor, inverse_permutation};

use super::Adjoint;
use super::reduce_to::{sum_to, zeros};

/// `[x]`: the cotangent reshaped to `x`'s shape.
pub(super) fn reshape(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let dims = g.dims(a.inputs[0]).to_vec();
    Ok(vec![Some(g.reshape(a.cot, &dims)?)])
}

/// `[x]`: the cotangent permuted by the inverse permutation.
pub(super) fn permute(
    g: &mut GraphBuilder,
    perm: &[usize],
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    Ok(vec![Some(g.permute(a.cot, &inverse_permutation(perm))?)])
}

/// `[x]`: the cotangent summed over the stretched and prepended axes.
pub(super) fn expand(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let dims = g.dims(a.inputs[0]).to_vec();
    Ok(vec![Some(sum_to(g, a.cot, &dims)?)])
}

/// `[x]` sliced `start..end` along `axis`: the cotangent padded with zeros on both sides (a
/// concat with expanded zero constants).
pub(super) fn slice(
    g: &mut GraphBuilder,
    axis: usize,
    start: usize,
    end: usize,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let dims = g.dims(a.inputs[0]).to_vec();
    let dtype = g.dtype(a.cot);
    let mut parts = Vec::with_capacity(3);
    for (extent, is_cotangent) in [
        (start, false),
        (end - start, true),
        (dims[axis] - end, false),
    ] {
        if is_cotangent {
            parts.push(a.cot);
        } else if extent > 0 {
            let mut pad = dims.clone();
            pad[axis] = extent;
            parts.push(zeros(g, dtype, &pad)?);
        }
    }
    let dx = if parts.len() == 1 {
        a.cot
    } else {
        g.concat(&parts, axis)?
    };
    Ok(vec![Some(dx)])
}

/// `[x_0, x_1, ...]` joined along `axis`: each part's slice of the cotangent.
pub(super) fn concat(
    g: &mut GraphBuilder,
    axis: usize,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let mut start = 0;
    let mut out = Vec::with_capacity(a.inputs.len());
    for (&part, &wanted) in a.inputs.iter().zip(a.wanted) {
        let end = start + g.dims(part)[axis];
        out.push(if wanted {
            Some(g.slice(a.cot, axis, start, end)?)
        } else {
            None
        });
        start = end;
    }
    Ok(out)
}

/// `[x_0, x_1, ...]` stacked on a new leading axis: row `i` of the cotangent, reshaped to the
/// part's shape, for part `i`.
pub(super) fn stack(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let mut out = Vec::with_capacity(a.inputs.len());
    for (i, (&part, &wanted)) in a.inputs.iter().zip(a.wanted).enumerate() {
        out.push(if wanted {
            let row = g.slice(a.cot, 0, i, i + 1)?;
            let dims = g.dims(part).to_vec();
            Some(g.reshape(row, &dims)?)
        } else {
            None
        });
    }
    Ok(out)
}
