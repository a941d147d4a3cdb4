//! Every expression kind, at every inner extent the code generator treats differently.

use super::*;

const UNARY: [UnaryOp; 8] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Recip,
    UnaryOp::Abs,
    UnaryOp::Sigmoid,
];

const BINARY: [BinaryOp; 6] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Max,
    BinaryOp::Min,
];

const COMPARE: [CompareOp; 5] = [
    CompareOp::Eq,
    CompareOp::Lt,
    CompareOp::Le,
    CompareOp::Gt,
    CompareOp::Ge,
];

#[test]
fn unary_ops_match_the_row_evaluator() {
    for op in UNARY {
        for inner in INNER {
            let x = load(0, 0, &[inner as isize, 1]);
            let (sizes, nest) = elementwise(3, inner, 1, unary(op, x));
            check(&sizes, nest, Values::Special);
        }
    }
}

/// The inline four-lane exp and sigmoid over their whole range — overflow, subnormal results,
/// zero, infinities, NaN — agree bit for bit with the reference's (`expf::exp`).
#[test]
fn exp_and_sigmoid_over_their_whole_range_match_the_row_evaluator() {
    let mut xs: Vec<f32> = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        88.72,
        89.0,
        -103.97,
        -104.0,
        -104.000_01,
        f32::MIN,
        -87.33,
        1e-30,
        -1e-30,
        f32::MAX,
    ];
    xs.extend((0..4096).map(|i| -120.0 + 220.0 * i as f32 / 4096.0));
    // Rows of 16: the four-lane loop (rows shorter than 8 run one lane at a time).
    let rows = xs.len() / 16;
    xs.truncate(rows * 16);
    for op in [UnaryOp::Exp, UnaryOp::Sigmoid] {
        let (_, nest) = elementwise(rows, 16, 1, unary(op, load(0, 0, &[16, 1])));
        check_on(&nest, vec![xs.clone(), vec![0.0; xs.len()]]);
    }
}

#[test]
fn binary_ops_match_the_row_evaluator() {
    for op in BINARY {
        for inner in INNER {
            let s = [inner as isize, 1];
            let (sizes, nest) =
                elementwise(3, inner, 2, binary(op, load(0, 0, &s), load(1, 0, &s)));
            check(&sizes, nest, Values::Special);
        }
    }
}

#[test]
fn max_and_min_of_signed_zeros_and_nans_match_the_row_evaluator() {
    // Every ordered pair of {+0, -0, NaN, 1}, at 4 lanes and at scalars.
    let values = [0.0f32, -0.0, f32::NAN, 1.0];
    let pairs: Vec<(f32, f32)> = values
        .iter()
        .flat_map(|&x| values.map(|y| (x, y)))
        .collect();
    let x: Vec<f32> = pairs.iter().map(|p| p.0).chain([1.0; 3]).collect();
    let y: Vec<f32> = pairs.iter().map(|p| p.1).chain([1.0; 3]).collect();
    for op in [BinaryOp::Max, BinaryOp::Min] {
        for rows in [1, 19] {
            let inner = x.len() / rows;
            let s = [inner as isize, 1];
            let (_, nest) = elementwise(rows, inner, 2, binary(op, load(0, 0, &s), load(1, 0, &s)));
            check_on(&nest, vec![x.clone(), y.clone(), vec![0.0; x.len()]]);
        }
    }
}

#[test]
fn comparisons_give_one_or_zero_like_the_row_evaluator() {
    for op in COMPARE {
        for inner in INNER {
            let s = [inner as isize, 1];
            let (sizes, nest) =
                elementwise(3, inner, 2, compare(op, load(0, 0, &s), load(1, 0, &s)));
            check(&sizes, nest, Values::Special);
        }
    }
}

#[test]
fn select_takes_the_first_arm_where_the_condition_is_nonzero_or_nan() {
    for inner in INNER {
        let s = [inner as isize, 1];
        // A raw condition (NaN, ±0 and others), and one made by a comparison.
        let raw = select(load(0, 0, &s), load(1, 0, &s), load(2, 0, &s));
        let (sizes, nest) = elementwise(3, inner, 3, raw);
        check(&sizes, nest, Values::Special);
        let compared = select(
            compare(CompareOp::Gt, load(0, 0, &s), load(1, 0, &s)),
            load(1, 0, &s),
            unary(UnaryOp::Neg, load(2, 0, &s)),
        );
        let (sizes, nest) = elementwise(3, inner, 3, compared);
        check(&sizes, nest, Values::Special);
    }
}

#[test]
fn casts_round_truncate_and_test_like_the_row_evaluator() {
    for to in DType::ALL {
        for inner in INNER {
            // Scaled so that fp8 saturates and integers truncate visibly.
            let x = binary(
                BinaryOp::Mul,
                load(0, 0, &[inner as isize, 1]),
                Expr::Constant(97.3),
            );
            let (sizes, nest) = elementwise(3, inner, 1, cast(to, x));
            check(&sizes, nest, Values::Special);
        }
    }
}

