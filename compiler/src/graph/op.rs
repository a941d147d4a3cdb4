//! The closed set of graph operations.
//!
//! The set is small on purpose: composite operations (softmax, RMSNorm, SwiGLU, RoPE) are written
//! in the model library from these primitives, so every later stage (the interpreter, autodiff,
//! fusion, code generation) handles a few well-understood ops. Fusion regroups them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;

use super::Triangular;

/// Elementwise functions of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Abs,
    Sigmoid,
}

/// Elementwise functions of two tensors with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

/// Elementwise comparisons with NumPy broadcasting; the result is `bool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Reductions over one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// How a [`Op::GroupedMatMulWeightGrad`] rounds its operands before it multiplies them: what
/// an FP8 run's grouped weight-gradient GEMM reads. Each expert's token-slots, in `(t, s)`
/// order (its K), are cut into tiles of `tile_rows` consecutive token-slots, the last one
/// partial; within a tile each channel (each column of the cotangent's and of x's rows) gets
/// one scale, `max(amax, 1e-4) / 448` (a power of two when `pow2_scales`), and every value
/// becomes the nearest `format` value times that scale, as in [`Op::QuantizeDequantize`].
/// The tiles start afresh at every expert, so no tile mixes two experts' rows: the GEMM of one
/// expert reads its own scales only (DeepGEMM's K-grouped layout, each expert's segment
/// padded to whole tiles). A row of x read by several slots is rounded once per slot, with
/// the tile that slot's expert puts it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExpertTiles {
    pub format: QuantFormat,
    pub tile_rows: usize,
    pub pow2_scales: bool,
}

impl fmt::Display for ExpertTiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pow2 = if self.pow2_scales { ", pow2" } else { "" };
        write!(f, "{}, expert tile={}x1{pow2}", self.format, self.tile_rows)
    }
}

/// Which operand of a [`Op::CausalAttention`] a [`Op::CausalAttentionGrad`] is the gradient of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionOperand {
    Query,
    KeyNope,
    KeyRope,
    Value,
}

impl AttentionOperand {
    pub const ALL: [AttentionOperand; 4] = [
        AttentionOperand::Query,
        AttentionOperand::KeyNope,
        AttentionOperand::KeyRope,
        AttentionOperand::Value,
    ];

    /// Its position among the attention's operands.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            AttentionOperand::Query => "q",
            AttentionOperand::KeyNope => "k_nope",
            AttentionOperand::KeyRope => "k_rope",
            AttentionOperand::Value => "v",
        }
    }
}

/// What a causal attention op computes with, beyond its operands: the softmax's `scale`, and
/// the type its products' operands are rounded to (`products_in`: bf16 under a BF16 or FP8
/// policy, SPEC §2; `None`, exact) before each product, which sums in f32. The rounded
/// operands are the forward's `q`, `k` (`[k_nope, k_rope]` per head) and `v`, the
/// probabilities before they weigh the values, and in the gradient `d_o` and the scores'
/// gradient `dS` (see [`Op::CausalAttentionGrad`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionConfig {
    pub scale: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub products_in: Option<DType>,
}

impl fmt::Display for AttentionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scale={}", Scalar(self.scale))?;
        if let Some(dtype) = self.products_in {
            write!(f, ", products={dtype}")?;
        }
        Ok(())
    }
}

/// The 8-bit format a [`Op::QuantizeDequantize`] rounds to. Only E4M3 for now: DeepSeek-V3
/// uses it for every FP8 GEMM operand, gradients included (SPEC §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    E4M3,
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantFormat::E4M3 => "e4m3",
        })
    }
}

/// How a GEMM sums its products over K.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accumulation {
    /// At least f32 precision, in whatever order the backend sums (the interpreter in f64): a
    /// CUDA-core GEMM, a BF16 tensor-core GEMM, or an FP8 GEMM whose partial sums are promoted
    /// often enough that their precision does not show.
    #[default]
    Exact,
    /// Hopper's FP8 tensor cores, emulated (SPEC §2): for each output element, K is cut into
    /// chunks of `promotion_interval` consecutive elements (all of K when `None`: no
    /// promotion). Within a chunk the running sum starts at zero and, after each product is
    /// added in K order (an f32 product and an f32 sum), is truncated toward zero to
    /// `mantissa_bits` bits after the leading one; each chunk's sum is then added to an f32
    /// total (the promotion to FP32 registers). DeepSeek-V3's recipe is 13 bits promoted every
    /// 128 (`fathom_runtime::fp8::Accumulator::HOPPER`).
    Limited {
        mantissa_bits: u32,
        promotion_interval: Option<usize>,
    },
}

