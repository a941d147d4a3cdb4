//! The whole DeepSeek-V3 model: embedding, blocks, final norm, output head and the MTP modules.

use crate::dtype::{DType, TensorType};
use crate::error::GraphError;
use crate::graph::{Graph, GraphBuilder, Tensor};
use crate::module::{Module, Param, Scope};
use crate::spec::ModelSpec;

use super::basic::{Embedding, EmbeddingShape, Linear, LinearShape, NormConfig, RmsNorm, linear};
use super::decoder::{DecoderBlock, Layer, LayerConfig};
use super::mla::AttentionContext;
use super::moe::Routing;
use super::mtp::MtpModule;

/// A DeepSeek-V3-style causal language model, generic over its block type `L`.
#[derive(Clone, Debug)]
pub struct DeepSeekV3<L = DecoderBlock> {
    pub embed_tokens: Embedding,
    pub layers: Vec<L>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    pub mtp: Vec<MtpModule>,
    spec: ModelSpec,
}

/// The tensors a forward pass produces.
#[derive(Clone, Debug)]
pub struct ModelOutputs {
    /// The `i64 [batch, seq]` token ids the pass read.
    pub token_ids: Tensor,
    /// `[batch, seq, vocab]`.
    pub logits: Tensor,
    /// MTP depth k's logits, `[batch, seq - k, vocab]`; position i predicts token i + k + 1.
    pub mtp_logits: Vec<Tensor>,
    /// Routing of every MoE block in order (main blocks, then MTP blocks).
    pub routings: Vec<Routing>,
}

impl<L> Module for DeepSeekV3<L>
where
    L: Module<Config = LayerConfig> + Layer,
{
    type Config = ModelSpec;

    fn declare(scope: &mut Scope<'_>, spec: &ModelSpec) -> Result<Self, GraphError> {
        Self::declare_with(scope, spec, |scope, config| L::declare(scope, config))
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        self.embed_tokens.visit_parameters(visit);
        self.layers.visit_parameters(visit);
        self.norm.visit_parameters(visit);
        if let Some(head) = &self.lm_head {
            head.visit_parameters(visit);
        }
        for module in &self.mtp {
            module.visit_parameters(visit);
        }
    }
}

