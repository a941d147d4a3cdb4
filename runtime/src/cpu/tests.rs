//! The storage pool across runs, and runs from several threads at once.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use fathom_compiler::graph::BinaryOp;
use fathom_compiler::kernel::{
    Buffer, BufferId, BufferRole, Expr, Kernel, KernelBody, LoopNest, Program, Stmt, View,
};
use fathom_compiler::{DType, TensorType};

use super::CpuProgram;
use crate::interp::Feeds;
use crate::tensor::{Data, HostTensor};

const LARGE: usize = 1 << 12;

fn buffer(n: usize, role: BufferRole) -> Buffer {
    Buffer {
        ty: TensorType::new(DType::F32, vec![n]),
        role,
    }
}

fn dense(buffer: u32) -> View {
    View {
        buffer: BufferId(buffer),
        offset: 0,
        strides: vec![1],
    }
}

fn copy(n: usize, from: Expr, to: u32) -> Kernel {
    Kernel {
        name: format!("k{to}_copy"),
        nodes: Vec::new(),
        origin: String::new(),
        body: KernelBody::Loop(LoopNest {
            domain: vec![n],
            body: vec![Stmt::Store {
                view: dense(to),
                value: from,
            }],
        }),
    }
}

/// `t = 2x`, `u = t + 1` (t dies), `small = u[..4]`: the small output starts when only the
/// large storage of `t` is free in the pool.
fn program() -> Program {
    Program {
        name: "pool".to_owned(),
        buffers: vec![
            buffer(LARGE, BufferRole::Input("x".to_owned())),
            buffer(LARGE, BufferRole::Temporary),
            buffer(LARGE, BufferRole::Temporary),
            buffer(4, BufferRole::Temporary),
        ],
        kernels: vec![
            copy(
                LARGE,
                Expr::Binary(
                    BinaryOp::Mul,
                    Box::new(Expr::Load(dense(0))),
                    Box::new(Expr::Constant(2.0)),
                ),
                1,
            ),
            copy(
                LARGE,
                Expr::Binary(
                    BinaryOp::Add,
                    Box::new(Expr::Load(dense(1))),
                    Box::new(Expr::Constant(1.0)),
                ),
                2,
            ),
            copy(4, Expr::Load(dense(2)), 3),
        ],
        outputs: vec![("small".to_owned(), BufferId(3))],
    }
}

#[test]
fn a_small_output_does_not_carry_a_large_pooled_allocation_away() {
    let compiled = CpuProgram::new(program());
    let x = (0..LARGE).map(|i| i as f32).collect();
    let inputs = HashMap::from([("x".to_owned(), HostTensor::f32([LARGE], x))]);
    for run in 0..3 {
        let mut outputs = compiled.run(&Feeds::new(&inputs, &())).unwrap();
        let (_, small) = outputs.outputs.pop().unwrap();
        let Data::Float(values) = small.data else {
            panic!("a float output")
        };
        assert_eq!(values, [1.0, 3.0, 5.0, 7.0]);
        assert!(values.capacity() <= 8, "run {run}: {}", values.capacity());
        // Both large allocations are back in the pool for the next run.
        let pool = compiled.scratch.lock().unwrap();
        assert_eq!(
            pool.capacities().filter(|&c| c >= LARGE).count(),
            2,
            "run {run}"
        );
    }
}

