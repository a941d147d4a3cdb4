//! The measurements behind `examples/fp8_accumulation.rs`, kept here so tests can check the
//! same claims: limited-precision accumulation without promotion loses accuracy as K grows
//! (DeepSeek-V3 §3.3.2), and how fine-grained and per-tensor scaling compare when a few
//! activation channels are outliers.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::gemm::{Accumulator, GemmConfig, bf16_gemm, calc_diff, f64_gemm, fp8_gemm};
use super::quantize::{
    QuantizedTensor, ScaleRounding, quantize_activations, quantize_per_tensor, quantize_weights,
};
use super::{Fp8Error, check_len};

/// How the entries of a random matrix are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Distribution {
    /// Standard normal: sums of products cancel, as in most of a network.
    Normal,
    /// Uniform on [0, 1): every product is positive, so sums only grow (the worst case for an
    /// accumulator that truncates).
    UniformPositive,
}

/// A rows×cols matrix of independent draws, deterministic in `seed`.
pub fn random_matrix(rows: usize, cols: usize, distribution: Distribution, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| match distribution {
            Distribution::Normal => rng.sample(StandardNormal),
            Distribution::UniformPositive => rng.random::<f32>(),
        })
        .collect()
}

/// Multiplies columns `channels` of a rows×cols matrix by `factor` (outlier channels, as LLM
/// activations have).
pub fn amplify_channels(
    x: &mut [f32],
    rows: usize,
    cols: usize,
    channels: &[usize],
    factor: f32,
) -> Result<(), Fp8Error> {
    check_len("amplify_channels input", x.len(), rows, cols)?;
    if let Some(&channel) = channels.iter().find(|&&c| c >= cols) {
        return Err(Fp8Error::ChannelOutOfRange { channel, cols });
    }
    for &c in channels {
        for r in 0..rows {
            x[r * cols + c] *= factor;
        }
    }
    Ok(())
}

/// Error measures of a GEMM result against an f64 reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RelativeError {
    /// max over elements of |y - ref| / |ref| (elements with ref = 0 skipped).
    pub max_elementwise: f64,
    /// max |y - ref| / max |ref|.
    pub max_normwise: f64,
}

/// The relative errors of `y` against `reference`.
pub fn relative_error(y: &[f32], reference: &[f64]) -> RelativeError {
    let mut max_elementwise = 0.0f64;
    let (mut max_err, mut max_ref) = (0.0f64, 0.0f64);
    for (&v, &r) in y.iter().zip(reference) {
        let err = (f64::from(v) - r).abs();
        if r != 0.0 {
            max_elementwise = max_elementwise.max(err / r.abs());
        }
        max_err = max_err.max(err);
        max_ref = max_ref.max(r.abs());
    }
    RelativeError {
        max_elementwise,
        max_normwise: if max_ref == 0.0 {
            0.0
        } else {
            max_err / max_ref
        },
    }
}

/// One row of the accumulation table: the error of each accumulation scheme at one K, against
/// the f64 product of the same FP8 inputs (so quantization error is excluded).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccumulationRow {
    pub k: usize,
    /// [`Accumulator::HOPPER`] (13-bit mantissa, truncated per addition), no promotion.
    pub truncated_no_promotion: RelativeError,
    /// The same with promotion to FP32 every 128 elements of K.
    pub truncated_promoted: RelativeError,
    /// [`Accumulator::HOPPER_ALIGNED`] (the report's 32-product aligned model), no promotion.
    pub aligned_no_promotion: RelativeError,
    /// The same with promotion every 128.
    pub aligned_promoted: RelativeError,
    /// Full f32 accumulation, no promotion.
    pub f32_accumulation: RelativeError,
}

