//! Triangular GEMMs (`Library::MatMul` with `triangular`) in blocks of rows that skip the
//! products of zeros: for a lower-triangular result, row block `[r0, r1)` computes columns
//! `..r1` only; for a lower-triangular left operand, it multiplies by rows `..r1` of the right
//! one. A right triangular operand is the left one of the transposed product (the caller swaps
//! the operands), so only the left operand and the result are here. On a 256-row causal
//! product the blocks skip a quarter of the work (a result triangle, 128-row blocks) or 44% (a
//! left one, 32-row blocks); the CUDA template computes every tile.

use fathom_compiler::graph::{MatMulPart, Triangle};
use gemm::Parallelism;

use super::product::{Arithmetic, Operand, multiply, multiply_add};

/// Rows per block. Smaller blocks skip more zeros (a 256-row square does 10/16 of its work at
/// 64 rows, 36/64 at 32) but make smaller GEMMs, and the `gemm` crate repacks the shared
/// operand for each: measured single-threaded at the small model's per-head shapes (µs, whole
/// product → 128 / 64 / 32-row blocks), S = QKᵀ 256×256×96 (a result triangle) 88 → 72 / 78 /
/// 87, O = PV 256×64×256 (a left one) 52 → 43 / 36–40 / 31.
fn block_rows(part: MatMulPart) -> usize {
    match part {
        MatMulPart::Output => 128,
        _ => 32,
    }
}

/// How many row blocks an `m`-row product with a triangular `part` has: one where the bf16
/// kernel computes it, skipping zeros tile by tile within the whole matrix.
pub(super) fn blocks(m: usize, part: MatMulPart, arithmetic: Arithmetic) -> usize {
    if arithmetic.on_bf16_kernel() {
        1
    } else {
        m.div_ceil(block_rows(part))
    }
}

