//! The library planner without a GPU: batch-axis merging, the arguments of awkward views, every
//! call of the tiny model's training step planned (snapshotted with the instantiated wrappers)
//! and compiled by NVRTC for sm_90a and sm_80, and a refusal that names the call.

#![allow(clippy::unwrap_used)]

use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::dtype::{DType, TensorType};
use fathom_compiler::graph::Accumulation;
use fathom_compiler::kernel::{Buffer, BufferRole, Kernel, Library, View};
use fathom_compiler::model::LossWeights;
use fathom_compiler::training::training_graph;
use fathom_kernels::nvrtc::nvrtc_unless_skipped;

use super::*;
use crate::cuda::library_fp8::Fp8Target;
use crate::cuda::library_samples::library_samples;

fn tiny_training_program() -> Program {
    let spec = fathom_compiler::spec::examples::micro();
    let graph = training_graph(&spec, 1, 3, LossWeights::deepseek_v3())
        .unwrap()
        .graph;
    compile(&graph, &CompileOptions::default()).unwrap().program
}

fn library_call_count(program: &Program) -> usize {
    let calls = program.kernels.iter();
    calls
        .filter(|k| matches!(k.body, KernelBody::Library(_)))
        .count()
}

#[test]
fn contiguous_batch_axes_merge_and_others_stay() {
    // [2, 3] batches of 4×5 matrices, all contiguous: one axis of 6.
    let dense = [60isize, 20, 5, 1];
    let axes = merged_batch_axes(&[2, 3], [&dense[..2], &dense[..2], &dense[..2]]);
    assert_eq!(axes, vec![(6, [20, 20, 20])]);
    // A broadcast operand (stride 0 on both axes) still merges; a transposed batch does not.
    let axes = merged_batch_axes(&[2, 3], [&[60, 20], &[0, 0], &[20, 40]]);
    assert_eq!(axes, vec![(2, [60, 0, 20]), (3, [20, 0, 40])]);
    // Axes of extent 1 disappear whatever their stride.
    let axes = merged_batch_axes(&[1, 3, 1], [&[7, 20, 9], &[7, 20, 9], &[7, 20, 9]]);
    assert_eq!(axes, vec![(3, [20, 20, 20])]);
}

#[test]
fn the_tiny_training_step_plans_every_library_call() {
    let program = tiny_training_program();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    assert_eq!(plan.calls.len(), program.kernels.len());
    assert_eq!(
        plan.calls.iter().flatten().count(),
        library_call_count(&program)
    );
    let kernels = plan.kernels();
    // The training step uses every family: GEMMs (dense, grouped, weight-grad), the index
    // operations and the grouping.
    for family in [
        "gemm_f32_batched",
        "gemm_f32_grouped_m",
        "gemm_f32_grouped_wgrad",
        "index_group_rows",
    ] {
        assert!(
            kernels.iter().any(|k| k.name().starts_with(family)),
            "{family} missing: {}",
            plan.table()
        );
    }
    let wrappers: Vec<String> = kernels
        .iter()
        .map(|k| k.instantiate().unwrap().generated_wrapper().to_owned())
        .collect();
    insta::assert_snapshot!("tiny_training_library_plan", plan.table());
    insta::assert_snapshot!("tiny_training_library_wrappers", wrappers.join("\n"));
}

