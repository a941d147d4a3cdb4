//! The stable text form of a kernel program, for snapshots and for people.
//!
//! ```text
//! b7 = f32[16,64] temp
//! kernel k3_rmsnorm (model.layers.0.input_layernorm; %76..%82)
//!   loop [16, 64]
//!     r0 = mean(b5[0; 64,1] * b5[0; 64,1])
//!     b7[0; 64,1] = b2[0; 0,1] * (b5[0; 64,1] * rsqrt(r0 + 1e-6))
//! ```
//! A view prints as `buffer[offset; strides]`, one stride per domain axis.

use std::fmt::{self, Display, Formatter};

use crate::DType;
use crate::graph::op::Scalar;
use crate::graph::{Accumulation, AttentionOperand, BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};

use super::{
    AttentionRows, AttentionShape, Buffer, BufferId, BufferRole, ExpertOutputs, ExpertWeights,
    Expr, Kernel, KernelBody, Library, Program, Stmt, View,
};

impl Display for BufferId {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

impl Display for View {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{};", self.buffer, self.offset)?;
        for (i, s) in self.strides.iter().enumerate() {
            write!(f, "{}{s}", if i == 0 { " " } else { "," })?;
        }
        f.write_str("]")
    }
}

/// A stacked view as a view; parts as `parts[b3[0; 64,1], b4[0; 64,1], …]`, expert by expert.
impl Display for ExpertWeights {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            ExpertWeights::Stacked(view) => write!(f, "{view}"),
            ExpertWeights::Parts(parts) => write_parts(f, parts),
        }
    }
}

/// A stacked buffer as its name; parts as `parts[b7, b8, …]`, expert by expert.
impl Display for ExpertOutputs {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            ExpertOutputs::Stacked(buffer) => write!(f, "{buffer}"),
            ExpertOutputs::Parts(parts) => write_parts(f, parts),
        }
    }
}

/// Expert by expert: `parts[a, b, …]`.
fn write_parts(f: &mut Formatter<'_>, parts: &[impl Display]) -> fmt::Result {
    f.write_str("parts[")?;
    for (i, part) in parts.iter().enumerate() {
        write!(f, "{}{part}", if i == 0 { "" } else { ", " })?;
    }
    f.write_str("]")
}

impl Display for Buffer {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.ty)?;
        match &self.role {
            BufferRole::Input(name) => write!(f, "input \"{name}\""),
            BufferRole::Parameter(name) => write!(f, "param \"{name}\""),
            BufferRole::Constant(data) => write!(f, "{}", Op::Constant(data.clone())),
            BufferRole::Temporary => f.write_str("temp"),
            BufferRole::StackedParameters(names) => match &names[..] {
                [first, .., last] if names.len() > 2 => {
                    write!(f, "params [\"{first}\" … \"{last}\"] ({})", names.len())
                }
                _ => write!(f, "params {names:?}"),
            },
            BufferRole::Window { of, offset } => write!(f, "window of {of} at {offset}"),
        }
    }
}

fn unary(op: UnaryOp) -> &'static str {
    Op::Unary(op).name()
}

fn binary_symbol(op: BinaryOp) -> Option<&'static str> {
    match op {
        BinaryOp::Add => Some("+"),
        BinaryOp::Sub => Some("-"),
        BinaryOp::Mul => Some("*"),
        BinaryOp::Div => Some("/"),
        BinaryOp::Max | BinaryOp::Min => None,
    }
}

fn compare_symbol(op: CompareOp) -> &'static str {
    match op {
        CompareOp::Eq => "==",
        CompareOp::Lt => "<",
        CompareOp::Le => "<=",
        CompareOp::Gt => ">",
        CompareOp::Ge => ">=",
    }
}

impl Display for Expr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Load(view) => write!(f, "{view}"),
            Expr::Constant(c) => write!(f, "{}", Scalar(*c)),
            Expr::Row(r) => write!(f, "r{r}"),
            Expr::Unary(op, a) => write!(f, "{}({a})", unary(*op)),
            Expr::Binary(op, a, b) => match binary_symbol(*op) {
                Some(symbol) => write!(f, "({a} {symbol} {b})"),
                None => write!(f, "{}({a}, {b})", Op::Binary(*op).name()),
            },
            Expr::Compare(op, a, b) => write!(f, "({a} {} {b})", compare_symbol(*op)),
            Expr::Select(c, a, b) => write!(f, "select({c}, {a}, {b})"),
            Expr::Cast(to, a) => write!(f, "cast<{to}>({a})"),
        }
    }
}

