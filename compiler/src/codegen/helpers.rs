//! The device functions generated kernels call, each emitted only into the sources that use it.
//!
//! They pin down the CPU backend's semantics where CUDA's built-ins differ: `fmaxf` drops NaNs
//! (the CPU's max propagates them), and a naive sigmoid overflows for large negative inputs.

use std::collections::BTreeSet;

use super::writer::Writer;

/// A helper function or header; the order is the order of emission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Helper {
    IncludeBf16,
    IncludeF16,
    IncludeFp8,
    Max,
    Min,
    Sigmoid,
    RoundBf16,
    RoundF16,
    RoundE4m3,
    RoundE5m2,
    TeamSum,
    TeamMax,
    BlockSum,
    BlockMax,
}

impl Helper {
    /// Helpers this one calls (or whose types it needs).
    fn needs(self) -> &'static [Helper] {
        match self {
            Helper::TeamMax => &[Helper::Max],
            Helper::BlockSum => &[Helper::TeamSum],
            Helper::BlockMax => &[Helper::TeamMax, Helper::Max],
            Helper::RoundBf16 => &[Helper::IncludeBf16],
            Helper::RoundF16 => &[Helper::IncludeF16],
            Helper::RoundE4m3 | Helper::RoundE5m2 => &[Helper::IncludeFp8],
            _ => &[],
        }
    }
}

/// The helpers a kernel uses, closed under [`Helper::needs`].
#[derive(Debug, Default)]
pub(crate) struct Helpers(BTreeSet<Helper>);

impl Helpers {
    pub fn add(&mut self, helper: Helper) {
        if self.0.insert(helper) {
            for &needed in helper.needs() {
                self.add(needed);
            }
        }
    }

    /// Writes the includes, then the device functions, in a fixed order.
    pub fn write(&self, w: &mut Writer) {
        let mut includes = false;
        for &helper in &self.0 {
            if let Some(header) = include(helper) {
                w.line(format!("#include <{header}>"));
                includes = true;
            }
        }
        if includes {
            w.blank();
        }
        for &helper in &self.0 {
            if include(helper).is_none() {
                function(helper, w);
                w.blank();
            }
        }
    }
}

fn include(helper: Helper) -> Option<&'static str> {
    match helper {
        Helper::IncludeBf16 => Some("cuda_bf16.h"),
        Helper::IncludeF16 => Some("cuda_fp16.h"),
        Helper::IncludeFp8 => Some("cuda_fp8.h"),
        _ => None,
    }
}

const INLINE: &str = "static __device__ __forceinline__";

fn function(helper: Helper, w: &mut Writer) {
    match helper {
        Helper::IncludeBf16 | Helper::IncludeF16 | Helper::IncludeFp8 => {}
        Helper::Max | Helper::Min => {
            let (name, builtin) = if helper == Helper::Max {
                ("max", "fmaxf")
            } else {
                ("min", "fminf")
            };
            w.comment(format!(
                "{name} that propagates NaN, like the CPU backend ({builtin} would drop it)."
            ));
            w.block(
                format!("{INLINE} float fathom_{name}(float a, float b)"),
                |w| {
                    w.line(format!(
                    "return (a != a || b != b) ? __uint_as_float(0x7fc00000u) : {builtin}(a, b);"
                ));
                },
            );
        }
        Helper::Sigmoid => {
            w.comment("1 / (1 + e^-x) without overflow for either sign, like the CPU backend.");
            w.block(format!("{INLINE} float fathom_sigmoid(float x)"), |w| {
                w.block("if (x >= 0.0f)", |w| {
                    w.line("return 1.0f / (1.0f + expf(-x));");
                });
                w.line("const float e = expf(x);");
                w.line("return e / (1.0f + e);");
            });
        }
        Helper::RoundBf16 => {
            w.comment("Rounds to the nearest bf16 (ties to even) and back.");
            w.block(format!("{INLINE} float fathom_round_bf16(float x)"), |w| {
                w.line("return __bfloat162float(__float2bfloat16_rn(x));");
            });
        }
        Helper::RoundF16 => {
            w.comment("Rounds to the nearest f16 (ties to even) and back.");
            w.block(format!("{INLINE} float fathom_round_f16(float x)"), |w| {
                w.line("return __half2float(__float2half_rn(x));");
            });
        }
        Helper::RoundE4m3 | Helper::RoundE5m2 => {
            let (name, kind) = if helper == Helper::RoundE4m3 {
                ("e4m3", "__NV_E4M3")
            } else {
                ("e5m2", "__NV_E5M2")
            };
            w.comment(format!(
                "Rounds to the nearest FP8 {name}, saturating to the largest finite value (as \
                 the CPU backend's float8 crate), and back."
            ));
            w.block(
                format!("{INLINE} float fathom_round_{name}(float x)"),
                |w| {
                    w.line(format!(
                    "const __nv_fp8_storage_t q = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, {kind});"
                ));
                    w.line(format!(
                        "return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, {kind})));"
                    ));
                },
            );
        }
        Helper::TeamSum | Helper::TeamMax => {
            let (name, combine) = if helper == Helper::TeamSum {
                ("sum", "v + other")
            } else {
                ("max", "fathom_max(v, other)")
            };
            w.comment(format!(
                "The {name} over a team of `width` lanes (a power of two up to 32) of one warp, by a\n\
                 butterfly: every lane gets the result. All 32 lanes of the warp must call it."
            ));
            w.block(
                format!("{INLINE} float fathom_team_{name}(float v, int width)"),
                |w| {
                    w.block("for (int lanes = width / 2; lanes > 0; lanes /= 2)", |w| {
                        w.line("const float other = __shfl_xor_sync(0xffffffffu, v, lanes);");
                        w.line(format!("v = {combine};"));
                    });
                    w.line("return v;");
                },
            );
        }
        Helper::BlockSum | Helper::BlockMax => {
            let (name, identity) = if helper == Helper::BlockSum {
                ("sum", "0.0f")
            } else {
                ("max", "-__uint_as_float(0x7f800000u)")
            };
            w.comment(format!(
                "The {name} over the block's `warps` full warps: each warp reduces itself and \
                 leaves one\npartial in `scratch`; then every warp reduces the partials, so \
                 every thread gets the result,\nin a fixed order. The last barrier lets the \
                 caller reuse `scratch`. Every thread must call it."
            ));
            w.block(
                format!("{INLINE} float fathom_block_{name}(float v, float* scratch, int warps)"),
                |w| {
                    w.line("const int lane = static_cast<int>(threadIdx.x) % 32;");
                    w.line(format!("v = fathom_team_{name}(v, 32);"));
                    w.block("if (lane == 0)", |w| {
                        w.line("scratch[threadIdx.x / 32] = v;");
                    });
                    w.line("__syncthreads();");
                    w.line(format!("v = lane < warps ? scratch[lane] : {identity};"));
                    w.line(format!("v = fathom_team_{name}(v, 32);"));
                    w.line("__syncthreads();");
                    w.line("return v;");
                },
            );
        }
    }
}
