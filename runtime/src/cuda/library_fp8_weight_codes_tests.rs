//! The weights' FP8 codes made once before the calls (`library_fp8_weight_codes`), on the CPU
//! emulator of the FP8 plans.

use fathom_compiler::graph::{BinaryOp, Op, Output};
use fathom_compiler::kernel::{BufferRole, Expr, Stmt, View};

use super::*;
use crate::cuda::library_fp8_weight_codes::{WeightLaunch, WeightQuantization};

/// One training step's library calls run in order on one byte scratch, the weight codes made
/// once before them, as the executor runs a micro-batch after uploading new weights: every FP8
/// product gives the product of its rounded operands. So no call's own scratch, nor a kept
/// activation, overwrites a weight's codes, and each reader finds its weight's codes in the
/// layout it reads.
#[test]
fn a_whole_step_reads_the_weight_codes_made_once_before_it() {
    let program = small_fp8_training_program();
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        // The program's calls, less those hoisted to run with the codes.
        let calls = || {
            let positions = program.kernels.iter().zip(&plan.calls).enumerate();
            let in_program = positions.filter(|(p, _)| !plan.weight_codes.is_hoisted(*p));
            in_program.filter_map(|(_, (kernel, call))| match (call, &kernel.body) {
                (Some(call), KernelBody::Library(library)) => Some((kernel, call, library)),
                _ => None,
            })
        };
        let zeros = (program.buffers.iter())
            .map(|b| vec![0f32; b.ty.numel()])
            .collect();
        let mut memory = Memory::new(zeros, plan.scratch_ints(), plan.scratch_bytes());
        // The weights as their readers read them (each buffer's values are its own).
        for (_, _, library) in calls().filter(|(_, call, _)| !call.weight_codes.is_empty()) {
            for (buffer, values) in operand_values(&program, library) {
                memory.buffers[buffer.index()] = values;
            }
        }
        for step in plan.weight_codes.steps() {
            memory.run(step);
        }
        let (mut products, mut readers) = (0, 0);
        for (kernel, call, library) in calls() {
            if !call.runs_fp8_gemm() {
                for step in &call.steps {
                    if emulated(step) {
                        memory.run(step);
                    } else {
                        let bytes = (step.args.iter())
                            .any(|a| matches!(a, StepArg::Bytes(_) | StepArg::TensorMap(..)));
                        assert!(!bytes, "{} uses the byte scratch", step.kernel.name());
                    }
                }
                continue;
            }
            // The kernels between wrote their outputs over this call's operands: as made, and
            // the codes kept of them made again (`library_fp8_saved`).
            for (buffer, values) in operand_values(&program, library) {
                memory.buffers[buffer.index()] = values;
            }
            for read in &call.reads_codes {
                for step in plan.calls[read.from].iter().flat_map(|c| &c.steps) {
                    memory.run(step);
                }
            }
            for step in &call.steps {
                memory.run(step);
            }
            let buffers = operands_of(&program, library);
            assert_product(&program, (kernel, call), &buffers, &memory, &plan);
            products += 1;
            readers += usize::from(!call.weight_codes.is_empty());
        }
        let read: usize = (plan.weight_codes.quantizations.iter())
            .map(|q| q.readers.len())
            .sum();
        assert_eq!(readers, read, "{target:?}: every reader is a product");
        assert!(
            products >= 20 && readers >= 40,
            "{target:?}: {products} products, {readers} reading weight codes"
        );
    }
}

