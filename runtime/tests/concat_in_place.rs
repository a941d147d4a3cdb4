//! Concatenations and stacks without copies: a part the lowering computes into a temporary only
//! to copy it is written by its producer (a loop kernel's store, a matmul's output view) straight
//! into its place in the assembled buffer. Each case checks which parts keep a copy loop, that
//! the compiled program computes what the interpreter does (and the JIT what the row evaluator
//! does, bit for bit, with no kernel left to the evaluator), and that the CUDA side takes the
//! program: the generator every loop kernel (no kernel reads a buffer it writes at other
//! elements), the library planner every GEMM writing into a region. Last, the same for a
//! matmul whose output is stored transposed.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use fathom_compiler::codegen::cuda_program;
use fathom_compiler::graph::{BinaryOp, ReduceOp, UnaryOp};
use fathom_compiler::kernel::{BufferId, KernelBody, Library, Program, Stmt};
use fathom_compiler::lower::lower;
use fathom_compiler::{DType, Graph, GraphBuilder, Tensor, TensorType};
use fathom_runtime::HostTensor;
use fathom_runtime::cpu::CpuProgram;
use fathom_runtime::cuda::LibraryPlan;
use fathom_runtime::cuda::library::StepArg;
use fathom_runtime::interp::{Feeds, evaluate};

fn f32_ty(dims: &[usize]) -> TensorType {
    TensorType::new(DType::F32, dims)
}

/// Deterministic values in -2..2.
fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + 1) * 7919 + seed * 104_729) % 997) as f32 / 249.25 - 2.0)
        .collect()
}

/// A graph with f32 inputs of the given shapes, built by `build`.
fn graph(
    inputs: &[(&'static str, &[usize])],
    build: impl FnOnce(&mut GraphBuilder, &[Tensor]),
) -> (Graph, HashMap<&'static str, HostTensor>) {
    let mut g = GraphBuilder::new("assemble");
    let tensors: Vec<Tensor> = inputs
        .iter()
        .map(|(name, dims)| g.input(name, f32_ty(dims)).unwrap())
        .collect();
    build(&mut g, &tensors);
    let feeds = inputs
        .iter()
        .enumerate()
        .map(|(i, (name, dims))| {
            let n = dims.iter().product();
            (*name, HostTensor::f32(dims.to_vec(), values(i, n)))
        })
        .collect();
    (g.finish(), feeds)
}

/// Lowers `graph` and checks the compiled program against the interpreter and the row
/// evaluator, and that the CUDA generator and library planner take it; returns the program.
fn compiled(graph: &Graph, inputs: &HashMap<&'static str, HostTensor>) -> Program {
    let program = lower(graph).unwrap();
    cuda_program(&program).unwrap();
    LibraryPlan::of(&program, None).unwrap();
    let feeds = Feeds::new(inputs, &());
    let want = evaluate(graph, &feeds).unwrap();
    let jit = CpuProgram::new(program.clone());
    let report = jit.jit_report().unwrap();
    assert!(report.fallbacks.is_empty(), "{:?}", report.fallbacks);
    let got = jit.run(&feeds).unwrap();
    let rows = CpuProgram::without_jit(program.clone())
        .run(&feeds)
        .unwrap();
    for (name, want) in want.iter() {
        let (got, row) = (got.get(name).unwrap(), rows.get(name).unwrap());
        let (g, r, w) = (
            got.as_f32().unwrap(),
            row.as_f32().unwrap(),
            want.as_f32().unwrap(),
        );
        assert!(
            g.iter().zip(r).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: the JIT differs from the row evaluator"
        );
        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * max.max(1.0),
                "{name}[{i}] = {a}, the interpreter has {b}"
            );
        }
    }
    program
}

/// The kernels named after `what` (`k3_concat`, `k5_stack`).
fn kernels(program: &Program, what: &str) -> usize {
    program
        .kernels
        .iter()
        .filter(|k| k.name.split('_').skip(1).any(|w| w == what))
        .count()
}

/// Whether the kernels named after `what` store constants, reading no buffer.
fn fills_only(program: &Program, what: &str) -> bool {
    program
        .kernels
        .iter()
        .filter(|k| k.name.split('_').skip(1).any(|w| w == what))
        .all(|k| k.reads_and_writes().0.is_empty())
}

/// The buffers the program's kernels write.
fn written(program: &Program) -> Vec<BufferId> {
    program
        .kernels
        .iter()
        .flat_map(|k| k.reads_and_writes().1)
        .collect()
}

/// Whether a matmul writes its result into `buffer`.
fn matmul_writes(program: &Program, buffer: BufferId) -> bool {
    program.kernels.iter().any(|k| {
        matches!(&k.body, KernelBody::Library(Library::MatMul { out, .. }) if out.buffer == buffer)
    })
}

