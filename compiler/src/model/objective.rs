//! The training objective: which losses, with which weights, added to a forward graph.

use serde::{Deserialize, Serialize};

use crate::error::GraphError;
use crate::graph::{GraphBuilder, Tensor};

use super::decoder::Layer;
use super::deepseek::{DeepSeekV3, ForwardOptions, ModelOutputs, forward_outputs};
use super::loss::{expert_load, mtp_depth_loss, next_token_loss, sequence_balance_loss};
use super::moe::Routing;

/// Weights of the loss terms. The next-token loss always counts with weight 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossWeights {
    /// λ of the MTP loss `λ/D Σ_k CE_k` (DeepSeek-V3: 0.3, later 0.1); `None` switches it off.
    #[serde(default)]
    pub mtp: Option<f64>,
    /// α of the sequence-wise balance loss (DeepSeek-V3: 0.0001); `None` switches it off.
    #[serde(default)]
    pub balance: Option<f64>,
}

impl LossWeights {
    /// DeepSeek-V3's weights for the first 10T tokens.
    pub fn deepseek_v3() -> Self {
        LossWeights {
            mtp: Some(0.3),
            balance: Some(0.0001),
        }
    }

    /// The next-token loss alone (what `transformers` reports with `labels=input_ids`).
    pub fn next_token_only() -> Self {
        LossWeights {
            mtp: None,
            balance: None,
        }
    }
}

/// The loss nodes of a training graph.
#[derive(Clone, Debug)]
pub struct LossTerms {
    /// The weighted sum that is differentiated.
    pub total: Tensor,
    pub next_token: Tensor,
    /// The MTP loss before weighting by λ: `1/D Σ_k CE_k`.
    pub mtp: Option<Tensor>,
    /// Unweighted sum over MoE layers of the sequence-wise balance loss.
    pub balance: Option<Tensor>,
    /// Per MoE layer: its balancing bias and the tokens routed to each expert in this batch.
    pub loads: Vec<(Tensor, Tensor)>,
    pub outputs: ModelOutputs,
}

/// Adds `input_ids`, the forward pass and the losses to `g`, with graph outputs `loss`,
/// `loss.next_token`, `loss.mtp`, `loss.balance` (those switched on) and `logits`.
pub fn add_objective<L: Layer>(
    g: &mut GraphBuilder,
    model: &DeepSeekV3<L>,
    batch: usize,
    seq: usize,
    weights: LossWeights,
) -> Result<LossTerms, GraphError> {
    let depth = model.spec().mtp_depth;
    let with_mtp = weights.mtp.is_some() && depth > 0;
    if with_mtp && seq < depth + 2 {
        return Err(GraphError::InvalidRequest(format!(
            "the MTP loss of depth {depth} needs sequences of at least {} tokens, got {seq}",
            depth + 2
        )));
    }
    let options = ForwardOptions {
        batch,
        seq,
        with_mtp,
    };
    let outputs = forward_outputs(g, model, options)?;
    let ids = outputs.token_ids;
    g.within("loss", |g| {
        let next_token = next_token_loss(g, outputs.logits, ids)?;
        let mut total = next_token;
        g.output("loss.next_token", next_token)?;

        let mtp = match weights.mtp.filter(|_| with_mtp) {
            Some(lambda) => {
                let mean = mtp_loss(g, &outputs.mtp_logits, ids)?;
                g.output("loss.mtp", mean)?;
                let weighted = g.scale(mean, lambda)?;
                total = g.add(total, weighted)?;
                Some(mean)
            }
            None => None,
        };

        let balance = match weights.balance.filter(|_| !outputs.routings.is_empty()) {
            Some(alpha) => {
                let sum =
                    balance_loss(g, &outputs.routings, batch)?.expect("routings is not empty");
                g.output("loss.balance", sum)?;
                let weighted = g.scale(sum, alpha)?;
                total = g.add(total, weighted)?;
                Some(sum)
            }
            None => None,
        };

        let mut loads = Vec::new();
        for routing in &outputs.routings {
            loads.push((routing.bias, expert_load(g, routing)?));
        }
        g.output("loss", total)?;
        Ok(LossTerms {
            total,
            next_token,
            mtp,
            balance,
            loads,
            outputs: outputs.clone(),
        })
    })
}

/// The MTP loss before weighting by λ: `1/D Σ_k CE_k`, depth k's logits predicting token
/// i + k + 1 of `token_ids`.
pub fn mtp_loss(
    g: &mut GraphBuilder,
    mtp_logits: &[Tensor],
    token_ids: Tensor,
) -> Result<Tensor, GraphError> {
    let mut sum = None;
    for (k, logits) in (1..).zip(mtp_logits) {
        let ce = mtp_depth_loss(g, *logits, token_ids, k)?;
        sum = Some(match sum {
            None => ce,
            Some(s) => g.add(s, ce)?,
        });
    }
    let sum = sum.ok_or_else(|| {
        GraphError::InvalidRequest("the MTP loss needs at least one MTP module".into())
    })?;
    g.scale(sum, 1.0 / mtp_logits.len() as f64)
}

/// The unweighted sum of the sequence-wise balance loss over `routings`; `None` without any.
pub fn balance_loss(
    g: &mut GraphBuilder,
    routings: &[Routing],
    batch: usize,
) -> Result<Option<Tensor>, GraphError> {
    let mut sum = None;
    for routing in routings {
        let b = sequence_balance_loss(g, routing, batch)?;
        sum = Some(match sum {
            None => b,
            Some(s) => g.add(s, b)?,
        });
    }
    Ok(sum)
}
