//! Multi-head Latent Attention (DeepSeek-V3 §2.1.1), in the form the HF model computes it:
//! queries and keys/values through low-rank latents, a decoupled RoPE key shared by all heads.

use crate::error::GraphError;
use crate::graph::{GraphBuilder, Tensor};
use crate::module::{Module, Param, Scope};
use crate::spec::{MlaSpec, ModelSpec};

use super::basic::{Linear, LinearShape, NormConfig, RmsNorm};
use super::rope::{RopeTables, softmax_scale};

/// The latent RMSNorms (`q_a_layernorm`, `kv_a_layernorm`) use this epsilon whatever
/// `rms_norm_eps` says, in HF's model and in DeepSeek's own inference code.
pub const LATENT_NORM_EPS: f64 = 1e-6;

/// How queries are projected.
#[derive(Clone, Debug)]
pub enum QueryPath {
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))` (DeepSeek-V3).
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: RmsNorm,
        q_b_proj: Linear,
    },
    /// `q_proj(x)` (DeepSeek-V2-Lite style, `q_lora_rank: none`).
    Direct { q_proj: Linear },
}

#[derive(Clone, Debug)]
pub struct Mla {
    pub query: QueryPath,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    pub kv_b_proj: Linear,
    pub o_proj: Linear,
    dims: MlaSpec,
    interleaved: bool,
    scale: f64,
    path: String,
}

/// What attention needs from outside: the position tables for the sequence.
#[derive(Clone, Copy, Debug)]
pub struct AttentionContext {
    pub rope: RopeTables,
}

impl AttentionContext {
    /// Tables for `positions` tokens.
    pub fn build(
        g: &mut GraphBuilder,
        spec: &ModelSpec,
        positions: usize,
    ) -> Result<Self, GraphError> {
        let rope = RopeTables::build(g, &spec.rope, spec.attention.qk_rope_head_dim, positions)?;
        Ok(AttentionContext { rope })
    }

    /// The context of the first `positions` tokens (MTP modules see shorter sequences).
    pub fn prefix(&self, g: &mut GraphBuilder, positions: usize) -> Result<Self, GraphError> {
        Ok(AttentionContext {
            rope: self.rope.prefix(g, positions)?,
        })
    }
}

impl Module for Mla {
    type Config = ModelSpec;

    fn declare(scope: &mut Scope<'_>, spec: &ModelSpec) -> Result<Self, GraphError> {
        let a = &spec.attention;
        let d = spec.hidden_size;
        let query_width = a.heads * a.qk_head_dim();
        let query = match a.q_lora_rank {
            Some(rank) => QueryPath::LowRank {
                q_a_proj: scope.declare("q_a_proj", &LinearShape::new(d, rank))?,
                q_a_layernorm: scope
                    .declare("q_a_layernorm", &NormConfig::new(rank, LATENT_NORM_EPS))?,
                q_b_proj: scope.declare("q_b_proj", &LinearShape::new(rank, query_width))?,
            },
            None => QueryPath::Direct {
                q_proj: scope.declare("q_proj", &LinearShape::new(d, query_width))?,
            },
        };
        let latent = a.kv_lora_rank + a.qk_rope_head_dim;
        let kv_width = a.heads * (a.qk_nope_head_dim + a.v_head_dim);
        Ok(Mla {
            query,
            kv_a_proj_with_mqa: scope
                .declare("kv_a_proj_with_mqa", &LinearShape::new(d, latent))?,
            kv_a_layernorm: scope.declare(
                "kv_a_layernorm",
                &NormConfig::new(a.kv_lora_rank, LATENT_NORM_EPS),
            )?,
            kv_b_proj: scope.declare("kv_b_proj", &LinearShape::new(a.kv_lora_rank, kv_width))?,
            o_proj: scope.declare("o_proj", &LinearShape::new(a.heads * a.v_head_dim, d))?,
            dims: a.clone(),
            interleaved: spec.rope.interleaved,
            scale: softmax_scale(&spec.rope, a.qk_head_dim()),
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        match &self.query {
            QueryPath::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                q_a_proj.visit_parameters(visit);
                q_a_layernorm.visit_parameters(visit);
                q_b_proj.visit_parameters(visit);
            }
            QueryPath::Direct { q_proj } => q_proj.visit_parameters(visit),
        }
        self.kv_a_proj_with_mqa.visit_parameters(visit);
        self.kv_a_layernorm.visit_parameters(visit);
        self.kv_b_proj.visit_parameters(visit);
        self.o_proj.visit_parameters(visit);
    }
}

impl Mla {
    /// `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        g: &mut GraphBuilder,
        x: Tensor,
        ctx: &AttentionContext,
    ) -> Result<Tensor, GraphError> {
        let a = &self.dims;
        let (batch, seq) = (g.dims(x)[0], g.dims(x)[1]);
        let (nope, rope, heads) = (a.qk_nope_head_dim, a.qk_rope_head_dim, a.heads);

        let q = match &self.query {
            QueryPath::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                let compressed = q_a_proj.forward(g, x)?;
                let normed = q_a_layernorm.forward(g, compressed)?;
                q_b_proj.forward(g, normed)?
            }
            QueryPath::Direct { q_proj } => q_proj.forward(g, x)?,
        };
        let latent = self.kv_a_proj_with_mqa.forward(g, x)?;
        let (c_kv, k_rope) = g.within(&self.path, |g| {
            let c_kv = g.slice(latent, 2, 0, a.kv_lora_rank)?;
            let k_rope = g.slice(latent, 2, a.kv_lora_rank, a.kv_lora_rank + rope)?;
            Ok((c_kv, k_rope))
        })?;
        let c_kv = self.kv_a_layernorm.forward(g, c_kv)?;
        let kv = self.kv_b_proj.forward(g, c_kv)?;

        let attended = g.within(&self.path, |g| {
            // Tokens before heads, as the projections lay them out: [b, s, h, ·].
            let q = g.reshape(q, &[batch, seq, heads, nope + rope])?;
            let q_nope = g.slice(q, 3, 0, nope)?;
            let q_rope = g.slice(q, 3, nope, nope + rope)?;
            let q_rope = ctx.rope.apply_per_head(g, q_rope, self.interleaved)?;
            let query = g.concat(&[q_nope, q_rope], 3)?;

            // One RoPE key per token, shared by every head: [b, s, rope].
            let k_rope = ctx.rope.apply(g, k_rope, self.interleaved)?;

            // Keys and values from the latent: [b, s, h*(nope+v)] -> [b, s, h, nope+v].
            let kv = g.reshape(kv, &[batch, seq, heads, nope + a.v_head_dim])?;
            let k_nope = g.slice(kv, 3, 0, nope)?;
            let value = g.slice(kv, 3, nope, nope + a.v_head_dim)?;

            let out = g.causal_attention([query, k_nope, k_rope, value], self.scale)?;
            g.reshape(out, &[batch, seq, heads * a.v_head_dim])
        })?;
        self.o_proj.forward(g, attended)
    }
}
