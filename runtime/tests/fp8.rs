//! FP8 numerics against independent oracles: the OCP OFP8 formulas and a brute-force nearest
//! value search (written here, from the definitions), the `float8` and `half` crates (which
//! matched CUDA's saturating conversion bit for bit), and the interpreter's `round_to_dtype`.
//! Then quantization's exact properties and the FP8 GEMM emulation against BF16 and f64.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use fathom_compiler::DType;
use fathom_runtime::fp8::experiment::{
    Distribution, Outliers, accumulation_row, random_matrix, scaling_diffs,
};
use fathom_runtime::fp8::{
    Accumulator, Fp8Error, Fp8Format, GemmConfig, Overflow, QuantizedTensor, ScaleRounding,
    TileLayout, bf16_gemm, bf16_to_f32, calc_diff, f32_to_bf16, fake_quantize, fp8_gemm,
    quantize_activations, quantize_activations_transposed, quantize_per_tensor, quantize_tiles,
    quantize_weights, tile_scale,
};
use fathom_runtime::interp::round_to_dtype;
use float8::{F8E4M3, F8E5M2};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

fn dtype(format: Fp8Format) -> DType {
    match format {
        Fp8Format::E4M3 => DType::F8E4M3,
        Fp8Format::E5M2 => DType::F8E5M2,
    }
}

/// The crate's saturating conversion, the one CUDA's `__NV_SATFINITE` matched.
fn crate_encode(format: Fp8Format, x: f32) -> u8 {
    match format {
        Fp8Format::E4M3 => F8E4M3::from_f32(x).to_bits(),
        Fp8Format::E5M2 => F8E5M2::from_f32(x).to_bits(),
    }
}

fn crate_decode(format: Fp8Format, code: u8) -> f32 {
    match format {
        Fp8Format::E4M3 => F8E4M3::from_bits(code).to_f32(),
        Fp8Format::E5M2 => F8E5M2::from_bits(code).to_f32(),
    }
}

/// What OFP8 v1.0 says a code is, computed from the formula: `None` for NaN.
fn spec_value(format: Fp8Format, code: u8) -> Option<f64> {
    let (ebits, mbits, bias) = match format {
        Fp8Format::E4M3 => (4, 3, 7),
        Fp8Format::E5M2 => (5, 2, 15),
    };
    let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((code >> mbits) & ((1 << ebits) - 1));
    let m = f64::from(code & ((1 << mbits) - 1));
    let top = (1 << ebits) - 1;
    let frac = m / f64::from(1 << mbits);
    match format {
        Fp8Format::E4M3 if e == top && m == 7.0 => None,
        Fp8Format::E5M2 if e == top && m != 0.0 => None,
        Fp8Format::E5M2 if e == top => Some(s * f64::INFINITY),
        _ if e == 0 => Some(s * 2f64.powi(1 - bias) * frac),
        _ => Some(s * 2f64.powi(e - bias) * (1.0 + frac)),
    }
}

/// The positive finite values in code order, plus the first value beyond the largest finite
/// one (480 for E4M3, 2^16 for E5M2), which rounding may reach and overflow handles.
fn grid(format: Fp8Format) -> Vec<f64> {
    let mut values: Vec<f64> = (0..=format.max_finite_code())
        .map(|c| spec_value(format, c).unwrap())
        .collect();
    let last = values[values.len() - 1];
    values.push(last + (last - values[values.len() - 2]));
    assert!(values.windows(2).all(|w| w[0] < w[1]), "codes order values");
    values
}

/// The nearest grid value to finite `x` by search, ties to the even code: independent of the
/// bit manipulation under test.
fn oracle_encode(format: Fp8Format, grid: &[f64], x: impl Into<f64>, overflow: Overflow) -> u8 {
    let x: f64 = x.into();
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let i = grid.partition_point(|&v| v < a);
    let code = if i == 0 {
        0
    } else if i == grid.len() {
        grid.len() - 1
    } else {
        // Midpoints of FP8 values have 5 significant bits: exact in f64.
        let mid = (grid[i - 1] + grid[i]) / 2.0;
        match a.partial_cmp(&mid).unwrap() {
            std::cmp::Ordering::Less => i - 1,
            std::cmp::Ordering::Greater => i,
            std::cmp::Ordering::Equal => (i - 1) + (i - 1) % 2,
        }
    };
    if code == grid.len() - 1 {
        // Beyond the largest finite value.
        return sign
            | match (overflow, format) {
                (Overflow::Saturate, _) => format.max_finite_code(),
                (Overflow::NonSaturating, Fp8Format::E4M3) => 0x7F, // NaN
                (Overflow::NonSaturating, Fp8Format::E5M2) => 0x7C, // infinity
            };
    }
    sign | code as u8
}

