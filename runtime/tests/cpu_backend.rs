//! The compiled CPU path (lowering to kernels, the CPU backend) against the reference
//! interpreter, on whole models forward and backward.
//!
//! Tolerances: the interpreter sums in f64, the backend's GEMMs in f32 with blocked orders, so
//! results differ by rounding: for logits 1e-5 of max|logit| measured, bound 1e-4; gradients
//! chain more roundings, bound 1e-3 of each tensor's max|grad|. A wrong kernel is off by O(1).

#![allow(clippy::unwrap_used)]

mod common;

use common::FixtureStep;

use std::collections::HashMap;

use fathom_compiler::kernel::{
    BufferId, BufferRole, ExpertOutputs, ExpertWeights, Kernel, KernelBody, Library, Program,
};
use fathom_compiler::lower::{LowerOptions, lower, lower_with};
use fathom_compiler::model::LossWeights;
use fathom_runtime::HostTensor;
use fathom_runtime::cpu::{CpuOutputs, CpuProgram};
use fathom_runtime::interp::{Feeds, Outputs, evaluate};

fn relative(got: &[f32], want: &[f32]) -> f64 {
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    if max_ref == 0.0 {
        max_diff
    } else {
        max_diff / max_ref
    }
}

#[test]
fn training_graphs_run_compiled_like_the_interpreter() {
    for name in ["moe_grouped", "yarn_ramp", "shared2_dense2", "no_q_lora"] {
        let FixtureStep {
            model,
            train,
            inputs,
        } = FixtureStep::load(name, LossWeights::deepseek_v3());
        let feeds = Feeds::new(&inputs, &model.weights);
        let expected = evaluate(&train.graph, &feeds).unwrap();
        // The forms every backend runs; the experts' weights read where each lies and their
        // gradients written where each is wanted, never stacked (the same products of the same
        // values: bit for bit the same results); and all the CPU's own forms (the loss's
        // gradient from the forward's exponentials: within the bounds of the interpreter), with
        // the loss and its gradient as loops or as the CPU's routines (library calls), and the
        // softmaxes, their gradients and SwiGLU's gating as loops or routines (bit for bit the
        // same results).
        let in_place = LowerOptions {
            grouped_weights_in_place: true,
            ..LowerOptions::default()
        };
        let softmax_routines = LowerOptions {
            softmax_routines: true,
            swiglu_routines: true,
            ..LowerOptions::cpu()
        };
        let routines = LowerOptions {
            cross_entropy_routines: true,
            softmax_routines: true,
            swiglu_routines: true,
            ..LowerOptions::cpu()
        };
        let (mut first, mut cpu_forms): (Option<CpuOutputs>, Option<CpuOutputs>) = (None, None);
        for options in [
            LowerOptions::default(),
            in_place,
            LowerOptions::cpu(),
            softmax_routines,
            routines,
        ] {
            let program = lower_with(&train.graph, options).unwrap();
            // Every cross-entropy kernel, forward and backward, is a call or a loop nest.
            let cross_entropies = |k: &Kernel| k.name.contains("_cross_entropy");
            let as_calls = options.cross_entropy_routines;
            all_calls_or_all_loops(&program, cross_entropies, as_calls, 2, name);
            let softmax_calls = |forward: bool| {
                program
                    .kernels
                    .iter()
                    .filter(|k| match &k.body {
                        KernelBody::Library(Library::Softmax { .. }) => forward,
                        KernelBody::Library(Library::SoftmaxGrad { .. }) => !forward,
                        _ => false,
                    })
                    .count()
            };
            let (softmaxes, gradients) = (softmax_calls(true), softmax_calls(false));
            if options.softmax_routines {
                // One per attention layer and one per gradient of one.
                assert!(
                    softmaxes >= 1 && gradients == softmaxes,
                    "{name}: {softmaxes} softmax calls, {gradients} gradients"
                );
            } else {
                assert_eq!((softmaxes, gradients), (0, 0), "{name}");
            }
            // One SwiGLU gating per MLP and expert group, all calls or all loops.
            let gatings = |k: &Kernel| {
                matches!(k.body, KernelBody::Library(Library::Swiglu { .. }))
                    || k.name.contains("_sigmoid_mul_")
            };
            all_calls_or_all_loops(&program, gatings, options.swiglu_routines, 1, name);
            let stacked_weights = program.kernels.iter().filter(|k| {
                matches!(
                    &k.body,
                    KernelBody::Library(
                        Library::GroupedMatMul {
                            weights: ExpertWeights::Stacked(_),
                            ..
                        } | Library::GroupedMatMulWeightGrad {
                            out: ExpertOutputs::Stacked(_),
                            ..
                        }
                    )
                ) || (k.name.contains("_stack_") || k.name.contains("_copy_backward_"))
                    && k.name.contains("experts")
            });
            if options.grouped_weights_in_place {
                assert_eq!(stacked_weights.count(), 0, "{name}: stacked weights");
            }
            experts_never_copied(&program, options, name);
            let compiled = CpuProgram::new(program).run(&feeds).unwrap();
            let worst = worst_error(name, &expected, &compiled, F32_BOUNDS);
            eprintln!(
                "{name} {options:?}: worst relative error {:.2e} ({})",
                worst.0, worst.1
            );
            let same_bits_as = |reference: &CpuOutputs| {
                for (output, got) in compiled.iter() {
                    assert_eq!(
                        Some(got),
                        reference.get(output),
                        "{name} {options:?}: {output}"
                    );
                }
            };
            match (&first, &cpu_forms) {
                (None, _) => first = Some(compiled),
                (Some(stacked), _) if options == in_place => same_bits_as(stacked),
                (Some(_), None) if options == LowerOptions::cpu() => cpu_forms = Some(compiled),
                (Some(_), Some(loops)) if options == softmax_routines => same_bits_as(loops),
                _ => {}
            }
        }
    }
}

