//! The CPU backend's `exp` for f32: Cody–Waite range reduction and a degree-7 polynomial
//! (Cephes' `expf` coefficients), written with fused multiply-adds so that the JIT's four-lane
//! version (`jit::emit`, where cranelift emits `vfmadd` for them) computes the very same
//! operations and agrees bit for bit. The fused form halves the polynomial's chain of dependent
//! operations and its instruction count: the cross-entropy kernels ran 1.1–1.4× faster with it
//! than with separate multiplies and adds. (Without FMA hardware both sides call `fmaf`: slow,
//! same bits.)
//!
//! `exp(x) = 2^n · e^r` with `n = round(x · log2 e)` and `r = x − n·ln2` (ln2 split in two:
//! `C1` has 9 significant bits, so `n·C1` is exact for |n| ≤ 150); `e^r` on |r| ≤ ln2/2 by
//! the polynomial; `2^n` applied as two exact power-of-two factors `2^⌊n/2⌋ · 2^(n−⌊n/2⌋)`, so
//! results in the subnormal range are rounded once rather than flushed. Inputs below -104 give 0
//! without being computed (see [`ZERO_BELOW`]), those above 89 are clamped to 89 (+inf); NaN
//! stays NaN. `n` is rounded (ties to even) by adding and subtracting 1.5·2^23, which also
//! leaves it in the low bits of the sum as an integer, so no float-to-int conversion is needed.
//!
//! Accuracy (tested over a sweep of 2M inputs in `tests`): within 2 ulp of the correctly
//! rounded `exp` for normal results (measured: 1 ulp), and within 1 ulp of the smallest
//! subnormal below them.

/// Inputs below this give 0 (e^-104 is under half the smallest subnormal), and are not run
/// through the polynomial: its last multiply would underflow, and on Intel cores every
/// underflowing multiply takes a microcode assist of about a hundred cycles. A causal softmax
/// sends half its elements here (the masked scores are `f32::MIN`), which made its `exp`
/// kernel six times slower than the arithmetic.
pub(super) const ZERO_BELOW: f32 = -104.0;
/// Inputs above this give +inf.
pub(super) const CLAMP_HIGH: f32 = 89.0;
pub(super) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 · 2^23: added to a float of magnitude below 2^22, rounds it to an integer.
pub(super) const ROUNDER: f32 = 12_582_912.0;
/// ln 2 = C1 + C2, C1 with a short mantissa.
pub(super) const C1: f32 = 0.693_359_4;
pub(super) const C2: f32 = -2.121_944_4e-4;
/// e^r ≈ 1 + r + r²·(P[0]·r⁵ + P[1]·r⁴ + … + P[5]), Horner from P[0].
pub(super) const P: [f32; 6] = [
    1.987_569_2e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    // 0.500_000_01 in Cephes' table; the same f32.
    5e-1,
];

/// `e^x` (see the module documentation for the method and its accuracy), with the CPU's
/// fused multiply-add instruction where it has one (`crate::fma`: the same bits, without eight
/// `fmaf` calls per value; the JIT's one-lane tails and the row evaluator come here).
pub(crate) fn exp(x: f32) -> f32 {
    crate::fma::with_fma(
        #[inline(always)]
        || exp_portable(x),
    )
}

#[inline(always)]
fn exp_portable(x: f32) -> f32 {
    if x < ZERO_BELOW {
        return 0.0;
    }
    // NaN compares false and runs through as NaN, as in the four-lane code.
    let x = if x > CLAMP_HIGH { CLAMP_HIGH } else { x };
    // Round to the nearest integer, ties to even: adding 1.5·2^23 leaves no fraction bits
    // (|t| ≤ 151, far inside the trick's range); the integer sits in the low mantissa bits.
    let shifted = x * LOG2E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = (-n).mul_add(C2, (-n).mul_add(C1, x));
    let z = r * r;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(r, p);
    }
    let y = y.mul_add(z, r) + 1.0;
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let half = n >> 1;
    (y * pow2(half)) * pow2(n.wrapping_sub(half))
}

/// 2^e for a normal exponent e (−126 ≤ e ≤ 127); other bits for NaN inputs, whose result is
/// NaN whatever it is multiplied by.
fn pow2(e: i32) -> f32 {
    f32::from_bits((e.wrapping_add(127) as u32) << 23)
}

/// Whether this CPU runs the sixteen-lane routines (`wide`: the cross-entropy and softmax
/// routines use them, and the runtime lowers to those routines only then).
pub fn vectorised() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sixteen lanes of AVX-512F.
#[cfg(target_arch = "x86_64")]
pub(super) mod wide {
    use std::arch::x86_64::*;