#[test]
fn every_code_decodes_as_the_spec_formula() {
    for format in FORMATS {
        let mut nans = 0;
        for code in 0..=255u8 {
            let ours = format.decode(code);
            let theirs = crate_decode(format, code);
            match spec_value(format, code) {
                None => {
                    nans += 1;
                    assert!(
                        ours.is_nan() && format.is_nan_code(code),
                        "{format:?} {code:#04x}"
                    );
                    assert_eq!(
                        ours.is_sign_negative(),
                        code & 0x80 != 0,
                        "NaN keeps its sign"
                    );
                    assert!(theirs.is_nan());
                }
                Some(v) => {
                    assert_eq!(
                        ours.to_bits(),
                        (v as f32).to_bits(),
                        "{format:?} {code:#04x}"
                    );
                    assert_eq!(
                        theirs.to_bits(),
                        ours.to_bits(),
                        "float8 {format:?} {code:#04x}"
                    );
                }
            }
        }
        assert_eq!(nans, if format == Fp8Format::E4M3 { 2 } else { 6 });
        assert_eq!(format.decode(format.max_finite_code()), format.max_finite());
    }
}

#[test]
fn every_code_encodes_back_to_itself() {
    for format in FORMATS {
        for overflow in [Overflow::Saturate, Overflow::NonSaturating] {
            for code in 0..=255u8 {
                let v = format.decode(code);
                let expected = match (format, code & 0x7F, overflow) {
                    // NaN payloads: E5M2's signalling NaNs come back quiet.
                    (Fp8Format::E5M2, 0x7D, _) => code | 0x7F,
                    // Infinities saturate to the largest finite value.
                    (Fp8Format::E5M2, 0x7C, Overflow::Saturate) => (code & 0x80) | 0x7B,
                    _ => code,
                };
                assert_eq!(
                    format.encode(v, overflow),
                    expected,
                    "{format:?} {code:#04x}"
                );
                let v64 = f64::from(v);
                assert_eq!(
                    format.encode_f64(v64, overflow),
                    expected,
                    "f64 {code:#04x}"
                );
            }
        }
    }
}

#[test]
fn midpoints_round_to_the_even_code() {
    for format in FORMATS {
        for code in 0..format.max_finite_code() {
            let (lo, hi) = (format.decode(code), format.decode(code + 1));
            let mid = (lo + hi) / 2.0; // 5 significant bits: exact in f32
            let even = if code % 2 == 0 { code } else { code + 1 };
            for (x, expected) in [
                (mid, even),
                (mid.next_down(), code),
                (mid.next_up(), code + 1),
            ] {
                for sign in [1.0f32, -1.0] {
                    let want = expected | if sign < 0.0 { 0x80 } else { 0 };
                    let x = sign * x;
                    assert_eq!(
                        format.encode(x, Overflow::Saturate),
                        want,
                        "{format:?} {x:e}"
                    );
                    assert_eq!(format.encode_f64(x.into(), Overflow::Saturate), want);
                    assert_eq!(crate_encode(format, x), want, "float8 {format:?} {x:e}");
                }
            }
        }
    }
    // Beyond the largest finite value: E4M3's midpoint 464 ties to 448 (its code is even);
    // E5M2's midpoint 61440 ties to the code above 57344, which is infinity.
    let e4m3 = Fp8Format::E4M3;
    assert_eq!(e4m3.encode(464.0, Overflow::NonSaturating), 0x7E);
    assert_eq!(e4m3.encode(464f32.next_up(), Overflow::NonSaturating), 0x7F);
    assert_eq!(e4m3.encode(464f32.next_up(), Overflow::Saturate), 0x7E);
    let e5m2 = Fp8Format::E5M2;
    assert_eq!(e5m2.encode(61440.0, Overflow::NonSaturating), 0x7C);
    assert_eq!(
        e5m2.encode(61440f32.next_down(), Overflow::NonSaturating),
        0x7B
    );
    assert_eq!(e5m2.encode(-61440.0, Overflow::Saturate), 0xFB);
}