/// No kernel of `program` copies the experts' weights into a stack or their gradients out of
/// one: in the CPU's form the grouped calls read and write each expert's matrix where it lies
/// (the weights, when read through an FP8 rounding, fed inside their stack's buffer); in the
/// CUDA plan's form every expert's weight is fed inside its stack's buffer and every expert's
/// gradient is a window of the stacked gradient (`name`: the fixture).
fn experts_never_copied(program: &Program, options: LowerOptions, name: &str) {
    let copies: Vec<&str> = (program.kernels.iter())
        .map(|k| k.name.as_str())
        .filter(|k| {
            (k.contains("_stack_") || k.contains("_copy_backward_")) && k.contains("_mlp_experts")
        })
        .collect();
    assert_eq!(
        copies,
        Vec::<&str>::new(),
        "{name} {options:?}: experts copied"
    );
    if options.grouped_weights_in_place {
        return;
    }
    // A window is read where it lies, by no kernel.
    for kernel in &program.kernels {
        let (reads, writes) = kernel.reads_and_writes();
        for b in reads.iter().chain(&writes) {
            let role = &program.buffer(*b).role;
            assert!(
                !matches!(role, BufferRole::Window { .. }),
                "{}: {b}",
                kernel.name
            );
        }
    }
    let routed = |n: &str| n.contains(".mlp.experts.");
    let mut stacked = Vec::new();
    for buffer in &program.buffers {
        match &buffer.role {
            BufferRole::Parameter(p) => assert!(!routed(p), "{name}: {p} fed alone"),
            BufferRole::StackedParameters(names) => stacked.extend(names.iter().cloned()),
            _ => {}
        }
    }
    let gradients: Vec<&(String, BufferId)> = (program.outputs.iter())
        .filter(|(o, _)| routed(o))
        .collect();
    assert_eq!(
        gradients.len(),
        stacked.len(),
        "{name}: every stacked weight's gradient"
    );
    for (output, buffer) in gradients {
        let role = &program.buffer(*buffer).role;
        assert!(
            matches!(role, BufferRole::Window { .. }),
            "{name}: {output} is {role:?}"
        );
        let weight = output.strip_prefix("grad.").expect("a gradient");
        assert!(
            stacked.iter().any(|s| s == weight),
            "{name}: {weight} not stacked"
        );
    }
}

/// The kernels of `program` that `picked` selects are library calls when `as_calls`, loop
/// nests otherwise, all of them, and there are at least `at_least` (`name`: the fixture).
fn all_calls_or_all_loops(
    program: &Program,
    picked: impl Fn(&Kernel) -> bool,
    as_calls: bool,
    at_least: usize,
    name: &str,
) {
    let (calls, loops): (Vec<_>, Vec<_>) = program
        .kernels
        .iter()
        .filter(|k| picked(k))
        .partition(|k| matches!(k.body, KernelBody::Library(_)));
    let (calls, loops) = (calls.len(), loops.len());
    let (wanted, unwanted) = if as_calls {
        (calls, loops)
    } else {
        (loops, calls)
    };
    assert!(
        wanted >= at_least && unwanted == 0,
        "{name}: {calls} calls, {loops} loops"
    );
}

/// Relative error bounds of a comparison with the interpreter: of each value output, and of each
/// gradient (`grad.…`), against the output's largest element.
#[derive(Clone, Copy)]
struct Bounds {
    values: f64,
    gradients: f64,
}

/// The module's bounds for f32 graphs.
const F32_BOUNDS: Bounds = Bounds {
    values: 1e-4,
    gradients: 1e-3,
};

/// The largest relative error of `compiled`'s outputs against the interpreter's, and where;
/// panics past `bounds`, and where an output that is not f32 differs at all.
fn worst_error(
    name: &str,
    expected: &Outputs,
    compiled: &CpuOutputs,
    bounds: Bounds,
) -> (f64, String) {
    let mut worst = (0f64, String::new());
    for (output, want) in expected.iter() {
        let got = compiled
            .get(output)
            .unwrap_or_else(|| panic!("{name}: no {output}"));
        assert_eq!(got.ty, want.ty, "{name}: {output}");
        let error = match (got.as_f32(), want.as_f32()) {
            (Some(g), Some(w)) => relative(g, w),
            _ => {
                assert_eq!(got, want, "{name}: {output}");
                0.0
            }
        };
        let bound = if output.starts_with("grad.") {
            bounds.gradients
        } else {
            bounds.values
        };
        assert!(
            error < bound,
            "{name}: {output}: relative error {error:.3e}"
        );
        if error > worst.0 {
            worst = (error, output.to_owned());
        }
    }
    worst
}

/// Outputs move out of a run without a copy, and a caller may hand their storage back
/// (`recycle`) for the next run. With the next-token loss alone, `loss` and `loss.next_token`
/// name the same buffer, so the move must leave the earlier name a copy. A second run on
/// recycled storage gives bit-identical results.
#[test]
fn outputs_sharing_a_buffer_and_recycled_storage() {
    let FixtureStep {
        model,
        train,
        inputs,
    } = FixtureStep::load("moe_grouped", LossWeights::next_token_only());
    let feeds = Feeds::new(&inputs, &model.weights);
    let expected = evaluate(&train.graph, &feeds).unwrap();
    let program = CpuProgram::new(lower(&train.graph).unwrap());
    let first: Vec<(String, HostTensor)> = program.run(&feeds).unwrap().into_iter().collect();
    let kept = first.clone();
    for (_, tensor) in first {
        if let fathom_runtime::tensor::Data::Float(values) = tensor.data {
            program.recycle(values);
        }
    }
    let second = program.run(&feeds).unwrap();
    for (name, got) in &kept {
        assert_eq!(
            Some(got),
            second.get(name),
            "{name} differs on recycled storage"
        );
        let want = expected.get(name).unwrap();
        let error = relative(got.as_f32().unwrap(), want.as_f32().unwrap());
        assert!(error < 1e-3, "{name}: relative error {error:.3e}");
    }
    assert_eq!(kept.len(), expected.iter().count());
    assert_eq!(second.get("loss"), second.get("loss.next_token"));
}

