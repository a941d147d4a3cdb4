//! The cross-entropy and its gradient as library routines (`Library::CrossEntropy`,
//! `CrossEntropyGrad`), which the lowering emits for a CPU with AVX-512
//! (`LowerOptions::cross_entropy_routines`, see [`vectorised`]): over each row of logits, the
//! max, then `exp(x − max)` kept and summed, sixteen lanes at a time where cranelift's loops
//! run four (the exponential is most of these kernels' work). The exponential is
//! [`super::expf::exp`]'s operations lane by lane, so the kept values are the loop nests' bits;
//! only the order of each row's sum differs (sixteen lanes, then across them). Rows are spread
//! over rayon's threads. Without AVX-512 the same routines run one value at a time (the tests
//! and a forced lowering; the lowering does not choose them there).

use fathom_compiler::graph::UnaryOp;
use rayon::prelude::*;

use super::expf::{self, vectorised};
use super::loops;

/// Rows per task: a row of a 4096-word vocabulary is a few microseconds of work.
const ROWS_PER_TASK: usize = 8;

/// Each row's loss `log Σ exp(x − m) − (x[label] − m)` (`m` the row's max; 0 for a negative
/// label, +∞ for a label outside the row), and with `kept` each row's exponentials
/// `exp(x − m)` and their sum.
pub(super) fn forward(
    logits: &[f32],
    labels: &[f32],
    vocab: usize,
    loss: &mut [f32],
    kept: Option<(&mut [f32], &mut [f32])>,
) {
    forward_in(vectorised(), logits, labels, vocab, loss, kept)
}

/// [`forward`] in the sixteen-lane form or the one-value one.
fn forward_in(
    vector: bool,
    logits: &[f32],
    labels: &[f32],
    vocab: usize,
    loss: &mut [f32],
    kept: Option<(&mut [f32], &mut [f32])>,
) {
    assert!(vocab > 0 && logits.len() == labels.len() * vocab && loss.len() == labels.len());
    let row = |r: usize| &logits[r * vocab..][..vocab];
    let tasks = loss.par_chunks_mut(ROWS_PER_TASK).enumerate();
    match kept {
        Some((exponentials, sums)) => {
            assert!(exponentials.len() == logits.len() && sums.len() == labels.len());
            tasks
                .zip(sums.par_chunks_mut(ROWS_PER_TASK))
                .zip(exponentials.par_chunks_mut(ROWS_PER_TASK * vocab))
                .for_each(|(((task, loss), sums), exponentials)| {
                    let rows = loss
                        .iter_mut()
                        .zip(sums)
                        .zip(exponentials.chunks_mut(vocab));
                    for (i, ((loss, sum), e)) in rows.enumerate() {
                        let r = task * ROWS_PER_TASK + i;
                        let (max, total) = exponentials_of(row(r), e, vector);
                        *sum = total;
                        *loss = row_loss(row(r), labels[r], max, total);
                    }
                });
        }
        // Nothing kept: each row's exponentials pass through a row of scratch per thread.
        None => tasks.for_each_init(Vec::new, |scratch, (task, loss)| {
            scratch.resize(vocab, 0.0);
            for (i, loss) in loss.iter_mut().enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let (max, total) = exponentials_of(row(r), scratch, vector);
                *loss = row_loss(row(r), labels[r], max, total);
            }
        }),
    }
}

/// `out = (e / Σe − [v = label]) · g` per row, zeros for a row whose label is negative.
pub(super) fn gradient(
    kept: (&[f32], &[f32]),
    labels: &[f32],
    cotangent: &[f32],
    vocab: usize,
    out: &mut [f32],
) {
    gradient_in(vectorised(), kept, labels, cotangent, vocab, out)
}

/// [`gradient`] in the sixteen-lane form or the one-value one.
fn gradient_in(
    vector: bool,
    (exponentials, sums): (&[f32], &[f32]),
    labels: &[f32],
    cotangent: &[f32],
    vocab: usize,
    out: &mut [f32],
) {
    let rows = labels.len();
    assert!(vocab > 0 && out.len() == rows * vocab && exponentials.len() == out.len());
    assert!(sums.len() == rows && cotangent.len() == rows);
    out.par_chunks_mut(vocab)
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(r, out)| {
            let e = &exponentials[r * vocab..][..vocab];
            row_gradient((e, sums[r]), labels[r], cotangent[r], out, vector);
        });
}

