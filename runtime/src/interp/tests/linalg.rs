//! Reduce, matmul, grouped matmul, and softmax built from them.

use fathom_compiler::DType;
use fathom_compiler::graph::{ExpertTiles, Op, QuantFormat, ReduceOp};

use super::*;

fn reduce(x: HostTensor, op: ReduceOp, axis: usize, keep: bool) -> TestResult<HostTensor> {
    eval_x(x, |b, x| b.reduce(op, x, axis, keep))
}

#[test]
fn reduce_sum_mean_max() -> TestResult {
    let x = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_f32(
        &reduce(x.clone(), ReduceOp::Sum, 0, false)?,
        &[3],
        &[5.0, 7.0, 9.0],
    );
    assert_f32(
        &reduce(x.clone(), ReduceOp::Sum, 1, true)?,
        &[2, 1],
        &[6.0, 15.0],
    );
    assert_f32(
        &reduce(x.clone(), ReduceOp::Mean, 1, false)?,
        &[2],
        &[2.0, 5.0],
    );
    assert_f32(
        &reduce(x, ReduceOp::Max, 0, true)?,
        &[1, 3],
        &[4.0, 5.0, 6.0],
    );
    Ok(())
}

#[test]
fn reduce_a_middle_axis() -> TestResult {
    // x[i, j, k] = 6i + 2j + k; the sum over j is 18i + 6 + 3k.
    let out = reduce(iota(&[2, 3, 2]), ReduceOp::Sum, 1, false)?;
    assert_f32(&out, &[2, 2], &[6.0, 9.0, 24.0, 27.0]);
    let out = reduce(iota(&[2, 3, 2]), ReduceOp::Max, 1, true)?;
    assert_f32(&out, &[2, 1, 2], &[4.0, 5.0, 10.0, 11.0]);
    Ok(())
}

#[test]
fn reduce_max_propagates_nan_and_handles_negatives() -> TestResult {
    let x = f32s(&[2, 2], &[-3.0, -1.0, f32::NAN, 2.0]);
    assert_f32(
        &reduce(x, ReduceOp::Max, 1, false)?,
        &[2],
        &[-1.0, f32::NAN],
    );
    Ok(())
}

#[test]
fn sums_accumulate_in_f64() -> TestResult {
    // In f32, 1e8 + 1 == 1e8, so a left-to-right f32 sum gives 0.
    let x = f32s(&[3], &[1e8, 1.0, -1e8]);
    assert_f32(&reduce(x, ReduceOp::Sum, 0, false)?, &[], &[1.0]);
    Ok(())
}

#[test]
fn reduce_integers() -> TestResult {
    let x = i64s(&[2, 2], &[1, 2, -3, -4]);
    assert_ints(
        &reduce(x.clone(), ReduceOp::Sum, 1, false)?,
        DType::I64,
        &[2],
        &[3, -7],
    );
    assert_ints(
        &reduce(x.clone(), ReduceOp::Mean, 1, false)?,
        DType::I64,
        &[2],
        &[1, -3],
    );
    assert_ints(
        &reduce(x, ReduceOp::Max, 0, false)?,
        DType::I64,
        &[2],
        &[1, 2],
    );
    Ok(())
}

fn matmul(a: HostTensor, b: HostTensor) -> TestResult<HostTensor> {
    eval_one(&[("a", a), ("b", b)], |g, x| g.matmul(x[0], x[1]))
}

#[test]
fn matmul_of_matrices() -> TestResult {
    let a = f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f32s(&[2, 2], &[5.0, 6.0, 7.0, 8.0]);
    assert_f32(&matmul(a, b)?, &[2, 2], &[19.0, 22.0, 43.0, 50.0]);
    let a = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f32s(&[3, 1], &[1.0, 0.0, -1.0]);
    assert_f32(&matmul(a, b)?, &[2, 1], &[-2.0, -2.0]);
    Ok(())
}