fn reduce_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum => "sum",
        ReduceOp::Mean => "mean",
        ReduceOp::Max => "max",
    }
}

/// A product's arithmetic after its operands: how it sums (when not exactly), the narrower type
/// its operands' values belong to (when they do) and whether it rounds them to that type as it
/// reads them, e.g. `, acc 13b/128` or `, bf16 operands rounded as read`.
struct Arithmetic(Accumulation, Option<DType>, bool);

impl Display for Arithmetic {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if !self.0.is_exact() {
            write!(f, ", acc {}", self.0)?;
        }
        if let Some(dtype) = self.1 {
            write!(f, ", {dtype} operands")?;
            if self.2 {
                write!(f, " rounded as read")?;
            }
        }
        Ok(())
    }
}

/// `b12[+128, stride 256]`: the buffer, the first row's offset and the rows' stride.
impl Display for AttentionRows {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[+{}, stride {}]",
            self.buffer, self.offset, self.row_stride
        )
    }
}

/// `b2 t100 h3 d128+64 v128`: batch, tokens, heads, the query's and key's widths (without and
/// with position), the value's.
impl Display for AttentionShape {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "b{} t{} h{} d{}+{} v{}",
            self.batch, self.tokens, self.heads, self.nope, self.rope, self.v
        )
    }
}

impl Display for Library {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Library::MatMul {
                batch,
                m,
                n,
                k,
                a,
                b,
                out,
                accumulation,
                exact_in,
                rounds,
                triangular,
            } => {
                write!(
                    f,
                    "matmul batch {batch:?} m {m} n {n} k {k}: {out} = {a} x {b}{}",
                    Arithmetic(*accumulation, *exact_in, *rounds)
                )?;
                match triangular {
                    Some(t) => write!(f, ", {t}"),
                    None => Ok(()),
                }
            }
            Library::GroupedMatMul {
                x,
                weights,
                expert_ids,
                out,
                accumulation,
                exact_in,
                rounds,
            } => write!(
                f,
                "grouped_matmul {out} = {x} x {weights} by {expert_ids}{}",
                Arithmetic(*accumulation, *exact_in, *rounds)
            ),
            Library::GroupedMatMulWeightGrad {
                cotangent,
                x,
                expert_ids,
                out,
                accumulation,
                exact_in,
                rounds,
                rounding,
            } => {
                write!(
                    f,
                    "grouped_matmul_weight_grad {out} = {cotangent}^T x {x} by {expert_ids}{}",
                    Arithmetic(*accumulation, *exact_in, *rounds)
                )?;
                match rounding {
                    Some(tiles) => write!(f, ", operands rounded to {tiles}"),
                    None => Ok(()),
                }
            }
            Library::Gather {
                table,
                indices,
                out,
            } => write!(f, "gather {out} = {table}[{indices}]"),
            Library::IndexAdd {
                values,
                indices,
                out,
            } => write!(f, "index_add {out} = sum of {values} by {indices}"),
            Library::TakeAlong {
                axis,
                x,
                indices,
                out,
            } => write!(f, "take_along<axis={axis}> {out} = {x}[{indices}]"),
            Library::TopK { k, x, out } => write!(f, "topk<k={k}> {out} = {x}"),
            Library::OneHot {
                depth,
                indices,
                out,
            } => write!(f, "one_hot<depth={depth}> {out} = {indices}"),
            Library::CausalAttention {
                operands: [q, k_nope, k_rope, v],
                shape,
                out,
                lse,
                config,
            } => {
                let written: Vec<String> = [("out", out), ("lse", lse)]
                    .into_iter()
                    .filter_map(|(what, b)| b.map(|b| format!("{what} {b}")))
                    .collect();
                write!(
                    f,
                    "causal_attention<{config}> {} = attend({q}, [{k_nope}, {k_rope}], {v}) \
                     over {shape}",
                    written.join(", ")
                )
            }
            Library::CausalAttentionGrad {
                operands: [q, k_nope, k_rope, v],
                shape,
                out,
                lse,
                d_out,
                grads,
                config,
            } => {
                let written: Vec<String> = AttentionOperand::ALL
                    .iter()
                    .zip(grads)
                    .filter_map(|(operand, b)| b.map(|b| format!("d{} {b}", operand.name())))
                    .collect();
                write!(
                    f,
                    "causal_attention_grad<{config}> {} = grad(attend({q}, [{k_nope}, \
                     {k_rope}], {v}) = {out}, lse {lse}) for {d_out} over {shape}",
                    written.join(", ")
                )
            }
            Library::CrossEntropy {
                logits,
                labels,
                loss,
                kept,
            } => {
                write!(f, "cross_entropy {loss} = {logits} against {labels}")?;
                match kept {
                    Some(kept) => write!(
                        f,
                        ", keeping exponentials {} and sums {}",
                        kept.exponentials, kept.sums
                    ),
                    None => Ok(()),
                }
            }
            Library::CrossEntropyGrad {
                kept,
                labels,
                cotangent,
                out,
            } => write!(
                f,
                "cross_entropy_grad {out} = ({} / {} - onehot({labels})) * {cotangent}",
                kept.exponentials, kept.sums
            ),
            Library::LinearCrossEntropy {
                hidden,
                weight,
                labels,
                cotangent,
                loss,
                hidden_grad,
                weight_grad,
                accumulation,
                exact_in,
                rounds,
            } => write!(
                f,
                "linear_cross_entropy {loss} = cross_entropy({hidden} x {weight}^T against \
                 {labels}), gradients {hidden_grad} and {weight_grad} for cotangent \
                 {cotangent}{}",
                Arithmetic(*accumulation, *exact_in, *rounds)
            ),
            Library::Softmax {
                domain,
                scores,
                exponentials,
                sums,
                out,
            } => {
                write!(
                    f,
                    "softmax {domain:?}: {out} = softmax({}), keeping exponentials {exponentials}",
                    scores.expr()
                )?;
                match sums {
                    Some(sums) => write!(f, " and sums {sums}"),
                    None => Ok(()),
                }
            }
            Library::SoftmaxGrad {
                domain,
                cotangent,
                probabilities,
                sums,
                exponentials,
                mask,
                scale,
                out,
            } => {
                let gradient = format!(
                    "((({cotangent} / {sums}) + sum(neg({cotangent} * ({probabilities} / \
                     {sums})))) * {exponentials})"
                );
                let masked = match mask {
                    Some(mask) => format!("select({mask}, {gradient}, 0)"),
                    None => gradient,
                };
                write!(f, "softmax_grad {domain:?}: {out} = {masked}")?;
                match scale {
                    Some(c) => write!(f, " * {}", Scalar(*c)),
                    None => Ok(()),
                }
            }
            Library::Swiglu {
                domain,
                gate,
                up,
                sigmoid,
                silu,
                out,
            } => write!(
                f,
                "swiglu {domain:?}: {out} = ({gate} * sigmoid({gate})) * {up}, keeping sigmoid \
                 {sigmoid} and silu {silu}"
            ),
            Library::QuantizeDequantize {
                format,
                tile_rows,
                tile_cols,
                pow2_scales,
                x,
                out,
            } => {
                let pow2 = if *pow2_scales { ", pow2" } else { "" };
                write!(
                    f,
                    "quantize_dequantize<{format}, tile={tile_rows}x{tile_cols}{pow2}> {out} = {x}"
                )
            }
        }
    }
}

