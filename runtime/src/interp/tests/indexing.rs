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

#[test]
fn cross_entropy_per_row_with_ignored_labels() -> TestResult {
    // Row 0: logits ln 1, ln 2, ln 5 (probabilities 1/8, 2/8, 5/8), label 2: −ln(5/8).
    // Row 1: all equal (probability 1/3 each), label 0: ln 3. Row 2 is ignored (label −1).
    let x = f32s(
        &[3, 3],
        &[0.0, 2f32.ln(), 5f32.ln(), 7.0, 7.0, 7.0, 100.0, -3.0, 2.0],
    );
    let labels = i64s(&[3], &[2, 0, -1]);
    let feeds = [("x", x.clone()), ("l", labels.clone())];
    let loss = eval_one(&feeds, |g, t| g.cross_entropy(t[0], t[1]))?;
    let expected = [-(5.0f64 / 8.0).ln(), 3f64.ln(), 0.0];
    assert_close(&loss, &[3], &expected, 1e-6);

    // The gradient: (softmax − onehot) · g, rows scaled by their cotangent, the ignored row 0.
    let cot = f32s(&[3], &[2.0, -1.0, 5.0]);
    let feeds = [("x", x), ("l", labels), ("g", cot)];
    let grad = eval_one(&feeds, |g, t| {
        let loss = g.cross_entropy(t[0], t[1])?;
        g.cross_entropy_grad(t[0], t[1], loss, t[2])
    })?;
    let third = 1.0 / 3.0;
    let expected = [
        2.0 * 0.125,
        2.0 * 0.25,
        2.0 * (0.625 - 1.0),
        -(third - 1.0),
        -third,
        -third,
        0.0,
        0.0,
        0.0,
    ];
    assert_close(&grad, &[3, 3], &expected, 1e-6);
    Ok(())
}

#[test]
fn cross_entropy_rejects_labels_beyond_the_vocabulary() {
    let x = f32s(&[2, 3], &[0.0; 6]);
    let labels = i64s(&[2], &[1, 3]);
    let error = eval_one(&[("x", x), ("l", labels)], |g, t| {
        g.cross_entropy(t[0], t[1])
    })
    .expect_err("label 3 of a vocabulary of 3");
    assert!(error.to_string().contains("3"), "{error}");
    // Shapes are checked when the graph is built.
    let mut g = GraphBuilder::new("bad");
    let logits = g.input("x", ty(DType::F32, &[2, 3])).expect("input");
    let labels = g.input("l", ty(DType::I64, &[3])).expect("input");
    let error = g
        .cross_entropy(logits, labels)
        .expect_err("labels of the wrong shape");
    assert!(error.to_string().contains("logits' shape"), "{error}");
}
