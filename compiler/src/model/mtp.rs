//! Multi-Token Prediction modules (DeepSeek-V3 §2.2).
//!
//! Module k combines the previous depth's hidden state at position i with the embedding of token
//! i + k, runs one transformer block, and the shared head predicts token i + k + 1. The
//! concatenation puts the embedding first, as the released checkpoints do (the report's equation
//! has the reverse order).

use crate::error::GraphError;
use crate::graph::{GraphBuilder, Tensor};
use crate::module::{Module, Param, Scope};

use super::basic::{Embedding, Linear, LinearShape, NormConfig, RmsNorm};
use super::decoder::{DecoderBlock, Layer, LayerConfig, LayerOutput};
use super::mla::AttentionContext;

/// One MTP depth, stored in checkpoints as layer `layers + k - 1`.
#[derive(Clone, Debug)]
pub struct MtpModule {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    /// `[hidden, 2 * hidden]`: the projection `M_k`.
    pub eh_proj: Linear,
    /// The module's transformer block, whose parameters sit directly under the layer's path.
    pub block: DecoderBlock,
    /// `shared_head.norm`: the module's own final norm before the shared output head.
    pub shared_head_norm: RmsNorm,
    path: String,
}

impl Module for MtpModule {
    type Config = LayerConfig;

    fn declare(scope: &mut Scope<'_>, config: &LayerConfig) -> Result<Self, GraphError> {
        let spec = &config.spec;
        let norm = NormConfig::new(spec.hidden_size, spec.norm_eps);
        Ok(MtpModule {
            enorm: scope.declare("enorm", &norm)?,
            hnorm: scope.declare("hnorm", &norm)?,
            eh_proj: scope.declare(
                "eh_proj",
                &LinearShape::new(2 * spec.hidden_size, spec.hidden_size),
            )?,
            block: scope.declare("", config)?,
            shared_head_norm: scope.declare("shared_head.norm", &norm)?,
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        self.enorm.visit_parameters(visit);
        self.hnorm.visit_parameters(visit);
        self.eh_proj.visit_parameters(visit);
        self.block.visit_parameters(visit);
        self.shared_head_norm.visit_parameters(visit);
    }
}

impl MtpModule {
    /// `previous`: the depth k-1 hidden states (`[batch, seq - k + 1, hidden]`; the main
    /// model's last block output, before its final norm, for k = 1). Returns depth k's hidden
    /// states, `[batch, seq - k, hidden]`.
    pub fn forward(
        &self,
        g: &mut GraphBuilder,
        previous: Tensor,
        token_ids: Tensor,
        k: usize,
        ctx: &AttentionContext,
        embedding: &Embedding,
    ) -> Result<LayerOutput, GraphError> {
        let seq = g.dims(token_ids)[1];
        let len = seq - k;
        let (previous, future_tokens, ctx) = g.within(&self.path, |g| {
            Ok((
                g.slice(previous, 1, 0, len)?,
                g.slice(token_ids, 1, k, seq)?,
                ctx.prefix(g, len)?,
            ))
        })?;
        let embedded = embedding.forward(g, future_tokens)?;
        let e = self.enorm.forward(g, embedded)?;
        let h = self.hnorm.forward(g, previous)?;
        let joined = g.within(&self.path, |g| g.concat(&[e, h], 2))?;
        let projected = self.eh_proj.forward(g, joined)?;
        self.block.forward(g, projected, &ctx)
    }
}