/// `QuantizeDequantize` lowered to the CPU library call is the FP8 quantizer exactly, also on a
/// transposed operand (which the lowering copies to a dense buffer first).
#[test]
fn quantize_dequantize_runs_compiled_exactly() {
    use fathom_compiler::graph::QuantFormat;
    use fathom_compiler::{DType, GraphBuilder, TensorType};
    use fathom_runtime::fp8::{ScaleRounding, quantize_tiles};

    let (rows, cols) = (6, 10);
    let values: Vec<f32> = (0..2 * rows * cols)
        .map(|i| ((i * 7919) % 997) as f32 / 97.0 - 5.0)
        .map(|v| if v > 4.5 { v * 100.0 } else { v })
        .collect();
    let cases = [((1, 4), false), ((4, 4), true), ((4, 1), false)];
    let mut g = GraphBuilder::new("qdq");
    let x = g
        .input("x", TensorType::new(DType::F32, [2, rows, cols]))
        .unwrap();
    let xt = g.transpose(x).unwrap();
    for (i, (tile, pow2)) in cases.iter().enumerate() {
        let q = g
            .quantize_dequantize(x, QuantFormat::E4M3, *tile, *pow2)
            .unwrap();
        g.output(&format!("q{i}"), q).unwrap();
        let qt = g
            .quantize_dequantize(xt, QuantFormat::E4M3, *tile, *pow2)
            .unwrap();
        g.output(&format!("qt{i}"), qt).unwrap();
    }
    let program = lower(&g.finish()).unwrap();
    let inputs = HashMap::from([("x", HostTensor::f32([2, rows, cols], values.clone()))]);
    let outputs = CpuProgram::new(program)
        .run(&Feeds::new(&inputs, &()))
        .unwrap();

    let transposed: Vec<f32> = (0..2)
        .flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| (m, r, c))))
        .map(|(m, r, c)| values[(m * rows + r) * cols + c])
        .collect();
    for (i, (tile, pow2)) in cases.iter().enumerate() {
        let rounding = if *pow2 {
            ScaleRounding::PowerOfTwo
        } else {
            ScaleRounding::Exact
        };
        let expect = |x: &[f32], r: usize, c: usize| -> Vec<f32> {
            x.chunks(r * c)
                .flat_map(|m| {
                    quantize_tiles(m, r, c, tile.0, tile.1, rounding)
                        .unwrap()
                        .dequantize()
                })
                .collect()
        };
        let got = outputs.get(&format!("q{i}")).unwrap().as_f32().unwrap();
        assert_eq!(got, expect(&values, rows, cols).as_slice(), "{tile:?}");
        let got = outputs.get(&format!("qt{i}")).unwrap().as_f32().unwrap();
        assert_eq!(
            got,
            expect(&transposed, cols, rows).as_slice(),
            "transposed {tile:?}"
        );
    }
}

/// Training with every eligible GEMM in FP8 (fine-grained tiles of 8, so a hidden-32 row has
/// four) still learns the synthetic task on the compiled CPU path.
#[test]
fn fp8_training_learns_the_synthetic_task() {
    use fathom_compiler::model::parameter_graph;
    use fathom_compiler::precision::{Precision, PrecisionPolicy};
    use fathom_compiler::spec::{Fp8Spec, ModelSpec};
    use fathom_runtime::data::{SyntheticBatches, SyntheticKind, SyntheticTask};
    use fathom_runtime::exec::Backend;
    use fathom_runtime::init::init_parameters;
    use fathom_runtime::optim::{AdamWConfig, LrSchedule};
    use fathom_runtime::train::{TrainSettings, Trainer};
    use fathom_runtime::weights::Weights;

    let spec = ModelSpec {
        fp8: Some(Fp8Spec {
            activation_tile: 8,
            weight_block: 8,
        }),
        ..fathom_compiler::spec::examples::small()
    };
    let steps = 40;
    let settings = TrainSettings {
        batch: 8,
        seq: 16,
        micro_batches: 1,
        steps,
        optimizer: AdamWConfig::default(),
        schedule: LrSchedule {
            peak_lr: 1e-2,
            warmup_steps: 5,
            hold_steps: 1000,
            decay_steps: 0,
            final_lr: 1e-2,
        },
        clip_norm: Some(1.0),
        losses: LossWeights::deepseek_v3(),
        bias_update_speed: 0.001,
        backend: Backend::Cpu,
        precision: PrecisionPolicy::uniform(Precision::Fp8),
        pipeline: Default::default(),
    };
    let weights = Weights::from(init_parameters(&parameter_graph(&spec).unwrap(), 0.1, 5));
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 11).unwrap();
    let data = SyntheticBatches::new(task, 8, 16).unwrap();
    let mut trainer = Trainer::new(spec, settings, weights, Box::new(data)).unwrap();
    let losses: Vec<f64> = (0..steps)
        .map(|_| trainer.step().unwrap().loss_next_token)
        .collect();
    let first = losses[0];
    let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!("fp8: next-token loss {first:.3} -> {last:.3} over {steps} steps");
    // ln 16 = 2.77 at the start; below 1.5 the model uses the previous tokens (the task's
    // floor is 0.09).
    assert!(
        (first - 16f64.ln()).abs() < 0.5,
        "starts near uniform: {first}"
    );
    assert!(
        last < 1.5,
        "the loss fell from {first:.3} to only {last:.3}"
    );
}

