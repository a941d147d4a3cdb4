//! The kernel IR: what a graph becomes once it is fused and placed in buffers.
//!
//! A [`Program`] is a list of buffers and an ordered list of [`Kernel`]s over them. Most
//! kernels are [`LoopNest`]s: explicit loops over an iteration domain whose body loads from
//! buffers through strided views, computes, reduces along the innermost axis and stores. The
//! heavy or irregular operations — matmuls, the grouped expert matmuls, lookups, top-k — are
//! [`Library`] calls, which each target implements by hand (a GEMM crate on the CPU, templates
//! on the GPU). Nothing here knows about a device; the CPU backend JIT-compiles loop nests with
//! cranelift, the CUDA backend will print them as CUDA C++.

mod plan;
mod print;
#[cfg(test)]
pub(crate) mod tests;
mod traffic;

pub use plan::{MemoryPlan, SlotId};
pub use traffic::with_prefix;

use serde::{Deserialize, Serialize};

use crate::dtype::{DType, TensorType};
use crate::graph::{
    Accumulation, AttentionConfig, BinaryOp, CompareOp, ConstantData, ExpertTiles, NodeId,
    QuantFormat, ReduceOp, Triangular, UnaryOp,
};

/// Index of a buffer in its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BufferId(pub u32);

impl BufferId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where a buffer's contents come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferRole {
    /// Fed by the caller for each run.
    Input(String),
    /// A weight, fed by the caller (by checkpoint name).
    Parameter(String),
    /// Known when the program was compiled.
    Constant(ConstantData),
    /// Written by a kernel and read by later ones.
    Temporary,
    /// Weights fed by the caller end to end, by checkpoint name: an `[n, …]` stack of `n`
    /// parameters of one shape (`[…]`), such as a layer's experts' matrices, uploaded where a
    /// grouped GEMM reads them instead of copied there by a kernel every run.
    StackedParameters(Vec<String>),
    /// Elements `offset..` of the temporary `of`, read where they lie: a program output that
    /// is a part of another buffer (an expert's gradient in the stacked weight gradient),
    /// instead of a copy of it. No memory of its own, and no kernel's operand.
    Window { of: BufferId, offset: usize },
}

impl BufferRole {
    /// Whether the caller feeds the buffer weights: a parameter or stacked parameters.
    pub fn is_fed_weight(&self) -> bool {
        matches!(
            self,
            BufferRole::Parameter(_) | BufferRole::StackedParameters(_)
        )
    }
}

/// A dense, row-major buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub ty: TensorType,
    pub role: BufferRole,
}

/// A strided window on a buffer: element `(i_0, …, i_{n-1})` of the view is element
/// `offset + Σ i_d · strides[d]` of the buffer. A stride of 0 broadcasts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct View {
    pub buffer: BufferId,
    pub offset: usize,
    pub strides: Vec<isize>,
}

/// A value computed for every point of a loop nest's domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expr {
    /// The element of a view (whose strides have one entry per domain axis).
    Load(View),
    Constant(f64),
    /// A per-row value computed earlier in the same kernel (see [`Stmt::Reduce`]).
    Row(usize),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// 1.0 where the comparison holds, else 0.0 (bools are 0/1 values inside a kernel).
    Compare(CompareOp, Box<Expr>, Box<Expr>),
    /// `condition != 0 ? if_true : if_false`.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Rounds to `to` (float types) or truncates (integers); values stay in f32 registers.
    Cast(DType, Box<Expr>),
}

/// One step of a loop nest's body, run for every index of the outer axes, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stmt {
    /// Reduces `value` over the innermost axis into row value `row`, usable by later steps.
    Reduce {
        row: usize,
        op: ReduceOp,
        value: Expr,
    },
    /// Writes `value` at every point of the domain.
    Store { view: View, value: Expr },
    /// Writes `value` once per row (the view's innermost stride is ignored); `value` must not
    /// depend on the innermost index.
    StoreRow { view: View, value: Expr },
}

