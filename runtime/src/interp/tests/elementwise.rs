//! Unary, binary, compare, select, cast and constants.

use fathom_compiler::DType;
use fathom_compiler::graph::{BinaryOp, CompareOp, UnaryOp};

use super::*;

fn unary(op: UnaryOp, values: &[f32]) -> TestResult<HostTensor> {
    eval_x(f32s(&[values.len()], values), |b, x| b.unary(op, x))
}

#[test]
fn unary_ops() -> TestResult {
    let n = 4;
    assert_f32(
        &unary(UnaryOp::Neg, &[-1.0, 0.0, 0.5, 4.0])?,
        &[n],
        &[1.0, -0.0, -0.5, -4.0],
    );
    assert_f32(
        &unary(UnaryOp::Abs, &[-1.0, 0.0, 0.5, -4.0])?,
        &[n],
        &[1.0, 0.0, 0.5, 4.0],
    );
    assert_f32(
        &unary(UnaryOp::Sqrt, &[4.0, 2.25, 0.0, -1.0])?,
        &[n],
        &[2.0, 1.5, 0.0, f32::NAN],
    );
    assert_f32(
        &unary(UnaryOp::Rsqrt, &[4.0, 0.25, 0.0, 16.0])?,
        &[n],
        &[0.5, 2.0, f32::INFINITY, 0.25],
    );
    assert_f32(
        &unary(UnaryOp::Recip, &[2.0, -0.25, 0.0, 8.0])?,
        &[n],
        &[0.5, -4.0, f32::INFINITY, 0.125],
    );
    let e = std::f64::consts::E as f32;
    assert_f32(&unary(UnaryOp::Exp, &[0.0, 1.0])?, &[2], &[1.0, e]);
    assert_f32(
        &unary(UnaryOp::Log, &[1.0, 0.0])?,
        &[2],
        &[0.0, f32::NEG_INFINITY],
    );
    Ok(())
}

#[test]
fn sigmoid_is_stable_at_both_ends() -> TestResult {
    let out = unary(UnaryOp::Sigmoid, &[0.0, 2.0, -100.0, 800.0, -800.0])?;
    let at_2 = 1.0 / (1.0 + (-2f64).exp());
    let at_minus_100 = (-100f64).exp() / (1.0 + (-100f64).exp());
    assert_f32(
        &out,
        &[5],
        &[0.5, at_2 as f32, at_minus_100 as f32, 1.0, 0.0],
    );
    assert!(at_minus_100 as f32 > 0.0, "a subnormal, not flushed to 0");
    Ok(())
}

fn binary(op: BinaryOp, a: HostTensor, b: HostTensor) -> TestResult<HostTensor> {
    eval_one(&[("a", a), ("b", b)], |g, x| g.binary(op, x[0], x[1]))
}

