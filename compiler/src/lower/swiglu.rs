//! SwiGLU's gating as a library call ([`Library::Swiglu`]), under
//! [`LowerOptions::swiglu_routines`] (the CPU's choice where it has AVX-512: its routine runs
//! sixteen lanes of the sigmoid's `exp` where cranelift's loops run four).
//!
//! Fusion makes `σ(gate)`, `gate · σ(gate)` and their product with `up` one loop nest of three
//! stores (the gradient reads the first two). This pass recognises that nest, statement for
//! statement, in the finished program and replaces it with the call computing the same values;
//! a nest of any other shape stays a loop.
//!
//! [`LowerOptions::swiglu_routines`]: super::LowerOptions

use crate::graph::{BinaryOp, UnaryOp};
use crate::kernel::{Expr, KernelBody, Library, LoopNest, Program, Stmt, View};

use super::kernel_name;
use super::softmax::{apart, contiguous_rows, covers};

/// Replaces every SwiGLU gating nest of `program` with its call, renamed for what it now is
/// (`k31_swiglu_model_layers_0_mlp`).
pub(super) fn call_swiglus(program: &mut Program) {
    for index in 0..program.kernels.len() {
        let KernelBody::Loop(nest) = &program.kernels[index].body else {
            continue;
        };
        if let Some(call) = gating(program, nest) {
            let kernel = &mut program.kernels[index];
            kernel.name = kernel_name(index, "swiglu", &kernel.origin);
            kernel.body = KernelBody::Library(call);
        }
    }
}

/// `s = sigmoid(g); a = g · s; out = a · u`, each written view its whole buffer.
fn gating(program: &Program, nest: &LoopNest) -> Option<Library> {
    let [
        Stmt::Store {
            view: sigmoid,
            value: Expr::Unary(UnaryOp::Sigmoid, gate),
        },
        Stmt::Store {
            view: silu,
            value: Expr::Binary(BinaryOp::Mul, gate_again, sigmoid_read),
        },
        Stmt::Store {
            view: out,
            value: Expr::Binary(BinaryOp::Mul, silu_read, up),
        },
    ] = &nest.body[..]
    else {
        return None;
    };
    let (Expr::Load(gate), Expr::Load(up)) = (&**gate, &**up) else {
        return None;
    };
    let reads_back = |expr: &Expr, view: &View| matches!(expr, Expr::Load(v) if v == view);
    if !reads_back(gate_again, gate)
        || !reads_back(sigmoid_read, sigmoid)
        || !reads_back(silu_read, silu)
    {
        return None;
    }
    let (read, written) = ([gate, up], [sigmoid, silu, out]);
    let whole = written.iter().all(|v| covers(program, v, &nest.domain));
    let fits = contiguous_rows(&read, &written) && apart(&read, &written);
    (!nest.domain.is_empty() && fits && whole).then(|| Library::Swiglu {
        domain: nest.domain.clone(),
        gate: gate.clone(),
        up: up.clone(),
        sigmoid: sigmoid.clone(),
        silu: silu.clone(),
        out: out.clone(),
    })
}
