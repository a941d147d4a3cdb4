//! The routines against the row evaluator running the loop nests they replace: the same bits,
//! in the one-value form and (where the CPU has AVX-512) the sixteen-lane one.

use fathom_compiler::graph::{BinaryOp, ReduceOp, UnaryOp};
use fathom_compiler::kernel::{BufferId, Expr, LoopNest, Masking, Scores, Stmt, View};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::{Storage, expf, loops};
use super::{GradientRows, RowStarts, ScoreRows, forward_in, gradient_in};

/// Buffers of the tests' nests: scores, mask, exponentials, sums, softmax, cotangent, gradient.
const X: u32 = 0;
const MASK: u32 = 1;
const E: u32 = 2;
const SUMS: u32 = 3;
const P: u32 = 4;
const DP: u32 = 5;
const DX: u32 = 6;

/// Row-major over `[batch, rows, n]`.
fn dense(buffer: u32, (_, rows, n): (usize, usize, usize)) -> View {
    View {
        buffer: BufferId(buffer),
        offset: 0,
        strides: vec![(rows * n) as isize, n as isize, 1],
    }
}

/// One value per row of `[batch, rows, n]`.
fn per_row(buffer: u32, (_, rows, _): (usize, usize, usize)) -> View {
    View {
        buffer: BufferId(buffer),
        offset: 0,
        strides: vec![rows as isize, 1, 0],
    }
}

fn load(view: &View) -> Box<Expr> {
    Box::new(Expr::Load(view.clone()))
}

fn binary(op: BinaryOp, a: Box<Expr>, b: Box<Expr>) -> Box<Expr> {
    Box::new(Expr::Binary(op, a, b))
}

/// A causal mask, one row per query, shared by the batch: `mask[i][j] = j ≤ i`, in a square
/// buffer of side `side ≥ n` (the MTP's shorter rows read the first `n` of each).
fn causal(side: usize) -> Vec<f32> {
    (0..side * side)
        .map(|p| f32::from(u8::from(p % side <= p / side)))
        .collect()
}

/// The forward nest fusion makes of a softmax, and the gradient nest of one.
fn nests(shape: (usize, usize, usize), scores: &Scores) -> (LoopNest, LoopNest) {
    let (batch, rows, n) = shape;
    let domain = vec![batch, rows, n];
    let (e, p, sums) = (dense(E, shape), dense(P, shape), per_row(SUMS, shape));
    let s = scores.expr();
    let forward = LoopNest {
        domain: domain.clone(),
        body: vec![
            Stmt::Reduce {
                row: 0,
                op: ReduceOp::Max,
                value: s.clone(),
            },
            Stmt::Store {
                view: e.clone(),
                value: Expr::Unary(
                    UnaryOp::Exp,
                    binary(BinaryOp::Sub, Box::new(s), Box::new(Expr::Row(0))),
                ),
            },
            Stmt::Reduce {
                row: 1,
                op: ReduceOp::Sum,
                value: Expr::Load(e.clone()),
            },
            Stmt::StoreRow {
                view: sums.clone(),
                value: Expr::Row(1),
            },
            Stmt::Store {
                view: p.clone(),
                value: *binary(BinaryOp::Div, load(&e), Box::new(Expr::Row(1))),
            },
        ],
    };
    let dp = dense(DP, shape);
    let core = binary(
        BinaryOp::Mul,
        binary(
            BinaryOp::Add,
            binary(BinaryOp::Div, load(&dp), load(&sums)),
            Box::new(Expr::Row(0)),
        ),
        load(&e),
    );
    let masked = match &scores.mask {
        Some(m) => Box::new(Expr::Select(
            load(&m.mask),
            core,
            Box::new(Expr::Constant(0.0)),
        )),
        None => core,
    };
    let value = match scores.scale {
        Some(c) => *binary(BinaryOp::Mul, masked, Box::new(Expr::Constant(c))),
        None => *masked,
    };
    let gradient = LoopNest {
        domain,
        body: vec![
            Stmt::Reduce {
                row: 0,
                op: ReduceOp::Sum,
                value: Expr::Unary(
                    UnaryOp::Neg,
                    binary(
                        BinaryOp::Mul,
                        load(&dp),
                        binary(BinaryOp::Div, load(&p), load(&sums)),
                    ),
                ),
            },
            Stmt::Store {
                view: dense(DX, shape),
                value,
            },
        ],
    };
    (forward, gradient)
}

