//! The FP8 accumulation experiment of DeepSeek-V3 §3.3.2, on the host emulation of the FP8 GEMM
//! (`fathom_runtime::fp8`): how much a ~14-bit tensor-core accumulator loses as K grows, how much
//! promotion to FP32 every 128 elements of K recovers, and how fine-grained (1×128 / 128×128)
//! scaling compares with per-tensor scaling when a few activation channels are outliers.
//!
//! The report: "with K = 4096 ... limited accumulation precision ... results in a maximum
//! relative error of nearly 2%". Run with `cargo run --release --example fp8_accumulation`
//! (under ten seconds). An experiment that prints tables, not a timed test.

use fathom_runtime::fp8::experiment::{
    AccumulationRow, Distribution, Outliers, RelativeError, accumulation_row, scaling_diffs,
};

const SEED: u64 = 2024;
const KS: [usize; 5] = [512, 1024, 2048, 4096, 8192];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (m, n) = (64, 64);
    println!("FP8 GEMM accumulation error, {m}×K by K×{n}, against the f64 product of the same");
    println!("E4M3 inputs (quantization excluded; one scale per operand).");
    println!("trunc13: 13 mantissa bits, truncated after every addition (Accumulator::HOPPER)");
    println!("aligned32: the report's model, 32 products aligned to a 14-bit window");
    println!("(Accumulator::HOPPER_ALIGNED); +promo: promoted to FP32 every 128 elements of K.");

    println!("\nInputs uniform on [0, 1) (all products positive): max |y - ref| / |ref|");
    print_table(m, n, Distribution::UniformPositive, |e| e.max_elementwise)?;

    println!("\nInputs standard normal: max |y - ref| / max |ref|");
    println!("(elementwise relative error is meaningless where outputs cancel to near zero)");
    print_table(m, n, Distribution::Normal, |e| e.max_normwise)?;

    let (m, n, k) = (64, 128, 1024);
    println!("\nDeepGEMM's calc_diff against the BF16 GEMM, {m}×{k} by {k}×{n}, standard normal");
    println!("data, promotion every 128, trunc13 unless noted; DeepGEMM passes below 0.001.");
    println!("fine: 1×128 activation tiles, 128×128 weight blocks, exact scales; pow2: the same");
    println!("with power-of-two scales; f32acc: the same with full f32 accumulation.");
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10}",
        "activations", "fine", "pow2", "f32acc", "per-tensor"
    );
    let spread = [3, 200, 517, 900];
    let one_tile = [3, 40, 77, 100];
    let cases: [(&str, Outliers<'_>); 6] = [
        ("no outliers", Outliers::NONE),
        (
            "4 channels ×100, 4 tiles",
            Outliers {
                channels: &spread,
                factor: 100.0,
                compensate_weights: false,
            },
        ),
        (
            "4 channels ×100, 1 tile",
            Outliers {
                channels: &one_tile,
                factor: 100.0,
                compensate_weights: false,
            },
        ),
        (
            "4 channels ×100, 1 tile, weights ÷100",
            Outliers {
                channels: &one_tile,
                factor: 100.0,
                compensate_weights: true,
            },
        ),
        (
            "4 channels ×1e4, 1 tile, weights ÷1e4",
            Outliers {
                channels: &one_tile,
                factor: 1e4,
                compensate_weights: true,
            },
        ),
        (
            "4 channels ×1e5, 1 tile, weights ÷1e5",
            Outliers {
                channels: &one_tile,
                factor: 1e5,
                compensate_weights: true,
            },
        ),
    ];
    for (name, outliers) in cases {
        let d = scaling_diffs(m, n, k, outliers, SEED)?;
        println!(
            "{name:<40} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e}",
            d.fine_grained, d.fine_grained_pow2, d.fine_grained_f32_accumulation, d.per_tensor
        );
    }
    Ok(())
}

fn print_table(
    m: usize,
    n: usize,
    distribution: Distribution,
    measure: fn(&RelativeError) -> f64,
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "K", "trunc13", "+promo", "aligned32", "+promo", "f32"
    );
    for k in KS {
        let row: AccumulationRow = accumulation_row(m, n, k, distribution, SEED)?;
        println!(
            "{k:>6} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e}",
            measure(&row.truncated_no_promotion),
            measure(&row.truncated_promoted),
            measure(&row.aligned_no_promotion),
            measure(&row.aligned_promoted),
            measure(&row.f32_accumulation),
        );
    }
    Ok(())
}
