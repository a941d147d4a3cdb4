//! Random initialisation.
//!
//! [`init_parameters`] gives every graph parameter the initial value Hugging Face's
//! `DeepseekV3PreTrainedModel._init_weights` would draw from the same distribution, with a
//! random stream of its own so that the values depend only on the seed and the parameter's name.

use std::collections::HashMap;

use fathom_compiler::{DType, Graph, TensorType};
use float8::{F8E4M3, F8E5M2};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::tensor::{Data, HostTensor};

/// How a parameter starts, decided from its checkpoint name alone (see [`init_rule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitRule {
    /// Normal(0, initializer_range): linear weights, embeddings, the router's weight, MTP's
    /// `eh_proj` and output head.
    Normal,
    /// RMSNorm weights.
    Ones,
    /// Biases, including the router's `e_score_correction_bias`.
    Zeros,
}

/// The rule for a parameter name:
/// - names ending in `norm.weight` (`input_layernorm.weight`, `q_a_layernorm.weight`,
///   `model.norm.weight`, MTP's `enorm.weight`, `hnorm.weight`, `shared_head.norm.weight`)
///   are RMSNorm weights: [`InitRule::Ones`];
/// - names ending in `e_score_correction_bias` or `.bias`: [`InitRule::Zeros`];
/// - everything else: [`InitRule::Normal`].
pub fn init_rule(name: &str) -> InitRule {
    if name.ends_with("norm.weight") {
        InitRule::Ones
    } else if name.ends_with("e_score_correction_bias") || name.ends_with(".bias") || name == "bias"
    {
        InitRule::Zeros
    } else {
        InitRule::Normal
    }
}

/// Random initial values for every parameter of `graph`, keyed by checkpoint name.
///
/// Each parameter follows [`init_rule`]: normal(0, `initializer_range`) samples, ones or zeros.
/// The values are deterministic and depend only on `(seed, name)`: each parameter draws from its
/// own ChaCha8 stream, [`parameter_rng`]`(seed, name)`, so neither the order of the parameters
/// nor the presence of others (adding layers, enabling MTP) changes a tensor. A sample is an f64
/// standard normal (`rand_distr::StandardNormal`) times `initializer_range`, rounded to f32 and
/// then to the parameter's dtype when that is narrower (bf16, f16, fp8). Integer parameters are
/// zeros and bool parameters false. The values are bit-identical across runs and platforms for
/// a given version of `rand_chacha` and `rand_distr`.
///
/// Panics if `initializer_range` is negative or not finite.
pub fn init_parameters(
    graph: &Graph,
    initializer_range: f64,
    seed: u64,
) -> HashMap<String, HostTensor> {
    graph
        .parameters()
        .map(|(_, name, ty)| {
            (
                name.to_owned(),
                init_parameter(name, ty, initializer_range, seed),
            )
        })
        .collect()
}

/// The initial value of one parameter (see [`init_parameters`]).
pub fn init_parameter(
    name: &str,
    ty: &TensorType,
    initializer_range: f64,
    seed: u64,
) -> HostTensor {
    assert!(
        initializer_range.is_finite() && initializer_range >= 0.0,
        "initializer_range must be a finite non-negative number, not {initializer_range}"
    );
    let n = ty.numel();
    let data = match ty.dtype {
        DType::I32 | DType::I64 => Data::Int(vec![0; n]),
        DType::Bool => Data::Bool(vec![false; n]),
        float => {
            let values = match init_rule(name) {
                InitRule::Ones => vec![1.0; n],
                InitRule::Zeros => vec![0.0; n],
                InitRule::Normal => {
                    let mut rng = parameter_rng(seed, name);
                    (0..n)
                        .map(|_| {
                            let z: f64 = rng.sample(StandardNormal);
                            round_to(float, (z * initializer_range) as f32)
                        })
                        .collect()
                }
            };
            Data::Float(values)
        }
    };
    HostTensor {
        ty: ty.clone(),
        data,
    }
}

/// The random stream of parameter `name`: ChaCha8 keyed by `seed`
/// (`ChaCha8Rng::seed_from_u64(seed)`), on stream number [`fnv1a64`]`(name)`.
pub fn parameter_rng(seed: u64, name: &str) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a64(name.as_bytes()));
    rng
}

