//! The printed forward graph of a tiny DeepSeek-V3, pinned so that every change to what the
//! model library emits is reviewed.

use fathom_compiler::model::{DeepSeekV3, ForwardOptions, ParameterSummary, forward_graph};
use fathom_compiler::module::{Module, Scope};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::{GraphBuilder, GraphError};

/// The workspace's smallest full-featured spec (`fathom_compiler::spec::examples::micro`).
fn tiny() -> ModelSpec {
    fathom_compiler::spec::examples::micro()
}

/// The tiny model's training program (batch 2, sequence 4, the DeepSeek-V3 losses) lowered
/// with `lower`.
fn tiny_training_program(
    lower: fathom_compiler::lower::LowerOptions,
) -> fathom_compiler::kernel::Program {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::training::training_graph;

    let train = training_graph(&tiny(), 2, 4, LossWeights::deepseek_v3())
        .expect("the tiny model's training graph builds");
    let options = CompileOptions {
        lower,
        ..CompileOptions::default()
    };
    compile(&train.graph, &options)
        .expect("the tiny training graph compiles")
        .program
}

/// Each of `calls` (kernels of `with`, a program lowered with a routine option) stands at the
/// same place of `without` (lowered without it) as a loop nest over the same graph nodes.
fn assert_were_loops<'a>(
    with: &fathom_compiler::kernel::Program,
    without: &fathom_compiler::kernel::Program,
    calls: impl IntoIterator<Item = &'a fathom_compiler::kernel::Kernel>,
) {
    use fathom_compiler::kernel::KernelBody;

    assert_eq!(with.kernels.len(), without.kernels.len());
    for kernel in calls {
        let index = with.kernels.iter().position(|k| k == kernel);
        let index = index.expect("a call is a kernel of its program");
        let same = &without.kernels[index];
        assert!(matches!(same.body, KernelBody::Loop(_)), "{}", same.name);
        assert_eq!(same.nodes, kernel.nodes, "{}", same.name);
    }
}

#[test]
fn tiny_forward_graph_with_mtp() {
    let options = ForwardOptions {
        batch: 1,
        seq: 3,
        with_mtp: true,
    };
    let graph = forward_graph(&tiny(), options).unwrap();
    graph.validate().unwrap();
    insta::assert_snapshot!(graph.to_string());
}

#[test]
fn parameters_follow_the_hugging_face_layout() {
    let mut g = GraphBuilder::new("t");
    let model: DeepSeekV3 = DeepSeekV3::declare(&mut Scope::root(&mut g), &tiny()).unwrap();
    let names: Vec<String> = model.parameters().into_iter().map(|p| p.name).collect();
    insta::assert_snapshot!(names.join("\n"));
    let graph = g.finish();
    let summary = ParameterSummary::of(&tiny(), &graph);
    assert_eq!(
        summary.buffers,
        2 * 4,
        "one balancing bias per MoE block (main + MTP)"
    );
    assert_eq!(
        summary.total(),
        graph.parameter_count(),
        "every trainable parameter is main or MTP"
    );
}

#[test]
fn impossible_requests_are_errors() {
    let long = ForwardOptions {
        batch: 1,
        seq: 17,
        with_mtp: false,
    };
    let error = forward_graph(&tiny(), long).unwrap_err();
    assert_eq!(
        error.to_string(),
        "sequence length 17 exceeds the model's max_positions (16)"
    );
    let short = ForwardOptions {
        batch: 1,
        seq: 1,
        with_mtp: true,
    };
    assert!(matches!(
        forward_graph(&tiny(), short),
        Err(GraphError::InvalidRequest(_))
    ));
    let mut bad = tiny();
    bad.moe.as_mut().unwrap().groups = 3;
    let error = forward_graph(&bad, long).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid model spec: `moe.groups`: 3 groups do not divide 4 routed experts"
    );
}

#[test]
fn tiny_forward_program() {
    let options = ForwardOptions {
        batch: 1,
        seq: 3,
        with_mtp: false,
    };
    let graph = forward_graph(&tiny(), options).unwrap();
    let program = fathom_compiler::lower::lower(&graph).unwrap();
    insta::assert_snapshot!(program.to_string());
}

