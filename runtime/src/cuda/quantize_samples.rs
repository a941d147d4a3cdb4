//! The quantisation templates (`fathom_kernels::quantize`) on awkward inputs, with what each must
//! write: the CPU quantizers' codes and scales (`crate::fp8`), laid out as the template lays them
//! out. The GPU must match bit for bit: both divide once and round once, by the same definition.
//! `fathom gpu-check` runs them; these tests check the expected layouts.

use fathom_kernels::{QuantizeInput, QuantizeKind, QuantizeParams};

use super::CudaError;
use crate::fp8::{
    QuantizedTensor, ScaleRounding, bf16_to_f32, e4m3_to_f32, f32_to_bf16, quantize_activations,
    quantize_activations_transposed, quantize_weights,
};

/// One quantisation: its template, input and expected output.
#[derive(Clone, Debug)]
pub struct QuantizeSample {
    pub params: QuantizeParams,
    pub rows: usize,
    pub cols: usize,
    /// The input as the kernel reads it: f32 or bf16 bits, little-endian, `[rows][cols]`
    /// (`[GATHERED_FROM][cols]` for the gathered kind); for E4M3 tiles their codes, rows padded
    /// to 16 bytes.
    pub input: Vec<u8>,
    /// For E4M3 tiles: their scales (`[ceil(cols/128)][round_up(x_rows, 4)]`) and rows.
    pub input_tiles: Option<(Vec<f32>, usize)>,
    /// For a product: the second factor `y` and the six index ints
    /// (`fathom_kernels::quantize::PRODUCT_INTS`); `input` is then the first factor `x`.
    pub input_product: Option<(Vec<f32>, [i32; 6])>,
    /// For the gathered kind: each output row's input row, -1 for a row of zeros.
    pub source_rows: Option<Vec<i32>>,
    /// The codes the kernel must write (`[rows][cols]`, or `[cols][rows]` when transposed).
    pub codes: Vec<u8>,
    /// The scales the kernel must write, in its layout (padding entries 0).
    pub scales: Vec<f32>,
}

/// Every kind, input type and scale rounding, on a `[rows][cols]` input with partial tiles
/// (`cols` = 2·128 + 16; `rows` 200, or 144 where the output is transposed), a tile of zeros
/// (the scale's floor), one of tiny values, large and negative values; and the activation kinds
/// at sizes whose codes' rows are padded to 16 bytes (1×128 over 262 columns, not even a
/// multiple of 4: loaded element by element; 128×1 over 150 rows; 128×128 blocks over 264
/// columns, and transposed over 150 rows).
pub fn quantize_samples() -> Result<Vec<QuantizeSample>, CudaError> {
    let mut samples = Vec::new();
    for kind in [
        QuantizeKind::Tile1x128,
        QuantizeKind::GatheredTile1x128,
        QuantizeKind::Block128x128 { transpose: false },
        QuantizeKind::Block128x128 { transpose: true },
        QuantizeKind::Tile128x1Transposed,
        QuantizeKind::GatheredTile128x1Transposed,
    ] {
        let transposed = matches!(
            kind,
            QuantizeKind::Block128x128 { transpose: true }
                | QuantizeKind::Tile128x1Transposed
                | QuantizeKind::GatheredTile128x1Transposed
        );
        let (rows, cols) = (if transposed { 144 } else { 200 }, 272);
        for input in inputs(kind) {
            for pow2_scales in [false, true] {
                let params = QuantizeParams {
                    kind,
                    input,
                    pow2_scales,
                };
                samples.push(sample(params, rows, cols)?);
            }
        }
    }
    for (kind, rows, cols) in [
        (QuantizeKind::Tile1x128, 200, 262),
        (QuantizeKind::Tile128x1Transposed, 150, 272),
        (QuantizeKind::Block128x128 { transpose: false }, 200, 264),
        (QuantizeKind::Block128x128 { transpose: true }, 150, 264),
    ] {
        for input in inputs(kind) {
            let params = QuantizeParams {
                kind,
                input,
                pow2_scales: false,
            };
            samples.push(sample(params, rows, cols)?);
        }
    }
    Ok(samples)
}

/// The inputs a kind reads: f32 and bf16, and for the activation kinds E4M3 tiles (a saved
/// activation's codes) and products of two f32 tensors.
fn inputs(kind: QuantizeKind) -> Vec<QuantizeInput> {
    let mut inputs = vec![QuantizeInput::F32, QuantizeInput::Bf16];
    if !matches!(kind, QuantizeKind::Block128x128 { .. }) {
        inputs.extend([QuantizeInput::E4m3Tiles, QuantizeInput::F32Product]);
    }
    inputs
}

