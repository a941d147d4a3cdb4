//! FP8 numerics on the host, exactly as the DeepSeek-V3 recipe defines them (SPEC §2): the
//! reference every FP8 kernel and the interpreter's casts are checked against.
//!
//! - [`format`](mod@format): exact E4M3 / E5M2 (OCP OFP8 v1.0) and BF16 conversions, from the definitions.
//! - [`quantize`]: fine-grained quantization to E4M3 with one scale per tile (1×128 activation
//!   tiles, 128×128 weight blocks), `scale = max(amax, 1e-4) / 448`, optionally rounded up to a
//!   power of two.
//! - [`gemm`]: an emulation of DeepGEMM's FP8 GEMM: per-K-chunk products in a limited-precision
//!   accumulator (Hopper keeps about 14 bits), promoted to FP32 with the scales every
//!   `N_C = 128` elements of K; BF16 and f64 reference GEMMs; DeepGEMM's `calc_diff` check.
//! - [`accumulate`]: that limited accumulation inside the training graph's GEMMs
//!   (`graph::Accumulation::Limited`), bit-identical between the interpreter and the CPU backend.
//! - [`fake`]: `dequant(quant(x))` per tile, the graph op `QuantizeDequantize` that the
//!   precision pass puts on GEMM operands (used by the interpreter and the CPU backend).
//! - [`experiment`]: the measurements behind `examples/fp8_accumulation.rs` (accumulation
//!   error with and without promotion, fine-grained vs per-tensor scaling).
//!
//! Matrices are flat row-major `f32` slices with explicit `rows`, `cols`. GEMMs follow the
//! weight layout of a Linear: `y (M×N) = a (M×K) · bᵀ`, with `b` stored N×K.

pub mod accumulate;
pub mod experiment;
pub mod fake;
pub mod format;
pub mod gemm;
pub mod quantize;

pub use accumulate::LimitedSum;
pub use fake::{fake_quantize, fake_quantize_in_place, fake_quantize_into, round_in_expert_tiles};
pub use format::{
    Fp8Format, Overflow, bf16_to_f32, e4m3_to_f32, e5m2_to_f32, f32_to_bf16, f32_to_e4m3,
    f32_to_e5m2, f32_to_e5m2_ieee, round_bf16,
};
pub use gemm::{Accumulator, GemmConfig, bf16_gemm, calc_diff, f64_gemm, fp8_gemm};
pub use quantize::{
    E4M3_MAX, MIN_AMAX, QuantizedTensor, ScaleRounding, TileLayout, quantize_activations,
    quantize_activations_transposed, quantize_per_tensor, quantize_tiles, quantize_weights,
    tile_scale,
};

use thiserror::Error;

/// Everything the FP8 functions refuse. Each variant names the operand and what was expected.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum Fp8Error {
    /// A flat buffer whose length is not the product of the shape given with it.
    #[error("{what}: {len} elements given for a {rows}×{cols} matrix (expected {expected})")]
    Length {
        what: &'static str,
        len: usize,
        rows: usize,
        cols: usize,
        expected: usize,
    },

    /// A shape whose element count does not fit in `usize`.
    #[error("{what}: a {rows}×{cols} matrix has more elements than memory can address")]
    ShapeOverflow {
        what: &'static str,
        rows: usize,
        cols: usize,
    },

    /// A tile with a zero side.
    #[error("{what}: tile {tile_rows}×{tile_cols} has a zero side; tiles must be at least 1×1")]
    EmptyTile {
        what: &'static str,
        tile_rows: usize,
        tile_cols: usize,
    },

    /// A NaN or infinite input: its tile would have no meaningful scale.
    #[error("{what}: element ({row}, {col}) is {value}; FP8 quantization needs finite inputs")]
    NonFinite {
        what: &'static str,
        row: usize,
        col: usize,
        value: f32,
    },

    /// A quantized tensor assembled from parts that do not agree.
    #[error("quantized tensor: {0}")]
    MalformedTensor(String),

    /// GEMM operands whose inner dimensions differ.
    #[error("GEMM: a is {m}×{k_a} but b (N×K) is {n}×{k_b}; their K must agree")]
    InnerDimension {
        m: usize,
        k_a: usize,
        n: usize,
        k_b: usize,
    },

    /// An operand whose scale tiles are not constant over each K-chunk, so its scale cannot be
    /// applied when the chunk is promoted.
    #[error(
        "GEMM: {operand}'s scale tiles are {tile_cols} wide along K = {k}; each promotion chunk \
         of {promotion_interval} must lie in one tile (tile width a multiple of the promotion \
         interval, or at least K)"
    )]
    ChunkStraddlesTiles {
        operand: &'static str,
        tile_cols: usize,
        promotion_interval: usize,
        k: usize,
    },

    /// An outlier channel (experiment data) beyond the matrix's columns.
    #[error("channel {channel} is out of range for a matrix of {cols} columns")]
    ChannelOutOfRange { channel: usize, cols: usize },

    /// A GEMM configuration value out of range.
    #[error("GEMM config: {field} = {value} is invalid: {reason}")]
    Config {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
}

/// `rows · cols`, checked against `len`.
pub(crate) fn check_len(
    what: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
) -> Result<(), Fp8Error> {
    let expected = rows
        .checked_mul(cols)
        .ok_or(Fp8Error::ShapeOverflow { what, rows, cols })?;
    if len != expected {
        return Err(Fp8Error::Length {
            what,
            len,
            rows,
            cols,
            expected,
        });
    }
    Ok(())
}
