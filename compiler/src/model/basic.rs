//! The small modules every model uses: Linear, RMSNorm, embedding and the SwiGLU MLP.

use crate::error::GraphError;
use crate::graph::{GraphBuilder, ReduceOp, Tensor};
use crate::module::{Module, Param, Scope};

/// `y = x W^T` with `W` of shape `[out_features, in_features]`, as in PyTorch and HF checkpoints.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    path: String,
}

/// The shape of a [`Linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub in_features: usize,
    pub out_features: usize,
}

impl LinearShape {
    pub fn new(in_features: usize, out_features: usize) -> Self {
        LinearShape {
            in_features,
            out_features,
        }
    }
}

impl Module for Linear {
    type Config = LinearShape;

    fn declare(scope: &mut Scope<'_>, shape: &LinearShape) -> Result<Self, GraphError> {
        Ok(Linear {
            weight: scope.param("weight", &[shape.out_features, shape.in_features])?,
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        visit(&self.weight)
    }
}

impl Linear {
    pub fn forward(&self, g: &mut GraphBuilder, x: Tensor) -> Result<Tensor, GraphError> {
        g.within(&self.path, |g| linear(g, x, self.weight.tensor))
    }
}

/// `x W^T` for a weight stored `[out, in]`.
pub fn linear(g: &mut GraphBuilder, x: Tensor, weight: Tensor) -> Result<Tensor, GraphError> {
    let wt = g.transpose(weight)?;
    g.matmul(x, wt)
}

/// Root-mean-square normalisation over the last axis: `w * x / sqrt(mean(x^2) + eps)`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Param,
    eps: f64,
    path: String,
}

/// Size and epsilon of an [`RmsNorm`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormConfig {
    pub dim: usize,
    pub eps: f64,
}

impl NormConfig {
    pub fn new(dim: usize, eps: f64) -> Self {
        NormConfig { dim, eps }
    }
}

impl Module for RmsNorm {
    type Config = NormConfig;

    fn declare(scope: &mut Scope<'_>, config: &NormConfig) -> Result<Self, GraphError> {
        Ok(RmsNorm {
            weight: scope.param("weight", &[config.dim])?,
            eps: config.eps,
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        visit(&self.weight)
    }
}

impl RmsNorm {
    pub fn forward(&self, g: &mut GraphBuilder, x: Tensor) -> Result<Tensor, GraphError> {
        g.within(&self.path, |g| {
            let axis = g.last_axis(x);
            let squares = g.mul(x, x)?;
            let mean = g.reduce(ReduceOp::Mean, squares, axis, true)?;
            let shifted = g.offset(mean, self.eps)?;
            let inv_rms = g.rsqrt(shifted)?;
            let normed = g.mul(x, inv_rms)?;
            g.mul(self.weight.tensor, normed)
        })
    }
}

/// Token embedding: a row of `weight` per token id.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Param,
    path: String,
}

/// Vocabulary and width of an [`Embedding`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingShape {
    pub vocab_size: usize,
    pub dim: usize,
}

impl Module for Embedding {
    type Config = EmbeddingShape;

    fn declare(scope: &mut Scope<'_>, shape: &EmbeddingShape) -> Result<Self, GraphError> {
        Ok(Embedding {
            weight: scope.param("weight", &[shape.vocab_size, shape.dim])?,
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        visit(&self.weight)
    }
}

impl Embedding {
    pub fn forward(&self, g: &mut GraphBuilder, token_ids: Tensor) -> Result<Tensor, GraphError> {
        g.within(&self.path, |g| g.gather(self.weight.tensor, token_ids))
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    path: String,
}

/// Model width and hidden width of an [`Mlp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlpShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
}

impl Module for Mlp {
    type Config = MlpShape;

    fn declare(scope: &mut Scope<'_>, shape: &MlpShape) -> Result<Self, GraphError> {
        let widen = LinearShape::new(shape.hidden_size, shape.intermediate_size);
        let narrow = LinearShape::new(shape.intermediate_size, shape.hidden_size);
        Ok(Mlp {
            gate_proj: scope.declare("gate_proj", &widen)?,
            up_proj: scope.declare("up_proj", &widen)?,
            down_proj: scope.declare("down_proj", &narrow)?,
            path: scope.path().to_owned(),
        })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        self.gate_proj.visit_parameters(visit);
        self.up_proj.visit_parameters(visit);
        self.down_proj.visit_parameters(visit);
    }
}

impl Mlp {
    pub fn forward(&self, g: &mut GraphBuilder, x: Tensor) -> Result<Tensor, GraphError> {
        let gate = self.gate_proj.forward(g, x)?;
        let up = self.up_proj.forward(g, x)?;
        let hidden = g.within(&self.path, |g| swiglu(g, gate, up))?;
        self.down_proj.forward(g, hidden)
    }
}

/// `silu(gate) * up`.
pub fn swiglu(g: &mut GraphBuilder, gate: Tensor, up: Tensor) -> Result<Tensor, GraphError> {
    let activated = g.silu(gate)?;
    g.mul(activated, up)
}