impl Accumulation {
    /// DeepSeek-V3's FP8 GEMM: Hopper's accumulator promoted every 128 elements of K.
    pub const HOPPER: Accumulation = Accumulation::Limited {
        mantissa_bits: 13,
        promotion_interval: Some(128),
    };

    /// Hopper's accumulator over all of K: an FP8 GEMM without DeepSeek-V3's promotion.
    pub const HOPPER_WITHOUT_PROMOTION: Accumulation = Accumulation::Limited {
        mantissa_bits: 13,
        promotion_interval: None,
    };

    pub fn is_exact(self) -> bool {
        self == Accumulation::Exact
    }

    /// A limited accumulator keeps 1 to 23 mantissa bits (an f32's) and promotes after at
    /// least one product.
    pub fn check(self) -> Result<(), String> {
        if let Accumulation::Limited {
            mantissa_bits,
            promotion_interval,
        } = self
        {
            if !(1..=23).contains(&mantissa_bits) {
                return Err(format!(
                    "accumulation keeps {mantissa_bits} mantissa bits; expected 1 to 23"
                ));
            }
            if promotion_interval == Some(0) {
                return Err(
                    "accumulation promotes every 0 products; expected at least 1 product".into(),
                );
            }
        }
        Ok(())
    }
}

/// Printed after a GEMM's name when not exact: `<acc=13b/128>`, `<acc=13b/K>`.
impl fmt::Display for Accumulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Accumulation::Exact => f.write_str("exact"),
            Accumulation::Limited {
                mantissa_bits,
                promotion_interval,
            } => match promotion_interval {
                Some(every) => write!(f, "{mantissa_bits}b/{every}"),
                None => write!(f, "{mantissa_bits}b/K"),
            },
        }
    }
}

/// Values baked into the graph (RoPE tables, masks, scalars such as an epsilon).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstantData {
    /// What the values are, for people reading the printed graph ("rope.cos", "causal_mask").
    pub label: String,
    /// Row-major values; the node's type gives the shape and the element type they are cast to.
    pub values: Vec<f64>,
}

