//! One pipeline stage's training graph, built from the model library.

use crate::autodiff::backward;
use crate::dtype::{DType, TensorType};
use crate::error::GraphError;
use crate::graph::{Graph, GraphBuilder, NodeId, ReduceOp, Tensor};
use crate::model::{
    DeepSeekV3, LossWeights, balance_loss, balancing_bias_name, expert_load, mtp_loss,
    next_token_loss,
};
use crate::module::{Module, Scope};
use crate::passes::dead_code;
use crate::spec::ModelSpec;

use super::StagePlan;

/// The names of a stage graph's inputs and outputs, besides `grad.<parameter>`,
/// `expert_load.<bias>` and the losses `loss.next_token`, `loss.mtp` (last stage) and
/// `loss.balance` (the unweighted sum over the stage's own MoE layers).
pub mod names {
    /// `i64 [batch, seq]`, on the first stage (embedding) and the last (losses, MTP).
    pub const INPUT_IDS: &str = "input_ids";
    /// The previous stage's output (every stage but the first).
    pub const HIDDEN_IN: &str = "hidden.in";
    /// This stage's output, for the next stage (every stage but the last).
    pub const HIDDEN_OUT: &str = "hidden.out";
    /// The gradient of the loss with respect to `hidden.out`, from the next stage.
    pub const GRAD_HIDDEN_OUT: &str = "grad.hidden.out";
    /// The gradient of the loss with respect to `hidden.in`, for the previous stage.
    pub const GRAD_HIDDEN_IN: &str = "grad.hidden.in";
}

/// A stage's forward and backward pass for one micro-batch.
#[derive(Clone, Debug)]
pub struct StageGraph {
    pub stage: usize,
    pub graph: Graph,
    /// The trainable parameters the stage uses, each with an output `grad.<name>`. The
    /// embedding appears on the first and the last stage (the MTP modules embed tokens too,
    /// and a tied head reads it): such a parameter's gradient is the sum over its stages.
    pub parameters: Vec<String>,
    /// The balancing biases of the stage's MoE layers, each with an output
    /// `expert_load.<name>`.
    pub balancing_biases: Vec<String>,
}

/// The training graph of stage `stage` of `plan` for `[batch, seq]` micro-batches.
pub fn stage_graph(
    spec: &ModelSpec,
    plan: &StagePlan,
    stage: usize,
    batch: usize,
    seq: usize,
    losses: LossWeights,
) -> Result<StageGraph, GraphError> {
    let range = plan.ranges.get(stage).cloned().ok_or_else(|| {
        GraphError::InvalidRequest(format!(
            "stage {stage} does not exist: the plan has {} stages",
            plan.stages()
        ))
    })?;
    let (first, last) = (plan.is_first(stage), plan.is_last(stage));
    let with_mtp = losses.mtp.is_some() && spec.mtp_depth > 0;
    if with_mtp && seq < spec.mtp_depth + 2 {
        return Err(GraphError::InvalidRequest(format!(
            "the MTP loss of depth {} needs sequences of at least {} tokens, got {seq}",
            spec.mtp_depth,
            spec.mtp_depth + 2
        )));
    }

    let mut g = GraphBuilder::new(format!("deepseek_v3_train_stage{stage}"));
    // Every parameter is declared (so names and shapes are the model's); the ones this stage
    // does not use are dropped with the rest of the dead code at the end.
    let model: DeepSeekV3 = DeepSeekV3::declare(&mut Scope::root(&mut g), spec)?;
    let hidden_ty = TensorType::new(DType::F32, [batch, seq, spec.hidden_size]);
    let ids = match first || last {
        true => Some(g.input(names::INPUT_IDS, TensorType::new(DType::I64, [batch, seq]))?),
        false => None,
    };
    let ctx = model.attention_context(&mut g, seq)?;
    let hidden_in = match (first, ids) {
        (true, Some(ids)) => model.embed_tokens.forward(&mut g, ids)?,
        _ => g.input(names::HIDDEN_IN, hidden_ty.clone())?,
    };
    let (hidden, mut routings) = model.blocks(&mut g, hidden_in, range, &ctx)?;

    let objective = g.within("loss", |g| -> Result<Tensor, GraphError> {
        let mut objective = match (last, ids) {
            (true, Some(ids)) => {
                let heads = model.heads(g, hidden, ids, &ctx, with_mtp)?;
                routings.extend(heads.routings);
                let next_token = next_token_loss(g, heads.logits, ids)?;
                g.output("loss.next_token", next_token)?;
                let mut total = next_token;
                if let (Some(lambda), true) = (losses.mtp, with_mtp) {
                    let mtp = mtp_loss(g, &heads.mtp_logits, ids)?;
                    g.output("loss.mtp", mtp)?;
                    let weighted = g.scale(mtp, lambda)?;
                    total = g.add(total, weighted)?;
                }
                total
            }
            _ => {
                g.output(names::HIDDEN_OUT, hidden)?;
                let incoming = g.input(names::GRAD_HIDDEN_OUT, hidden_ty.clone())?;
                vector_jacobian_seed(g, hidden, incoming)?
            }
        };
        if let Some(alpha) = losses.balance
            && let Some(sum) = balance_loss(g, &routings, batch)?
        {
            g.output("loss.balance", sum)?;
            let weighted = g.scale(sum, alpha)?;
            objective = g.add(objective, weighted)?;
        }
        Ok(objective)
    })?;

    let mut balancing_biases = Vec::new();
    for routing in &routings {
        let load = g.within("loss", |g| expert_load(g, routing))?;
        let name = balancing_bias_name(g.graph(), routing.bias)?;
        g.output(&format!("expert_load.{name}"), load)?;
        balancing_biases.push(name);
    }

    let graph = g.finish();
    let used = ancestors(&graph, objective.id());
    let mut wrt = Vec::new();
    let mut parameters = Vec::new();
    for (id, name, _) in graph.parameters() {
        if graph.is_trainable(id) && used[id.index()] {
            wrt.push(id);
            parameters.push(name.to_owned());
        }
    }
    if !first {
        wrt.push(hidden_in.id());
    }
    let grads = backward(graph, objective.id(), &wrt)?;
    let mut g = GraphBuilder::from_graph(grads.graph);
    for (name, (_, gradient)) in parameters.iter().zip(&grads.gradients) {
        g.output(&format!("grad.{name}"), Tensor(*gradient))?;
    }
    if !first {
        let (_, gradient) = grads.gradients[parameters.len()];
        g.output(names::GRAD_HIDDEN_IN, Tensor(gradient))?;
    }
    Ok(StageGraph {
        stage,
        graph: dead_code(&g.finish()),
        parameters,
        balancing_biases,
    })
}

/// `Σ hidden ⊙ incoming`: its gradient with respect to `hidden` is `incoming` exactly, so the
/// stage's backward continues the later stages' backward.
fn vector_jacobian_seed(
    g: &mut GraphBuilder,
    hidden: Tensor,
    incoming: Tensor,
) -> Result<Tensor, GraphError> {
    let product = g.mul(hidden, incoming)?;
    let count = g.dims(product).iter().product::<usize>();
    let flat = g.reshape(product, &[count])?;
    g.reduce(ReduceOp::Sum, flat, 0, false)
}

/// Which nodes `root` depends on (itself included).
fn ancestors(graph: &Graph, root: NodeId) -> Vec<bool> {
    let mut seen = vec![false; graph.nodes.len()];
    seen[root.index()] = true;
    for i in (0..=root.index()).rev() {
        if seen[i] {
            for input in &graph.nodes[i].inputs {
                seen[input.index()] = true;
            }
        }
    }
    seen
}