/// No call quantises a weight: each weight is quantised once per layout, before the calls,
/// into its own region past every call's scratch; and the recomputed forward reads the
/// forward's codes.
#[test]
fn each_weight_is_quantised_once_per_layout() {
    let program = small_fp8_training_program();
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let is_weight = |b: BufferId| program.buffer(b).role.is_fed_weight();
        // Or computed from the weights by the kernels hoisted with the codes.
        let codes = &plan.weight_codes;
        let from_weights = |b: BufferId| {
            let mut writers = (program.kernels.iter().enumerate())
                .filter(|(_, k)| k.reads_and_writes().1.contains(&b))
                .map(|(position, _)| position)
                .peekable();
            writers.peek().is_some() && writers.all(|p| codes.is_hoisted(p))
        };
        for call in plan.calls.iter().flatten() {
            for step in &call.steps {
                let quantizes_a_weight = matches!(step.kernel, LibraryKernel::Quantize(_))
                    && matches!(step.named_args()["x"], StepArg::Buffer(b, _) if is_weight(b));
                assert!(!quantizes_a_weight, "{} quantises a weight", call.name);
            }
        }
        let launch = |q: &WeightQuantization| (q.step.kernel, q.step.args[0], q.step.grid);
        for (index, quantization) in codes.quantizations.iter().enumerate() {
            let source = quantization.source;
            assert!(is_weight(source) || from_weights(source), "{source}");
            let again =
                (codes.quantizations[..index].iter()).any(|q| launch(q) == launch(quantization));
            assert!(!again, "{} quantised twice alike", quantization.source);
            for &reader in &quantization.readers {
                let call = plan.calls[reader].as_ref().unwrap();
                assert!(call.weight_codes.contains(&quantization.source));
            }
            // Codes, then scales, inside the region.
            let named = quantization.step.named_args();
            let (StepArg::Bytes(q), StepArg::Bytes(scales)) = (named["q"], named["scales"]) else {
                panic!("{:?}", quantization.step)
            };
            assert!(codes.base <= q && q < scales && scales < codes.base + codes.bytes);
        }
        let shared_by_recompute = (codes.quantizations.iter())
            .filter(|q| q.readers.len() > 1)
            .count();
        assert!(
            shared_by_recompute >= 4,
            "{target:?}\n{}",
            plan.weight_codes_table()
        );
        assert_eq!(plan.scratch_bytes(), codes.base + codes.bytes);
    }
}

/// A weight some kernel writes is quantised by its calls, where they read it: codes made
/// before the program would miss the write.
#[test]
fn a_weight_a_kernel_writes_is_quantised_where_read() {
    let mut program = small_fp8_training_program();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let weight = plan.weight_codes.quantizations[0].source;
    let reader = plan.weight_codes.quantizations[0].readers[0];
    // A loop nest before its first reader now stores into the weight.
    store_into(&mut program, 0..reader, weight);
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    assert!(
        (plan.weight_codes.quantizations.iter()).all(|q| q.source != weight),
        "{}",
        plan.weight_codes_table()
    );
    let call = plan.calls[reader].as_ref().unwrap();
    assert!(!call.weight_codes.contains(&weight));
    let quantizes_weight = call.steps.iter().any(|step| {
        matches!(step.kernel, LibraryKernel::Quantize(_))
            && matches!(step.named_args()["x"], StepArg::Buffer(b, _) if b == weight)
    });
    assert!(quantizes_weight, "{} quantises {weight} itself", call.name);
}

