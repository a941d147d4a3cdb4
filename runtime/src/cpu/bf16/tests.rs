use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fathom_compiler::graph::{MatMulPart, Triangle};

use super::pack::{bf16_bits, pair};
use super::{
    Matrix as KernelMatrix, Output, Source, compare_with_f32, multiply, multiply_triangular, pack,
    pack_operand, probe, supported,
};

/// Whether this CPU cannot run the kernel, saying that `what` is skipped.
fn unsupported_here(what: &str) -> bool {
    if !supported() {
        eprintln!("skipped {what}: this CPU has no AVX512_BF16");
    }
    !supported()
}

/// Random bf16 values in [-2, 2), held as f32.
fn bf16_values(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len)
        .map(|_| f32::from_bits(rng.random_range(-2.0f32..2.0).to_bits() & 0xffff_0000))
        .collect()
}

/// A matrix of `rows × columns` in a buffer, row-major or transposed (column-major).
struct Matrix {
    values: Vec<f32>,
    rows: usize,
    columns: usize,
    transposed: bool,
}

impl Matrix {
    fn new(rows: usize, columns: usize, transposed: bool, rng: &mut ChaCha8Rng) -> Self {
        let values = bf16_values(rows * columns, rng);
        Matrix {
            values,
            rows,
            columns,
            transposed,
        }
    }

    /// (column stride, row stride).
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (self.rows as isize, 1)
        } else {
            (1, self.columns as isize)
        }
    }

    fn at(&self, r: usize, c: usize) -> f32 {
        let (cs, rs) = self.strides();
        self.values[(r as isize * rs + c as isize * cs) as usize]
    }
}

/// Runs the kernel on `lhs · rhs` into a `m × n` output with row stride `n + 3` (a view into
/// a wider buffer whose other elements must stay untouched), starting from `initial`.
fn run(lhs: &Matrix, rhs: &Matrix, initial: f32, add: bool, parallel: bool) -> Vec<f32> {
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    let row_stride = n + 3;
    let mut out = vec![initial; m * row_stride];
    let (lcs, lrs) = lhs.strides();
    let (rcs, rrs) = rhs.strides();
    // SAFETY: every operand's shape and strides describe elements inside its vector, the
    // output aliases neither, and `supported()` was checked by the caller.
    unsafe {
        multiply(
            (m, n, k),
            Output::Strided((out.as_mut_ptr(), 1, row_stride as isize)),
            KernelMatrix::Strided((lhs.values.as_ptr(), lcs, lrs)),
            KernelMatrix::Strided((rhs.values.as_ptr(), rcs, rrs)),
            add,
            parallel,
        );
    }
    out
}

#[test]
fn pairs_put_the_first_of_two_k_elements_in_the_lower_half() {
    assert_eq!(
        pair(1.0, -2.0),
        (1.0f32.to_bits() >> 16) | ((-2.0f32).to_bits() & 0xffff_0000)
    );
    assert_eq!(pair(1.0, 0.0), 0x3f80);
}

/// Values at the edges of rounding to bf16: ties either way, carries into the exponent and
/// to infinity, NaNs (signalling and quiet, both signs), infinities, zeros, subnormals.
const EDGES: [u32; 16] = [
    0x3f80_8000, // 1 + 2⁻⁸: a tie, to even (1.0)
    0x3f81_8000, // a tie, up
    0x3f80_7fff, // just below a tie
    0x3fff_ffff, // carries into the exponent
    0x7f7f_ffff, // the largest f32: to infinity
    0xff7f_ffff,
    0x7f80_0000, // infinity
    0x7f80_0001, // signalling NaN
    0xffc0_1234, // quiet negative NaN with payload
    0x0000_0000,
    0x8000_0000,
    0x0000_8000, // subnormal tie, to even (0)
    0x0001_8000, // subnormal tie, up
    0x007f_ffff, // largest subnormal: to the smallest normal
    0x3e99_999a, // 0.3
    0xc2f6_e979, // -123.456
];

