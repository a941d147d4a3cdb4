//! Lowering: a graph becomes a kernel [`Program`].
//!
//! Every node is either *materialised* (it gets a buffer, written by one kernel) or *inlined*
//! into the kernels of its users. Leaves, library ops (matmuls, lookups, top-k…), concatenations
//! and graph outputs are materialised; elementwise ops and movements are inlined into their
//! single user, so chains of them become one loop nest; a reduction over the last axis is fused
//! into the elementwise kernel that consumes it row by row (RMSNorm, softmax, the loss), as a
//! per-row value computed before the row's stores. Movements that only re-index a buffer
//! (reshape, permute, slice, broadcast) never copy: they become the strides of a
//! [`View`](crate::kernel::View). A concatenation's or stack's buffer is written by several
//! kernels, one region each: a part computed only to be assembled is stored by its own kernel
//! (a loop nest, a matmul, a nested concatenation) straight into its place, and only the
//! others are copied there.
//! Last, adjacent loop nests over the same domain are merged into one when each row of the
//! later one reads only its own row of the earlier one's results (see `merge`): a softmax's
//! max, exponentials, sum and division become one pass over each row.

mod affine;
mod exact;
mod fusion;
mod head;
mod merge;
mod softmax;
mod swiglu;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use thiserror::Error;

use crate::dtype::DType;
use crate::graph::{Graph, Node, NodeId, Op};
use crate::kernel::{Buffer, BufferId, BufferRole, Expr, Kernel, LoopNest, Program, Stmt};

pub use affine::{Affine, StridedView, row_major_strides};

#[derive(Debug, Error, PartialEq)]
pub enum LowerError {
    #[error("cannot lower {op} {node}: {reason}")]
    Unsupported {
        node: NodeId,
        op: &'static str,
        reason: String,
    },
    /// A pass before lowering refused the graph.
    #[error(transparent)]
    Graph(#[from] crate::error::GraphError),
}

/// Forms of kernel the lowering may use beyond those every backend runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LowerOptions {
    /// A grouped matmul may read a stack of parameters (the experts' weights) as one matrix
    /// per expert where each lies ([`crate::kernel::ExpertWeights::Parts`]) rather than from a
    /// stacked copy made every run, and its weight gradient may write each expert's block
    /// into that expert's own output ([`crate::kernel::ExpertOutputs::Parts`]) rather than
    /// into a stacked buffer sliced afterwards: the CPU backend runs both (the copies cost a
    /// 32-expert model's training step about 100 ms); the CUDA plan keeps one stacked buffer,
    /// fed with the parameters in place ([`crate::kernel::BufferRole::StackedParameters`]),
    /// the experts' gradients windows of the stacked gradient
    /// ([`crate::kernel::BufferRole::Window`]).
    pub grouped_weights_in_place: bool,
    /// A cross-entropy whose gradient the program computes stores its rows' exponentials
    /// (the logits' size, f32) and sums, and the gradient reads them instead of computing an
    /// exponential per logit again: the CPU backend's choice (the exponential is most of the
    /// two kernels' time there; torch's CPU loss keeps its log-softmax the same way); on a GPU
    /// the exponential is cheap and the stored array (vocabulary × tokens) is not.
    pub cross_entropy_keeps_exponentials: bool,
    /// A product whose operands are bf16 values rounds them as it reads them (see
    /// `kernel::Library::MatMul::rounds`), and a round trip to bf16 read only by such products
    /// is no kernel: the products read what it rounds. The CPU backend's choice where its
    /// bf16 GEMM runs (its packing rounds at no extra cost, where the cast kernels stored and
    /// loaded every rounded operand once more); the CUDA plan keeps the casts.
    pub products_round_operands: bool,
    /// Cross-entropies and their gradients are library calls (`kernel::Library::
    /// CrossEntropy`, `CrossEntropyGrad`) instead of loop nests, when their gradient keeps
    /// the exponentials or there is none: the CPU backend's choice where it has AVX-512 (its
    /// routine runs sixteen lanes of `exp` where cranelift's code runs four; the runtime's
    /// `cpu::lower_options`); the CUDA plan refuses the calls.
    pub cross_entropy_routines: bool,
    /// Softmaxes and their gradients are library calls (`kernel::Library::Softmax`,
    /// `SoftmaxGrad`) instead of the loop nests fusion makes of them, recognised in the
    /// finished program: the CPU backend's choice where it has AVX-512, for the reason of
    /// `cross_entropy_routines`; the CUDA plan refuses the calls.
    pub softmax_routines: bool,
    /// SwiGLU's gating (`σ(gate)`, `gate · σ(gate)`, times `up`) is a library call
    /// (`kernel::Library::Swiglu`) instead of the loop nest fusion makes of it, recognised in
    /// the finished program: the CPU backend's choice where it has AVX-512 (sixteen lanes of
    /// the sigmoid's `exp`); the CUDA plan refuses the call.
    pub swiglu_routines: bool,
    /// A training step's language-model head (the logits' matmul, the cross-entropy keeping
    /// its exponentials, its gradient and the gradient's two matmuls, products of bf16 values)
    /// is one library call (`kernel::Library::LinearCrossEntropy`), recognised in the finished
    /// program (with `cross_entropy_routines`): the CPU backend's choice where its bf16 GEMM
    /// runs (its routine keeps each chunk of tokens' logits in cache, where the five kernels
    /// wrote and read three vocabulary-wide arrays through memory); the CUDA plan refuses the
    /// call.
    pub linear_cross_entropy_routines: bool,
    /// Causal attention that the target runs as one call (`kernel::Library::CausalAttention`,
    /// `CausalAttentionGrad`) when [`AttentionCalls::takes`] it; every other attention op is
    /// expanded into the primitives it is made of (`passes::expand_attention`). The CUDA
    /// plan's choice (its flash-attention templates); the CPU runs the primitives.
    pub attention_calls: Option<AttentionCalls>,
}