/// What `fathom inspect` writes for the tiny model's forward pass, pinned: the fusion groups
/// (which graph nodes each kernel computes and where they came from) and the memory plan.
#[test]
fn tiny_inspection_artifacts() {
    use fathom_compiler::compile::{CompileOptions, compile};
    let options = ForwardOptions {
        batch: 1,
        seq: 3,
        with_mtp: false,
    };
    let graph = forward_graph(&tiny(), options).unwrap();
    let compiled = compile(&graph, &CompileOptions::default()).unwrap();
    let names: Vec<String> = compiled.artifacts().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "00-input.graph.txt",
            "01-expand_attention.graph.txt",
            "02-dead_code.graph.txt",
            "03-common_subexpressions.graph.txt",
            "04-fold_constants.graph.txt",
            "05-recompute.graph.txt",
            "10-fusion-groups.txt",
            "11-kernels.txt",
            "12-memory-plan.txt",
            "13-timings.txt",
            "14-traffic.txt"
        ]
    );
    insta::assert_snapshot!("tiny_fusion_groups", compiled.fusion_groups());
    insta::assert_snapshot!("tiny_memory_plan", compiled.plan.to_string());
    // Sharing storage never costs more than not sharing.
    assert!(compiled.plan.peak_bytes() <= compiled.plan.unshared_bytes);
}

/// The recompute pass on the tiny model's training step: the values DeepSeek-V3's policy
/// recomputes (each RMSNorm, the MLA up-projections and the per-head views and RoPE after
/// them) as they appear in the graph after the pass, next to the backward nodes that read
/// them, and the memory plan's peak with and without it.
#[test]
fn tiny_training_recompute() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::passes::RecomputePolicy;
    use fathom_compiler::training::training_graph;

    let train = training_graph(&tiny(), 2, 4, LossWeights::deepseek_v3()).unwrap();
    let compiled = |recompute| {
        let options = CompileOptions {
            recompute,
            ..CompileOptions::default()
        };
        compile(&train.graph, &options).unwrap()
    };
    let (before, after) = (
        compiled(RecomputePolicy::None),
        compiled(RecomputePolicy::DeepSeekV3),
    );
    let graph = &after.graphs.last().unwrap().1;
    graph.validate().unwrap();
    let text = graph.to_string();
    // The blocks of recomputed nodes, each followed by the first line of the block after it
    // (the backward node they were placed for).
    let mut blocks = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with("// recompute:") {
            continue;
        }
        blocks += line;
        blocks += "\n";
        while let Some(next) = lines.next_if(|l| !l.trim_start().starts_with("//")) {
            blocks += next;
            blocks += "\n";
        }
        if let Some(header) = lines.peek() {
            blocks += &format!("  (before) {}\n", header.trim());
        }
    }
    let (peak_before, peak_after) = (before.plan.peak_bytes(), after.plan.peak_bytes());
    let summary = format!(
        "nodes: {} -> {}\npeak bytes: {peak_before} -> {peak_after}\n\n{blocks}",
        before.graphs.last().unwrap().1.nodes.len(),
        graph.nodes.len(),
    );
    insta::assert_snapshot!(summary);
    assert!(peak_after < peak_before, "{peak_before} -> {peak_after}");
    // The policy `none` lowers the graph constant folding left.
    assert_eq!(before.graphs[4].0, "fold_constants");
    assert_eq!(before.graphs[4].1, before.graphs[5].1);
}

