//! The precision pass on the training graph of a tiny DeepSeek-V3: which GEMMs it finds, which
//! it rewrites, and the tiles it gives them (pinned as a snapshot).

#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;

use fathom_compiler::DType;
use fathom_compiler::graph::{Accumulation, Graph, NodeId, Op};
use fathom_compiler::lower::LowerOptions;
use fathom_compiler::model::LossWeights;
use fathom_compiler::precision::{
    Fp8Scaling, GemmRole, Precision, PrecisionPolicy, activation_products, apply_precision,
    is_kept_in_f32, linear_gemms, precision_floor,
};
use fathom_compiler::spec::{Fp8Spec, ModelSpec};
use fathom_compiler::training::training_graph;

/// The workspace's micro spec (`fathom_compiler::spec::examples::micro`) with plain RoPE, a
/// query rank of 8 and FP8 tiles of 4, so that tiles are real (two per row of a hidden-8
/// activation).
fn tiny() -> ModelSpec {
    let mut spec = fathom_compiler::spec::examples::micro();
    spec.rope.yarn = None;
    spec.attention.q_lora_rank = Some(8);
    spec.fp8 = Some(Fp8Spec {
        activation_tile: 4,
        weight_block: 4,
    });
    spec
}

fn train_graph() -> Graph {
    training_graph(&tiny(), 1, 4, LossWeights::deepseek_v3())
        .unwrap()
        .graph
}

/// The Linear modules: rank-2 trainable `….weight` parameters other than the embedding and the
/// routed experts' (which run as grouped GEMMs of their stacks).
fn linear_paths(graph: &Graph) -> Vec<String> {
    graph
        .parameters()
        .filter(|(id, name, ty)| {
            graph.is_trainable(*id)
                && ty.rank() == 2
                && !name.contains(".experts.")
                && !name.ends_with("embed_tokens.weight")
        })
        .map(|(_, name, _)| name.strip_suffix(".weight").unwrap().to_owned())
        .collect()
}

fn is_qdq(graph: &Graph, id: NodeId) -> bool {
    matches!(graph.node(id).op, Op::QuantizeDequantize { .. })
}

/// An operand as the snapshot shows it: the rounding op and what it reads.
fn operand(graph: &Graph, id: NodeId) -> String {
    let node = graph.node(id);
    match &node.op {
        Op::QuantizeDequantize { .. } => format!(
            "{} {}{}",
            node.op,
            graph.ty(node.inputs[0]),
            saved(graph, node.inputs[0])
        ),
        Op::Reshape { .. } if is_qdq(graph, node.inputs[0]) => {
            let q = graph.node(node.inputs[0]);
            let source = graph.node(q.inputs[0]);
            let from = saved(graph, source.inputs[0]);
            format!("{} {} as {}{from}", q.op, graph.ty(source.inputs[0]), q.ty)
        }
        // A weight rounded as stored, or a saved activation in tiles along the tokens (the
        // weight gradient's `xᵀ`), read transposed.
        Op::Permute { .. } if is_qdq(graph, below_permutes(graph, id)) => {
            let q = graph.node(below_permutes(graph, id));
            let from = saved(graph, q.inputs[0]);
            format!(
                "{} {} read as {}{from}",
                q.op,
                graph.ty(q.inputs[0]),
                node.ty
            )
        }
        _ if rounded_to_bf16(graph, id) => format!("(bf16) {}", node.ty),
        _ => format!("(f32) {}", node.ty),
    }
}

/// The value `id` shows through permutes.
fn below_permutes(graph: &Graph, mut id: NodeId) -> NodeId {
    while let Op::Permute { .. } = graph.node(id).op {
        id = graph.node(id).inputs[0];
    }
    id
}

/// Whether `id` is, through permutes and reshapes, a value cast to bf16 and back.
fn rounded_to_bf16(graph: &Graph, mut id: NodeId) -> bool {
    while let Op::Permute { .. } | Op::Reshape { .. } = graph.node(id).op {
        id = graph.node(id).inputs[0];
    }
    let node = graph.node(id);
    node.op == (Op::Cast { to: DType::F32 })
        && graph.node(node.inputs[0]).op == (Op::Cast { to: DType::BF16 })
}

/// `, of the saved <rounding>` when `id` is, through permutes and reshapes, an FP8 rounding
/// (the activation a weight gradient reads as saved in FP8 by the forward pass).
fn saved(graph: &Graph, mut id: NodeId) -> String {
    while let Op::Permute { .. } | Op::Reshape { .. } = graph.node(id).op {
        id = graph.node(id).inputs[0];
    }
    match is_qdq(graph, id) {
        true => format!(", of the saved {}", graph.node(id).op),
        false => String::new(),
    }
}