/// Loops over `domain` (outer axes first; the last axis is the inner loop of every step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopNest {
    pub domain: Vec<usize>,
    pub body: Vec<Stmt>,
}

/// A call into a hand-written routine of the target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Library {
    /// `out[b] = a[b] · rhs[b]` for every batch index `b` (shape `batch`), with `a` viewed as
    /// `[batch…, m, k]`, `rhs` as `[batch…, k, n]` and `out` as `[batch…, m, n]` (each view has
    /// `batch.len() + 2` strides, so transposes and broadcasts are free).
    MatMul {
        batch: Vec<usize>,
        m: usize,
        n: usize,
        k: usize,
        a: View,
        b: View,
        out: View,
        /// How the products are summed (`graph::Accumulation`).
        #[serde(default)]
        accumulation: Accumulation,
        /// A narrower float type both operands' values belong to (stored as f32, e.g. bf16
        /// under the bf16 policy): a backend may multiply in it, the products being the same.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exact_in: Option<DType>,
        /// The call rounds each operand to `exact_in` as it reads it: the precision pass's
        /// round trips (`cast<f32>(cast<bf16>(x))`) read only by such products are folded into
        /// them (`lower::LowerOptions::products_round_operands`), and the buffers hold `x`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rounds: bool,
        /// The operand read, or the result kept, as a triangle of each `m×k`, `k×n` or `m×n`
        /// matrix (`graph::Triangular`): elements outside it count as zeros, and a backend may
        /// skip the blocks of the product that are all zeros. Output elements outside an
        /// output triangle are written as zeros.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        triangular: Option<Triangular>,
    },
    /// The op of the same name in the graph, on dense buffers (see `graph::Op`) but for the
    /// weights (see [`ExpertWeights`]) and `x`, whose buffer holds its `[tokens, x_slots, k]`
    /// values in row-major order in any shape ending in `k` (its slots per token are its
    /// length over `tokens · k`).
    GroupedMatMul {
        x: BufferId,
        weights: ExpertWeights,
        expert_ids: BufferId,
        out: BufferId,
        #[serde(default)]
        accumulation: Accumulation,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exact_in: Option<DType>,
        /// As in `MatMul`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rounds: bool,
    },
    /// The op of the same name in the graph, on dense buffers but for `x` (as in
    /// `GroupedMatMul`), written as [`ExpertOutputs`] says.
    GroupedMatMulWeightGrad {
        cotangent: BufferId,
        x: BufferId,
        expert_ids: BufferId,
        out: ExpertOutputs,
        #[serde(default)]
        accumulation: Accumulation,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exact_in: Option<DType>,
        /// As in `MatMul`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rounds: bool,
        /// Rounds both operands as it reads them, in tiles along each expert's token-slots
        /// (`graph::ExpertTiles`); the buffers hold the values before that rounding.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rounding: Option<ExpertTiles>,
    },
    Gather {
        table: BufferId,
        indices: BufferId,
        out: BufferId,
    },
    /// `out[r] = Σ_{i: indices[i] = r} values[i]` over rows of `row` elements.
    IndexAdd {
        values: BufferId,
        indices: BufferId,
        out: BufferId,
    },
    TakeAlong {
        axis: usize,
        x: BufferId,
        indices: BufferId,
        out: BufferId,
    },
    TopK {
        k: usize,
        x: BufferId,
        out: BufferId,
    },
    OneHot {
        depth: usize,
        indices: BufferId,
        out: BufferId,
    },
    /// `out = dequant(quant(x))` per tile of the last two axes (see
    /// `graph::Op::QuantizeDequantize`); `x` is dense and `out` has its shape.
    QuantizeDequantize {
        format: QuantFormat,
        tile_rows: usize,
        tile_cols: usize,
        pow2_scales: bool,
        x: BufferId,
        out: BufferId,
    },
    /// `graph::Op::CrossEntropy` on dense buffers: `logits` `[rows…, vocab]`, `labels` and
    /// `loss` one value per row (a negative label is ignored: its loss is 0). With `kept`, the
    /// call also writes each row's exponentials `exp(x − max)` (the logits' shape) and their
    /// sum (one per row) for a `CrossEntropyGrad` to read. A CPU form
    /// (`lower::LowerOptions::cross_entropy_routines`), where a hand-vectorised routine beats
    /// the generated loops; the CUDA plan refuses it.
    CrossEntropy {
        logits: BufferId,
        labels: BufferId,
        loss: BufferId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kept: Option<KeptExponentials>,
    },
    /// The gradient of a `CrossEntropy` that kept its exponentials: `out = (e / Σe − [v =
    /// label]) · cotangent` per row (zeros for an ignored row), `out` the logits' shape.
    CrossEntropyGrad {
        kept: KeptExponentials,
        labels: BufferId,
        cotangent: BufferId,
        out: BufferId,
    },
    /// A language-model head and its loss, forward and backward in one call: `logits = hidden ·
    /// weightᵀ` (`hidden` `[tokens, width]`, `weight` `[vocab, width]`, dense), every row's
    /// loss against `labels` (as `CrossEntropy`) into `loss`, and for the rows' `cotangent`
    /// the gradients `hidden_grad = dlogits · weight` and `weight_grad = dlogitsᵀ · hidden`,
    /// `dlogits = (softmax(logits) − onehot(label)) · cotangent` (as `CrossEntropyGrad`): what
    /// a matmul, a cross-entropy, its gradient and the gradient's two matmuls compute, with the
    /// products' `accumulation`, `exact_in` and `rounds`, but without the vocabulary-wide
    /// arrays between them. A CPU form (`lower::LowerOptions::linear_cross_entropy_routines`),
    /// recognised in the finished program; the CUDA plan refuses it.
    LinearCrossEntropy {
        hidden: BufferId,
        weight: BufferId,
        labels: BufferId,
        cotangent: BufferId,
        loss: BufferId,
        hidden_grad: BufferId,
        weight_grad: BufferId,
        #[serde(default)]
        accumulation: Accumulation,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exact_in: Option<DType>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rounds: bool,
    },
    /// A row softmax over the innermost axis of `domain`, as the fused loop nest computes it:
    /// per row, `m = max(s)`, `exponentials = exp(s − m)`, their sum (stored per row through
    /// `sums` when given), and `out = exponentials / sum`, `s` being `scores`. A CPU form
    /// (`lower::LowerOptions::softmax_routines`), recognised in the loop nest after fusion;
    /// every written view covers its buffer densely, row-major over `domain`.
    Softmax {
        domain: Vec<usize>,
        scores: Scores,
        exponentials: View,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sums: Option<View>,
        out: View,
    },
    /// The gradient of a [`Library::Softmax`] that kept its exponentials and sums, as the
    /// differentiated loop nest computes it: per row, `r = Σ −(dp · (p / s))`, then
    /// `out = ((dp / s + r) · e)`, zero where `mask` is zero, times `scale`, where `dp` is
    /// `cotangent`, `p` the softmax, `s` the row's sum (a per-row view) and `e` the
    /// exponentials. `out` covers its buffer densely, row-major over `domain`.
    SoftmaxGrad {
        domain: Vec<usize>,
        cotangent: View,
        probabilities: View,
        sums: View,
        exponentials: View,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mask: Option<View>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scale: Option<f64>,
        out: View,
    },
    /// `graph::Op::CausalAttention` of `operands` (`[q, k_nope, k_rope, v]` in the op's
    /// layouts, of `shape`, each read as rows where it lies) into `out` (dense), and with `lse`
    /// the `CausalAttentionLse` of the same operands (the statistic a flash-attention forward
    /// computes anyway, which its gradient reads); at least one is written. A form for a target
    /// with a fused attention (`lower::LowerOptions::attention_calls`, the CUDA plan's
    /// templates).
    CausalAttention {
        operands: [AttentionRows; 4],
        shape: AttentionShape,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        out: Option<BufferId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lse: Option<BufferId>,
        config: AttentionConfig,
    },
    /// The `graph::Op::CausalAttentionGrad`s of one attention for one cotangent, in one call:
    /// `grads[i]`, when given, receives the gradient of operand `i` (`graph::AttentionOperand`
    /// order: q, k_nope, k_rope, v; dense). `out`, `lse` and `d_out` are dense; `out` and `lse`
    /// are the forward's results for `operands`.
    CausalAttentionGrad {
        operands: [AttentionRows; 4],
        shape: AttentionShape,
        out: BufferId,
        lse: BufferId,
        d_out: BufferId,
        grads: [Option<BufferId>; 4],
        config: AttentionConfig,
    },
    /// SwiGLU's gating over the innermost axis of `domain`, as the fused loop nest computes it:
    /// `sigmoid = σ(gate)`, `silu = gate · sigmoid`, `out = silu · up`, each stored (the
    /// gradient reads the first two). A CPU form (`lower::LowerOptions::swiglu_routines`),
    /// recognised in the loop nest after fusion; every written view covers its buffer densely,
    /// row-major over `domain`.
    Swiglu {
        domain: Vec<usize>,
        gate: View,
        up: View,
        sigmoid: View,
        silu: View,
        out: View,
    },
}

