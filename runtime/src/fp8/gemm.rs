//! An emulation of DeepSeek-V3's FP8 GEMM (DeepGEMM), and the references it is judged by.
//!
//! `y (M×N) = a (M×K) · bᵀ` with `b` stored N×K (a Linear's weight). K is cut into chunks of
//! `promotion_interval` (N_C = 128 in DeepSeek-V3). Within a chunk, products of decoded E4M3
//! values (exact: 4 × 4 significand bits) are summed in K order in a limited-precision
//! [`Accumulator`], as Hopper's tensor cores do; at the end of the chunk the partial sum is
//! "promoted": multiplied by the two operands' scales and added into an FP32 accumulator on the
//! CUDA cores, `out = fma(chunk, scale_a · scale_b, out)` (DeepGEMM's
//! `final_accum += scale * accum`, which nvcc contracts to one FMA). A promotion interval of at
//! least K means no promotion: one chunk, scaled once at the end.
//!
//! The limited-precision sums are computed exactly in fixed point (every E4M3 value is a multiple
//! of 2^-9, so every product is a multiple of 2^-18) and then truncated as the model says, so
//! the emulation has no rounding of its own.

use super::format::{Fp8Format, round_bf16};
use super::quantize::QuantizedTensor;
use super::{Fp8Error, check_len};

/// The precision of the sums within one K-chunk.
///
/// The DeepSeek-V3 report (§3.3.2, §3.5.2) says Hopper's FP8 tensor cores keep "around 14
/// bits": "after aligning 32 mantissa products by right-shifting based on the maximum exponent,
/// the Tensor Core only uses the highest 14 bits of each mantissa product for addition, and
/// truncates bits exceeding this range. The accumulation of addition results into registers also
/// employs 14-bit precision." Measurements reported to DeepGEMM (issue #176) describe H100's
/// accumulator as keeping a 13-bit mantissa, i.e. 14 significant bits with the leading one.
/// Two models of that are offered; [`Accumulator::HOPPER`] is the simple one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accumulator {
    /// IEEE f32: each product added with round to nearest even.
    F32,
    /// A float accumulator that keeps `mantissa_bits` bits after the leading one: after each
    /// addition of one product, the exact sum is truncated toward zero to that many bits. The
    /// simplest model, and a pessimistic one (every product pays a truncation).
    Truncated { mantissa_bits: u32 },
    /// The report's description, literally: products are taken `group` at a time (32 for an FP8
    /// `wgmma`), aligned to the largest product's exponent and truncated (an arithmetic right
    /// shift of two's complement: toward -inf) to a window of `mantissa_bits + 1` bits below and
    /// including that exponent's leading bit; their exact sum is added to the running sum, which
    /// is then truncated toward zero to `mantissa_bits` bits after its leading one.
    Aligned { group: usize, mantissa_bits: u32 },
}

impl Accumulator {
    /// Hopper's FP8 accumulation, simple model: 13 mantissa bits (14 significant), truncated
    /// after every addition.
    pub const HOPPER: Accumulator = Accumulator::Truncated { mantissa_bits: 13 };

    /// Hopper's FP8 accumulation, the report's aligned model: groups of 32 products, 14-bit
    /// windows, 13-bit mantissa registers.
    pub const HOPPER_ALIGNED: Accumulator = Accumulator::Aligned {
        group: 32,
        mantissa_bits: 13,
    };
}

/// How [`fp8_gemm`] accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    /// N_C: elements of K summed in the limited-precision accumulator before promotion to FP32.
    /// K (or more) means no promotion.
    pub promotion_interval: usize,
    pub accumulator: Accumulator,
}

impl GemmConfig {
    /// DeepSeek-V3's recipe: promotion every 128 elements of K from Hopper's accumulator.
    pub const DEEPSEEK_V3: GemmConfig = GemmConfig {
        promotion_interval: 128,
        accumulator: Accumulator::HOPPER,
    };

    /// All of K in the limited-precision accumulator, scaled once at the end (a plain FP8
    /// tensor-core GEMM).
    pub fn without_promotion(k: usize, accumulator: Accumulator) -> Self {
        Self {
            promotion_interval: k.max(1),
            accumulator,
        }
    }