#[test]
fn loop_results_matmuls_reductions_and_zeros_are_written_in_place() {
    let (graph, inputs) = graph(&[("x", &[4, 6]), ("w", &[6, 5])], |g, t| {
        let (x, w) = (t[0], t[1]);
        // An elementwise chain, a matmul, a row sum, a row max without its axis (stacked
        // below) and broadcast zeros, as autodiff writes the adjoint of a slice.
        let square = g.mul(x, x).unwrap();
        let shifted = g.offset(square, 1.0).unwrap();
        let product = g.matmul(x, w).unwrap();
        let sum = g.reduce(ReduceOp::Sum, x, 1, true).unwrap();
        let zero = g.scalar(0.0, DType::F32).unwrap();
        let zeros = g.expand(zero, &[4, 2]).unwrap();
        let y = g.concat(&[shifted, product, sum, zeros], 1).unwrap();
        // The concatenation read by a later kernel, not only returned.
        let doubled = g.scale(y, 2.0).unwrap();
        g.output("y", doubled).unwrap();
    });
    let program = compiled(&graph, &inputs);
    // The zeros are a fill, the one kernel of the concatenation, which reads nothing.
    assert_eq!(kernels(&program, "concat"), 1, "{program}");
    assert!(fills_only(&program, "concat"), "{program}");
    // Three loop kernels and the matmul write the one assembled buffer (then the scaling).
    let writes = written(&program);
    let assembled = writes[0];
    assert_eq!(writes.iter().filter(|&&b| b == assembled).count(), 4);
    assert!(matmul_writes(&program, assembled));
    assert_eq!(program.kernels.len(), 5, "{program}");
}

#[test]
fn stack_parts_are_written_in_place_and_inputs_keep_their_copy() {
    let (graph, inputs) = graph(&[("x", &[3, 4]), ("w", &[4, 4])], |g, t| {
        let (x, w) = (t[0], t[1]);
        let e = g.exp(x).unwrap();
        let p = g.matmul(x, w).unwrap();
        let m = g.reduce(ReduceOp::Max, x, 1, false).unwrap();
        let m = g.reshape(m, &[3, 1]).unwrap();
        let m = g.expand(m, &[3, 4]).unwrap();
        let y = g.stack(&[e, p, x, m]).unwrap();
        g.output("y", y).unwrap();
    });
    let program = compiled(&graph, &inputs);
    // The input is copied; the exponentials and the product are written in place. The
    // broadcast max is a view of the max's buffer: copied.
    assert_eq!(kernels(&program, "stack"), 2, "{program}");
    let y = program.output("y").unwrap();
    assert!(matmul_writes(&program, y));
}

#[test]
fn a_part_with_another_user_that_needs_its_own_buffer_keeps_its_copy() {
    let (graph, inputs) = graph(&[("x", &[4, 6])], |g, t| {
        let x = t[0];
        // Read by the concatenation and by a reshape (a copy of a strided region).
        let reshaped = g.neg(x).unwrap();
        let r = g.reshape(reshaped, &[24]).unwrap();
        g.output("r", r).unwrap();
        // Read by the concatenation and returned.
        let returned = g.exp(x).unwrap();
        g.output("e", returned).unwrap();
        // Read by the concatenation and by an elementwise kernel: written in place, and the
        // other user reads it there.
        let shared = g.unary(UnaryOp::Sigmoid, x).unwrap();
        let other = g.binary(BinaryOp::Mul, shared, x).unwrap();
        let other = g.reduce(ReduceOp::Sum, other, 1, false).unwrap();
        g.output("s", other).unwrap();
        let y = g.concat(&[reshaped, returned, shared], 0).unwrap();
        g.output("y", y).unwrap();
    });
    let program = compiled(&graph, &inputs);
    assert_eq!(kernels(&program, "concat"), 2, "{program}");
}

#[test]
fn a_part_used_twice_is_copied_and_the_others_are_written_in_place() {
    let (graph, inputs) = graph(&[("x", &[2, 3, 4])], |g, t| {
        let twice = g.exp(t[0]).unwrap();
        let once = g.neg(t[0]).unwrap();
        let y = g.concat(&[twice, once, twice], 1).unwrap();
        g.output("y", y).unwrap();
    });
    let program = compiled(&graph, &inputs);
    assert_eq!(kernels(&program, "concat"), 2, "{program}");
}

