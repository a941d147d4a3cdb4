//! Rotary position embedding, plain and YaRN, with the Hugging Face DeepseekV3 numerics.
//!
//! The tables are graph constants computed here in the same precision steps as `transformers`
//! (f32 inverse frequencies, f32 angles), so the interpreter matches the reference to an ulp.

use crate::dtype::{DType, TensorType};
use crate::error::GraphError;
use crate::graph::{GraphBuilder, Tensor};
use crate::spec::{RopeSpec, YarnSpec};

/// YaRN's attention temperature: `0.1 * m * ln(s) + 1` for s > 1.
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// Inverse frequency of each rotated pair (`rope_dim / 2` of them), rounded to f32 as HF does.
pub fn inverse_frequencies(rope: &RopeSpec, rope_dim: usize) -> Vec<f32> {
    let base = rope.theta;
    // HF computes `base ** (arange(0, dim, 2) / dim)` in f32.
    let pos_freq = |i: usize| (base as f32).powf((2 * i) as f32 / rope_dim as f32) as f64;
    let pairs = rope_dim / 2;
    match &rope.yarn {
        None => (0..pairs).map(|i| (1.0 / pos_freq(i)) as f32).collect(),
        Some(y) => {
            let (low, high) = yarn_correction_range(y, base, rope_dim);
            (0..pairs)
                .map(|i| {
                    let extrapolation = 1.0 / pos_freq(i);
                    let interpolation = 1.0 / (y.factor * pos_freq(i));
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    // Dimensions below the range keep their frequency; above it, they are
                    // interpolated by the factor; in between, a linear blend.
                    let keep = 1.0 - ramp;
                    (interpolation * (1.0 - keep) + extrapolation * keep) as f32
                })
                .collect()
        }
    }
}

/// The pair range over which YaRN blends, from the rotation counts `beta_fast`/`beta_slow`.
fn yarn_correction_range(y: &YarnSpec, base: f64, rope_dim: usize) -> (f64, f64) {
    let dim = rope_dim as f64;
    let correction_dim = |rotations: f64| {
        dim * (y.original_max_positions as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001; // as HF: avoids a division by zero in the ramp
    }
    (low, high)
}

/// The factor multiplying cos and sin (`attention_factor` in HF).
pub fn cos_sin_factor(rope: &RopeSpec) -> f64 {
    match &rope.yarn {
        None => 1.0,
        Some(y) => y.attention_factor.unwrap_or_else(|| {
            if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
            } else {
                yarn_mscale(y.factor, 1.0)
            }
        }),
    }
}

/// The softmax scale of attention: `1/sqrt(qk_head_dim)`, times `mscale(s, mscale_all_dim)^2`
/// under YaRN when `mscale_all_dim` is set.
pub fn softmax_scale(rope: &RopeSpec, qk_head_dim: usize) -> f64 {
    let base = (qk_head_dim as f64).powf(-0.5);
    match &rope.yarn {
        Some(y) if y.mscale_all_dim != 0.0 => {
            let m = yarn_mscale(y.factor, y.mscale_all_dim);
            base * m * m
        }
        _ => base,
    }
}

