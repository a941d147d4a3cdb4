//! Index maps from a loop nest's domain to a tensor's coordinates, and strided views.
//!
//! Every movement op but reshape is an affine change of coordinates, so an expression reading
//! through permutes, slices and broadcasts still reads each buffer through one strided
//! [`View`]: the lowering carries an [`Affine`] map down the expression tree and composes it
//! into the views at the leaves.

use crate::kernel::{BufferId, View};

/// `coord[j] = offset[j] + Σ_i coef[j][i] · domain[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Affine {
    pub offset: Vec<isize>,
    pub coef: Vec<Vec<isize>>,
}

impl Affine {
    /// The identity on a domain of `rank` axes.
    pub fn identity(rank: usize) -> Self {
        Affine {
            offset: vec![0; rank],
            coef: (0..rank)
                .map(|j| (0..rank).map(|i| isize::from(i == j)).collect())
                .collect(),
        }
    }

    /// A permutation of the domain: `coord[j] = domain[order[j]]`.
    pub fn picking(order: &[usize], domain_rank: usize) -> Self {
        Affine {
            offset: vec![0; order.len()],
            coef: order
                .iter()
                .map(|&o| (0..domain_rank).map(|i| isize::from(i == o)).collect())
                .collect(),
        }
    }

    pub fn domain_rank(&self) -> usize {
        self.coef.first().map_or(0, Vec::len)
    }

    /// The map to an operand that broadcasts (NumPy rules) from `from` to this map's shape:
    /// axes are right-aligned and an operand extent of 1 against a larger one pins the
    /// coordinate to 0.
    pub fn broadcast_to_operand(&self, from: &[usize], operand: &[usize]) -> Self {
        let lead = from.len() - operand.len();
        let domain_rank = self.domain_rank();
        let mut offset = Vec::with_capacity(operand.len());
        let mut coef = Vec::with_capacity(operand.len());
        for (j, &extent) in operand.iter().enumerate() {
            if extent == 1 && from[lead + j] != 1 {
                offset.push(0);
                coef.push(vec![0; domain_rank]);
            } else {
                offset.push(self.offset[lead + j]);
                coef.push(self.coef[lead + j].clone());
            }
        }
        Affine { offset, coef }
    }

    /// Through a permute: input axis `perm[i]` is output axis `i`.
    pub fn through_permute(&self, perm: &[usize]) -> Self {
        let mut offset = vec![0; perm.len()];
        let mut coef = vec![Vec::new(); perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            offset[p] = self.offset[i];
            coef[p] = self.coef[i].clone();
        }
        Affine { offset, coef }
    }

    /// Through a slice starting at `start` along `axis`.
    pub fn through_slice(&self, axis: usize, start: usize) -> Self {
        let mut out = self.clone();
        out.offset[axis] += start as isize;
        out
    }

    /// Whether any coordinate moves along domain axis `i`.
    pub fn depends_on(&self, i: usize) -> bool {
        self.coef.iter().any(|row| row[i] != 0)
    }
}

/// A view of a buffer with a shape: `element(c) = offset + Σ c_d · strides[d]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StridedView {
    pub buffer: BufferId,
    pub offset: isize,
    pub shape: Vec<usize>,
    pub strides: Vec<isize>,
}

impl StridedView {
    /// A whole buffer, row-major.
    pub fn contiguous(buffer: BufferId, shape: &[usize]) -> Self {
        StridedView {
            buffer,
            offset: 0,
            shape: shape.to_vec(),
            strides: row_major_strides(shape),
        }
    }

    /// Whether this is the whole buffer in row-major order.
    pub fn is_contiguous(&self) -> bool {
        self.offset == 0
            && self
                .shape
                .iter()
                .zip(&self.strides)
                .zip(row_major_strides(&self.shape))
                .all(|((&e, &s), r)| e == 1 || s == r)
    }

    /// The kernel view reading this tensor at the coordinates `map` gives for each domain
    /// point.
    pub fn compose(&self, map: &Affine) -> View {
        let domain_rank = map.domain_rank();
        let mut offset = self.offset;
        let mut strides = vec![0isize; domain_rank];
        for (j, &stride) in self.strides.iter().enumerate() {
            offset += stride * map.offset[j];
            for (i, s) in strides.iter_mut().enumerate() {
                *s += stride * map.coef[j][i];
            }
        }
        View {
            buffer: self.buffer,
            offset: usize::try_from(offset).expect("views stay inside their buffer"),
            strides,
        }
    }

    pub fn permute(&self, perm: &[usize]) -> Self {
        StridedView {
            buffer: self.buffer,
            offset: self.offset,
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
        }
    }