#[test]
fn bf16_codes_round_trip_and_midpoints_round_to_even() {
    for code in 0..=u16::MAX {
        let v = bf16_to_f32(code);
        if code & 0x7FFF > 0x7F80 {
            assert!(v.is_nan());
            assert_eq!(f32_to_bf16(v), code | 0x40, "NaN comes back quiet");
            continue;
        }
        assert_eq!(v.to_bits(), u32::from(code) << 16);
        assert_eq!(f32_to_bf16(v), code);
        if code & 0x7FFF < 0x7F80 {
            // The midpoint between this code and the next (the last one's next is infinity).
            let mid = f32::from_bits(v.to_bits() | 0x8000);
            let even = if code % 2 == 0 { code } else { code + 1 };
            assert_eq!(f32_to_bf16(mid), even, "{code:#06x}");
            assert_eq!(bf16::from_f32(mid).to_bits(), even, "half {code:#06x}");
        }
    }
}

/// f32 samples: raw bit patterns (every exponent equally), exponents in the FP8 range with
/// random mantissas, and FP8 midpoints nudged by a few f32 ulps.
fn f32_samples(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = edge_cases();
    while out.len() < count {
        let x = match rng.random_range(0..3) {
            0 => f32::from_bits(rng.random()),
            1 => {
                let exp = rng.random_range(127 - 30..=127 + 20u32);
                let bits = (rng.random::<u32>() & 0x807F_FFFF) | (exp << 23);
                f32::from_bits(bits)
            }
            _ => {
                let format = FORMATS[rng.random_range(0..2)];
                let code = rng.random_range(0..format.max_finite_code());
                let mid = (format.decode(code) + format.decode(code + 1)) / 2.0;
                let nudged = (mid.to_bits() as i64 + rng.random_range(-3..=3i64)) as u32;
                f32::from_bits(nudged | (rng.random::<u32>() & 0x8000_0000))
            }
        };
        out.push(x);
    }
    out
}

fn edge_cases() -> Vec<f32> {
    // ±0, f32's extreme subnormals and normals, infinities, NaNs (quiet, signalling, negative,
    // with payloads), and the points just past E4M3's and E5M2's largest values.
    #[rustfmt::skip]
    let bits = [
        0x0000_0000, 0x8000_0000, 0x0000_0001, 0x007F_FFFF, 0x0080_0000, 0x7F7F_FFFF, 0x7F80_0000,
        0xFF80_0000, 0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0xFFA0_0000, 0x7FE0_0000,
    ];
    let mut v: Vec<f32> = bits.map(f32::from_bits).into();
    v.extend([464.0, 480.0, 61440.0, 65536.0]);
    for format in FORMATS {
        let max = format.max_finite();
        let min_sub = format.decode(1);
        let min_normal = format.decode(1 << format.mantissa_bits());
        for x in [max, min_sub, min_sub / 2.0, min_normal, min_normal / 2.0] {
            v.extend([x, x.next_up(), x.next_down()]);
        }
    }
    for e in -40..=40 {
        v.push(2f32.powi(e));
    }
    let negatives: Vec<f32> = v.iter().map(|x| -x).collect();
    v.extend(negatives);
    v
}

#[test]
fn random_f32_agree_with_float8_half_oracle_and_interpreter() {
    let grids = FORMATS.map(grid);
    // Every mismatch is collected, so a failure lists them all (a finding to report).
    let mut mismatches = Vec::new();
    macro_rules! check {
        ($ok:expr, $($message:tt)*) => {
            if !$ok {
                mismatches.push(format!($($message)*));
            }
        };
    }
    for x in f32_samples(2_000_000, 8) {
        for (&format, grid) in FORMATS.iter().zip(&grids) {
            let ours = format.encode(x, Overflow::Saturate);
            let float8 = crate_encode(format, x);
            check!(
                ours == float8,
                "{format:?}({x:e}): {ours:#04x} vs float8 {float8:#04x}"
            );
            for overflow in [Overflow::Saturate, Overflow::NonSaturating] {
                let ours = format.encode(x, overflow);
                let oracle = oracle_encode(format, grid, x, overflow);
                let same = x.is_nan() || ours == oracle;
                check!(
                    same,
                    "{format:?} {overflow:?}({x:e}): {ours:#04x} vs oracle {oracle:#04x}"
                );
            }
            let (rounded, interp) = (format.decode(ours), round_to_dtype(dtype(format), x));
            let same =
                rounded.to_bits() == interp.to_bits() || (rounded.is_nan() && interp.is_nan());
            check!(
                same,
                "{format:?}({x:e}): {rounded:e} vs interpreter {interp:e}"
            );
        }
        let (ours, half) = (f32_to_bf16(x), bf16::from_f32(x).to_bits());
        check!(ours == half, "bf16({x:e}): {ours:#06x} vs half {half:#06x}");
        let (rounded, interp) = (bf16_to_f32(ours), round_to_dtype(DType::BF16, x));
        let same = rounded.to_bits() == interp.to_bits();
        check!(same, "bf16({x:e}): {rounded:e} vs interpreter {interp:e}");
    }
    let shown = &mismatches[..mismatches.len().min(10)];
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first: {shown:#?}",
        mismatches.len()
    );
}