#[test]
fn every_linear_has_three_gemms_and_fp8_rewrites_the_eligible_ones() {
    let graph = train_graph();
    let linears = linear_paths(&graph);
    let gemms = linear_gemms(&graph);
    let dense: Vec<_> = gemms.iter().filter(|g| !g.grouped).collect();
    let grouped: Vec<_> = gemms.iter().filter(|g| g.grouped).collect();

    // Exactly three per application of a Linear: forward, input gradient, weight gradient. Every
    // Linear is applied once, except the output head, which the MTP module shares.
    let uses = |path: &str| if path == "lm_head" { 2 } else { 1 };
    for path in &linears {
        for role in [
            GemmRole::Forward,
            GemmRole::InputGradient,
            GemmRole::WeightGradient,
        ] {
            let count = dense
                .iter()
                .filter(|g| &g.path == path && g.role == role)
                .count();
            assert_eq!(count, uses(path), "{path}: {role:?}");
        }
    }
    let applications: usize = linears.iter().map(|p| uses(p)).sum();
    assert_eq!(applications, linears.len() + 1);
    assert_eq!(dense.len(), 3 * applications);
    // The MoE blocks (layer 1 and the MTP block), each with three stacked expert weights.
    assert_eq!(grouped.len(), 2 * 3 * 3);

    // Kept above FP8: the routers in f32, the head in BF16 (its operands cast, not quantized).
    let kept: Vec<&String> = linears
        .iter()
        .filter(|p| precision_floor(p) != Precision::Fp8)
        .collect();
    let kept_applications: usize = kept.iter().map(|p| uses(p)).sum();
    let in_f32: Vec<&String> = kept.iter().copied().filter(|p| is_kept_in_f32(p)).collect();
    assert_eq!(
        in_f32,
        ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    );
    assert_eq!(
        kept,
        [
            "model.layers.1.mlp.gate",
            "model.layers.2.mlp.gate",
            "lm_head"
        ],
        "the routers and the output head"
    );

    let spec = tiny();
    let policy = PrecisionPolicy::uniform(Precision::Fp8);
    let out = apply_precision(&graph, &policy, spec.fp8.as_ref().unwrap()).unwrap();
    out.validate().unwrap();
    assert_eq!(out.outputs.len(), graph.outputs.len());

    let rewritten: Vec<_> = linear_gemms(&out)
        .into_iter()
        .filter(|g| {
            let inputs = &out.node(g.node).inputs;
            // The experts' weight gradient rounds its operands itself, along each expert's rows.
            let rounds_itself = matches!(
                out.node(g.node).op,
                Op::GroupedMatMulWeightGrad {
                    rounding: Some(_),
                    ..
                }
            );
            let quantized = |k: usize| {
                rounds_itself
                    || is_qdq(&out, below_permutes(&out, inputs[k]))
                    || matches!(out.node(inputs[k]).op, Op::Reshape { .. })
                        && is_qdq(&out, out.node(inputs[k]).inputs[0])
            };
            let (a, b) = (quantized(0), quantized(1));
            assert_eq!(a, b, "both operands or neither: {g:?}");
            assert_eq!(a, precision_floor(&g.path) == Precision::Fp8, "{g:?}");
            a
        })
        .collect();
    assert_eq!(
        rewritten.len(),
        3 * (applications - kept_applications) + grouped.len()
    );

    // Nothing else is quantized: attention's matmuls read no QDQ node.
    for id in out.node_ids() {
        let node = out.node(id);
        if matches!(node.op, Op::MatMul { .. }) && !rewritten.iter().any(|g| g.node == id) {
            assert!(
                !node.inputs.iter().any(|&i| is_qdq(&out, i)),
                "{id} ({})",
                node.origin
            );
        }
    }
}