#[test]
fn matmul_broadcasts_batch_axes() -> TestResult {
    // a: two 1x2 rows; b: one 2x1 column shared by both batches.
    let a = f32s(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f32s(&[2, 1], &[1.0, 10.0]);
    assert_f32(&matmul(a, b)?, &[2, 1, 1], &[21.0, 43.0]);
    // a [2, 1, 1, 2] and b [3, 2, 1] broadcast to batch [2, 3].
    let a = f32s(&[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f32s(&[3, 2, 1], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    assert_f32(
        &matmul(a, b)?,
        &[2, 3, 1, 1],
        &[1.0, 2.0, 3.0, 3.0, 4.0, 7.0],
    );
    // Both operands batched: [2, 1, 2] @ [2, 2, 2].
    let a = f32s(&[2, 1, 2], &[1.0, 1.0, 1.0, -1.0]);
    let b = f32s(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_f32(&matmul(a, b)?, &[2, 1, 2], &[4.0, 6.0, -2.0, -2.0]);
    Ok(())
}

#[test]
fn matmul_accumulates_in_f64_and_rounds_to_bf16() -> TestResult {
    let a = floats(DType::BF16, &[1, 3], &[256.0, 1.0, -256.0]);
    let b = floats(DType::BF16, &[3, 1], &[256.0, 1.0, 256.0]);
    assert_floats(&matmul(a, b)?, DType::BF16, &[1, 1], &[1.0]);
    // 1 + 2^-8 rounds (to even) to 1 in bf16.
    let a = floats(DType::BF16, &[1, 2], &[1.0, 0.00390625]);
    let b = floats(DType::BF16, &[2, 1], &[1.0, 1.0]);
    assert_floats(&matmul(a, b)?, DType::BF16, &[1, 1], &[1.0]);
    Ok(())
}

/// Expert 0 picks `[x0, x1]`; expert 1 gives `[x2, x0 + x1 + x2]`.
fn expert_weights() -> HostTensor {
    let w = [
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], // expert 0
        [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], // expert 1
    ];
    f32s(&[2, 2, 3], &w.concat().concat())
}

fn grouped(x: HostTensor, ids: HostTensor) -> TestResult<HostTensor> {
    let feeds = [("x", x), ("w", expert_weights()), ("ids", ids)];
    eval_one(&feeds, |g, t| g.grouped_matmul(t[0], t[1], t[2]))
}

#[test]
fn grouped_matmul_routes_each_slot_to_its_expert() -> TestResult {
    let x = [
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], // token 0
        [[7.0, 8.0, 9.0], [1.0, 0.0, 2.0]], // token 1
        [[0.0, 1.0, 0.0], [2.0, 2.0, 2.0]], // token 2
    ];
    let x = f32s(&[3, 2, 3], &x.concat().concat());
    let ids = i64s(&[3, 2], &[0, 1, 1, 0, 1, 1]);
    let expected = [
        1.0, 2.0, 6.0, 15.0, // token 0: expert 0, expert 1
        9.0, 24.0, 1.0, 0.0, // token 1: expert 1, expert 0
        0.0, 1.0, 2.0, 6.0, // token 2: expert 1, expert 1
    ];
    assert_f32(&grouped(x, ids)?, &[3, 2, 2], &expected);
    Ok(())
}

#[test]
fn grouped_matmul_broadcasts_a_single_slot() -> TestResult {
    let x = f32s(&[3, 1, 3], &[1.0, 2.0, 3.0, 7.0, 8.0, 9.0, 0.0, 1.0, 0.0]);
    let ids = ints(DType::I32, &[3, 2], &[0, 1, 1, 0, 1, 1]);
    let expected = [
        1.0, 2.0, 3.0, 6.0, // token 0
        9.0, 24.0, 7.0, 8.0, // token 1
        0.0, 1.0, 0.0, 1.0, // token 2
    ];
    assert_f32(&grouped(x, ids)?, &[3, 2, 2], &expected);
    Ok(())
}

fn weight_grad(cotangent: HostTensor, x: HostTensor, ids: HostTensor) -> TestResult<HostTensor> {
    let feeds = [("cotangent", cotangent), ("x", x), ("ids", ids)];
    eval_one(&feeds, |g, t| {
        g.grouped_matmul_weight_grad(t[0], t[1], t[2], 3)
    })
}

#[test]
fn grouped_matmul_weight_grad_sums_outer_products_per_expert() -> TestResult {
    let cotangent = f32s(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let ids = i64s(&[2, 2], &[0, 1, 1, 0]);
    // One x row per token, serving both slots.
    let x = f32s(&[2, 1, 2], &[1.0, 10.0, 2.0, 20.0]);
    let expected = [
        15.0, 150.0, 18.0, 180.0, // expert 0: [1,2]ᵀ[1,10] + [7,8]ᵀ[2,20]
        13.0, 130.0, 16.0, 160.0, // expert 1: [3,4]ᵀ[1,10] + [5,6]ᵀ[2,20]
        0.0, 0.0, 0.0, 0.0, // expert 2: no token
    ];
    let out = weight_grad(cotangent.clone(), x, ids.clone())?;
    assert_f32(&out, &[3, 2, 2], &expected);
    // One x row per token-slot.
    let x = f32s(&[2, 2, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0]);
    let expected = [
        15.0, 0.0, 18.0, 0.0, // expert 0: [1,2]ᵀ[1,0] + [7,8]ᵀ[2,0]
        5.0, 8.0, 6.0, 10.0, // expert 1: [3,4]ᵀ[0,1] + [5,6]ᵀ[1,1]
        0.0, 0.0, 0.0, 0.0,
    ];
    assert_f32(&weight_grad(cotangent, x, ids)?, &[3, 2, 2], &expected);
    Ok(())
}

#[test]
fn grouped_matmul_weight_grad_rejects_unknown_experts() -> TestResult {
    let cotangent = f32s(&[1, 1, 1], &[1.0]);
    let x = f32s(&[1, 1, 1], &[1.0]);
    match weight_grad(cotangent, x, i64s(&[1, 1], &[3])) {
        Ok(_) => Err("expected an error".into()),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("index 3 is out of range 0..3"),
                "{message}"
            );
            Ok(())
        }
    }
}

#[test]
fn softmax_matches_a_hand_computed_one() -> TestResult {
    let x = f32s(&[2, 3], &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
    let out = eval_x(x, |b, x| b.softmax(x))?;
    let (e2, e1) = ((-2f64).exp(), (-1f64).exp());
    let total = e2 + e1 + 1.0;
    let third = 1.0 / 3.0;
    let expected = [e2 / total, e1 / total, 1.0 / total, third, third, third];
    assert_close(&out, &[2, 3], &expected, 1e-6);
    // About [0.0900306, 0.2447285, 0.6652410]:
    assert_close(
        &out,
        &[2, 3],
        &[0.0900306, 0.2447285, 0.6652410, third, third, third],
        1e-6,
    );
    Ok(())
}

/// A grouped weight gradient whose operands it rounds itself, in `tile_rows`×1 tiles along each
/// expert's token-slots.
fn rounded_weight_grad(
    g: &mut GraphBuilder,
    [cotangent, x, ids]: [Tensor; 3],
    experts: usize,
    tile_rows: usize,
) -> Result<Tensor, GraphError> {
    let op = Op::GroupedMatMulWeightGrad {
        experts,
        accumulation: Default::default(),
        rounding: Some(ExpertTiles {
            format: QuantFormat::E4M3,
            tile_rows,
            pow2_scales: false,
        }),
    };
    g.push(op, &[cotangent, x, ids], None)
}

#[test]
fn expert_tiles_with_one_expert_are_tiles_along_the_token_slots() -> TestResult {
    // 10 tokens × 2 slots, all routed to expert 0: its K is every token-slot in (t, s) order,
    // so its 4×1 tiles are those of the token-slots laid out as rows; x once per slot and
    // once per token (rounded once per slot: each slot is a row of K).
    let (tokens, slots, n, k, tile) = (10, 2, 3, 5, 4);
    let spread = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 97.0 - 10.0)
            .collect()
    };
    let cotangent = f32s(&[tokens, slots, n], &spread(tokens * slots * n, 1));
    let ids = i64s(&[tokens, slots], &vec![0; tokens * slots]);
    for x_slots in [slots, 1] {
        let x = f32s(&[tokens, x_slots, k], &spread(tokens * x_slots * k, 2));
        let feeds = [
            ("cotangent", cotangent.clone()),
            ("x", x),
            ("ids", ids.clone()),
        ];
        let rounded = eval_one(&feeds, |g, t| {
            rounded_weight_grad(g, [t[0], t[1], t[2]], 2, tile)
        })?;
        let along_token_slots = eval_one(&feeds, |g, t| {
            let x = g.expand(t[1], &[tokens, slots, k])?;
            let [c, x] = [(t[0], n), (x, k)].map(|(v, width)| {
                let rows = g.reshape(v, &[tokens * slots, width])?;
                let q = g.quantize_dequantize(rows, QuantFormat::E4M3, (tile, 1), false)?;
                g.reshape(q, &[tokens, slots, width])
            });
            g.grouped_matmul_weight_grad(c?, x?, t[2], 2)
        })?;
        assert_eq!(
            rounded.as_f32().unwrap(),
            along_token_slots.as_f32().unwrap()
        );
        let unrounded = eval_one(&feeds, |g, t| {
            g.grouped_matmul_weight_grad(t[0], t[1], t[2], 2)
        })?;
        assert_ne!(
            rounded.as_f32().unwrap(),
            unrounded.as_f32().unwrap(),
            "the rounding ran"
        );
    }
    Ok(())
}

#[test]
fn expert_tiles_start_afresh_at_every_expert() -> TestResult {
    // Tokens alternate between two experts: expert 0's values are tiny, expert 1's large. In
    // tiles of its own, each expert's values are exact in E4M3 (each is its tile's largest
    // value over 1, 2 or 4); a tile over all four tokens would scale by expert 1's values and
    // flush expert 0's to zero.
    let ids = i64s(&[4, 1], &[0, 1, 0, 1]);
    let small = [
        2f32.powi(-10),
        2f32.powi(-11),
        2f32.powi(-12),
        2f32.powi(-10),
    ];
    let cotangent = f32s(&[4, 1, 1], &[small[0], 1000.0, small[1], 500.0]);
    let x = f32s(&[4, 1, 1], &[small[2], 250.0, small[3], 1000.0]);
    let feeds = [("cotangent", cotangent), ("x", x), ("ids", ids)];
    let out = eval_one(&feeds, |g, t| {
        rounded_weight_grad(g, [t[0], t[1], t[2]], 2, 4)
    })?;
    let expected = [
        small[0] * small[2] + small[1] * small[3],
        1000.0 * 250.0 + 500.0 * 1000.0,
    ];
    assert_f32(&out, &[2, 1, 1], &expected);
    Ok(())
}
