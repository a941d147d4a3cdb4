//! The JIT against the row evaluator (`loops::run`), bit for bit, on random data.
//!
//! Every comparison is exact: the generated code does the reference's operations in the
//! reference's order and calls the reference's own functions for `exp`, `log`, sigmoid and the
//! narrow-float roundings. The one allowance is NaN payloads: any NaN matches any NaN (Rust
//! does not promise which NaN an operation returns).

#![allow(clippy::unwrap_used)]

mod exprs;
mod program;
mod stmts;

use fathom_compiler::graph::{BinaryOp, CompareOp, ReduceOp, UnaryOp};
use fathom_compiler::kernel::{
    Buffer, BufferId, BufferRole, Expr, Kernel, KernelBody, LoopNest, Program, Stmt, View,
};
use fathom_compiler::{DType, TensorType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::{Storage, loops};
use super::{JitError, JitProgram};

fn view(buffer: u32, offset: usize, strides: &[isize]) -> View {
    View {
        buffer: BufferId(buffer),
        offset,
        strides: strides.to_vec(),
    }
}

fn load(buffer: u32, offset: usize, strides: &[isize]) -> Expr {
    Expr::Load(view(buffer, offset, strides))
}

fn unary(op: UnaryOp, a: Expr) -> Expr {
    Expr::Unary(op, Box::new(a))
}

fn binary(op: BinaryOp, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}

fn compare(op: CompareOp, a: Expr, b: Expr) -> Expr {
    Expr::Compare(op, Box::new(a), Box::new(b))
}

fn select(c: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(b))
}

fn cast(to: DType, a: Expr) -> Expr {
    Expr::Cast(to, Box::new(a))
}

fn store(buffer: u32, offset: usize, strides: &[isize], value: Expr) -> Stmt {
    Stmt::Store {
        view: view(buffer, offset, strides),
        value,
    }
}

fn store_row(buffer: u32, offset: usize, strides: &[isize], value: Expr) -> Stmt {
    Stmt::StoreRow {
        view: view(buffer, offset, strides),
        value,
    }
}

fn reduce(row: usize, op: ReduceOp, value: Expr) -> Stmt {
    Stmt::Reduce { row, op, value }
}

/// Dense strides of `dims`.
fn dense(dims: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; dims.len()];
    let mut step = 1isize;
    for d in (0..dims.len()).rev() {
        strides[d] = step;
        step *= dims[d] as isize;
    }
    strides
}

/// A program of `nest` over buffers of the given element counts.
fn program(sizes: &[usize], nest: LoopNest) -> Program {
    Program {
        name: "jit_test".to_owned(),
        buffers: sizes
            .iter()
            .map(|&n| Buffer {
                ty: TensorType::new(DType::F32, vec![n]),
                role: BufferRole::Temporary,
            })
            .collect(),
        kernels: vec![Kernel {
            name: "k0_test".to_owned(),
            nodes: Vec::new(),
            origin: String::new(),
            body: KernelBody::Loop(nest),
        }],
        outputs: Vec::new(),
    }
}

/// Which values fill the buffers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Values {
    /// Uniform in [-4, 4).
    Plain,
    /// Plain, with about one value in six NaN, ±0, ±inf, huge or tiny.
    Special,
}

fn random_buffers(sizes: &[usize], values: Values, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    const SPECIAL: [f32; 9] = [
        f32::NAN,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e-30,
        1.0,
        3.0,
    ];
    sizes
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    if values == Values::Special && rng.random_range(0..6) == 0 {
                        SPECIAL[rng.random_range(0..SPECIAL.len())]
                    } else {
                        rng.random_range(-4.0f32..4.0)
                    }
                })
                .collect()
        })
        .collect()
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Compiles `nest` (which must compile), runs it and the row evaluator on the same random
/// buffers, and asserts every buffer ends up the same.
fn check(sizes: &[usize], nest: LoopNest, values: Values) {
    for seed in 0..3 {
        check_on(&nest, random_buffers(sizes, values, seed));
    }
}

