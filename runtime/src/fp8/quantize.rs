//! Fine-grained quantization to E4M3 (DeepSeek-V3 §3.3.1, SPEC §2): one scale per tile, computed
//! online from the tile's max-abs, `scale = max(amax, 1e-4) / 448`, optionally rounded up to a
//! power of two (UE8M0 scales).
//!
//! Codes are the E4M3 value nearest to `x / scale`: the quotient is formed in f64 and rounded
//! once by [`Fp8Format::encode_f64`], which is then the correct rounding of the exact quotient.
//! Rounding to f64 could only mislead at an E4M3 midpoint μ (5 significant bits), with the exact
//! quotient within 2^-53 (relative) of μ without being μ; but `x - scale·μ`, a difference of
//! numbers of 24 and 29 significant bits and similar size, is either 0 or at least about
//! 2^-29·|x|, far more. So every element is within half an E4M3 spacing (times the scale) of its
//! input. A kernel that multiplies by an f32 reciprocal of the scale can differ by one code at
//! near-ties, except with power-of-two scales, where both are exact.
//!
//! Partial tiles are handled: when a side is not a multiple of the tile side, the last tile along
//! it is smaller, and its scale comes from the elements it has (the tiny test models have hidden
//! sizes below 128). Non-finite inputs are refused with the element's position.

use super::format::{Fp8Format, Overflow};
use super::{Fp8Error, check_len};

/// The largest finite E4M3 value, which a tile's max-abs is scaled to.
pub const E4M3_MAX: f32 = 448.0;

/// The floor on a tile's max-abs, so an all-zero tile gets a finite, nonzero scale.
pub const MIN_AMAX: f32 = 1e-4;

/// How a tile's scale is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleRounding {
    /// `max(amax, 1e-4) / 448`, rounded to f32.
    Exact,
    /// That value rounded up to the next power of two (unchanged if it is one), as UE8M0 scales
    /// are: the tile's max-abs then still maps within ±448, and multiplying by the scale is exact.
    PowerOfTwo,
}

/// How a rows×cols matrix is cut into tiles, each with one scale. Scales are stored row-major
/// over the grid of tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileLayout {
    pub rows: usize,
    pub cols: usize,
    pub tile_rows: usize,
    pub tile_cols: usize,
}

impl TileLayout {
    /// A layout; tiles must have nonzero sides and the element count must fit in `usize`.
    pub fn new(
        rows: usize,
        cols: usize,
        tile_rows: usize,
        tile_cols: usize,
    ) -> Result<Self, Fp8Error> {
        if tile_rows == 0 || tile_cols == 0 {
            return Err(Fp8Error::EmptyTile {
                what: "tile layout",
                tile_rows,
                tile_cols,
            });
        }
        rows.checked_mul(cols).ok_or(Fp8Error::ShapeOverflow {
            what: "tile layout",
            rows,
            cols,
        })?;
        Ok(Self {
            rows,
            cols,
            tile_rows,
            tile_cols,
        })
    }

    /// Tiles along the rows and along the columns (a partial tile counts).
    pub fn tile_grid(&self) -> (usize, usize) {
        (
            self.rows.div_ceil(self.tile_rows),
            self.cols.div_ceil(self.tile_cols),
        )
    }

    /// How many scales the matrix has.
    pub fn scale_count(&self) -> usize {
        let (tr, tc) = self.tile_grid();
        tr * tc
    }

    /// The index of the scale of element (`row`, `col`).
    pub fn scale_index(&self, row: usize, col: usize) -> usize {
        (row / self.tile_rows) * self.tile_grid().1 + col / self.tile_cols
    }
}

/// A matrix in E4M3 with one f32 scale per tile: element (r, c) is
/// `decode(codes[r·cols + c]) · scales[layout.scale_index(r, c)]`.
///
/// Invariants (checked by [`from_parts`](Self::from_parts)): as many codes as elements, as
/// many scales as tiles, no NaN code, every scale finite and positive.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    codes: Vec<u8>,
    scales: Vec<f32>,
    layout: TileLayout,
}