/// One operation. The operands are the node's `inputs`, in the order documented per variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A value fed by the caller for each run (token ids, labels). No inputs.
    Input { name: String },
    /// A tensor loaded with the weights, named as in a Hugging Face checkpoint. No inputs.
    /// `trainable: false` marks state that training updates by other rules, like a PyTorch
    /// buffer (DeepSeekMoE's balancing bias): it gets no gradient and is not counted as a
    /// parameter in summaries.
    Parameter {
        name: String,
        #[serde(default = "yes")]
        trainable: bool,
    },
    /// Values known when the graph is built. No inputs.
    Constant(ConstantData),
    /// `[x]`.
    Unary(UnaryOp),
    /// `[a, b]`, broadcast.
    Binary(BinaryOp),
    /// `[a, b]`, broadcast; the result is `bool`.
    Compare(CompareOp),
    /// `[condition (bool), if_true, if_false]`, broadcast.
    Select,
    /// `[x]`: convert the element type (floats round to nearest even, saturating for FP8).
    Cast { to: DType },
    /// `[x]` -> `x`: the value unchanged, through which no gradient flows (PyTorch's
    /// `detach`). A softmax subtracts its row max through one: the shift does not change the
    /// result, so its exact gradient is zero, and differentiating the max would cost a pass over
    /// the scores and a mask as large as them. The compiler drops the node once the graph is
    /// differentiated (see `passes::common_subexpressions`).
    StopGradient,
    /// `[x]`: reduce one axis; the axis is kept with extent 1 when `keep_dim`.
    Reduce {
        op: ReduceOp,
        axis: usize,
        keep_dim: bool,
    },
    /// `[a (..., m, k), b (..., k, n)]` -> `(..., m, n)`; leading (batch) axes broadcast. With
    /// `triangular`, one operand is read, or the result kept, as a triangular matrix (see
    /// [`Triangular`]).
    MatMul {
        #[serde(default)]
        accumulation: Accumulation,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        triangular: Option<Triangular>,
    },
    /// `[x]`: same elements, new shape (row-major order is kept).
    Reshape { shape: Vec<usize> },
    /// `[x]`: output axis `i` is input axis `perm[i]`.
    Permute { perm: Vec<usize> },
    /// `[x]`: broadcast to `shape` (NumPy rules: extents of 1 stretch, new axes prepend).
    Expand { shape: Vec<usize> },
    /// `[x]`: `start..end` along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// `[x_0, x_1, ...]`: joined along `axis`; all other extents equal.
    Concat { axis: usize },
    /// `[table (rows, ...), indices (integer)]` -> `indices.shape ++ table.shape[1..]`:
    /// row lookup, as an embedding does.
    Gather,
    /// `[values (indices.shape ++ row), indices (integer)]` -> `[rows] ++ row`: the sum of the
    /// value rows sent to each row, `out[r] = Σ_{i: indices[i] = r} values[i]` (rows no index
    /// names are zero). The adjoint of `Gather` (an embedding's gradient), without the
    /// one-hot matrix a matmul formulation would build.
    IndexAdd { rows: usize },
    /// `[x, indices (integer, same rank)]` -> `indices.shape`: `out[.., j, ..] = x[.., indices[.., j, ..], ..]`
    /// along `axis` (NumPy's `take_along_axis`).
    TakeAlong { axis: usize },
    /// `[x]` -> `i64` indices of the `k` largest values along the last axis, largest first;
    /// ties go to the lower index (the order `torch.topk` gives on the CPU).
    TopK { k: usize },
    /// `[indices (integer)]` -> `indices.shape ++ [depth]` of `dtype`, 1 at the index, else 0.
    OneHot { depth: usize, dtype: DType },
    /// `[x (tokens, slots or 1, k), weights (experts, n, k), expert_ids (tokens, slots)]`
    /// -> `(tokens, slots, n)`: each token-slot multiplied by the transposed weight of the expert
    /// it was routed to, `out[t, s] = weights[expert_ids[t, s]] @ x[t, s]`. The grouped GEMM of
    /// a Mixture-of-Experts layer; no token is dropped. K is `k`.
    GroupedMatMul {
        #[serde(default)]
        accumulation: Accumulation,
    },
    /// `[x_0, x_1, ...]` of equal types -> a new leading axis of extent `n`.
    Stack,
    /// `[cotangent (tokens, slots, n), x (tokens, slots or 1, k), expert_ids (tokens, slots)]`
    /// -> `(experts, n, k)`: the gradient of [`Op::GroupedMatMul`] with respect to its weights,
    /// `out[e] = Σ_{(t, s): expert_ids[t, s] = e} cotangent[t, s]ᵀ · x[t, s or 0]` (an outer
    /// product per token-slot, summed per expert). An expert that no token was routed to gets
    /// exact zeros. Emitted by autodiff. K is the expert's token-slots, in `(t, s)` order.
    /// With `rounding`, both operands' rows are first rounded in tiles along each expert's K
    /// ([`ExpertTiles`]), as an FP8 run quantizes them for its grouped weight-gradient GEMM.
    GroupedMatMulWeightGrad {
        experts: usize,
        #[serde(default)]
        accumulation: Accumulation,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rounding: Option<ExpertTiles>,
    },
    /// `[x (..., rows, cols)]` -> same type: a "fake quantization", `dequant(quant(x))`. The
    /// last two axes are cut into `tile_rows`×`tile_cols` tiles (the last tile along an axis
    /// may be partial), leading axes are independent matrices; each tile gets one scale
    /// `max(amax, 1e-4) / 448` from its max-abs (rounded up to a power of two when
    /// `pow2_scales`), and each element becomes the nearest `format` value of `x / scale`
    /// (saturating), times the scale. This is what an FP8 GEMM computes with, so a GEMM on
    /// these values in f32 is an FP8 GEMM with exact (promoted) accumulation. Placed by the
    /// precision pass (`crate::precision`) on GEMM operands; a tile holding a NaN or an
    /// infinity has no meaningful scale and comes back all NaN. Autodiff passes the cotangent
    /// straight through (the quantization error is not differentiated, as in FP8 training).
    QuantizeDequantize {
        format: QuantFormat,
        tile_rows: usize,
        tile_cols: usize,
        pow2_scales: bool,
    },
    /// `[logits (..., vocab), labels (integer, ...)]` -> `(...)` of the logits' type: the
    /// cross-entropy of every row, `log Σ_v exp(logits[v] − m) − (logits[label] − m)` with `m`
    /// the row's max. A row whose label is negative is ignored (0, and no gradient), as
    /// PyTorch's `ignore_index` does. One op rather than a chain of primitives because the
    /// chain materialises several vocabulary-wide tensors (and a one-hot matrix in backward)
    /// that one pass over each row avoids; the row values stay in cache.
    CrossEntropy,
    /// `[logits (..., vocab), labels (integer, ...), loss (...), cotangent (...)]` -> the
    /// logits' type: the gradient of [`Op::CrossEntropy`], `(softmax(logits) − onehot(label)) ·
    /// cotangent` per row, 0 for rows with a negative label. `loss` is the forward's result for
    /// the same rows: with the label's logit it gives the row's log-sum-exp, so a compiled
    /// kernel exponentiates each logit once instead of summing the exponentials again (the
    /// value is defined by the logits alone; the interpreter computes it from them). Emitted by
    /// autodiff.
    CrossEntropyGrad,
    /// `[q (b, t, h, nope + rope), k_nope (b, t, h, nope), k_rope (b, t, rope), v (b, t, h, dv)]`
    /// -> `(b, t, h, dv)`: causal multi-head attention with MLA's shared RoPE key (DeepSeek-V3
    /// §2.1.1), tokens before heads as the projections lay them out:
    /// `out[b, i, h] = Σ_{j ≤ i} p[b, h, i, j] · v[b, j, h]`, where
    /// `p[b, h, i, ·] = softmax_{j ≤ i}(scale · q[b, i, h] · k[b, j, h])` and
    /// `k[b, j, h] = [k_nope[b, j, h], k_rope[b, j]]`, every head reading the same rope key.
    /// One op rather than the matmuls and the softmax it is made of so that a backend can run
    /// it flash-attention style, never holding the `t × t` probabilities (the GPU does; the CPU
    /// expands it into those primitives, `passes::expand_attention`).
    CausalAttention(AttentionConfig),
    /// The same operands -> `(b, h, t)`: each query's `log Σ_{j ≤ i} exp(scale · q · k)`, the
    /// softmax statistic a flash-attention backward recomputes the probabilities from. Emitted
    /// by autodiff for [`Op::CausalAttentionGrad`].
    CausalAttentionLse(AttentionConfig),
    /// `[q, k_nope, k_rope, v, out, lse, d_out]` -> the type of `operand`: the gradient of
    /// [`Op::CausalAttention`] with respect to one of its operands for the cotangent `d_out`:
    /// with `S = q · kᵀ`, `P = softmax(scale · S)` (causal), `dP = d_out · vᵀ`,
    /// `dS = scale · P ⊙ (dP − Σ_j P ⊙ dP)`: `dq = dS · k`, `dk = dSᵀ · q` (split into its nope
    /// part per head and its rope part summed over heads), `dv = Pᵀ · d_out`. `out` and `lse`
    /// are the forward's results for the same operands, there for a backend that recomputes
    /// `P` from them (the value is defined by `q`, `k`, `v` and `d_out` alone; the interpreter
    /// computes it from those). Emitted by autodiff, one per operand that needs a gradient.
    CausalAttentionGrad {
        config: AttentionConfig,
        operand: AttentionOperand,
    },
}