/// The experts' weights are fed inside their stacks' buffers (`BufferRole::StackedParameters`)
/// where nothing else reads them; an expert's weight that is also read elsewhere (here, a
/// program output) is its own buffer, and the experts' matrices are stacked by a loop nest
/// each and rounded before their grouped products: those kernels compute from the weights
/// alone, so they run with the codes (hoisted) and the grouped products, forward and backward,
/// read the stack's codes. A stack some other kernel also reads, or a program output, stays in
/// the program, quantised by its readers.
#[test]
fn the_experts_stacking_runs_with_the_weight_codes() {
    let fed = small_fp8_training_program();
    let fed_stacks = (fed.buffers.iter())
        .filter(|b| matches!(b.role, BufferRole::StackedParameters(_)))
        .count();
    // Two MoE layers' three expert matrices.
    assert_eq!(fed_stacks, 6);
    assert!(!fed.kernels.iter().any(|k| k.name.contains("_stack_")));

    let program = with_a_probed_expert_weight();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let codes = &plan.weight_codes;
    let stacks: Vec<usize> = (program.kernels.iter().enumerate())
        .filter(|(_, k)| k.name.contains("_stack_"))
        .map(|(position, _)| position)
        .collect();
    // One loop nest per expert, for the probed matrix's stack alone.
    assert!(stacks.len() >= 4, "{stacks:?}");
    for &position in &stacks {
        assert!(codes.is_hoisted(position), "{}", plan.weight_codes_table());
    }
    let grouped = (plan.calls.iter().flatten()).filter(|c| c.name.contains("_grouped_matmul_"));
    let (mut forward, mut backward) = (0, 0);
    for call in grouped {
        // The codes of a buffer the hoisted kernels write (not a fed weight's).
        let reads_codes = |b: &BufferId| {
            let mut writers = (program.kernels.iter().enumerate())
                .filter(|(_, k)| k.reads_and_writes().1.contains(b))
                .map(|(p, _)| p)
                .peekable();
            writers.peek().is_some() && writers.all(|p| codes.is_hoisted(p))
        };
        if call.weight_codes.iter().any(reads_codes) {
            *if call.name.contains("backward") {
                &mut backward
            } else {
                &mut forward
            } += 1;
        }
    }
    // The stacked matrix, read forward and (transposed) backward.
    assert_eq!((forward, backward), (1, 1), "{}", plan.weight_codes_table());
    // The launches run each hoisted kernel before the quantisations that read what it wrote.
    let launches = codes.launches();
    for q in &codes.quantizations {
        let at = |l: &WeightLaunch| *l == WeightLaunch::Quantization(q);
        let quantized = launches.iter().position(at).unwrap();
        for (position, kernel) in program.kernels.iter().enumerate() {
            if kernel.reads_and_writes().1.contains(&q.source) {
                let ran = launches
                    .iter()
                    .position(|l| *l == WeightLaunch::Kernel(position));
                assert!(
                    ran.is_some_and(|ran| ran < quantized),
                    "k{position} for {}",
                    q.source
                );
            }
        }
    }

    // The first stack, also read by a loop nest of the program past it.
    let stack = program.kernels[stacks[0]].reads_and_writes().1[0];
    let mut read_elsewhere = program.clone();
    let reader = (stacks[0]..program.kernels.len())
        .find(|&k| matches!(program.kernels[k].body, KernelBody::Loop(_)) && !codes.is_hoisted(k))
        .unwrap();
    let KernelBody::Loop(nest) = &mut read_elsewhere.kernels[reader].body else {
        unreachable!()
    };
    let Some(Stmt::Store { view, value }) =
        (nest.body.iter_mut()).find(|s| matches!(s, Stmt::Store { .. }))
    else {
        panic!("k{reader} stores nothing")
    };
    let load = View {
        buffer: stack,
        offset: 0,
        strides: vec![0; view.strides.len()],
    };
    *value = Expr::Binary(
        BinaryOp::Add,
        Box::new(value.clone()),
        Box::new(Expr::Load(load)),
    );
    // The same stack, an output of the program.
    let mut output = program.clone();
    output.outputs.push(("stack".into(), stack));
    for changed in [read_elsewhere, output] {
        let plan = LibraryPlan::of(&changed, Some(Fp8Target::Hopper)).unwrap();
        let codes = &plan.weight_codes;
        assert!(!codes.is_hoisted(stacks[0]), "{}", codes.hoisted.len());
        assert!(codes.quantizations.iter().all(|q| q.source != stack));
        assert!(stacks.iter().all(|&k| !codes.is_hoisted(k)));
    }
}

/// The codes are made from the trained weights (each quantisation's fed source, and the
/// weights a hoisted kernel reads) and from nothing else: not the balancing biases, which a
/// trainer keeping the optimizer on the device uploads every step without remaking the codes,
/// nor the inputs.
#[test]
fn the_codes_are_made_from_the_trained_weights_alone() {
    for program in [small_fp8_training_program(), with_a_probed_expert_weight()] {
        let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
        let codes = &plan.weight_codes;
        let mut made_from = Vec::new();
        for (index, buffer) in program.buffers.iter().enumerate() {
            let id = BufferId(index as u32);
            if codes.made_from(&program, id) {
                made_from.push(id);
                match &buffer.role {
                    BufferRole::Parameter(name) => {
                        assert!(!name.ends_with("e_score_correction_bias"), "{name}");
                    }
                    BufferRole::StackedParameters(_) => {}
                    // What the hoisted kernels compute from the weights.
                    BufferRole::Temporary => {}
                    role => panic!("codes made from {id} ({role:?})"),
                }
            }
        }
        for q in &codes.quantizations {
            assert!(made_from.contains(&q.source), "{}", q.source);
        }
        let fed = |id: &BufferId| program.buffer(*id).role.is_fed_weight();
        assert!(
            made_from.iter().filter(|id| fed(id)).count() >= 10,
            "{made_from:?}"
        );
    }
}

/// The small FP8 training step with an expert's weight also a program output: its stack is
/// then built by kernels (hoisted with the weight codes) instead of fed in place.
fn with_a_probed_expert_weight() -> Program {
    let mut graph = small_fp8_training_graph();
    let probed = "model.layers.1.mlp.experts.0.up_proj.weight";
    let weight = (graph.node_ids())
        .find(|&id| matches!(&graph.node(id).op, Op::Parameter { name, .. } if name == probed))
        .unwrap();
    graph.outputs.push(Output {
        name: "probe".into(),
        node: weight,
    });
    compile(&graph, &CompileOptions::default()).unwrap().program
}