/// A softmax's scores: `x · scale` (`x` without one), replaced by `fill` where `mask` is zero.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub x: View,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Masking>,
}

impl Scores {
    /// The scores as the loop nest's expression computes them.
    pub fn expr(&self) -> Expr {
        let x = Expr::Load(self.x.clone());
        let scaled = match self.scale {
            Some(c) => Expr::Binary(BinaryOp::Mul, Box::new(x), Box::new(Expr::Constant(c))),
            None => x,
        };
        match &self.mask {
            Some(Masking { mask, fill }) => Expr::Select(
                Box::new(Expr::Load(mask.clone())),
                Box::new(scaled),
                Box::new(Expr::Constant(*fill)),
            ),
            None => scaled,
        }
    }
}

/// Where a softmax's scores are kept (`mask` non-zero) and the value elsewhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Masking {
    pub mask: View,
    pub fill: f64,
}

/// What a cross-entropy call keeps for its gradient (see [`Library::CrossEntropy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptExponentials {
    pub exponentials: BufferId,
    pub sums: BufferId,
}

// A program has a few hundred kernels: a call's size beside a loop nest's costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelBody {
    Loop(LoopNest),
    Library(Library),
}

/// One unit of work, with where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    /// Deterministic, readable (`k12_rmsnorm_model_layers_0_input_layernorm`).
    pub name: String,
    /// The graph nodes it computes.
    pub nodes: Vec<NodeId>,
    /// The module path of its main node.
    pub origin: String,
    pub body: KernelBody,
}

