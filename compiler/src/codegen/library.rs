//! Library calls as calls into the hand-written templates of `fathom-kernels`.
//!
//! The generated code covers loop nests; matmuls and the irregular operations run as templates.
//! This module only describes each call (routine, problem parameters, operands); instantiating
//! and launching a template is the runtime's job.
//!
//! | IR call | routine | template in fathom-kernels |
//! |---|---|---|
//! | `MatMul` | `gemm` | `fp8_gemm` (sm_90a) / `fp8_gemm_fallback` (sm_80), once operands are FP8 |
//! | `GroupedMatMul` | `grouped_gemm` | `grouped_fp8_gemm` / grouped `fp8_gemm_fallback`, once FP8 |
//! | `GroupedMatMulWeightGrad` | `grouped_gemm_weight_grad` | none yet |
//! | `QuantizeDequantize` | `quantize_dequantize` | `quantize` makes the FP8 values and scales; the dequantizing epilogue is not written yet |
//! | `Gather`, `IndexAdd`, `TakeAlong`, `TopK`, `OneHot` | same names | none yet |

use crate::kernel::{BufferId, Kernel, Library, Program, View};

use super::TemplateCall;

pub(crate) fn template_call(program: &Program, kernel: &Kernel, call: &Library) -> TemplateCall {
    let ty = |b: &BufferId| format!("{b}: {}", program.buffer(*b).ty);
    let view = |v: &View| format!("{v} of {}", program.buffer(v.buffer).ty);
    let (template, implemented_by, params): (_, _, Vec<(&'static str, String)>) = match call {
        Library::MatMul {
            batch,
            m,
            n,
            k,
            a,
            b,
            out,
        } => (
            "gemm",
            Some("fp8_gemm (sm_90a) / fp8_gemm_fallback (sm_80) on FP8 operands"),
            vec![
                ("batch", format!("{batch:?}")),
                ("m", m.to_string()),
                ("n", n.to_string()),
                ("k", k.to_string()),
                ("a", view(a)),
                ("b", view(b)),
                ("out", view(out)),
            ],
        ),
        Library::GroupedMatMul {
            x,
            weights,
            expert_ids,
            out,
        } => (
            "grouped_gemm",
            Some("grouped_fp8_gemm (sm_90a) / grouped fp8_gemm_fallback (sm_80) on FP8 operands"),
            vec![
                ("x", ty(x)),
                ("weights", ty(weights)),
                ("expert_ids", ty(expert_ids)),
                ("out", ty(out)),
            ],
        ),
        Library::GroupedMatMulWeightGrad {
            cotangent,
            x,
            expert_ids,
            out,
        } => (
            "grouped_gemm_weight_grad",
            None,
            vec![
                ("cotangent", ty(cotangent)),
                ("x", ty(x)),
                ("expert_ids", ty(expert_ids)),
                ("out", ty(out)),
            ],
        ),
        Library::Gather {
            table,
            indices,
            out,
        } => (
            "gather",
            None,
            vec![
                ("table", ty(table)),
                ("indices", ty(indices)),
                ("out", ty(out)),
            ],
        ),
        Library::IndexAdd {
            values,
            indices,
            out,
        } => (
            "index_add",
            None,
            vec![
                ("values", ty(values)),
                ("indices", ty(indices)),
                ("out", ty(out)),
            ],
        ),
        Library::TakeAlong {
            axis,
            x,
            indices,
            out,
        } => (
            "take_along",
            None,
            vec![
                ("axis", axis.to_string()),
                ("x", ty(x)),
                ("indices", ty(indices)),
                ("out", ty(out)),
            ],
        ),
        Library::TopK { k, x, out } => (
            "topk",
            None,
            vec![("k", k.to_string()), ("x", ty(x)), ("out", ty(out))],
        ),
        Library::OneHot {
            depth,
            indices,
            out,
        } => (
            "one_hot",
            None,
            vec![
                ("depth", depth.to_string()),
                ("indices", ty(indices)),
                ("out", ty(out)),
            ],
        ),
        Library::QuantizeDequantize {
            format,
            tile_rows,
            tile_cols,
            pow2_scales,
            x,
            out,
        } => (
            "quantize_dequantize",
            None,
            vec![
                ("format", format.to_string()),
                ("tile", format!("{tile_rows}x{tile_cols}")),
                ("pow2_scales", pow2_scales.to_string()),
                ("x", ty(x)),
                ("out", ty(out)),
            ],
        ),
    };
    let (reads, write) = call.operands();
    TemplateCall {
        name: kernel.name.clone(),
        nodes: kernel.nodes.clone(),
        origin: kernel.origin.clone(),
        template,
        implemented_by,
        params,
        reads,
        write,
    }
}