    fn validate(&self) -> Result<(), Fp8Error> {
        if self.promotion_interval == 0 {
            return Err(Fp8Error::Config {
                field: "promotion_interval",
                value: 0,
                reason: "must be at least 1",
            });
        }
        let (group, mantissa_bits) = match self.accumulator {
            Accumulator::F32 => return Ok(()),
            Accumulator::Truncated { mantissa_bits } => (1, mantissa_bits),
            Accumulator::Aligned {
                group,
                mantissa_bits,
            } => (group, mantissa_bits),
        };
        if group == 0 {
            return Err(Fp8Error::Config {
                field: "accumulator.group",
                value: 0,
                reason: "must be at least 1",
            });
        }
        if mantissa_bits > 23 {
            return Err(Fp8Error::Config {
                field: "accumulator.mantissa_bits",
                value: u64::from(mantissa_bits),
                reason: "must be at most 23, so that a chunk's sum is an f32",
            });
        }
        Ok(())
    }
}

impl Default for GemmConfig {
    fn default() -> Self {
        Self::DEEPSEEK_V3
    }
}

/// The FP8 GEMM `a · bᵀ` (a: M×K, b: N×K, both E4M3 with per-tile scales), emulated as DeepGEMM
/// computes it; returns M×N in f32, row-major.
///
/// Each operand's scale must be constant over each K-chunk (its tiles a multiple of the
/// promotion interval wide, or at least K wide), since it is applied at promotion: 1×128
/// activation tiles and 128×128 weight blocks with N_C = 128 qualify, and so does per-tensor
/// scaling with any interval.
pub fn fp8_gemm(
    a: &QuantizedTensor,
    b: &QuantizedTensor,
    config: &GemmConfig,
) -> Result<Vec<f32>, Fp8Error> {
    config.validate()?;
    let (m, k, n) = (a.rows(), a.cols(), b.rows());
    if b.cols() != k {
        return Err(Fp8Error::InnerDimension {
            m,
            k_a: k,
            n,
            k_b: b.cols(),
        });
    }
    let chunk = config.promotion_interval;
    for (operand, t) in [("a", a), ("b", b)] {
        let tile_cols = t.layout().tile_cols;
        if !(tile_cols % chunk == 0 || tile_cols >= k) {
            return Err(Fp8Error::ChunkStraddlesTiles {
                operand,
                tile_cols,
                promotion_interval: chunk,
                k,
            });
        }
    }
    let tables = DecodeTables::new();
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        let a_row = &a.codes()[i * k..(i + 1) * k];
        for j in 0..n {
            let b_row = &b.codes()[j * k..(j + 1) * k];
            let mut acc = 0.0f32;
            for start in (0..k).step_by(chunk) {
                let end = (start + chunk).min(k);
                let partial = tables.chunk_sum(&a_row[start..end], &b_row[start..end], config);
                let scale = a.scale_at(i, start) * b.scale_at(j, start);
                acc = partial.mul_add(scale, acc);
            }
            out[i * n + j] = acc;
        }
    }
    Ok(out)
}

/// Every E4M3 code's value, as an f32 and as an integer multiple of 2^-9.
struct DecodeTables {
    value: [f32; 256],
    fixed: [i64; 256],
}

/// Fixed-point products are multiples of 2^-18.
const PRODUCT_ULP: f64 = 1.0 / (1u64 << 18) as f64;

impl DecodeTables {
    fn new() -> Self {
        let mut value = [0.0f32; 256];
        let mut fixed = [0i64; 256];
        for code in 0..=255u8 {
            let v = Fp8Format::E4M3.decode(code);
            // NaN codes never reach a GEMM (QuantizedTensor refuses them); keep them zero here.
            if v.is_finite() {
                value[usize::from(code)] = v;
                fixed[usize::from(code)] = (v * 512.0) as i64;
            }
        }
        Self { value, fixed }
    }

    /// The unscaled sum of `a[i] · b[i]` over one chunk, in `config.accumulator`'s precision.
    fn chunk_sum(&self, a: &[u8], b: &[u8], config: &GemmConfig) -> f32 {
        let product = |(&x, &y): (&u8, &u8)| {
            i128::from(self.fixed[usize::from(x)] * self.fixed[usize::from(y)])
        };
        let fixed_sum = match config.accumulator {
            Accumulator::F32 => {
                return a.iter().zip(b).fold(0.0f32, |acc, (&x, &y)| {
                    acc + self.value[usize::from(x)] * self.value[usize::from(y)]
                });
            }
            Accumulator::Truncated { mantissa_bits } => a
                .iter()
                .zip(b)
                .map(product)
                .fold(0i128, |acc, p| truncate_toward_zero(acc + p, mantissa_bits)),
            Accumulator::Aligned {
                group,
                mantissa_bits,
            } => {
                let mut acc = 0i128;
                for (ga, gb) in a.chunks(group).zip(b.chunks(group)) {
                    let group_sum = aligned_sum(|| ga.iter().zip(gb).map(product), mantissa_bits);
                    acc = truncate_toward_zero(acc + group_sum, mantissa_bits);
                }
                acc
            }
        };
        // At most 24 significant bits after truncation: exact in f64, then in f32.
        (fixed_sum as f64 * PRODUCT_ULP) as f32
    }
}