/// A compiled graph: buffers, kernels in execution order, and the named results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<Kernel>,
    /// Graph outputs: name and the buffer holding it.
    pub outputs: Vec<(String, BufferId)>,
}

impl Program {
    pub fn buffer(&self, id: BufferId) -> &Buffer {
        &self.buffers[id.index()]
    }

    /// The buffer whose memory holds `id`'s elements, and where they start: a window's
    /// temporary, else `id` itself at 0.
    pub fn holder(&self, id: BufferId) -> (BufferId, usize) {
        match self.buffer(id).role {
            BufferRole::Window { of, offset } => (of, offset),
            _ => (id, 0),
        }
    }

    pub fn output(&self, name: &str) -> Option<BufferId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| *b)
    }

    /// Floating-point operations of the program's matmuls (2·m·n·k each; attention scores count
    /// in full, masked or not). The elementwise kernels are not counted: they are a rounding
    /// error next to the GEMMs, and leaving them out is how MFU figures are usually quoted.
    pub fn matmul_flops(&self) -> u64 {
        self.kernels.iter().map(|k| self.flops_of(k)).sum()
    }

    /// Floating-point operations of one kernel when it is a matmul (as [`Self::matmul_flops`]
    /// counts them), 0 otherwise.
    pub fn flops_of(&self, kernel: &Kernel) -> u64 {
        let dims = |b: &BufferId| self.buffer(*b).ty.dims().to_vec();
        match &kernel.body {
            KernelBody::Library(Library::MatMul { batch, m, n, k, .. }) => {
                2 * (batch.iter().product::<usize>() * m * n * k) as u64
            }
            KernelBody::Library(Library::GroupedMatMul {
                x, expert_ids, out, ..
            }) => {
                let (ids, n) = (dims(expert_ids), dims(out)[2]);
                let k = *dims(x).last().expect("x has rows");
                2 * (ids[0] * ids[1] * n * k) as u64
            }
            KernelBody::Library(Library::GroupedMatMulWeightGrad { cotangent, x, .. }) => {
                let (c, k) = (dims(cotangent), *dims(x).last().expect("x has rows"));
                2 * (c[0] * c[1] * c[2] * k) as u64
            }
            KernelBody::Library(Library::CausalAttention { shape, out, .. }) => {
                // The scores' product, and the values' when the output is wanted (the statistic
                // alone needs only the scores).
                let widths = shape.nope + shape.rope + if out.is_some() { shape.v } else { 0 };
                2 * (shape.batch * shape.heads * shape.tokens.pow(2) * widths) as u64
            }
            // The products of autodiff's backward: dP = dO vᵀ, dv, dq and dk.
            KernelBody::Library(Library::CausalAttentionGrad { shape, .. }) => {
                let widths = shape.nope + shape.rope + shape.v;
                2 * (shape.batch * shape.heads * shape.tokens.pow(2) * 2 * widths) as u64
            }
            // The logits' product and the gradient's two.
            KernelBody::Library(Library::LinearCrossEntropy { hidden, weight, .. }) => {
                let numel = |b: &BufferId| self.buffer(*b).ty.numel() as u64;
                let width = *dims(weight).last().expect("the weight has a width") as u64;
                3 * 2 * numel(hidden) * (numel(weight) / width.max(1))
            }
            _ => 0,
        }
    }
}

