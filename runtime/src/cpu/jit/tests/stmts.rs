//! Reductions, rows used by later statements, per-row stores, domains of every rank, empty
//! axes, and kernels large enough to run on several threads.

use super::*;

const REDUCE: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

/// `out[r] = reduce_j value` over `[rows, inner]`, input 0 dense, the result in buffer 1.
fn reduction(op: ReduceOp, rows: usize, inner: usize, value: Expr) -> (Vec<usize>, LoopNest) {
    let nest = LoopNest {
        domain: vec![rows, inner],
        body: vec![reduce(0, op, value), store_row(1, 0, &[1, 0], Expr::Row(0))],
    };
    (vec![rows * inner, rows], nest)
}

#[test]
fn sum_mean_and_max_match_the_row_evaluator() {
    for op in REDUCE {
        for inner in [1, 2, 3, 5, 8, 16, 37, 301] {
            let (sizes, nest) = reduction(op, 4, inner, load(0, 0, &[inner as isize, 1]));
            // Special values: NaN (and a NaN met after a larger value) for Max, infinities.
            check(&sizes, nest.clone(), Values::Special);
            check(&sizes, nest, Values::Plain);
            // Along a non-unit stride (scalar code).
            let (sizes, nest) = reduction(op, 4, inner, load(0, 0, &[1, 4]));
            check(&sizes, nest, Values::Plain);
        }
    }
}

#[test]
fn sums_of_negative_zeros_stay_negative_and_max_keeps_the_first_zero() {
    for inner in [3, 16, 19] {
        for op in REDUCE {
            let (_, nest) = reduction(op, 2, inner, load(0, 0, &[inner as isize, 1]));
            let mut x = vec![-0.0f32; 2 * inner];
            x[inner + 1] = 0.0;
            check_on(&nest, vec![x, vec![1.0; 2]]);
        }
    }
}

#[test]
fn a_reduction_of_a_broadcast_value_adds_it_inner_times() {
    let (sizes, nest) = reduction(ReduceOp::Sum, 3, 37, load(0, 0, &[1, 0]));
    check(&sizes, nest, Values::Plain);
}

#[test]
fn softmax_and_rmsnorm_use_rows_in_later_statements() {
    for inner in [3, 5, 16, 37] {
        let rows = 6;
        let x = || load(0, 0, &[inner as isize, 1]);
        let shifted = || binary(BinaryOp::Sub, x(), Expr::Row(0));
        let softmax = LoopNest {
            domain: vec![rows, inner],
            body: vec![
                reduce(0, ReduceOp::Max, x()),
                reduce(1, ReduceOp::Sum, unary(UnaryOp::Exp, shifted())),
                store(
                    1,
                    0,
                    &[inner as isize, 1],
                    binary(BinaryOp::Div, unary(UnaryOp::Exp, shifted()), Expr::Row(1)),
                ),
            ],
        };
        check(
            &[rows * inner, rows * inner],
            softmax.clone(),
            Values::Plain,
        );
        check(&[rows * inner, rows * inner], softmax, Values::Special);
        // x * rsqrt(mean(x²) + eps) * weight[j], and the per-row scale stored on the side.
        let scale = || {
            unary(
                UnaryOp::Rsqrt,
                binary(BinaryOp::Add, Expr::Row(0), Expr::Constant(1e-6)),
            )
        };
        let rmsnorm = LoopNest {
            domain: vec![rows, inner],
            body: vec![
                reduce(0, ReduceOp::Mean, binary(BinaryOp::Mul, x(), x())),
                store(
                    2,
                    0,
                    &[inner as isize, 1],
                    binary(
                        BinaryOp::Mul,
                        binary(BinaryOp::Mul, x(), scale()),
                        load(1, 0, &[0, 1]),
                    ),
                ),
                store_row(3, 0, &[1, 0], scale()),
            ],
        };
        check(
            &[rows * inner, inner, rows * inner, rows],
            rmsnorm,
            Values::Plain,
        );
    }
}

#[test]
fn store_row_ignores_the_inner_stride_and_runs_once_per_row() {
    // The view's inner stride (5) is ignored; the value reads inner index 0 of its loads.
    let nest = LoopNest {
        domain: vec![3, 4, 16],
        body: vec![
            reduce(0, ReduceOp::Max, load(0, 0, &[64, 16, 1])),
            store_row(
                1,
                2,
                &[4, 1, 5],
                binary(BinaryOp::Add, Expr::Row(0), load(2, 0, &[1, 3, 0])),
            ),
        ],
    };
    check(&[192, 14, 12], nest, Values::Special);
}