    pub fn slice(&self, axis: usize, start: usize, end: usize) -> Self {
        let mut out = self.clone();
        out.offset += self.strides[axis] * start as isize;
        out.shape[axis] = end - start;
        out
    }

    /// A new axis of extent 1 at `axis` (stride 0: it moves nowhere).
    pub fn unsqueeze(&self, axis: usize) -> Self {
        let mut out = self.clone();
        out.shape.insert(axis, 1);
        out.strides.insert(axis, 0);
        out
    }

    /// Broadcast to `shape` (stride 0 on stretched and new axes).
    pub fn expand(&self, shape: &[usize]) -> Self {
        let lead = shape.len() - self.shape.len();
        let strides = (0..shape.len())
            .map(|d| {
                if d < lead || (self.shape[d - lead] == 1 && shape[d] != 1) {
                    0
                } else {
                    self.strides[d - lead]
                }
            })
            .collect();
        StridedView {
            buffer: self.buffer,
            offset: self.offset,
            shape: shape.to_vec(),
            strides,
        }
    }

    /// The same elements in row-major order under a new shape, when the strides allow it
    /// without a copy (PyTorch's `view` rule: axes may split, and merge only where the memory
    /// of the merged axes is contiguous).
    pub fn reshape(&self, shape: &[usize]) -> Option<Self> {
        // Drop extent-1 axes, which constrain nothing.
        let old: Vec<(usize, isize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(e, _)| **e != 1)
            .map(|(e, s)| (*e, *s))
            .collect();
        let mut strides = vec![0isize; shape.len()];
        let (mut oi, mut ni) = (0usize, 0usize);
        while ni < shape.len() || oi < old.len() {
            // Skip new extent-1 axes.
            if ni < shape.len() && shape[ni] == 1 {
                strides[ni] = 0;
                ni += 1;
                continue;
            }
            if oi >= old.len() || ni >= shape.len() {
                return None;
            }
            // Gather a run of old axes and a run of new axes with the same element count.
            let (mut old_count, mut new_count) = (old[oi].0, shape[ni]);
            let (old_start, new_start) = (oi, ni);
            oi += 1;
            ni += 1;
            while old_count != new_count {
                if old_count < new_count {
                    if oi >= old.len() {
                        return None;
                    }
                    old_count *= old[oi].0;
                    oi += 1;
                } else {
                    while ni < shape.len() && shape[ni] == 1 {
                        ni += 1;
                    }
                    if ni >= shape.len() {
                        return None;
                    }
                    new_count *= shape[ni];
                    ni += 1;
                }
            }
            // The old run must be contiguous among itself to be re-split.
            for k in old_start..oi - 1 {
                if old[k].1 != old[k + 1].1 * old[k + 1].0 as isize {
                    return None;
                }
            }
            let mut stride = old[oi - 1].1;
            for n in (new_start..ni).rev() {
                strides[n] = stride;
                stride *= shape[n] as isize;
            }
        }
        Some(StridedView {
            buffer: self.buffer,
            offset: self.offset,
            shape: shape.to_vec(),
            strides,
        })
    }
}

pub fn row_major_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut stride = 1isize;
    for (s, &e) in strides.iter_mut().zip(shape).rev() {
        *s = stride;
        stride *= e as isize;
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(shape: &[usize]) -> StridedView {
        StridedView::contiguous(BufferId(0), shape)
    }

    #[test]
    fn reshape_splits_and_merges_contiguous_axes() {
        let v = view(&[2, 3, 4]);
        assert_eq!(v.reshape(&[6, 4]).unwrap().strides, [4, 1]);
        assert_eq!(v.reshape(&[2, 3, 2, 2]).unwrap().strides, [12, 4, 2, 1]);
        assert_eq!(v.reshape(&[1, 24, 1]).unwrap().strides, [0, 1, 0]);
        // A transposed view can split but not merge across the transposition.
        let t = v.permute(&[0, 2, 1]); // [2, 4, 3] strides [12, 1, 4]
        assert_eq!(t.reshape(&[2, 2, 2, 3]).unwrap().strides, [12, 2, 1, 4]);
        assert!(t.reshape(&[2, 12]).is_none());
    }

    #[test]
    fn compose_follows_the_map() {
        let v = view(&[4, 5]).permute(&[1, 0]); // [5, 4], strides [1, 5]
        let map = Affine::identity(2).through_slice(0, 1);
        let k = v.compose(&map);
        assert_eq!((k.offset, k.strides), (1, vec![1, 5]));
        assert!(view(&[3, 1, 2]).is_contiguous());
        assert!(!v.is_contiguous());
    }
}
