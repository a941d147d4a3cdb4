//! Loop nests evaluated a row at a time: for every index of the outer axes, each statement's
//! expression is computed for the whole innermost axis into a row of values.

use fathom_compiler::graph::{BinaryOp, CompareOp, ReduceOp, UnaryOp};
use fathom_compiler::kernel::{Expr, LoopNest, Stmt, View};

use super::Storage;
use super::expf::exp;
use crate::interp::round_to_dtype;

pub(super) fn run(nest: &LoopNest, buffers: &mut [Storage<'_>]) {
    let domain = &nest.domain;
    let Some((&inner, outer)) = domain.split_last() else {
        // A scalar domain: one point.
        run_rows(nest, buffers, &[], 1);
        return;
    };
    let outer_count: usize = outer.iter().product();
    let mut index = vec![0usize; outer.len()];
    for _ in 0..outer_count {
        run_rows(nest, buffers, &index, inner);
        // Next outer index, row-major.
        for d in (0..outer.len()).rev() {
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// The buffer position of a view's element at (outer index, inner 0), and its inner stride.
fn position(view: &View, outer: &[usize]) -> (isize, isize) {
    let mut offset = view.offset as isize;
    for (d, &i) in outer.iter().enumerate() {
        offset += view.strides[d] * i as isize;
    }
    let inner = view.strides.get(outer.len()).copied().unwrap_or(0);
    (offset, inner)
}

fn run_rows(nest: &LoopNest, buffers: &mut [Storage<'_>], outer: &[usize], inner: usize) {
    let mut rows: Vec<f32> = Vec::new();
    for stmt in &nest.body {
        match stmt {
            Stmt::Reduce { row, op, value } => {
                let values = eval(value, buffers, outer, inner, &rows);
                let sum = || fold_row(&values, -0.0, |s, v| s + f64::from(v), |a, b| a + b);
                let r = match op {
                    ReduceOp::Sum => sum() as f32,
                    ReduceOp::Mean => (sum() / inner as f64) as f32,
                    ReduceOp::Max => fold_row(&values, f32::NEG_INFINITY, max_step, max_step),
                };
                if rows.len() <= *row {
                    rows.resize(row + 1, 0.0);
                }
                rows[*row] = r;
            }
            Stmt::Store { view, value } => {
                let values = eval(value, buffers, outer, inner, &rows);
                let (start, stride) = position(view, outer);
                let out = &mut buffers[view.buffer.index()];
                for (j, v) in values.into_iter().enumerate() {
                    out[(start + stride * j as isize) as usize] = v;
                }
            }
            Stmt::StoreRow { view, value } => {
                let values = eval(value, buffers, outer, 1, &rows);
                let (start, _) = position(view, outer);
                buffers[view.buffer.index()][start as usize] = values[0];
            }
        }
    }
}

/// Rows at least this long are reduced in [`FOLD_LANES`] interleaved lanes (see [`fold_row`]).
pub(super) const LANE_SPLIT_MIN: usize = 8;
/// How many interleaved accumulators a long row is reduced in.
pub(super) const FOLD_LANES: usize = 8;

/// Folds a row in the order every row reduction of the CPU backend uses, the compiled kernels
/// included (`jit::codegen` emits exactly this): rows shorter than [`LANE_SPLIT_MIN`] one
/// element after another; longer ones with element `j < 8⌊n/8⌋` folded into lane `j mod 8`
/// (each lane starting at `init`), lane `i` combined with lane `i + 4` (`c_i = l_i ∘ l_{i+4}`),
/// those as `(c0 ∘ c1) ∘ (c2 ∘ c3)`, then the last `n mod 8` elements one after another.
/// Independent accumulators let the compiled loop overlap the latency of its additions and
/// comparisons (a single chain of dependent f64 additions was the bound of the softmax and loss
/// kernels; with four lanes, one four-lane vector chain still was); the order stays fixed, so
/// results do not depend on the code path or on how rows are split across threads.
pub(super) fn fold_row<A: Copy>(
    values: &[f32],
    init: A,
    step: impl Fn(A, f32) -> A,
    combine: impl Fn(A, A) -> A,
) -> A {
    if values.len() < LANE_SPLIT_MIN {
        return values.iter().fold(init, |acc, &v| step(acc, v));
    }
    let split = values.len() / FOLD_LANES * FOLD_LANES;
    let mut lanes = [init; FOLD_LANES];
    for chunk in values[..split].chunks_exact(FOLD_LANES) {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = step(*lane, v);
        }
    }
    let c: [A; 4] = std::array::from_fn(|i| combine(lanes[i], lanes[i + 4]));
    let combined = combine(combine(c[0], c[1]), combine(c[2], c[3]));
    values[split..]
        .iter()
        .fold(combined, |acc, &v| step(acc, v))
}

/// One step of a max reduction: `v` replaces `m` when greater or NaN (so NaN propagates).
pub(super) fn max_step(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() { v } else { m }
}

/// `expr` at every inner index of the row.
fn eval(
    expr: &Expr,
    buffers: &[Storage<'_>],
    outer: &[usize],
    inner: usize,
    rows: &[f32],
) -> Vec<f32> {
    match expr {
        Expr::Load(view) => {
            let (start, stride) = position(view, outer);
            let data = &buffers[view.buffer.index()];
            (0..inner)
                .map(|j| data[(start + stride * j as isize) as usize])
                .collect()
        }
        Expr::Constant(c) => vec![*c as f32; inner],
        Expr::Row(r) => vec![rows[*r]; inner],
        Expr::Unary(op, a) => {
            let mut v = eval(a, buffers, outer, inner, rows);
            for x in &mut v {
                *x = unary(*op, *x);
            }
            v
        }
        Expr::Binary(op, a, b) => {
            let mut x = eval(a, buffers, outer, inner, rows);
            let y = eval(b, buffers, outer, inner, rows);
            for (x, y) in x.iter_mut().zip(y) {
                *x = binary(*op, *x, y);
            }
            x
        }
        Expr::Compare(op, a, b) => {
            let mut x = eval(a, buffers, outer, inner, rows);
            let y = eval(b, buffers, outer, inner, rows);
            for (x, y) in x.iter_mut().zip(y) {
                *x = f32::from(u8::from(compare(*op, *x, y)));
            }
            x
        }
        Expr::Select(c, a, b) => {
            let c = eval(c, buffers, outer, inner, rows);
            let mut x = eval(a, buffers, outer, inner, rows);
            let y = eval(b, buffers, outer, inner, rows);
            for ((x, y), c) in x.iter_mut().zip(y).zip(c) {
                if c == 0.0 {
                    *x = y;
                }
            }
            x
        }
        Expr::Cast(to, a) => {
            let mut v = eval(a, buffers, outer, inner, rows);
            for x in &mut v {
                *x = if to.is_integer() {
                    x.trunc()
                } else if *to == fathom_compiler::DType::Bool {
                    f32::from(u8::from(*x != 0.0))
                } else {
                    round_to_dtype(*to, *x)
                };
            }
            v
        }
    }
}

pub(super) fn unary(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => exp(x),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sigmoid => {
            if x >= 0.0 {
                1.0 / (1.0 + exp(-x))
            } else {
                let e = exp(x);
                e / (1.0 + e)
            }
        }
    }
}

pub(super) fn binary(op: BinaryOp, x: f32, y: f32) -> f32 {
    match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Max => {
            if x.is_nan() || y.is_nan() {
                f32::NAN
            } else {
                x.max(y)
            }
        }
        BinaryOp::Min => {
            if x.is_nan() || y.is_nan() {
                f32::NAN
            } else {
                x.min(y)
            }
        }
    }
}

pub(super) fn compare(op: CompareOp, x: f32, y: f32) -> bool {
    match op {
        CompareOp::Eq => x == y,
        CompareOp::Lt => x < y,
        CompareOp::Le => x <= y,
        CompareOp::Gt => x > y,
        CompareOp::Ge => x >= y,
    }
}

#[cfg(test)]
mod tests {
    use super::fold_row;

    /// The order is observable with a combine that is not associative: eight lanes holding 1..8
    /// combine as c_i = 10·l_i + l_{i+4} = 15, 26, 37, 48, then (10·15 + 26)·10 + (10·37 + 48)
    /// = 2178; a ninth element is the tail; sixteen fill each lane twice.
    #[test]
    fn rows_fold_in_eight_lanes_then_the_tail() {
        let step = |acc: f64, v: f32| acc + f64::from(v);
        let combine = |a: f64, b: f64| a * 10.0 + b;
        let one_to_eight: Vec<f32> = (1..=8).map(|v| v as f32).collect();
        assert_eq!(fold_row(&one_to_eight, 0.0, step, combine), 2178.0);
        let nine = [one_to_eight.as_slice(), &[100.0]].concat();
        assert_eq!(fold_row(&nine, 0.0, step, combine), 2278.0);
        // Lanes of two ones: c_i = 22, (220 + 22)·10 + 242 = 2662.
        assert_eq!(fold_row(&[1.0; 16], 0.0, step, combine), 2662.0);
        // Below eight elements: one chain, no combining.
        assert_eq!(fold_row(&[1.0; 7], 0.0, step, combine), 7.0);
    }
}
