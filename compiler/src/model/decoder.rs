//! The transformer block and the trait that lets users swap in their own.

use crate::error::GraphError;
use crate::graph::{GraphBuilder, Tensor};
use crate::module::{Module, Param, Scope};
use crate::spec::ModelSpec;

use super::basic::{Mlp, MlpShape, NormConfig, RmsNorm};
use super::mla::{AttentionContext, Mla};
use super::moe::{Moe, Routing};

/// What a block is declared with: the whole spec and the block's index. A block may be a main
/// layer (`index < spec.layers`) or an MTP module's block (`index >= spec.layers`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerConfig {
    pub spec: ModelSpec,
    pub index: usize,
}

impl LayerConfig {
    /// Whether this block's FFN is MoE: every block from `dense_layers` on, MTP blocks included.
    pub fn is_moe(&self) -> bool {
        self.spec.is_moe_layer(self.index)
    }
}

/// A block's result: the new hidden states and, for MoE blocks, the routing decisions.
#[derive(Clone, Copy, Debug)]
pub struct LayerOutput {
    pub hidden: Tensor,
    pub routing: Option<Routing>,
}

impl From<Tensor> for LayerOutput {
    fn from(hidden: Tensor) -> Self {
        LayerOutput {
            hidden,
            routing: None,
        }
    }
}

/// A transformer block: `[batch, seq, hidden] -> [batch, seq, hidden]`. Implement it (with
/// `#[derive(Module)]` and `#[module(config = LayerConfig)]`) to use your own block in
/// [`DeepSeekV3`](super::DeepSeekV3).
pub trait Layer {
    fn forward(
        &self,
        g: &mut GraphBuilder,
        x: Tensor,
        ctx: &AttentionContext,
    ) -> Result<LayerOutput, GraphError>;
}

/// The FFN of a block.
#[derive(Clone, Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

/// DeepSeek-V3's pre-norm block: `h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))`.
#[derive(Clone, Debug)]
pub struct DecoderBlock {
    pub input_layernorm: RmsNorm,
    pub self_attn: Mla,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
    path: String,
}

impl Module for DecoderBlock {
    type Config = LayerConfig;

    fn declare(scope: &mut Scope<'_>, config: &LayerConfig) -> Result<Self, GraphError> {
        let spec = &config.spec;
        let norm = NormConfig::new(spec.hidden_size, spec.norm_eps);
        Ok(DecoderBlock {
            self_attn: scope.declare("self_attn", spec)?,
            mlp: if config.is_moe() {
                FeedForward::Moe(scope.declare("mlp", spec)?)
            } else {
                let shape = MlpShape {
                    hidden_size: spec.hidden_size,
                    intermediate_size: spec.intermediate_size,
                };
                FeedForward::Dense(scope.declare("mlp", &shape)?)
            },
            input_layernorm: scope.declare("input_layernorm", &norm)?,
            post_attention_layernorm: scope.declare("post_attention_layernorm", &norm)?,
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        self.self_attn.visit_parameters(visit);
        match &self.mlp {
            FeedForward::Dense(mlp) => mlp.visit_parameters(visit),
            FeedForward::Moe(moe) => moe.visit_parameters(visit),
        }
        self.input_layernorm.visit_parameters(visit);
        self.post_attention_layernorm.visit_parameters(visit);
    }
}

impl Layer for DecoderBlock {
    fn forward(
        &self,
        g: &mut GraphBuilder,
        x: Tensor,
        ctx: &AttentionContext,
    ) -> Result<LayerOutput, GraphError> {
        let normed = self.input_layernorm.forward(g, x)?;
        let attended = self.self_attn.forward(g, normed, ctx)?;
        let h = g.within(&self.path, |g| g.add(x, attended))?;
        let normed = self.post_attention_layernorm.forward(g, h)?;
        let (ffn, routing) = match &self.mlp {
            FeedForward::Dense(mlp) => (mlp.forward(g, normed)?, None),
            FeedForward::Moe(moe) => {
                let (out, routing) = moe.forward(g, normed)?;
                (out, Some(routing))
            }
        };
        let hidden = g.within(&self.path, |g| g.add(h, ffn))?;
        Ok(LayerOutput { hidden, routing })
    }
}