#[test]
fn constants_and_broadcast_loads() {
    for inner in INNER {
        let rows = 3;
        // out[r, j] = x[r, j] * scale[r] + bias[j] - 0.5 * c, with c one element at offset 3.
        let value = binary(
            BinaryOp::Sub,
            binary(
                BinaryOp::Add,
                binary(
                    BinaryOp::Mul,
                    load(0, 0, &[inner as isize, 1]),
                    load(1, 0, &[1, 0]),
                ),
                load(2, 0, &[0, 1]),
            ),
            binary(BinaryOp::Mul, Expr::Constant(0.5), load(3, 3, &[0, 0])),
        );
        let nest = LoopNest {
            domain: vec![rows, inner],
            body: vec![store(4, 0, &[inner as isize, 1], value)],
        };
        check(
            &[rows * inner, rows, inner, 5, rows * inner],
            nest,
            Values::Special,
        );
        // A whole statement invariant along the row: a broadcast of a transcendental.
        let nest = LoopNest {
            domain: vec![rows, inner],
            body: vec![store(
                1,
                0,
                &[inner as isize, 1],
                unary(UnaryOp::Exp, load(0, 0, &[1, 0])),
            )],
        };
        check(&[rows, rows * inner], nest, Values::Plain);
        // Only a constant.
        let nest = LoopNest {
            domain: vec![rows, inner],
            body: vec![store(0, 0, &[inner as isize, 1], Expr::Constant(-2.25))],
        };
        check(&[rows * inner], nest, Values::Plain);
    }
}

#[test]
fn strided_offset_and_reversed_views() {
    for inner in INNER {
        let rows = 4;
        let n = rows * inner;
        // A transposed load (inner stride = rows), a reversed load with an offset, and a
        // load from the middle of a larger buffer.
        let value = binary(
            BinaryOp::Add,
            binary(
                BinaryOp::Mul,
                load(0, 0, &[1, rows as isize]),
                load(1, n + 2, &[-(inner as isize), -1]),
            ),
            load(2, 7, &[inner as isize + 2, 1]),
        );
        let nest = LoopNest {
            domain: vec![rows, inner],
            body: vec![store(3, 0, &[inner as isize, 1], value.clone())],
        };
        check(
            &[n, n + 3, 7 + rows * (inner + 2), n],
            nest,
            Values::Special,
        );
        // Transposed store with an offset, and a store with stride 2.
        let nest = LoopNest {
            domain: vec![rows, inner],
            body: vec![
                store(1, 1, &[1, rows as isize], load(0, 0, &[inner as isize, 1])),
                store(
                    2,
                    0,
                    &[2 * inner as isize, 2],
                    unary(UnaryOp::Sqrt, load(0, 0, &[inner as isize, 1])),
                ),
            ],
        };
        check(&[n, n + 1, 2 * n], nest, Values::Plain);
    }
}

#[test]
fn a_load_used_twice_and_nested_expressions() {
    for inner in INNER {
        let s = [inner as isize, 1];
        // x * sigmoid(x) * y (SwiGLU), then clamp to [-1, 1] with max/min, then log(|.|).
        let silu = binary(
            BinaryOp::Mul,
            load(0, 0, &s),
            unary(UnaryOp::Sigmoid, load(0, 0, &s)),
        );
        let gated = binary(BinaryOp::Mul, silu, load(1, 0, &s));
        let clamped = binary(
            BinaryOp::Min,
            binary(BinaryOp::Max, gated, Expr::Constant(-1.0)),
            Expr::Constant(1.0),
        );
        let value = unary(UnaryOp::Log, unary(UnaryOp::Abs, clamped));
        let (sizes, nest) = elementwise(5, inner, 2, value);
        check(&sizes, nest, Values::Special);
    }
}

#[test]
fn bf16_rounding_is_bit_exact_on_ties_carries_subnormals_and_nans() {
    // Bit patterns around every case of round-to-nearest-even on the upper 16 bits.
    let mut bits: Vec<u32> = vec![
        0x3F80_8000, // tie, kept lsb 0: down
        0x3F81_8000, // tie, kept lsb 1: up
        0x3F80_8001, // above the tie: up
        0x3F80_7FFF, // below the tie: down
        0x7F7F_FFFF, // the largest finite f32: carries to +inf
        0xFF7F_8000, // tie at the top of the negative range: to -inf
        0x7F80_0000, // +inf
        0xFF80_0000, // -inf
        0x7F80_0001, // signalling NaN with a low payload: quiet, payload dropped
        0xFF81_2345, // negative signalling NaN
        0x7FC0_0000, // quiet NaN
        0x0000_8000, // subnormal tie: down to +0
        0x8001_8000, // negative subnormal tie: up
        0x007F_FFFF, // largest subnormal: carries to the smallest normal
        0x0000_0000,
        0x8000_0000,
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    bits.extend((0..4096).map(|_| rng.random::<u32>()));
    let inner = bits.len();
    let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    for lanes in [1, inner] {
        // One row of all values (four lanes), or one value per row (scalar code).
        let rows = inner / lanes;
        let nest = LoopNest {
            domain: vec![rows, lanes],
            body: vec![store(
                1,
                0,
                &[lanes as isize, 1],
                cast(DType::BF16, load(0, 0, &[lanes as isize, 1])),
            )],
        };
        let jit = JitProgram::compile(&program(&[inner, inner], nest));
        let mut buffers = vec![Storage::Borrowed(&x), Storage::Owned(vec![0.0; inner])];
        jit.kernel(0).unwrap().run(&mut buffers);
        for (i, (&got, &x)) in buffers[1].iter().zip(&x).enumerate() {
            let want = half::bf16::from_f32(x).to_f32();
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{i}: {:#010x} rounded to {:#010x}, want {:#010x}",
                x.to_bits(),
                got.to_bits(),
                want.to_bits()
            );
        }
    }
}