/// GEMMs with Hopper's limited accumulation, compiled, equal the interpreter's bit for bit: both
/// sum each element's products as `LimitedSum::dot` defines (the compiled one blocked and
/// vectorised): a batched matmul with a transposed operand (plain and as every kind of
/// triangular product), the grouped expert GEMM and its weight gradient (K = each expert's
/// token-slots; also with its operands rounded in FP8 tiles along each expert's token-slots),
/// at K not a multiple of the interval.
#[test]
fn limited_accumulation_gemms_compile_bit_for_bit() {
    use fathom_compiler::graph::{
        Accumulation, ExpertTiles, MatMulPart, Op, QuantFormat, Triangle, Triangular,
    };
    use fathom_compiler::{DType, GraphBuilder, TensorType};
    let (tokens, slots, experts, k, n) = (37, 2, 3, 150, 9);
    let mut g = GraphBuilder::new("limited");
    let f32_ty = |dims: &[usize]| TensorType::new(DType::F32, dims.to_vec());
    let a = g.input("a", f32_ty(&[2, tokens, k])).unwrap();
    let b = g.input("b", f32_ty(&[n, k])).unwrap();
    let x = g.input("x", f32_ty(&[tokens, 1, k])).unwrap();
    let w = g.input("w", f32_ty(&[experts, n, k])).unwrap();
    let dy = g.input("dy", f32_ty(&[tokens, slots, n])).unwrap();
    let ids = g
        .input("ids", TensorType::new(DType::I64, [tokens, slots]))
        .unwrap();
    let bt = g.transpose(b).unwrap();
    for (name, accumulation) in [
        ("hopper", Accumulation::HOPPER),
        ("once", Accumulation::HOPPER_WITHOUT_PROMOTION),
        (
            "coarse",
            Accumulation::Limited {
                mantissa_bits: 4,
                promotion_interval: Some(7),
            },
        ),
    ] {
        let op = Op::MatMul {
            accumulation,
            triangular: None,
        };
        let y = g.push(op, &[a, bt], None).unwrap();
        g.output(&format!("{name}.matmul"), y).unwrap();
        // Triangular products with a limited accumulator (a left triangle multiplies its rows
        // over all of K from a masked copy, so the promotion chunks stay where they are).
        for part in [MatMulPart::Left, MatMulPart::Right, MatMulPart::Output] {
            for triangle in [Triangle::Lower, Triangle::Upper] {
                let t = Triangular::new(part, triangle);
                let op = Op::MatMul {
                    accumulation,
                    triangular: Some(t),
                };
                let y = g.push(op, &[a, bt], None).unwrap();
                g.output(&format!("{name}.matmul<{t}>"), y).unwrap();
            }
        }
        let op = Op::GroupedMatMul { accumulation };
        let y = g.push(op, &[x, w, ids], None).unwrap();
        g.output(&format!("{name}.grouped"), y).unwrap();
        let op = Op::GroupedMatMulWeightGrad {
            experts,
            accumulation,
            rounding: None,
        };
        let y = g.push(op, &[dy, x, ids], None).unwrap();
        g.output(&format!("{name}.weight_grad"), y).unwrap();
        // With the operands rounded in tiles along each expert's token-slots (7 of them:
        // partial tiles at every expert's end), and with power-of-two scales.
        for pow2_scales in [false, true] {
            let op = Op::GroupedMatMulWeightGrad {
                experts,
                accumulation,
                rounding: Some(ExpertTiles {
                    format: QuantFormat::E4M3,
                    tile_rows: 7,
                    pow2_scales,
                }),
            };
            let y = g.push(op, &[dy, x, ids], None).unwrap();
            g.output(&format!("{name}.weight_grad.rounded.pow2={pow2_scales}"), y)
                .unwrap();
        }
    }
    let graph = g.finish();
    let values = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 3.0)
            .collect()
    };
    let inputs = HashMap::from([
        (
            "a",
            HostTensor::f32([2, tokens, k], values(2 * tokens * k, 1)),
        ),
        ("b", HostTensor::f32([n, k], values(n * k, 2))),
        ("x", HostTensor::f32([tokens, 1, k], values(tokens * k, 3))),
        (
            "w",
            HostTensor::f32([experts, n, k], values(experts * n * k, 4)),
        ),
        (
            "dy",
            HostTensor::f32([tokens, slots, n], values(tokens * slots * n, 5)),
        ),
        (
            "ids",
            HostTensor::i64(
                [tokens, slots],
                (0..tokens * slots)
                    .map(|i| ((i * i + 1) % experts) as i64)
                    .collect(),
            ),
        ),
    ]);
    let feeds = Feeds::new(&inputs, &());
    let expected = evaluate(&graph, &feeds).unwrap();
    let compiled = CpuProgram::new(lower(&graph).unwrap()).run(&feeds).unwrap();
    for (output, want) in expected.iter() {
        let (got, want) = (
            compiled.get(output).unwrap().as_f32().unwrap(),
            want.as_f32().unwrap(),
        );
        let same = got
            .iter()
            .zip(want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        assert!(same, "{output}: {:?} vs {:?}", &got[..4], &want[..4]);
    }
    // And the coarse accumulator really truncates (it is not the exact product).
    let coarse = expected.get("coarse.matmul").unwrap().as_f32().unwrap();
    let hopper = expected.get("hopper.matmul").unwrap().as_f32().unwrap();
    assert!(
        coarse
            .iter()
            .zip(hopper)
            .any(|(c, h)| (c - h).abs() > 1e-2 * h.abs())
    );
}

