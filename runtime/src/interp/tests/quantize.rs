//! `QuantizeDequantize` against the FP8 quantizer, exactly.

use fathom_compiler::graph::QuantFormat;

use super::*;
use crate::fp8::{ScaleRounding, quantize_tiles};

/// Values over several binades with a few large outliers, so tiles get different scales.
fn spread(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0;
            if i % 17 == 3 { v * 300.0 } else { v * 0.01 }
        })
        .collect()
}

#[test]
fn quantize_dequantize_is_the_quantizer_exactly() -> TestResult {
    // Two matrices of 5×6: 1×4 tiles (two per row, the second partial), 4×4 blocks (partial
    // on both axes) and 4×1 tiles; with and without power-of-two scales.
    let x = spread(2 * 5 * 6);
    for (tile, pow2) in [
        ((1, 4), false),
        ((4, 4), false),
        ((4, 1), true),
        ((5, 6), true),
    ] {
        let out = eval_x(f32s(&[2, 5, 6], &x), |g, t| {
            g.quantize_dequantize(t, QuantFormat::E4M3, tile, pow2)
        })?;
        let rounding = if pow2 {
            ScaleRounding::PowerOfTwo
        } else {
            ScaleRounding::Exact
        };
        let mut expected = Vec::new();
        for matrix in x.chunks(30) {
            expected.extend(quantize_tiles(matrix, 5, 6, tile.0, tile.1, rounding)?.dequantize());
        }
        assert_f32(&out, &[2, 5, 6], &expected);
        assert_ne!(
            out.as_f32(),
            Some(&x[..]),
            "{tile:?}: rounding changed something"
        );
    }
    Ok(())
}

#[test]
fn a_non_finite_tile_comes_back_nan() -> TestResult {
    let mut x = spread(8);
    x[1] = f32::NAN;
    let out = eval_x(f32s(&[2, 4], &x), |g, t| {
        g.quantize_dequantize(t, QuantFormat::E4M3, (1, 2), false)
    })?;
    let got = out.as_f32().ok_or("floats")?;
    assert!(got[0].is_nan() && got[1].is_nan());
    let rest = quantize_tiles(&x[2..4], 1, 2, 1, 2, ScaleRounding::Exact)?.dequantize();
    assert_eq!(&got[2..4], rest.as_slice());
    assert!(got[4..].iter().all(|v| v.is_finite()));
    Ok(())
}