#[test]
fn a_part_computed_from_another_part_reads_its_own_buffer() {
    // The second and third parts read the first, which is written in place: their kernels
    // would read the buffer they write at other elements, so they get buffers of their own
    // and are copied. In the second concatenation, a part is a view of the other: copying it
    // would read the assembled buffer too, so the other (read through a movement) keeps a
    // buffer of its own, and both are copied.
    let (graph, inputs) = graph(&[("x", &[4, 4]), ("w", &[4, 4])], |g, t| {
        let (x, w) = (t[0], t[1]);
        let first = g.exp(x).unwrap();
        let second = g.neg(first).unwrap();
        let third = g.matmul(first, w).unwrap();
        let y = g.concat(&[first, second, third], 1).unwrap();
        g.output("y", y).unwrap();
        let a = g.sigmoid(x).unwrap();
        let a_t = g.transpose(a).unwrap();
        let z = g.concat(&[a, a_t], 0).unwrap();
        g.output("z", z).unwrap();
    });
    let program = compiled(&graph, &inputs);
    // (`compiled` checked that no kernel reads what it writes at other elements: the JIT
    // compiled every kernel and the CUDA generator took them.)
    assert_eq!(kernels(&program, "concat"), 4, "{program}");
}

#[test]
fn nested_concatenations_write_into_the_outermost_buffer() {
    // Rotary embedding's two halves concatenated, then joined to the un-rotated part, as MLA
    // builds its queries; and a stack of concatenations.
    let (graph, inputs) = graph(&[("x", &[2, 3, 8]), ("c", &[3, 2])], |g, t| {
        let (x, c) = (t[0], t[1]);
        let nope = g.slice(x, 2, 0, 4).unwrap();
        let first = g.slice(x, 2, 4, 6).unwrap();
        let second = g.slice(x, 2, 6, 8).unwrap();
        let a = g.mul(first, c).unwrap();
        let b = g.mul(second, c).unwrap();
        let a = g.sub(a, b).unwrap();
        let b = g.mul(second, c).unwrap();
        let rope = g.concat(&[a, b], 2).unwrap();
        let query = g.concat(&[nope, rope], 2).unwrap();
        g.output("query", query).unwrap();
        let e = g.exp(c).unwrap();
        let n = g.neg(c).unwrap();
        let en = g.concat(&[e, n], 1).unwrap();
        let ne = g.concat(&[n, e], 1).unwrap();
        let s = g.stack(&[en, ne]).unwrap();
        g.output("s", s).unwrap();
    });
    let program = compiled(&graph, &inputs);
    // The slice of the input is copied; the rotated halves are written in place, two levels
    // down. In the stack, `e` and `n` are each read by two concatenations: they keep buffers
    // of their own and are copied into both, which write straight into the stack's buffer.
    assert_eq!(kernels(&program, "concat"), 5, "{program}");
    assert_eq!(kernels(&program, "stack"), 0, "{program}");
    let query = program.output("query").unwrap();
    let stores_into_query = program
        .kernels
        .iter()
        .filter(|k| match &k.body {
            KernelBody::Loop(nest) => nest
                .body
                .iter()
                .any(|s| matches!(s, Stmt::Store { view, .. } if view.buffer == query)),
            KernelBody::Library(_) => false,
        })
        .count();
    assert_eq!(stores_into_query, 3, "{program}");
}

#[test]
fn a_reshaped_or_transposed_result_is_written_under_its_place() {
    let (graph, inputs) = graph(
        &[
            ("x", &[2, 3, 4]),
            ("y", &[2, 5]),
            ("a", &[4, 3]),
            ("b", &[3, 5]),
            ("c", &[2, 4]),
        ],
        |g, t| {
            let (x, y, a, b, c) = (t[0], t[1], t[2], t[3], t[4]);
            // A loop result reshaped (as autodiff reshapes the gradients it concatenates): the
            // loop stores into the place with the reshape undone.
            let e = g.exp(x).unwrap();
            let flat = g.reshape(e, &[2, 12]).unwrap();
            let joined = g.concat(&[flat, y], 1).unwrap();
            g.output("joined", joined).unwrap();
            // A matmul's result transposed: the GEMM writes its output column-major there.
            let p = g.matmul(a, b).unwrap();
            let pt = g.transpose(p).unwrap();
            let n = g.neg(c).unwrap();
            let stacked = g.concat(&[pt, n], 0).unwrap();
            g.output("stacked", stacked).unwrap();
        },
    );
    let program = compiled(&graph, &inputs);
    // Only the input is copied.
    assert_eq!(kernels(&program, "concat"), 1, "{program}");
    assert_eq!(kernels(&program, "copy"), 0, "{program}");
    let stacked = program.output("stacked").unwrap();
    assert!(matmul_writes(&program, stacked));
}

#[test]
fn a_reshape_that_merges_strided_axes_leaves_its_operand_a_buffer() {
    // Under its place (rows 6 apart) the flat operand would need rows 4 apart: no view, so
    // the operand gets a buffer of its own and the reshape of it is copied.
    let (graph, inputs) = graph(&[("x", &[24]), ("y", &[6, 2])], |g, t| {
        let e = g.exp(t[0]).unwrap();
        let grid = g.reshape(e, &[6, 4]).unwrap();
        let joined = g.concat(&[grid, t[1]], 1).unwrap();
        g.output("joined", joined).unwrap();
    });
    let program = compiled(&graph, &inputs);
    assert_eq!(kernels(&program, "concat"), 2, "{program}");
}