/// One row's `out = (e / s − [v = label]) · g`, zeros when its label is negative.
fn row_gradient((e, s): (&[f32], f32), label: f32, g: f32, out: &mut [f32], vector: bool) {
    if !counted(label) {
        return out.fill(0.0);
    }
    scaled_quotients(e, s, g, out, vector);
    if let Some(v) = label_index(label, out.len()) {
        out[v] = (e[v] / s - 1.0) * g;
    }
}

/// One row's loss, returned, and its gradient for cotangent `g`, written over the row's
/// logits `x`: the values [`forward`] (keeping the exponentials, here in `e`, a row long) and
/// [`gradient`] compute for the row, bit for bit. For a routine that has the row's logits in
/// cache and its cotangent at hand (the head and its loss in one pass, `super::bf16::head`).
pub(super) fn row_loss_and_gradient(x: &mut [f32], e: &mut [f32], label: f32, g: f32) -> f32 {
    let vector = vectorised();
    let (max, sum) = exponentials_of(x, e, vector);
    let loss = row_loss(x, label, max, sum);
    row_gradient((e, sum), label, g, x, vector);
    loss
}

/// The loss of one row from its max and sum of exponentials, as the loop nest computes it.
fn row_loss(x: &[f32], label: f32, max: f32, sum: f32) -> f32 {
    if !counted(label) {
        return 0.0;
    }
    let label_logit = label_index(label, x.len()).map_or(f32::NEG_INFINITY, |v| x[v]);
    loops::unary(UnaryOp::Log, sum) - (label_logit - max)
}

/// Whether a row counts: its label is not negative (nor NaN), as the loop nests select.
fn counted(label: f32) -> bool {
    label >= 0.0
}

/// The position a label names, if it names one of `vocab`.
fn label_index(label: f32, vocab: usize) -> Option<usize> {
    (label >= 0.0 && label.fract() == 0.0 && (label as usize) < vocab).then_some(label as usize)
}

/// The row's max, then `e = exp(x − max)` and its sum.
fn exponentials_of(x: &[f32], e: &mut [f32], vector: bool) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vectorised()` said the CPU has AVX-512F.
        return unsafe { wide::exponentials_of(x, e) };
    }
    let _ = vector;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, max_keeping_nan);
    let mut sum = 0.0;
    for (e, &x) in e.iter_mut().zip(x) {
        *e = expf::exp(x - max);
        sum += *e;
    }
    (max, sum)
}

/// `out = (e / s) · g`.
fn scaled_quotients(e: &[f32], s: f32, g: f32, out: &mut [f32], vector: bool) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vectorised()` said the CPU has AVX-512F.
        return unsafe { wide::scaled_quotients(e, s, g, out) };
    }
    let _ = vector;
    for (o, &e) in out.iter_mut().zip(e) {
        *o = e / s * g;
    }
}

