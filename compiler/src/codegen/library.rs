//! Library calls as calls into the hand-written templates of `fathom-kernels`.
//!
//! The generated code covers loop nests; matmuls and the irregular operations run as templates.
//! This module only describes each call (routine, problem parameters, operands); instantiating
//! and launching a template is the runtime's job.
//!
//! | IR call | routine | templates in fathom-kernels |
//! |---|---|---|
//! | `MatMul` | `gemm` | `gemm_f32_batched`; of E4M3-rounded operands with Hopper's accumulation, `quantize` + `fp8_gemm` (sm_90a) / `fp8_gemm_fallback` (sm_80) |
//! | `GroupedMatMul` | `grouped_gemm` | `index_group_rows` + `gemm_f32_grouped`; `grouped_fp8_gemm` / grouped fallback |
//! | `GroupedMatMulWeightGrad` | `grouped_gemm_weight_grad` | `index_group_rows` + `gemm_f32_grouped_wgrad` |
//! | `QuantizeDequantize` | `quantize_dequantize` | `fake_quantize_e4m3`; `quantize` makes the codes and scales FP8 GEMMs read |
//! | `CausalAttention`, `CausalAttentionGrad` | `causal_attention`, `causal_attention_grad` | `convert` to bf16, `mla_attention_fwd`; `mla_attention_bwd_delta` + `mla_attention_bwd` |
//! | `Gather`, `IndexAdd`, `TakeAlong`, `TopK`, `OneHot` | same names | `index_gather`, `index_group_rows` + `index_index_add`, `index_take_along`, `index_top_k`, `index_one_hot` |
//!
//! A GEMM's `accumulation` is not a parameter here: `Limited` is the CPU's emulation of what
//! Hopper's FP8 tensor cores do, and on the GPU the hardware's own accumulation applies.
//!
//! The runtime's `cuda::library` plans the launches (grids and arguments) of each call.

use crate::kernel::{BufferId, ExpertOutputs, ExpertWeights, Kernel, Library, Program, View};

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
            ..
        } => (
            "gemm",
            Some(
                "gemm_f32_batched, or quantize + fp8_gemm (sm_90a) / fp8_gemm_fallback for \
                 E4M3 operands with Hopper's accumulation",
            ),
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
            ..
        } => (
            "grouped_gemm",
            Some("gemm_f32_grouped (grouped_fp8_gemm once the plan sorts tokens by expert)"),
            vec![
                ("x", ty(x)),
                (
                    "weights",
                    match weights {
                        ExpertWeights::Stacked(stacked) => view(stacked),
                        // Not made for CUDA (`LowerOptions::grouped_weights_in_place`).
                        parts => parts.to_string(),
                    },
                ),
                ("expert_ids", ty(expert_ids)),
                ("out", ty(out)),
            ],
        ),
        Library::GroupedMatMulWeightGrad {
            cotangent,
            x,
            expert_ids,
            out,
            ..
        } => (
            "grouped_gemm_weight_grad",
            Some("gemm_f32_grouped_wgrad"),
            vec![
                ("cotangent", ty(cotangent)),
                ("x", ty(x)),
                ("expert_ids", ty(expert_ids)),
                (
                    "out",
                    match out {
                        ExpertOutputs::Stacked(stacked) => ty(stacked),
                        // Not made for CUDA (`LowerOptions::grouped_weights_in_place`).
                        parts => parts.to_string(),
                    },
                ),
            ],
        ),
        Library::Gather {
            table,
            indices,
            out,
        } => (
            "gather",
            Some("index_gather"),
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
            Some("index_index_add"),
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
            Some("index_take_along"),
            vec![
                ("axis", axis.to_string()),
                ("x", ty(x)),
                ("indices", ty(indices)),
                ("out", ty(out)),
            ],
        ),
        Library::TopK { k, x, out } => (
            "topk",
            Some("index_top_k"),
            vec![("k", k.to_string()), ("x", ty(x)), ("out", ty(out))],
        ),
        Library::OneHot {
            depth,
            indices,
            out,
        } => (
            "one_hot",
            Some("index_one_hot"),
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
            Some("fake_quantize_e4m3"),
            vec![
                ("format", format.to_string()),
                ("tile", format!("{tile_rows}x{tile_cols}")),
                ("pow2_scales", pow2_scales.to_string()),
                ("x", ty(x)),
                ("out", ty(out)),
            ],
        ),
        Library::CausalAttention {
            operands,
            shape,
            out,
            lse,
            config,
        } => (
            "causal_attention",
            Some("convert_f32_bf16_rows x 4, mla_attention_fwd, convert_bf16_f32"),
            vec![
                ("config", config.to_string()),
                ("shape", shape.to_string()),
                ("operands", operands.map(|rows| rows.to_string()).join(", ")),
                ("out", out.as_ref().map_or("-".into(), ty)),
                ("lse", lse.as_ref().map_or("-".into(), ty)),
            ],
        ),
        Library::CausalAttentionGrad {
            shape,
            d_out,
            config,
            ..
        } => (
            "causal_attention_grad",
            Some(
                "convert_f32_bf16_rows x 6, fill_zero, mla_attention_bwd_delta, mla_attention_bwd",
            ),
            vec![
                ("config", config.to_string()),
                ("shape", shape.to_string()),
                ("d_out", ty(d_out)),
            ],
        ),
        // CPU forms (`LowerOptions::cross_entropy_routines`): no template; the plan refuses them.
        Library::CrossEntropy {
            logits,
            labels,
            loss,
            ..
        } => (
            "cross_entropy",
            None,
            vec![
                ("logits", ty(logits)),
                ("labels", ty(labels)),
                ("loss", ty(loss)),
            ],
        ),
        Library::CrossEntropyGrad {
            kept,
            labels,
            cotangent,
            out,
        } => (
            "cross_entropy_grad",
            None,
            vec![
                ("exponentials", ty(&kept.exponentials)),
                ("labels", ty(labels)),
                ("cotangent", ty(cotangent)),
                ("out", ty(out)),
            ],
        ),
        // CPU forms (`LowerOptions::linear_cross_entropy_routines`, `softmax_routines`,
        // `swiglu_routines`): no template; the plan refuses them.
        Library::Softmax {
            domain,
            scores,
            out,
            ..
        } => (
            "softmax",
            None,
            vec![
                ("domain", format!("{domain:?}")),
                ("scores", view(&scores.x)),
                ("out", view(out)),
            ],
        ),
        Library::SoftmaxGrad {
            domain,
            cotangent,
            out,
            ..
        } => (
            "softmax_grad",
            None,
            vec![
                ("domain", format!("{domain:?}")),
                ("cotangent", view(cotangent)),
                ("out", view(out)),
            ],
        ),
        Library::LinearCrossEntropy {
            hidden,
            weight,
            loss,
            ..
        } => (
            "linear_cross_entropy",
            None,
            vec![
                ("hidden", ty(hidden)),
                ("weight", ty(weight)),
                ("loss", ty(loss)),
            ],
        ),
        Library::Swiglu {
            domain, gate, out, ..
        } => (
            "swiglu",
            None,
            vec![
                ("domain", format!("{domain:?}")),
                ("gate", view(gate)),
                ("out", view(out)),
            ],
        ),
    };
    let (reads, writes) = call.operands();
    TemplateCall {
        name: kernel.name.clone(),
        nodes: kernel.nodes.clone(),
        origin: kernel.origin.clone(),
        template,
        implemented_by,
        params,
        reads,
        writes,
    }
}