#[test]
fn broadcast_zeros_are_filled_in_place_of_a_copy() {
    // The adjoint of two slices, as autodiff writes it: each gradient concatenated with zeros
    // (one zeros tensor shared by both), then summed.
    let (graph, inputs) = graph(&[("x", &[3, 4])], |g, t| {
        let first = g.exp(t[0]).unwrap();
        let second = g.sigmoid(t[0]).unwrap();
        let zero = g.scalar(0.0, DType::F32).unwrap();
        let zeros = g.expand(zero, &[3, 4]).unwrap();
        let a = g.concat(&[first, zeros], 1).unwrap();
        let b = g.concat(&[zeros, second], 1).unwrap();
        let sum = g.add(a, b).unwrap();
        g.output("sum", sum).unwrap();
    });
    let program = compiled(&graph, &inputs);
    // Two fills, no buffer of zeros, no copy.
    assert_eq!(kernels(&program, "concat"), 2, "{program}");
    assert!(fills_only(&program, "concat"), "{program}");
    assert_eq!(program.kernels.len(), 5, "{program}");
}

/// Not a concatenation, the same idea: a matmul read only through a transpose that is a graph
/// output (a weight gradient `xᵀ·dy` stored as the weight's `[out, in]`) is computed as the
/// transposed product `dyᵀ·x` straight into the output's buffer — no copy kernel, and the GEMM
/// writes contiguous rows on every backend. A batched one transposes each matrix.
#[test]
fn a_transposed_matmul_output_is_the_transposed_product_without_a_copy() {
    let (g, inputs) = graph(&[("x", &[6, 5]), ("dy", &[6, 3])], |g, t| {
        let xt = g.transpose(t[0]).unwrap();
        let w_grad = g.matmul(xt, t[1]).unwrap();
        let stored = g.transpose(w_grad).unwrap();
        g.output("grad", stored).unwrap();
    });
    let program = compiled(&g, &inputs);
    assert_eq!(kernels(&program, "copy"), 0, "{program}");
    let calls: Vec<_> = program
        .kernels
        .iter()
        .filter_map(|k| match &k.body {
            KernelBody::Library(Library::MatMul { m, n, out, .. }) => {
                Some((*m, *n, out.strides.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(calls, [(3, 5, vec![5, 1])]);

    let (g, inputs) = graph(&[("a", &[2, 4, 3]), ("b", &[2, 3, 5])], |g, t| {
        let product = g.matmul(t[0], t[1]).unwrap();
        let stored = g.permute(product, &[0, 2, 1]).unwrap();
        g.output("product_t", stored).unwrap();
    });
    let program = compiled(&g, &inputs);
    assert_eq!(kernels(&program, "copy"), 0, "{program}");
}

/// An E4M3 rounding of a reshaped temporary reads the temporary as it is (no copy into the
/// reshaped shape) and is tiled in its own shape: here `[2, 24]` in 2×4 tiles, where the
/// temporary's `[2, 3, 8]` would give other tiles (the interpreter's values tell them apart).
#[test]
fn a_rounding_reads_a_reshaped_temporary_where_it_lies() {
    use fathom_compiler::graph::QuantFormat;

    let (graph, inputs) = graph(&[("x", &[2, 3, 8])], |g, x| {
        let three = g.scalar(3.0, DType::F32).unwrap();
        let t = g.mul(x[0], three).unwrap();
        let flat = g.reshape(t, &[2, 24]).unwrap();
        let rounded = g
            .quantize_dequantize(flat, QuantFormat::E4M3, (2, 4), false)
            .unwrap();
        g.output("rounded", rounded).unwrap();
    });
    let program = compiled(&graph, &inputs);
    assert_eq!(kernels(&program, "copy"), 0, "{program}");
    let rounding = program.kernels.iter().find_map(|k| match &k.body {
        KernelBody::Library(Library::QuantizeDequantize { x, .. }) => Some(*x),
        _ => None,
    });
    let x = rounding.unwrap();
    assert_eq!(program.buffer(x).ty.dims(), [2, 3, 8]);
    // The GPU's rounding too: rows and columns of the output's shape.
    let plan = LibraryPlan::of(&program, None).unwrap();
    let steps = plan.calls.iter().flatten().flat_map(|c| &c.steps);
    let args: Vec<&[StepArg]> = steps.map(|s| &s.args[2..4]).collect();
    assert_eq!(args, [[StepArg::I32(2), StepArg::I32(24)]]);
}