/// The extents of an attention call's operands: `q [batch, tokens, heads, nope + rope]`,
/// `k_nope [batch, tokens, heads, nope]`, `k_rope [batch, tokens, rope]`,
/// `v [batch, tokens, heads, v]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
}

/// An attention operand read as rows of its last axis: row `r` (in row-major order of the
/// other axes) is the `width` contiguous elements from `offset + r · row_stride` of `buffer`.
/// A slice of a wider tensor's last axis (MLA's `k_nope` and `v`, halves of one projection)
/// is read where it lies, without a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttentionRows {
    pub buffer: BufferId,
    pub offset: usize,
    pub row_stride: usize,
}

/// The `[experts, n, k]` weights of a grouped matmul, each expert's `[n, k]` matrix with
/// strides `[sn, sk]`: `[k, 1]` as weights are stored, `[1, n]` for the transposed weights the
/// input gradient multiplies by, read where they lie.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertWeights {
    /// One view of a buffer holding `experts` blocks of `n·k` (strides `[n·k, sn, sk]`).
    Stacked(View),
    /// Expert `e`'s matrix is `parts[e]` (strides `[sn, sk]`), each in a buffer of its own: a
    /// stack of parameters read where each lies instead of copied into one buffer every run.
    Parts(Vec<View>),
}