/// 64-bit FNV-1a, written out so that it never changes with the Rust version (unlike
/// `DefaultHasher`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// `x` rounded to the nearest value of a float dtype.
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::F8E4M3 => F8E4M3::from_f32(x).to_f32(),
        DType::F8E5M2 => F8E5M2::from_f32(x).to_f32(),
        _ => x,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fathom_compiler::GraphBuilder;

    fn graph(params: &[(&str, &[usize])]) -> Graph {
        let mut b = GraphBuilder::new("t");
        for (name, dims) in params {
            b.parameter(name, TensorType::new(DType::F32, *dims))
                .unwrap();
        }
        b.finish()
    }

    const PARAMS: &[(&str, &[usize])] = &[
        ("model.embed_tokens.weight", &[64, 32]),
        ("model.layers.0.input_layernorm.weight", &[32]),
        ("model.layers.0.self_attn.q_a_proj.weight", &[24, 32]),
        ("model.layers.0.self_attn.q_a_layernorm.weight", &[24]),
        ("model.layers.1.mlp.gate.weight", &[16, 32]),
        ("model.layers.1.mlp.gate.e_score_correction_bias", &[16]),
        ("model.layers.3.enorm.weight", &[32]),
        ("model.layers.3.hnorm.weight", &[32]),
        ("model.layers.3.eh_proj.weight", &[32, 64]),
        ("model.layers.3.shared_head.norm.weight", &[32]),
        ("model.norm.weight", &[32]),
        ("lm_head.weight", &[64, 32]),
    ];

    fn bits(t: &HostTensor) -> Vec<u32> {
        t.as_f32().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn same_seed_is_bit_identical_and_other_seeds_differ() {
        let g = graph(PARAMS);
        let a = init_parameters(&g, 0.02, 7);
        let b = init_parameters(&g, 0.02, 7);
        let c = init_parameters(&g, 0.02, 8);
        assert_eq!(a.len(), PARAMS.len());
        for (name, _) in PARAMS {
            assert_eq!(bits(&a[*name]), bits(&b[*name]), "{name}");
            if init_rule(name) == InitRule::Normal {
                assert_ne!(bits(&a[*name]), bits(&c[*name]), "{name}");
            }
        }
        // Distinct parameters of one shape get distinct values.
        assert_ne!(
            bits(&a["model.embed_tokens.weight"]),
            bits(&a["lm_head.weight"])
        );
    }

    #[test]
    fn values_do_not_depend_on_other_parameters_or_order() {
        let full = init_parameters(&graph(PARAMS), 0.02, 3);
        let mut reordered: Vec<_> = PARAMS.iter().rev().copied().collect();
        reordered.push(("model.layers.9.self_attn.o_proj.weight", &[32, 32]));
        let other = init_parameters(&graph(&reordered), 0.02, 3);
        for (name, _) in PARAMS {
            assert_eq!(bits(&full[*name]), bits(&other[*name]), "{name}");
        }
        let alone = init_parameters(&graph(&[("lm_head.weight", &[64, 32])]), 0.02, 3);
        assert_eq!(
            bits(&alone["lm_head.weight"]),
            bits(&full["lm_head.weight"])
        );
    }

    #[test]
    fn norms_are_ones_biases_zeros_and_matrices_normal() {
        let w = init_parameters(&graph(PARAMS), 0.02, 0);
        for (name, dims) in PARAMS {
            let t = &w[*name];
            assert_eq!(t.ty, TensorType::new(DType::F32, *dims), "{name}");
            let v = t.as_f32().unwrap();
            match init_rule(name) {
                InitRule::Ones => assert!(v.iter().all(|&x| x == 1.0), "{name}"),
                InitRule::Zeros => assert!(v.iter().all(|&x| x == 0.0), "{name}"),
                InitRule::Normal => {}
            }
        }
        for name in [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_a_layernorm.weight",
            "model.layers.3.enorm.weight",
            "model.layers.3.hnorm.weight",
            "model.layers.3.shared_head.norm.weight",
            "model.norm.weight",
        ] {
            assert_eq!(init_rule(name), InitRule::Ones, "{name}");
        }
        assert_eq!(
            init_rule("model.layers.1.mlp.gate.e_score_correction_bias"),
            InitRule::Zeros
        );
        assert_eq!(
            init_rule("model.layers.1.mlp.gate.weight"),
            InitRule::Normal
        );
        assert_eq!(init_rule("model.layers.3.eh_proj.weight"), InitRule::Normal);

        // Mean about 0 and standard deviation about initializer_range.
        let v = w["model.embed_tokens.weight"].as_f32().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.002, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.002, "std {}", var.sqrt());
    }

    #[test]
    fn narrow_dtypes_hold_rounded_values() {
        let ty = TensorType::new(DType::BF16, [8, 8]);
        let t = init_parameter("w", &ty, 0.5, 1);
        assert_eq!(t.ty, ty);
        let f32_values = init_parameter("w", &TensorType::new(DType::F32, [8, 8]), 0.5, 1);
        for (&r, &x) in t.as_f32().unwrap().iter().zip(f32_values.as_f32().unwrap()) {
            assert_eq!(r, bf16::from_f32(x).to_f32());
        }
        let ids = init_parameter("steps", &TensorType::new(DType::I64, [2]), 0.02, 1);
        assert_eq!(ids.as_i64(), Some(&[0i64, 0][..]));
    }

    #[test]
    fn fnv_is_the_reference_function() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
