//! The cost and memory estimates of the kernel IR.

use super::*;
use crate::dtype::{DType, TensorType};

/// The view of `buffer` from its first element with `strides` (tests of the kernel IR).
pub(crate) fn view(buffer: u32, strides: &[isize]) -> View {
    View {
        buffer: BufferId(buffer),
        offset: 0,
        strides: strides.to_vec(),
    }
}

/// A load through [`view`].
pub(crate) fn load(buffer: u32, strides: &[isize]) -> Expr {
    Expr::Load(view(buffer, strides))
}

fn add(a: Expr, b: Expr) -> Expr {
    Expr::Binary(BinaryOp::Add, Box::new(a), Box::new(b))
}

/// Each distinct view moves once, over the axes it does not broadcast; a row store skips the
/// innermost axis.
#[test]
fn a_loop_nest_moves_each_view_once_over_its_axes() {
    // out[i][j] = a[i][j] + b[j] + a[i][j]; rows[i] = sum_j a[i][j]; over [4, 8].
    let nest = LoopNest {
        domain: vec![4, 8],
        body: vec![
            Stmt::Store {
                view: view(0, &[8, 1]),
                value: add(add(load(1, &[8, 1]), load(2, &[0, 1])), load(1, &[8, 1])),
            },
            Stmt::Reduce {
                row: 0,
                op: ReduceOp::Sum,
                value: load(1, &[8, 1]),
            },
            Stmt::StoreRow {
                view: view(3, &[1, 1]),
                value: Expr::Row(0),
            },
        ],
    };
    // out 32, a 32 (once), b 8, rows 4.
    assert_eq!(nest.bytes_moved(), 4 * (32 + 32 + 8 + 4));
    // a transposed is another view of a: read again.
    let mut transposed = nest.clone();
    transposed.body.push(Stmt::Store {
        view: view(4, &[8, 1]),
        value: load(1, &[1, 4]),
    });
    assert_eq!(transposed.bytes_moved(), 4 * (32 + 32 + 8 + 4 + 32 + 32));
}

/// Three temporaries written and read in turn: with the kernel IR's operands the first and
/// the third share storage; a backend that reads the first in the last kernel keeps it alive
/// there, in storage of its own.
#[test]
fn a_touch_beyond_the_operands_extends_a_lifetime() {
    let temporary = || Buffer {
        ty: TensorType::new(DType::F32, vec![16]),
        role: BufferRole::Temporary,
    };
    let copy = |from: u32, to: u32| Kernel {
        name: format!("k{to}"),
        nodes: Vec::new(),
        origin: String::new(),
        body: KernelBody::Loop(LoopNest {
            domain: vec![16],
            body: vec![Stmt::Store {
                view: view(to, &[1]),
                value: load(from, &[1]),
            }],
        }),
    };
    let program = Program {
        name: "chain".to_owned(),
        buffers: vec![
            Buffer {
                ty: TensorType::new(DType::F32, vec![16]),
                role: BufferRole::Input("x".to_owned()),
            },
            temporary(),
            temporary(),
            temporary(),
            temporary(),
        ],
        kernels: vec![copy(0, 1), copy(1, 2), copy(2, 3), copy(3, 4)],
        outputs: vec![("y".to_owned(), BufferId(4))],
    };
    let ir = MemoryPlan::of(&program);
    assert_eq!(ir.lifetimes[1], Some((0, 1)));
    assert_eq!(ir.slot_of[1], ir.slot_of[3]);
    let mut touches: Vec<Vec<BufferId>> = program.kernels.iter().map(Kernel::touches).collect();
    assert_eq!(MemoryPlan::with_touches(&program, &touches), ir);
    touches[2].push(BufferId(1));
    let extended = MemoryPlan::with_touches(&program, &touches);
    assert_eq!(extended.lifetimes[1], Some((0, 2)));
    assert_ne!(extended.slot_of[1], extended.slot_of[3]);
    assert_ne!(extended.slot_of[1], extended.slot_of[2]);
}

/// Counts print with three significant digits and a decimal prefix.
#[test]
fn counts_print_with_three_digits_and_a_prefix() {
    assert_eq!(with_prefix(1_286_290_000_000, "B"), "1.29 TB");
    assert_eq!(with_prefix(9_600_000, "B"), "9.60 MB");
    assert_eq!(with_prefix(112_400, ""), "112 k");
    assert_eq!(with_prefix(14_793_000_000, ""), "14.8 G");
    assert_eq!(with_prefix(950, "B"), "950 B");
    assert_eq!(with_prefix(7, ""), "7");
}

/// The traffic table sums the loop nests by kind, a layer's kernels with every other layer's.
#[test]
fn the_traffic_table_groups_the_layers_kernels() {
    let nest = |extent: usize| {
        KernelBody::Loop(LoopNest {
            domain: vec![extent],
            body: vec![Stmt::Store {
                view: view(1, &[1]),
                value: load(0, &[1]),
            }],
        })
    };
    let kernel = |name: &str, extent: usize| Kernel {
        name: name.to_owned(),
        nodes: Vec::new(),
        origin: String::new(),
        body: nest(extent),
    };
    let program = Program {
        name: "layers".to_owned(),
        buffers: Vec::new(),
        kernels: vec![
            kernel("k0_mul_model_layers_0_mlp", 1000),
            kernel("k1_mul_model_layers_1_mlp", 1000),
            kernel("k2_add_lm_head", 500),
        ],
        outputs: Vec::new(),
    };
    let table = program.traffic_table();
    assert!(
        table.starts_with("20.0 kB read and written per run by 3 loop nests"),
        "{table}"
    );
    assert!(
        table.contains("16.0 kB  80.0%      2  mul_model_layers_N_mlp"),
        "{table}"
    );
    assert!(
        table.contains("4.00 kB  20.0%      1  add_lm_head"),
        "{table}"
    );
    assert!(
        table.contains("8.00 kB  k0_mul_model_layers_0_mlp  loop [1000]"),
        "{table}"
    );
}