/// Deterministic values with every case the scales meet: row 3 is zero from column 128 on (a
/// zero tile), row 5 tiny (below the 1e-4 floor), the rest spread over ±2000 with signs mixed.
fn values(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let wave = ((i * 2654435761) % 10007) as f32 / 10007.0 - 0.5;
            match r {
                3 if c >= 128 => 0.0,
                5 => wave * 1e-6,
                _ => wave * (1 + (r * 7 + c) % 2000) as f32,
            }
        })
        .collect()
}

/// Rows of a product sample sharing one row of its first factor (a token's expert slots).
const PRODUCT_SLOTS: usize = 4;

/// Input rows of the gathered kind's sample: fewer than its 200 output rows, so rows repeat.
pub const GATHERED_FROM: usize = 150;

/// The gathered sample's source rows: rows of the input in a scrambled order with repeats, and
/// every fifth output row padding (-1).
fn gathered_sources(rows: usize) -> Vec<i32> {
    (0..rows)
        .map(|r| {
            if r % 5 == 4 {
                -1
            } else {
                ((r * 37) % GATHERED_FROM) as i32
            }
        })
        .collect()
}

fn sample(params: QuantizeParams, rows: usize, cols: usize) -> Result<QuantizeSample, CudaError> {
    let gathered = matches!(
        params.kind,
        QuantizeKind::GatheredTile1x128 | QuantizeKind::GatheredTile128x1Transposed
    );
    let input_rows = if gathered { GATHERED_FROM } else { rows };
    let mut x = values(input_rows, cols);
    let mut input_tiles = None;
    let mut input_product = None;
    let input = match params.input {
        QuantizeInput::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        QuantizeInput::Bf16 => {
            // The kernel reads bf16: the reference quantizes the same (rounded) values.
            let bits: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
            x = bits.iter().map(|&b| bf16_to_f32(b)).collect();
            bits.iter().flat_map(|b| b.to_le_bytes()).collect()
        }
        QuantizeInput::E4m3Tiles => {
            // The 1x128 quantisation of the values, which the kernel reads as code × scale.
            let tiles = QuantizeParams {
                kind: QuantizeKind::Tile1x128,
                input: QuantizeInput::F32,
                pow2_scales: false,
            };
            let (codes, scales) = expected_quantization(tiles, &x, input_rows, cols)?;
            x = tile_values(&codes, &scales, input_rows, cols);
            input_tiles = Some((scales, input_rows));
            codes
        }
        QuantizeInput::F32Product => {
            // As the experts' combine gradient: `x` one row per PRODUCT_SLOTS rows, each row
            // scaled by its own `y` (column stride 0).
            let factor = values(input_rows.div_ceil(PRODUCT_SLOTS), cols);
            let weights: Vec<f32> = (0..input_rows)
                .map(|r| 0.25 + (r % 7) as f32 * 0.375 - if r % 5 == 2 { 3.0 } else { 0.0 })
                .collect();
            x = (0..input_rows * cols)
                .map(|i| factor[i / cols / PRODUCT_SLOTS * cols + i % cols] * weights[i / cols])
                .collect();
            let ints = [PRODUCT_SLOTS as i32, cols as i32, 1, 1, 1, 0];
            input_product = Some((weights, ints));
            factor.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
    };
    let source_rows = gathered.then(|| gathered_sources(rows));
    if let Some(sources) = &source_rows {
        x = sources
            .iter()
            .flat_map(|&source| match usize::try_from(source) {
                Ok(row) => x[row * cols..(row + 1) * cols].to_vec(),
                Err(_) => vec![0.0; cols],
            })
            .collect();
    }
    let (codes, scales) = expected_quantization(params, &x, rows, cols)?;
    Ok(QuantizeSample {
        params,
        rows,
        cols,
        input,
        input_tiles,
        input_product,
        source_rows,
        codes,
        scales,
    })
}

/// The values of a `[rows][cols]` tensor held as 1×128 E4M3 tiles (codes with rows padded to
/// 16 bytes, K-block-major scales): each code times its scale, rounded once to f32.
pub fn tile_values(codes: &[u8], scales: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let (stride, rows_padded) = (cols.next_multiple_of(16), rows.next_multiple_of(4));
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            e4m3_to_f32(codes[r * stride + c]) * scales[c / 128 * rows_padded + r]
        })
        .collect()
}