/// Measures the accumulation schemes for an M×K by N×K product. Both operands are quantized
/// with one scale each (so every scheme, promotion or not, sees the same FP8 values).
pub fn accumulation_row(
    m: usize,
    n: usize,
    k: usize,
    distribution: Distribution,
    seed: u64,
) -> Result<AccumulationRow, Fp8Error> {
    let a = quantize_per_tensor(
        &random_matrix(m, k, distribution, seed),
        m,
        k,
        ScaleRounding::Exact,
    )?;
    let b = quantize_per_tensor(
        &random_matrix(n, k, distribution, seed ^ 0x9E37_79B9),
        n,
        k,
        ScaleRounding::Exact,
    )?;
    let reference = f64_gemm(&a.dequantize_f64(), &b.dequantize_f64(), m, n, k)?;
    let measure =
        |config: GemmConfig| fp8_gemm(&a, &b, &config).map(|y| relative_error(&y, &reference));
    let promoted = |accumulator| GemmConfig {
        promotion_interval: 128,
        accumulator,
    };
    let unpromoted = |accumulator| GemmConfig::without_promotion(k, accumulator);
    Ok(AccumulationRow {
        k,
        truncated_no_promotion: measure(unpromoted(Accumulator::HOPPER))?,
        truncated_promoted: measure(promoted(Accumulator::HOPPER))?,
        aligned_no_promotion: measure(unpromoted(Accumulator::HOPPER_ALIGNED))?,
        aligned_promoted: measure(promoted(Accumulator::HOPPER_ALIGNED))?,
        f32_accumulation: measure(unpromoted(Accumulator::F32))?,
    })
}

/// Outlier channels in the activations of [`scaling_diffs`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outliers<'a> {
    /// Activation channels (columns of the M×K input) that are amplified.
    pub channels: &'a [usize],
    /// Their amplification.
    pub factor: f32,
    /// Whether the weights of those channels are divided by `factor`, so that the outliers do
    /// not dominate the output (networks often pair outlier channels with small weights). Then
    /// the error of the ordinary channels shows in the output; otherwise it is drowned.
    pub compensate_weights: bool,
}

impl Outliers<'_> {
    /// No outliers.
    pub const NONE: Outliers<'static> = Outliers {
        channels: &[],
        factor: 1.0,
        compensate_weights: false,
    };
}

/// DeepGEMM's `calc_diff` of FP8 GEMMs against the BF16 GEMM of the same f32 inputs. All use
/// promotion every 128; all but one use [`Accumulator::HOPPER`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScalingDiffs {
    /// The recipe: 1×128 activation tiles, 128×128 weight blocks, exact scales.
    pub fine_grained: f64,
    /// The same with power-of-two scales.
    pub fine_grained_pow2: f64,
    /// The recipe's tiles with full f32 accumulation: what is left is quantization error.
    pub fine_grained_f32_accumulation: f64,
    /// One scale per tensor.
    pub per_tensor: f64,
}

/// FP8 GEMMs with fine-grained and per-tensor scaling on standard normal data (activations M×K,
/// weights N×K), against the BF16 GEMM.
pub fn scaling_diffs(
    m: usize,
    n: usize,
    k: usize,
    outliers: Outliers<'_>,
    seed: u64,
) -> Result<ScalingDiffs, Fp8Error> {
    let mut x = random_matrix(m, k, Distribution::Normal, seed);
    amplify_channels(&mut x, m, k, outliers.channels, outliers.factor)?;
    let mut w = random_matrix(n, k, Distribution::Normal, seed ^ 0x9E37_79B9);
    if outliers.compensate_weights {
        amplify_channels(&mut w, n, k, outliers.channels, 1.0 / outliers.factor)?;
    }
    let reference = bf16_gemm(&x, &w, m, n, k)?;
    let diff = |a: &QuantizedTensor, b: &QuantizedTensor, config: GemmConfig| {
        fp8_gemm(a, b, &config).and_then(|y| calc_diff(&y, &reference))
    };
    let fine = |rounding| -> Result<(QuantizedTensor, QuantizedTensor), Fp8Error> {
        Ok((
            quantize_activations(&x, m, k, 128, rounding)?,
            quantize_weights(&w, n, k, 128, rounding)?,
        ))
    };
    let (xq, wq) = fine(ScaleRounding::Exact)?;
    let (xq2, wq2) = fine(ScaleRounding::PowerOfTwo)?;
    let f32_accumulation = GemmConfig {
        promotion_interval: 128,
        accumulator: Accumulator::F32,
    };
    Ok(ScalingDiffs {
        fine_grained: diff(&xq, &wq, GemmConfig::DEEPSEEK_V3)?,
        fine_grained_pow2: diff(&xq2, &wq2, GemmConfig::DEEPSEEK_V3)?,
        fine_grained_f32_accumulation: diff(&xq, &wq, f32_accumulation)?,
        per_tensor: diff(
            &quantize_per_tensor(&x, m, k, ScaleRounding::Exact)?,
            &quantize_per_tensor(&w, n, k, ScaleRounding::Exact)?,
            GemmConfig::DEEPSEEK_V3,
        )?,
    })
}