impl ExpertWeights {
    /// The buffers the weights are read from.
    pub fn buffers(&self) -> Vec<BufferId> {
        match self {
            ExpertWeights::Stacked(view) => vec![view.buffer],
            ExpertWeights::Parts(parts) => parts.iter().map(|p| p.buffer).collect(),
        }
    }
}

/// Where a grouped matmul's weight gradient, `[experts, n, k]`, is written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertOutputs {
    /// One buffer of `experts` row-major blocks of `n·k`.
    Stacked(BufferId),
    /// Expert `e`'s row-major `[n, k]` block into buffer `parts[e]`: the experts' weight
    /// gradients written where each is wanted (the graph's outputs), instead of sliced out of
    /// a stacked buffer every run.
    Parts(Vec<BufferId>),
}

impl ExpertOutputs {
    /// The buffers written.
    pub fn buffers(&self) -> Vec<BufferId> {
        match self {
            ExpertOutputs::Stacked(buffer) => vec![*buffer],
            ExpertOutputs::Parts(parts) => parts.clone(),
        }
    }
}

impl Expr {
    /// Calls `visit` on every view this expression loads.
    pub fn for_each_load(&self, visit: &mut impl FnMut(&View)) {
        match self {
            Expr::Load(view) => visit(view),
            Expr::Constant(_) | Expr::Row(_) => {}
            Expr::Unary(_, a) | Expr::Cast(_, a) => a.for_each_load(visit),
            Expr::Binary(_, a, b) | Expr::Compare(_, a, b) => {
                a.for_each_load(visit);
                b.for_each_load(visit);
            }
            Expr::Select(c, a, b) => {
                c.for_each_load(visit);
                a.for_each_load(visit);
                b.for_each_load(visit);
            }
        }
    }
}

impl Stmt {
    /// The value the statement computes at every point.
    pub fn value(&self) -> &Expr {
        match self {
            Stmt::Reduce { value, .. }
            | Stmt::Store { value, .. }
            | Stmt::StoreRow { value, .. } => value,
        }
    }

    /// The view the statement writes through, if it writes.
    pub fn target(&self) -> Option<&View> {
        match self {
            Stmt::Reduce { .. } => None,
            Stmt::Store { view, .. } | Stmt::StoreRow { view, .. } => Some(view),
        }
    }
}

/// The `(x_slots, k)` of a grouped matmul's `x` held in a buffer of shape `x_dims` for `tokens`
/// tokens: its rows are the buffer's last axis, `k` long, and it has `x_slots` of them per
/// token (see [`Library::GroupedMatMul`]).
pub fn grouped_rows(x_dims: &[usize], tokens: usize) -> (usize, usize) {
    let k = x_dims.last().copied().unwrap_or(1);
    let x_slots = x_dims.iter().product::<usize>() / (tokens * k).max(1);
    (x_slots, k)
}