fn yes() -> bool {
    true
}

impl Op {
    /// The op's name in printed graphs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Parameter {
                trainable: true, ..
            } => "param",
            Op::Parameter {
                trainable: false, ..
            } => "buffer",
            Op::Constant(_) => "constant",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "neg",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Recip => "recip",
                UnaryOp::Abs => "abs",
                UnaryOp::Sigmoid => "sigmoid",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Max => "max",
                BinaryOp::Min => "min",
            },
            Op::Compare(c) => match c {
                CompareOp::Eq => "eq",
                CompareOp::Lt => "lt",
                CompareOp::Le => "le",
                CompareOp::Gt => "gt",
                CompareOp::Ge => "ge",
            },
            Op::Select => "select",
            Op::Cast { .. } => "cast",
            Op::StopGradient => "stop_gradient",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Mean => "mean",
                ReduceOp::Max => "reduce_max",
            },
            Op::MatMul { .. } => "matmul",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Expand { .. } => "expand",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather => "gather",
            Op::IndexAdd { .. } => "index_add",
            Op::TakeAlong { .. } => "take_along",
            Op::TopK { .. } => "topk",
            Op::OneHot { .. } => "one_hot",
            Op::GroupedMatMul { .. } => "grouped_matmul",
            Op::Stack => "stack",
            Op::GroupedMatMulWeightGrad { .. } => "grouped_matmul_weight_grad",
            Op::QuantizeDequantize { .. } => "quantize_dequantize",
            Op::CrossEntropy => "cross_entropy",
            Op::CrossEntropyGrad => "cross_entropy_grad",
            Op::CausalAttention(_) => "causal_attention",
            Op::CausalAttentionLse(_) => "causal_attention_lse",
            Op::CausalAttentionGrad { .. } => "causal_attention_grad",
        }
    }

    /// The configuration of a causal attention op (forward, statistic or gradient).
    pub fn attention_config(&self) -> Option<&AttentionConfig> {
        match self {
            Op::CausalAttention(config)
            | Op::CausalAttentionLse(config)
            | Op::CausalAttentionGrad { config, .. } => Some(config),
            _ => None,
        }
    }

    pub fn attention_config_mut(&mut self) -> Option<&mut AttentionConfig> {
        match self {
            Op::CausalAttention(config)
            | Op::CausalAttentionLse(config)
            | Op::CausalAttentionGrad { config, .. } => Some(config),
            _ => None,
        }
    }

    /// How many inputs the op takes; `None` for variadic ops (at least one input).
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Input { .. } | Op::Parameter { .. } | Op::Constant(_) => Some(0),
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::StopGradient
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::TopK { .. }
            | Op::OneHot { .. }
            | Op::QuantizeDequantize { .. } => Some(1),
            Op::Binary(_)
            | Op::Compare(_)
            | Op::MatMul { .. }
            | Op::Gather
            | Op::IndexAdd { .. }
            | Op::TakeAlong { .. }
            | Op::CrossEntropy => Some(2),
            Op::Select | Op::GroupedMatMul { .. } | Op::GroupedMatMulWeightGrad { .. } => Some(3),
            Op::CrossEntropyGrad | Op::CausalAttention(_) | Op::CausalAttentionLse(_) => Some(4),
            Op::CausalAttentionGrad { .. } => Some(7),
            Op::Concat { .. } | Op::Stack => None,
        }
    }
}

