//! Hopper's limited FP8 accumulation inside the training graph's GEMMs
//! (`graph::Accumulation::Limited`), for the interpreter and the CPU backend alike.
//!
//! [`crate::fp8::gemm`] emulates one FP8 GEMM exactly (fixed-point sums of decoded E4M3 codes)
//! to measure the accumulation error; training needs the same effect on every Linear GEMM of a
//! step, fast enough to train with, and on operands the precision pass has already rounded to
//! E4M3 values times their scales. So here each product is an f32 product and each addition an
//! f32 addition whose result is then truncated toward zero to the accumulator's mantissa bits
//! (the [`Accumulator::Truncated`] model). The f32 rounding before the truncation (at most 2⁻²⁴
//! relative) is far below the 2⁻¹⁴ being modelled; the tests bound the difference from
//! `fp8_gemm`.
//!
//! [`LimitedSum::dot`] is the definition, element by element; [`LimitedSum::gemm`] computes the
//! same operations in the same order for whole matrices (vectorised across output columns), so
//! the two agree bit for bit.
//!
//! [`Accumulator::Truncated`]: crate::fp8::Accumulator::Truncated

use fathom_compiler::graph::Accumulation;
use rayon::prelude::*;

/// A limited accumulator resolved for one GEMM's K.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitedSum {
    /// Keeps the sign, the exponent and the accumulator's mantissa bits of an f32.
    keep: u32,
    /// Products per chunk before promotion (at least 1).
    interval: usize,
}

impl LimitedSum {
    /// The accumulator `accumulation` describes for a GEMM whose contraction has `k` elements,
    /// or `None` when it is exact. Assumes a checked accumulation (the graph's type inference
    /// rejects mantissa bits outside 1..=23 and an interval of 0).
    pub fn new(accumulation: Accumulation, k: usize) -> Option<LimitedSum> {
        match accumulation {
            Accumulation::Exact => None,
            Accumulation::Limited {
                mantissa_bits,
                promotion_interval,
            } => Some(LimitedSum {
                keep: !((1u32 << (23 - mantissa_bits.clamp(1, 23))) - 1),
                interval: promotion_interval.unwrap_or(k).max(1),
            }),
        }
    }

    /// `sum + product`, rounded to f32 and then truncated toward zero to the kept bits. Quiet
    /// NaNs stay NaN (their top mantissa bit is kept) and infinities stay infinite.
    #[inline(always)]
    fn add(self, sum: f32, product: f32) -> f32 {
        f32::from_bits((sum + product).to_bits() & self.keep)
    }

    /// `Σ a·b` over the pairs, in order: each chunk of `interval` products summed in the limited
    /// accumulator from zero, each chunk's sum then added to an f32 total.
    pub fn dot(self, pairs: impl IntoIterator<Item = (f32, f32)>) -> f32 {
        let (mut total, mut chunk, mut count) = (0f32, 0f32, 0);
        for (a, b) in pairs {
            chunk = self.add(chunk, a * b);
            count += 1;
            if count == self.interval {
                total += chunk;
                (chunk, count) = (0.0, 0);
            }
        }
        if count > 0 {
            total += chunk;
        }
        total
    }