/// The experts' input gradient multiplies by the stacked expert weights transposed: the grouped
/// GEMM reads them where they lie (each expert's block across, strides `[n·k, 1, n]`) and no
/// kernel copies them transposed first; the forward reads them as stored (`[n·k, k, 1]`).
#[test]
fn grouped_gemms_read_the_stacked_weights_where_they_lie() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::kernel::{ExpertWeights, KernelBody, Library};
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::training::training_graph;

    let train = training_graph(&tiny(), 2, 4, LossWeights::deepseek_v3()).unwrap();
    let program = compile(&train.graph, &CompileOptions::default())
        .unwrap()
        .program;
    let mut layouts = Vec::new();
    for kernel in &program.kernels {
        if let KernelBody::Library(Library::GroupedMatMul { weights, out, .. }) = &kernel.body {
            let ExpertWeights::Stacked(weights) = weights else {
                panic!(
                    "{}: weights in parts without the CPU's lowering options",
                    kernel.name
                )
            };
            let stacked = program.buffer(weights.buffer).ty.dims().to_vec();
            let n = *program.buffer(*out).ty.dims().last().unwrap();
            let (rows, cols) = (stacked[1] as isize, stacked[2] as isize);
            assert_eq!(weights.offset, 0, "{}", kernel.name);
            // As stored: W[e][j][p] at e·n·k + j·k + p; across: the buffer holds [k, n] blocks.
            let layout = match weights.strides[..] {
                [b, c, 1] if b == rows * cols && c == cols => "as stored",
                [b, 1, c] if b == rows * cols && c == cols && cols == n as isize => "across",
                _ => "?",
            };
            layouts.push((kernel.name.contains("backward"), layout));
            // The buffer read across is the one the forward reads as stored: no copy between.
            let producer = program
                .kernels
                .iter()
                .find(|k| k.reads_and_writes().1.contains(&weights.buffer))
                .map(|k| k.name.clone())
                .unwrap_or_default();
            assert!(
                !producer.contains("copy"),
                "{}: weights copied by {producer}",
                kernel.name
            );
        }
    }
    // Three grouped GEMMs per MoE layer forward (gate, up, down) and three input gradients.
    let forward = layouts
        .iter()
        .filter(|l| **l == (false, "as stored"))
        .count();
    let backward = layouts.iter().filter(|l| **l == (true, "across")).count();
    assert!(forward > 0 && forward == backward, "{layouts:?}");
    assert_eq!(forward + backward, layouts.len(), "{layouts:?}");
}

/// In the CUDA plan's form the experts' weights are fed into their stacks in place and their
/// gradients are windows of the stacked gradient; but an expert's gradient some node of the
/// graph also reads is no window (a kernel reads it, so it needs memory of its own): that
/// matrix's experts' gradients are copied out of the stacked gradient as before, the other
/// matrices' are windows.
#[test]
fn a_gradient_another_node_reads_is_no_window() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::graph::ReduceOp;
    use fathom_compiler::kernel::BufferRole;
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::training::training_graph;

    let read = "grad.model.layers.1.mlp.experts.0.gate_proj.weight";
    let train = training_graph(&tiny(), 2, 4, LossWeights::deepseek_v3()).unwrap();
    let node = train.graph.output(read).unwrap();
    let mut g = GraphBuilder::from_graph(train.graph);
    let sum = g
        .reduce(ReduceOp::Sum, fathom_compiler::Tensor(node), 1, false)
        .unwrap();
    g.output("probe", sum).unwrap();
    let program = compile(&g.finish(), &CompileOptions::default())
        .unwrap()
        .program;
    let role = |name: &str| &program.buffer(program.output(name).unwrap()).role;
    assert_eq!(role(read), &BufferRole::Temporary);
    let sibling = role("grad.model.layers.1.mlp.experts.1.gate_proj.weight");
    assert_eq!(sibling, &BufferRole::Temporary);
    let other = role("grad.model.layers.1.mlp.experts.1.up_proj.weight");
    assert!(matches!(other, BufferRole::Window { .. }), "{other:?}");
    let stacked = (program.buffers.iter())
        .filter(|b| matches!(b.role, BufferRole::StackedParameters(_)))
        .count();
    assert_eq!(
        stacked, 6,
        "the MoE layer's and the MTP module's three matrices"
    );
}