/// The CPU's lowering with the bf16 round trips folded into the products that read them and
/// the losses as routines, as the backend lowers on a CPU whose bf16 GEMM runs (AVX-512),
/// whatever this CPU is.
fn folding_round_trips() -> LowerOptions {
    LowerOptions {
        products_round_operands: true,
        cross_entropy_routines: true,
        ..LowerOptions::cpu()
    }
}

/// An FP8-rewritten training graph compiled for the CPU agrees with the interpreter. The two
/// round sums differently, and a quantizer can turn a last-bit difference into one E4M3 step
/// (1/16 relative) for an element at a rounding boundary, so the bounds are looser than for f32
/// graphs: losses 1e-3, gradients 1e-1 of each tensor's max. Measured: 8e-7 while the output
/// head's GEMMs stayed f32; 2.6e-2 once they were BF16 under an FP8 policy (a flipped bf16
/// rounding of the loss gradient, which quantizers further down turn into E4M3 steps); 6.4e-7
/// with attention's products in BF16 too, lowered either way: with the bf16 round trips as
/// cast kernels, and folded into the products (`products_round_operands`, what the CPU
/// backend runs where its bf16 GEMM does).
///
/// With Hopper's limited accumulator the GEMMs themselves agree bit for bit
/// (`limited_accumulation_gemms_compile_bit_for_bit`), but a last-bit difference elsewhere now
/// also moves a sum across a 13-bit truncation step, and that cascades through the quantizers
/// and the MoE routing (a token routed to another expert), so only the losses are compared:
/// within 1e-2 (measured 4e-5 and 0), and both differ from the exact-accumulation loss.
#[test]
fn fp8_training_graphs_run_compiled_like_the_interpreter() {
    use fathom_compiler::graph::Accumulation;
    use fathom_compiler::precision::{Precision, PrecisionPolicy, apply_precision};
    use fathom_compiler::spec::Fp8Spec;

    let FixtureStep {
        model,
        train,
        inputs,
    } = FixtureStep::load("moe_grouped", LossWeights::deepseek_v3());
    let tiling = Fp8Spec {
        activation_tile: 4,
        weight_block: 4,
    };
    let feeds = Feeds::new(&inputs, &model.weights);
    let run_lowered = |accumulation, options| {
        let policy = PrecisionPolicy {
            accumulation,
            ..PrecisionPolicy::uniform(Precision::Fp8)
        };
        let graph = apply_precision(&train.graph, &policy, &tiling).unwrap();
        let quantized = graph
            .nodes
            .iter()
            .filter(|n| n.op.name() == "quantize_dequantize")
            .count();
        assert!(quantized > 50, "{quantized} quantize nodes");
        let expected = evaluate(&graph, &feeds).unwrap();
        let program = lower_with(&graph, options).unwrap();
        experts_never_copied(&program, options, "fp8");
        let compiled = CpuProgram::new(program).run(&feeds).unwrap();
        (expected, compiled)
    };
    let run = |accumulation| run_lowered(accumulation, LowerOptions::default());
    let loss = |t: Option<&HostTensor>| -> f64 { f64::from(t.unwrap().as_f32().unwrap()[0]) };
    const LOSS: &str = "loss.next_token";

    let bounds = Bounds {
        values: 1e-3,
        gradients: 1e-1,
    };
    let folding = folding_round_trips();
    for options in [LowerOptions::default(), folding] {
        let (expected, compiled) = run_lowered(Accumulation::Exact, options);
        let worst = worst_error("fp8", &expected, &compiled, bounds);
        eprintln!(
            "fp8 {options:?}: worst relative error {:.2e} ({})",
            worst.0, worst.1
        );
    }
    let (expected, _) = run(Accumulation::Exact);

    let exact = loss(expected.get(LOSS));
    let coarse = Accumulation::Limited {
        mantissa_bits: 6,
        promotion_interval: Some(3),
    };
    for accumulation in [Accumulation::HOPPER, coarse] {
        let (expected, compiled) = run(accumulation);
        let (want, got) = (loss(expected.get(LOSS)), loss(compiled.get(LOSS)));
        eprintln!("fp8, accumulation {accumulation}: loss {got} compiled, {want} interpreted");
        assert!(
            (got - want).abs() < 1e-2 * want,
            "{accumulation}: {got} vs {want}"
        );
        assert!(
            want != exact,
            "{accumulation}: the accumulator changed nothing"
        );
    }
}

/// The `moe_grouped` fixture's training step (all losses), and its graph under the bf16 policy.
fn bf16_step() -> (FixtureStep, fathom_compiler::graph::Graph) {
    use fathom_compiler::precision::{Precision, PrecisionPolicy, apply_precision};
    use fathom_compiler::spec::Fp8Spec;

    let step = FixtureStep::load("moe_grouped", LossWeights::deepseek_v3());
    let policy = PrecisionPolicy::uniform(Precision::Bf16);
    let graph = apply_precision(&step.train.graph, &policy, &Fp8Spec::default()).unwrap();
    (step, graph)
}

