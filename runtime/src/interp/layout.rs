//! Row-major index arithmetic: strides, broadcasting, and picking elements by offset.
//!
//! Data-movement ops (permute, expand, slice, broadcasting in elementwise ops) are all "walk the
//! output in row-major order and read the input at `Σ index[i] · stride[i]`", with the input's
//! strides rearranged (permute), zeroed (broadcast) or offset (slice). [`StridedOffsets`] is that
//! walk.

use crate::tensor::Data;

/// Row-major strides of a tensor of extents `dims` (the last axis has stride 1).
pub(super) fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

/// Strides that read a row-major tensor of extents `dims` as if broadcast to `out_dims` (NumPy
/// rules): axes align on the right, and an axis the tensor lacks or has with extent 1 gets
/// stride 0, so every output index along it reads the same input element.
pub(super) fn broadcast_strides(dims: &[usize], out_dims: &[usize]) -> Vec<usize> {
    let own = row_major_strides(dims);
    let missing = out_dims.len() - dims.len();
    (0..out_dims.len())
        .map(|i| {
            if i < missing || dims[i - missing] == 1 {
                0
            } else {
                own[i - missing]
            }
        })
        .collect()
}

/// The input offsets `base + Σ index[i] · strides[i]` for every multi-index `index` of extents
/// `dims`, in row-major order of `index`.
#[derive(Debug)]
pub(super) struct StridedOffsets {
    dims: Vec<usize>,
    strides: Vec<usize>,
    index: Vec<usize>,
    /// The offset of `index`, or `None` once the walk is over.
    offset: Option<usize>,
    remaining: usize,
}

impl StridedOffsets {
    pub(super) fn new(dims: &[usize], strides: &[usize], base: usize) -> Self {
        debug_assert_eq!(dims.len(), strides.len());
        let remaining = dims.iter().product();
        StridedOffsets {
            dims: dims.to_vec(),
            strides: strides.to_vec(),
            index: vec![0; dims.len()],
            offset: (remaining > 0).then_some(base),
            remaining,
        }
    }

    /// Offsets into a row-major tensor of extents `dims` broadcast to `out_dims`.
    pub(super) fn broadcast(dims: &[usize], out_dims: &[usize]) -> Self {
        Self::new(out_dims, &broadcast_strides(dims, out_dims), 0)
    }
}

impl Iterator for StridedOffsets {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let current = self.offset?;
        self.remaining -= 1;
        // Advance the odometer: bump the last axis, carrying into earlier ones.
        let mut offset = current;
        self.offset = None;
        for axis in (0..self.dims.len()).rev() {
            self.index[axis] += 1;
            offset += self.strides[axis];
            if self.index[axis] < self.dims[axis] {
                self.offset = Some(offset);
                break;
            }
            offset -= self.strides[axis] * self.dims[axis];
            self.index[axis] = 0;
        }
        Some(current)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedOffsets {}

/// `dims` split around `axis`: (product of the extents before it, its extent, product after).
/// A row-major tensor is then an `[outer, len, inner]` array.
pub(super) fn split_at_axis(dims: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = dims[..axis].iter().product();
    let inner = dims[axis + 1..].iter().product();
    (outer, dims[axis], inner)
}

/// Element types of [`Data`], so data movement is written once for floats, ints and bools.
pub(super) trait Element: Copy {
    fn slice(data: &Data) -> Option<&[Self]>;
    fn wrap(values: Vec<Self>) -> Data;
}

impl Element for f32 {
    fn slice(data: &Data) -> Option<&[f32]> {
        match data {
            Data::Float(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(values: Vec<f32>) -> Data {
        Data::Float(values)
    }
}

impl Element for i64 {
    fn slice(data: &Data) -> Option<&[i64]> {
        match data {
            Data::Int(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(values: Vec<i64>) -> Data {
        Data::Int(values)
    }
}

impl Element for bool {
    fn slice(data: &Data) -> Option<&[bool]> {
        match data {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(values: Vec<bool>) -> Data {
        Data::Bool(values)
    }
}

/// The elements `parts[p][offset]` for each `(p, offset)` of `picks`, in order. `None` when the
/// parts hold different kinds of data or an offset is out of bounds (a bug of the caller).
pub(super) fn pick_from(
    parts: &[&Data],
    picks: impl Iterator<Item = (usize, usize)>,
) -> Option<Data> {
    fn typed<T: Element>(
        parts: &[&Data],
        picks: impl Iterator<Item = (usize, usize)>,
    ) -> Option<Data> {
        let slices: Vec<&[T]> = parts.iter().map(|d| T::slice(d)).collect::<Option<_>>()?;
        let values: Vec<T> = picks
            .map(|(p, offset)| slices.get(p)?.get(offset).copied())
            .collect::<Option<_>>()?;
        Some(T::wrap(values))
    }
    match parts.first()? {
        Data::Float(_) => typed::<f32>(parts, picks),
        Data::Int(_) => typed::<i64>(parts, picks),
        Data::Bool(_) => typed::<bool>(parts, picks),
    }
}

/// The elements `data[offset]` for each offset of `offsets`, in order.
pub(super) fn pick(data: &Data, offsets: impl Iterator<Item = usize>) -> Option<Data> {
    pick_from(&[data], offsets.map(|offset| (0, offset)))
}