#[test]
fn random_f64_agree_with_float8_and_oracle() {
    let grids = FORMATS.map(grid);
    let mut rng = ChaCha8Rng::seed_from_u64(64);
    for _ in 0..200_000 {
        let exp = rng.random_range(1023 - 30..=1023 + 20u64);
        let x = f64::from_bits((rng.random::<u64>() & 0x800F_FFFF_FFFF_FFFF) | (exp << 52));
        for (format, grid) in FORMATS.iter().zip(&grids) {
            let ours = format.encode_f64(x, Overflow::Saturate);
            let theirs = match format {
                Fp8Format::E4M3 => F8E4M3::from_f64(x).to_bits(),
                Fp8Format::E5M2 => F8E5M2::from_f64(x).to_bits(),
            };
            assert_eq!(ours, theirs, "{format:?}({x:e})");
            assert_eq!(ours, oracle_encode(*format, grid, x, Overflow::Saturate));
        }
    }
}

// ---- quantization ----

#[test]
fn quantizes_a_small_tile_exactly() {
    let x = [1.0, -2.0, 0.5, 0.0, 3.0, 0.1];
    // Power-of-two scale: 2/448 rounds up to 2^-7, so the quotients are exact: 128, -256, 64, 0.
    let q = quantize_activations(&x, 1, 6, 4, ScaleRounding::PowerOfTwo).unwrap();
    assert_eq!(q.scales()[0], 2f32.powi(-7));
    assert_eq!(&q.codes()[..4], &[0x70, 0xF8, 0x68, 0x00]);
    // Exact scale: the partial tile [3.0, 0.1] maps 3.0 to 448 and 0.1 to 14.93 -> 15.
    let q = quantize_activations(&x, 1, 6, 4, ScaleRounding::Exact).unwrap();
    assert_eq!(q.scales(), &[2.0 / 448.0, 3.0 / 448.0]);
    assert_eq!(&q.codes()[4..], &[0x7E, 0x57]);
    assert_eq!(Fp8Format::E4M3.decode(0x57), 15.0);
}

#[test]
fn small_and_zero_tiles_use_the_amax_floor() {
    let floor = 1e-4f32 / 448.0;
    let q = quantize_weights(&[0.0; 16], 4, 4, 2, ScaleRounding::Exact).unwrap();
    assert!(q.scales().iter().all(|&s| s == floor));
    assert!(q.codes().iter().all(|&c| c == 0));
    let q = quantize_per_tensor(&[1e-6, -0.0], 1, 2, ScaleRounding::Exact).unwrap();
    assert_eq!(q.scales(), &[floor]);
    assert_eq!(q.codes(), &[0x49, 0x80]); // 1e-6 / scale = 4.48 -> 4.5; -0 keeps its sign
    let pow2 = tile_scale(0.0, ScaleRounding::PowerOfTwo);
    assert_eq!(pow2, 2f32.powi(-22));
}

#[test]
fn power_of_two_scales_bound_the_exact_scale() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..10_000 {
        let amax = f32::from_bits(rng.random_range(0x3000_0000..0x5000_0000u32));
        let amax = if rng.random_bool(0.1) {
            2f32.powi(rng.random_range(-20..20)) * 448.0
        } else {
            amax
        };
        let exact = tile_scale(amax, ScaleRounding::Exact);
        let pow2 = tile_scale(amax, ScaleRounding::PowerOfTwo);
        assert_eq!(pow2.to_bits() & 0x7F_FFFF, 0, "{pow2:e} is a power of two");
        assert!(
            pow2 >= exact && pow2 < 2.0 * exact,
            "{amax:e}: {exact:e} <= {pow2:e}"
        );
    }
}