/// The bf16 policy's training step compiled against the interpreter: the Linear GEMMs (dense
/// and grouped, the output head's included) read operands rounded to bf16 and run on the bf16
/// kernel where this CPU chose it (`fathom_runtime::cpu::bf16_gemm`), on the f32 GEMM
/// elsewhere; the interpreter sums in f64. The sums differ by rounding only (the products of
/// bf16 values are exact in f32), but a sum that lands on the other side of a later bf16
/// rounding (the loss gradient's, before the head's input-gradient GEMM) moves that element by
/// one bf16 step, 2⁻⁸ ≈ 3.9e-3 relative. Run twice: with the casts' kernels storing each
/// rounded operand, and with the round trips folded into the products, which round as they
/// read (`products_round_operands`: the bf16 kernel's packing, or rounded copies before the
/// f32 GEMM), leaving no cast to bf16 at all. Measured worst (attention's products in bf16
/// too): gradients 7.4e-3 with the casts' kernels, on either GEMM (a fused loop's f32 value
/// that rounds to the other bf16 neighbour of the interpreter's), 5.1e-7 folded; bounds 1e-4
/// (values) and 2e-2 (gradients). A wrong product is off by O(1).
#[test]
fn bf16_training_graphs_run_compiled_like_the_interpreter() {
    use fathom_compiler::DType;

    let (step, graph) = bf16_step();
    let feeds = Feeds::new(&step.inputs, &step.model.weights);
    let expected = evaluate(&graph, &feeds).unwrap();
    let folding = folding_round_trips();
    for options in [LowerOptions::default(), folding] {
        let program = lower_with(&graph, options).unwrap();
        let bf16 = Some(DType::BF16);
        let rounds = options.products_round_operands;
        let (dense, grouped) = program
            .kernels
            .iter()
            .fold((0, 0), |(d, g), k| match &k.body {
                KernelBody::Library(Library::MatMul {
                    exact_in,
                    rounds: r,
                    ..
                }) if *exact_in == bf16 && *r == rounds => (d + 1, g),
                KernelBody::Library(
                    Library::GroupedMatMul {
                        exact_in,
                        rounds: r,
                        ..
                    }
                    | Library::GroupedMatMulWeightGrad {
                        exact_in,
                        rounds: r,
                        ..
                    },
                ) if *exact_in == bf16 && *r == rounds => (d, g + 1),
                _ => (d, g),
            });
        assert!(
            dense > 20 && grouped >= 3,
            "{options:?}: {dense} dense, {grouped} grouped bf16 GEMMs"
        );
        let casts = program.to_string().matches("cast<bf16>").count();
        assert_eq!(casts == 0, rounds, "{options:?}: {casts} casts to bf16");
        let compiled = CpuProgram::new(program).run(&feeds).unwrap();
        let bounds = Bounds {
            values: 1e-4,
            gradients: 2e-2,
        };
        let worst = worst_error("bf16", &expected, &compiled, bounds);
        eprintln!(
            "bf16 ({:?}, products round: {rounds}): worst relative error {:.2e} ({})",
            fathom_runtime::cpu::bf16_gemm(),
            worst.0,
            worst.1
        );
    }
}

/// The fused cross-entropy and its gradient, compiled (JIT and row evaluator) against the
/// interpreter's f64 rows: a vocabulary of 37 (four-lane loops with a scalar tail), logits
/// that are a computed expression, an ignored row and a label at each end of the vocabulary.
/// Tolerance 1e-6 of the largest value: the kernels accumulate the row sums in f64 as the
/// interpreter (which works in f64 throughout) does and round each element a few times more;
/// the gradient recovers the log-sum-exp from the forward's f32 loss, one more rounding of a
/// value of order 10 (about 1e-6 relative in the softmax).
#[test]
fn cross_entropy_runs_compiled_like_the_interpreter() {
    use fathom_compiler::autodiff::backward;
    use fathom_compiler::graph::ReduceOp;
    use fathom_compiler::{DType, GraphBuilder, Tensor, TensorType};

    let (rows, vocab) = (6, 37);
    let mut g = GraphBuilder::new("cross_entropy");
    let x = g
        .input("x", TensorType::new(DType::F32, [2, rows / 2, vocab]))
        .unwrap();
    let labels = g
        .input("labels", TensorType::new(DType::I64, [2, rows / 2]))
        .unwrap();
    let logits = g.scale(x, 3.0).unwrap();
    let per_row = g.cross_entropy(logits, labels).unwrap();
    let flat = g.reshape(per_row, &[rows]).unwrap();
    let loss = g.reduce(ReduceOp::Sum, flat, 0, false).unwrap();
    g.output("loss", loss).unwrap();
    g.output("per_row", per_row).unwrap();
    let backward = backward(g.finish(), loss.id(), &[x.id()]).unwrap();
    let mut g = GraphBuilder::from_graph(backward.graph);
    g.output("grad.x", Tensor(backward.gradients[0].1)).unwrap();
    let graph = g.finish();

    let values: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 101) as f32 / 25.0 - 2.0)
        .collect();
    let inputs = HashMap::from([
        (
            "x".to_owned(),
            HostTensor::f32([2, rows / 2, vocab], values),
        ),
        (
            "labels".to_owned(),
            HostTensor::i64([2, rows / 2], vec![0, 36, -1, 5, 17, 36]),
        ),
    ]);
    let feeds = Feeds::new(&inputs, &());
    let expected = evaluate(&graph, &feeds).unwrap();
    let program = lower(&graph).unwrap();
    for (how, cpu) in [
        ("jit", CpuProgram::new(program.clone())),
        ("row evaluator", CpuProgram::without_jit(program.clone())),
    ] {
        let compiled = cpu.run(&feeds).unwrap();
        for (name, want) in expected.iter() {
            let got = compiled.get(name).unwrap().as_f32().unwrap();
            let error = relative(got, want.as_f32().unwrap());
            eprintln!("{how}: {name}: relative error {error:.2e}");
            assert!(error < 1e-6, "{how}: {name}: relative error {error:.2e}");
        }
        // The ignored row (batch 0, position 2) has loss 0 and no gradient.
        let grad = compiled.get("grad.x").unwrap().as_f32().unwrap();
        assert!(
            grad[2 * vocab..3 * vocab].iter().all(|&v| v == 0.0),
            "{how}"
        );
        assert_eq!(compiled.get("per_row").unwrap().as_f32().unwrap()[2], 0.0);
    }
}