    /// `dst (m×n) = lhs (m×k) · rhs (k×n)`, every element summed as [`Self::dot`] sums it.
    /// Strides are in elements, as the `gemm` crate takes them: `*_cs` between columns, `*_rs`
    /// between rows. Row blocks run on rayon's threads when `parallel`.
    ///
    /// # Safety
    /// Every element each (pointer, strides, shape) describes must be readable (`dst`: writable),
    /// and `dst` must not overlap `lhs` or `rhs`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        self,
        (m, n, k): (usize, usize, usize),
        (dst, dst_cs, dst_rs): (*mut f32, isize, isize),
        (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
        (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
        parallel: bool,
    ) {
        // Both operands packed on this thread: lhs row-major, zero rows up to a multiple of
        // ROWS; rhs in panels of COLS columns, each k rows of COLS contiguous values.
        let row_blocks = m.div_ceil(ROWS);
        let mut a = vec![0f32; row_blocks * ROWS * k];
        for i in 0..m {
            for p in 0..k {
                // SAFETY: (i, p) lies in the lhs matrix the caller vouched for.
                a[i * k + p] = unsafe { *lhs.offset(i as isize * lhs_rs + p as isize * lhs_cs) };
            }
        }
        let panel_len = (k * COLS).max(1);
        let mut packed = vec![0f32; n.div_ceil(COLS) * panel_len];
        for (panel, values) in packed.chunks_exact_mut(panel_len).enumerate() {
            for p in 0..k {
                for j in 0..COLS.min(n - panel * COLS) {
                    let col = (panel * COLS + j) as isize;
                    // SAFETY: (p, col) lies in the rhs matrix the caller vouched for.
                    values[p * COLS + j] =
                        unsafe { *rhs.offset(p as isize * rhs_rs + col * rhs_cs) };
                }
            }
        }
        let mut result = vec![0f32; m * n];
        let block = |(index, out): (usize, &mut [f32])| {
            let rows = &a[index * ROWS * k..][..ROWS * k];
            self.row_block(rows, &packed, (out.len() / n, n, k), out);
        };
        if n > 0 {
            if parallel {
                result.par_chunks_mut(ROWS * n).enumerate().for_each(block);
            } else {
                result.chunks_mut(ROWS * n).enumerate().for_each(block);
            }
        }
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) lies in the destination the caller vouched for.
                unsafe {
                    *dst.offset(i as isize * dst_rs + j as isize * dst_cs) = result[i * n + j]
                };
            }
        }
    }

    /// Up to [`ROWS`] rows of the product (`a` holds them zero-padded to ROWS, k apart) into
    /// `out` (`rows × n`), on the widest vector unit the CPU has.
    fn row_block(self, a: &[f32], packed: &[f32], shape: (usize, usize, usize), out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { self.row_block_avx512(a, packed, shape, out) };
        }
        self.row_block_portable(a, packed, shape, out);
    }

    /// [`Self::row_block_portable`] with AVX-512 intrinsics, the ROWS × COLS running sums in 16
    /// vector registers (the compiler keeps the portable version's arrays in memory). The same
    /// f32 multiplies, adds and masks in the same order, so the same bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn row_block_avx512(
        self,
        a: &[f32],
        packed: &[f32],
        (rows, n, k): (usize, usize, usize),
        out: &mut [f32],
    ) {
        use std::arch::x86_64::{
            __m512, _mm512_add_ps, _mm512_and_si512, _mm512_castps_si512, _mm512_castsi512_ps,
            _mm512_loadu_ps, _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
            _mm512_storeu_ps,
        };
        const LANES: usize = 16;
        const VECTORS: usize = COLS / LANES;
        let keep = _mm512_set1_epi32(self.keep as i32);
        for (panel, values) in packed.chunks_exact((k * COLS).max(1)).enumerate() {
            let mut total = [[_mm512_setzero_ps(); VECTORS]; ROWS];
            let mut start = 0;
            while start < k {
                let end = (start + self.interval).min(k);
                let mut chunk = [[_mm512_setzero_ps(); VECTORS]; ROWS];
                for p in start..end {
                    let b: &[f32; COLS] = values[p * COLS..][..COLS].try_into().expect("COLS");
                    // SAFETY: each load reads LANES values inside `b`.
                    let b: [__m512; VECTORS] = std::array::from_fn(|v| unsafe {
                        _mm512_loadu_ps(b[v * LANES..].as_ptr())
                    });
                    for (r, sums) in chunk.iter_mut().enumerate() {
                        let a_rp = _mm512_set1_ps(a[r * k + p]);
                        for (sum, &b_v) in sums.iter_mut().zip(&b) {
                            let exact = _mm512_add_ps(*sum, _mm512_mul_ps(a_rp, b_v));
                            let kept = _mm512_and_si512(_mm512_castps_si512(exact), keep);
                            *sum = _mm512_castsi512_ps(kept);
                        }
                    }
                }
                for (totals, sums) in total.iter_mut().zip(&chunk) {
                    for (t, &s) in totals.iter_mut().zip(sums) {
                        *t = _mm512_add_ps(*t, s);
                    }
                }
                start = end;
            }
            let cols = COLS.min(n - panel * COLS);
            for (r, totals) in total.iter().enumerate().take(rows) {
                let mut row = [0f32; COLS];
                for (v, &t) in totals.iter().enumerate() {
                    // SAFETY: each store writes LANES values inside `row`.
                    unsafe { _mm512_storeu_ps(row[v * LANES..].as_mut_ptr(), t) };
                }
                out[r * n + panel * COLS..][..cols].copy_from_slice(&row[..cols]);
            }
        }
    }

    /// ROWS × COLS running sums per chunk, vectorised across the columns by the compiler; the
    /// order of operations for each output element is exactly [`Self::dot`]'s.
    fn row_block_portable(
        self,
        a: &[f32],
        packed: &[f32],
        (rows, n, k): (usize, usize, usize),
        out: &mut [f32],
    ) {
        for (panel, values) in packed.chunks_exact((k * COLS).max(1)).enumerate() {
            let mut total = [[0f32; COLS]; ROWS];
            let mut start = 0;
            while start < k {
                let end = (start + self.interval).min(k);
                let mut chunk = [[0f32; COLS]; ROWS];
                let rows: [&[f32]; ROWS] = std::array::from_fn(|r| &a[r * k + start..r * k + end]);
                let panel = values[start * COLS..end * COLS].chunks_exact(COLS);
                for (p, b) in panel.enumerate() {
                    let b: &[f32; COLS] = b.try_into().expect("COLS");
                    for (sums, row) in chunk.iter_mut().zip(rows) {
                        let a_rp = row[p];
                        for (sum, &b_pj) in sums.iter_mut().zip(b) {
                            *sum = self.add(*sum, a_rp * b_pj);
                        }
                    }
                }
                for (totals, sums) in total.iter_mut().zip(&chunk) {
                    for (t, &s) in totals.iter_mut().zip(sums) {
                        *t += s;
                    }
                }
                start = end;
            }
            let cols = COLS.min(n - panel * COLS);
            for (r, totals) in total.iter().enumerate().take(rows) {
                out[r * n + panel * COLS..][..cols].copy_from_slice(&totals[..cols]);
            }
        }
    }
}