/// `check` on given buffers.
fn check_on(nest: &LoopNest, buffers: Vec<Vec<f32>>) {
    let sizes: Vec<usize> = buffers.iter().map(Vec::len).collect();
    let jit = JitProgram::compile(&program(&sizes, nest.clone()));
    let report = jit.report();
    assert!(report.fallbacks.is_empty(), "{:?}", report.fallbacks);
    assert_eq!(report.compiled, 1);
    // Buffers the kernel only reads are borrowed, as parameters are in a run.
    let written = written_buffers(nest);
    let mut want = storages(&buffers, &written);
    let mut got = storages(&buffers, &written);
    loops::run(nest, &mut want);
    jit.kernel(0).unwrap().run(&mut got);
    for (b, (g, w)) in got.iter().zip(&want).enumerate() {
        for (i, (&g, &w)) in g.iter().zip(w.iter()).enumerate() {
            assert!(
                same(g, w),
                "buffer {b}[{i}]: jit {g:e} ({:#x}), reference {w:e} ({:#x}) in {nest:?}",
                g.to_bits(),
                w.to_bits()
            );
        }
    }
}

/// Owned copies of the written buffers, the others borrowed.
fn storages<'a>(buffers: &'a [Vec<f32>], written: &[usize]) -> Vec<Storage<'a>> {
    buffers
        .iter()
        .enumerate()
        .map(|(b, v)| {
            if written.contains(&b) {
                Storage::Owned(v.clone())
            } else {
                Storage::Borrowed(v)
            }
        })
        .collect()
}

/// The buffers a statement of `nest` stores to.
fn written_buffers(nest: &LoopNest) -> Vec<usize> {
    nest.body
        .iter()
        .filter_map(|stmt| match stmt {
            Stmt::Store { view, .. } | Stmt::StoreRow { view, .. } => Some(view.buffer.index()),
            Stmt::Reduce { .. } => None,
        })
        .collect()
}

/// Why `nest` is left to the row evaluator.
fn fallback(sizes: &[usize], nest: LoopNest) -> JitError {
    let mut jit = JitProgram::compile(&program(sizes, nest));
    assert!(jit.kernel(0).is_none());
    let mut report = std::mem::take(&mut jit.report);
    assert_eq!(report.compiled, 0);
    report.fallbacks.pop().unwrap().1
}

/// `out[r, j] = value` over a `[rows, inner]` domain, with input 0 dense `[rows, inner]`
/// (`load(0, 0, &[inner, 1])`) and the output in buffer `buffers - 1`.
fn elementwise(rows: usize, inner: usize, inputs: usize, value: Expr) -> (Vec<usize>, LoopNest) {
    let n = rows * inner;
    let mut sizes = vec![n; inputs];
    sizes.push(n);
    let nest = LoopNest {
        domain: vec![rows, inner],
        body: vec![store(inputs as u32, 0, &[inner as isize, 1], value)],
    };
    (sizes, nest)
}

/// The inner extents every statement kind is tried at: unrolled scalar (3), scalar loop (5),
/// four lanes exactly (16), four lanes with a tail (37).
const INNER: [usize; 4] = [3, 5, 16, 37];

#[test]
fn cpu_programs_stay_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<super::super::CpuProgram>();
}

#[test]
fn refuses_views_outside_their_buffer() {
    let (mut sizes, nest) = elementwise(4, 8, 1, load(0, 1, &[8, 1]));
    assert!(matches!(
        fallback(&sizes, nest.clone()),
        JitError::OutOfBounds {
            high: 32,
            len: 32,
            ..
        }
    ));
    sizes[0] = 33;
    check(&sizes, nest, Values::Plain);
    let backwards = elementwise(4, 8, 1, load(0, 0, &[8, -1])).1;
    assert!(matches!(
        fallback(&[40, 32], backwards),
        JitError::OutOfBounds { low: -7, .. }
    ));
}