/// The gap from |v| to the next larger E4M3 magnitude.
fn e4m3_spacing_above(code: u8) -> f64 {
    let exp_field = i32::from((code & 0x7F) >> 3);
    2f64.powi(exp_field.max(1) - 7 - 3)
}

#[test]
fn round_trip_error_is_at_most_half_a_spacing() {
    let (rows, cols) = (7, 300);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| {
            rng.random::<f32>()
                * 2f32.powi(rng.random_range(-12..12))
                * if i % 3 == 0 { -1.0 } else { 1.0 }
        })
        .collect();
    for rounding in [ScaleRounding::Exact, ScaleRounding::PowerOfTwo] {
        let q = quantize_tiles(&x, rows, cols, 2, 128, rounding).unwrap();
        assert_eq!(q.layout().tile_grid(), (4, 3));
        let deq = q.dequantize();
        for r in 0..rows {
            for c in 0..cols {
                let code = q.codes()[r * cols + c];
                let scale = f64::from(q.scale_at(r, c));
                let err = (f64::from(x[r * cols + c]) - q.value(r, c)).abs();
                assert!(
                    err <= 0.5 * e4m3_spacing_above(code) * scale,
                    "({r}, {c}) {rounding:?}"
                );
                assert_eq!(deq[r * cols + c], q.value(r, c) as f32);
            }
        }
    }
    // With exact scales, each tile's max-abs element lands on ±448.
    let q = quantize_tiles(&x, rows, cols, 2, 128, ScaleRounding::Exact).unwrap();
    let mut amax_index: Vec<Option<usize>> = vec![None; q.scales().len()];
    for (i, v) in x.iter().enumerate() {
        let tile = q.layout().scale_index(i / cols, i % cols);
        match amax_index[tile] {
            Some(j) if x[j].abs() >= v.abs() => {}
            _ => amax_index[tile] = Some(i),
        }
    }
    for i in amax_index.into_iter().flatten() {
        assert_eq!(q.codes()[i] & 0x7F, 0x7E, "element {i}");
    }
}

#[test]
fn transposed_quantization_tiles_the_other_axis() {
    let (rows, cols) = (300, 5);
    let x = random_matrix(rows, cols, Distribution::Normal, 9);
    let q = quantize_activations_transposed(&x, rows, cols, 128, ScaleRounding::Exact).unwrap();
    let mut t = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    assert_eq!(
        q,
        quantize_activations(&t, cols, rows, 128, ScaleRounding::Exact).unwrap()
    );
    assert_eq!(q.layout(), TileLayout::new(cols, rows, 1, 128).unwrap());
    let mut bad = x.clone();
    bad[4 * cols + 2] = f32::NAN;
    let err = quantize_activations_transposed(&bad, rows, cols, 128, ScaleRounding::Exact);
    assert!(
        matches!(err, Err(Fp8Error::NonFinite { row: 4, col: 2, .. })),
        "{err:?}"
    );
}

/// The precision pass rounds a matrix read transposed (the weight gradient's `xᵀ`) below the
/// transpose, in transposed tiles: rounding `x` in r×c tiles and transposing gives, bit for bit,
/// the rounding of `xᵀ` in c×r tiles, ragged edges and power-of-two scales included.
#[test]
fn rounding_commutes_with_a_transpose_of_the_tiles() {
    let (rows, cols) = (300, 200);
    let x = random_matrix(rows, cols, Distribution::Normal, 11);
    let transpose = |m: &[f32], rows: usize, cols: usize| {
        let mut t = vec![0.0; m.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = m[r * cols + c];
            }
        }
        t
    };
    let xt = transpose(&x, rows, cols);
    for rounding in [ScaleRounding::Exact, ScaleRounding::PowerOfTwo] {
        for (tile_rows, tile_cols) in [(128, 1), (1, 128), (128, 128), (rows, cols)] {
            let below = fake_quantize(&x, &[rows, cols], tile_rows, tile_cols, rounding).unwrap();
            let of_transpose =
                fake_quantize(&xt, &[cols, rows], tile_cols, tile_rows, rounding).unwrap();
            let below_t = transpose(&below, rows, cols);
            assert!(
                below_t
                    .iter()
                    .zip(&of_transpose)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{tile_rows}x{tile_cols} tiles, {rounding:?}"
            );
        }
    }
}

