//! A hand-built program that exercises every construct the CUDA generator emits, for the tests
//! that pin and compile generated code (models exercise only what their layers need).

use crate::dtype::{DType, TensorType};
use crate::graph::{BinaryOp, CompareOp, NodeId, ReduceOp, UnaryOp};
use crate::kernel::{
    Buffer, BufferId, BufferRole, Expr, Kernel, KernelBody, LoopNest, Program, Stmt, View,
};

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

fn cast(to: DType, a: Expr) -> Expr {
    Expr::Cast(to, Box::new(a))
}

/// Kernels (each named for what it covers):
/// - `softmax_block`: max and sum reductions over rows of 100, one block per row;
/// - `center_block` / `center_team`: a mean, a per-row store, and loads of it after a barrier
///   (`__syncthreads` for rows of 40, `__syncwarp` for rows of 8);
/// - `every_op`: each unary, binary, comparison, select, cast and special constant;
/// - `transpose_wide`: 2^31 points, so 64-bit indexing; `reverse`: a negative stride;
/// - `scalar` / `scalar_row`: an empty domain, elementwise and as one row;
/// - `broadcast_sum`: a sum of a value constant along the row.
pub fn coverage_program() -> Program {
    let f32_of = |dims: &[usize]| TensorType::new(DType::F32, dims.to_vec());
    let buffers = vec![
        Buffer {
            ty: f32_of(&[2, 100]),
            role: BufferRole::Input("x".into()),
        },
        Buffer {
            ty: f32_of(&[2, 100]),
            role: BufferRole::Temporary,
        },
        Buffer {
            ty: f32_of(&[2]),
            role: BufferRole::Temporary,
        },
        Buffer {
            ty: f32_of(&[1 << 31]),
            role: BufferRole::Temporary,
        },
        Buffer {
            ty: f32_of(&[1 << 31]),
            role: BufferRole::Temporary,
        },
        Buffer {
            ty: f32_of(&[28, 2, 100]),
            role: BufferRole::Temporary,
        },
    ];
    let x = |offset, strides: &[isize]| load(0, offset, strides);
    let row = |r| Expr::Row(r);
    let c = Expr::Constant;
    let mut kernels = Vec::new();
    let mut push = |name: &str, domain: &[usize], body: Vec<Stmt>| {
        kernels.push(Kernel {
            name: format!("k{}_{name}", kernels.len()),
            nodes: vec![NodeId(kernels.len() as u32)],
            origin: "coverage".into(),
            body: KernelBody::Loop(LoopNest {
                domain: domain.to_vec(),
                body,
            }),
        });
    };
    let shifted = || unary(UnaryOp::Exp, binary(BinaryOp::Sub, x(0, &[100, 1]), row(0)));
    push(
        "softmax_block",
        &[2, 100],
        vec![
            Stmt::Reduce {
                row: 0,
                op: ReduceOp::Max,
                value: x(0, &[100, 1]),
            },
            Stmt::Reduce {
                row: 1,
                op: ReduceOp::Sum,
                value: shifted(),
            },
            Stmt::Store {
                view: view(1, 0, &[100, 1]),
                value: binary(BinaryOp::Div, shifted(), row(1)),
            },
        ],
    );
    for (name, inner) in [("center_block", 40), ("center_team", 8)] {
        push(
            name,
            &[2, inner],
            vec![
                Stmt::Reduce {
                    row: 0,
                    op: ReduceOp::Mean,
                    value: x(0, &[100, 1]),
                },
                Stmt::StoreRow {
                    view: view(2, 0, &[1, 0]),
                    value: row(0),
                },
                Stmt::Store {
                    view: view(1, 0, &[100, 1]),
                    value: binary(BinaryOp::Sub, x(0, &[100, 1]), load(2, 0, &[1, 0])),
                },
            ],
        );
    }
    let a = || x(0, &[100, 1]);
    let b = || load(1, 0, &[100, 1]);
    let ops = [
        unary(UnaryOp::Neg, a()),
        unary(UnaryOp::Exp, a()),
        unary(UnaryOp::Log, a()),
        unary(UnaryOp::Sqrt, a()),
        unary(UnaryOp::Rsqrt, a()),
        unary(UnaryOp::Recip, a()),
        unary(UnaryOp::Abs, a()),
        unary(UnaryOp::Sigmoid, a()),
        binary(BinaryOp::Add, a(), b()),
        binary(BinaryOp::Sub, a(), b()),
        binary(BinaryOp::Mul, a(), c(2.5)),
        binary(BinaryOp::Div, a(), c(f64::INFINITY)),
        binary(BinaryOp::Max, a(), c(f64::NEG_INFINITY)),
        binary(BinaryOp::Min, a(), c(f64::NAN)),
        compare(CompareOp::Eq, a(), b()),
        compare(CompareOp::Lt, a(), b()),
        compare(CompareOp::Le, a(), b()),
        compare(CompareOp::Gt, a(), b()),
        compare(CompareOp::Ge, a(), c(1e-20)),
        Expr::Select(
            Box::new(a()),
            Box::new(b()),
            Box::new(c(-3.4028234663852886e38)),
        ),
        cast(DType::F32, a()),
        cast(DType::BF16, a()),
        cast(DType::F16, a()),
        cast(DType::F8E4M3, a()),
        cast(DType::F8E5M2, a()),
        cast(DType::I32, a()),
        cast(DType::I64, a()),
        cast(DType::Bool, a()),
    ];
    push(
        "every_op",
        &[2, 100],
        ops.into_iter()
            .enumerate()
            .map(|(i, value)| Stmt::Store {
                view: view(5, 200 * i, &[100, 1]),
                value,
            })
            .collect(),
    );
    push(
        "transpose_wide",
        &[1 << 16, 1 << 15],
        vec![Stmt::Store {
            view: view(4, 0, &[1 << 15, 1]),
            value: load(3, 0, &[1, 1 << 16]),
        }],
    );
    push(
        "reverse",
        &[2, 100],
        vec![Stmt::Store {
            view: view(1, 0, &[100, 1]),
            value: x(99, &[100, -1]),
        }],
    );
    push(
        "scalar",
        &[],
        vec![Stmt::Store {
            view: view(2, 1, &[]),
            value: c(1.0),
        }],
    );
    push(
        "scalar_row",
        &[],
        vec![
            Stmt::Reduce {
                row: 0,
                op: ReduceOp::Max,
                value: x(5, &[]),
            },
            Stmt::StoreRow {
                view: view(2, 1, &[]),
                value: row(0),
            },
        ],
    );
    push(
        "broadcast_sum",
        &[2, 3],
        vec![
            Stmt::Reduce {
                row: 0,
                op: ReduceOp::Sum,
                value: x(0, &[100, 0]),
            },
            Stmt::StoreRow {
                view: view(2, 0, &[1, 0]),
                value: row(0),
            },
        ],
    );
    Program {
        name: "coverage".into(),
        buffers,
        kernels,
        outputs: Vec::new(),
    }
}
