//! The softmax and its gradient as library routines (`Library::Softmax`, `SoftmaxGrad`), which
//! the lowering makes of the fused loop nests for a CPU with AVX-512
//! (`LowerOptions::softmax_routines`, see [`super::expf::vectorised`]): each row's arithmetic
//! sixteen lanes at a time where cranelift's loops run four, attention's causal softmax being
//! mostly `exp`.
//!
//! The routines compute what the loop nests compute, bit for bit: the same f32 operations on
//! every element (the exponential is [`super::expf::exp`]'s operations lane by lane), and each
//! row's sum in f64 in the order of [`loops::fold_row`], which eight f64 lanes follow exactly.
//! Only the row's max is taken in another order, and a max is the same value in any order (the
//! sign of a zero max may differ, which no `x − max` sees). Rows are spread over rayon's
//! threads; without AVX-512 the same routines run one value at a time (the tests and a forced
//! lowering; the lowering does not choose them there).

use fathom_compiler::kernel::{Masking, Scores, View};
use rayon::prelude::*;

use super::expf;
use super::loops::{FOLD_LANES, fold_row, max_step};

// The sixteen-lane sums keep `fold_row`'s eight f64 lanes in one register.
const _: () = assert!(FOLD_LANES == 8);

/// Rows per task: a row of attention scores is a few hundred nanoseconds of work.
const ROWS_PER_TASK: usize = 16;

/// Where each row of a view over a domain starts, the rows numbered in row-major order of the
/// domain's outer axes (`outer`).
#[derive(Clone, Copy)]
pub(super) struct RowStarts<'a> {
    view: &'a View,
    outer: &'a [usize],
}

impl<'a> RowStarts<'a> {
    pub(super) fn new(view: &'a View, outer: &'a [usize]) -> Self {
        RowStarts { view, outer }
    }

    fn start(self, mut row: usize) -> usize {
        let mut offset = self.view.offset as isize;
        for (d, &extent) in self.outer.iter().enumerate().rev() {
            offset += self.view.strides[d] * (row % extent) as isize;
            row /= extent;
        }
        usize::try_from(offset).expect("a view's rows start inside its buffer")
    }

    /// Row `row`, `len` long, of `data`.
    pub(super) fn row(self, data: &[f32], row: usize, len: usize) -> &[f32] {
        &data[self.start(row)..][..len]
    }

    /// The per-row value of row `row` (a view whose inner stride is 0).
    fn value(self, data: &[f32], row: usize) -> f32 {
        data[self.start(row)]
    }
}

/// A softmax's scores as the routine reads them: `x · scale`, `fill` where `mask` is zero.
pub(super) struct ScoreRows<'a> {
    pub(super) x: (&'a [f32], RowStarts<'a>),
    pub(super) scale: Option<f32>,
    pub(super) mask: Option<(&'a [f32], RowStarts<'a>, f32)>,
}

impl<'a> ScoreRows<'a> {
    /// `scores`' buffers: `buffer(view)` gives a view's buffer.
    pub(super) fn of(
        scores: &'a Scores,
        outer: &'a [usize],
        buffer: impl Fn(&View) -> &'a [f32],
    ) -> Self {
        ScoreRows {
            x: (buffer(&scores.x), RowStarts::new(&scores.x, outer)),
            scale: scores.scale.map(|c| c as f32),
            mask: scores.mask.as_ref().map(|Masking { mask, fill }| {
                (buffer(mask), RowStarts::new(mask, outer), *fill as f32)
            }),
        }
    }
}

/// Each row of `n` scores: `exponentials = exp(s − max s)`, `out = exponentials / Σ`, and each
/// row's sum into `sums` when given (`exponentials` and `out` row-major, `sums` one per row).
pub(super) fn forward(
    scores: &ScoreRows<'_>,
    n: usize,
    exponentials: &mut [f32],
    out: &mut [f32],
    sums: Option<&mut [f32]>,
) {
    forward_in(expf::vectorised(), scores, n, exponentials, out, sums)
}

