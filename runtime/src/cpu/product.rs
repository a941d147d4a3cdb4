//! One strided GEMM on the CPU, summed as the graph asks: the `gemm` crate when the
//! accumulation is exact, Hopper's limited FP8 accumulator (`crate::fp8::LimitedSum`) when the
//! precision pass asked for it, and the bf16 kernel (`super::bf16`) for operands that hold bf16
//! values where this CPU multiplies bf16 faster than f32.

use fathom_compiler::DType;
use fathom_compiler::graph::Accumulation;
use gemm::{Parallelism, gemm};

use super::bf16;
use crate::fp8::LimitedSum;

/// How a GEMM forms and sums its products: the graph's accumulation, the narrower type both
/// operands' values belong to, if the kernel IR knows one (`exact_in`), and whether the GEMM
/// rounds its operands to that type as it reads them (`rounds`, the kernel IR's folded round
/// trips).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Arithmetic {
    pub(super) accumulation: Accumulation,
    pub(super) exact_in: Option<DType>,
    pub(super) rounds: bool,
}

impl From<Accumulation> for Arithmetic {
    fn from(accumulation: Accumulation) -> Self {
        Arithmetic {
            accumulation,
            exact_in: None,
            rounds: false,
        }
    }
}

impl Arithmetic {
    /// Whether the bf16 kernel multiplies: bf16 operands (its packing rounds them, which
    /// leaves bf16 values as they are), exact sums, and a CPU where it pays.
    pub(super) fn on_bf16_kernel(self) -> bool {
        self.exact_in == Some(DType::BF16) && self.accumulation.is_exact() && bf16::enabled()
    }

    /// The bf16 kernel's arithmetic (operands rounded to bf16 as they are read, exact sums), or
    /// `None`, said on stderr, where this CPU does not run the kernel: for the tests of what
    /// runs on it.
    #[cfg(test)]
    pub(super) fn bf16_kernel_or_skip() -> Option<Arithmetic> {
        let arithmetic = Arithmetic {
            accumulation: Accumulation::default(),
            exact_in: Some(DType::BF16),
            rounds: true,
        };
        let runs = arithmetic.on_bf16_kernel();
        if !runs {
            eprintln!("skipped: the bf16 kernel does not run on this CPU");
        }
        runs.then_some(arithmetic)
    }

    /// Whether the f32 GEMM must first round the operands (the bf16 kernel rounds as it packs).
    fn rounds_before_f32_gemm(self) -> bool {
        self.rounds && self.exact_in == Some(DType::BF16)
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
    if let Some(limited) = LimitedSum::new(arithmetic.accumulation, k) {
        // The lowering folds no rounding into a product that sums as Hopper does.
        assert!(!arithmetic.rounds, "{arithmetic:?}");
        // SAFETY: the caller's promise, passed on.
        return unsafe { limited.gemm((m, n, k), dst, lhs, rhs, parallel) };
    }
    // SAFETY (both): the caller's promise, passed on; `on_bf16_kernel` implies `supported()`.
    unsafe { exact_or_bf16((m, n, k), dst, lhs, rhs, arithmetic, false, parallelism) }
}

/// `dst (m×n) (+)= lhs (m×k) · rhs (k×n)` summed exactly: on the bf16 kernel where it runs,
/// else on the gemm crate (from rounded copies of the operands when the product rounds them).
///
/// # Safety
/// As [`multiply`].
unsafe fn exact_or_bf16(
    (m, n, k): (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    arithmetic: Arithmetic,
    add: bool,
    parallelism: Parallelism,
) {
    assert!(arithmetic.accumulation.is_exact(), "{arithmetic:?}");
    if arithmetic.on_bf16_kernel() {
        let parallel = !matches!(parallelism, Parallelism::None);
        // SAFETY: the caller's promise; `enabled()` implies `supported()`.
        return unsafe {
            bf16::multiply(
                (m, n, k),
                bf16::Output::Strided(dst),
                bf16::Matrix::Strided(lhs),
                bf16::Matrix::Strided(rhs),
                add,
                parallel,
            )
        };
    }
    if arithmetic.rounds_before_f32_gemm() {
        // SAFETY: the caller's promise: both operands lie inside their allocations.
        let (lhs, rhs) = unsafe { (rounded_copy(lhs, (m, k)), rounded_copy(rhs, (k, n))) };
        let (a, b) = ((lhs.as_ptr(), 1, k as isize), (rhs.as_ptr(), 1, n as isize));
        // SAFETY: the copies are the m×k and k×n matrices, row-major.
        return unsafe { exact((m, n, k), dst, a, b, add, parallelism) };
    }
    // SAFETY: the caller's promise, passed on.
    unsafe { exact((m, n, k), dst, lhs, rhs, add, parallelism) }
}

/// The `rows × columns` matrix `operand` describes, row-major, each value rounded to bf16 as
/// the graph's casts round (`half`: nearest, ties to even, NaN kept).
///
/// # Safety
/// Every element of the matrix lies inside its allocation.
unsafe fn rounded_copy(
    (first, column_stride, row_stride): Operand<*const f32>,
    (rows, columns): (usize, usize),
) -> Vec<f32> {
    let mut copy = Vec::with_capacity(rows * columns);
    for r in 0..rows {
        copy.extend((0..columns).map(|c| {
            // SAFETY: the caller's promise.
            let x = unsafe { *first.offset(r as isize * row_stride + c as isize * column_stride) };
            half::bf16::from_f32(x).to_f32()
        }));
    }
    copy
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
    // SAFETY: the caller's promise, passed on.
    unsafe { exact_or_bf16(shape, dst, lhs, rhs, arithmetic, true, parallelism) }
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

#[cfg(test)]
mod tests {
    use super::rounded_copy;

    /// The f32 GEMM's operands of a product that rounds them: the matrix row-major, each value
    /// rounded as the graph's casts round it (`half`), read through any strides.
    #[test]
    fn rounded_copies_are_row_major_and_rounded_like_the_casts() {
        // A 3×4 matrix stored transposed (column-major), values with low bits set.
        let stored: Vec<f32> = (0..12)
            .map(|i| f32::from_bits((1.0f32 + i as f32).to_bits() | 0x8001))
            .collect();
        // SAFETY: the 3×4 matrix with strides (3, 1) lies inside `stored`.
        let copy = unsafe { rounded_copy((stored.as_ptr(), 3, 1), (3, 4)) };
        for (r, row) in copy.chunks(4).enumerate() {
            for (c, &value) in row.iter().enumerate() {
                let want = half::bf16::from_f32(stored[c * 3 + r]).to_f32();
                assert_eq!(value.to_bits(), want.to_bits(), "({r}, {c})");
                assert_ne!(value, stored[c * 3 + r]);
            }
        }
    }
}