/// Which causal attention ops a target runs as calls: those whose products read `products_in`
/// operands and whose head widths, padded with zeros to the multiples its kernels take, are
/// within their limits. Zero channels add nothing to a product, so padded heads give the same
/// attention; the target pads and unpads around its kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionCalls {
    pub products_in: DType,
    /// `nope` and `rope` are padded to multiples of this.
    pub width_multiple: usize,
    /// `v` is padded to a multiple of this.
    pub v_multiple: usize,
    /// The most query/key channels (`nope + rope`, padded) the kernels take.
    pub max_qk: usize,
    /// The most value channels (padded) the kernels take.
    pub max_v: usize,
}

impl AttentionCalls {
    /// `[nope, rope, v]` padded to the multiples, or `None` past the limits (or for a width of
    /// 0, which the kernels do not take).
    pub fn padded_widths(&self, [nope, rope, v]: [usize; 3]) -> Option<[usize; 3]> {
        if nope == 0 || rope == 0 || v == 0 {
            return None;
        }
        let up = |w: usize, multiple: usize| w.div_ceil(multiple.max(1)) * multiple.max(1);
        let padded = [
            up(nope, self.width_multiple),
            up(rope, self.width_multiple),
            up(v, self.v_multiple),
        ];
        (padded[0] + padded[1] <= self.max_qk && padded[2] <= self.max_v).then_some(padded)
    }

    /// Whether `node` is an attention op this target runs as a call.
    pub fn takes(&self, graph: &Graph, node: &Node) -> bool {
        let Some(config) = node.op.attention_config() else {
            return false;
        };
        let width = |i: usize| {
            *graph
                .ty(node.inputs[i])
                .dims()
                .last()
                .expect("rank checked")
        };
        config.products_in == Some(self.products_in)
            && self.padded_widths([width(1), width(2), width(3)]).is_some()
    }

    /// Whether `options` keep `node` whole.
    pub(crate) fn keep(options: &LowerOptions, graph: &Graph, node: &Node) -> bool {
        options
            .attention_calls
            .is_some_and(|calls| calls.takes(graph, node))
    }
}

impl LowerOptions {
    /// Everything the CPU backend runs (but `products_round_operands` and the routines, which
    /// depend on the CPU: the runtime's `cpu::lower_options`).
    pub fn cpu() -> Self {
        LowerOptions {
            grouped_weights_in_place: true,
            cross_entropy_keeps_exponentials: true,
            products_round_operands: false,
            cross_entropy_routines: false,
            softmax_routines: false,
            swiglu_routines: false,
            linear_cross_entropy_routines: false,
            attention_calls: None,
        }
    }
}

/// Compiles `graph` into kernels over buffers, in the forms every backend runs.
pub fn lower(graph: &Graph) -> Result<Program, LowerError> {
    lower_with(graph, LowerOptions::default())
}

/// Compiles `graph` into kernels over buffers, using the forms `options` allows.
///
/// Attention ops are expanded into primitives first (`passes::expand_attention`);
/// `compile::compile` does that before its passes, so that they merge what the expansions of
/// one attention's forward and gradients have in common.
pub fn lower_with(graph: &Graph, options: LowerOptions) -> Result<Program, LowerError> {
    let expanded = crate::passes::expand_attention(graph, |graph, node| {
        AttentionCalls::keep(&options, graph, node)
    })?;
    let mut lowering = fusion::Lowering::new(&expanded, options);
    lowering.run()?;
    let mut program = lowering.finish();
    if options.softmax_routines {
        softmax::call_softmaxes(&mut program);
    }
    if options.swiglu_routines {
        swiglu::call_swiglus(&mut program);
    }
    if options.linear_cross_entropy_routines {
        head::call_heads(&mut program);
    }
    Ok(program)
}