/// The packing rounds each value as the graph's casts do (`half::bf16::from_f32`), bit for
/// bit, on every path: pairs element by element, 16 × 16 blocks through registers, and rows
/// lying side by side.
#[test]
fn packing_rounds_like_the_casts() {
    let rounded = |x: f32| half::bf16::from_f32(x).to_bits() as u32;
    for bits in EDGES {
        let x = f32::from_bits(bits);
        assert_eq!(bf16_bits(x), rounded(x), "{bits:#010x}");
    }
    if unsupported_here("the vector path") {
        return;
    }
    // 20 rows of K = 70 (two blocks of 32 through registers, 3 pairs element by element), the
    // edges among random values, row-major: K contiguous along each row.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, k) = (20, 70);
    let values: Vec<f32> = (0..rows * k)
        .map(|i| match EDGES.get(i % 97) {
            Some(&bits) => f32::from_bits(bits),
            None => rng.random_range(-3.0f32..3.0),
        })
        .collect();
    let width = 32;
    let mut packed = vec![0u32; k.div_ceil(2) * width];
    let source = Source::lhs(KernelMatrix::Strided((values.as_ptr(), 1, k as isize)));
    // SAFETY: rows 0..20 of 70 elements lie in `values`; `supported()` holds.
    unsafe { pack(&mut packed, source, (0, rows), k, width) };
    let want = |i: usize, p: usize| {
        let row = &values[i * k..][..k];
        rounded(row[2 * p]) | rounded(row.get(2 * p + 1).copied().unwrap_or(0.0)) << 16
    };
    for i in 0..rows {
        for p in 0..k.div_ceil(2) {
            assert_eq!(packed[p * width + i], want(i, p), "row {i}, pair {p}");
        }
    }
    // The same rows stored side by side (K the strided axis), packed in panels of 12 by
    // masked runs of 16 lanes: 2 panels, 35 pairs (the last one half K), one task per panel.
    let side_by_side: Vec<f32> = (0..k)
        .flat_map(|kk| (0..rows).map(move |i| (i, kk)))
        .map(|(i, kk)| values[i * k + kk])
        .collect();
    let width = 12;
    let mut packed = vec![0u32; rows.div_ceil(width) * k.div_ceil(2) * width];
    let source = Source::lhs(KernelMatrix::Strided((
        side_by_side.as_ptr(),
        rows as isize,
        1,
    )));
    // SAFETY: the 20 rows of 70 elements lie in `side_by_side`; `supported()` holds.
    unsafe { pack_operand(&mut packed, source, (0..rows, k), width, true) };
    for i in 0..rows {
        for p in 0..k.div_ceil(2) {
            let at = (i / width) * k.div_ceil(2) * width + p * width + i % width;
            assert_eq!(packed[at], want(i, p), "side by side: row {i}, pair {p}");
        }
    }
}

/// A product that rounds its operands as it packs them equals, bit for bit, the product of
/// operands rounded beforehand (as the cast kernels it replaces rounded them).
#[test]
fn products_of_unrounded_operands_are_products_of_rounded_ones() {
    if unsupported_here("the kernel") {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (m, n, k) = (30, 45, 100);
    for transposed in [false, true] {
        let mut lhs = Matrix::new(m, k, transposed, &mut rng);
        let mut rhs = Matrix::new(k, n, !transposed, &mut rng);
        let round = |m: &Matrix| -> Vec<f32> {
            m.values
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        // Unrounded values: the bf16 ones with random low bits.
        for m in [&mut lhs, &mut rhs] {
            for x in &mut m.values {
                *x = f32::from_bits(x.to_bits() | rng.random_range(0..0x1_0000u32));
            }
        }
        let unrounded = run(&lhs, &rhs, 0.0, false, true);
        (lhs.values, rhs.values) = (round(&lhs), round(&rhs));
        let rounded = run(&lhs, &rhs, 0.0, false, true);
        assert!(
            unrounded
                .iter()
                .zip(&rounded)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())),
            "transposed {transposed}"
        );
    }
}