impl Library {
    /// The buffers the call reads, then those it writes.
    pub fn operands(&self) -> (Vec<BufferId>, Vec<BufferId>) {
        match self {
            Library::MatMul { a, b, out, .. } => (vec![a.buffer, b.buffer], vec![out.buffer]),
            Library::GroupedMatMul {
                x,
                weights,
                expert_ids,
                out,
                ..
            } => {
                let mut read = vec![*x];
                read.extend(weights.buffers());
                read.push(*expert_ids);
                (read, vec![*out])
            }
            Library::GroupedMatMulWeightGrad {
                cotangent,
                x,
                expert_ids,
                out,
                ..
            } => (vec![*cotangent, *x, *expert_ids], out.buffers()),
            Library::Gather {
                table,
                indices,
                out,
            } => (vec![*table, *indices], vec![*out]),
            Library::TakeAlong {
                x, indices, out, ..
            } => (vec![*x, *indices], vec![*out]),
            Library::IndexAdd {
                values,
                indices,
                out,
            } => (vec![*values, *indices], vec![*out]),
            Library::TopK { x, out, .. } => (vec![*x], vec![*out]),
            Library::OneHot { indices, out, .. } => (vec![*indices], vec![*out]),
            Library::QuantizeDequantize { x, out, .. } => (vec![*x], vec![*out]),
            Library::CrossEntropy {
                logits,
                labels,
                loss,
                kept,
            } => {
                let mut written = vec![*loss];
                if let Some(kept) = kept {
                    written.extend([kept.exponentials, kept.sums]);
                }
                (vec![*logits, *labels], written)
            }
            Library::CrossEntropyGrad {
                kept,
                labels,
                cotangent,
                out,
            } => (
                vec![kept.exponentials, kept.sums, *labels, *cotangent],
                vec![*out],
            ),
            Library::LinearCrossEntropy {
                hidden,
                weight,
                labels,
                cotangent,
                loss,
                hidden_grad,
                weight_grad,
                ..
            } => (
                vec![*hidden, *weight, *labels, *cotangent],
                vec![*loss, *hidden_grad, *weight_grad],
            ),
            Library::Softmax {
                scores,
                exponentials,
                sums,
                out,
                ..
            } => {
                let mut read = vec![scores.x.buffer];
                read.extend(scores.mask.as_ref().map(|m| m.mask.buffer));
                let mut written = vec![exponentials.buffer];
                written.extend(sums.as_ref().map(|s| s.buffer));
                written.push(out.buffer);
                (read, written)
            }
            Library::SoftmaxGrad {
                cotangent,
                probabilities,
                sums,
                exponentials,
                mask,
                out,
                ..
            } => {
                let mut read = vec![
                    cotangent.buffer,
                    probabilities.buffer,
                    sums.buffer,
                    exponentials.buffer,
                ];
                read.extend(mask.as_ref().map(|m| m.buffer));
                (read, vec![out.buffer])
            }
            Library::Swiglu {
                gate,
                up,
                sigmoid,
                silu,
                out,
                ..
            } => (
                vec![gate.buffer, up.buffer],
                vec![sigmoid.buffer, silu.buffer, out.buffer],
            ),
            Library::CausalAttention {
                operands, out, lse, ..
            } => (
                operands.iter().map(|rows| rows.buffer).collect(),
                out.iter().chain(lse).copied().collect(),
            ),
            Library::CausalAttentionGrad {
                operands,
                out,
                lse,
                d_out,
                grads,
                ..
            } => {
                let mut read: Vec<BufferId> = operands.iter().map(|rows| rows.buffer).collect();
                read.extend([*out, *lse, *d_out]);
                (read, grads.iter().flatten().copied().collect())
            }
        }
    }
}

impl Kernel {
    /// Every buffer the kernel reads or writes (its writes first; one both read and written
    /// appears twice): what the memory plan keeps alive while it runs.
    pub fn touches(&self) -> Vec<BufferId> {
        let (reads, mut touched) = self.reads_and_writes();
        touched.extend(reads);
        touched
    }

    /// Buffers read and buffers written, each once, in first-use order.
    pub fn reads_and_writes(&self) -> (Vec<BufferId>, Vec<BufferId>) {
        let (mut reads, mut writes) = (Vec::new(), Vec::new());
        let mut read = |b: BufferId| {
            if !reads.contains(&b) {
                reads.push(b)
            }
        };
        match &self.body {
            KernelBody::Library(call) => {
                let (inputs, outs) = call.operands();
                inputs.into_iter().for_each(&mut read);
                writes = outs;
            }
            KernelBody::Loop(nest) => {
                for stmt in &nest.body {
                    match stmt {
                        Stmt::Reduce { value, .. } => value.for_each_load(&mut |v| read(v.buffer)),
                        Stmt::Store { view, value } | Stmt::StoreRow { view, value } => {
                            value.for_each_load(&mut |v| read(v.buffer));
                            if !writes.contains(&view.buffer) {
                                writes.push(view.buffer);
                            }
                        }
                    }
                }
            }
        }
        (reads, writes)
    }
}