/// With the CPU's lowering options the experts' weights are never stacked: every grouped GEMM
/// reads expert e's matrix from parameter `experts.{e}.<projection>.weight` itself, as stored
/// forward (strides `[k, 1]`) and across for the input gradient (`[1, n]`), in expert order;
/// every weight gradient writes expert e's straight into the output
/// `grad.….experts.{e}.<projection>.weight`; no kernel stacks them or copies slices out.
#[test]
fn on_the_cpu_grouped_gemms_read_each_experts_weights_where_they_lie() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::kernel::{BufferRole, ExpertOutputs, ExpertWeights, KernelBody, Library};
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::training::training_graph;

    let train = training_graph(&tiny(), 2, 4, LossWeights::deepseek_v3()).unwrap();
    let options = CompileOptions::default().for_cpu();
    let program = compile(&train.graph, &options).unwrap().program;
    let experts = tiny().moe.unwrap().routed_experts;
    let mut calls = (0, 0);
    let mut gradients = 0;
    for kernel in &program.kernels {
        let name = &kernel.name;
        let assembles = name.contains("_stack_") || name.contains("_copy_backward_");
        assert!(!(assembles && name.contains("experts")), "{name}");
        if let KernelBody::Library(Library::GroupedMatMulWeightGrad { out, .. }) = &kernel.body {
            let ExpertOutputs::Parts(parts) = out else {
                panic!("{name}: stacked weight gradient")
            };
            let mut projection = None;
            for (e, part) in parts.iter().enumerate() {
                let (output, _) = program.outputs.iter().find(|(_, b)| b == part).unwrap();
                let (_, after) = output.split_once(&format!(".experts.{e}.")).unwrap();
                assert!(output.starts_with("grad."), "{name}: {output}");
                assert!(projection.is_none_or(|p| p == after), "{name}: {output}");
                projection = Some(after.to_owned());
            }
            assert_eq!(parts.len(), experts, "{name}");
            gradients += 1;
        }
        let KernelBody::Library(Library::GroupedMatMul {
            weights, out, x, ..
        }) = &kernel.body
        else {
            continue;
        };
        let ExpertWeights::Parts(parts) = weights else {
            panic!("{}: stacked weights", kernel.name)
        };
        assert_eq!(parts.len(), experts, "{}", kernel.name);
        let (n, k) = (
            *program.buffer(*out).ty.dims().last().unwrap() as isize,
            *program.buffer(*x).ty.dims().last().unwrap() as isize,
        );
        let mut projection = None;
        for (e, part) in parts.iter().enumerate() {
            let BufferRole::Parameter(name) = &program.buffer(part.buffer).role else {
                panic!("{}: part {e} is no parameter", kernel.name)
            };
            let (_, after) = name.split_once(&format!(".experts.{e}.")).unwrap();
            assert!(
                projection.is_none_or(|p| p == after),
                "{}: {name}",
                kernel.name
            );
            projection = Some(after.to_owned());
            assert_eq!(part.offset, 0);
            if kernel.name.contains("backward") {
                assert_eq!(part.strides, [1, n], "{}: {name}", kernel.name);
                calls.1 += 1;
            } else {
                assert_eq!(part.strides, [k, 1], "{}: {name}", kernel.name);
                calls.0 += 1;
            }
        }
    }
    assert!(calls.0 > 0 && calls.0 == calls.1, "{calls:?}");
    // A weight gradient per forward GEMM (calls count parts, one per expert).
    assert_eq!(gradients * experts, calls.0);
}