/// Output rows computed together (each value of `rhs` loaded once serves them all).
const ROWS: usize = 4;
/// Output columns per panel: ROWS × COLS running sums fill the vector registers.
const COLS: usize = 64;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::fp8::{Accumulator, Fp8Format, GemmConfig, QuantizedTensor, TileLayout, fp8_gemm};

    fn limited(mantissa_bits: u32, promotion_interval: Option<usize>, k: usize) -> LimitedSum {
        let accumulation = Accumulation::Limited {
            mantissa_bits,
            promotion_interval,
        };
        LimitedSum::new(accumulation, k).unwrap()
    }

    #[test]
    fn a_two_bit_accumulator_loses_small_addends_until_promoted() {
        // With 2 mantissa bits the representable sums near 1 are 1, 1.25, 1.5, 1.75: 1 + 0.125
        // truncates back to 1, while 0.125 + 0.125 = 0.25 is exact.
        let pairs = [(1.0f32, 1.0f32), (0.125, 1.0), (0.125, 1.0), (0.125, 1.0)];
        assert_eq!(limited(2, None, 4).dot(pairs), 1.0);
        assert_eq!(limited(2, Some(2), 4).dot(pairs), 1.25);
        assert_eq!(limited(2, Some(1), 4).dot(pairs), 1.375);
        // Truncation is toward zero for negative sums too.
        let negative = pairs.map(|(a, b)| (-a, b));
        assert_eq!(limited(2, None, 4).dot(negative), -1.0);
        assert_eq!(LimitedSum::new(Accumulation::Exact, 4), None);
        // 23 bits keep everything: plain f32 sums.
        assert_eq!(limited(23, None, 4).dot(pairs), 1.375);
        assert!(
            limited(13, None, 2)
                .dot([(f32::NAN, 1.0), (1.0, 1.0)])
                .is_nan()
        );
        assert_eq!(
            limited(13, None, 1).dot([(f32::INFINITY, 2.0)]),
            f32::INFINITY
        );
        assert_eq!(limited(13, None, 0).dot([]), 0.0);
    }

    /// Random values spanning several binades, so that truncation happens.
    fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-6..6)))
            .collect()
    }

    #[test]
    fn the_blocked_gemm_is_the_dot_product_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let shapes = [
            (1, 1, 1),
            (5, 70, 33),
            (9, 3, 300),
            (4, 64, 128),
            (0, 3, 2),
            (3, 0, 2),
            (2, 3, 0),
        ];
        for (m, n, k) in shapes {
            for (bits, interval) in [(13, Some(128)), (13, None), (3, Some(7)), (23, Some(1))] {
                let mut a = random(&mut rng, m * k);
                let b = random(&mut rng, k * n);
                if m * k > 3 {
                    a[3] = f32::NAN;
                }
                let sum = limited(bits, interval, k);
                // a read transposed (column stride m), b row-major, the result transposed.
                let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                let mut got = vec![-7f32; m * n];
                for parallel in [false, true] {
                    // SAFETY: the strides describe exactly the three buffers.
                    unsafe {
                        sum.gemm(
                            (m, n, k),
                            (got.as_mut_ptr(), m as isize, 1),
                            (a_t.as_ptr(), m as isize, 1),
                            (b.as_ptr(), 1, n as isize),
                            parallel,
                        );
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let pairs = (0..k).map(|p| (a[i * k + p], b[p * n + j]));
                            let want = sum.dot(pairs);
                            let value = got[j * m + i];
                            assert!(
                                value.to_bits() == want.to_bits(),
                                "{m}x{n}x{k} bits {bits} every {interval:?} at ({i}, {j}): {value} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Both inner kernels (the portable one and, where the CPU has it, AVX-512) give the same
    /// bits, so the CPU backend's results do not depend on the machine.
    #[test]
    fn the_portable_and_vector_kernels_agree_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, k) = (COLS + 5, 300);
        let a = random(&mut rng, ROWS * k);
        let packed = random(&mut rng, n.div_ceil(COLS) * k * COLS);
        for (bits, interval) in [(13, Some(128)), (13, None), (4, Some(7))] {
            let sum = limited(bits, interval, k);
            let mut portable = vec![0f32; 3 * n];
            sum.row_block_portable(&a, &packed, (3, n, k), &mut portable);
            let mut dispatched = vec![0f32; 3 * n];
            sum.row_block(&a, &packed, (3, n, k), &mut dispatched);
            let same = portable
                .iter()
                .zip(&dispatched)
                .all(|(p, d)| p.to_bits() == d.to_bits());
            assert!(same, "bits {bits} every {interval:?}");
        }
    }

    /// The training emulation is the accumulation study's `Truncated` model up to the f32
    /// rounding before each truncation (at most one unit of the 2⁻²⁴ place, against the 2⁻¹⁴
    /// modelled): on E4M3 values with unit scales it agrees with `fp8_gemm` to within one unit
    /// of the 14-bit accumulator per product, and without promotion both lose the same.
    #[test]
    fn it_matches_the_exact_fp8_gemm_emulation() {
        let (m, n, k) = (8, 8, 1024);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // Positive E4M3 codes 0x30..0x4f: values 0.5 to 3.75 (a sum that keeps growing is what
        // swamps a short accumulator).
        let codes = |rng: &mut ChaCha8Rng, len| -> Vec<u8> {
            (0..len).map(|_| rng.random_range(0x30u8..0x50)).collect()
        };
        let (a_codes, b_codes) = (codes(&mut rng, m * k), codes(&mut rng, n * k));
        let tensor = |codes: &[u8], rows| {
            let layout = TileLayout::new(rows, k, rows, k).unwrap();
            QuantizedTensor::from_parts(codes.to_vec(), vec![1.0], layout).unwrap()
        };
        let (qa, qb) = (tensor(&a_codes, m), tensor(&b_codes, n));
        let decode = |codes: &[u8]| -> Vec<f32> {
            codes.iter().map(|&c| Fp8Format::E4M3.decode(c)).collect()
        };
        let (a, b) = (decode(&a_codes), decode(&b_codes));
        for interval in [Some(128), None] {
            let config = GemmConfig {
                promotion_interval: interval.unwrap_or(k),
                accumulator: Accumulator::Truncated { mantissa_bits: 13 },
            };
            let reference = fp8_gemm(&qa, &qb, &config).unwrap();
            let sum = limited(13, interval, k);
            let (mut worst, mut exact_worst) = (0f64, 0f64);
            for i in 0..m {
                for j in 0..n {
                    let pairs = (0..k).map(|p| (a[i * k + p], b[j * k + p]));
                    let got = f64::from(sum.dot(pairs.clone()));
                    let exact: f64 = pairs.map(|(x, y)| f64::from(x) * f64::from(y)).sum();
                    let want = f64::from(reference[i * n + j]);
                    worst = worst.max((got - want).abs() / exact);
                    exact_worst = exact_worst.max((want - exact).abs() / exact);
                }
            }
            // One 2⁻¹³ step of the accumulator per chunk at most.
            let chunks = k.div_ceil(interval.unwrap_or(k)) as f64;
            assert!(worst <= chunks * 2f64.powi(-13), "{interval:?}: {worst:e}");
            // And both show the effect being modelled: without promotion the error is large.
            match interval {
                Some(_) => assert!(exact_worst < 1e-3, "{exact_worst:e}"),
                None => assert!(exact_worst > 1e-3, "{exact_worst:e}"),
            }
        }
    }
}
