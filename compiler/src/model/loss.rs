//! The training losses of DeepSeek-V3: next-token cross-entropy, the MTP loss and the
//! complementary sequence-wise balance loss (§2.1.2, §2.2).

use crate::dtype::DType;
use crate::error::GraphError;
use crate::graph::{GraphBuilder, ReduceOp, Tensor};

use super::moe::Routing;

/// Mean cross-entropy of `logits` (`[batch, positions, vocab]`) against `labels`
/// (`i64 [batch, positions]`) over the rows whose label is not negative (`counted` of them):
/// `Σ_rows (log Σ exp(logits) − logits[label]) / counted`, one fused op per row
/// ([`GraphBuilder::cross_entropy`]).
pub fn cross_entropy(
    g: &mut GraphBuilder,
    logits: Tensor,
    labels: Tensor,
    counted: usize,
) -> Result<Tensor, GraphError> {
    let per_row = g.cross_entropy(logits, labels)?;
    let rows: usize = g.dims(per_row).iter().product();
    let per_row = g.reshape(per_row, &[rows])?;
    let total = g.reduce(ReduceOp::Sum, per_row, 0, false)?;
    g.scale(total, 1.0 / counted.max(1) as f64)
}

/// The next-token loss, as `transformers` computes it with `labels = input_ids`: position `i`
/// predicts token `i + 1`, averaged over `batch × (seq − 1)` positions.
pub fn next_token_loss(
    g: &mut GraphBuilder,
    logits: Tensor,
    token_ids: Tensor,
) -> Result<Tensor, GraphError> {
    shifted_loss(g, logits, token_ids, 1)
}

/// MTP depth `k`'s loss: its logits (`[batch, seq − k, vocab]`) at position `i` predict token
/// `i + k + 1`, so the last position has no target and is dropped.
pub fn mtp_depth_loss(
    g: &mut GraphBuilder,
    logits: Tensor,
    token_ids: Tensor,
    k: usize,
) -> Result<Tensor, GraphError> {
    shifted_loss(g, logits, token_ids, k + 1)
}

/// Cross-entropy of `logits[:, i]` against `token_ids[:, i + offset]` for every `i` that has a
/// target.
fn shifted_loss(
    g: &mut GraphBuilder,
    logits: Tensor,
    token_ids: Tensor,
    offset: usize,
) -> Result<Tensor, GraphError> {
    let seq = g.dims(token_ids)[1];
    if seq <= offset {
        return Err(GraphError::InvalidRequest(format!(
            "a loss predicting {offset} token(s) ahead needs sequences longer than {offset}, got {seq}"
        )));
    }
    let batch = g.dims(token_ids)[0];
    let positions = seq - offset;
    let targets = g.slice(token_ids, 1, offset, seq)?;
    let predicted = g.dims(logits)[1];
    let labels = if predicted <= positions {
        targets
    } else {
        // The last positions of the logits have no target: they are ignored (label −1)
        // rather than sliced off, which would cost a copy of the logits and of their gradient.
        let ignored = g.scalar(-1.0, g.dtype(token_ids))?;
        let ignored = g.expand(ignored, &[batch, predicted - positions])?;
        g.concat(&[targets, ignored], 1)?
    };
    cross_entropy(g, logits, labels, batch * positions)
}

/// The complementary sequence-wise balance loss of one MoE layer, averaged over sequences:
/// `Σ_i f_i P_i` with `f_i = N_r / (K_r T) · #tokens of the sequence routed to i` and
/// `P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t}`. The counts come from the routing decision and carry
/// no gradient; `P` does. The caller multiplies by α.
pub fn sequence_balance_loss(
    g: &mut GraphBuilder,
    routing: &Routing,
    batch: usize,
) -> Result<Tensor, GraphError> {
    let scores_dims = g.dims(routing.scores).to_vec();
    let (tokens, experts) = (scores_dims[0], scores_dims[1]);
    let chosen = g.dims(routing.experts)[1];
    let seq = tokens / batch;

    let counts = expert_counts(g, routing.experts, experts)?; // [tokens, experts]
    let counts = g.reshape(counts, &[batch, seq, experts])?;
    let counts = g.reduce(ReduceOp::Sum, counts, 1, false)?; // [batch, experts]
    let f = g.scale(counts, experts as f64 / (chosen * seq) as f64)?;

    let total = g.reduce(ReduceOp::Sum, routing.scores, 1, true)?;
    let normalised = g.div(routing.scores, total)?;
    let normalised = g.reshape(normalised, &[batch, seq, experts])?;
    let p = g.reduce(ReduceOp::Mean, normalised, 1, false)?; // [batch, experts]

    let fp = g.mul(f, p)?;
    let per_sequence = g.reduce(ReduceOp::Sum, fp, 1, false)?;
    g.reduce(ReduceOp::Mean, per_sequence, 0, false)
}

/// `[tokens, experts]`: 1 where the token was routed to the expert.
fn expert_counts(
    g: &mut GraphBuilder,
    chosen: Tensor,
    experts: usize,
) -> Result<Tensor, GraphError> {
    let hot = g.one_hot(chosen, experts, DType::F32)?; // [tokens, k, experts]
    g.reduce(ReduceOp::Sum, hot, 1, false)
}

/// Tokens routed to each expert in this batch (`f32 [experts]`), for the balancing-bias update
/// and for load statistics.
pub fn expert_load(g: &mut GraphBuilder, routing: &Routing) -> Result<Tensor, GraphError> {
    let experts = g.dims(routing.scores)[1];
    let counts = expert_counts(g, routing.experts, experts)?;
    g.reduce(ReduceOp::Sum, counts, 0, false)
}