/// Programs run at once from several threads (as pipeline ranks do) each finish with their own
/// results, although every run keeps the pool's other workers busy looking for its kernels'
/// jobs (`keep_stealing`), which may land on another run's thread.
#[test]
fn concurrent_runs_from_several_threads_all_finish() {
    const N: usize = 1 << 17;
    let twice_plus_one = Program {
        name: "concurrent".to_owned(),
        buffers: vec![
            buffer(N, BufferRole::Input("x".to_owned())),
            buffer(N, BufferRole::Temporary),
            buffer(N, BufferRole::Temporary),
        ],
        kernels: (1..=2)
            .map(|to| {
                let op = if to == 1 {
                    BinaryOp::Mul
                } else {
                    BinaryOp::Add
                };
                let constant = if to == 1 { 2.0 } else { 1.0 };
                let value = Expr::Binary(
                    op,
                    Box::new(Expr::Load(dense(to - 1))),
                    Box::new(Expr::Constant(constant)),
                );
                copy(N, value, to)
            })
            .collect(),
        outputs: vec![("y".to_owned(), BufferId(2))],
    };
    let compiled = CpuProgram::new(twice_plus_one);
    std::thread::scope(|scope| {
        for thread in 0..6 {
            let compiled = &compiled;
            scope.spawn(move || {
                let x: Vec<f32> = (0..N).map(|i| (i % 1000 + thread) as f32).collect();
                let inputs = HashMap::from([("x".to_owned(), HostTensor::f32([N], x.clone()))]);
                for _ in 0..20 {
                    let outputs = compiled.run(&Feeds::new(&inputs, &())).unwrap();
                    let y = outputs.get("y").unwrap().as_f32().unwrap();
                    assert!(y.iter().zip(&x).all(|(y, x)| *y == 2.0 * x + 1.0));
                }
            });
        }
    });
}

/// `t = 2·w` over stacked parameters `w = [a; b]` (fed end to end), and `b`'s part of `t` read
/// as a window: the stack is assembled from the fed tensors on every run, in pooled storage
/// (given back after the run), and the window's elements are `t`'s where they lie. A part fed
/// with the wrong shape, or missing, is named.
#[test]
fn stacked_parameters_are_fed_end_to_end_and_windows_read_in_place() {
    let stacked = Buffer {
        ty: TensorType::new(DType::F32, vec![2, 3]),
        role: BufferRole::StackedParameters(vec!["a".into(), "b".into()]),
    };
    let program = Program {
        name: "stacked".to_owned(),
        buffers: vec![
            stacked,
            buffer(6, BufferRole::Temporary),
            buffer(
                3,
                BufferRole::Window {
                    of: BufferId(1),
                    offset: 3,
                },
            ),
        ],
        kernels: vec![copy(
            6,
            Expr::Binary(
                BinaryOp::Mul,
                Box::new(Expr::Load(dense(0))),
                Box::new(Expr::Constant(2.0)),
            ),
            1,
        )],
        outputs: vec![
            ("t".to_owned(), BufferId(1)),
            ("b_part".to_owned(), BufferId(2)),
        ],
    };
    let compiled = CpuProgram::new(program);
    let run = |a: HostTensor, b: Option<HostTensor>| {
        let mut weights = HashMap::from([("a".to_owned(), a)]);
        if let Some(b) = b {
            weights.insert("b".to_owned(), b);
        }
        let inputs: HashMap<String, HostTensor> = HashMap::new();
        compiled.run(&Feeds::new(&inputs, &weights))
    };
    let a = || HostTensor::f32([3], vec![1.0, 2.0, 3.0]);
    for step in 0..2 {
        let b = HostTensor::f32([3], vec![4.0 + step as f32, 5.0, 6.0]);
        let outputs = run(a(), Some(b)).unwrap();
        let floats = |name| match &outputs.get(name).unwrap().data {
            Data::Float(v) => v.clone(),
            _ => panic!("float output"),
        };
        let first = 8.0 + 2.0 * step as f32;
        assert_eq!(floats("t"), [2.0, 4.0, 6.0, first, 10.0, 12.0]);
        assert_eq!(floats("b_part"), [first, 10.0, 12.0]);
        // The stack's storage is back in the pool, and `t`'s (copied out: a window reads it).
        let pool = compiled.scratch.lock().unwrap();
        let sixes = pool.capacities().filter(|&c| c == 6).count();
        assert_eq!(sixes, 2, "step {step}");
    }
    let wrong = HostTensor::f32([2], vec![4.0, 5.0]);
    let error = run(a(), Some(wrong)).unwrap_err().to_string();
    assert!(error.starts_with("parameter `b` is f32[2]"), "{error}");
    let error = run(a(), None).unwrap_err().to_string();
    assert_eq!(error, "missing parameter `b`");
}