/// Both nests on the row evaluator and both routines in the given form, on the same scores and
/// cotangent: every value written has the same bits.
fn check(vector: bool, shape: (usize, usize, usize), scores: &Scores, x: Vec<f32>, mask: Vec<f32>) {
    let (batch, rows, n) = shape;
    let len = batch * rows * n;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Some cotangents twelve orders of magnitude above the rest: the f64 sum of a row then
    // depends on its order, which the routines must follow.
    let dp: Vec<f32> = (0..len)
        .map(|j| match j % 7 {
            0 => 1e12,
            3 => -1e12,
            _ => rng.random_range(-1.0f32..1.0),
        })
        .collect();
    let (forward, gradient) = nests(shape, scores);
    let mut buffers: Vec<Storage<'_>> = [
        x.clone(),
        mask.clone(),
        vec![0.0; len],
        vec![0.0; batch * rows],
        vec![0.0; len],
        dp.clone(),
        vec![0.0; len],
    ]
    .into_iter()
    .map(Storage::Owned)
    .collect();
    loops::run(&forward, &mut buffers);
    loops::run(&gradient, &mut buffers);

    let outer = [batch, rows];
    let read = |id: u32| -> &[f32] {
        match id {
            X => &x,
            MASK => &mask,
            _ => unreachable!(),
        }
    };
    let score_rows = ScoreRows::of(scores, &outer, |v| read(v.buffer.0));
    let (mut e, mut p, mut sums) = (vec![0f32; len], vec![0f32; len], vec![0f32; batch * rows]);
    forward_in(vector, &score_rows, n, &mut e, &mut p, Some(&mut sums));
    let what = format!("vector {vector}, shape {shape:?}, {scores:?}");
    same_bits(&e, &buffers[E as usize], &format!("exponentials: {what}"));
    same_bits(&sums, &buffers[SUMS as usize], &format!("sums: {what}"));
    same_bits(&p, &buffers[P as usize], &format!("softmax: {what}"));
    let mut unkept = vec![0f32; len];
    forward_in(vector, &score_rows, n, &mut e, &mut unkept, None);
    same_bits(
        &unkept,
        &p,
        "the softmax does not depend on keeping the sums",
    );

    let (dense_view, sums_view) = (dense(0, shape), per_row(0, shape));
    let rows_of = |data| (data, RowStarts::new(&dense_view, &outer));
    let mask_view = scores.mask.as_ref().map(|m| m.mask.clone());
    let gradient_rows = GradientRows {
        cotangent: rows_of(&dp[..]),
        probabilities: rows_of(&p[..]),
        sums: (&sums[..], RowStarts::new(&sums_view, &outer)),
        exponentials: rows_of(&e[..]),
        mask: mask_view
            .as_ref()
            .map(|v| (&mask[..], RowStarts::new(v, &outer))),
        scale: scores.scale.map(|c| c as f32),
    };
    let mut dx = vec![f32::NAN; len];
    gradient_in(vector, &gradient_rows, n, &mut dx);
    same_bits(&dx, &buffers[DX as usize], &format!("gradient: {what}"));
}

/// `got` and `want` hold the same bits, or the first place they differ is named.
fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    if let Some(p) = (0..got.len()).find(|&p| got[p].to_bits() != want[p].to_bits()) {
        panic!(
            "{what}: element {p} is {} where the loop nest wrote {}",
            got[p], want[p]
        );
    }
}

/// Causal attention's scores (scaled, masked to −f32::MAX), rows shorter than a mask row (the
/// MTP's), rows of fewer than eight (summed one by one), of a length that is no multiple of
/// sixteen, and plain unscaled unmasked ones.
#[test]
fn routines_write_the_bits_the_loop_nests_write() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for vector in [false, true] {
        if vector && !expf::vectorised() {
            eprintln!("skipped the sixteen-lane form: no AVX-512F");
            continue;
        }
        // (Equal scores make a row's large cotangents cancel exactly in its sum, so that the
        // sum's order shows in its last bits.)
        for (shape, side, scale, masked, equal) in [
            ((2, 37, 37), 37, Some(0.125), true, false),
            ((2, 20, 20), 24, Some(0.3), true, false),
            ((3, 4, 5), 5, Some(0.5), true, false),
            ((2, 3, 256), 256, None, false, false),
            ((2, 3, 256), 256, None, false, true),
            ((1, 2, 33), 33, Some(-0.7), false, false),
        ] {
            let (batch, rows, n) = shape;
            let x: Vec<f32> = (0..batch * rows * n)
                .map(|_| {
                    if equal {
                        0.0
                    } else {
                        rng.random_range(-30.0f32..30.0)
                    }
                })
                .collect();
            let mask_view = View {
                buffer: BufferId(MASK),
                offset: 0,
                strides: vec![0, side as isize, 1],
            };
            let scores = Scores {
                x: dense(X, shape),
                scale,
                mask: masked.then(|| Masking {
                    mask: mask_view,
                    fill: f64::from(f32::MIN),
                }),
            };
            check(vector, shape, &scores, x, causal(side));
        }
    }
}