/// Each sum is the exact f64 one within the bound of sequential f32 summation, `k · 2⁻²⁴ ·
/// Σ|a·b|` (the products of bf16 values are exact in f32; only the sums round), across edge
/// tiles, odd K, transposed operands, a strided output, overwriting and adding.
#[test]
fn products_match_exact_sums_at_every_shape_and_layout() {
    if unsupported_here("the kernel") {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let shapes = [
        (1, 1, 1),
        (12, 32, 2),
        (13, 33, 3),
        (25, 70, 129),
        (100, 17, 64),
        (7, 300, 40),
    ];
    for (m, n, k) in shapes {
        for (lhs_t, rhs_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let lhs = Matrix::new(m, k, lhs_t, &mut rng);
            let rhs = Matrix::new(k, n, rhs_t, &mut rng);
            for add in [false, true] {
                let initial = 0.75;
                let out = run(&lhs, &rhs, initial, add, true);
                for r in 0..m {
                    for c in 0..n + 3 {
                        let got = out[r * (n + 3) + c];
                        if c >= n {
                            assert_eq!(got, initial, "({m},{n},{k}) wrote past the view");
                            continue;
                        }
                        let products = (0..k).map(|i| lhs.at(r, i) as f64 * rhs.at(i, c) as f64);
                        let exact: f64 =
                            products.clone().sum::<f64>() + if add { initial as f64 } else { 0.0 };
                        let magnitude: f64 = products.map(f64::abs).sum::<f64>() + 1.0;
                        let bound = (k + 1) as f64 * f64::powi(2.0, -24) * magnitude;
                        assert!(
                            (got as f64 - exact).abs() <= bound,
                            "({m},{n},{k}) lhsᵀ {lhs_t} rhsᵀ {rhs_t} add {add} at ({r},{c}): \
                             {got} vs {exact} (bound {bound:e})"
                        );
                    }
                }
            }
        }
    }
}

/// A triangular product's kept elements are the exact sums over the kept K (within the same
/// bound), for both parts the kernel takes and both triangles, at shapes that are not whole
/// tiles, with K shorter and longer than the rows and transposed operands; nothing outside
/// the output view is written.
#[test]
fn triangular_products_match_exact_sums_of_the_kept_terms() {
    if unsupported_here("the kernel") {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (m, n, k) in [(1, 1, 1), (29, 45, 300), (150, 37, 61), (40, 40, 40)] {
        let lhs = Matrix::new(m, k, true, &mut rng);
        let rhs = Matrix::new(k, n, false, &mut rng);
        for part in [MatMulPart::Left, MatMulPart::Output] {
            for triangle in [Triangle::Lower, Triangle::Upper] {
                let row_stride = n + 3;
                let mut out = vec![f32::NAN; m * row_stride];
                let (lcs, lrs) = lhs.strides();
                let (rcs, rrs) = rhs.strides();
                // SAFETY: as in `run`.
                unsafe {
                    multiply_triangular(
                        (m, n, k),
                        (out.as_mut_ptr(), 1, row_stride as isize),
                        (lhs.values.as_ptr(), lcs, lrs),
                        (rhs.values.as_ptr(), rcs, rrs),
                        (part, triangle),
                    );
                }
                let at = format!("({m},{n},{k}) {part:?} {triangle:?}");
                for (r, row) in out.chunks(row_stride).enumerate() {
                    assert!(
                        row[n..].iter().all(|v| v.is_nan()),
                        "{at} wrote past the view"
                    );
                    for (c, &got) in row[..n].iter().enumerate() {
                        if part == MatMulPart::Output && !triangle.keeps(r, c) {
                            continue;
                        }
                        let kept =
                            (0..k).filter(|&i| part != MatMulPart::Left || triangle.keeps(r, i));
                        let products = kept.map(|i| lhs.at(r, i) as f64 * rhs.at(i, c) as f64);
                        let exact: f64 = products.clone().sum();
                        let magnitude: f64 = products.map(f64::abs).sum::<f64>();
                        let bound = k as f64 * f64::powi(2.0, -24) * magnitude;
                        assert!(
                            (got as f64 - exact).abs() <= bound,
                            "{at} at ({r},{c}): {got} vs {exact} (bound {bound:e})"
                        );
                    }
                }
            }
        }
    }
}

/// Every output element is one sequential sum over K, so threads change nothing.
#[test]
fn results_are_bit_identical_with_and_without_threads() {
    if unsupported_here("the kernel") {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (lhs, rhs) = (
        Matrix::new(200, 96, false, &mut rng),
        Matrix::new(96, 130, true, &mut rng),
    );
    let parallel = run(&lhs, &rhs, 0.0, false, true);
    let serial = run(&lhs, &rhs, 0.0, false, false);
    assert!(
        parallel
            .iter()
            .zip(&serial)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

/// The probe measures a real ratio: both instructions run, so it is finite and positive (its
/// value is the CPU's: about 2 on AMD Zen 4, about 0.5 on Intel Emerald Rapids).
#[test]
fn the_probe_measures_a_finite_ratio() {
    if unsupported_here("the kernel") {
        return;
    }
    let ratio = probe::bf16_flops_over_f32();
    eprintln!("vdpbf16ps / vfmadd231ps FLOP rate: {ratio:.2}");
    assert!(
        ratio.is_finite() && ratio > 0.1 && ratio < 10.0,
        "ratio {ratio}"
    );
}

/// The bench's side-by-side timing runs both GEMMs (its figures are the CPU's).
#[test]
fn the_comparison_times_both_gemms() {
    match compare_with_f32((64, 96, 130)) {
        Some((f32_rate, bf16_rate)) => assert!(f32_rate > 0.0 && bf16_rate > 0.0),
        None => assert!(!supported()),
    }
}
