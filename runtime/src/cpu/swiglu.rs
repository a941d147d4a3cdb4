//! SwiGLU's gating as a library routine (`Library::Swiglu`), which the lowering makes of the
//! fused loop nest for a CPU with AVX-512 (`LowerOptions::swiglu_routines`, see
//! [`super::expf::vectorised`]): `σ(g)`, `g · σ(g)` and their product with `u`, sixteen lanes
//! at a time where cranelift's loops run four (the sigmoid's `exp` is most of the work).
//!
//! The routine writes the bits the loop nest writes: the sigmoid is the row evaluator's
//! (`1 / (1 + exp(−x))` where `x ≥ 0`, `e / (1 + e)` with `e = exp(x)` elsewhere, a NaN taking
//! the second), its `exp` [`super::expf::exp`]'s operations lane by lane, then the two f32
//! products. Rows are spread over rayon's threads; without AVX-512 it runs one value at a time
//! (the tests and a forced lowering; the lowering does not choose it there).

use rayon::prelude::*;

use super::expf;
use super::loops;
use super::softmax::RowStarts;

/// Values per task: a few microseconds of work.
const VALUES_PER_TASK: usize = 1 << 13;

/// The gating's operands: the rows of `gate` and `up` (each with its buffer), `n` long.
pub(super) struct GatingRows<'a> {
    pub(super) gate: (&'a [f32], RowStarts<'a>),
    pub(super) up: (&'a [f32], RowStarts<'a>),
}

/// `sigmoid = σ(gate)`, `silu = gate · sigmoid`, `out = silu · up`, rows of `n` (the outputs
/// row-major).
pub(super) fn forward(
    rows: &GatingRows<'_>,
    n: usize,
    (sigmoid, silu, out): (&mut [f32], &mut [f32], &mut [f32]),
) {
    forward_in(expf::vectorised(), rows, n, (sigmoid, silu, out))
}

/// [`forward`] in the sixteen-lane form or the one-value one.
fn forward_in(
    vector: bool,
    rows: &GatingRows<'_>,
    n: usize,
    (sigmoid, silu, out): (&mut [f32], &mut [f32], &mut [f32]),
) {
    assert!(n > 0 && out.len().is_multiple_of(n));
    assert!(sigmoid.len() == out.len() && silu.len() == out.len());
    let ((gate, gate_rows), (up, up_rows)) = (rows.gate, rows.up);
    out.par_chunks_mut(n)
        .zip(sigmoid.par_chunks_mut(n))
        .zip(silu.par_chunks_mut(n))
        .enumerate()
        .with_min_len((VALUES_PER_TASK / n).max(1))
        .for_each(|(r, ((out, s), a))| {
            let (g, u) = (gate_rows.row(gate, r, n), up_rows.row(up, r, n));
            row_gating(vector, (g, u), (s, a, out));
        });
}

/// One row's three outputs.
fn row_gating(
    vector: bool,
    (g, u): (&[f32], &[f32]),
    (s, a, out): (&mut [f32], &mut [f32], &mut [f32]),
) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vectorised()` said the CPU has AVX-512F.
        return unsafe { wide::row_gating((g, u), (s, a, out)) };
    }
    let _ = vector;
    for j in 0..out.len() {
        s[j] = loops::unary(fathom_compiler::graph::UnaryOp::Sigmoid, g[j]);
        a[j] = g[j] * s[j];
        out[j] = a[j] * u[j];
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::super::expf::wide::exp;

    /// See `super::row_gating`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_gating(
        (g, u): (&[f32], &[f32]),
        (s, a, out): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let n = out.len();
        assert!(g.len() == n && u.len() == n && s.len() == n && a.len() == n);
        let one = _mm512_set1_ps(1.0);
        for start in (0..n).step_by(16) {
            let lanes = ((1u32 << (n - start).min(16)) - 1) as __mmask16;
            // SAFETY: the masked lanes are inside the rows (asserted above).
            unsafe {
                let x = _mm512_maskz_loadu_ps(lanes, g.as_ptr().add(start));
                // exp(−x) where x ≥ 0, exp(x) elsewhere (a NaN included), as the scalar form.
                let nonnegative = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_setzero_ps());
                let negated = _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(x),
                    _mm512_set1_epi32(i32::MIN),
                ));
                let e = exp(_mm512_mask_blend_ps(nonnegative, x, negated));
                let denominator = _mm512_add_ps(one, e);
                let numerator = _mm512_mask_blend_ps(nonnegative, e, one);
                let sigmoid = _mm512_div_ps(numerator, denominator);
                let silu = _mm512_mul_ps(x, sigmoid);
                let up = _mm512_maskz_loadu_ps(lanes, u.as_ptr().add(start));
                _mm512_mask_storeu_ps(s.as_mut_ptr().add(start), lanes, sigmoid);
                _mm512_mask_storeu_ps(a.as_mut_ptr().add(start), lanes, silu);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), lanes, _mm512_mul_ps(silu, up));
            }
        }
    }
}

#[cfg(test)]
mod tests;