/// How a node is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Input, parameter or constant with more than one element: a buffer the caller fills.
    Leaf,
    /// A one-element constant, inlined as a literal.
    Scalar,
    /// Unary, binary, compare, select, cast: computed inside a loop nest.
    Elementwise,
    /// Reshape, permute, slice, expand: an index map.
    Movement,
    Reduce,
    /// A hand-written routine of the target.
    Library,
    /// Concat and stack: several kernels writing parts of one buffer (the parts' producers or
    /// copy loops).
    Assemble,
    /// A cross-entropy or its gradient: a loop nest of its own over the logits' rows.
    CrossEntropy,
}

fn class(op: &Op, numel: usize) -> Class {
    match op {
        Op::Input { .. } | Op::Parameter { .. } => Class::Leaf,
        Op::Constant(_) if numel == 1 => Class::Scalar,
        Op::Constant(_) => Class::Leaf,
        // A stop-gradient is the identity, inlined like an elementwise op (the passes drop it).
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Select
        | Op::Cast { .. }
        | Op::StopGradient => Class::Elementwise,
        Op::Reshape { .. } | Op::Permute { .. } | Op::Slice { .. } | Op::Expand { .. } => {
            Class::Movement
        }
        Op::Reduce { .. } => Class::Reduce,
        Op::MatMul { .. }
        | Op::Gather
        | Op::IndexAdd { .. }
        | Op::TakeAlong { .. }
        | Op::TopK { .. }
        | Op::OneHot { .. }
        | Op::GroupedMatMul { .. }
        | Op::GroupedMatMulWeightGrad { .. }
        | Op::QuantizeDequantize { .. }
        | Op::CausalAttention(_)
        | Op::CausalAttentionLse(_)
        | Op::CausalAttentionGrad { .. } => Class::Library,
        Op::Concat { .. } | Op::Stack => Class::Assemble,
        Op::CrossEntropy | Op::CrossEntropyGrad => Class::CrossEntropy,
    }
}

/// A kernel being assembled: its domain and the per-row reductions its stores use.
struct KernelBuilder {
    domain: Vec<usize>,
    rows: Vec<Stmt>,
    row_of: HashMap<NodeId, usize>,
    nodes: Vec<NodeId>,
}

impl KernelBuilder {
    fn new(domain: Vec<usize>) -> Self {
        KernelBuilder {
            domain,
            rows: Vec::new(),
            row_of: HashMap::new(),
            nodes: Vec::new(),
        }
    }

    fn into_loop(self, stores: Vec<Stmt>) -> (LoopNest, Vec<NodeId>) {
        let mut body = self.rows;
        body.extend(stores);
        let mut nodes = self.nodes;
        nodes.sort();
        nodes.dedup();
        (
            LoopNest {
                domain: self.domain,
                body,
            },
            nodes,
        )
    }
}

fn load(view: &StridedView, map: &Affine) -> Expr {
    Expr::Load(view.compose(map))
}

fn new_buffer(program: &mut Program, buffer: Buffer) -> BufferId {
    let id = BufferId(program.buffers.len() as u32);
    program.buffers.push(buffer);
    id
}

/// Appends `kernel` to the program, named after its index, what it computes and its origin
/// (`k12_rmsnorm_model_layers_0_input_layernorm`).
fn push_kernel(program: &mut Program, kernel: merge::Pending) {
    let name = kernel_name(
        program.kernels.len(),
        &kernel.whats.join("_"),
        &kernel.origin,
    );
    program.kernels.push(Kernel {
        name,
        nodes: kernel.nodes,
        origin: kernel.origin,
        body: kernel.body,
    });
}

/// `k<index>_<what>_<origin>`, the origin's punctuation as underscores.
fn kernel_name(index: usize, what: &str, origin: &str) -> String {
    let place: String = origin
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if place.is_empty() {
        format!("k{index}_{what}")
    } else {
        format!("k{index}_{what}_{place}")
    }
}

fn temporary(ty: &crate::dtype::TensorType) -> Buffer {
    Buffer {
        ty: ty.clone(),
        role: BufferRole::Temporary,
    }
}

/// The kernel-name word for a materialised node's op.
fn what(op: &Op) -> &'static str {
    match op {
        Op::Reshape { .. } | Op::Permute { .. } | Op::Slice { .. } | Op::Expand { .. } => "copy",
        Op::Reduce { .. } => "reduce",
        other => other.name(),
    }
}
