//! What the lowering stores and what it inlines.

use crate::dtype::{DType, TensorType};
use crate::graph::GraphBuilder;
use crate::kernel::{BufferRole, KernelBody, Program};

use super::lower;

/// `a = g · up` read by two products that are summed: all of it in one kernel, or, when the two
/// products are outputs (two kernels), `a` stored once.
fn swiglu_like(two_outputs: bool) -> Program {
    let ty = || TensorType::new(DType::F32, vec![4, 8]);
    let mut b = GraphBuilder::new("swiglu_like");
    let g = b.input("g", ty()).unwrap();
    let up = b.input("up", ty()).unwrap();
    let c = b.input("c", ty()).unwrap();
    let e = b.input("e", ty()).unwrap();
    let a = b.mul(g, up).unwrap();
    let left = b.mul(a, c).unwrap();
    let right = b.mul(a, e).unwrap();
    if two_outputs {
        b.output("left", left).unwrap();
        b.output("right", right).unwrap();
    } else {
        let sum = b.add(left, right).unwrap();
        b.output("sum", sum).unwrap();
    }
    lower(&b.finish()).unwrap()
}

fn loop_nests(program: &Program) -> usize {
    (program.kernels.iter())
        .filter(|k| matches!(k.body, KernelBody::Loop(_)))
        .count()
}

fn temporaries(program: &Program) -> usize {
    (program.buffers.iter())
        .filter(|b| matches!(b.role, BufferRole::Temporary))
        .count()
}

/// A cheap value of stored operands, read by several nodes of one kernel, is computed in that
/// kernel instead of stored by one of its own; read by two kernels (two outputs), it is stored
/// once for both.
#[test]
fn a_value_all_of_whose_readers_share_a_kernel_is_computed_there() {
    let fused = swiglu_like(false);
    assert_eq!((loop_nests(&fused), temporaries(&fused)), (1, 1), "{fused}");
    assert_eq!(
        fused.loop_bytes(),
        4 * 4 * 32 + 4 * 32,
        "four inputs read, one output written"
    );
    let split = swiglu_like(true);
    assert_eq!(temporaries(&split), 3, "{split}");
}
