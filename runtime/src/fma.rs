//! Arithmetic written with `f32::mul_add` compiled for the CPU's fused multiply-add
//! instruction where it has one. Without the instruction enabled at compile time, each
//! `mul_add` is a call to `fmaf` (correctly rounded, so the same bits, but a call per operation,
//! which also keeps the loop around it scalar); the baseline x86-64 target does not enable it.

/// `f()`, run as code compiled with FMA enabled when the CPU has it (checked once, cached by the
/// standard library), else as it is. `f` is inlined into the FMA-enabled copy, so the `mul_add`s
/// it reaches through inlined calls become `vfmadd` instructions.
#[inline(always)]
pub(crate) fn with_fma<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above).
        return unsafe { fma_enabled(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn fma_enabled<R>(f: impl FnOnce() -> R) -> R {
    f()
}
