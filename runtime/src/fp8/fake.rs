//! Fake quantization: `dequant(quant(x))` as f32 values, the graph op `QuantizeDequantize`.
//!
//! Both the interpreter and the CPU backend call [`fake_quantize`], which is
//! [`quantize_tiles`] followed by [`QuantizedTensor::dequantize`] on each matrix of the last two
//! axes (fused into one pass with the same arithmetic, checked bit for bit against the two-step
//! form), so the op is exactly the quantizer's arithmetic. Matrices are cut into bands of whole
//! tile rows that are quantized in parallel: tiles never straddle a band, so the result does not
//! depend on the number of threads.

use fathom_compiler::graph::{ExpertTiles, QuantFormat};
use rayon::prelude::*;

use super::quantize::{E4M3_MAX, QuantizedTensor, ScaleRounding, quantize_tiles, tile_scale};
use super::{Fp8Error, check_len};

/// Elements per parallel band, roughly: below this a band is not worth a thread hand-off.
const BAND_ELEMENTS: usize = 1 << 15;

/// `dequant(quant(x))` for `x` of extents `dims` (row-major), with one E4M3 scale per
/// `tile_rows`×`tile_cols` tile of the last two axes (a rank-1 tensor is one row; leading axes
/// are separate matrices; partial tiles at the ends are allowed). A tile holding a NaN or an
/// infinity has no meaningful scale: its elements all come back NaN, so a diverging run shows
/// NaN losses instead of stopping inside a kernel. Finite tiles are exactly
/// `quantize_tiles(..).dequantize()`.
pub fn fake_quantize(
    x: &[f32],
    dims: &[usize],
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Result<Vec<f32>, Fp8Error> {
    let mut out = x.to_vec();
    fake_quantize_in_place(&mut out, dims, tile_rows, tile_cols, rounding)?;
    Ok(out)
}

/// [`fake_quantize`] into `out` (as long as `x`), which needs no allocation: a caller's pooled
/// buffer or per-thread scratch (fresh buffers of a few hundred KiB are mapped and unmapped by
/// the allocator, and touching their pages again costs more than the rounding).
pub fn fake_quantize_into(
    x: &[f32],
    dims: &[usize],
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
    out: &mut [f32],
) -> Result<(), Fp8Error> {
    check_len("fake quantize output", out.len(), x.len(), 1)?;
    out.copy_from_slice(x);
    fake_quantize_in_place(out, dims, tile_rows, tile_cols, rounding)
}

/// [`fake_quantize`] of `values`, in place.
pub fn fake_quantize_in_place(
    values: &mut [f32],
    dims: &[usize],
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Result<(), Fp8Error> {
    let rank = dims.len();
    let cols = dims.last().copied().unwrap_or(1);
    let rows = if rank >= 2 { dims[rank - 2] } else { 1 };
    let matrices: usize = dims[..rank.saturating_sub(2)].iter().product();
    check_len("fake quantize input", values.len(), matrices * rows, cols)?;
    if tile_rows == 0 || tile_cols == 0 {
        return Err(Fp8Error::EmptyTile {
            what: "fake quantize",
            tile_rows,
            tile_cols,
        });
    }
    if values.is_empty() {
        return Ok(());
    }
    // Bands of whole tile rows within each matrix, rounded in parallel.
    let band_rows = tile_rows * (BAND_ELEMENTS / (tile_rows * cols)).max(1);
    values
        .par_chunks_mut(rows * cols)
        .flat_map(|matrix| matrix.par_chunks_mut(band_rows * cols))
        .try_for_each(|band| {
            let rows = band.len() / cols;
            round_band(band, rows, cols, tile_rows, tile_cols, rounding)
        })
}

/// An expert's `[rows, width]` operand of a grouped weight gradient, in place, rounded as the
/// op's `ExpertTiles` say: one scale per `tile_rows` rows of each column, from its first row.
pub fn round_in_expert_tiles(
    matrix: &mut [f32],
    width: usize,
    tiles: ExpertTiles,
) -> Result<(), Fp8Error> {
    let rounding = if tiles.pow2_scales {
        ScaleRounding::PowerOfTwo
    } else {
        ScaleRounding::Exact
    };
    let rows = matrix.len() / width.max(1);
    match tiles.format {
        QuantFormat::E4M3 => {
            fake_quantize_in_place(matrix, &[rows, width], tiles.tile_rows, 1, rounding)
        }
    }
}

/// One band of whole tile rows, in place.
fn round_band(
    values: &mut [f32],
    rows: usize,
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Result<(), Fp8Error> {
    if values.iter().all(|v| v.is_finite()) {
        finite_band(values, cols, tile_rows, tile_cols, rounding);
        return Ok(());
    }
    // Quantize with the non-finite elements zeroed, then poison their tiles.
    let finite: Vec<f32> = values
        .iter()
        .map(|&v| if v.is_finite() { v } else { 0.0 })
        .collect();
    let q: QuantizedTensor = quantize_tiles(&finite, rows, cols, tile_rows, tile_cols, rounding)?;
    let layout = q.layout();
    let mut poisoned = vec![false; layout.scale_count()];
    for (i, v) in values.iter().enumerate() {
        if !v.is_finite() {
            poisoned[layout.scale_index(i / cols, i % cols)] = true;
        }
    }
    for (i, (v, rounded)) in values.iter_mut().zip(q.dequantize()).enumerate() {
        *v = if poisoned[layout.scale_index(i / cols, i % cols)] {
            f32::NAN
        } else {
            rounded
        };
    }
    Ok(())
}

/// [`quantize_tiles`] followed by [`QuantizedTensor::dequantize`] for finite values, fused and
/// in place: the same max-abs, the same [`tile_scale`], the same quotient `x / scale` in f64
/// rounded to the nearest E4M3 value (as `Fp8Format::encode_f64` rounds it, by
/// [`round_to_e4m3`]), and the same `value · scale` in f64 rounded to f32 — without the code
/// and scale buffers or the per-element tile lookups, and reading rows in order (two passes per
/// band of tile rows: max-abs per tile, then values). The tests compare it with the two-step
/// form bit for bit.
fn finite_band(
    values: &mut [f32],
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { finite_band_avx512(values, cols, tile_rows, tile_cols, rounding) };
    }
    finite_band_portable(values, cols, tile_rows, tile_cols, rounding)
}

/// [`finite_band_portable`] compiled for AVX-512 (eight f64 lanes for the division and the
/// rounding); the same operations, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn finite_band_avx512(
    values: &mut [f32],
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) {
    finite_band_portable(values, cols, tile_rows, tile_cols, rounding)
}

#[inline(always)]
fn finite_band_portable(
    values: &mut [f32],
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) {
    let grid_cols = cols.div_ceil(tile_cols);
    let mut amax = vec![0.0f32; grid_cols];
    let mut scales = vec![0.0f64; grid_cols];
    let round =
        |v: &mut f32, scale: f64| *v = (round_to_e4m3(f64::from(*v) / scale) * scale) as f32;
    for band in values.chunks_mut(tile_rows * cols) {
        amax.fill(0.0);
        for row in band.chunks(cols) {
            // Tiles one column wide (the weight gradients' 128×1) elementwise, so that the loop
            // vectorises; wider ones tile by tile. Max is exact: the order does not matter.
            if tile_cols == 1 {
                for (m, v) in amax.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            } else {
                for (m, tile) in amax.iter_mut().zip(row.chunks(tile_cols)) {
                    *m = tile.iter().fold(*m, |m, v| m.max(v.abs()));
                }
            }
        }
        for (s, &m) in scales.iter_mut().zip(&amax) {
            *s = f64::from(tile_scale(m, rounding));
        }
        for row in band.chunks_mut(cols) {
            if tile_cols == 1 {
                for (v, &scale) in row.iter_mut().zip(&scales) {
                    round(v, scale);
                }
            } else {
                for (tile, &scale) in row.chunks_mut(tile_cols).zip(&scales) {
                    tile.iter_mut().for_each(|v| round(v, scale));
                }
            }
        }
    }
}

/// `v` (finite) rounded to the nearest E4M3 value, ties to even, saturating at ±448: the value
/// of `encode_f64(v, Overflow::Saturate)`'s code, computed with a few branch-free f64
/// operations instead of encoding and decoding (the quantizer's inner loop).
#[inline(always)]
fn round_to_e4m3(v: f64) -> f64 {
    // 2^52: adding and subtracting it rounds a smaller non-negative f64 to an integer, ties to
    // even.
    const INTEGER_ROUNDING: f64 = 4_503_599_627_370_496.0;
    let a = v.abs();
    // floor(log2 a), but at least the smallest normal E4M3 exponent, -6 (zero gives -1023).
    let exponent = (((a.to_bits() >> 52) as i64) - 1023).max(-6);
    // E4M3 values near `a` are multiples of 2^(exponent - 3): count them, rounded, and scale
    // back (both scalings are exact: powers of two).
    let per_unit = f64::from_bits(((1023 + 3 - exponent) as u64) << 52);
    let unit = f64::from_bits(((1023 - 3 + exponent) as u64) << 52);
    let units = (a * per_unit + INTEGER_ROUNDING) - INTEGER_ROUNDING;
    (units * unit).min(f64::from(E4M3_MAX)).copysign(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::fp8::format::{Fp8Format, Overflow};

    #[test]
    fn each_matrix_and_band_matches_the_quantizer() {
        // 3 matrices of 4001×9 in 4×2 tiles: bands of 3640 rows, then 361 (a partial tile last).
        let (rows, cols) = (4001, 9);
        let x: Vec<f32> = (0..3 * rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        for (tile, rounding) in [
            ((4, 2), ScaleRounding::PowerOfTwo),
            ((1, 4), ScaleRounding::Exact),
            ((4, 1), ScaleRounding::Exact),
            ((128, 128), ScaleRounding::Exact),
        ] {
            let got = fake_quantize(&x, &[3, rows, cols], tile.0, tile.1, rounding).unwrap();
            for m in 0..3 {
                let matrix = &x[m * rows * cols..][..rows * cols];
                let want = quantize_tiles(matrix, rows, cols, tile.0, tile.1, rounding)
                    .unwrap()
                    .dequantize();
                assert_eq!(
                    &got[m * rows * cols..][..rows * cols],
                    want.as_slice(),
                    "{tile:?}"
                );
            }
        }
    }

    #[test]
    fn rounding_to_e4m3_is_the_encoders() {
        use rand::{Rng, SeedableRng};
        let exact = |v: f64| {
            f64::from(Fp8Format::E4M3.decode(Fp8Format::E4M3.encode_f64(v, Overflow::Saturate)))
        };
        let mut values = vec![
            0.0, -0.0, 448.0, 464.0, 479.9, 480.0, 1e6, -1e6, 1e-300, -1e-300,
        ];
        // Every E4M3 value, the midpoints between neighbours and the f64s just around them.
        let grid: Vec<f64> = (0..=0x7Eu8)
            .map(|c| f64::from(Fp8Format::E4M3.decode(c)))
            .collect();
        for pair in grid.windows(2) {
            let mid = (pair[0] + pair[1]) / 2.0;
            for v in [pair[0], mid, mid.next_up(), mid.next_down()] {
                values.extend([v, -v]);
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        values.extend(
            (0..200_000)
                .map(|_| rng.random_range(-1.0f64..1.0) * 2f64.powi(rng.random_range(-14..10))),
        );
        for v in values {
            let (got, want) = (round_to_e4m3(v), exact(v));
            assert_eq!(got.to_bits(), want.to_bits(), "{v:e}: {got:e} vs {want:e}");
        }
    }

    #[test]
    fn the_vector_and_portable_quantizers_agree_bit_for_bit() {
        let x: Vec<f32> = (0..37 * 300)
            .map(|i| ((i * 7919) % 2001) as f32 / 97.0 - 10.0)
            .collect();
        for (tile, rounding) in [
            ((1, 128), ScaleRounding::Exact),
            ((3, 5), ScaleRounding::PowerOfTwo),
            ((128, 1), ScaleRounding::Exact),
        ] {
            let (mut portable, mut dispatched) = (x.clone(), x.clone());
            finite_band_portable(&mut portable, 300, tile.0, tile.1, rounding);
            finite_band(&mut dispatched, 300, tile.0, tile.1, rounding);
            let same = portable
                .iter()
                .zip(&dispatched)
                .all(|(p, d)| p.to_bits() == d.to_bits());
            assert!(same, "{tile:?}");
        }
    }

    /// Into a caller's buffer and in place, the same bits as the allocating form (a poisoned
    /// tile included), and a buffer of another length refused.
    #[test]
    fn into_a_buffer_and_in_place_are_the_allocating_form() {
        let dims = [2, 40, 33];
        let mut x: Vec<f32> = (0..2 * 40 * 33)
            .map(|i| ((i * 7919) % 2001) as f32 / 97.0 - 10.0)
            .collect();
        x[5] = f32::NAN;
        for (tile, rounding) in [
            ((128, 1), ScaleRounding::Exact),
            ((1, 8), ScaleRounding::PowerOfTwo),
        ] {
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let want = fake_quantize(&x, &dims, tile.0, tile.1, rounding).unwrap();
            let mut into = vec![7.0; x.len()];
            fake_quantize_into(&x, &dims, tile.0, tile.1, rounding, &mut into).unwrap();
            assert_eq!(bits(&into), bits(&want), "{tile:?}");
            let mut in_place = x.clone();
            fake_quantize_in_place(&mut in_place, &dims, tile.0, tile.1, rounding).unwrap();
            assert_eq!(bits(&in_place), bits(&want), "{tile:?}");
        }
        let mut short = vec![0.0; 3];
        assert!(fake_quantize_into(&x, &dims, 1, 8, ScaleRounding::Exact, &mut short).is_err());
    }

    #[test]
    fn a_non_finite_element_poisons_its_tile_only() {
        let mut x = vec![1.0f32; 8];
        x[1] = f32::INFINITY;
        let got = fake_quantize(&x, &[2, 4], 1, 2, ScaleRounding::Exact).unwrap();
        assert!(got[..2].iter().all(|v| v.is_nan()));
        assert_eq!(&got[2..], &[1.0; 6]);
        assert!(matches!(
            fake_quantize(&x, &[2, 4], 0, 2, ScaleRounding::Exact),
            Err(Fp8Error::EmptyTile { .. })
        ));
        assert!(matches!(
            fake_quantize(&x, &[3, 4], 1, 2, ScaleRounding::Exact),
            Err(Fp8Error::Length { .. })
        ));
    }
}