/// With the CPU's lowering options each loss's forward kernel (the next-token loss and the MTP
/// loss) stores its rows' exponentials and sums (f32, the logits' size) and its gradient kernel
/// reads them: one store, no exponential, no reduction, no logits. The forms every backend
/// runs recompute the exponential in the gradient and store nothing vocabulary-wide.
#[test]
fn on_the_cpu_the_losss_gradient_reads_the_forwards_exponentials() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::kernel::{KernelBody, Stmt};
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::training::training_graph;

    let train = training_graph(&tiny(), 2, 4, LossWeights::deepseek_v3()).unwrap();
    let vocab = tiny().vocab_size;
    for cpu in [true, false] {
        let options = if cpu {
            CompileOptions::default().for_cpu()
        } else {
            CompileOptions::default()
        };
        let program = compile(&train.graph, &options).unwrap().program;
        let vocabulary_wide = |b: &_| program.buffer(*b).ty.dims().last() == Some(&vocab);
        let mut kept = Vec::new();
        let forwards = program
            .kernels
            .iter()
            .filter(|k| k.name.contains("_cross_entropy_loss"));
        for forward in forwards {
            let (reads, writes) = forward.reads_and_writes();
            let wide: Vec<_> = writes.iter().filter(|b| vocabulary_wide(b)).collect();
            if cpu {
                assert_eq!(writes.len(), 3, "exponentials, loss, sums: {forward}");
                assert_eq!(wide.len(), 1, "{forward}");
                assert_eq!(
                    program.buffer(*wide[0]).ty.dtype,
                    fathom_compiler::DType::F32
                );
                // The exponentials, then the loss and the sums, each stored per row.
                // The logits: read vocabulary-wide, unlike the vocabulary's index (one row).
                let logits = reads
                    .iter()
                    .find(|b| vocabulary_wide(b) && program.buffer(**b).ty.dims().len() > 1);
                kept.push((*logits.unwrap(), vec![*wide[0], writes[2]]));
            } else {
                assert!(wide.is_empty(), "{forward}");
            }
        }
        let gradients: Vec<_> = program
            .kernels
            .iter()
            .filter(|k| k.name.contains("_cross_entropy_grad_"))
            .collect();
        assert_eq!(gradients.len(), 2, "the next-token and MTP losses");
        for gradient in gradients {
            let KernelBody::Loop(nest) = &gradient.body else {
                panic!("{}: not a loop nest", gradient.name)
            };
            let (reads, _) = gradient.reads_and_writes();
            let text = gradient.to_string();
            if cpu {
                assert!(matches!(nest.body[..], [Stmt::Store { .. }]), "{text}");
                assert!(!text.contains("exp("), "{text}");
                let i = kept
                    .iter()
                    .position(|(_, stored)| stored.iter().all(|b| reads.contains(b)));
                let (logits, _) = kept.remove(i.unwrap_or_else(|| panic!("{text}")));
                assert!(!reads.contains(&logits), "reads the logits: {text}");
            } else {
                assert!(
                    matches!(nest.body[..], [Stmt::Reduce { .. }, Stmt::Store { .. }]),
                    "{text}"
                );
                assert!(text.contains("exp("), "{text}");
            }
        }
        assert!(kept.is_empty(), "{kept:?}");
    }
}

/// Under `cross_entropy_routines` (the CPU's choice where it has AVX-512) each loss and its
/// gradient are library calls: the forward keeps its exponentials and sums in buffers of its
/// own, and the gradient reads exactly those, with the labels and the loss's cotangent.
#[test]
fn as_routines_each_loss_keeps_what_its_gradient_reads() {
    use fathom_compiler::kernel::{KernelBody, Library};
    use fathom_compiler::lower::LowerOptions;

    let program = tiny_training_program(LowerOptions {
        cross_entropy_routines: true,
        ..LowerOptions::cpu()
    });
    let calls: Vec<_> = program
        .kernels
        .iter()
        .filter_map(|k| match &k.body {
            KernelBody::Library(call @ Library::CrossEntropy { .. })
            | KernelBody::Library(call @ Library::CrossEntropyGrad { .. }) => {
                Some((k.to_string(), call))
            }
            _ => None,
        })
        .collect();
    let kept: Vec<_> = calls
        .iter()
        .filter_map(|(text, call)| match call {
            Library::CrossEntropy { kept, labels, .. } => {
                assert!(text.contains("keeping exponentials"), "{text}");
                Some((kept.expect("a gradient reads it"), *labels))
            }
            _ => None,
        })
        .collect();
    assert_eq!(kept.len(), 2, "the next-token and MTP losses");
    let mut read = Vec::new();
    for (text, call) in &calls {
        if let Library::CrossEntropyGrad {
            kept: k, labels, ..
        } = call
        {
            assert!(kept.contains(&(*k, *labels)), "{text}");
            read.push(*k);
        }
    }
    assert_eq!(read.len(), 2, "{calls:?}");
    assert_ne!(read[0], read[1]);
    // The calls as the kernel IR prints them (reviewed with every change).
    let printed: Vec<&str> = calls.iter().map(|(text, _)| text.as_str()).collect();
    insta::assert_snapshot!(printed.join(""));
    // No loop nest of the losses is left.
    assert!(
        program
            .kernels
            .iter()
            .all(|k| !k.name.contains("_cross_entropy") || matches!(k.body, KernelBody::Library(_)))
    );
}