/// cos and sin of every position's angles, `[positions, rope_dim / 2]`, as graph constants.
#[derive(Clone, Copy, Debug)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn build(
        g: &mut GraphBuilder,
        rope: &RopeSpec,
        rope_dim: usize,
        positions: usize,
    ) -> Result<Self, GraphError> {
        let inv_freq = inverse_frequencies(rope, rope_dim);
        let factor = cos_sin_factor(rope) as f32;
        let mut cos = Vec::with_capacity(positions * inv_freq.len());
        let mut sin = Vec::with_capacity(positions * inv_freq.len());
        for p in 0..positions {
            for &f in &inv_freq {
                let angle = p as f32 * f; // f32 product, as HF
                cos.push(((angle as f64).cos() as f32 * factor) as f64);
                sin.push(((angle as f64).sin() as f32 * factor) as f64);
            }
        }
        let ty = TensorType::new(DType::F32, [positions, inv_freq.len()]);
        Ok(RopeTables {
            cos: g.constant("rope.cos", ty.clone(), cos)?,
            sin: g.constant("rope.sin", ty, sin)?,
        })
    }

    /// The first `positions` rows.
    pub fn prefix(&self, g: &mut GraphBuilder, positions: usize) -> Result<Self, GraphError> {
        if g.dims(self.cos)[0] == positions {
            return Ok(*self);
        }
        Ok(RopeTables {
            cos: g.slice(self.cos, 0, 0, positions)?,
            sin: g.slice(self.sin, 0, 0, positions)?,
        })
    }

    /// Rotates `x` (`[..., positions, heads, rope_dim]`) as [`RopeTables::apply`] does, the
    /// tables broadcast over the heads.
    pub fn apply_per_head(
        &self,
        g: &mut GraphBuilder,
        x: Tensor,
        interleaved: bool,
    ) -> Result<Tensor, GraphError> {
        let per_head = |g: &mut GraphBuilder, table: Tensor| {
            let (positions, half) = (g.dims(table)[0], g.dims(table)[1]);
            g.reshape(table, &[positions, 1, half])
        };
        let tables = RopeTables {
            cos: per_head(g, self.cos)?,
            sin: per_head(g, self.sin)?,
        };
        tables.apply(g, x, interleaved)
    }

    /// Rotates `x` (`[..., positions, rope_dim]`). Pairs are adjacent channels when
    /// `interleaved` (DeepSeek's layout), else the two halves. The result is in half-split
    /// order, as HF returns it; queries and keys share the order, so scores are unaffected.
    pub fn apply(
        &self,
        g: &mut GraphBuilder,
        x: Tensor,
        interleaved: bool,
    ) -> Result<Tensor, GraphError> {
        let dims = g.dims(x).to_vec();
        let rank = dims.len();
        let dim = dims[rank - 1];
        let half = dim / 2;
        let (first, second) = if interleaved {
            let mut paired = dims.clone();
            paired[rank - 1] = half;
            paired.push(2);
            let pairs = g.reshape(x, &paired)?;
            let even = g.slice(pairs, rank, 0, 1)?;
            let odd = g.slice(pairs, rank, 1, 2)?;
            let mut flat = dims.clone();
            flat[rank - 1] = half;
            (g.reshape(even, &flat)?, g.reshape(odd, &flat)?)
        } else {
            (
                g.slice(x, rank - 1, 0, half)?,
                g.slice(x, rank - 1, half, dim)?,
            )
        };
        // [x1 cos - x2 sin, x2 cos + x1 sin]
        let a = g.mul(first, self.cos)?;
        let b = g.mul(second, self.sin)?;
        let rotated_first = g.sub(a, b)?;
        let c = g.mul(second, self.cos)?;
        let d = g.mul(first, self.sin)?;
        let rotated_second = g.add(c, d)?;
        g.concat(&[rotated_first, rotated_second], rank - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn(factor: f64, mscale: f64, mscale_all_dim: f64) -> RopeSpec {
        RopeSpec {
            theta: 10000.0,
            interleaved: true,
            yarn: Some(YarnSpec {
                factor,
                original_max_positions: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale,
                mscale_all_dim,
                attention_factor: None,
                truncate: true,
            }),
        }
    }

    #[test]
    fn plain_frequencies_follow_the_rope_formula() {
        let f = inverse_frequencies(&RopeSpec::default(), 8);
        let expected = [1.0, 0.1, 0.01, 0.001];
        for (got, want) in f.iter().zip(expected) {
            assert!((*got as f64 - want).abs() <= 1e-7 * want, "{got} vs {want}");
        }
    }

    #[test]
    fn deepseek_v3_yarn_scales() {
        // V3: s = 40, mscale = mscale_all_dim = 1: cos/sin are unscaled, softmax gets
        // (0.1 ln 40 + 1)^2 = 1.3689...^2.
        let rope = yarn(40.0, 1.0, 1.0);
        assert_eq!(cos_sin_factor(&rope), 1.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        let scale = softmax_scale(&rope, 192);
        assert!((scale - m * m / 192f64.sqrt()).abs() < 1e-15);
        // Without mscale_all_dim the temperature moves into cos/sin instead.
        let rope = yarn(40.0, 0.0, 0.0);
        assert!((cos_sin_factor(&rope) - m).abs() < 1e-15);
        assert_eq!(softmax_scale(&rope, 192), 192f64.powf(-0.5));
    }

    #[test]
    fn yarn_keeps_fast_dimensions_and_interpolates_slow_ones() {
        let plain = inverse_frequencies(&RopeSpec::default(), 64);
        let scaled = inverse_frequencies(&yarn(40.0, 1.0, 1.0), 64);
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] as f64 - plain[last] as f64 / 40.0).abs() < 1e-12);
    }
}