/// The codes and scales `params`' kernel must write for the `[rows][cols]` values `x` (as it
/// reads them; for the gathered kinds, the rows as gathered), in its layouts: the CPU
/// quantizers' results, rearranged.
pub fn expected_quantization(
    params: QuantizeParams,
    x: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(Vec<u8>, Vec<f32>), CudaError> {
    let rounding = if params.pow2_scales {
        ScaleRounding::PowerOfTwo
    } else {
        ScaleRounding::Exact
    };
    let quantizing = |e: crate::fp8::Fp8Error| CudaError::Launch(format!("{}: {e}", params.name()));
    Ok(match params.kind {
        QuantizeKind::Tile1x128 | QuantizeKind::GatheredTile1x128 => {
            let q = quantize_activations(x, rows, cols, 128, rounding).map_err(quantizing)?;
            (
                padded_rows(q.codes(), cols),
                k_block_major_scales(&q, rows, cols),
            )
        }
        QuantizeKind::Block128x128 { transpose } => {
            let q = quantize_weights(x, rows, cols, 128, rounding).map_err(quantizing)?;
            if transpose {
                let blocks = (rows.div_ceil(128), cols.div_ceil(128));
                (
                    padded_rows(&transposed(q.codes(), rows, cols), rows),
                    transposed(q.scales(), blocks.0, blocks.1),
                )
            } else {
                (padded_rows(q.codes(), cols), q.scales().to_vec())
            }
        }
        QuantizeKind::Tile128x1Transposed | QuantizeKind::GatheredTile128x1Transposed => {
            let q = quantize_activations_transposed(x, rows, cols, 128, rounding)
                .map_err(quantizing)?;
            (
                padded_rows(q.codes(), rows),
                k_block_major_scales(&q, cols, rows),
            )
        }
    })
}

/// Codes of rows of `width`, each padded with zero codes to a multiple of 16 bytes (as the
/// activation kinds write them).
fn padded_rows(codes: &[u8], width: usize) -> Vec<u8> {
    let stride = width.next_multiple_of(16);
    codes
        .chunks(width.max(1))
        .flat_map(|row| {
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0, stride - width))
        })
        .collect()
}

/// 1×128 tile scales of a `[rows][cols]` tensor, `[rows][ceil(cols/128)]` row-major as
/// quantized, laid out K-block-major `[ceil(cols/128)][round_up(rows, 4)]` (padding 0), as the
/// FP8 GEMMs read them: a TMA box of consecutive rows is one run.
pub fn k_block_major_scales(q: &QuantizedTensor, rows: usize, cols: usize) -> Vec<f32> {
    let k_blocks = cols.div_ceil(128);
    let rows_padded = rows.next_multiple_of(4);
    let mut scales = vec![0f32; k_blocks * rows_padded];
    for row in 0..rows {
        for kb in 0..k_blocks {
            scales[kb * rows_padded + row] = q.scales()[row * k_blocks + kb];
        }
    }
    scales
}