#[test]
fn the_tiny_training_steps_library_kernels_compile_for_sm90a_and_sm80() {
    let Some(nvrtc) = nvrtc_unless_skipped().unwrap_or_else(|e| {
        panic!("{e}\n(set FATHOM_SKIP_NVRTC=1 to skip the CUDA compile checks explicitly)")
    }) else {
        return;
    };
    let plan = LibraryPlan::of(&tiny_training_program(), Some(Fp8Target::Hopper)).unwrap();
    let mut failures = Vec::new();
    let mut report = String::new();
    for kernel in plan.kernels() {
        let source = kernel.instantiate().unwrap();
        for arch in ["sm_90a", "sm_80"] {
            let started = std::time::Instant::now();
            match nvrtc.compile(&source, Some(arch)) {
                Ok(compiled) if compiled.log.contains("warning") => {
                    failures.push(format!("{} ({arch}): {}", source.name, compiled.log));
                }
                Ok(compiled) => {
                    let r = compiled.resources.unwrap_or_default();
                    report.push_str(&format!(
                        "{:<36} {arch:<7} {:>4} regs {:>6} B smem {:>3} spill {:>5} ms\n",
                        source.name,
                        r.registers,
                        r.static_smem_bytes,
                        r.spill_store_bytes + r.spill_load_bytes,
                        started.elapsed().as_millis()
                    ));
                    if r.spill_store_bytes + r.spill_load_bytes > 0 {
                        failures.push(format!("{} ({arch}) spills", source.name));
                    }
                }
                Err(e) => failures.push(format!("{} ({arch}): {e}", source.name)),
            }
        }
    }
    println!("{report}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Finds the one step of `kernel` in a sample's plan.
fn sample_step(name: &str, kernel: &str) -> LibraryStep {
    let samples = library_samples().unwrap();
    let sample = samples.iter().find(|s| s.name == name).unwrap();
    let plan = LibraryPlan::of(&sample.program, Some(Fp8Target::Hopper)).unwrap();
    let steps: Vec<&LibraryStep> = plan
        .calls
        .iter()
        .flatten()
        .flat_map(|c| &c.steps)
        .filter(|s| s.kernel.name().starts_with(kernel))
        .collect();
    assert_eq!(steps.len(), 1, "{}", plan.table());
    steps[0].clone()
}

#[test]
fn awkward_views_become_strides_and_grids() {
    // Arguments: a, b, out, m, n, k, d0, d1, d2, then per operand 3 batch strides, row, col.
    let strides = |step: &LibraryStep, operand: usize| step.args[9 + 5 * operand..][..5].to_vec();
    let odd = sample_step("matmul_odd_sides", "gemm_f32_batched");
    assert_eq!(odd.grid, [2, 2, 1]);
    assert_eq!(odd.args[3..9], [67, 70, 45, 1, 1, 1].map(StepArg::I32));
    // Aᵀ read in place: rows of the view step by 1, columns by 67.
    let transposed = sample_step("matmul_transposed_a", "gemm_f32_batched");
    assert_eq!(
        strides(&transposed, 0)[3..],
        [StepArg::I64(1), StepArg::I64(67)]
    );
    // B broadcast over the [3, 5] batch (merged into one axis of 15): batch stride 0.
    let broadcast = sample_step("matmul_broadcast_batch", "gemm_f32_batched");
    assert_eq!(broadcast.grid, [1, 1, 15]);
    assert_eq!(broadcast.args[6..9], [1, 1, 15].map(StepArg::I32));
    assert_eq!(strides(&broadcast, 1)[2], StepArg::I64(0));
    assert_eq!(strides(&broadcast, 0)[2], StepArg::I64(33 * 20));
    // Kᵀ of [2, 4, 9, 16]: rows step by 1, columns by 16.
    let qk = sample_step("matmul_batched_q_kt", "gemm_f32_batched");
    assert_eq!(strides(&qk, 1)[3..], [StepArg::I64(1), StepArg::I64(16)]);
    // 14 token-slots over 5 experts: ceil(14 / 64) + 5 block rows.
    let grouped = sample_step("grouped_matmul_shared_x", "gemm_f32_grouped_m");
    assert_eq!(grouped.grid, [1, 6, 1]);
    let wgrad = sample_step("grouped_matmul_weight_grad", "gemm_f32_grouped_wgrad");
    assert_eq!(wgrad.grid, [1, 1, 6]);
}

#[test]
fn every_sample_plans_its_call() {
    for sample in library_samples().unwrap() {
        let plan = LibraryPlan::of(&sample.program, Some(Fp8Target::Hopper)).unwrap();
        assert_eq!(
            plan.calls.iter().flatten().count(),
            library_call_count(&sample.program),
            "{}",
            sample.name
        );
        // Every call launches, but a rounding whose readers quantise its source instead.
        assert!(
            (plan.calls.iter().flatten()).all(|c| !c.steps.is_empty() || c.skipped.is_some()),
            "{}",
            sample.name
        );
    }
}

/// One batched matmul of 2×2×2×2 1×1 matrices, A's batch strides as given.
fn one_matmul_program(a_strides: [isize; 4], accumulation: Accumulation) -> Program {
    let ty = TensorType::new(DType::F32, vec![2, 2, 2, 2, 1, 1]);
    let buffer = |role| Buffer {
        ty: ty.clone(),
        role,
    };
    let view = |buffer, strides: [isize; 4]| View {
        buffer: BufferId(buffer),
        offset: 0,
        strides: [&strides[..], &[1, 1]].concat(),
    };
    let call = Library::MatMul {
        batch: vec![2, 2, 2, 2],
        m: 1,
        n: 1,
        k: 1,
        a: view(0, a_strides),
        b: view(1, [8, 4, 2, 1]),
        out: view(2, [8, 4, 2, 1]),
        accumulation,
        exact_in: None,
        rounds: false,
        triangular: None,
    };
    Program {
        name: "four_batch_axes".to_owned(),
        buffers: vec![
            buffer(BufferRole::Input("a".to_owned())),
            buffer(BufferRole::Input("b".to_owned())),
            buffer(BufferRole::Temporary),
        ],
        kernels: vec![Kernel {
            name: "k0_matmul".to_owned(),
            nodes: Vec::new(),
            origin: String::new(),
            body: KernelBody::Library(call),
        }],
        outputs: vec![("y".to_owned(), BufferId(2))],
    }
}

#[test]
fn a_call_that_cannot_be_planned_is_refused_by_name() {
    // A walks its batch axes in the opposite order: no axes merge, and the f32 GEMM takes three.
    let program = one_matmul_program([1, 2, 4, 8], Accumulation::Exact);
    let error = LibraryPlan::of(&program, Some(Fp8Target::Hopper))
        .unwrap_err()
        .to_string();
    assert!(error.contains("k0_matmul: 4 batch axes"), "{error}");
    assert!(error.contains("takes 3"), "{error}");
}

/// Hopper's accumulation is the FP8 tensor cores': a product of f32 operands with it runs as the
/// f32 GEMM (summing more exactly), and the plan says why; the CPU's other emulation (no
/// promotion) has no GPU counterpart and is refused.
#[test]
fn only_hoppers_own_accumulation_runs_on_the_gpu() {
    let program = one_matmul_program([8, 4, 2, 1], Accumulation::HOPPER);
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let note = plan.calls[0].as_ref().unwrap().note.clone().unwrap();
    assert!(note.contains("not rounded to E4M3"), "{note}");
    assert!(plan.table().contains(&note));
    let program = one_matmul_program([8, 4, 2, 1], Accumulation::HOPPER_WITHOUT_PROMOTION);
    let error = LibraryPlan::of(&program, Some(Fp8Target::Hopper))
        .unwrap_err()
        .to_string();
    assert!(error.contains("k0_matmul"), "{error}");
    assert!(
        error.contains("accumulation 13b/K is emulated on the CPU only"),
        "{error}"
    );
}

/// A product that rounds its operands as it reads them (the CPU's folded round trips) has no
/// CUDA plan; the error says how to lower for CUDA.
#[test]
fn a_product_that_rounds_its_operands_is_refused_on_the_gpu() {
    let mut program = one_matmul_program([8, 4, 2, 1], Accumulation::Exact);
    if let KernelBody::Library(Library::MatMul {
        exact_in, rounds, ..
    }) = &mut program.kernels[0].body
    {
        (*exact_in, *rounds) = (Some(DType::BF16), true);
    }
    let error = LibraryPlan::of(&program, Some(Fp8Target::Hopper))
        .unwrap_err()
        .to_string();
    assert!(error.contains("k0_matmul"), "{error}");
    assert!(error.contains("products_round_operands"), "{error}");
}

/// Why the CUDA plan refuses the micro model's training program lowered with `lower`.
fn refusal(lower: fathom_compiler::lower::LowerOptions) -> String {
    let spec = fathom_compiler::spec::examples::micro();
    let graph = training_graph(&spec, 1, 3, LossWeights::deepseek_v3())
        .unwrap()
        .graph;
    let options = CompileOptions {
        lower,
        ..CompileOptions::default()
    };
    refusal_of(&graph, &options)
}

/// Why the CUDA plan refuses `graph` compiled with `options`.
fn refusal_of(graph: &fathom_compiler::graph::Graph, options: &CompileOptions) -> String {
    let program = compile(graph, options).unwrap().program;
    LibraryPlan::of(&program, Some(Fp8Target::Hopper))
        .unwrap_err()
        .to_string()
}

/// The CPU's cross-entropy routines are library calls the CUDA plan has no template for: the
/// plan names the option to lower without.
#[test]
fn the_cpus_cross_entropy_routines_are_refused_on_the_gpu() {
    let error = refusal(fathom_compiler::lower::LowerOptions {
        cross_entropy_keeps_exponentials: true,
        cross_entropy_routines: true,
        ..Default::default()
    });
    assert!(error.contains("cross_entropy"), "{error}");
    assert!(error.contains("cross_entropy_routines"), "{error}");
}

/// So are its softmax routines.
#[test]
fn the_cpus_softmax_routines_are_refused_on_the_gpu() {
    let error = refusal(fathom_compiler::lower::LowerOptions {
        softmax_routines: true,
        ..Default::default()
    });
    assert!(error.contains("softmax"), "{error}");
    assert!(error.contains("softmax_routines"), "{error}");
}

/// And its head routine (recognised in a bf16 step that keeps its activations and outputs no
/// logits).
#[test]
fn the_cpus_head_routine_is_refused_on_the_gpu() {
    use fathom_compiler::passes::RecomputePolicy;
    use fathom_compiler::precision::{Precision, PrecisionPolicy, apply_precision};

    let spec = fathom_compiler::spec::examples::micro();
    let train = training_graph(&spec, 1, 3, LossWeights::deepseek_v3()).unwrap();
    let policy = PrecisionPolicy::uniform(Precision::Bf16);
    let tiling = fathom_compiler::spec::Fp8Spec::default();
    let graph = apply_precision(&train.without_logits().graph, &policy, &tiling).unwrap();
    let options = CompileOptions {
        lower: fathom_compiler::lower::LowerOptions {
            cross_entropy_keeps_exponentials: true,
            products_round_operands: true,
            cross_entropy_routines: true,
            linear_cross_entropy_routines: true,
            ..Default::default()
        },
        recompute: RecomputePolicy::None,
        ..CompileOptions::default()
    };
    let error = refusal_of(&graph, &options);
    assert!(error.contains("linear_cross_entropy_routines"), "{error}");
}

/// And its SwiGLU routine.
#[test]
fn the_cpus_swiglu_routine_is_refused_on_the_gpu() {
    let error = refusal(fathom_compiler::lower::LowerOptions {
        swiglu_routines: true,
        ..Default::default()
    });
    assert!(error.contains("swiglu"), "{error}");
    assert!(error.contains("swiglu_routines"), "{error}");
}

#[test]
fn comparison_accepts_rounding_within_the_dot_bound_only() {
    use crate::cuda::library_samples::{Tolerance, compare_outputs};
    let cpu = [1.0f32, -2.0, 0.0, f32::NAN];
    // k = 8, Σ|a·b| = 4: bound 2·8·2⁻²⁴·4 ≈ 3.8e-6.
    let magnitude = [4.0f32; 4];
    let dot = Tolerance::Dot { k: 8 };
    let close = [1.000_002_4f32, -2.0, -0.0, f32::NAN];
    let result = compare_outputs(&close, &cpu, &magnitude, dot);
    assert_eq!(result.mismatch, None);
    assert!(
        result.worst_ratio > 0.5 && result.worst_ratio <= 1.0,
        "{result:?}"
    );
    let far = [1.0f32, -2.000_01, 0.0, f32::NAN];
    assert_eq!(
        compare_outputs(&far, &cpu, &magnitude, dot)
            .mismatch
            .map(|m| m.0),
        Some(1)
    );
    // Similarity: DeepGEMM's difference over the whole output.
    use crate::cuda::library_samples::deepgemm_difference;
    let similar = Tolerance::Similarity { max: 1e-3 };
    let near = [1.001f32, -2.0, 0.0, 3.0];
    let reference = [1.0f32, -2.0, 0.0, 3.0];
    assert!(deepgemm_difference(&near, &reference) < 1e-6);
    assert_eq!(
        compare_outputs(&near, &reference, &[], similar).mismatch,
        None
    );
    let swapped = [-2.0f32, 1.0, 0.0, 3.0];
    let result = compare_outputs(&swapped, &reference, &[], similar);
    // The element shown is one of those farthest apart.
    assert!(matches!(result.mismatch, Some((0 | 1, ..))), "{result:?}");
    assert!(result.worst_ratio > 100.0);
    // Exact: one ulp is a mismatch, NaN against a number too.
    let ulp = [f32::from_bits(1.0f32.to_bits() + 1), -2.0, 0.0, f32::NAN];
    assert!(
        compare_outputs(&ulp, &cpu, &magnitude, Tolerance::Exact)
            .mismatch
            .is_some()
    );
    let nan = [1.0f32, -2.0, f32::NAN, f32::NAN];
    assert_eq!(
        compare_outputs(&nan, &cpu, &magnitude, Tolerance::Exact)
            .mismatch
            .map(|m| m.0),
        Some(2)
    );
}

/// A step whose arguments do not match its kernel's parameters (their count, or an `int`
/// where the kernel reads a `long long`, which a launch would pass short) is named before
/// anything launches.
#[test]
fn a_step_with_arguments_its_kernel_does_not_take_is_refused() {
    use fathom_kernels::{ConvertKind, ConvertParams};
    let zero = ConvertParams::new(ConvertKind::ZeroF32);
    let step = |args: Vec<StepArg>| LibraryStep {
        kernel: LibraryKernel::Convert(zero),
        grid: [1, 1, 1],
        args,
    };
    let plan = |step: LibraryStep| LibraryPlan {
        calls: vec![Some(LibraryCall {
            name: "k0_fill".into(),
            steps: vec![step],
            ..LibraryCall::default()
        })],
        ..LibraryPlan::default()
    };
    let y = StepArg::Buffer(BufferId(0), 0);
    assert_eq!(
        plan(step(vec![y, StepArg::I64(8)])).check_arguments(),
        Ok(())
    );
    assert_eq!(
        plan(step(vec![y, StepArg::I32(8)])).check_arguments(),
        Err("k0_fill (fill_zero_f32): parameter `n` (I64) given I32(8)".into())
    );
    assert_eq!(
        plan(step(vec![StepArg::I64(8), y])).check_arguments(),
        Err("k0_fill (fill_zero_f32): parameter `y` (MutPtr(F32)) given I64(8)".into())
    );
    assert_eq!(
        plan(step(vec![y])).check_arguments(),
        Err("k0_fill (fill_zero_f32): 1 arguments for 2 parameters".into())
    );
}

/// `LibraryKernel::kernel_params`, which checks a plan's arguments without writing sources, is
/// what each instantiated source declares, for every kernel the training plans launch: f32
/// (GEMMs, index operations), FP8 on Hopper and portable, BF16 attention on the templates.
#[test]
fn each_kernels_parameters_are_what_its_source_declares() {
    use crate::cuda::library_fp8::tests::small_fp8_training_program;
    use fathom_compiler::precision::{Precision, PrecisionPolicy, apply_precision};
    let spec = fathom_compiler::spec::examples::micro();
    let graph = training_graph(&spec, 1, 3, LossWeights::deepseek_v3())
        .unwrap()
        .graph;
    let bf16 = PrecisionPolicy::uniform(Precision::Bf16);
    let tiling = spec.fp8.clone().unwrap_or_default();
    let bf16_graph = apply_precision(&graph, &bf16, &tiling).unwrap();
    let cuda = CompileOptions {
        lower: crate::cuda::lower_options(),
        ..CompileOptions::default()
    };
    let bf16_program = compile(&bf16_graph, &cuda).unwrap().program;
    let fp8_program = small_fp8_training_program();
    let plans = [
        LibraryPlan::of(&tiny_training_program(), None).unwrap(),
        LibraryPlan::of(&bf16_program, None).unwrap(),
        LibraryPlan::of(&fp8_program, Some(Fp8Target::Hopper)).unwrap(),
        LibraryPlan::of(&fp8_program, Some(Fp8Target::Portable)).unwrap(),
    ];
    let mut kernels: Vec<LibraryKernel> = Vec::new();
    for kernel in plans.iter().flat_map(LibraryPlan::kernels) {
        if !kernels.contains(&kernel) {
            kernels.push(kernel);
        }
    }
    let attention = kernels
        .iter()
        .filter(|k| k.name().starts_with("mla_attention"))
        .count();
    assert_eq!(attention, 3, "forward, backward's delta and backward");
    for kernel in kernels {
        let source = kernel.instantiate().unwrap();
        assert_eq!(kernel.kernel_params(), source.params, "{}", kernel.name());
    }
}
