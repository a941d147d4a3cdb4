//! Fake quantization: `dequant(quant(x))` as f32 values, the graph op `QuantizeDequantize`.
//!
//! Both the interpreter and the CPU backend call [`fake_quantize`], which is
//! [`quantize_tiles`] followed by [`QuantizedTensor::dequantize`] on each matrix of the last two
//! axes (fused into one pass with the same arithmetic, checked bit for bit against the two-step
//! form), so the op is exactly the quantizer's arithmetic. Matrices are cut into bands of whole
//! tile rows that are quantized in parallel: tiles never straddle a band, so the result does not
//! depend on the number of threads.

use rayon::prelude::*;

use super::format::{Fp8Format, Overflow};
use super::quantize::{QuantizedTensor, ScaleRounding, quantize_tiles, tile_scale};
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
/// same max-abs, the same [`tile_scale`], the same quotient `x / scale` in f64 rounded once by
/// [`Fp8Format::encode_f64`], and the same `code · scale` in f64 rounded to f32 — without the
/// code and scale buffers or the per-element tile lookups, and reading rows in order (two
/// passes per band of tile rows: max-abs per tile, then values). The tests compare it with the
/// two-step form bit for bit.
fn finite_band(
    x: &[f32],
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Vec<f32> {
    let decoded: [f32; 256] = std::array::from_fn(|code| Fp8Format::E4M3.decode(code as u8));
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
                    let code =
                        Fp8Format::E4M3.encode_f64(f64::from(*v) / scale, Overflow::Saturate);
                    *o = (f64::from(decoded[usize::from(code)]) * scale) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
