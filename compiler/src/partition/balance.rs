//! Which decoder layers each pipeline stage runs: contiguous ranges of about equal cost.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::GraphError;
use crate::graph::{Graph, Node, Op};
use crate::model::{ForwardOptions, forward_graph};
use crate::spec::ModelSpec;

/// The forward cost of the model's parts for one sequence, in FLOPs (2 per multiply-add of a
/// matmul; one per output element of any other op, a rough but monotone stand-in for memory
/// traffic).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerCosts {
    /// The embedding lookup (first stage).
    pub embedding: f64,
    /// One entry per main decoder layer.
    pub layers: Vec<f64>,
    /// Final norm, output head, MTP modules and losses (last stage).
    pub head: f64,
}

/// The costs of `spec`'s parts at `seq` tokens, measured on its forward graph (with the MTP
/// modules when `with_mtp`) by the module each node came from.
pub fn layer_costs(spec: &ModelSpec, seq: usize, with_mtp: bool) -> Result<LayerCosts, GraphError> {
    let options = ForwardOptions {
        batch: 1,
        seq,
        with_mtp,
    };
    let graph = forward_graph(spec, options)?;
    let mut costs = LayerCosts {
        embedding: 0.0,
        layers: vec![0.0; spec.layers],
        head: 0.0,
    };
    for node in &graph.nodes {
        let cost = node_cost(&graph, node);
        match part_of(&node.origin, spec.layers) {
            Part::Embedding => costs.embedding += cost,
            Part::Layer(i) => costs.layers[i] += cost,
            Part::Head => costs.head += cost,
            Part::Shared => {}
        }
    }
    Ok(costs)
}

enum Part {
    Embedding,
    Layer(usize),
    Head,
    /// The attention context (rotary tables, mask): every stage builds its own.
    Shared,
}

fn part_of(origin: &str, main_layers: usize) -> Part {
    if origin == "model" {
        return Part::Shared;
    }
    if origin.starts_with("model.embed_tokens") {
        return Part::Embedding;
    }
    let layer = origin
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|index| index.parse::<usize>().ok());
    match layer {
        Some(i) if i < main_layers => Part::Layer(i),
        // MTP blocks (stored as layers L, L+1, ...), the final norm, the head and the losses.
        _ => Part::Head,
    }
}

fn node_cost(graph: &Graph, node: &Node) -> f64 {
    let elements = node.ty.dims().iter().product::<usize>() as f64;
    let reduced = || {
        let a = graph.ty(node.inputs[0]);
        a.dims().last().copied().unwrap_or(1) as f64
    };
    match node.op {
        Op::MatMul { .. } | Op::GroupedMatMul { .. } => 2.0 * elements * reduced(),
        Op::Input { .. } | Op::Parameter { .. } | Op::Constant(_) => 0.0,
        _ => elements,
    }
}

/// Decoder layers per pipeline stage, with the cost that decided the split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// `ranges[s]`: the main layers stage s runs, contiguous and in order.
    pub ranges: Vec<Range<usize>>,
    /// Each stage's cost, its end parts included.
    pub costs: Vec<f64>,
}

impl StagePlan {
    /// Splits the layers into `stages` contiguous ranges, each with at least one layer, so that
    /// the most expensive stage (the first counting the embedding, the last the head) is as
    /// cheap as possible.
    pub fn balanced(costs: &LayerCosts, stages: usize) -> Result<StagePlan, GraphError> {
        let layers = costs.layers.len();
        if stages == 0 || stages > layers {
            return Err(GraphError::InvalidRequest(format!(
                "{stages} pipeline stages need between 1 and {layers} (one decoder layer each at \
                 least; the model has {layers})"
            )));
        }
        let ends = min_max_split(costs, stages);
        let mut ranges = Vec::with_capacity(stages);
        let mut start = 0;
        for end in ends {
            ranges.push(start..end);
            start = end;
        }
        let stage_costs = ranges
            .iter()
            .enumerate()
            .map(|(s, r)| stage_cost(costs, s, stages, r.clone()))
            .collect();
        Ok(StagePlan {
            ranges,
            costs: stage_costs,
        })
    }

    /// Explicit ranges (checked: contiguous from 0, none empty, covering `layers`).
    pub fn from_ranges(ranges: Vec<Range<usize>>, layers: usize) -> Result<StagePlan, GraphError> {
        let mut next = 0;
        for (s, r) in ranges.iter().enumerate() {
            if r.start != next || r.end <= r.start {
                return Err(GraphError::InvalidRequest(format!(
                    "stage {s} runs layers {}..{}, but stages must be non-empty and follow each \
                     other from layer 0",
                    r.start, r.end
                )));
            }
            next = r.end;
        }
        if next != layers {
            return Err(GraphError::InvalidRequest(format!(
                "the stages cover layers 0..{next}, the model has {layers}"
            )));
        }
        Ok(StagePlan {
            costs: vec![f64::NAN; ranges.len()],
            ranges,
        })
    }