/// The position of the leading one of |v| (v != 0).
fn leading_bit(v: i128) -> u32 {
    127 - v.unsigned_abs().leading_zeros()
}

/// `v` truncated toward zero to `mantissa_bits` bits after its leading one.
fn truncate_toward_zero(v: i128, mantissa_bits: u32) -> i128 {
    if v == 0 {
        return 0;
    }
    let lead = leading_bit(v);
    if lead <= mantissa_bits {
        return v;
    }
    let drop = lead - mantissa_bits;
    let kept = ((v.unsigned_abs() >> drop) << drop) as i128;
    if v < 0 { -kept } else { kept }
}

/// The sum of `products` after aligning them to the largest one's leading bit and keeping a
/// window of `mantissa_bits + 1` bits from there down, dropping lower bits by arithmetic shift.
/// (`products` is walked twice, for the maximum and for the sum, to avoid a buffer per group.)
fn aligned_sum<I>(products: impl Fn() -> I, mantissa_bits: u32) -> i128
where
    I: Iterator<Item = i128>,
{
    let Some(max_lead) = products().filter(|&p| p != 0).map(leading_bit).max() else {
        return 0;
    };
    let shift = max_lead.saturating_sub(mantissa_bits);
    products().map(|p| (p >> shift) << shift).sum()
}

/// The BF16 reference: inputs rounded to bf16, products (exact in f32) summed in K order in f32.
/// `a` is M×K, `b` is N×K; returns M×N.
pub fn bf16_gemm(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>, Fp8Error> {
    check_len("bf16 GEMM a", a.len(), m, k)?;
    check_len("bf16 GEMM b", b.len(), n, k)?;
    let a: Vec<f32> = a.iter().map(|&v| round_bf16(v)).collect();
    let b: Vec<f32> = b.iter().map(|&v| round_bf16(v)).collect();
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let (ra, rb) = (&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
            out[i * n + j] = ra.iter().zip(rb).fold(0.0f32, |acc, (x, y)| acc + x * y);
        }
    }
    Ok(out)
}

/// The f64 reference: `a · bᵀ` summed in f64 (exact products of f32 or FP8 inputs; the sums
/// round at 2^-53, far below anything measured against it). `a` is M×K, `b` is N×K.
pub fn f64_gemm(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Result<Vec<f64>, Fp8Error> {
    check_len("f64 GEMM a", a.len(), m, k)?;
    check_len("f64 GEMM b", b.len(), n, k)?;
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (ra, rb) = (&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
            out[i * n + j] = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
        }
    }
    Ok(out)
}

/// DeepGEMM's check: `1 - 2Σxy / Σ(x² + y²)`, in f64. 0 for identical inputs (also when both
/// are all zeros), 2 for `y = -x`; DeepGEMM passes an FP8 GEMM below 0.001 against BF16.
pub fn calc_diff(x: &[f32], y: &[f32]) -> Result<f64, Fp8Error> {
    check_len("calc_diff y", y.len(), 1, x.len())?;
    let (mut xy, mut squares) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (f64::from(a), f64::from(b));
        xy += a * b;
        squares += a * a + b * b;
    }
    Ok(if squares == 0.0 {
        0.0
    } else {
        1.0 - 2.0 * xy / squares
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_leading_bits() {
        assert_eq!(truncate_toward_zero(0b1_0111, 2), 0b1_0100);
        assert_eq!(truncate_toward_zero(-0b1_0111, 2), -0b1_0100);
        assert_eq!(truncate_toward_zero(0b111, 2), 0b111);
    }

    #[test]
    fn alignment_floors_small_products() {
        // Leading bit 4, window of 3 bits (positions 4..2): 0b11 floors to 0, -0b11 to -0b100.
        let products = [0b1_0000, 0b11, -0b11];
        assert_eq!(aligned_sum(|| products.into_iter(), 2), 0b1_0000 - 0b100);
    }
}
