//! Reshape, permute, expand, slice, concat, stack.

use fathom_compiler::DType;

use super::*;

#[test]
fn reshape_keeps_row_major_order() -> TestResult {
    let out = eval_x(iota(&[2, 3]), |b, x| b.reshape(x, &[3, 1, 2]))?;
    assert_f32(&out, &[3, 1, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    Ok(())
}

#[test]
fn transpose_of_a_matrix() -> TestResult {
    let x = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let out = eval_x(x, |b, x| b.transpose(x))?;
    assert_f32(&out, &[3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    Ok(())
}

#[test]
fn permute_of_rank_3() -> TestResult {
    // x[c, a, b] = 6c + 2a + b; out[a, b, c] = x[c, a, b].
    let out = eval_x(iota(&[2, 3, 2]), |b, x| b.permute(x, &[1, 2, 0]))?;
    let expected = [0.0, 6.0, 1.0, 7.0, 2.0, 8.0, 3.0, 9.0, 4.0, 10.0, 5.0, 11.0];
    assert_f32(&out, &[3, 2, 2], &expected);
    // out[c, b, a] = x[a, b, c] = 6a + 2b + c: reverses the axes.
    let out = eval_x(iota(&[2, 3, 2]), |b, x| b.permute(x, &[2, 1, 0]))?;
    let expected = [0.0, 6.0, 2.0, 8.0, 4.0, 10.0, 1.0, 7.0, 3.0, 9.0, 5.0, 11.0];
    assert_f32(&out, &[2, 3, 2], &expected);
    Ok(())
}

#[test]
fn permute_moves_ints_and_bools() -> TestResult {
    let x = i64s(&[2, 2], &[1, 2, 3, 4]);
    assert_ints(
        &eval_x(x, |b, x| b.transpose(x))?,
        DType::I64,
        &[2, 2],
        &[1, 3, 2, 4],
    );
    let x = bools(&[1, 2], &[true, false]);
    assert_bools(&eval_x(x, |b, x| b.transpose(x))?, &[2, 1], &[true, false]);
    Ok(())
}

#[test]
fn expand_stretches_and_prepends() -> TestResult {
    let row = f32s(&[3], &[1.0, 2.0, 3.0]);
    let out = eval_x(row, |b, x| b.expand(x, &[2, 3]))?;
    assert_f32(&out, &[2, 3], &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let column = f32s(&[2, 1], &[1.0, 2.0]);
    let out = eval_x(column, |b, x| b.expand(x, &[2, 2, 3]))?;
    let expected = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0];
    assert_f32(&out, &[2, 2, 3], &expected);
    let scalar = f32s(&[], &[7.0]);
    assert_f32(
        &eval_x(scalar, |b, x| b.expand(x, &[2, 2]))?,
        &[2, 2],
        &[7.0; 4],
    );
    Ok(())
}

#[test]
fn slice_along_a_middle_axis() -> TestResult {
    // x[i, j, k] = 6i + 2j + k; out[i, j, k] = x[i, j + 1, k].
    let out = eval_x(iota(&[2, 3, 2]), |b, x| b.slice(x, 1, 1, 3))?;
    assert_f32(
        &out,
        &[2, 2, 2],
        &[2.0, 3.0, 4.0, 5.0, 8.0, 9.0, 10.0, 11.0],
    );
    let out = eval_x(iota(&[2, 3, 2]), |b, x| b.slice(x, 2, 1, 2))?;
    assert_f32(&out, &[2, 3, 1], &[1.0, 3.0, 5.0, 7.0, 9.0, 11.0]);
    let out = eval_x(iota(&[2, 3, 2]), |b, x| b.slice(x, 0, 1, 2))?;
    assert_f32(&out, &[1, 3, 2], &[6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
    Ok(())
}

#[test]
fn concat_along_a_middle_axis() -> TestResult {
    let a = f32s(&[2, 1, 2], &[0.0, 1.0, 2.0, 3.0]);
    let b = f32s(
        &[2, 2, 2],
        &[10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0],
    );
    let out = eval_one(&[("a", a), ("b", b)], |g, x| {
        g.concat(&[x[0], x[1], x[0]], 1)
    })?;
    let expected = [
        0.0, 1.0, 10.0, 11.0, 12.0, 13.0, 0.0, 1.0, // i = 0
        2.0, 3.0, 14.0, 15.0, 16.0, 17.0, 2.0, 3.0, // i = 1
    ];
    assert_f32(&out, &[2, 4, 2], &expected);
    Ok(())
}

#[test]
fn concat_along_first_and_last_axes() -> TestResult {
    let a = i64s(&[1, 2], &[1, 2]);
    let b = i64s(&[2, 2], &[3, 4, 5, 6]);
    let out = eval_one(&[("a", a), ("b", b)], |g, x| g.concat(&[x[0], x[1]], 0))?;
    assert_ints(&out, DType::I64, &[3, 2], &[1, 2, 3, 4, 5, 6]);
    let a = bools(&[2, 1], &[true, false]);
    let b = bools(&[2, 2], &[false, false, true, true]);
    let out = eval_one(&[("a", a), ("b", b)], |g, x| g.concat(&[x[0], x[1]], 1))?;
    assert_bools(&out, &[2, 3], &[true, false, false, false, true, true]);
    Ok(())
}

#[test]
fn stack_adds_a_leading_axis() -> TestResult {
    let a = f32s(&[2], &[1.0, 2.0]);
    let b = f32s(&[2], &[3.0, 4.0]);
    let out = eval_one(&[("a", a), ("b", b)], |g, x| g.stack(&[x[1], x[0], x[1]]))?;
    assert_f32(&out, &[3, 2], &[3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    Ok(())
}