/// Row block `index` (of [`blocks`]) of `dst (m×n) = T(lhs) · rhs` (`part` Left) or
/// `T(lhs · rhs)` (Output), single-threaded.
///
/// # Safety
/// As [`multiply`]: every element the operands' pointers, strides and shapes describe is inside
/// its allocation, `dst` writable and aliasing neither operand; different blocks write
/// different rows of `dst`.
pub(super) unsafe fn row_block(
    index: usize,
    (m, n, k): (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    (part, triangle): (MatMulPart, Triangle),
    arithmetic: Arithmetic,
) {
    if arithmetic.on_bf16_kernel() {
        assert_eq!(index, 0, "the bf16 kernel computes the whole product");
        // SAFETY: the caller's promise, passed on; `enabled()` implies `supported()`, and the
        // operands hold bf16 values as the kernel IR says.
        unsafe {
            super::bf16::multiply_triangular((m, n, k), dst, lhs, rhs, (part, triangle));
            if part == MatMulPart::Output {
                zero_outside(dst, (0, m), n, triangle);
            }
        }
        return;
    }
    let rows_per_block = block_rows(part);
    let (r0, r1) = (
        index * rows_per_block,
        ((index + 1) * rows_per_block).min(m),
    );
    let rows = r1 - r0;
    let serial = Parallelism::None;
    // SAFETY (every access below): the regions are inside the m×k, k×n and m×n matrices the
    // caller promised, and rows r0..r1 of `dst` are this block's.
    unsafe {
        let out = |j: usize| (dst.0.offset(position(dst, r0, j)), dst.1, dst.2);
        let left = |p: usize| (lhs.0.offset(position(lhs, r0, p)), lhs.1, lhs.2);
        let right = |p: usize, j: usize| (rhs.0.offset(position(rhs, p, j)), rhs.1, rhs.2);
        if part == MatMulPart::Output {
            let (c0, c1) = match triangle {
                Triangle::Lower => (0, r1.min(n)),
                Triangle::Upper => (r0.min(n), n),
            };
            if c0 < c1 {
                let shape = (rows, c1 - c0, k);
                multiply(shape, out(c0), left(0), right(0, c0), arithmetic, serial);
            }
            zero_outside(dst, (r0, r1), n, triangle);
            return;
        }
        if !arithmetic.accumulation.is_exact() {
            // Hopper's limited accumulation promotes every so many products counted from the
            // first: one product over all of K, from a masked copy of the rows.
            let masked = masked_rows(lhs, (r0, r1), (0, k), triangle);
            let copy = (masked.as_ptr(), 1, k as isize);
            multiply((rows, n, k), out(0), copy, right(0, 0), arithmetic, serial);
            return;
        }
        // The rows' span of the diagonal is partly kept and is multiplied from a masked copy;
        // the rest of the kept span (before it for a lower triangle, after it for an upper
        // one) is kept whole and read where it lies.
        let (d0, d1) = (r0.min(k), r1.min(k));
        let (f0, f1) = match triangle {
            Triangle::Lower => (0, d0),
            Triangle::Upper => (d1, k),
        };
        if f0 < f1 {
            multiply(
                (rows, n, f1 - f0),
                out(0),
                left(f0),
                right(f0, 0),
                arithmetic,
                serial,
            );
        }
        if d0 < d1 {
            let masked = masked_rows(lhs, (r0, r1), (d0, d1), triangle);
            let copy = (masked.as_ptr(), 1, (d1 - d0) as isize);
            let shape = (rows, n, d1 - d0);
            if f0 < f1 {
                multiply_add(shape, out(0), copy, right(d0, 0), arithmetic, serial);
            } else {
                multiply(shape, out(0), copy, right(d0, 0), arithmetic, serial);
            }
        }
        if f0 >= f1 && d0 >= d1 {
            // No kept element in these rows (an upper triangle past K).
            for i in r0..r1 {
                zero_span(dst, i, (0, n));
            }
        }
    }
}

/// Where element (row, col) of a matrix operand lies, in elements from its first.
fn position<P>((_, col_stride, row_stride): Operand<P>, row: usize, col: usize) -> isize {
    row as isize * row_stride + col as isize * col_stride
}

/// Rows `r0..r1`, columns `p0..p1` of the left operand, row-major, with zeros outside
/// `triangle`.
///
/// # Safety
/// The region is inside the matrix.
unsafe fn masked_rows(
    lhs: Operand<*const f32>,
    (r0, r1): (usize, usize),
    (p0, p1): (usize, usize),
    triangle: Triangle,
) -> Vec<f32> {
    let mut copy = Vec::with_capacity((r1 - r0) * (p1 - p0));
    for i in r0..r1 {
        copy.extend((p0..p1).map(|p| match triangle.keeps(i, p) {
            // SAFETY: the caller's promise.
            true => unsafe { *lhs.0.offset(position(lhs, i, p)) },
            false => 0.0,
        }));
    }
    copy
}

/// Writes zeros outside `triangle` in rows `r0..r1` of an `n`-column result.
///
/// # Safety
/// The rows are inside the matrix.
unsafe fn zero_outside(
    dst: Operand<*mut f32>,
    (r0, r1): (usize, usize),
    n: usize,
    triangle: Triangle,
) {
    for i in r0..r1 {
        let span = match triangle {
            Triangle::Lower => ((i + 1).min(n), n),
            Triangle::Upper => (0, i.min(n)),
        };
        // SAFETY: the caller's promise.
        unsafe { zero_span(dst, i, span) };
    }
}

/// Writes zeros in columns `j0..j1` of row `i`.
///
/// # Safety
/// The span is inside the matrix.
unsafe fn zero_span(dst: Operand<*mut f32>, i: usize, (j0, j1): (usize, usize)) {
    if j0 >= j1 {
        return;
    }
    // SAFETY: the caller's promise.
    unsafe {
        let first = dst.0.offset(position(dst, i, j0));
        if dst.1 == 1 {
            std::slice::from_raw_parts_mut(first, j1 - j0).fill(0.0);
        } else {
            for j in 0..j1 - j0 {
                *first.offset(j as isize * dst.1) = 0.0;
            }
        }
    }
}