/// [`forward`] in the sixteen-lane form or the one-value one.
fn forward_in(
    vector: bool,
    scores: &ScoreRows<'_>,
    n: usize,
    exponentials: &mut [f32],
    out: &mut [f32],
    sums: Option<&mut [f32]>,
) {
    assert!(n > 0 && out.len().is_multiple_of(n) && exponentials.len() == out.len());
    let rows = out.len() / n;
    let mut row_sums = vec![0f32; rows];
    out.par_chunks_mut(n)
        .zip(exponentials.par_chunks_mut(n))
        .zip(&mut row_sums)
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(r, ((out, e), sum))| {
            let (x, x_rows) = scores.x;
            let x = x_rows.row(x, r, n);
            let mask = scores
                .mask
                .map(|(mask, rows, fill)| (rows.row(mask, r, n), fill));
            let scores = RowScores {
                x,
                scale: scores.scale,
                mask,
            };
            // The scores go through `out`, which the quotients overwrite.
            *sum = row_softmax(vector, &scores, e, out);
        });
    if let Some(sums) = sums {
        sums.copy_from_slice(&row_sums);
    }
}

/// One row of scores: `x · scale`, and the mask's row with the fill.
struct RowScores<'a> {
    x: &'a [f32],
    scale: Option<f32>,
    mask: Option<(&'a [f32], f32)>,
}

/// One row: the scores into `out`, their exponentials into `e`, the quotients into `out`;
/// returns the sum.
fn row_softmax(vector: bool, scores: &RowScores<'_>, e: &mut [f32], out: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vectorised()` said the CPU has AVX-512F.
        return unsafe { wide::row_softmax(scores, e, out) };
    }
    let _ = vector;
    let &RowScores { x, scale, mask } = scores;
    for (j, s) in out.iter_mut().enumerate() {
        let scaled = scale.map_or(x[j], |c| x[j] * c);
        *s = match mask {
            Some((mask, fill)) if mask[j] == 0.0 => fill,
            _ => scaled,
        };
    }
    let max = fold_row(out, f32::NEG_INFINITY, max_step, max_step);
    for (e, &s) in e.iter_mut().zip(out.iter()) {
        *e = expf::exp(s - max);
    }
    let sum = sum_in_f64(e);
    for (o, &e) in out.iter_mut().zip(e.iter()) {
        *o = e / sum;
    }
    sum
}

/// A row's sum as every row reduction of the backend takes it.
fn sum_in_f64(values: &[f32]) -> f32 {
    fold_row(values, -0.0, |s, v| s + f64::from(v), |a, b| a + b) as f32
}

/// The views a softmax gradient reads, each with its buffer.
pub(super) struct GradientRows<'a> {
    pub(super) cotangent: (&'a [f32], RowStarts<'a>),
    pub(super) probabilities: (&'a [f32], RowStarts<'a>),
    /// One value per row.
    pub(super) sums: (&'a [f32], RowStarts<'a>),
    pub(super) exponentials: (&'a [f32], RowStarts<'a>),
    pub(super) mask: Option<(&'a [f32], RowStarts<'a>)>,
    pub(super) scale: Option<f32>,
}

/// Each row of `n`: `r = Σ −(dp · (p / s))`, then `out = ((dp / s) + r) · e`, zero where the
/// mask is, times the scale (`out` row-major).
pub(super) fn gradient(rows: &GradientRows<'_>, n: usize, out: &mut [f32]) {
    gradient_in(expf::vectorised(), rows, n, out)
}