#[test]
fn domains_of_rank_0_1_3_and_4() {
    // Rank 0: one point; inner strides do not exist.
    let scalar = LoopNest {
        domain: vec![],
        body: vec![
            reduce(0, ReduceOp::Sum, load(0, 2, &[])),
            store(
                1,
                0,
                &[],
                binary(BinaryOp::Mul, Expr::Row(0), load(0, 1, &[])),
            ),
            store_row(2, 0, &[], Expr::Row(0)),
        ],
    };
    check(&[3, 1, 1], scalar, Values::Plain);
    // Rank 1: one row.
    for inner in [1, 7, 64, 103] {
        let nest = LoopNest {
            domain: vec![inner],
            body: vec![
                reduce(0, ReduceOp::Mean, load(0, 0, &[1])),
                store(
                    1,
                    0,
                    &[1],
                    binary(BinaryOp::Sub, load(0, 0, &[1]), Expr::Row(0)),
                ),
                store_row(2, 0, &[0], Expr::Row(0)),
            ],
        };
        check(&[inner, inner, 1], nest, Values::Plain);
    }
    // Rank 3 and 4, with permuted input strides and an extent-1 axis.
    let dims = [2usize, 3, 1, 12];
    let d = dense(&dims);
    // input [3, 2, 1, 12] read as [2, 3, 1, 12]: strides (12, 24, 12, 1).
    let input = load(0, 0, &[12, 24, 12, 1]);
    let nest = LoopNest {
        domain: dims.to_vec(),
        body: vec![
            reduce(0, ReduceOp::Sum, unary(UnaryOp::Abs, input.clone())),
            store(1, 0, &d, binary(BinaryOp::Div, input, Expr::Row(0))),
            store_row(2, 0, &[3, 1, 0, 0], Expr::Row(0)),
        ],
    };
    check(&[72, 72, 6], nest, Values::Plain);
    let nest = LoopNest {
        domain: vec![5, 4, 9],
        body: vec![store(1, 0, &dense(&[5, 4, 9]), load(0, 3, &[1, 5, 20]))],
    };
    check(&[183, 180], nest, Values::Special);
}

#[test]
fn empty_axes_do_what_the_row_evaluator_does() {
    // No rows: nothing is written.
    let nest = LoopNest {
        domain: vec![0, 8],
        body: vec![store(1, 0, &[8, 1], load(0, 0, &[8, 1]))],
    };
    check(&[8, 8], nest, Values::Plain);
    // Empty rows: reductions give their identities (-0, NaN, -inf), stores write nothing, and
    // a StoreRow still runs once per row.
    for op in REDUCE {
        let nest = LoopNest {
            domain: vec![3, 0],
            body: vec![
                reduce(0, op, load(0, 0, &[1, 1])),
                store(1, 0, &[1, 1], Expr::Constant(7.0)),
                store_row(
                    2,
                    0,
                    &[1, 0],
                    binary(BinaryOp::Add, Expr::Row(0), load(0, 0, &[1, 1])),
                ),
            ],
        };
        check(&[3, 3, 3], nest, Values::Plain);
    }
}

/// A softmax as merged kernels compute it (`lower::merge`): the exponentials stored, then read
/// back through the same view by the sum and the division (which also reads the element it
/// overwrites), on one thread and split across threads.
#[test]
fn statements_read_back_what_earlier_ones_stored_element_for_element() {
    for (rows, inner) in INNER.iter().map(|&n| (6, n)).chain([(700, 96)]) {
        let row_major = [inner as isize, 1];
        let exps = || load(1, 0, &row_major);
        let normalised = binary(BinaryOp::Div, exps(), Expr::Row(1));
        let nest = LoopNest {
            domain: vec![rows, inner],
            body: vec![
                reduce(0, ReduceOp::Max, load(0, 0, &row_major)),
                store(
                    1,
                    0,
                    &row_major,
                    unary(
                        UnaryOp::Exp,
                        binary(BinaryOp::Sub, load(0, 0, &row_major), Expr::Row(0)),
                    ),
                ),
                reduce(1, ReduceOp::Sum, exps()),
                store(
                    2,
                    0,
                    &row_major,
                    binary(BinaryOp::Add, normalised, load(2, 0, &row_major)),
                ),
            ],
        };
        let sizes = [rows * inner; 3];
        let plan = super::super::plan::plan(&nest, &program(&sizes, nest.clone()).buffers);
        assert!(plan.unwrap().parallel);
        check(&sizes, nest.clone(), Values::Plain);
        check(&sizes, nest, Values::Special);
    }
}

#[test]
fn large_kernels_split_across_threads_match_the_row_evaluator() {
    let (rows, inner) = (700, 96);
    let x = || load(0, 0, &[inner as isize, 1]);
    let nest = LoopNest {
        domain: vec![rows, inner],
        body: vec![
            reduce(0, ReduceOp::Max, x()),
            reduce(
                1,
                ReduceOp::Sum,
                unary(UnaryOp::Exp, binary(BinaryOp::Sub, x(), Expr::Row(0))),
            ),
            store(
                1,
                0,
                &[inner as isize, 1],
                binary(
                    BinaryOp::Sub,
                    binary(BinaryOp::Sub, x(), Expr::Row(0)),
                    unary(UnaryOp::Log, Expr::Row(1)),
                ),
            ),
            store_row(2, 0, &[1, 0], Expr::Row(1)),
        ],
    };
    let sizes = [rows * inner, rows * inner, rows];
    let plan = super::super::plan::plan(&nest, &program(&sizes, nest.clone()).buffers).unwrap();
    assert!(plan.parallel);
    check(&sizes, nest, Values::Plain);
    // A transposed copy: a scalar inner loop over many rows.
    let nest = LoopNest {
        domain: vec![rows, inner],
        body: vec![store(
            1,
            0,
            &[inner as isize, 1],
            load(0, 0, &[1, rows as isize]),
        )],
    };
    check(&[rows * inner, rows * inner], nest, Values::Plain);
}