impl QuantizedTensor {
    /// A quantized tensor from its parts, validated.
    pub fn from_parts(
        codes: Vec<u8>,
        scales: Vec<f32>,
        layout: TileLayout,
    ) -> Result<Self, Fp8Error> {
        let layout = TileLayout::new(layout.rows, layout.cols, layout.tile_rows, layout.tile_cols)?;
        check_len("quantized codes", codes.len(), layout.rows, layout.cols)?;
        if scales.len() != layout.scale_count() {
            return Err(Fp8Error::MalformedTensor(format!(
                "{} scales for a {}×{} matrix in {}×{} tiles (expected {})",
                scales.len(),
                layout.rows,
                layout.cols,
                layout.tile_rows,
                layout.tile_cols,
                layout.scale_count()
            )));
        }
        if let Some(i) = codes.iter().position(|&c| Fp8Format::E4M3.is_nan_code(c)) {
            return Err(Fp8Error::MalformedTensor(format!(
                "code {:#04x} at element ({}, {}) is an E4M3 NaN",
                codes[i],
                i / layout.cols,
                i % layout.cols
            )));
        }
        if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Fp8Error::MalformedTensor(format!(
                "scale {i} is {}; scales must be finite and positive",
                scales[i]
            )));
        }
        Ok(Self {
            codes,
            scales,
            layout,
        })
    }

    /// E4M3 codes, row-major.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One scale per tile, row-major over the tile grid.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    pub fn layout(&self) -> TileLayout {
        self.layout
    }

    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    pub fn cols(&self) -> usize {
        self.layout.cols
    }

    /// The scale of element (`row`, `col`); panics if it is out of range, like indexing.
    pub fn scale_at(&self, row: usize, col: usize) -> f32 {
        self.scales[self.layout.scale_index(row, col)]
    }

    /// The exact value of element (`row`, `col`): code times scale, in f64 (exact there: 4 × 24
    /// significand bits). Panics if it is out of range, like indexing.
    pub fn value(&self, row: usize, col: usize) -> f64 {
        let code = self.codes[row * self.layout.cols + col];
        f64::from(Fp8Format::E4M3.decode(code)) * f64::from(self.scale_at(row, col))
    }

    /// Every element's exact value, row-major, in f64.
    pub fn dequantize_f64(&self) -> Vec<f64> {
        (0..self.layout.rows)
            .flat_map(|r| (0..self.layout.cols).map(move |c| (r, c)))
            .map(|(r, c)| self.value(r, c))
            .collect()
    }

    /// Every element as an f32: code times scale, rounded once to f32.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_f64()
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }
}

/// The scale of a tile whose max-abs is `amax` (finite, non-negative).
pub fn tile_scale(amax: f32, rounding: ScaleRounding) -> f32 {
    let scale = amax.max(MIN_AMAX) / E4M3_MAX;
    match rounding {
        ScaleRounding::Exact => scale,
        ScaleRounding::PowerOfTwo => round_up_to_power_of_two(scale),
    }
}

/// The smallest power of two >= `x`, for a positive normal `x` (scales are at least
/// 1e-4/448 ≈ 2^-22, and at most f32::MAX/448 < 2^120, so the result is finite).
fn round_up_to_power_of_two(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7F_FFFF == 0 {
        x
    } else {
        // Clear the mantissa and step the exponent up once.
        f32::from_bits((bits & 0x7F80_0000) + 0x80_0000)
    }
}

