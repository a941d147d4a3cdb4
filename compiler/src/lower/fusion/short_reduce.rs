//! Reductions over a few elements of an outer axis, written as a sum of that many loads.
//!
//! A reduction's loop puts the reduced axis innermost, so each row's elements are consecutive
//! in the domain. For a short axis that is not the input's last one (summing the top-k experts'
//! outputs of every token, the batch axis of a norm's weight gradient) those rows are a few
//! elements each, far apart in memory: the code runs one element at a time with a row's setup
//! around every few loads. Spelled out as `x[.., 0, ..] + x[.., 1, ..] + …` over the output's
//! own axes, the same kernel runs along the input's contiguous last axis, four lanes at a time.

use crate::graph::{BinaryOp, NodeId, Op, ReduceOp};
use crate::kernel::Expr;

use super::super::{Affine, KernelBuilder, LowerError};
use super::Lowering;

/// Reduced axes up to this long are unrolled (when they are not the input's last axis).
const UNROLL_MAX: usize = 8;
/// ... and only when the output's innermost axis has at least this many elements to run along.
const OUTPUT_INNER_MIN: usize = 4;

impl Lowering<'_> {
    /// The kernel of reduction `id` as one expression over its output's domain, when its axis
    /// is short and not the input's last: the kernel (its row statements) and the value to
    /// store at every output element. `None` leaves it to the general row reduction.
    pub(super) fn unrolled_reduction(
        &mut self,
        id: NodeId,
    ) -> Result<Option<(KernelBuilder, Expr)>, LowerError> {
        let node = self.graph.node(id);
        let Op::Reduce { op, axis, keep_dim } = node.op else {
            return Ok(None);
        };
        let input = node.inputs[0];
        let in_dims = self.dims(input).to_vec();
        let out_dims = node.ty.dims().to_vec();
        let extent = in_dims[axis];
        let unrollable = matches!(op, ReduceOp::Sum | ReduceOp::Mean)
            && (2..=UNROLL_MAX).contains(&extent)
            && axis + 1 < in_dims.len()
            && out_dims.last().is_some_and(|&n| n >= OUTPUT_INNER_MIN);
        if !unrollable {
            return Ok(None);
        }
        let rank = out_dims.len();
        let mut k = KernelBuilder::new(out_dims);
        k.nodes.push(id);
        let mut sum: Option<Expr> = None;
        for i in 0..extent {
            // A row reduction fused into the input is computed for each term's own slice.
            k.row_of.clear();
            let term = self.expr(&mut k, input, &slice_at(axis, i, keep_dim, rank))?;
            sum = Some(match sum {
                None => term,
                Some(acc) => Expr::Binary(BinaryOp::Add, Box::new(acc), Box::new(term)),
            });
        }
        let sum = sum.expect("at least two terms");
        let value = match op {
            ReduceOp::Mean => Expr::Binary(
                BinaryOp::Div,
                Box::new(sum),
                Box::new(Expr::Constant(extent as f64)),
            ),
            _ => sum,
        };
        Ok(Some((k, value)))
    }
}

/// The map from the output's domain (`rank` axes) to the input's coordinates with the reduced
/// `axis` pinned at `index`: the output's axes in order around it (with `keep_dim` the output
/// has the axis too, at extent 1, and it is replaced).
fn slice_at(axis: usize, index: usize, keep_dim: bool, rank: usize) -> Affine {
    let in_rank = if keep_dim { rank } else { rank + 1 };
    let unit = |i: usize| (0..rank).map(|d| isize::from(d == i)).collect::<Vec<_>>();
    let mut map = Affine {
        offset: vec![0; in_rank],
        coef: Vec::with_capacity(in_rank),
    };
    for j in 0..in_rank {
        if j == axis {
            map.offset[j] = index as isize;
            map.coef.push(vec![0; rank]);
        } else if j < axis || keep_dim {
            map.coef.push(unit(j));
        } else {
            map.coef.push(unit(j - 1));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::slice_at;

    #[test]
    fn the_pinned_axis_is_dropped_from_the_output_domain_or_replaced_in_it() {
        // Input [a, k, c] -> output [a, c]: coordinate (a, i, c).
        let dropped = slice_at(1, 3, false, 2);
        assert_eq!(dropped.offset, vec![0, 3, 0]);
        assert_eq!(dropped.coef, vec![vec![1, 0], vec![0, 0], vec![0, 1]]);
        // Input [a, k, c] -> output [a, 1, c]: the same coordinates from a rank-3 domain.
        let kept = slice_at(1, 2, true, 3);
        assert_eq!(kept.offset, vec![0, 2, 0]);
        assert_eq!(kept.coef, vec![vec![1, 0, 0], vec![0, 0, 0], vec![0, 0, 1]]);
    }
}