#[test]
fn quantization_refuses_bad_input() {
    let exact = ScaleRounding::Exact;
    let err = quantize_activations(&[1.0; 5], 2, 3, 128, exact).unwrap_err();
    assert_eq!(
        err.to_string(),
        "quantize input: 5 elements given for a 2×3 matrix (expected 6)"
    );
    assert!(matches!(
        quantize_tiles(&[1.0; 6], 2, 3, 0, 1, exact),
        Err(Fp8Error::EmptyTile { .. })
    ));
    let err = quantize_weights(&[1.0, f32::INFINITY, 0.0, 0.0], 2, 2, 128, exact).unwrap_err();
    assert!(err.to_string().contains("element (0, 1) is inf"), "{err}");
    let layout = TileLayout::new(1, 2, 1, 2).unwrap();
    assert!(QuantizedTensor::from_parts(vec![0x38, 0x7F], vec![1.0], layout).is_err());
    assert!(QuantizedTensor::from_parts(vec![0x38, 0x38], vec![0.0], layout).is_err());
    assert!(QuantizedTensor::from_parts(vec![0x38, 0x38], vec![1.0, 1.0], layout).is_err());
}

// ---- GEMM ----

/// A 1×k operand with the given codes and one scale per `tile` columns.
fn operand(codes: &[u8], tile: usize, scales: &[f32]) -> QuantizedTensor {
    let layout = TileLayout::new(1, codes.len(), 1, tile).unwrap();
    QuantizedTensor::from_parts(codes.to_vec(), scales.to_vec(), layout).unwrap()
}

fn gemm1(a: &QuantizedTensor, b: &QuantizedTensor, interval: usize, acc: Accumulator) -> f32 {
    let config = GemmConfig::without_promotion(interval, acc);
    fp8_gemm(a, b, &config).unwrap()[0]
}

#[test]
fn accumulators_truncate_as_modelled() {
    // Products 1, 1/4, 1/8 (codes 0x38, 0x28, 0x20 times 1.0) with 2 mantissa bits.
    let ones = operand(&[0x38; 4], 4, &[1.0]);
    let a = operand(&[0x38, 0x28, 0x20, 0x00], 4, &[1.0]);
    assert_eq!(gemm1(&a, &ones, 4, Accumulator::F32), 1.375);
    let truncated = Accumulator::Truncated { mantissa_bits: 2 };
    assert_eq!(gemm1(&a, &ones, 4, truncated), 1.25); // 1.011b -> 1.01b
    let aligned = Accumulator::Aligned {
        group: 4,
        mantissa_bits: 2,
    };
    assert_eq!(gemm1(&a, &ones, 4, aligned), 1.25); // 1/8 is below the 3-bit window
    // 1 - 1/8: the per-addition model keeps 0.111b exactly; the aligned model floors -1/8 to
    // -1/4 (arithmetic shift) before adding.
    let a = operand(&[0x38, 0xA0, 0x00, 0x00], 4, &[1.0]);
    assert_eq!(gemm1(&a, &ones, 4, truncated), 0.875);
    assert_eq!(gemm1(&a, &ones, 4, aligned), 0.75);
    // Promotion applies each chunk's scales: (1 + 1/4)·2·3 + (1/8)·5·3.
    let a = operand(&[0x38, 0x28, 0x20, 0x00], 2, &[2.0, 5.0]);
    let b = operand(&[0x38; 4], 4, &[3.0]);
    assert_eq!(gemm1(&a, &b, 2, truncated), 7.5 + 1.875);
}

