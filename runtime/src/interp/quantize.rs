//! `QuantizeDequantize`: FP8 fake quantization, computed by [`crate::fp8::fake_quantize`] (the
//! exact quantizer every FP8 kernel is checked against).

use fathom_compiler::graph::QuantFormat;

use super::error::InterpError;
use super::eval::At;
use super::numeric::round_to_dtype;
use crate::fp8::{ScaleRounding, fake_quantize};
use crate::tensor::{Data, HostTensor};

/// `dequant(quant(x))` per `tile_rows`×`tile_cols` tile of the last two axes, rounded to the
/// node's float type (a no-op for f32, whose values the FP8 grid times an f32 scale are).
pub(super) fn quantize_dequantize(
    at: At<'_>,
    format: QuantFormat,
    (tile_rows, tile_cols): (usize, usize),
    pow2_scales: bool,
    x: &HostTensor,
) -> Result<HostTensor, InterpError> {
    let values = at.floats(x)?;
    let rounding = if pow2_scales {
        ScaleRounding::PowerOfTwo
    } else {
        ScaleRounding::Exact
    };
    let out = match format {
        QuantFormat::E4M3 => fake_quantize(values, x.dims(), tile_rows, tile_cols, rounding),
    }
    .map_err(|e| at.internal(e.to_string()))?;
    let dtype = at.out_dtype();
    Ok(at.tensor(Data::Float(
        out.into_iter().map(|v| round_to_dtype(dtype, v)).collect(),
    )))
}
