//! The model library, written with the graph builder: the modules of DeepSeek-V3 with the
//! semantics of the Hugging Face `transformers` DeepseekV3 model (our numerical oracle).

mod basic;
mod decoder;
mod deepseek;
mod loss;
mod mla;
mod moe;
mod mtp;
mod objective;
pub mod rope;
mod summary;

pub use basic::{
    Embedding, EmbeddingShape, Linear, LinearShape, Mlp, MlpShape, NormConfig, RmsNorm, linear,
    swiglu,
};
pub use decoder::{DecoderBlock, FeedForward, Layer, LayerConfig, LayerOutput};
pub use deepseek::{
    DeepSeekV3, ForwardOptions, HeadOutputs, ModelOutputs, forward_graph, forward_outputs,
    parameter_graph,
};
pub use loss::{
    cross_entropy, expert_load, mtp_depth_loss, next_token_loss, sequence_balance_loss,
};
pub use mla::{AttentionContext, LATENT_NORM_EPS, Mla, QueryPath};
pub use moe::{Moe, Router, Routing, balancing_bias_name};
pub use mtp::MtpModule;
pub use objective::{LossTerms, LossWeights, add_objective, balance_loss, mtp_loss};
pub use rope::RopeTables;
pub use summary::{ParameterSummary, grouped};