/// [`gradient`] in the sixteen-lane form or the one-value one.
fn gradient_in(vector: bool, rows: &GradientRows<'_>, n: usize, out: &mut [f32]) {
    assert!(n > 0 && out.len().is_multiple_of(n));
    fn row_of<'d>((data, starts): (&'d [f32], RowStarts<'_>), r: usize, n: usize) -> &'d [f32] {
        starts.row(data, r, n)
    }
    out.par_chunks_mut(n)
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(r, out)| {
            let (sums, starts) = rows.sums;
            let row = GradientRow {
                dp: row_of(rows.cotangent, r, n),
                p: row_of(rows.probabilities, r, n),
                s: starts.value(sums, r),
                e: row_of(rows.exponentials, r, n),
                mask: rows.mask.map(|mask| row_of(mask, r, n)),
                scale: rows.scale,
            };
            row_gradient(vector, &row, out);
        });
}

/// One row of a softmax gradient's operands.
struct GradientRow<'a> {
    dp: &'a [f32],
    p: &'a [f32],
    s: f32,
    e: &'a [f32],
    mask: Option<&'a [f32]>,
    scale: Option<f32>,
}

fn row_gradient(vector: bool, row: &GradientRow<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vectorised()` said the CPU has AVX-512F.
        return unsafe { wide::row_gradient(row, out) };
    }
    let _ = vector;
    let GradientRow {
        dp,
        p,
        s,
        e,
        mask,
        scale,
    } = *row;
    // The weighted terms go through `out`, which the gradient overwrites.
    for (j, t) in out.iter_mut().enumerate() {
        *t = -(dp[j] * (p[j] / s));
    }
    let r = sum_in_f64(out);
    for (j, o) in out.iter_mut().enumerate() {
        let v = match mask {
            Some(mask) if mask[j] == 0.0 => 0.0,
            _ => (dp[j] / s + r) * e[j],
        };
        *o = scale.map_or(v, |c| v * c);
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::super::expf::wide::exp;
    use super::super::loops::{FOLD_LANES, LANE_SPLIT_MIN, max_step};
    use super::{GradientRow, RowScores};

    /// The lanes of a row's chunk from `start`.
    fn lanes(len: usize, start: usize) -> __mmask16 {
        let kept = (len - start).min(16);
        ((1u32 << kept) - 1) as __mmask16
    }

    /// `mask == 0` lane by lane, as the loop nests' select tests it (a NaN mask keeps).
    #[target_feature(enable = "avx512f")]
    fn zero(mask: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mask, _mm512_setzero_ps())
    }

    /// See `super::row_softmax`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_softmax(
        scores: &RowScores<'_>,
        e: &mut [f32],
        out: &mut [f32],
    ) -> f32 {
        let &RowScores { x, scale, mask } = scores;
        let n = out.len();
        assert!(x.len() == n && e.len() == n && mask.is_none_or(|(m, _)| m.len() == n));
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut max = neg_inf;
        for start in (0..n).step_by(16) {
            let lanes = lanes(n, start);
            // SAFETY: the masked lanes are inside the rows (asserted above).
            unsafe {
                let mut s = _mm512_maskz_loadu_ps(lanes, x.as_ptr().add(start));
                if let Some(c) = scale {
                    s = _mm512_mul_ps(s, _mm512_set1_ps(c));
                }
                if let Some((mask, fill)) = mask {
                    let m = _mm512_maskz_loadu_ps(lanes, mask.as_ptr().add(start));
                    s = _mm512_mask_blend_ps(zero(m), s, _mm512_set1_ps(fill));
                }
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), lanes, s);
                let s = _mm512_mask_blend_ps(lanes, neg_inf, s);
                let take = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(max, s)
                    | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(s, s);
                max = _mm512_mask_blend_ps(take, max, s);
            }
        }
        let mut lanes16 = [0f32; 16];
        // SAFETY: 16 values into 16.
        unsafe { _mm512_storeu_ps(lanes16.as_mut_ptr(), max) };
        let max = lanes16.iter().copied().fold(f32::NEG_INFINITY, max_step);
        let shift = _mm512_set1_ps(max);
        for start in (0..n).step_by(16) {
            let lanes = lanes(n, start);
            // SAFETY: as above.
            unsafe {
                let s = _mm512_maskz_loadu_ps(lanes, out.as_ptr().add(start));
                let exponential = exp(_mm512_sub_ps(s, shift));
                _mm512_mask_storeu_ps(e.as_mut_ptr().add(start), lanes, exponential);
            }
        }
        // SAFETY: AVX-512F (the caller's promise).
        let sum = unsafe { sum_in_f64(e) };
        let sum_lanes = _mm512_set1_ps(sum);
        for start in (0..n).step_by(16) {
            let lanes = lanes(n, start);
            // SAFETY: as above.
            unsafe {
                let v = _mm512_maskz_loadu_ps(lanes, e.as_ptr().add(start));
                let q = _mm512_div_ps(v, sum_lanes);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), lanes, q);
            }
        }
        sum
    }

    /// See `super::row_gradient`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_gradient(row: &GradientRow<'_>, out: &mut [f32]) {
        let n = out.len();
        let GradientRow {
            dp,
            p,
            s,
            e,
            mask,
            scale,
        } = *row;
        assert!(dp.len() == n && p.len() == n && e.len() == n);
        assert!(mask.is_none_or(|m| m.len() == n));
        let s_lanes = _mm512_set1_ps(s);
        for start in (0..n).step_by(16) {
            let lanes = lanes(n, start);
            // SAFETY: the masked lanes are inside the rows (asserted above).
            unsafe {
                let dp = _mm512_maskz_loadu_ps(lanes, dp.as_ptr().add(start));
                let p = _mm512_maskz_loadu_ps(lanes, p.as_ptr().add(start));
                let t = _mm512_mul_ps(dp, _mm512_div_ps(p, s_lanes));
                // −t: the sign bit flipped, as negation does.
                let negated = _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(t),
                    _mm512_set1_epi32(i32::MIN),
                ));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), lanes, negated);
            }
        }
        // SAFETY: AVX-512F (the caller's promise).
        let r = _mm512_set1_ps(unsafe { sum_in_f64(out) });
        for start in (0..n).step_by(16) {
            let lanes = lanes(n, start);
            // SAFETY: as above.
            unsafe {
                let dp = _mm512_maskz_loadu_ps(lanes, dp.as_ptr().add(start));
                let e = _mm512_maskz_loadu_ps(lanes, e.as_ptr().add(start));
                let mut v = _mm512_mul_ps(_mm512_add_ps(_mm512_div_ps(dp, s_lanes), r), e);
                if let Some(mask) = mask {
                    let m = _mm512_maskz_loadu_ps(lanes, mask.as_ptr().add(start));
                    v = _mm512_mask_blend_ps(zero(m), v, _mm512_setzero_ps());
                }
                if let Some(c) = scale {
                    v = _mm512_mul_ps(v, _mm512_set1_ps(c));
                }
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), lanes, v);
            }
        }
    }

    /// `super::sum_in_f64`: element `j` of the first `8⌊n/8⌋` into f64 lane `j mod 8`, the
    /// lanes combined as `fold_row` combines them, then the rest one by one.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_in_f64(values: &[f32]) -> f32 {
        if values.len() < LANE_SPLIT_MIN {
            return super::sum_in_f64(values);
        }
        let split = values.len() / FOLD_LANES * FOLD_LANES;
        let mut sums = _mm512_set1_pd(-0.0);
        for start in (0..split).step_by(FOLD_LANES) {
            // SAFETY: eight values from `start < split ≤ len − 8 + 8`.
            let eight = unsafe { _mm256_loadu_ps(values.as_ptr().add(start)) };
            sums = _mm512_add_pd(sums, _mm512_cvtps_pd(eight));
        }
        let mut lanes = [0f64; FOLD_LANES];
        // SAFETY: eight values into eight.
        unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), sums) };
        let c: [f64; 4] = std::array::from_fn(|i| lanes[i] + lanes[i + 4]);
        let combined = (c[0] + c[1]) + (c[2] + c[3]);
        values[split..]
            .iter()
            .fold(combined, |acc, &v| acc + f64::from(v)) as f32
    }
}

#[cfg(test)]
mod tests;