impl<L: Layer> DeepSeekV3<L> {
    /// Declares the model with `declare_layer` making each main block (MTP blocks are always
    /// [`DecoderBlock`]s, as in DeepSeek-V3's checkpoints). Names follow the HF layout.
    pub fn declare_with(
        scope: &mut Scope<'_>,
        spec: &ModelSpec,
        mut declare_layer: impl FnMut(&mut Scope<'_>, &LayerConfig) -> Result<L, GraphError>,
    ) -> Result<Self, GraphError> {
        if let Some(e) = spec.validate().into_iter().next() {
            return Err(GraphError::Spec {
                field: e.field,
                message: e.message,
            });
        }
        let mut model = scope.child("model");
        let embed_tokens = model.declare(
            "embed_tokens",
            &EmbeddingShape {
                vocab_size: spec.vocab_size,
                dim: spec.hidden_size,
            },
        )?;
        let mut layers = Vec::with_capacity(spec.layers);
        for index in 0..spec.layers {
            let config = LayerConfig {
                spec: spec.clone(),
                index,
            };
            layers.push(declare_layer(
                &mut model.child(&format!("layers.{index}")),
                &config,
            )?);
        }
        let norm = model.declare("norm", &NormConfig::new(spec.hidden_size, spec.norm_eps))?;
        let mut mtp = Vec::with_capacity(spec.mtp_depth);
        for depth in 1..=spec.mtp_depth {
            let config = LayerConfig {
                spec: spec.clone(),
                index: spec.layers + depth - 1,
            };
            mtp.push(model.declare(&format!("layers.{}", config.index), &config)?);
        }
        let lm_head = if spec.tie_embeddings {
            None
        } else {
            let shape = LinearShape::new(spec.hidden_size, spec.vocab_size);
            Some(scope.declare("lm_head", &shape)?)
        };
        Ok(DeepSeekV3 {
            embed_tokens,
            layers,
            norm,
            lm_head,
            mtp,
            spec: spec.clone(),
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// `token_ids`: `i64 [batch, seq]`. MTP logits are computed when `with_mtp`.
    pub fn forward(
        &self,
        g: &mut GraphBuilder,
        token_ids: Tensor,
        with_mtp: bool,
    ) -> Result<ModelOutputs, GraphError> {
        let seq = g.dims(token_ids)[1];
        let ctx = self.attention_context(g, seq)?;
        let hidden = self.embed_tokens.forward(g, token_ids)?;
        let (hidden, mut routings) = self.blocks(g, hidden, 0..self.layers.len(), &ctx)?;
        let heads = self.heads(g, hidden, token_ids, &ctx, with_mtp)?;
        routings.extend(heads.routings);
        Ok(ModelOutputs {
            token_ids,
            logits: heads.logits,
            mtp_logits: heads.mtp_logits,
            routings,
        })
    }

    /// The rotary tables and causal mask every block of a `seq`-token pass reads (constants).
    pub fn attention_context(
        &self,
        g: &mut GraphBuilder,
        seq: usize,
    ) -> Result<AttentionContext, GraphError> {
        g.within("model", |g| AttentionContext::build(g, &self.spec, seq))
    }

    /// The main blocks `range` applied in order to `hidden`; returns the last one's output and
    /// the routings of the MoE blocks among them. A pipeline stage runs a range of blocks.
    pub fn blocks(
        &self,
        g: &mut GraphBuilder,
        mut hidden: Tensor,
        range: std::ops::Range<usize>,
        ctx: &AttentionContext,
    ) -> Result<(Tensor, Vec<Routing>), GraphError> {
        let mut routings = Vec::new();
        for layer in &self.layers[range] {
            let out = layer.forward(g, hidden, ctx)?;
            hidden = out.hidden;
            routings.extend(out.routing);
        }
        Ok((hidden, routings))
    }

    /// Everything after the last main block: final norm and head, and (when `with_mtp`) the MTP
    /// modules with their shared head. `hidden` is the last main block's output.
    pub fn heads(
        &self,
        g: &mut GraphBuilder,
        hidden: Tensor,
        token_ids: Tensor,
        ctx: &AttentionContext,
        with_mtp: bool,
    ) -> Result<HeadOutputs, GraphError> {
        let normed = self.norm.forward(g, hidden)?;
        let logits = self.head(g, normed)?;
        let mut mtp_logits = Vec::new();
        let mut routings = Vec::new();
        if with_mtp {
            let mut hidden = hidden;
            for (k, module) in (1..).zip(&self.mtp) {
                let out = module.forward(g, hidden, token_ids, k, ctx, &self.embed_tokens)?;
                hidden = out.hidden;
                routings.extend(out.routing);
                let normed = module.shared_head_norm.forward(g, hidden)?;
                mtp_logits.push(self.head(g, normed)?);
            }
        }
        Ok(HeadOutputs {
            logits,
            mtp_logits,
            routings,
        })
    }

    /// The output head shared by the main model and the MTP modules.
    fn head(&self, g: &mut GraphBuilder, normed: Tensor) -> Result<Tensor, GraphError> {
        match &self.lm_head {
            Some(head) => head.forward(g, normed),
            None => g.within("lm_head", |g| {
                linear(g, normed, self.embed_tokens.weight.tensor)
            }),
        }
    }
}

/// What [`DeepSeekV3::heads`] computes.
#[derive(Clone, Debug)]
pub struct HeadOutputs {
    pub logits: Tensor,
    pub mtp_logits: Vec<Tensor>,
    /// The MTP blocks' routings.
    pub routings: Vec<Routing>,
}

/// What a forward graph is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardOptions {
    pub batch: usize,
    pub seq: usize,
    /// Also compute the MTP modules' logits (`mtp_logits.1`, ...).
    pub with_mtp: bool,
}

/// The forward graph of the built-in DeepSeek-V3 model: input `input_ids` (`i64 [batch, seq]`),
/// outputs `logits` and, with MTP, `mtp_logits.k`.
pub fn forward_graph(spec: &ModelSpec, options: ForwardOptions) -> Result<Graph, GraphError> {
    let mut g = GraphBuilder::new("deepseek_v3");
    let model: DeepSeekV3 = DeepSeekV3::declare(&mut Scope::root(&mut g), spec)?;
    forward_outputs(&mut g, &model, options)?;
    Ok(g.finish())
}

/// The smallest graph declaring every parameter of the model (one token, no MTP pass): enough to
/// check, initialise or count the weights.
pub fn parameter_graph(spec: &ModelSpec) -> Result<Graph, GraphError> {
    let options = ForwardOptions {
        batch: 1,
        seq: 1,
        with_mtp: false,
    };
    forward_graph(spec, options)
}

/// Adds `input_ids`, the forward pass and its named outputs to `g`.
pub fn forward_outputs<L: Layer>(
    g: &mut GraphBuilder,
    model: &DeepSeekV3<L>,
    options: ForwardOptions,
) -> Result<ModelOutputs, GraphError> {
    let spec = model.spec();
    let ForwardOptions {
        batch,
        seq,
        with_mtp,
    } = options;
    if batch == 0 || seq == 0 {
        return Err(GraphError::InvalidRequest(format!(
            "batch ({batch}) and sequence length ({seq}) must be at least 1"
        )));
    }
    if seq > spec.max_positions {
        return Err(GraphError::InvalidRequest(format!(
            "sequence length {seq} exceeds the model's max_positions ({})",
            spec.max_positions
        )));
    }
    if with_mtp && seq <= spec.mtp_depth {
        return Err(GraphError::InvalidRequest(format!(
            "MTP depth {} needs sequences longer than {} tokens, got {seq}",
            spec.mtp_depth, spec.mtp_depth
        )));
    }
    let ids = g.input("input_ids", TensorType::new(DType::I64, [batch, seq]))?;
    let outputs = model.forward(g, ids, with_mtp)?;
    g.output("logits", outputs.logits)?;
    for (k, logits) in (1..).zip(&outputs.mtp_logits) {
        g.output(&format!("mtp_logits.{k}"), *logits)?;
    }
    Ok(outputs)
}