/// Under `softmax_routines` every attention softmax and its gradient are library calls: each
/// gradient reads the exponentials, sums and softmax one forward call wrote, with the same
/// mask and scale, and no loop nest with an exponential is left in attention. A nest the
/// pattern does not fit stays a loop: lowered without the option, the same nests are loops.
#[test]
fn as_routines_each_softmax_gradient_reads_what_its_forward_wrote() {
    use fathom_compiler::kernel::{KernelBody, Library};
    use fathom_compiler::lower::LowerOptions;

    let compiled = |softmax_routines| {
        tiny_training_program(LowerOptions {
            softmax_routines,
            ..LowerOptions::cpu()
        })
    };
    let program = compiled(true);
    let (mut forwards, mut gradients) = (Vec::new(), Vec::new());
    for kernel in &program.kernels {
        match &kernel.body {
            KernelBody::Library(Library::Softmax {
                scores,
                exponentials,
                sums,
                out,
                ..
            }) => forwards.push((scores.clone(), exponentials, sums.clone(), out, kernel)),
            KernelBody::Library(Library::SoftmaxGrad {
                probabilities,
                sums,
                exponentials,
                mask,
                scale,
                ..
            }) => gradients.push((probabilities, sums, exponentials, mask, scale, kernel)),
            KernelBody::Loop(_) if kernel.origin.contains("self_attn") => {
                let text = kernel.to_string();
                assert!(!text.contains("exp("), "{text}");
            }
            _ => {}
        }
    }
    let layers = tiny().layers + tiny().mtp_depth;
    assert_eq!(forwards.len(), layers, "one softmax per attention");
    assert_eq!(gradients.len(), layers, "and one gradient of each");
    for (p, s, e, mask, scale, kernel) in &gradients {
        let forward = forwards
            .iter()
            .find(|(_, exponentials, ..)| exponentials.buffer == e.buffer)
            .unwrap_or_else(|| panic!("no softmax wrote what {} reads", kernel.name));
        let (scores, _, sums, out, _) = forward;
        assert_eq!(out.buffer, p.buffer, "{}", kernel.name);
        assert_eq!(
            sums.as_ref().map(|v| v.buffer),
            Some(s.buffer),
            "{}",
            kernel.name
        );
        assert_eq!(scores.scale, **scale, "{}", kernel.name);
        let forward_mask = scores.mask.as_ref().map(|m| m.mask.buffer);
        assert_eq!(
            forward_mask,
            mask.as_ref().map(|m| m.buffer),
            "{}",
            kernel.name
        );
        assert!(scores.mask.is_some(), "attention is causal");
    }
    // The calls as the kernel IR prints them (reviewed with every change).
    let printed: String = forwards
        .iter()
        .map(|(.., kernel)| kernel.to_string())
        .chain(gradients.iter().map(|(.., kernel)| kernel.to_string()))
        .collect();
    insta::assert_snapshot!(printed);
    // Without the option the same kernels are the loops fusion made.
    let calls = forwards
        .iter()
        .map(|f| f.4)
        .chain(gradients.iter().map(|g| g.5));
    assert_were_loops(&program, &compiled(false), calls);
}