/// A row-major `[rows][cols]` matrix as `[cols][rows]`.
fn transposed<T: Copy>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols * rows)
        .map(|i| values[(i % rows) * cols + i / rows])
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::fp8::Fp8Format;

    #[test]
    fn every_kind_input_and_rounding_has_a_sample_the_template_accepts() {
        let samples = quantize_samples().unwrap();
        assert_eq!(samples.len(), 52);
        for s in &samples {
            assert!(
                s.params.check_problem(s.rows as u32, s.cols as u32).is_ok(),
                "{}",
                s.params.name()
            );
            let input_rows = match &s.source_rows {
                Some(sources) => {
                    assert_eq!(sources.len(), s.rows);
                    GATHERED_FROM
                }
                None => s.rows,
            };
            let (rows_read, row_bytes) = match s.params.input {
                QuantizeInput::F32 => (input_rows, 4 * s.cols),
                QuantizeInput::Bf16 => (input_rows, 2 * s.cols),
                QuantizeInput::E4m3Tiles => (input_rows, s.cols.next_multiple_of(16)),
                QuantizeInput::F32Product => (input_rows.div_ceil(PRODUCT_SLOTS), 4 * s.cols),
            };
            assert_eq!(s.input.len(), rows_read * row_bytes);
            let product = (s.input_product.as_ref()).map(|(y, ints)| (y.len(), ints[0]));
            let expected = (s.params.input == QuantizeInput::F32Product)
                .then_some((input_rows, PRODUCT_SLOTS as i32));
            assert_eq!(product, expected, "{}", s.params.name());
            let tiles = s
                .input_tiles
                .as_ref()
                .map(|(scales, rows)| (scales.len(), *rows));
            let expected = (s.params.input == QuantizeInput::E4m3Tiles).then(|| {
                (
                    s.cols.div_ceil(128) * input_rows.next_multiple_of(4),
                    input_rows,
                )
            });
            assert_eq!(tiles, expected, "{}", s.params.name());
            let (code_rows, code_cols) = s.params.codes_shape(s.rows, s.cols);
            assert_eq!(s.codes.len(), code_rows * code_cols);
            assert_eq!(code_cols % 16, 0, "{}", s.params.name());
        }
    }

    #[test]
    fn expected_outputs_are_laid_out_as_the_templates_write_them() {
        let samples = quantize_samples().unwrap();
        let find = |kind, pow2_scales| {
            samples
                .iter()
                .find(|s| {
                    s.params.kind == kind
                        && s.params.input == QuantizeInput::F32
                        && s.params.pow2_scales == pow2_scales
                })
                .unwrap()
        };
        // A code times its scale is the input within E4M3's rounding: 2⁻⁴ relative for normal
        // codes, half of the subnormal step 2⁻⁹ (times the scale) below them.
        let close = |code: u8, scale: f32, x: f32| {
            let value = f64::from(Fp8Format::E4M3.decode(code)) * f64::from(scale);
            let x = f64::from(x);
            (value - x).abs() <= x.abs() / 16.0 + f64::from(scale) / 512.0
        };
        let x = values(200, 272);

        // 1x128: scales [3 k blocks][200]; element (7, 130) is code (7, 130) times scale (kb 1, row 7).
        let tiles = find(QuantizeKind::Tile1x128, false);
        assert_eq!(tiles.scales.len(), 3 * 200);
        assert!(close(
            tiles.codes[7 * 272 + 130],
            tiles.scales[200 + 7],
            x[7 * 272 + 130]
        ));
        // The zero tile takes the floor: 1e-4 / 448.
        assert_eq!(tiles.scales[200 + 3], 1e-4 / 448.0);
        // Quantising a 1x128 quantisation's values again (a saved activation's codes) gives
        // back its codes and scales.
        let again = samples.iter().find(|s| {
            (s.params.kind, s.params.input, s.params.pow2_scales, s.cols)
                == (
                    QuantizeKind::Tile1x128,
                    QuantizeInput::E4m3Tiles,
                    false,
                    272,
                )
        });
        let again = again.unwrap();
        assert_eq!(again.input, tiles.codes);
        assert_eq!(
            (again.codes.as_slice(), again.scales.as_slice()),
            (tiles.codes.as_slice(), tiles.scales.as_slice())
        );

        // Gathered: output row 7 is input row 7·37 mod 150 = 109, whose tiles it takes whole;
        // output row 4 is padding (zero codes, the floor's scale).
        let gathered = find(QuantizeKind::GatheredTile1x128, false);
        let x150 = values(GATHERED_FROM, 272);
        let rows150 =
            quantize_activations(&x150, GATHERED_FROM, 272, 128, ScaleRounding::Exact).unwrap();
        assert_eq!(
            gathered.codes[7 * 272 + 130],
            rows150.codes()[109 * 272 + 130]
        );
        assert_eq!(gathered.scales[200 + 7], rows150.scales()[109 * 3 + 1]);
        assert!(gathered.codes[4 * 272..5 * 272].iter().all(|&c| c == 0));
        assert_eq!(gathered.scales[200 + 4], 1e-4 / 448.0);

        // Gathered 128x1, transposed (144 output rows): codes [272][144], padding rows zero
        // codes; the first tile's scale of each column from its gathered rows' largest value.
        let gathered_t = find(QuantizeKind::GatheredTile128x1Transposed, false);
        assert_eq!(gathered_t.codes.len(), 272 * 144);
        assert!((0..272).all(|c| gathered_t.codes[c * 144 + 4] == 0));
        let sources = gathered_sources(144);
        for c in [0, 130, 271] {
            let amax = sources[..128]
                .iter()
                .filter_map(|&r| usize::try_from(r).ok())
                .fold(0f32, |m, r| m.max(x150[r * 272 + c].abs()));
            assert_eq!(gathered_t.scales[c], amax.max(1e-4) / 448.0, "column {c}");
        }

        // 128x128 (200 rows): scales [2 row blocks][3 column blocks]. Transposed (144 rows): the
        // same blocks' scales as [3][2], and codes [272][144].
        let blocks = find(QuantizeKind::Block128x128 { transpose: false }, false);
        assert_eq!(blocks.scales.len(), 6);
        assert_eq!(blocks.codes.len(), 200 * 272);
        let x = values(144, 272);
        let plain = quantize_weights(&x, 144, 272, 128, ScaleRounding::Exact).unwrap();
        let transposed = find(QuantizeKind::Block128x128 { transpose: true }, false);
        assert_eq!(transposed.scales[2 * 2 + 1], plain.scales()[3 + 2]);
        assert_eq!(
            transposed.codes[130 * 144 + 7],
            plain.codes()[7 * 272 + 130]
        );
        assert!(close(
            transposed.codes[130 * 144 + 7],
            transposed.scales[2],
            x[7 * 272 + 130]
        ));

        // 128x1 transposed: codes [272][144], scales [2 row blocks][272]; column 130's rows 0..128
        // share scales[130], rows 128..144 scales[272 + 130].
        let columns = find(QuantizeKind::Tile128x1Transposed, true);
        assert_eq!(columns.scales.len(), 2 * 272);
        assert!(close(
            columns.codes[130 * 144 + 140],
            columns.scales[272 + 130],
            x[140 * 272 + 130]
        ));
        assert!(
            columns.scales.iter().all(|s| s.log2().fract() == 0.0),
            "powers of two"
        );

        // Rows padded to 16 bytes with zero codes: 1x128 over 262 columns writes rows of 272;
        // 128x1 over 150 rows writes [272][160].
        let ragged = |kind, rows, cols| {
            let sample = samples.iter().find(|s| {
                (s.params.kind, s.rows, s.cols, s.params.input)
                    == (kind, rows, cols, QuantizeInput::F32)
            });
            sample.unwrap()
        };
        let narrow = ragged(QuantizeKind::Tile1x128, 200, 262);
        let x = values(200, 262);
        let exact = quantize_activations(&x, 200, 262, 128, ScaleRounding::Exact).unwrap();
        assert_eq!(narrow.codes.len(), 200 * 272);
        assert_eq!(narrow.codes[7 * 272 + 261], exact.codes()[7 * 262 + 261]);
        assert!(narrow.codes[7 * 272 + 262..8 * 272].iter().all(|&c| c == 0));
        let short = ragged(QuantizeKind::Tile128x1Transposed, 150, 272);
        let x = values(150, 272);
        let exact =
            quantize_activations_transposed(&x, 150, 272, 128, ScaleRounding::Exact).unwrap();
        assert_eq!(short.codes.len(), 272 * 160);
        assert_eq!(short.codes[130 * 160 + 149], exact.codes()[130 * 150 + 149]);
        assert!(
            short.codes[130 * 160 + 150..131 * 160]
                .iter()
                .all(|&c| c == 0)
        );
        // 128x128 blocks over 264 columns: rows of 272; transposed over 150 rows: [264][160].
        let wide = ragged(QuantizeKind::Block128x128 { transpose: false }, 200, 264);
        let x = values(200, 264);
        let exact = quantize_weights(&x, 200, 264, 128, ScaleRounding::Exact).unwrap();
        assert_eq!(wide.codes.len(), 200 * 272);
        assert_eq!(wide.codes[7 * 272 + 263], exact.codes()[7 * 264 + 263]);
        assert!(wide.codes[7 * 272 + 264..8 * 272].iter().all(|&c| c == 0));
        let tall = ragged(QuantizeKind::Block128x128 { transpose: true }, 150, 264);
        let x = values(150, 264);
        let exact = quantize_weights(&x, 150, 264, 128, ScaleRounding::Exact).unwrap();
        assert_eq!(tall.codes.len(), 264 * 160);
        assert_eq!(tall.codes[263 * 160 + 149], exact.codes()[149 * 264 + 263]);
        assert!(
            tall.codes[263 * 160 + 150..264 * 160]
                .iter()
                .all(|&c| c == 0)
        );
    }
}