/// Quantizes a rows×cols matrix to E4M3 with one scale per `tile_rows`×`tile_cols` tile.
pub fn quantize_tiles(
    x: &[f32],
    rows: usize,
    cols: usize,
    tile_rows: usize,
    tile_cols: usize,
    rounding: ScaleRounding,
) -> Result<QuantizedTensor, Fp8Error> {
    check_len("quantize input", x.len(), rows, cols)?;
    if tile_rows == 0 || tile_cols == 0 {
        return Err(Fp8Error::EmptyTile {
            what: "quantize",
            tile_rows,
            tile_cols,
        });
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Fp8Error::NonFinite {
            what: "quantize input",
            row: i / cols,
            col: i % cols,
            value: x[i],
        });
    }
    let layout = TileLayout::new(rows, cols, tile_rows, tile_cols)?;
    let (grid_rows, grid_cols) = layout.tile_grid();
    let mut scales = Vec::with_capacity(layout.scale_count());
    let mut codes = vec![0u8; x.len()];
    for tr in 0..grid_rows {
        let row_range = tr * tile_rows..((tr + 1) * tile_rows).min(rows);
        for tc in 0..grid_cols {
            let col_range = tc * tile_cols..((tc + 1) * tile_cols).min(cols);
            let amax = row_range
                .clone()
                .flat_map(|r| &x[r * cols + col_range.start..r * cols + col_range.end])
                .fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = tile_scale(amax, rounding);
            for r in row_range.clone() {
                for c in col_range.clone() {
                    let quotient = f64::from(x[r * cols + c]) / f64::from(scale);
                    codes[r * cols + c] = Fp8Format::E4M3.encode_f64(quotient, Overflow::Saturate);
                }
            }
            scales.push(scale);
        }
    }
    Ok(QuantizedTensor {
        codes,
        scales,
        layout,
    })
}

/// Activations (tokens × channels): one scale per 1×`tile` tile, i.e. per token and per `tile`
/// channels (DeepSeek-V3: `tile` = 128).
pub fn quantize_activations(
    x: &[f32],
    rows: usize,
    cols: usize,
    tile: usize,
    rounding: ScaleRounding,
) -> Result<QuantizedTensor, Fp8Error> {
    quantize_tiles(x, rows, cols, 1, tile, rounding)
}

/// Weights (out × in): one scale per `block`×`block` block (DeepSeek-V3: 128×128).
pub fn quantize_weights(
    w: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
    rounding: ScaleRounding,
) -> Result<QuantizedTensor, Fp8Error> {
    quantize_tiles(w, rows, cols, block, block, rounding)
}

/// The transpose of a rows×cols matrix, quantized as activations: the result is cols×rows with
/// 1×`tile` tiles, i.e. `x`'s columns are quantized in runs of `tile` rows. The weight-gradient
/// GEMM `dW = dYᵀ·X` contracts over tokens, so both of its operands need their tiles along the
/// token axis (SPEC §2, "all three GEMMs of every Linear").
pub fn quantize_activations_transposed(
    x: &[f32],
    rows: usize,
    cols: usize,
    tile: usize,
    rounding: ScaleRounding,
) -> Result<QuantizedTensor, Fp8Error> {
    check_len("quantize input", x.len(), rows, cols)?;
    let mut transposed = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            transposed[c * rows + r] = x[r * cols + c];
        }
    }
    quantize_tiles(&transposed, cols, rows, 1, tile, rounding).map_err(|e| match e {
        // Report positions in the caller's coordinates.
        Fp8Error::NonFinite {
            what,
            row,
            col,
            value,
        } => Fp8Error::NonFinite {
            what,
            row: col,
            col: row,
            value,
        },
        other => other,
    })
}

/// One scale for the whole matrix: the per-tensor scaling of the ablation (what fine-grained
/// scaling improves on when a few channels are outliers).
pub fn quantize_per_tensor(
    x: &[f32],
    rows: usize,
    cols: usize,
    rounding: ScaleRounding,
) -> Result<QuantizedTensor, Fp8Error> {
    quantize_tiles(x, rows, cols, rows.max(1), cols.max(1), rounding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_of_two_rounding_goes_up() {
        assert_eq!(round_up_to_power_of_two(0.25), 0.25);
        assert_eq!(round_up_to_power_of_two(0.3), 0.5);
        assert_eq!(round_up_to_power_of_two(1.000_000_1), 2.0);
    }

    #[test]
    fn partial_tiles_get_their_own_scale() {
        let x: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let q = quantize_activations(&x, 2, 5, 4, ScaleRounding::Exact).unwrap();
        assert_eq!(q.layout().tile_grid(), (2, 2));
        assert_eq!(
            q.scales(),
            &[3.0 / 448.0, 4.0 / 448.0, 8.0 / 448.0, 9.0 / 448.0]
        );
    }
}
