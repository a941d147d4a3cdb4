//! One strided GEMM on the CPU, summed as the graph asks: the `gemm` crate when the
//! accumulation is exact, Hopper's limited FP8 accumulator (`crate::fp8::LimitedSum`) when the
//! precision pass asked for it, and the bf16 kernel (`super::bf16`) for operands that hold bf16
//! values where this CPU multiplies bf16 faster than f32.

use fathom_compiler::DType;
use fathom_compiler::graph::Accumulation;
use gemm::{Parallelism, gemm};

use super::bf16;
use crate::fp8::LimitedSum;

/// How a GEMM forms and sums its products: the graph's accumulation, and the narrower type
/// both operands' values belong to, if the kernel IR knows one (`exact_in`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Arithmetic {
    pub(super) accumulation: Accumulation,
    pub(super) exact_in: Option<DType>,
}

impl From<Accumulation> for Arithmetic {
    fn from(accumulation: Accumulation) -> Self {
        Arithmetic {
            accumulation,
            exact_in: None,
        }
    }
}

/// A matrix operand: its first element, then the element strides between columns and rows.
pub(super) type Operand<P> = (P, isize, isize);

/// `dst (m×n) = lhs (m×k) · rhs (k×n)`, overwriting `dst`.
///
/// # Safety
/// Every element each operand's pointer, strides and shape describe must be inside its
/// allocation (`dst` writable), and `dst` must alias neither operand.
pub(super) unsafe fn multiply(
    (m, n, k): (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    arithmetic: Arithmetic,
    parallelism: Parallelism,
) {
    let parallel = !matches!(parallelism, Parallelism::None);
    match LimitedSum::new(arithmetic.accumulation, k) {
        // SAFETY: the caller's promise, passed on.
        Some(limited) => unsafe { limited.gemm((m, n, k), dst, lhs, rhs, parallel) },
        // SAFETY: the caller's promise, passed on; `enabled()` implies `supported()`, and the
        // operands hold bf16 values as the kernel IR says.
        None if arithmetic.exact_in == Some(DType::BF16) && bf16::enabled() => unsafe {
            bf16::multiply((m, n, k), dst, lhs, rhs, false, parallel)
        },
        // SAFETY: the caller's promise, passed on.
        None => unsafe { exact((m, n, k), dst, lhs, rhs, false, parallelism) },
    }
}

/// `dst (m×n) += lhs (m×k) · rhs (k×n)`, for an exact accumulation only (Hopper's limited
/// one promotes every so many products counted from the first, which a sum in two parts
/// would restart).
///
/// # Safety
/// As [`multiply`].
pub(super) unsafe fn multiply_add(
    shape: (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    arithmetic: Arithmetic,
    parallelism: Parallelism,
) {
    assert!(arithmetic.accumulation.is_exact(), "{arithmetic:?}");
    if arithmetic.exact_in == Some(DType::BF16) && bf16::enabled() {
        let parallel = !matches!(parallelism, Parallelism::None);
        // SAFETY: as in `multiply`.
        return unsafe { bf16::multiply(shape, dst, lhs, rhs, true, parallel) };
    }
    // SAFETY: the caller's promise, passed on.
    unsafe { exact(shape, dst, lhs, rhs, true, parallelism) }
}

/// The gemm crate's product, added to `dst` or overwriting it (alpha 0 with read_dst false).
///
/// # Safety
/// As [`multiply`].
unsafe fn exact(
    (m, n, k): (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    add: bool,
    parallelism: Parallelism,
) {
    let alpha = if add { 1.0 } else { 0.0 };
    // SAFETY: the caller's promise, passed on.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.0,
            dst.1,
            dst.2,
            add,
            lhs.0,
            lhs.1,
            lhs.2,
            rhs.0,
            rhs.1,
            rhs.2,
            alpha,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