/// Under `swiglu_routines` every SwiGLU gating (the dense MLP's, the experts' and the shared
/// experts') is a library call keeping the sigmoid and the silu its gradient reads; lowered
/// without the option, the same kernels are the loops fusion made.
#[test]
fn as_routines_each_swiglu_gating_is_one_call() {
    use fathom_compiler::kernel::{KernelBody, Library};
    use fathom_compiler::lower::LowerOptions;

    let compiled = |swiglu_routines| {
        tiny_training_program(LowerOptions {
            swiglu_routines,
            ..LowerOptions::cpu()
        })
    };
    let (program, loops) = (compiled(true), compiled(false));
    let calls: Vec<_> = program
        .kernels
        .iter()
        .filter(|k| matches!(k.body, KernelBody::Library(Library::Swiglu { .. })))
        .collect();
    let gating_loops = loops
        .kernels
        .iter()
        .filter(|k| k.name.contains("_sigmoid_mul_"))
        .count();
    assert!(!calls.is_empty());
    assert_eq!(calls.len(), gating_loops, "every gating loop is a call");
    assert_were_loops(&program, &loops, calls.iter().copied());
    assert!(
        !program
            .kernels
            .iter()
            .any(|k| k.name.contains("_sigmoid_mul_"))
    );
    // The calls as the kernel IR prints them (reviewed with every change).
    let printed: String = calls.iter().map(|k| k.to_string()).collect();
    insta::assert_snapshot!(printed);
}

/// Under `linear_cross_entropy_routines` (the CPU's choice where its bf16 GEMM runs) the bf16
/// training step's heads (the logits' matmul, the loss, its gradient and the gradient's two
/// matmuls) are each one call at the loss's place, and no cross-entropy is left on its own
/// (the MTP loss's cotangent, computed in backward, moves before its call); the calls printed.
/// f32 heads, and heads under recomputation, stay five kernels.
#[test]
fn as_routines_each_bf16_head_is_one_call() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::kernel::{KernelBody, Library};
    use fathom_compiler::lower::LowerOptions;
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::passes::RecomputePolicy;
    use fathom_compiler::precision::{Precision, PrecisionPolicy, apply_precision};
    use fathom_compiler::spec::Fp8Spec;
    use fathom_compiler::training::training_graph;

    let train = training_graph(&tiny(), 2, 4, LossWeights::deepseek_v3())
        .expect("the tiny model's training graph builds")
        .without_logits();
    let policy = PrecisionPolicy::uniform(Precision::Bf16);
    let bf16 = apply_precision(&train.graph, &policy, &Fp8Spec::default()).unwrap();
    let lower = LowerOptions {
        products_round_operands: true,
        cross_entropy_routines: true,
        linear_cross_entropy_routines: true,
        ..LowerOptions::cpu()
    };
    // The heads as calls, and the cross-entropies left on their own.
    let compiled = |graph, recompute| {
        let options = CompileOptions {
            lower,
            recompute,
            ..CompileOptions::default()
        };
        let program = compile(graph, &options).unwrap().program;
        let (heads, alone): (Vec<_>, Vec<_>) = program
            .kernels
            .into_iter()
            .filter(|k| {
                matches!(
                    k.body,
                    KernelBody::Library(
                        Library::LinearCrossEntropy { .. }
                            | Library::CrossEntropy { .. }
                            | Library::CrossEntropyGrad { .. }
                    )
                )
            })
            .partition(|k| {
                matches!(
                    k.body,
                    KernelBody::Library(Library::LinearCrossEntropy { .. })
                )
            });
        (heads, alone.len())
    };
    // Not with f32 products, nor where the backward product reads a recomputed copy of the
    // head's input (the pass cannot tell it holds the same values).
    assert_eq!(compiled(&train.graph, RecomputePolicy::None).0.len(), 0);
    assert_eq!(compiled(&bf16, RecomputePolicy::DeepSeekV3).0.len(), 0);
    let (heads, alone) = compiled(&bf16, RecomputePolicy::None);
    assert_eq!((heads.len(), alone), (2, 0), "the next-token and MTP heads");
    let printed: Vec<String> = heads.iter().map(|k| k.to_string()).collect();
    insta::assert_snapshot!(printed.join(""));
}
