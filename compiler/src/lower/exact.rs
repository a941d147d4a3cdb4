//! Which products multiply values of a narrower float type held in f32.
//!
//! The bf16 precision policy rounds the operands of each Linear GEMM and of attention's
//! products with `cast<bf16>` and widens them back with `cast<f32>`, so the matmul itself is
//! f32 on values that are all bf16. A library call that knows this may multiply in bf16 (on
//! the CPU, `vdpbf16ps`; on a GPU, bf16 tensor cores): the products of two bf16 values are
//! exact in f32, so only the summation differs from the f32 GEMM, as it differs between any
//! two f32 GEMMs. Where the target's GEMM rounds as it reads, the lowering folds the round trips
//! into the products (`fusion::fold_round_trips`).

use crate::DType;
use crate::graph::{Graph, NodeId, Op};

/// The float type every value of `id` belongs to: its own dtype, or, for a node that only
/// widens a narrower float node to f32 (`cast<f32>`) or moves one's values (reshape, permute,
/// broadcast, slice, in any chain), that node's type.
fn value_type(graph: &Graph, id: NodeId) -> DType {
    let node = graph.node(id);
    match &node.op {
        Op::Cast { to: DType::F32 }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Expand { .. }
        | Op::Slice { .. } => {
            let inner = value_type(graph, node.inputs[0]);
            if inner.is_float() {
                inner
            } else {
                node.ty.dtype
            }
        }
        _ => node.ty.dtype,
    }
}

/// The narrower float type both operands of a product hold, when there is one a backend can
/// multiply in: bf16 (fp8 operands come scaled per tile and f16 is not used by any policy).
pub(super) fn exact_operands(graph: &Graph, a: NodeId, b: NodeId) -> Option<DType> {
    let both_bf16 = value_type(graph, a) == DType::BF16 && value_type(graph, b) == DType::BF16;
    both_bf16.then_some(DType::BF16)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::dtype::TensorType;
    use crate::graph::GraphBuilder;

    #[test]
    fn widened_and_moved_bf16_values_are_exact_in_bf16() {
        let mut g = GraphBuilder::new("exact");
        let x = g
            .input("x", TensorType::new(DType::F32, vec![4, 8]))
            .unwrap();
        let w = g
            .input("w", TensorType::new(DType::F32, vec![8, 6]))
            .unwrap();
        let x16 = g.cast(x, DType::BF16).unwrap();
        let x_wide = g.cast(x16, DType::F32).unwrap();
        let x_moved = g.reshape(x_wide, &[2, 2, 8]).unwrap();
        let w16 = g.cast(w, DType::BF16).unwrap();
        let w_wide = g.cast(w16, DType::F32).unwrap();
        let w_t = g.permute(w_wide, &[1, 0]).unwrap();
        // An f32 operand, or one computed from bf16 values, is not.
        let doubled = g.add(x_wide, x_wide).unwrap();
        let graph = g.finish();
        let exact = |a: crate::graph::Tensor, b: crate::graph::Tensor| {
            exact_operands(&graph, a.id(), b.id())
        };
        assert_eq!(exact(x_moved, w_wide), Some(DType::BF16));
        assert_eq!(exact(x_wide, w_t), Some(DType::BF16));
        assert_eq!(exact(x16, w16), Some(DType::BF16));
        assert_eq!(exact(x, w_wide), None);
        assert_eq!(exact(doubled, w_wide), None);
    }
}