#[test]
fn recipe_passes_deepgemm_check_and_per_tensor_suffers_from_outliers() {
    let (m, n, k) = (64, 128, 1024);
    let plain = scaling_diffs(m, n, k, Outliers::NONE, 1).unwrap();
    assert!(plain.fine_grained < 1e-3, "{plain:?}");
    assert!(plain.fine_grained_pow2 < 1e-3, "{plain:?}");
    assert!(plain.per_tensor < 1e-3, "{plain:?}");
    // Four activation channels 100x larger, one per 128-column tile.
    let outliers = |channels, factor, compensate_weights| Outliers {
        channels,
        factor,
        compensate_weights,
    };
    let d = scaling_diffs(m, n, k, outliers(&[3, 200, 517, 900], 100.0, false), 1).unwrap();
    assert!(d.fine_grained < 1e-3, "{d:?}");
    assert!(d.per_tensor > 1.5 * d.fine_grained, "{d:?}");
    // Outliers paired with small weights, so the ordinary channels carry the output: per-tensor
    // scaling pushes them into E4M3's subnormals once outliers are ~1e4x.
    let d = scaling_diffs(m, n, k, outliers(&[3, 40, 77, 100], 1e4, true), 1).unwrap();
    assert!(d.fine_grained < 1e-3, "{d:?}");
    assert!(d.per_tensor > 1.3 * d.fine_grained, "{d:?}");
}

#[test]
fn recipe_against_bf16_directly() {
    let (m, n, k) = (8, 16, 256);
    let x = random_matrix(m, k, Distribution::Normal, 21);
    let w = random_matrix(n, k, Distribution::Normal, 22);
    let xq = quantize_activations(&x, m, k, 128, ScaleRounding::Exact).unwrap();
    let wq = quantize_weights(&w, n, k, 128, ScaleRounding::Exact).unwrap();
    let y = fp8_gemm(&xq, &wq, &GemmConfig::default()).unwrap();
    let reference = bf16_gemm(&x, &w, m, n, k).unwrap();
    assert!(calc_diff(&y, &reference).unwrap() < 1e-3);
    // The operands must agree on K, and their tiles must not straddle promotion chunks.
    let short = quantize_weights(&w[..n * 128], n, 128, 128, ScaleRounding::Exact).unwrap();
    assert!(matches!(
        fp8_gemm(&xq, &short, &GemmConfig::default()),
        Err(Fp8Error::InnerDimension { .. })
    ));
    let odd = quantize_activations(&x, m, k, 100, ScaleRounding::Exact).unwrap();
    let err = fp8_gemm(&odd, &wq, &GemmConfig::default()).unwrap_err();
    let expected = "GEMM: a's scale tiles are 100 wide along K = 256; each promotion chunk of 128 \
                    must lie in one tile (tile width a multiple of the promotion interval, or at \
                    least K)";
    assert_eq!(err.to_string(), expected);
    let config = |promotion_interval, accumulator| GemmConfig {
        promotion_interval,
        accumulator,
    };
    for config in [
        config(0, Accumulator::F32),
        config(128, Accumulator::Truncated { mantissa_bits: 24 }),
        config(
            128,
            Accumulator::Aligned {
                group: 0,
                mantissa_bits: 13,
            },
        ),
    ] {
        assert!(
            matches!(fp8_gemm(&xq, &wq, &config), Err(Fp8Error::Config { .. })),
            "{config:?}"
        );
    }
}

#[test]
fn promotion_bounds_the_accumulation_error() {
    let row = accumulation_row(16, 16, 4096, Distribution::UniformPositive, 4).unwrap();
    let (no_promotion, promoted) = (row.truncated_no_promotion, row.truncated_promoted);
    assert!(no_promotion.max_elementwise > 0.02, "{row:?}");
    assert!(promoted.max_elementwise < 2e-3, "{row:?}");
    assert!(row.aligned_no_promotion.max_elementwise > 5.0 * row.aligned_promoted.max_elementwise);
    assert!(row.f32_accumulation.max_elementwise < 1e-5, "{row:?}");
}

#[test]
fn calc_diff_is_deepgemms_formula() {
    assert_eq!(calc_diff(&[1.0, 2.0], &[1.0, 2.0]).unwrap(), 0.0);
    assert_eq!(calc_diff(&[1.0, 2.0], &[-1.0, -2.0]).unwrap(), 2.0);
    assert_eq!(calc_diff(&[1.0, 0.0], &[0.0, 1.0]).unwrap(), 1.0);
    assert_eq!(calc_diff(&[0.0], &[0.0]).unwrap(), 0.0);
    assert!((calc_diff(&[1.0], &[1.1]).unwrap() - (1.0 - 2.2 / 2.21)).abs() < 1e-7);
    assert!(calc_diff(&[1.0], &[1.0, 2.0]).is_err());
}
