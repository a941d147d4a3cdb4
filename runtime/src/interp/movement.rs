//! Data movement: `Reshape`, `Permute`, `Expand`, `Slice`, `Concat`, `Stack`. No arithmetic:
//! every result element is a copy of one operand element.

use super::error::InterpError;
use super::eval::At;
use super::layout::{StridedOffsets, pick, pick_from, row_major_strides, split_at_axis};
use crate::tensor::HostTensor;

/// Same elements in the same row-major order, new shape.
pub(super) fn reshape(at: At<'_>, x: &HostTensor) -> HostTensor {
    at.tensor(x.data.clone())
}

/// Output axis `i` is input axis `perm[i]`: walk the output reading the input with its strides
/// permuted the same way.
pub(super) fn permute(
    at: At<'_>,
    perm: &[usize],
    x: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let strides = row_major_strides(x.dims());
    let permuted: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let offsets = StridedOffsets::new(at.out_dims(), &permuted, 0);
    at.picked(pick(&x.data, offsets))
}

/// Broadcast to the result's shape.
pub(super) fn expand(at: At<'_>, x: &HostTensor) -> Result<HostTensor, InterpError> {
    let offsets = StridedOffsets::broadcast(x.dims(), at.out_dims());
    at.picked(pick(&x.data, offsets))
}

/// `start..end` along `axis`: walk the (smaller) result with the input's strides, starting at
/// the offset of `start`.
pub(super) fn slice(
    at: At<'_>,
    axis: usize,
    start: usize,
    x: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let strides = row_major_strides(x.dims());
    let offsets = StridedOffsets::new(at.out_dims(), &strides, start * strides[axis]);
    at.picked(pick(&x.data, offsets))
}

/// Joined along `axis`. Seen as `[outer, extent, inner]` arrays, the result is, for each outer
/// index, the parts' contiguous `extent × inner` blocks one after another.
pub(super) fn concat(
    at: At<'_>,
    axis: usize,
    parts: &[&HostTensor],
) -> Result<HostTensor, InterpError> {
    let (outer, _, inner) = split_at_axis(at.out_dims(), axis);
    let blocks: Vec<usize> = parts.iter().map(|p| p.dims()[axis] * inner).collect();
    let picks = (0..outer).flat_map(|o| {
        blocks
            .iter()
            .enumerate()
            .flat_map(move |(p, &block)| (o * block..(o + 1) * block).map(move |i| (p, i)))
    });
    let data: Vec<_> = parts.iter().map(|p| &p.data).collect();
    at.picked(pick_from(&data, picks))
}

/// The parts one after another under a new leading axis.
pub(super) fn stack(at: At<'_>, parts: &[&HostTensor]) -> Result<HostTensor, InterpError> {
    let picks = parts
        .iter()
        .enumerate()
        .flat_map(|(p, part)| (0..part.ty.numel()).map(move |i| (p, i)));
    let data: Vec<_> = parts.iter().map(|p| &p.data).collect();
    at.picked(pick_from(&data, picks))
}
