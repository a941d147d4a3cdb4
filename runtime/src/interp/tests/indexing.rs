//! Gather, take_along, top-k, one-hot.

use fathom_compiler::DType;

use super::*;

#[test]
fn gather_looks_up_rows() -> TestResult {
    let table = f32s(&[3, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    let ids = i64s(&[2, 2], &[2, 0, 1, 1]);
    let out = eval_one(&[("t", table.clone()), ("i", ids)], |g, x| {
        g.gather(x[0], x[1])
    })?;
    assert_f32(
        &out,
        &[2, 2, 2],
        &[20.0, 21.0, 0.0, 1.0, 10.0, 11.0, 10.0, 11.0],
    );
    // A scalar index gives one row; i32 indices work too.
    let id = ints(DType::I32, &[], &[1]);
    let out = eval_one(&[("t", table), ("i", id)], |g, x| g.gather(x[0], x[1]))?;
    assert_f32(&out, &[2], &[10.0, 11.0]);
    // A rank-1 table gives scalars per index.
    let table = i64s(&[3], &[5, 6, 7]);
    let out = eval_one(&[("t", table), ("i", i64s(&[2], &[2, 2]))], |g, x| {
        g.gather(x[0], x[1])
    })?;
    assert_ints(&out, DType::I64, &[2], &[7, 7]);
    Ok(())
}

#[test]
fn take_along_the_last_axis() -> TestResult {
    let x = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let idx = i64s(&[2, 2], &[2, 0, 1, 1]);
    let out = eval_one(&[("x", x), ("i", idx)], |g, t| g.take_along(t[0], t[1], 1))?;
    assert_f32(&out, &[2, 2], &[3.0, 1.0, 5.0, 5.0]);
    Ok(())
}

#[test]
fn take_along_a_middle_axis() -> TestResult {
    // x[i, j, k] = 6i + 2j + k; out[i, 0, k] = x[i, idx[i, 0, k], k].
    let idx = i64s(&[2, 1, 2], &[2, 0, 1, 2]);
    let out = eval_one(&[("x", iota(&[2, 3, 2])), ("i", idx)], |g, t| {
        g.take_along(t[0], t[1], 1)
    })?;
    assert_f32(&out, &[2, 1, 2], &[4.0, 1.0, 8.0, 11.0]);
    Ok(())
}

#[test]
fn take_along_the_first_axis() -> TestResult {
    let x = i64s(&[2, 2], &[1, 2, 3, 4]);
    let idx = i64s(&[3, 2], &[1, 0, 0, 0, 1, 1]);
    let out = eval_one(&[("x", x), ("i", idx)], |g, t| g.take_along(t[0], t[1], 0))?;
    assert_ints(&out, DType::I64, &[3, 2], &[3, 2, 1, 2, 3, 4]);
    Ok(())
}

fn top_k(x: HostTensor, k: usize) -> TestResult<HostTensor> {
    eval_x(x, |b, x| b.top_k(x, k))
}

#[test]
fn top_k_orders_largest_first_ties_to_lower_index() -> TestResult {
    let x = f32s(&[2, 4], &[1.0, 3.0, 3.0, 2.0, -1.0, 0.0, -1.0, 0.5]);
    assert_ints(&top_k(x, 3)?, DType::I64, &[2, 3], &[1, 2, 3, 3, 1, 0]);
    let same = f32s(&[3], &[7.0, 7.0, 7.0]);
    assert_ints(&top_k(same, 2)?, DType::I64, &[2], &[0, 1]);
    // -0 and 0 are equal.
    let zeros = f32s(&[2], &[-0.0, 0.0]);
    assert_ints(&top_k(zeros, 2)?, DType::I64, &[2], &[0, 1]);
    Ok(())
}

#[test]
fn top_k_counts_nan_as_largest() -> TestResult {
    let x = f32s(&[5], &[5.0, f32::NAN, 5.0, f32::INFINITY, f32::NAN]);
    assert_ints(&top_k(x, 4)?, DType::I64, &[4], &[1, 4, 3, 0]);
    Ok(())
}

#[test]
fn top_k_of_integers() -> TestResult {
    let x = ints(DType::I32, &[1, 4], &[2, 9, 2, -5]);
    assert_ints(&top_k(x, 4)?, DType::I64, &[1, 4], &[1, 0, 2, 3]);
    Ok(())
}

#[test]
fn one_hot_in_each_dtype() -> TestResult {
    let ids = i64s(&[2], &[2, 0]);
    let out = eval_x(ids.clone(), |b, x| b.one_hot(x, 3, DType::F32))?;
    assert_f32(&out, &[2, 3], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    let out = eval_x(ids.clone(), |b, x| b.one_hot(x, 3, DType::I32))?;
    assert_ints(&out, DType::I32, &[2, 3], &[0, 0, 1, 1, 0, 0]);
    let out = eval_x(ids, |b, x| b.one_hot(x, 3, DType::Bool))?;
    assert_bools(&out, &[2, 3], &[false, false, true, true, false, false]);
    let out = eval_x(i64s(&[], &[1]), |b, x| b.one_hot(x, 2, DType::BF16))?;
    assert_floats(&out, DType::BF16, &[2], &[0.0, 1.0]);
    Ok(())
}
