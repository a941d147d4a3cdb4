//! Scalar rules shared by every op: rounding floats to their dtype and keeping integers in range.
//!
//! Every float value the interpreter stores is an f32 exactly representable in its tensor's
//! dtype. Ops compute in f32 (f64 for accumulations and transcendental functions), round the
//! result to f32 (round to nearest even), then round that f32 to the node's dtype with
//! [`round_to_dtype`]. Rounding through f32 is a double rounding for narrow types; it differs
//! from a direct rounding only for values within 2^-24 (relative) of a tie, and it is what a
//! kernel that computes in f32 and converts on store does.

use fathom_compiler::DType;
use float8::{F8E4M3, F8E5M2};
use half::{bf16, f16};

/// Rounds `x` to the nearest value of the float type `dtype` (ties to even), as an f32.
///
/// `bf16` and `f16` overflow to infinity; the FP8 types saturate to their largest finite value
/// (±448 for E4M3, ±57344 for E5M2), infinities included, like CUDA's `__nv_cvt_float_to_fp8`
/// with `__NV_SATFINITE`. NaN stays NaN. Non-float dtypes return `x` unchanged.
#[inline]
pub fn round_to_dtype(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::F8E4M3 => F8E4M3::from_f32(x).to_f32(),
        DType::F8E5M2 => F8E5M2::from_f32(x).to_f32(),
        DType::I32 | DType::I64 | DType::Bool => x,
    }
}

/// Rounds an f64 result to f32 and then to `dtype`.
#[inline]
pub(super) fn round_f64(dtype: DType, x: f64) -> f32 {
    round_to_dtype(dtype, x as f32)
}

/// Whether `x` is a value of the float type `dtype` (NaN counts as one).
pub(super) fn is_representable(dtype: DType, x: f32) -> bool {
    x.is_nan() || round_to_dtype(dtype, x) == x
}

/// Wraps an integer result into the range of `dtype` (two's complement, as on every device):
/// `i32` results keep their low 32 bits, `i64` results are already wrapped by the arithmetic.
pub(super) fn wrap_int(dtype: DType, x: i64) -> i64 {
    match dtype {
        DType::I32 => i64::from(x as i32),
        _ => x,
    }
}

/// Whether `x` is in the range of the integer type `dtype`.
pub(super) fn int_in_range(dtype: DType, x: i64) -> bool {
    wrap_int(dtype, x) == x
}

/// A float converted to an integer type: truncated toward zero, saturating at the type's
/// bounds, NaN to 0 (Rust's `as`).
pub(super) fn float_to_int(dtype: DType, x: f32) -> i64 {
    match dtype {
        DType::I32 => i64::from(x as i32),
        _ => x as i64,
    }
}

/// An integer converted to a float type: rounded to f32, then to `dtype`.
pub(super) fn int_to_float(dtype: DType, x: i64) -> f32 {
    round_to_dtype(dtype, x as f32)
}
