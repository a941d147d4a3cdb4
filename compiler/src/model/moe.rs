//! DeepSeekMoE (DeepSeek-V3 §2.1.2): sigmoid router with a balancing bias and group-limited
//! top-k, routed SwiGLU experts as grouped matmuls, shared experts on every token.

use crate::dtype::DType;
use crate::error::GraphError;
use crate::graph::{CompareOp, Graph, GraphBuilder, Op, ReduceOp, Tensor};
use crate::module::{Module, Param, Scope};
use crate::spec::{ModelSpec, MoeSpec};

use super::basic::{Mlp, MlpShape, linear, swiglu};

/// Chooses experts for each token and weighs them.
#[derive(Clone, Debug)]
pub struct Router {
    /// `[routed_experts, hidden]`: affinity logits `u · e_i`.
    pub weight: Param,
    /// `[routed_experts]`: the auxiliary-loss-free balancing bias `b_i`. It steers selection
    /// only; it never weighs an expert's output and gets no gradient.
    pub e_score_correction_bias: Param,
    settings: MoeSpec,
    path: String,
}

/// The router's decisions for `tokens` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    /// `f32 [tokens, routed_experts]`: sigmoid affinities `s_i` (the balance loss uses them).
    pub scores: Tensor,
    /// `i64 [tokens, experts_per_token]`: chosen experts.
    pub experts: Tensor,
    /// `f32 [tokens, experts_per_token]`: gate values of the chosen experts.
    pub gates: Tensor,
    /// The layer's balancing bias (a buffer), which the trainer updates from the expert loads.
    pub bias: Tensor,
}

/// The checkpoint name of a routing's balancing bias (`model.layers.3.mlp.gate.e_score_correction_bias`),
/// under which the trainer reports the layer's expert loads.
pub fn balancing_bias_name(graph: &Graph, bias: Tensor) -> Result<String, GraphError> {
    match &graph.node(bias.id()).op {
        Op::Parameter { name, .. } => Ok(name.clone()),
        other => Err(GraphError::InvalidRequest(format!(
            "a routing's balancing bias must be a parameter, not `{}`",
            other.name()
        ))),
    }
}

impl Module for Router {
    type Config = ModelSpec;