/// Reductions over a short axis other than the last are lowered to a sum of loads over the
/// output's axes (no row reduction left in their kernels); long or last-axis ones stay row
/// reductions. Both forms, with `keep_dim` or not, sums and means, and a row reduction fused
/// into the summed expression (computed again for each term), match the interpreter. The
/// unrolled sums add in f32 where the interpreter adds in f64: a rounding or two of values of
/// order 10, so 1e-6 of the largest result.
#[test]
fn short_axis_reductions_run_as_sums_of_loads_like_the_interpreter() {
    use fathom_compiler::graph::ReduceOp;
    use fathom_compiler::kernel::{KernelBody, Stmt};
    use fathom_compiler::{DType, GraphBuilder, TensorType};

    let dims = [3usize, 4, 9, 8];
    let mut g = GraphBuilder::new("short_reductions");
    let x = g.input("x", TensorType::new(DType::F32, dims)).unwrap();
    let sum_short = g.reduce(ReduceOp::Sum, x, 1, false).unwrap();
    let mean_short_kept = g.reduce(ReduceOp::Mean, x, 0, true).unwrap();
    let sum_long = g.reduce(ReduceOp::Sum, x, 2, false).unwrap();
    let sum_last = g.reduce(ReduceOp::Sum, x, 3, false).unwrap();
    // x · Σ_last x, summed over the short axis 1: the row sum is fused into every term.
    let row_sums = g.reduce(ReduceOp::Sum, x, 3, true).unwrap();
    let weighted = g.mul(x, row_sums).unwrap();
    let sum_weighted = g.reduce(ReduceOp::Sum, weighted, 1, false).unwrap();
    for (name, t) in [
        ("sum_short", sum_short),
        ("mean_short_kept", mean_short_kept),
        ("sum_long", sum_long),
        ("sum_last", sum_last),
        ("sum_weighted", sum_weighted),
    ] {
        g.output(name, t).unwrap();
    }
    let graph = g.finish();

    let count: usize = dims.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|i| ((i * 7919) % 101) as f32 / 25.0 - 2.0)
        .collect();
    let inputs = HashMap::from([("x".to_owned(), HostTensor::f32(dims, values))]);
    let feeds = Feeds::new(&inputs, &());
    let expected = evaluate(&graph, &feeds).unwrap();
    let program = lower(&graph).unwrap();

    let row_reductions = |output: &str| {
        let buffer = program
            .outputs
            .iter()
            .find(|(name, _)| name == output)
            .map(|&(_, buffer)| buffer)
            .unwrap();
        let kernel = program
            .kernels
            .iter()
            .find(|k| match &k.body {
                KernelBody::Loop(nest) => nest.body.iter().any(|s| match s {
                    Stmt::Store { view, .. } | Stmt::StoreRow { view, .. } => view.buffer == buffer,
                    Stmt::Reduce { .. } => false,
                }),
                KernelBody::Library(_) => false,
            })
            .unwrap_or_else(|| panic!("no kernel stores {output}"));
        let KernelBody::Loop(nest) = &kernel.body else {
            unreachable!()
        };
        nest.body
            .iter()
            .filter(|s| matches!(s, Stmt::Reduce { .. }))
            .count()
    };
    assert_eq!(row_reductions("sum_short"), 0);
    assert_eq!(row_reductions("mean_short_kept"), 0);
    assert_eq!(row_reductions("sum_long"), 1);
    assert_eq!(row_reductions("sum_last"), 1);
    // One row sum of the fused input per term of the short axis.
    assert_eq!(row_reductions("sum_weighted"), 4);

    for (how, cpu) in [
        ("jit", CpuProgram::new(program.clone())),
        ("row evaluator", CpuProgram::without_jit(program.clone())),
    ] {
        let compiled = cpu.run(&feeds).unwrap();
        for (name, want) in expected.iter() {
            let got = compiled.get(name).unwrap();
            assert_eq!(got.ty, want.ty, "{how}: {name}");
            let error = relative(got.as_f32().unwrap(), want.as_f32().unwrap());
            assert!(error < 1e-6, "{how}: {name}: relative error {error:.2e}");
        }
    }
}

/// Triangular matmuls compiled, every part and triangle, against the interpreter: one written
/// row by row, one whose only reader transposes it (the lowering computes that one as the
/// transposed product, `outᵀ = T(b)ᵀ·aᵀ`, with the triangle moved accordingly). Integer-valued
/// operands keep every sum exact, so the results are equal.
#[test]
fn triangular_matmuls_run_compiled_like_the_interpreter() {
    use fathom_compiler::graph::{MatMulPart, Triangle, Triangular};
    use fathom_compiler::{DType, GraphBuilder, TensorType};

    let (a_dims, b_dims) = ([2usize, 70, 40], [2usize, 40, 90]);
    let mut g = GraphBuilder::new("triangular");
    let a = g.input("a", TensorType::new(DType::F32, a_dims)).unwrap();
    let b = g.input("b", TensorType::new(DType::F32, b_dims)).unwrap();
    let mut names = Vec::new();
    for part in [MatMulPart::Left, MatMulPart::Right, MatMulPart::Output] {
        for triangle in [Triangle::Lower, Triangle::Upper] {
            let t = Triangular::new(part, triangle);
            let rows = g.matmul_triangular(a, b, Some(t)).unwrap();
            let across = g.matmul_triangular(a, b, Some(t)).unwrap();
            let across = g.permute(across, &[0, 2, 1]).unwrap();
            let across = g.reshape(across, &[2 * 90 * 70]).unwrap();
            for (how, value) in [("rows", rows), ("across", across)] {
                let name = format!("{t} {how}");
                g.output(&name, value).unwrap();
                names.push(name);
            }
        }
    }
    let graph = g.finish();
    let ints = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * seed) % 7) as f32 - 3.0).collect()
    };
    let inputs = HashMap::from([
        (
            "a".to_owned(),
            HostTensor::f32(a_dims, ints(2 * 70 * 40, 5)),
        ),
        (
            "b".to_owned(),
            HostTensor::f32(b_dims, ints(2 * 40 * 90, 3)),
        ),
    ]);
    let feeds = Feeds::new(&inputs, &());
    let expected = evaluate(&graph, &feeds).unwrap();
    let compiled = CpuProgram::new(lower(&graph).unwrap()).run(&feeds).unwrap();
    for name in &names {
        assert_eq!(compiled.get(name), expected.get(name), "{name}");
    }
}

