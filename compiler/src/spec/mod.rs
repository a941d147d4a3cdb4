//! `ModelSpec`: every hyperparameter of a DeepSeek-V3-style model, with its validation.
//!
//! The Rust field names are the ones a user writes in `model!`; [`hf`] maps them to and from a
//! Hugging Face `config.json`. The rules live here only: the macro runs [`ModelSpec::validate`] at
//! compile time and points each error at the offending field.

pub mod examples;
pub mod hf;
mod validate;

use serde::{Deserialize, Serialize};

pub use validate::SpecError;

/// A model architecture declared in Rust (what `model!` generates).
pub trait Architecture {
    /// The name given in the declaration.
    const NAME: &'static str;
    /// The declared hyperparameters, validated when the declaration was compiled.
    fn spec() -> ModelSpec;
}

/// A whole model: sizes, attention, routing, multi-token prediction and FP8 tiling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Transformer blocks of the main model (`num_hidden_layers`).
    pub layers: usize,
    /// The first `dense_layers` blocks use the dense SwiGLU FFN, the rest MoE
    /// (`first_k_dense_replace`).
    #[serde(default)]
    pub dense_layers: usize,
    /// Width of the dense SwiGLU FFN (`intermediate_size`).
    pub intermediate_size: usize,
    /// RMSNorm epsilon (`rms_norm_eps`).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Longest sequence the model is declared for (`max_position_embeddings`).
    #[serde(default = "default_max_positions")]
    pub max_positions: usize,
    /// The output head reuses the embedding matrix (`tie_word_embeddings`).
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Standard deviation of random initial weights (`initializer_range`).
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    pub attention: MlaSpec,
    #[serde(default)]
    pub rope: RopeSpec,
    /// DeepSeekMoE settings; `None` only when every layer is dense.
    #[serde(default)]
    pub moe: Option<MoeSpec>,
    /// Multi-Token Prediction depth D (`num_nextn_predict_layers`); 0 disables MTP.
    #[serde(default)]
    pub mtp_depth: usize,
    /// FP8 tiling; `None` when the model is not meant for FP8 training.
    #[serde(default)]
    pub fp8: Option<Fp8Spec>,
}

/// Multi-head Latent Attention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaSpec {
    /// Attention heads (`num_attention_heads`).
    pub heads: usize,
    /// Rank of the query compression; `None` projects queries directly (`q_proj`).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    /// Rank of the joint key-value compression, the cached latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without position information.
    pub qk_nope_head_dim: usize,
    /// Per-head query dimensions and shared-key dimensions carrying RoPE.
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaSpec {
    /// Width of one query or key head: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// Rotary position embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeSpec {
    #[serde(default = "default_rope_theta")]
    pub theta: f64,
    /// Rotated pairs are adjacent channels (`rope_interleave`), as in DeepSeek-V3's weights.
    #[serde(default = "default_true")]
    pub interleaved: bool,
    /// YaRN context extension; `None` for plain RoPE.
    #[serde(default)]
    pub yarn: Option<YarnSpec>,
}

impl Default for RopeSpec {
    fn default() -> Self {
        RopeSpec {
            theta: default_rope_theta(),
            interleaved: true,
            yarn: None,
        }
    }
}

/// YaRN parameters (`rope_scaling` with type `yarn`), with the Hugging Face semantics: `mscale`
/// and `mscale_all_dim` of 0 mean "not given".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YarnSpec {
    /// Context extension factor s.
    pub factor: f64,
    /// Context length the model was pre-trained with (`original_max_position_embeddings`).
    pub original_max_positions: usize,
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f64,
    #[serde(default = "default_beta_slow")]
    pub beta_slow: f64,
    /// With `mscale_all_dim`, sets the cos/sin factor `mscale(s, mscale) / mscale(s, mscale_all_dim)`.
    #[serde(default)]
    pub mscale: f64,
    /// When nonzero, the softmax scale is multiplied by `mscale(s, mscale_all_dim)^2`.
    #[serde(default)]
    pub mscale_all_dim: f64,
    /// Overrides the cos/sin factor (`attention_factor`).
    #[serde(default)]
    pub attention_factor: Option<f64>,
    /// Round the correction range outwards to whole dimensions (`truncate`, default true).
    #[serde(default = "default_true")]
    pub truncate: bool,
}

/// DeepSeekMoE routing and expert sizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSpec {
    /// Routed experts (`n_routed_experts`).
    pub routed_experts: usize,
    /// Shared experts, run on every token as one SwiGLU `shared_experts` times as wide
    /// (`n_shared_experts`).
    #[serde(default)]
    pub shared_experts: usize,
    /// Routed experts chosen per token (`num_experts_per_tok`).
    pub experts_per_token: usize,
    /// Expert groups for group-limited routing (`n_group`).
    #[serde(default = "default_one_usize")]
    pub groups: usize,
    /// Groups a token may route into (`topk_group`).
    #[serde(default = "default_one_usize")]
    pub groups_per_token: usize,
    /// Width of each expert's SwiGLU (`moe_intermediate_size`).
    pub intermediate_size: usize,
    /// Multiplies the gate values after normalisation (`routed_scaling_factor`).
    #[serde(default = "default_one")]
    pub routed_scaling_factor: f64,
    /// Gates are normalised to sum 1 over the chosen experts (`norm_topk_prob`).
    #[serde(default = "default_true")]
    pub normalize_gates: bool,
}

impl MoeSpec {
    pub fn experts_per_group(&self) -> usize {
        self.routed_experts / self.groups.max(1)
    }
}

/// FP8 quantisation tiling (DeepSeek-V3 §3.3: 1×128 activation tiles, 128×128 weight blocks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fp8Spec {
    /// Channels per activation scale (each token's row is cut into tiles of this width).
    #[serde(default = "default_tile")]
    pub activation_tile: usize,
    /// Side of the square weight blocks sharing one scale.
    #[serde(default = "default_tile")]
    pub weight_block: usize,
}

impl Default for Fp8Spec {
    fn default() -> Self {
        Fp8Spec {
            activation_tile: default_tile(),
            weight_block: default_tile(),
        }
    }
}

impl ModelSpec {
    /// Whether block `layer` of the main model uses the MoE FFN (MTP blocks use it whenever the
    /// model has MoE).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.is_some() && layer >= self.dense_layers
    }
}

fn default_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    4096
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_one_usize() -> usize {
    1
}
fn default_beta_fast() -> f64 {
    32.0
}
fn default_beta_slow() -> f64 {
    1.0
}
fn default_tile() -> usize {
    128
}
