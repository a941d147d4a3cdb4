//! The training graph: forward pass, losses and the gradient of every trainable parameter.

use crate::autodiff::backward_parameters;
use crate::error::GraphError;
use crate::graph::{Graph, GraphBuilder};
use crate::model::{
    DeepSeekV3, Layer, LayerConfig, LossWeights, add_objective, balancing_bias_name,
};
use crate::module::{Module, Scope};
use crate::spec::ModelSpec;

/// A graph that computes, for one micro-batch `input_ids` (`i64 [batch, seq]`), the outputs
/// `loss` (the weighted total), `loss.next_token`, `loss.mtp` and `loss.balance` (those switched
/// on), `grad.<parameter>` for every trainable parameter, and `expert_load.<bias>` (tokens per
/// expert, f32) for the balancing bias of every MoE layer.
#[derive(Clone, Debug)]
pub struct TrainingGraph {
    pub graph: Graph,
    pub batch: usize,
    pub seq: usize,
    /// Trainable parameters, in declaration order; each has the output `grad.<name>`.
    pub parameters: Vec<String>,
    /// Balancing biases, one per MoE layer; each has the output `expert_load.<name>`.
    pub balancing_biases: Vec<String>,
}

impl TrainingGraph {
    /// The graph without the forward's `logits` and `mtp_logits.<depth>` outputs, which a
    /// training run never reads: kept, each holds a vocabulary-wide array alive to the end of
    /// every step and keeps its head from being one routine
    /// (`lower::LowerOptions::linear_cross_entropy_routines`).
    pub fn without_logits(mut self) -> Self {
        let logits = |name: &str| name == "logits" || name.starts_with("mtp_logits.");
        self.graph.outputs.retain(|output| !logits(&output.name));
        self
    }

    /// Each trainable parameter, in declaration order, with the output holding its gradient.
    pub fn gradient_outputs(&self) -> Vec<(String, String)> {
        (self.parameters.iter())
            .map(|name| (name.clone(), format!("grad.{name}")))
            .collect()
    }
}

/// The training graph of the built-in DeepSeek-V3 model.
pub fn training_graph(
    spec: &ModelSpec,
    batch: usize,
    seq: usize,
    weights: LossWeights,
) -> Result<TrainingGraph, GraphError> {
    let mut g = GraphBuilder::new("deepseek_v3_train");
    let model: DeepSeekV3 = DeepSeekV3::declare(&mut Scope::root(&mut g), spec)?;
    training_graph_of(g, &model, batch, seq, weights)
}

/// The training graph of any model declared in `g` (with your own block type, say).
pub fn training_graph_of<L>(
    mut g: GraphBuilder,
    model: &DeepSeekV3<L>,
    batch: usize,
    seq: usize,
    weights: LossWeights,
) -> Result<TrainingGraph, GraphError>
where
    L: Layer + Module<Config = LayerConfig>,
{
    let terms = add_objective(&mut g, model, batch, seq, weights)?;
    let mut balancing_biases = Vec::new();
    for (bias, load) in &terms.loads {
        let name = balancing_bias_name(g.graph(), *bias)?;
        g.output(&format!("expert_load.{name}"), *load)?;
        balancing_biases.push(name);
    }
    let graph = g.finish();
    let parameters = graph
        .parameters()
        .filter(|(id, _, _)| graph.is_trainable(*id))
        .map(|(_, name, _)| name.to_owned())
        .collect();
    let backward = backward_parameters(graph, terms.total.id())?;
    Ok(TrainingGraph {
        graph: backward.graph,
        batch,
        seq,
        parameters,
        balancing_biases,
    })
}
