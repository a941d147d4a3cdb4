//! The routine against the row evaluator running the loop nest it replaces: the same bits, in
//! the one-value form and (where the CPU has AVX-512) the sixteen-lane one.

use fathom_compiler::graph::{BinaryOp, UnaryOp};
use fathom_compiler::kernel::{BufferId, Expr, LoopNest, Stmt, View};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::softmax::RowStarts;
use super::super::{Storage, expf, loops};
use super::{GatingRows, forward_in};

/// Row-major over `[rows, n]`, with `pad` values between rows.
fn rows_of(buffer: u32, (_, n): (usize, usize), pad: usize) -> View {
    View {
        buffer: BufferId(buffer),
        offset: 0,
        strides: vec![(n + pad) as isize, 1],
    }
}

fn load(view: &View) -> Box<Expr> {
    Box::new(Expr::Load(view.clone()))
}

/// The gates: random, and every edge of the sigmoid (signed zeros, both sides of its
/// branches, under- and overflowing exponentials, infinities, a NaN).
fn gates(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let edges = [
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        88.0,
        -88.0,
        104.5,
        -104.5,
        200.0,
        -200.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    (0..len)
        .map(|j| match j % 5 {
            0 => edges[(j / 5) % edges.len()],
            _ => rng.random_range(-12.0f32..12.0),
        })
        .collect()
}

#[test]
fn the_routine_writes_the_bits_the_loop_nest_writes() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for vector in [false, true] {
        if vector && !expf::vectorised() {
            eprintln!("skipped the sixteen-lane form: no AVX-512F");
            continue;
        }
        for (rows, n, pad) in [(7, 64, 0), (3, 37, 5), (5, 3, 1), (2, 704, 0)] {
            let shape = (rows, n);
            let (gate_view, up_view) = (rows_of(0, shape, pad), rows_of(1, shape, pad));
            let outputs = [2, 3, 4].map(|b| rows_of(b, shape, 0));
            let [sigmoid, silu, out] = &outputs;
            let nest = LoopNest {
                domain: vec![rows, n],
                body: vec![
                    Stmt::Store {
                        view: sigmoid.clone(),
                        value: Expr::Unary(UnaryOp::Sigmoid, load(&gate_view)),
                    },
                    Stmt::Store {
                        view: silu.clone(),
                        value: Expr::Binary(BinaryOp::Mul, load(&gate_view), load(sigmoid)),
                    },
                    Stmt::Store {
                        view: out.clone(),
                        value: Expr::Binary(BinaryOp::Mul, load(silu), load(&up_view)),
                    },
                ],
            };
            let read_len = rows * (n + pad);
            let gate = gates(read_len, &mut rng);
            let up: Vec<f32> = (0..read_len)
                .map(|_| rng.random_range(-3.0f32..3.0))
                .collect();
            let len = rows * n;
            let mut buffers: Vec<Storage<'_>> = [
                gate.clone(),
                up.clone(),
                vec![0.0; len],
                vec![0.0; len],
                vec![0.0; len],
            ]
            .into_iter()
            .map(Storage::Owned)
            .collect();
            loops::run(&nest, &mut buffers);

            let outer = [rows];
            let gating = GatingRows {
                gate: (&gate, RowStarts::new(&gate_view, &outer)),
                up: (&up, RowStarts::new(&up_view, &outer)),
            };
            let mut got = [
                vec![f32::NAN; len],
                vec![f32::NAN; len],
                vec![f32::NAN; len],
            ];
            let [s, a, o] = &mut got;
            forward_in(vector, &gating, n, (s, a, o));
            for (which, (got, want)) in ["sigmoid", "silu", "out"]
                .iter()
                .zip(got.iter().zip(&buffers[2..]))
            {
                for (p, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "vector {vector}, {rows}x{n}: {which}[{p}] is {g} where the loop \
                         nest wrote {w} (gate {})",
                        gate[p / n * (n + pad) + p % n]
                    );
                }
            }
        }
    }
}