impl Display for Kernel {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let nodes = match (self.nodes.first(), self.nodes.last()) {
            (Some(a), Some(b)) if a != b => format!("{a}..{b}, {} nodes", self.nodes.len()),
            (Some(a), _) => a.to_string(),
            _ => String::new(),
        };
        let origin = if self.origin.is_empty() {
            "(top)"
        } else {
            &self.origin
        };
        writeln!(f, "kernel {} ({origin}; {nodes})", self.name)?;
        match &self.body {
            KernelBody::Library(call) => writeln!(f, "  {call}"),
            KernelBody::Loop(nest) => {
                writeln!(f, "  loop {:?}", nest.domain)?;
                for stmt in &nest.body {
                    match stmt {
                        Stmt::Reduce { row, op, value } => {
                            writeln!(f, "    r{row} = {}({value})", reduce_name(*op))?
                        }
                        Stmt::Store { view, value } => writeln!(f, "    {view} = {value}")?,
                        Stmt::StoreRow { view, value } => {
                            writeln!(f, "    {view} (per row) = {value}")?
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

impl Display for Program {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "program {} {{", self.name)?;
        for (i, buffer) in self.buffers.iter().enumerate() {
            writeln!(f, "  {} = {buffer}", BufferId(i as u32))?;
        }
        for kernel in &self.kernels {
            for line in kernel.to_string().lines() {
                writeln!(f, "  {line}")?;
            }
        }
        for (name, buffer) in &self.outputs {
            writeln!(f, "  output \"{name}\" = {buffer}")?;
        }
        writeln!(f, "}}")
    }
}