#[test]
fn refuses_kernels_reading_their_output_elsewhere_than_it_is_written() {
    // Every row reads row 0, which the first row overwrites.
    let (sizes, nest) = elementwise(2, 8, 1, load(1, 0, &[0, 1]));
    assert!(matches!(
        fallback(&sizes, nest),
        JitError::ReadsItsOutput {
            buffer: BufferId(1)
        }
    ));
    // The element it writes, but through a second store of the buffer.
    let nest = LoopNest {
        domain: vec![2, 8],
        body: vec![
            store(1, 0, &[8, 1], load(0, 0, &[8, 1])),
            store(1, 0, &[8, 1], load(1, 0, &[8, 1])),
        ],
    };
    assert!(matches!(
        fallback(&[16, 16], nest),
        JitError::ReadsItsOutput {
            buffer: BufferId(1)
        }
    ));
}

#[test]
fn refuses_rows_before_their_reduction() {
    let nest = LoopNest {
        domain: vec![2, 8],
        body: vec![
            store(1, 0, &[8, 1], Expr::Row(0)),
            reduce(0, ReduceOp::Sum, load(0, 0, &[8, 1])),
        ],
    };
    assert!(matches!(
        fallback(&[16, 16], nest),
        JitError::RowBeforeReduce { row: 0 }
    ));
}

#[test]
fn views_need_a_stride_per_outer_axis() {
    let (sizes, nest) = elementwise(2, 3, 1, load(0, 0, &[]));
    assert!(matches!(
        fallback(&sizes, nest),
        JitError::StrideRank {
            strides: 0,
            rank: 2,
            ..
        }
    ));
    // The reference reads a missing inner stride as 0 and ignores extra strides.
    for inner in INNER {
        let (sizes, nest) = elementwise(2, inner, 1, load(0, 0, &[1]));
        check(&sizes, nest, Values::Plain);
        let (sizes, nest) = elementwise(2, inner, 1, load(0, 0, &[inner as isize, 1, 7]));
        check(&sizes, nest, Values::Plain);
    }
}

#[test]
fn parallel_only_where_rows_write_disjoint_elements() {
    let plan = |sizes: &[usize], nest: &LoopNest| {
        super::plan::plan(nest, &program(sizes, nest.clone()).buffers)
            .unwrap()
            .parallel
    };
    let (sizes, nest) = elementwise(4, 8, 1, load(0, 0, &[8, 1]));
    assert!(plan(&sizes, &nest));
    // Every row writes the same eight elements.
    let overlapping = LoopNest {
        domain: vec![4, 8],
        body: vec![store(1, 0, &[0, 1], load(0, 0, &[8, 1]))],
    };
    assert!(!plan(&[32, 8], &overlapping));
    check(&[32, 8], overlapping, Values::Plain);
    // Two statements writing one buffer.
    let twice = LoopNest {
        domain: vec![4, 8],
        body: vec![
            store(1, 0, &[8, 1], load(0, 0, &[8, 1])),
            store_row(1, 0, &[8, 0], Expr::Constant(2.0)),
        ],
    };
    assert!(!plan(&[32, 32], &twice));
    check(&[32, 32], twice, Values::Plain);
}

#[test]
fn dumps_each_kernels_ir_and_machine_code() {
    let (sizes, nest) = elementwise(3, 16, 1, unary(UnaryOp::Exp, load(0, 0, &[16, 1])));
    let dir = tempfile::tempdir().unwrap();
    let jit = JitProgram::compile_dumping(&program(&sizes, nest), Some(dir.path().join("p")));
    assert_eq!(jit.report().compiled, 1);
    let ir = std::fs::read_to_string(dir.path().join("p/k0.clif")).unwrap();
    let code = std::fs::read_to_string(dir.path().join("p/k0.s")).unwrap();
    assert!(ir.contains("function") && ir.contains("f32x4"), "{ir}");
    // The four-lane exponential's multiplies, in x86 machine code.
    assert!(code.contains("mulps") && code.contains("ret"), "{code}");
}