    fn declare(scope: &mut Scope<'_>, spec: &ModelSpec) -> Result<Self, GraphError> {
        let settings = moe_settings(spec)?;
        Ok(Router {
            weight: scope.param("weight", &[settings.routed_experts, spec.hidden_size])?,
            e_score_correction_bias: scope
                .buffer("e_score_correction_bias", &[settings.routed_experts])?,
            settings,
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        visit(&self.weight);
        visit(&self.e_score_correction_bias);
    }
}

impl Router {
    /// `x`: `[tokens, hidden]`.
    pub fn forward(&self, g: &mut GraphBuilder, x: Tensor) -> Result<Routing, GraphError> {
        let m = &self.settings;
        g.within(&self.path, |g| {
            let tokens = g.dims(x)[0];
            let logits = linear(g, x, self.weight.tensor)?;
            let scores = g.sigmoid(logits)?;
            let biased = g.add(scores, self.e_score_correction_bias.tensor)?;
            let candidates = if m.groups_per_token < m.groups {
                keep_best_groups(g, biased, m, tokens)?
            } else {
                biased // every group is kept: group limiting changes nothing
            };
            let experts = g.top_k(candidates, m.experts_per_token)?;
            let mut gates = g.take_along(scores, experts, 1)?;
            if m.normalize_gates {
                let sum = g.reduce(ReduceOp::Sum, gates, 1, true)?;
                let sum = g.offset(sum, 1e-20)?; // as HF: guards an all-zero row
                gates = g.div(gates, sum)?;
            }
            let gates = g.scale(gates, m.routed_scaling_factor)?;
            Ok(Routing {
                scores,
                experts,
                gates,
                bias: self.e_score_correction_bias.tensor,
            })
        })
    }
}

/// Group-limited routing: a group's score is the sum of its two best biased scores; experts
/// outside the `groups_per_token` best groups get the lowest f32 so top-k never picks them.
fn keep_best_groups(
    g: &mut GraphBuilder,
    biased: Tensor,
    m: &MoeSpec,
    tokens: usize,
) -> Result<Tensor, GraphError> {
    let per_group = m.experts_per_group();
    let grouped = g.reshape(biased, &[tokens, m.groups, per_group])?;
    let best_two = g.top_k(grouped, 2)?;
    let best_two = g.take_along(grouped, best_two, 2)?;
    let group_scores = g.reduce(ReduceOp::Sum, best_two, 2, false)?;
    let kept_groups = g.top_k(group_scores, m.groups_per_token)?;
    let kept = g.one_hot(kept_groups, m.groups, DType::F32)?;
    let kept = g.reduce(ReduceOp::Sum, kept, 1, false)?; // [tokens, groups] of 0/1
    let kept = g.reshape(kept, &[tokens, m.groups, 1])?;
    let kept = g.expand(kept, &[tokens, m.groups, per_group])?;
    let kept = g.reshape(kept, &[tokens, m.routed_experts])?;
    let zero = g.scalar(0.0, DType::F32)?;
    let kept = g.compare(CompareOp::Gt, kept, zero)?;
    let lowest = g.scalar(f32::MIN as f64, DType::F32)?;
    g.select(kept, biased, lowest)
}

/// A DeepSeekMoE layer: `Σ_i g_i expert_i(x) + shared(x)`.
#[derive(Clone, Debug)]
pub struct Moe {
    pub gate: Router,
    pub experts: Vec<Mlp>,
    pub shared_experts: Option<Mlp>,
    path: String,
}

impl Module for Moe {
    type Config = ModelSpec;

    fn declare(scope: &mut Scope<'_>, spec: &ModelSpec) -> Result<Self, GraphError> {
        let m = moe_settings(spec)?;
        let expert = MlpShape {
            hidden_size: spec.hidden_size,
            intermediate_size: m.intermediate_size,
        };
        let shared = MlpShape {
            hidden_size: spec.hidden_size,
            intermediate_size: m.intermediate_size * m.shared_experts,
        };
        Ok(Moe {
            gate: scope.declare("gate", spec)?,
            experts: scope.declare("experts", &(m.routed_experts, expert))?,
            shared_experts: if m.shared_experts > 0 {
                Some(scope.declare("shared_experts", &shared)?)
            } else {
                None
            },
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        self.gate.visit_parameters(visit);
        self.experts.visit_parameters(visit);
        if let Some(shared) = &self.shared_experts {
            shared.visit_parameters(visit);
        }
    }
}

impl Moe {
    /// `x`: `[batch, seq, hidden]`. Returns the output and the routing (for losses and load
    /// statistics).
    pub fn forward(
        &self,
        g: &mut GraphBuilder,
        x: Tensor,
    ) -> Result<(Tensor, Routing), GraphError> {
        let dims = g.dims(x).to_vec();
        let hidden = dims[dims.len() - 1];
        let tokens = dims[..dims.len() - 1].iter().product();
        let flat = g.within(&self.path, |g| g.reshape(x, &[tokens, hidden]))?;
        let routing = self.gate.forward(g, flat)?;
        let routed = g.within(&format!("{}.experts", self.path), |g| {
            let stacked = |g: &mut GraphBuilder, pick: fn(&Mlp) -> Tensor| {
                let weights: Vec<Tensor> = self.experts.iter().map(pick).collect();
                g.stack(&weights)
            };
            let w_gate = stacked(g, |e| e.gate_proj.weight.tensor)?;
            let w_up = stacked(g, |e| e.up_proj.weight.tensor)?;
            let w_down = stacked(g, |e| e.down_proj.weight.tensor)?;
            let x = g.reshape(flat, &[tokens, 1, hidden])?;
            let gate = g.grouped_matmul(x, w_gate, routing.experts)?;
            let up = g.grouped_matmul(x, w_up, routing.experts)?;
            let h = swiglu(g, gate, up)?;
            let out = g.grouped_matmul(h, w_down, routing.experts)?; // [tokens, k, hidden]
            let k = g.dims(routing.gates)[1];
            let gates = g.reshape(routing.gates, &[tokens, k, 1])?;
            let weighted = g.mul(out, gates)?;
            let combined = g.reduce(ReduceOp::Sum, weighted, 1, false)?;
            g.reshape(combined, &dims)
        })?;
        let out = match &self.shared_experts {
            Some(shared) => {
                let s = shared.forward(g, x)?;
                g.within(&self.path, |g| g.add(routed, s))?
            }
            None => routed,
        };
        Ok((out, routing))
    }
}

fn moe_settings(spec: &ModelSpec) -> Result<MoeSpec, GraphError> {
    spec.moe.clone().ok_or_else(|| GraphError::Spec {
        field: "moe".into(),
        message: "an MoE layer was declared for a model without MoE settings".into(),
    })
}