    pub fn stages(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_first(&self, stage: usize) -> bool {
        stage == 0
    }

    pub fn is_last(&self, stage: usize) -> bool {
        stage + 1 == self.ranges.len()
    }
}

fn stage_cost(costs: &LayerCosts, stage: usize, stages: usize, range: Range<usize>) -> f64 {
    let mut cost: f64 = costs.layers[range].iter().sum();
    if stage == 0 {
        cost += costs.embedding;
    }
    if stage + 1 == stages {
        cost += costs.head;
    }
    cost
}

/// The end (exclusive) of each stage's range minimising the largest stage cost: dynamic
/// programming over (stages used, layers covered); ties go to the earliest cut.
fn min_max_split(costs: &LayerCosts, stages: usize) -> Vec<usize> {
    let layers = costs.layers.len();
    // best[s][n]: the smallest achievable max cost covering layers 0..n with stages 0..s,
    // and cut[s][n] where stage s-1 begins.
    let mut best = vec![vec![f64::INFINITY; layers + 1]; stages + 1];
    let mut cut = vec![vec![0usize; layers + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for n in s..=layers {
            for start in (s - 1)..n {
                let previous = best[s - 1][start];
                if !previous.is_finite() {
                    continue;
                }
                let candidate = previous.max(stage_cost(costs, s - 1, stages, start..n));
                if candidate < best[s][n] {
                    best[s][n] = candidate;
                    cut[s][n] = start;
                }
            }
        }
    }
    let mut ends = vec![0; stages];
    let mut n = layers;
    for s in (1..=stages).rev() {
        ends[s - 1] = n;
        n = cut[s][n];
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(layers: &[f64], embedding: f64, head: f64) -> LayerCosts {
        LayerCosts {
            embedding,
            layers: layers.to_vec(),
            head,
        }
    }

    #[test]
    fn equal_layers_split_evenly_and_the_head_pushes_layers_forward() {
        let plan = StagePlan::balanced(&costs(&[1.0; 8], 0.0, 0.0), 4).unwrap();
        assert_eq!(plan.ranges, vec![0..2, 2..4, 4..6, 6..8]);
        // A head as expensive as two layers: the last stage keeps fewer layers.
        let plan = StagePlan::balanced(&costs(&[1.0; 8], 0.0, 2.0), 2).unwrap();
        assert_eq!(plan.ranges, vec![0..5, 5..8]);
        assert_eq!(plan.costs, vec![5.0, 5.0]);
    }

    #[test]
    fn the_split_minimises_the_largest_stage() {
        // Dense first layer (cheap) then MoE layers (dear): brute force agrees.
        let layer_costs = [1.0, 3.0, 3.0, 3.0, 3.0, 2.0];
        let c = costs(&layer_costs, 0.5, 4.0);
        let plan = StagePlan::balanced(&c, 3).unwrap();
        let worst = plan.costs.iter().cloned().fold(0.0, f64::max);
        let mut brute = f64::INFINITY;
        for a in 1..layer_costs.len() {
            for b in a + 1..layer_costs.len() {
                let split = [0..a, a..b, b..layer_costs.len()];
                let m = split
                    .iter()
                    .enumerate()
                    .map(|(s, r)| stage_cost(&c, s, 3, r.clone()))
                    .fold(0.0, f64::max);
                brute = brute.min(m);
            }
        }
        assert_eq!(worst, brute);
    }

    #[test]
    fn impossible_splits_are_refused() {
        let err = StagePlan::balanced(&costs(&[1.0; 2], 0.0, 0.0), 3).unwrap_err();
        assert!(err.to_string().contains("3 pipeline stages"), "{err}");
        let err = StagePlan::from_ranges(vec![0..1, 2..3], 3).unwrap_err();
        assert!(
            err.to_string().contains("stage 1 runs layers 2..3"),
            "{err}"
        );
        let err = StagePlan::from_ranges(vec![0..1, 1..2], 3).unwrap_err();
        assert!(err.to_string().contains("cover layers 0..2"), "{err}");
    }

    #[test]
    fn measured_costs_see_moe_layers_and_the_head() {
        let spec = crate::spec::examples::small();
        let c = layer_costs(&spec, 16, true).unwrap();
        assert_eq!(c.layers.len(), spec.layers);
        assert!(c.layers.iter().all(|&x| x > 0.0));
        assert!(c.embedding > 0.0 && c.head > 0.0);
    }
}
