//! Rust functions the generated code calls for what cranelift has no instruction for: the
//! transcendentals and the roundings to narrow float types.
//!
//! Each is a thin `extern "C"` wrapper around the very function the row evaluator uses
//! ([`loops::unary`], [`round_to_dtype`]), so the JIT agrees with the reference bit for bit.
//! (Four lanes of `exp` and the sigmoid are emitted inline instead, see `emit::exp4`, with the
//! same operations as the reference's `expf::exp`, and the rounding to bf16 is a few integer
//! operations on the bits, see `emit::round_bf16`.)

use fathom_compiler::DType;
use fathom_compiler::graph::UnaryOp;

use super::super::loops;
use crate::interp::round_to_dtype;

/// A scalar function `f32 -> f32` the generated code imports by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Intrinsic {
    Exp,
    Log,
    Sigmoid,
    /// Rounds to a narrow float type (f16, fp8) and back to f32.
    Round(DType),
}

impl Intrinsic {
    /// Every intrinsic, so the JIT builder can register them all up front.
    pub(super) const ALL: [Intrinsic; 6] = [
        Intrinsic::Exp,
        Intrinsic::Log,
        Intrinsic::Sigmoid,
        Intrinsic::Round(DType::F16),
        Intrinsic::Round(DType::F8E4M3),
        Intrinsic::Round(DType::F8E5M2),
    ];

    /// The intrinsic computing a unary op, if it needs one.
    pub(super) fn for_unary(op: UnaryOp) -> Option<Intrinsic> {
        match op {
            UnaryOp::Exp => Some(Intrinsic::Exp),
            UnaryOp::Log => Some(Intrinsic::Log),
            UnaryOp::Sigmoid => Some(Intrinsic::Sigmoid),
            _ => None,
        }
    }

    /// The symbol the generated code calls.
    pub(super) fn symbol(self) -> &'static str {
        match self {
            Intrinsic::Exp => "fathom_jit_exp",
            Intrinsic::Log => "fathom_jit_log",
            Intrinsic::Sigmoid => "fathom_jit_sigmoid",
            Intrinsic::Round(DType::F16) => "fathom_jit_round_f16",
            Intrinsic::Round(DType::F8E4M3) => "fathom_jit_round_f8e4m3",
            Intrinsic::Round(DType::F8E5M2) => "fathom_jit_round_f8e5m2",
            // Rounded inline (bf16) or not narrow float types: never asked for.
            Intrinsic::Round(_) => "fathom_jit_round_identity",
        }
    }

    /// The address of the Rust function behind the symbol.
    pub(super) fn address(self) -> *const u8 {
        let f: extern "C" fn(f32) -> f32 = match self {
            Intrinsic::Exp => exp,
            Intrinsic::Log => log,
            Intrinsic::Sigmoid => sigmoid,
            Intrinsic::Round(DType::F16) => round_f16,
            Intrinsic::Round(DType::F8E4M3) => round_f8e4m3,
            Intrinsic::Round(DType::F8E5M2) => round_f8e5m2,
            Intrinsic::Round(_) => identity,
        };
        f as *const u8
    }
}

extern "C" fn exp(x: f32) -> f32 {
    loops::unary(UnaryOp::Exp, x)
}

extern "C" fn log(x: f32) -> f32 {
    loops::unary(UnaryOp::Log, x)
}

extern "C" fn sigmoid(x: f32) -> f32 {
    loops::unary(UnaryOp::Sigmoid, x)
}

extern "C" fn round_f16(x: f32) -> f32 {
    round_to_dtype(DType::F16, x)
}

extern "C" fn round_f8e4m3(x: f32) -> f32 {
    round_to_dtype(DType::F8E4M3, x)
}

extern "C" fn round_f8e5m2(x: f32) -> f32 {
    round_to_dtype(DType::F8E5M2, x)
}

extern "C" fn identity(x: f32) -> f32 {
    x
}