/// The op's attributes as the printer shows them: `name(attrs)`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Op::Input { name } | Op::Parameter { name, .. } => write!(f, " \"{name}\""),
            Op::Constant(data) => {
                if data.values.len() == 1 {
                    write!(f, " {}", Scalar(data.values[0]))
                } else {
                    write!(f, " \"{}\"", data.label)
                }
            }
            Op::Cast { to } => write!(f, "<{to}>"),
            Op::Reduce { axis, keep_dim, .. } => {
                write!(f, "<axis={axis}{}>", if *keep_dim { ", keep" } else { "" })
            }
            Op::Reshape { shape } | Op::Expand { shape } => {
                write!(f, "<{}>", crate::dtype::Shape(shape.clone()))
            }
            Op::Permute { perm } => write!(f, "<{}>", crate::dtype::Shape(perm.clone())),
            Op::Slice { axis, start, end } => write!(f, "<axis={axis}, {start}..{end}>"),
            Op::Concat { axis } | Op::TakeAlong { axis } => write!(f, "<axis={axis}>"),
            Op::TopK { k } => write!(f, "<k={k}>"),
            Op::IndexAdd { rows } => write!(f, "<rows={rows}>"),
            Op::OneHot { depth, dtype } => write!(f, "<depth={depth}, {dtype}>"),
            Op::MatMul {
                accumulation,
                triangular,
            } => match (triangular, accumulation.is_exact()) {
                (None, true) => Ok(()),
                (None, false) => write!(f, "<acc={accumulation}>"),
                (Some(t), true) => write!(f, "<{t}>"),
                (Some(t), false) => write!(f, "<{t}, acc={accumulation}>"),
            },
            Op::GroupedMatMul { accumulation } => match accumulation.is_exact() {
                true => Ok(()),
                false => write!(f, "<acc={accumulation}>"),
            },
            Op::GroupedMatMulWeightGrad {
                experts,
                accumulation,
                rounding,
            } => {
                write!(f, "<experts={experts}")?;
                if !accumulation.is_exact() {
                    write!(f, ", acc={accumulation}")?;
                }
                if let Some(tiles) = rounding {
                    write!(f, ", {tiles}")?;
                }
                write!(f, ">")
            }
            Op::QuantizeDequantize {
                format,
                tile_rows,
                tile_cols,
                pow2_scales,
            } => {
                let pow2 = if *pow2_scales { ", pow2" } else { "" };
                write!(f, "<{format}, tile={tile_rows}x{tile_cols}{pow2}>")
            }
            Op::CausalAttention(config) | Op::CausalAttentionLse(config) => {
                write!(f, "<{config}>")
            }
            Op::CausalAttentionGrad { config, operand } => {
                write!(f, "<{config}, wrt={}>", operand.name())
            }
            _ => Ok(()),
        }
    }
}

/// A scalar constant as printed: plain decimals for ordinary magnitudes, scientific notation for
/// very large or small ones (`-3.4028234663852886e38`, not 39 digits).
pub(crate) struct Scalar(pub f64);

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let magnitude = self.0.abs();
        if magnitude != 0.0 && !(1e-4..1e6).contains(&magnitude) {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}
