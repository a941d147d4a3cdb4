//! The precision pass: which GEMMs of a training graph run in FP8 or BF16 (SPEC §2).
//!
//! [`apply_precision`] rewrites a training graph (forward + losses + autodiff's backward) so
//! that the operands of every Linear's three GEMMs — forward, input gradient, weight gradient —
//! and of the grouped expert GEMMs are rounded the way a mixed-precision run rounds them:
//!
//! - with [`Precision::Bf16`] each operand is cast to bf16 and back (the values are rounded,
//!   the product still accumulates in f32, as a BF16 tensor-core GEMM does);
//! - with [`Precision::Fp8`] each operand goes through [`Op::QuantizeDequantize`] (E4M3, one
//!   scale per tile): activations and output gradients in 1×`activation_tile` tiles along K,
//!   weights in `weight_block`×`weight_block` blocks, and for the weight-gradient GEMM, whose K
//!   is the token axis, both operands in tiles of `activation_tile` tokens × 1 channel, the
//!   activation re-tiled from the forward GEMM's FP8 rounding of it (activations are saved for
//!   the backward pass in FP8, SPEC §2, so the weight gradient sees them quantized twice). The
//!   experts' weight gradient rounds its operands itself, in tiles along each expert's own
//!   token-slots ([`ExpertTiles`]), since which rows share a tile depends on the routing;
//! - with [`Precision::Fp32`] they are left as they are.
//!
//! The products of two activations — attention's scores and weighted values and their
//! gradients ([`activation_products`]) — SPEC §2 keeps in BF16 or FP32: under a BF16 or an FP8
//! policy their operands are rounded to bf16 (as `torch.autocast` runs them, and DeepSeek-V3
//! its attention); an FP32 policy, or an FP32 override covering the attention module, keeps
//! them f32. Also kept above FP8 by name: the MoE router (`mlp.gate`), f32 whatever the
//! policy, and the output head (`lm_head`) and the embedding (`embed_tokens`, also when tied
//! to the head), BF16 under an FP8 or a BF16 policy ([`precision_floor`]).
//!
//! Everything else stays in f32: master weights, gradients, optimizer inputs, norms. How the FP8 GEMMs sum their products is the policy's
//! `accumulation`, set on each rewritten GEMM (`graph::Accumulation`): exact, or Hopper's
//! limited tensor-core accumulator promoted to FP32 every `N_C` products (DeepSeek-V3's recipe)
//! or never (the ablation), emulated on the CPU.
//!
//! How the GEMMs are found is documented in [`identify`]; the pass is [`apply_precision`].
//!
//! [`Op::QuantizeDequantize`]: crate::graph::Op::QuantizeDequantize
//! [`ExpertTiles`]: crate::graph::ExpertTiles

pub mod identify;
mod rewrite;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::error::GraphError;
use crate::graph::Accumulation;

pub use identify::{
    ActivationProduct, GemmRole, LinearGemm, OperandLayout, activation_products, is_kept_in_f32,
    linear_gemms, precision_floor,
};
pub use rewrite::apply_precision;
pub(crate) use rewrite::round_products_in_bf16;

/// The arithmetic of a GEMM's operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Operands as they are (the baseline).
    #[default]
    Fp32,
    /// Operands rounded to bf16, products accumulated in f32.
    Bf16,
    /// Operands quantized to E4M3 with fine-grained (or per-tensor) scales.
    Fp8,
}

impl Precision {
    /// The more precise of `self` and `floor` (FP8 < BF16 < FP32).
    pub fn at_least(self, floor: Precision) -> Precision {
        let rank = |p: Precision| match p {
            Precision::Fp8 => 0,
            Precision::Bf16 => 1,
            Precision::Fp32 => 2,
        };
        if rank(self) >= rank(floor) {
            self
        } else {
            floor
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = PrecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "fp8" => Ok(Precision::Fp8),
            other => Err(PrecisionError::UnknownPrecision(other.to_owned())),
        }
    }
}

/// How FP8 scales are grouped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Scaling {
    /// DeepSeek-V3's tiles and blocks, sized by the model's `fp8` settings (`ModelSpec::fp8`).
    #[default]
    FineGrained,
    /// One scale per operand matrix (per expert for stacked expert weights): the usual FP8
    /// recipe before DeepSeek-V3, kept as an ablation.
    PerTensor,
}

/// Which precision each Linear's GEMMs use. The precision of a GEMM is that of the longest
/// override whose prefix is the Linear's module path or one of its ancestors (whole path
/// segments: `model.layers.1` covers `model.layers.1.mlp` but not `model.layers.10`), else
/// `default`.
///
/// In a run file, either a single precision (`precision = "fp8"`) or a table
/// (`[train.precision]` with `default`, `overrides = [["model.layers.0", "bf16"]]` and
/// `scaling = "per_tensor"`, and `accumulation`: `"exact"`, `"hopper"` (13 mantissa bits, promoted
/// every 128 products), `"hopper_without_promotion"`, or a table `{ mantissa_bits = 13,
/// promotion_interval = 256 }` (no `promotion_interval`: never promoted)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrecisionPolicy {
    pub default: Precision,
    /// `(module-path prefix, precision)` pairs.
    pub overrides: Vec<(String, Precision)>,
    /// How FP8 operands are scaled.
    pub scaling: Fp8Scaling,
    /// How the FP8 GEMMs sum their products (BF16 ones accumulate in f32, as tensor cores do).
    #[serde(serialize_with = "serialize_accumulation")]
    pub accumulation: Accumulation,
}