/// The max the loop nests take: a NaN, once met, stays.
fn max_keeping_nan(acc: f32, x: f32) -> f32 {
    if acc < x || x.is_nan() { x } else { acc }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::super::expf::wide::exp;
    use super::max_keeping_nan;

    /// The lanes of a row's tail of `len < 16` values.
    fn tail(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    /// See `super::exponentials_of`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exponentials_of(x: &[f32], e: &mut [f32]) -> (f32, f32) {
        assert_eq!(x.len(), e.len());
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut max = neg_inf;
        for start in (0..x.len()).step_by(16) {
            let lanes = tail((x.len() - start).min(16));
            // SAFETY: the masked lanes are inside `x`.
            let v = unsafe { _mm512_mask_loadu_ps(neg_inf, lanes, x.as_ptr().add(start)) };
            let take =
                _mm512_cmp_ps_mask::<_CMP_LT_OQ>(max, v) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            max = _mm512_mask_blend_ps(take, max, v);
        }
        let mut lanes = [0f32; 16];
        // SAFETY: 16 values into 16.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), max) };
        let max = lanes
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, max_keeping_nan);
        let shift = _mm512_set1_ps(max);
        let mut sum = _mm512_setzero_ps();
        for start in (0..x.len()).step_by(16) {
            let lanes = tail((x.len() - start).min(16));
            // SAFETY: the masked lanes are inside `x` and `e`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(lanes, x.as_ptr().add(start));
                let exponential = exp(_mm512_sub_ps(v, shift));
                _mm512_mask_storeu_ps(e.as_mut_ptr().add(start), lanes, exponential);
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(lanes, exponential));
            }
        }
        (max, _mm512_reduce_add_ps(sum))
    }

    /// See `super::scaled_quotients`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scaled_quotients(e: &[f32], s: f32, g: f32, out: &mut [f32]) {
        assert_eq!(e.len(), out.len());
        let (s, g) = (_mm512_set1_ps(s), _mm512_set1_ps(g));
        for start in (0..e.len()).step_by(16) {
            let lanes = tail((e.len() - start).min(16));
            // SAFETY: the masked lanes are inside `e` and `out`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(lanes, e.as_ptr().add(start));
                let q = _mm512_mul_ps(_mm512_div_ps(v, s), g);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), lanes, q);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{expf, forward_in, gradient_in, vectorised};

    /// Loss, kept exponentials and gradient against f64 sums, on both forms (sixteen lanes
    /// where the CPU has them, and one value at a time), with rows of a vocabulary that is not
    /// a multiple of sixteen, an ignored row and a label outside the row. The exponentials are
    /// `expf::exp`'s bits on both; the sums differ from the exact ones by the rounding of an
    /// f32 sum, `vocab · 2⁻²⁴` relative at most.
    #[test]
    fn losses_and_gradients_match_f64_sums() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (rows, vocab) = (21, 37);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|_| rng.random_range(-8.0f32..8.0))
            .collect();
        let mut labels: Vec<f32> = (0..rows)
            .map(|_| rng.random_range(0..vocab) as f32)
            .collect();
        (labels[3], labels[7]) = (-1.0, vocab as f32);
        let cotangent: Vec<f32> = (0..rows).map(|_| rng.random_range(0.5f32..2.0)).collect();
        for vector in [false, true] {
            if vector && !vectorised() {
                continue;
            }
            let (mut loss, mut e, mut sums) =
                (vec![0f32; rows], vec![0f32; rows * vocab], vec![0f32; rows]);
            let mut out = vec![f32::NAN; rows * vocab];
            let kept = Some((&mut e[..], &mut sums[..]));
            forward_in(vector, &logits, &labels, vocab, &mut loss, kept);
            gradient_in(vector, (&e, &sums), &labels, &cotangent, vocab, &mut out);
            let mut unkept = vec![0f32; rows];
            forward_in(vector, &logits, &labels, vocab, &mut unkept, None);
            assert_eq!(unkept, loss, "the loss does not depend on keeping");
            for r in 0..rows {
                let x = &logits[r * vocab..][..vocab];
                let max = x.iter().copied().fold(f32::MIN, f32::max);
                let exact: f64 = x.iter().map(|&v| f64::from(expf::exp(v - max))).sum();
                let bound = vocab as f64 * f64::powi(2.0, -24) * exact;
                assert!((f64::from(sums[r]) - exact).abs() <= bound, "row {r} sum");
                for v in 0..vocab {
                    assert_eq!(e[r * vocab + v], expf::exp(x[v] - max), "row {r} exp {v}");
                }
                let label = labels[r];
                let want_loss = if label < 0.0 {
                    0.0
                } else if label as usize >= vocab {
                    f64::INFINITY
                } else {
                    exact.ln() - f64::from(x[label as usize] - max)
                };
                let got = f64::from(loss[r]);
                assert!(
                    got == want_loss || (got - want_loss).abs() <= 1e-6 * want_loss.abs().max(1.0),
                    "vector {vector} row {r}: loss {got} vs {want_loss}"
                );
                for v in 0..vocab {
                    let want = if label < 0.0 {
                        0.0
                    } else {
                        let onehot = if v as f32 == label { 1.0 } else { 0.0 };
                        (f64::from(e[r * vocab + v]) / f64::from(sums[r]) - onehot)
                            * f64::from(cotangent[r])
                    };
                    let got = f64::from(out[r * vocab + v]);
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs().max(1e-6),
                        "vector {vector} row {r} gradient {v}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