/// Every rewritten GEMM with its role and its operands' tiles: activations and output gradients
/// 1×4 along K, weights 4×4 (rounded as stored, read transposed), the weight gradients' K =
/// tokens as 4×1 (the grouped ones round their own operands, in 4×1 tiles along each expert's
/// token-slots), power-of-two scales for the MoE dispatch and `o_proj`'s input; each weight gradient's activation re-tiled from the forward's FP8 rounding
/// (activations are saved in FP8), and every FP8 GEMM with Hopper's accumulation (13 bits,
/// promoted every 128 products); the output head's GEMMs in BF16 and the routers' in f32.
#[test]
fn fp8_training_graph_snapshot() {
    let graph = train_graph();
    let spec = tiny();
    let policy = PrecisionPolicy {
        accumulation: Accumulation::HOPPER,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let out = apply_precision(&graph, &policy, spec.fp8.as_ref().unwrap()).unwrap();
    let mut text = String::new();
    for gemm in linear_gemms(&out) {
        let node = out.node(gemm.node);
        let role = match gemm.role {
            GemmRole::Forward => "forward",
            GemmRole::InputGradient => "input-grad",
            GemmRole::WeightGradient => "weight-grad",
        };
        writeln!(text, "{role} {} ({})", gemm.path, node.op).unwrap();
        for &input in node.inputs.iter().take(2) {
            writeln!(text, "    {}", operand(&out, input)).unwrap();
        }
    }
    // Attention's products: never FP8, BF16 under this policy.
    for product in activation_products(&out) {
        let node = out.node(product.node);
        writeln!(text, "attention {} ({})", node.origin, node.op).unwrap();
        for &input in &node.inputs {
            writeln!(text, "    {}", operand(&out, input)).unwrap();
        }
    }
    let qdq = out.node_ids().filter(|&id| is_qdq(&out, id)).count();
    writeln!(text, "{qdq} quantize_dequantize nodes").unwrap();
    insta::assert_snapshot!(text);
}

/// Under `policy`, on the tiny training graph lowered with `options`: how many Linear GEMMs
/// the pass puts in `precision` (the policy's, or the higher one its module is kept at), how
/// many lines of the lowered kernel program contain `marker`, and that program's text.
fn rewritten_and_marked(
    policy: &PrecisionPolicy,
    precision: Precision,
    (options, marker): (LowerOptions, &str),
) -> (usize, usize, String) {
    let out = apply_precision(&train_graph(), policy, tiny().fp8.as_ref().unwrap()).unwrap();
    let rewritten = linear_gemms(&out)
        .iter()
        .filter(|g| {
            let wanted = policy.precision_of(&g.path);
            wanted.at_least(precision_floor(&g.path)) == precision
        })
        .count();
    let text = fathom_compiler::lower::lower_with(&out, options)
        .unwrap()
        .to_string();
    let marked = text.lines().filter(|l| l.contains(marker)).count();
    (rewritten, marked, text)
}

/// The kernel IR keeps each FP8 GEMM's accumulation and prints it (`, acc 13b/K`): every GEMM
/// the pass rewrote to FP8 becomes one library call that says so, and no other does.
#[test]
fn the_kernel_ir_shows_each_fp8_gemms_accumulation() {
    let policy = PrecisionPolicy {
        accumulation: Accumulation::HOPPER_WITHOUT_PROMOTION,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let marker = (LowerOptions::default(), ", acc 13b/K");
    let (fp8_gemms, limited, text) = rewritten_and_marked(&policy, Precision::Fp8, marker);
    assert_eq!(limited, fp8_gemms, "{text}");
    assert!(fp8_gemms > 30);
}

/// Under the bf16 policy every GEMM the pass rounds multiplies values that are all bf16, and
/// the kernel IR says so (`, bf16 operands`) on exactly those library calls, so a backend may
/// multiply them in bf16: the Linears' (the output head's among them) and attention's
/// products; the routers stay f32.
#[test]
fn the_kernel_ir_marks_each_bf16_gemms_operands() {
    let policy = PrecisionPolicy::uniform(Precision::Bf16);
    let marker = (LowerOptions::default(), ", bf16 operands");
    let (bf16_gemms, marked, text) = rewritten_and_marked(&policy, Precision::Bf16, marker);
    let out = apply_precision(&train_graph(), &policy, tiny().fp8.as_ref().unwrap()).unwrap();
    // Attention's products, once its ops are written as them.
    let expanded = fathom_compiler::passes::expand_attention(&out, |_, _| false).unwrap();
    let attention = activation_products(&expanded).len();
    assert_eq!(marked, bf16_gemms + attention, "{text}");
    assert!(
        bf16_gemms > 30 && attention >= 6,
        "{bf16_gemms} and {attention}"
    );
    assert!(!text.contains("rounded as read"));
    // The same graph in f32 marks none.
    let f32_program = fathom_compiler::lower::lower(&train_graph()).unwrap();
    assert!(!f32_program.to_string().contains("operands"));
}

/// Lowered for products that round their operands (the CPU's bf16 GEMM), the bf16 policy's
/// training step has no cast to bf16 left: every round trip is folded into the products that
/// read it, each of which says it rounds (`rounded as read`); and the routed experts' weights
/// are read where each parameter lies, as in f32, rather than stacked and rounded into a copy.
#[test]
fn products_that_round_their_operands_leave_no_cast() {
    let policy = PrecisionPolicy::uniform(Precision::Bf16);
    let folding = LowerOptions {
        products_round_operands: true,
        ..LowerOptions::cpu()
    };
    let (_, marked, text) =
        rewritten_and_marked(&policy, Precision::Bf16, (folding, ", bf16 operands"));
    let rounding = text
        .lines()
        .filter(|l| l.contains("operands rounded as read"));
    assert_eq!(rounding.count(), marked, "{text}");
    assert!(marked > 36, "{marked}");
    assert!(!text.contains("cast<bf16>"), "{text}");
    let stacks = |text: &str| text.lines().filter(|l| l.contains("_stack_")).count();
    let f32_program = fathom_compiler::lower::lower_with(&train_graph(), folding).unwrap();
    assert_eq!(stacks(&text), stacks(&f32_program.to_string()), "{text}");
    assert!(
        text.contains("grouped_matmul") && text.contains("parts"),
        "{text}"
    );
    // Compiled (after the graph passes), attention's `[batch, heads, seq, v]` product is
    // written in the output projection's `[batch, seq, heads, v]` order through the folded
    // round trip: no copy between them.
    let out = apply_precision(&train_graph(), &policy, tiny().fp8.as_ref().unwrap()).unwrap();
    let options = fathom_compiler::compile::CompileOptions {
        lower: folding,
        ..Default::default()
    };
    let compiled = fathom_compiler::compile::compile(&out, &options).unwrap();
    let text = compiled.program.to_string();
    assert!(
        text.contains("_matmul_model_layers_0_self_attn_o_proj"),
        "{text}"
    );
    assert!(
        !text.contains("_copy_model_layers_0_self_attn_o_proj"),
        "{text}"
    );
}

/// Under the bf16 policy a weight is rounded as it is stored: no kernel of the lowered training
/// program reads a parameter across its rows (a transposing copy of a weight the forward
/// multiplies by as `x · Wᵀ`), and each Linear weight is rounded once, shared by its forward
/// GEMM and its input-gradient GEMM.
#[test]
fn bf16_weights_are_rounded_once_in_their_stored_order() {
    use fathom_compiler::kernel::{BufferRole, KernelBody};

    let policy = PrecisionPolicy::uniform(Precision::Bf16);
    let out = apply_precision(&train_graph(), &policy, tiny().fp8.as_ref().unwrap()).unwrap();
    let options = fathom_compiler::compile::CompileOptions::default();
    let program = fathom_compiler::compile::compile(&out, &options)
        .unwrap()
        .program;
    let mut rounded = Vec::new();
    for kernel in &program.kernels {
        let KernelBody::Loop(nest) = &kernel.body else {
            continue;
        };
        for stmt in &nest.body {
            stmt.value().for_each_load(&mut |view| {
                let BufferRole::Parameter(name) = &program.buffer(view.buffer).role else {
                    return;
                };
                let inner = *view.strides.last().unwrap();
                assert!(inner <= 1, "{}: reads {name} across ({view})", kernel.name);
                if name.ends_with("proj.weight") && kernel.name.contains("_cast_") {
                    rounded.push(name.clone());
                }
            });
        }
    }
    let mut once = rounded.clone();
    once.sort();
    once.dedup();
    assert_eq!(
        once.len(),
        rounded.len(),
        "rounded more than once: {rounded:?}"
    );
    assert!(rounded.len() > 10, "{rounded:?}");
}

/// The experts' weight gradients round their own operands in FP8 tiles along each expert's
/// token-slots with fine-grained scaling (which rows share a tile depends on the routing), and
/// read operands rounded once over all token-slots with per-tensor scaling (one tile, whatever
/// the routing).
#[test]
fn expert_weight_gradients_round_along_each_experts_rows() {
    let graph = train_graph();
    let spec = tiny();
    let tiling = spec.fp8.as_ref().unwrap();
    let weight_grads = |out: &Graph| -> Vec<NodeId> {
        linear_gemms(out)
            .into_iter()
            .filter(|g| g.grouped && g.role == GemmRole::WeightGradient)
            .map(|g| g.node)
            .collect()
    };
    let fine = apply_precision(&graph, &PrecisionPolicy::uniform(Precision::Fp8), tiling).unwrap();
    assert_eq!(weight_grads(&fine).len(), 6);
    for id in weight_grads(&fine) {
        let node = fine.node(id);
        let Op::GroupedMatMulWeightGrad { rounding, .. } = &node.op else {
            panic!("{id} is a grouped weight gradient");
        };
        let tiles = rounding.expect("rounds its operands");
        assert_eq!((tiles.tile_rows, tiles.pow2_scales), (4, false));
        // The cotangent as the backward computed it; x as saved (the forward's 1×4 rounding).
        assert!(
            !is_qdq(&fine, node.inputs[0]),
            "{}",
            operand(&fine, node.inputs[0])
        );
        assert!(
            is_qdq(&fine, node.inputs[1]),
            "{}",
            operand(&fine, node.inputs[1])
        );
    }
    let per_tensor = PrecisionPolicy {
        scaling: Fp8Scaling::PerTensor,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let coarse = apply_precision(&graph, &per_tensor, tiling).unwrap();
    for id in weight_grads(&coarse) {
        let node = coarse.node(id);
        assert!(matches!(
            node.op,
            Op::GroupedMatMulWeightGrad { rounding: None, .. }
        ));
        for &input in &node.inputs[..2] {
            let text = operand(&coarse, input);
            assert!(text.starts_with("quantize_dequantize"), "{text}");
        }
    }
}

/// A target that runs attention as calls (`LowerOptions::attention_calls`, the CUDA plan's)
/// gets, under a BF16 policy, one forward call per attention that also writes the statistic
/// its gradient reads, and one call for its four gradients, in place of the matmuls and
/// softmaxes, its heads padded to the widths its kernels take (the tiny model's 4 + 2 and 4 to
/// 16 + 16 and 64); the products of every other attention op it does not take (an FP32
/// policy's, or padded head widths past its kernels' limits) are expanded as the CPU's are.
#[test]
fn attention_calls_replace_the_expanded_primitives() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::kernel::{KernelBody, Library};
    use fathom_compiler::lower::AttentionCalls;
    let limits = |max_qk| AttentionCalls {
        products_in: DType::BF16,
        width_multiple: 16,
        v_multiple: 64,
        max_qk,
        max_v: 64,
    };
    assert_eq!(limits(32).padded_widths([4, 2, 4]), Some([16, 16, 64]));
    assert_eq!(limits(192).padded_widths([128, 64, 128]), None);
    assert_eq!(
        limits(192).padded_widths([128, 64, 64]),
        Some([128, 64, 64])
    );
    assert_eq!(limits(192).padded_widths([129, 64, 1]), None);
    assert_eq!(limits(192).padded_widths([128, 0, 64]), None);
    let calls = |max_qk| LowerOptions {
        attention_calls: Some(limits(max_qk)),
        ..LowerOptions::default()
    };
    let bf16 = apply_precision(
        &train_graph(),
        &PrecisionPolicy::uniform(Precision::Bf16),
        tiny().fp8.as_ref().unwrap(),
    )
    .unwrap();
    let count = |graph: &Graph, lower: LowerOptions| {
        let options = CompileOptions {
            lower,
            ..CompileOptions::default()
        };
        let program = compile(graph, &options).unwrap().program;
        let (mut forwards, mut gradients, mut lines) = (0, 0, String::new());
        for kernel in &program.kernels {
            match &kernel.body {
                KernelBody::Library(Library::CausalAttention { out, lse, .. }) => {
                    assert!(out.is_some() && lse.is_some(), "{kernel}");
                    forwards += 1;
                }
                KernelBody::Library(Library::CausalAttentionGrad { grads, .. }) => {
                    assert!(grads.iter().all(Option::is_some), "{}", kernel.name);
                    gradients += 1;
                }
                _ => continue,
            }
            writeln!(lines, "{kernel}").unwrap();
        }
        let softmaxes = program.to_string().matches("_softmax").count();
        (forwards, gradients, softmaxes, lines)
    };
    // Three attention layers (two decoder layers and the MTP module's).
    let (forwards, gradients, softmaxes, lines) = count(&bf16, calls(32));
    assert_eq!((forwards, gradients, softmaxes), (3, 3, 0), "{lines}");
    insta::assert_snapshot!("attention_calls", lines);
    // Padded widths past the target's limits (16 + 16 against 16), or f32 products: the
    // primitives, as on the CPU.
    let (forwards, gradients, ..) = count(&bf16, calls(16));
    assert_eq!((forwards, gradients), (0, 0));
    let (forwards, gradients, ..) = count(&train_graph(), calls(32));
    assert_eq!((forwards, gradients), (0, 0));
}