    use super::{C1, C2, CLAMP_HIGH, LOG2E, P, ROUNDER, ZERO_BELOW};

    /// [`super::exp`] on sixteen lanes, operation for operation (the same bits).
    #[target_feature(enable = "avx512f")]
    pub(in crate::cpu) fn exp(x: __m512) -> __m512 {
        let splat = _mm512_set1_ps;
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, splat(ZERO_BELOW));
        // A NaN compares false and runs through as NaN.
        let high = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, splat(CLAMP_HIGH));
        let x = _mm512_mask_blend_ps(high, x, splat(CLAMP_HIGH));
        let shifted = _mm512_add_ps(_mm512_mul_ps(x, splat(LOG2E)), splat(ROUNDER));
        let n = _mm512_sub_ps(shifted, splat(ROUNDER));
        // (−n)·C + x, rounded once: −(n·C) + x.
        let r = _mm512_fnmadd_ps(n, splat(C2), _mm512_fnmadd_ps(n, splat(C1), x));
        let z = _mm512_mul_ps(r, r);
        let mut y = splat(P[0]);
        for &p in &P[1..] {
            y = _mm512_fmadd_ps(y, r, splat(p));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(y, z, r), splat(1.0));
        let n = _mm512_sub_epi32(
            _mm512_castps_si512(shifted),
            _mm512_set1_epi32(ROUNDER.to_bits() as i32),
        );
        let half = _mm512_srai_epi32::<1>(n);
        let pow2 = |e: __m512i| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                e,
                _mm512_set1_epi32(127),
            )))
        };
        let result = _mm512_mul_ps(
            _mm512_mul_ps(y, pow2(half)),
            pow2(_mm512_sub_epi32(n, half)),
        );
        _mm512_mask_blend_ps(below, result, _mm512_setzero_ps())
    }
}

#[cfg(test)]
mod tests {
    use super::{exp, exp_portable};

    #[test]
    fn the_fma_instruction_and_fmaf_give_the_same_bits() {
        for i in 0..=200_000 {
            let x = -110.0 + 200.0 * (i as f32 / 200_000.0);
            assert_eq!(exp(x).to_bits(), exp_portable(x).to_bits(), "{x}");
        }
    }

    /// Distance in units in the last place between two finite non-negative floats.
    fn ulps(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn within_two_ulp_of_the_correctly_rounded_exp() {
        let (low, high) = (-103.9f32, 88.7f32);
        let steps = 2_000_000;
        let mut worst = (0, 0.0f32);
        for i in 0..=steps {
            let x = low + (high - low) * (i as f32 / steps as f32);
            let want = f64::from(x).exp() as f32;
            let got = exp(x);
            let error = ulps(got, want);
            if error > worst.0 {
                worst = (error, x);
            }
            // Near zero, where |r| is tiny, every bit matters as much.
            let small = x * 1e-3;
            assert!(
                ulps(exp(small), f64::from(small).exp() as f32) <= 2,
                "{small}"
            );
        }
        eprintln!("exp: worst {} ulp at {}", worst.0, worst.1);
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn limits_and_special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        // Below ZERO_BELOW the result is not computed; computing it gives the same +0.
        assert_eq!(exp(super::ZERO_BELOW).to_bits(), 0);
        assert_eq!(exp(f32::MIN).to_bits(), 0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(1.0), std::f32::consts::E);
        // The largest finite result and the smallest subnormal ones.
        assert!(exp(88.72).is_finite());
        let tiny = exp(-103.0);
        assert!(tiny > 0.0 && tiny < f32::MIN_POSITIVE);
    }

    /// The sixteen-lane `exp` gives `expf::exp`'s bits on a sweep and at the edges.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn sixteen_lanes_of_exp_are_the_scalar_ones() {
        if !super::vectorised() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut inputs: Vec<f32> = (0..=400_000)
            .map(|i| -110.0 + 210.0 * (i as f32 / 400_000.0))
            .collect();
        inputs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN,
            f32::MAX,
            super::ZERO_BELOW,
            super::CLAMP_HIGH,
            -103.97,
            1e-30,
        ]);
        for chunk in inputs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: AVX-512F (checked above); 16 values in and out.
            let got = unsafe {
                use std::arch::x86_64::*;
                let mut out = [0f32; 16];
                _mm512_storeu_ps(
                    out.as_mut_ptr(),
                    super::wide::exp(_mm512_loadu_ps(lanes.as_ptr())),
                );
                out
            };
            for (&x, &y) in lanes.iter().zip(&got) {
                let want = exp(x);
                assert!(
                    want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                    "exp({x}): {y} vs {want}"
                );
            }
        }
    }
}