/// The CPU's head routine (`linear_cross_entropy_routines`: the logits' matmul, the loss, its
/// gradient and the gradient's two matmuls as one call) in the bf16 policy's training step:
/// one call per loss and none of the five kernels left (but where the step outputs its
/// logits, which then stay a matmul's), and every output
/// of the step bit for bit what the five kernels give (on the bf16 kernel the routine's chunks
/// sum each value in the same order; elsewhere it runs the five steps in turn). Keeping every
/// activation: under recomputation the backward product reads a recomputed copy of the head's
/// input, not recognised as the same values.
#[test]
fn the_head_routine_gives_the_five_kernels_bits_in_a_bf16_step() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::graph::Graph;
    use fathom_compiler::passes::RecomputePolicy;

    let (step, mut graph) = bf16_step();
    let feeds = Feeds::new(&step.inputs, &step.model.weights);
    let separate = folding_round_trips();
    let fused = LowerOptions {
        linear_cross_entropy_routines: true,
        ..separate
    };
    // Through the graph passes, as the runtime compiles (the loss's cotangent folded to a
    // constant), or lowered as it is (the cotangent computed by kernels after the loss, which
    // move before the call).
    let compiled = |graph: &Graph, lower, passes: bool| {
        if !passes {
            return lower_with(graph, lower).unwrap();
        }
        let options = CompileOptions {
            lower,
            recompute: RecomputePolicy::None,
            ..CompileOptions::default()
        };
        compile(graph, &options).unwrap().program
    };
    // The fixture's step outputs its logits (compared with transformers'): they stay.
    let keeping_logits = compiled(&graph, fused, true);
    let fused_head = |k: &Kernel| k.name.contains("linear_cross_entropy");
    assert!(!keeping_logits.kernels.iter().any(fused_head));
    graph
        .outputs
        .retain(|output| !output.name.contains("logits"));
    let count = |program: &Program, picked: fn(&Library) -> bool| {
        program
            .kernels
            .iter()
            .filter(|k| matches!(&k.body, KernelBody::Library(call) if picked(call)))
            .count()
    };
    for passes in [true, false] {
        let [separate, fused] = [separate, fused].map(|lower| compiled(&graph, lower, passes));
        let losses = count(&separate, |c| matches!(c, Library::CrossEntropy { .. }));
        assert!(losses >= 1, "{losses} cross-entropies");
        let heads = count(&fused, |c| matches!(c, Library::LinearCrossEntropy { .. }));
        let left = count(&fused, |c| {
            matches!(
                c,
                Library::CrossEntropy { .. } | Library::CrossEntropyGrad { .. }
            )
        });
        assert_eq!((heads, left), (losses, 0), "passes: {passes}");
        assert_eq!(fused.kernels.len() + 4 * heads, separate.kernels.len());
        let want = CpuProgram::new(separate).run(&feeds).unwrap();
        let got = CpuProgram::new(fused).run(&feeds).unwrap();
        for (output, value) in got.iter() {
            assert_eq!(Some(value), want.get(output), "passes: {passes}: {output}");
        }
        assert_eq!(got.iter().count(), want.iter().count());
    }
}

/// Attention with bf16 products, its statistic and its four gradients, as the CPU compiles
/// them (expanded into matmuls and a softmax, the gradients by autodiff, the products' operands
/// rounded), against the interpreter's fused ops, for several shapes: one token, one head,
/// tokens past a row block. Both round the same operands to bf16, but a value one f32 ulp from
/// the other side's can round to the neighbouring bf16 value (2⁻⁸ relative in one operand):
/// 1e-2 of each output's largest value.
#[test]
fn attention_compiles_like_the_interpreters_fused_ops() {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_kernels::MlaHeadDims;
    use fathom_runtime::cuda::attention_samples::{attention_call_feeds, attention_call_graph};
    let dims = MlaHeadDims {
        nope: 4,
        rope: 2,
        v: 3,
    };
    for sizes in [(1, 1, 1), (2, 5, 3), (1, 70, 2)] {
        let graph = attention_call_graph(dims, sizes, 0.45).unwrap();
        let feeds = attention_call_feeds(&graph);
        let feeds = Feeds::new(&feeds, &());
        let want: HashMap<String, HostTensor> =
            evaluate(&graph, &feeds).unwrap().into_iter().collect();
        for lower in [
            LowerOptions::default(),
            fathom_runtime::cpu::lower_options(),
        ] {
            let options = CompileOptions {
                lower,
                ..CompileOptions::default()
            };
            let program = compile(&graph, &options).unwrap().program;
            let got = CpuProgram::new(program).run(&feeds).unwrap();
            for (name, tensor) in got {
                let error = relative(tensor.as_f32().unwrap(), want[&name].as_f32().unwrap());
                assert!(error <= 1e-2, "{sizes:?} {name}: {error:e}");
            }
        }
    }
}