impl PrecisionPolicy {
    /// Every eligible GEMM in `precision`, fine-grained scales.
    pub fn uniform(precision: Precision) -> Self {
        PrecisionPolicy {
            default: precision,
            ..PrecisionPolicy::default()
        }
    }

    /// The precision of the GEMMs of the Linear at `path`.
    pub fn precision_of(&self, path: &str) -> Precision {
        self.overrides
            .iter()
            .filter(|(prefix, _)| covers(prefix, path))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.default, |(_, precision)| *precision)
    }

    /// Whether the policy changes nothing.
    pub fn is_fp32(&self) -> bool {
        self.default == Precision::Fp32 && self.overrides.iter().all(|(_, p)| *p == Precision::Fp32)
    }

    /// Rejects overrides that could never match.
    pub fn validate(&self) -> Result<(), PrecisionError> {
        match self.overrides.iter().position(|(prefix, _)| {
            prefix.is_empty() || prefix.starts_with('.') || prefix.ends_with('.')
        }) {
            Some(index) => Err(PrecisionError::BadPrefix {
                index,
                prefix: self.overrides[index].0.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// `prefix` is `path` or an ancestor of it.
fn covers(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Accepts `"fp8"` as well as the full table, so the common case is one word in a run file.
impl<'de> Deserialize<'de> for PrecisionPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            #[serde(default)]
            default: Precision,
            #[serde(default)]
            overrides: Vec<(String, Precision)>,
            #[serde(default)]
            scaling: Fp8Scaling,
            #[serde(default, deserialize_with = "deserialize_accumulation")]
            accumulation: Accumulation,
        }

        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PrecisionPolicy;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a precision (\"fp32\", \"bf16\" or \"fp8\") or a table with `default`, `overrides` and `scaling`")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                s.parse().map(PrecisionPolicy::uniform).map_err(E::custom)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let table = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(PrecisionPolicy {
                    default: table.default,
                    overrides: table.overrides,
                    scaling: table.scaling,
                    accumulation: table.accumulation,
                })
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// The accumulations with names: `exact`, `hopper` (13 mantissa bits, promoted every 128
/// products: DeepSeek-V3's recipe) and `hopper_without_promotion`.
pub fn accumulation_named(name: &str) -> Result<Accumulation, PrecisionError> {
    match name {
        "exact" => Ok(Accumulation::Exact),
        "hopper" => Ok(Accumulation::HOPPER),
        "hopper_without_promotion" => Ok(Accumulation::HOPPER_WITHOUT_PROMOTION),
        other => Err(PrecisionError::UnknownAccumulation(other.to_owned())),
    }
}

/// Written the way [`deserialize_accumulation`] reads it: a name when it has one.
fn serialize_accumulation<S: serde::Serializer>(
    accumulation: &Accumulation,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    match *accumulation {
        Accumulation::Exact => serializer.serialize_str("exact"),
        Accumulation::HOPPER => serializer.serialize_str("hopper"),
        Accumulation::HOPPER_WITHOUT_PROMOTION => {
            serializer.serialize_str("hopper_without_promotion")
        }
        Accumulation::Limited {
            mantissa_bits,
            promotion_interval,
        } => {
            let mut table = serializer.serialize_struct("Limited", 2)?;
            table.serialize_field("mantissa_bits", &mantissa_bits)?;
            match promotion_interval {
                Some(every) => table.serialize_field("promotion_interval", &every)?,
                None => table.skip_field("promotion_interval")?,
            }
            table.end()
        }
    }
}

/// An accumulation by name (`"exact"`, `"hopper"`, `"hopper_without_promotion"`) or as a table
/// `{ mantissa_bits, promotion_interval }` (without `promotion_interval`: never promoted).
fn deserialize_accumulation<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Accumulation, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limited {
        mantissa_bits: u32,
        promotion_interval: Option<usize>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Spelled {
        Name(String),
        Table(Limited),
    }

    let limited = match Spelled::deserialize(deserializer)? {
        Spelled::Name(name) => return accumulation_named(&name).map_err(serde::de::Error::custom),
        Spelled::Table(limited) => limited,
    };
    let accumulation = Accumulation::Limited {
        mantissa_bits: limited.mantissa_bits,
        promotion_interval: limited.promotion_interval,
    };
    accumulation.check().map_err(serde::de::Error::custom)?;
    Ok(accumulation)
}

/// What the precision pass refuses.
#[derive(Debug, Error, PartialEq)]
pub enum PrecisionError {
    #[error("unknown precision `{0}`; expected fp32, bf16 or fp8")]
    UnknownPrecision(String),
    #[error(
        "unknown accumulation `{0}`; expected exact, hopper, hopper_without_promotion or \
         {{ mantissa_bits, promotion_interval }}"
    )]
    UnknownAccumulation(String),
    #[error(
        "precision override {index}: `{prefix}` is not a module path (expected a dotted path \
         such as `model.layers.0.mlp`)"
    )]
    BadPrefix { index: usize, prefix: String },
    #[error("fp8 tiling: `{field}` is 0; tiles must be at least 1 wide")]
    EmptyTile { field: &'static str },
    #[error(transparent)]
    Graph(#[from] GraphError),
}
