//! Fake quantization: `dequant(quant(x))` as f32 values, the graph op `QuantizeDequantize`.
//!
//! Both the interpreter and the CPU backend call [`fake_quantize`], which is
//! [`quantize_tiles`] followed by [`QuantizedTensor::dequantize`] on each matrix of the last two
//! axes (fused into one pass with the same arithmetic, checked bit for bit against the two-step
//! form), so the op is exactly the quantizer's arithmetic. Matrices are cut into bands of whole
//! tile rows that are quantized in parallel: tiles never straddle a band, so the result does not
//! depend on the number of threads.

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
    let rank = dims.len();
    let cols = dims.last().copied().unwrap_or(1);
    let rows = if rank >= 2 { dims[rank - 2] } else { 1 };
    let matrices: usize = dims[..rank.saturating_sub(2)].iter().product();
    check_len("fake quantize input", x.len(), matrices * rows, cols)?;
    if tile_rows == 0 || tile_cols == 0 {
        return Err(Fp8Error::EmptyTile {
            what: "fake quantize",
            tile_rows,
            tile_cols,
        });
    }
    if x.is_empty() {
        return Ok(Vec::new());
    }
    let band_rows = tile_rows * (BAND_ELEMENTS / (tile_rows * cols)).max(1);
    let bands: Vec<(usize, usize)> = (0..matrices)
        .flat_map(|m| {
            (0..rows)
                .step_by(band_rows)
                .map(move |start| (m * rows + start, (start + band_rows).min(rows) - start))
        })
        .collect();
    let parts = bands
        .par_iter()
        .map(|&(first_row, band)| {
            let values = &x[first_row * cols..(first_row + band) * cols];
            quantize_band(values, band, cols, tile_rows, tile_cols, rounding)
        })
        .collect::<Result<Vec<Vec<f32>>, Fp8Error>>()?;
    Ok(parts.concat())
}

/// One band of whole tile rows.
fn quantize_band(
    x: &[f32],
    rows: usize,
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Result<Vec<f32>, Fp8Error> {
    if x.iter().all(|v| v.is_finite()) {
        return Ok(finite_band(x, cols, tile_rows, tile_cols, rounding));
    }
    // Quantize with the non-finite elements zeroed, then poison their tiles.
    let finite: Vec<f32> = x
        .iter()
        .map(|&v| if v.is_finite() { v } else { 0.0 })
        .collect();
    let q: QuantizedTensor = quantize_tiles(&finite, rows, cols, tile_rows, tile_cols, rounding)?;
    let layout = q.layout();
    let mut poisoned = vec![false; layout.scale_count()];
    for (i, v) in x.iter().enumerate() {
        if !v.is_finite() {
            poisoned[layout.scale_index(i / cols, i % cols)] = true;
        }
    }
    let mut out = q.dequantize();
    for (i, v) in out.iter_mut().enumerate() {
        if poisoned[layout.scale_index(i / cols, i % cols)] {
            *v = f32::NAN;
        }
    }
    Ok(out)
}

/// [`quantize_tiles`] followed by [`QuantizedTensor::dequantize`] for finite input, fused: the
/// same max-abs, the same [`tile_scale`], the same quotient `x / scale` in f64 rounded to the
/// nearest E4M3 value (as `Fp8Format::encode_f64` rounds it, by [`round_to_e4m3`]), and the
/// same `value · scale` in f64 rounded to f32 — without the code and scale buffers or the
/// per-element tile lookups, and reading rows in order (two passes per band of tile rows:
/// max-abs per tile, then values). The tests compare it with the two-step form bit for bit.
fn finite_band(
    x: &[f32],
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { finite_band_avx512(x, cols, tile_rows, tile_cols, rounding) };
    }
    finite_band_portable(x, cols, tile_rows, tile_cols, rounding)
}

/// [`finite_band_portable`] compiled for AVX-512 (eight f64 lanes for the division and the
/// rounding); the same operations, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn finite_band_avx512(
    x: &[f32],
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Vec<f32> {
    finite_band_portable(x, cols, tile_rows, tile_cols, rounding)
}

#[inline(always)]
fn finite_band_portable(
    x: &[f32],
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Vec<f32> {
    let grid_cols = cols.div_ceil(tile_cols);
    let mut amax = vec![0.0f32; grid_cols];
    let mut scales = vec![0.0f64; grid_cols];
    let mut out = vec![0.0f32; x.len()];
    for (band_in, band_out) in x
        .chunks(tile_rows * cols)
        .zip(out.chunks_mut(tile_rows * cols))
    {
        amax.fill(0.0);
        for row in band_in.chunks(cols) {
            for (m, tile) in amax.iter_mut().zip(row.chunks(tile_cols)) {
                *m = tile.iter().fold(*m, |m, v| m.max(v.abs()));
            }
        }
        for (s, &m) in scales.iter_mut().zip(&amax) {
            *s = f64::from(tile_scale(m, rounding));
        }
        for (row_in, row_out) in band_in.chunks(cols).zip(band_out.chunks_mut(cols)) {
            let tiles = row_in.chunks(tile_cols).zip(row_out.chunks_mut(tile_cols));
            for ((tile_in, tile_out), &scale) in tiles.zip(&scales) {
                for (v, o) in tile_in.iter().zip(tile_out) {
                    *o = (round_to_e4m3(f64::from(*v) / scale) * scale) as f32;
                }
            }
        }
    }
    out
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
        ] {
            let portable = finite_band_portable(&x, 300, tile.0, tile.1, rounding);
            let dispatched = finite_band(&x, 300, tile.0, tile.1, rounding);
            let same = portable
                .iter()
                .zip(&dispatched)
                .all(|(p, d)| p.to_bits() == d.to_bits());
            assert!(same, "{tile:?}");
        }
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