#[test]
fn binary_broadcasts_trailing_axes() -> TestResult {
    let a = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let row = f32s(&[3], &[10.0, 20.0, 30.0]);
    let out = binary(BinaryOp::Add, a.clone(), row)?;
    assert_f32(&out, &[2, 3], &[11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);

    let column = f32s(&[2, 1], &[10.0, 20.0]);
    let out = binary(BinaryOp::Sub, a, column)?;
    assert_f32(&out, &[2, 3], &[-9.0, -8.0, -7.0, -16.0, -15.0, -14.0]);
    Ok(())
}

#[test]
fn binary_broadcasts_both_operands() -> TestResult {
    // [2, 1] * [1, 3] -> [2, 3]: an outer product.
    let a = f32s(&[2, 1], &[1.0, 2.0]);
    let b = f32s(&[1, 3], &[3.0, 4.0, 5.0]);
    assert_f32(
        &binary(BinaryOp::Mul, a.clone(), b.clone())?,
        &[2, 3],
        &[3.0, 4.0, 5.0, 6.0, 8.0, 10.0],
    );
    // [3] / [2, 1, 1] -> [2, 1, 3]: a new leading axis.
    let c = f32s(&[2, 1, 1], &[1.0, 2.0]);
    let out = binary(BinaryOp::Div, f32s(&[3], &[3.0, 4.0, 5.0]), c)?;
    assert_f32(&out, &[2, 1, 3], &[3.0, 4.0, 5.0, 1.5, 2.0, 2.5]);
    Ok(())
}

#[test]
fn max_and_min_propagate_nan() -> TestResult {
    let a = f32s(&[3], &[1.0, 5.0, f32::NAN]);
    let b = f32s(&[3], &[2.0, 3.0, 0.0]);
    assert_f32(
        &binary(BinaryOp::Max, a.clone(), b.clone())?,
        &[3],
        &[2.0, 5.0, f32::NAN],
    );
    assert_f32(&binary(BinaryOp::Min, a, b)?, &[3], &[1.0, 3.0, f32::NAN]);
    Ok(())
}

#[test]
fn integer_arithmetic_wraps_and_truncates() -> TestResult {
    let out = binary(BinaryOp::Div, i64s(&[2], &[7, -7]), i64s(&[1], &[2]))?;
    assert_ints(&out, DType::I64, &[2], &[3, -3]);
    let max = i64::from(i32::MAX);
    let out = binary(
        BinaryOp::Add,
        ints(DType::I32, &[1], &[max]),
        ints(DType::I32, &[1], &[1]),
    )?;
    assert_ints(&out, DType::I32, &[1], &[i64::from(i32::MIN)]);
    Ok(())
}

#[test]
fn bf16_arithmetic_rounds_to_bf16() -> TestResult {
    // 1 + 2^-8 is a tie between 1 and 1 + 2^-7 in bf16: to even, 1.
    let a = floats(DType::BF16, &[2], &[1.0, 1.0]);
    let b = floats(DType::BF16, &[2], &[0.00390625, 0.01171875]);
    let out = binary(BinaryOp::Add, a, b)?;
    assert_floats(&out, DType::BF16, &[2], &[1.0, 1.015625]);
    Ok(())
}

#[test]
fn compare_broadcasts_and_follows_ieee() -> TestResult {
    let a = f32s(&[3], &[1.0, 2.0, f32::NAN]);
    let two = f32s(&[], &[2.0]);
    let cmp = |op| {
        eval_one(&[("a", a.clone()), ("b", two.clone())], |g, x| {
            g.compare(op, x[0], x[1])
        })
    };
    assert_bools(&cmp(CompareOp::Lt)?, &[3], &[true, false, false]);
    assert_bools(&cmp(CompareOp::Le)?, &[3], &[true, true, false]);
    assert_bools(&cmp(CompareOp::Eq)?, &[3], &[false, true, false]);
    assert_bools(&cmp(CompareOp::Gt)?, &[3], &[false, false, false]);
    assert_bools(&cmp(CompareOp::Ge)?, &[3], &[false, true, false]);

    let rows = i64s(&[2, 1], &[0, 1]);
    let columns = i64s(&[1, 3], &[0, 1, 2]);
    let out = eval_one(&[("r", rows), ("c", columns)], |g, x| {
        g.compare(CompareOp::Ge, x[0], x[1])
    })?;
    assert_bools(&out, &[2, 3], &[true, false, false, true, true, false]);
    Ok(())
}

#[test]
fn select_broadcasts_all_three() -> TestResult {
    let cond = bools(&[2, 1], &[true, false]);
    let yes = f32s(&[1, 3], &[1.0, 2.0, 3.0]);
    let no = f32s(&[], &[-1.0]);
    let out = eval_one(&[("c", cond), ("t", yes), ("f", no)], |g, x| {
        g.select(x[0], x[1], x[2])
    })?;
    assert_f32(&out, &[2, 3], &[1.0, 2.0, 3.0, -1.0, -1.0, -1.0]);

    let cond = bools(&[3], &[false, true, false]);
    let out = eval_one(
        &[
            ("c", cond),
            ("t", i64s(&[1], &[7])),
            ("f", i64s(&[3], &[1, 2, 3])),
        ],
        |g, x| g.select(x[0], x[1], x[2]),
    )?;
    assert_ints(&out, DType::I64, &[3], &[1, 7, 3]);
    Ok(())
}

fn cast(x: HostTensor, to: DType) -> TestResult<HostTensor> {
    eval_x(x, |b, x| b.cast(x, to))
}

#[test]
fn cast_to_bf16_and_f16_rounds_to_nearest_even() -> TestResult {
    let x = f32s(&[4], &[1.00390625, 1.01171875, 3.0, -1.00390625]);
    assert_floats(
        &cast(x, DType::BF16)?,
        DType::BF16,
        &[4],
        &[1.0, 1.015625, 3.0, -1.0],
    );
    // f16: 1 + 2^-11 is a tie (to 1); 65520 is a tie between 65504 and 2^16 (to infinity).
    let x = f32s(&[3], &[1.0 + 2f32.powi(-11), 65520.0, 0.1]);
    let tenth = half::f16::from_f32(0.1).to_f32();
    assert_floats(
        &cast(x, DType::F16)?,
        DType::F16,
        &[3],
        &[1.0, f32::INFINITY, tenth],
    );
    // And back to f32, exactly.
    let x = floats(DType::BF16, &[1], &[1.015625]);
    assert_f32(&cast(x, DType::F32)?, &[1], &[1.015625]);
    Ok(())
}

#[test]
fn cast_to_fp8_saturates() -> TestResult {
    let x = f32s(
        &[6],
        &[500.0, -1000.0, f32::INFINITY, 0.3, 1.0625, f32::NAN],
    );
    // E4M3 near 0.3 has steps of 1/32: 0.3125 is nearest. 1.0625 ties between 1 and 1.125.
    let expected = [448.0, -448.0, 448.0, 0.3125, 1.0, f32::NAN];
    assert_floats(
        &cast(x.clone(), DType::F8E4M3)?,
        DType::F8E4M3,
        &[6],
        &expected,
    );
    let expected = [512.0, -1024.0, 57344.0, 0.3125, 1.0, f32::NAN];
    assert_floats(&cast(x, DType::F8E5M2)?, DType::F8E5M2, &[6], &expected);
    Ok(())
}

#[test]
fn cast_between_floats_ints_and_bools() -> TestResult {
    let x = f32s(&[4], &[2.7, -2.7, f32::NAN, 3e9]);
    assert_ints(
        &cast(x.clone(), DType::I64)?,
        DType::I64,
        &[4],
        &[2, -2, 0, 3_000_000_000],
    );
    assert_ints(
        &cast(x, DType::I32)?,
        DType::I32,
        &[4],
        &[2, -2, 0, i64::from(i32::MAX)],
    );

    let x = i64s(&[3], &[3, 16_777_217, -1]);
    assert_f32(
        &cast(x.clone(), DType::F32)?,
        &[3],
        &[3.0, 16_777_216.0, -1.0],
    );
    assert_bools(&cast(x, DType::Bool)?, &[3], &[true, true, true]);
    let x = i64s(&[2], &[1 << 32, (1 << 32) + 5]);
    assert_ints(&cast(x, DType::I32)?, DType::I32, &[2], &[0, 5]);

    let x = f32s(&[4], &[0.0, -0.0, 0.5, f32::NAN]);
    assert_bools(&cast(x, DType::Bool)?, &[4], &[false, false, true, true]);
    let x = bools(&[2], &[true, false]);
    assert_floats(
        &cast(x.clone(), DType::BF16)?,
        DType::BF16,
        &[2],
        &[1.0, 0.0],
    );
    assert_ints(&cast(x, DType::I32)?, DType::I32, &[2], &[1, 0]);
    Ok(())
}

#[test]
fn constants_take_the_node_dtype() -> TestResult {
    let c = |dtype, values: Vec<f64>| {
        eval_one(&[], move |b, _| {
            b.constant("c", ty(dtype, &[values.len()]), values)
        })
    };
    assert_floats(
        &c(DType::BF16, vec![1.00390625, 0.1])?,
        DType::BF16,
        &[2],
        &[1.0, 0.10009765625],
    );
    assert_f32(&c(DType::F32, vec![0.1])?, &[1], &[0.1]);
    assert_ints(&c(DType::I32, vec![2.9, -2.9])?, DType::I32, &[2], &[2, -2]);
    assert_ints(
        &c(DType::I64, vec![1e12])?,
        DType::I64,
        &[1],
        &[1_000_000_000_000],
    );
    assert_bools(&c(DType::Bool, vec![0.0, 2.0])?, &[2], &[false, true]);
    let scalar = eval_one(&[], |b, _| b.scalar(500.0, DType::F8E4M3))?;
    assert_floats(&scalar, DType::F8E4M3, &[], &[448.0]);
    Ok(())
}
