//! `fathom gpu-check`: the checks that need a GPU (run by `scripts/gpu-check.sh`).
//!
//! 1. Every generated kernel of the tiny model's training step (forward, losses, backward) runs
//!    alone on the GPU on the buffers the CPU backend had before it, and what it writes is
//!    compared with what the CPU wrote.
//!    Then every f32 library template (GEMMs, index operations, fake quantisation) on the
//!    awkward shapes of `cuda::library_samples`, each against the CPU (GEMMs within
//!    2·K·2⁻²⁴·Σ|a·b| per element, the rest bit for bit), and the FP8 products' plans (dense
//!    forward and weight-gradient forms, the experts' grouped product: padding, the gathered
//!    quantisation, the FP8 GEMM scattering its rows; the experts' weight gradient rounding
//!    along each expert's rows: the gathered 128×1 quantisation, the K-grouped FP8 GEMM)
//!    against the CPU's emulation of Hopper's accumulation (DeepGEMM's difference at most
//!    1e-3).
//! 2. A few training steps of the tiny model with `backend = cuda` (generated kernels and library
//!    templates) against the CPU, comparing losses: in f32, then at precision FP8 with Hopper's
//!    accumulation, where the Linear GEMMs run as `quantize` + FP8 GEMM (`cuda::library_fp8`)
//!    and the CPU emulates them, and in BF16, where the GPU's attention runs on the
//!    flash-attention templates: with the tiny model's heads (16 + 8 and 16, padded to 16 + 16
//!    and 64 around the templates) and with heads widened to those widths (no padding).
//!    Then the optimizer kept on the GPU against on the host, both on the GPU, in FP8: every
//!    loss, norm, weight and moment bit for bit.
//! 3. The FP8 GEMM templates against the f64 product of the same quantized operands (DeepGEMM's
//!    `1 - 2Σxy/Σ(x²+y²) < 0.001`): on Hopper every sm_90a tile configuration the timings try,
//!    under three tile schedules; on any GPU the portable `mma.sync` GEMM; each in every layout
//!    (dense with 128×128 weight scales, 1×128 scales on B with accumulation, grouped experts,
//!    also with the rows scattered, and K-grouped with an empty group). Then (3b) the
//!    quantisation templates, every kind (the gathered ones too), input (f32, bf16, a saved
//!    activation's E4M3 tiles, a product of two f32 tensors) and scale rounding,
//!    against the CPU's quantizers bit for bit, (3c) the MLA attention templates (forward,
//!    `delta`, backward) against the exact attention of the same bf16 inputs, and (3d) the
//!    attention calls of a program (bf16 conversions, templates, zeroing) through the executor
//!    against the interpreter, and (3e) the optimizer's device kernels (the norm's sums of
//!    squares, the clipping, AdamW with f32 and bf16 moments) against the host's, bit for bit.
//!    A launch that
//!    does not finish within seconds stops the check with its name; these run after the
//!    training steps, so that a hang leaves them checked.
//! 4. The FP8 GEMM's time at DeepSeek-V3 shapes (and the layouts cuBLASLt has no counterpart
//!    for: a weight gradient, the experts' grouped GEMMs and their K-grouped weight gradients),
//!    every tile configuration under every schedule side by side, with `torch._scaled_mm`
//!    (cuBLASLt FP8) beside the fastest when `scripts/scaled_mm_bench.py` produced its JSON.
//!    Then (4b) the MLA attention templates' forward and backward at DeepSeek-V3's sizes (4096
//!    tokens, 128 heads), with PyTorch's `scaled_dot_product_attention` beside them when
//!    `scripts/attention_bench.py` produced its JSON; and (4c) the FP8 operand paths as written
//!    before and as the plan runs them side by side (a saved activation rounded in f32 then
//!    quantised twice, against one quantisation into kept codes and the re-tiling from them;
//!    the experts' combine gradient quantised from the stored product, against from its
//!    factors).
//!
//! Without a GPU it prints one line and succeeds: there is nothing to check.

mod attention;
mod attention_bench;
mod device_optimizer;
mod fp8;
mod launch;
mod optimizer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use fathom_compiler::codegen::{CudaLaunch, cuda_program};
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::graph::Accumulation;
use fathom_compiler::model::{LossWeights, parameter_graph};
use fathom_compiler::pipeline::Method;
use fathom_compiler::precision::{Precision, PrecisionPolicy};
use fathom_compiler::training::training_graph;
use fathom_kernels::nvrtc::Nvrtc;
use fathom_runtime::HostTensor;
use fathom_runtime::cpu::{CpuProgram, KernelPhase};
use fathom_runtime::cuda::library_samples::{SampleResult, library_samples, run_sample};
use fathom_runtime::cuda::memory::DriverMemory;
use fathom_runtime::cuda::{CachingAllocator, GpuDevice, GpuKernels, KernelCache};
use fathom_runtime::data::{SyntheticBatches, SyntheticKind, SyntheticTask};
use fathom_runtime::exec::Backend;
use fathom_runtime::init::init_parameters;
use fathom_runtime::interp::Feeds;
use fathom_runtime::optim::{AdamWConfig, LrSchedule};
use fathom_runtime::parallel::PipelineSettings;
use fathom_runtime::train::{TrainSettings, Trainer};
use fathom_runtime::weights::Weights;

/// Runs the GPU checks (correctness against the CPU, then timings).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSON written by `scripts/scaled_mm_bench.py` (torch._scaled_mm timings at the same
    /// shapes), shown beside the FP8 GEMM's.
    #[arg(long)]
    cublas: Option<PathBuf>,
    /// JSON written by `scripts/attention_bench.py` (PyTorch's scaled_dot_product_attention
    /// at the same sizes), shown beside the attention templates' timings.
    #[arg(long)]
    torch_attention: Option<PathBuf>,
    /// Timed launches per GEMM shape (and per attention pass).
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// Only the correctness checks.
    #[arg(long)]
    no_bench: bool,
    /// Training steps compared between the GPU and the CPU.
    #[arg(long, default_value_t = 3)]
    steps: u64,
}

/// Per element: |gpu - cpu| <= ATOL_OF_MAX·max|cpu| + RTOL·|cpu|. The GPU sums rows in f32 in a
/// tree order where the CPU sums in f64, NVRTC contracts a·b+c into FMAs, and libdevice's
/// exp/log/tanh are within 2 ulp: all relative errors of order 1e-6 on rows of up to a few
/// thousand elements. A wrong index or formula is off by O(1).
const RTOL: f64 = 1e-4;
const ATOL_OF_MAX: f64 = 1e-5;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let device = match GpuDevice::probe(0) {
        Ok(device) => device,
        Err(reason) => {
            println!("gpu-check: {reason}; nothing to check on this machine");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let (major, minor) = device.compute_capability;
    println!(
        "device 0: {} (compute capability {major}.{minor}, {:.0} GiB)",
        device.name,
        device.total_memory_bytes as f64 / f64::from(1u32 << 30)
    );
    let nvrtc = Nvrtc::locate()?;
    let (nv_major, nv_minor) = nvrtc.version();
    let cache = KernelCache::from_env(nvrtc)?;
    println!(
        "NVRTC {nv_major}.{nv_minor}; kernel cache {}",
        cache.root().display()
    );

    let mut failures = Vec::new();
    println!("\n== 1. generated kernels of the tiny model's training step, each against the CPU");
    failures.extend(check_generated_kernels(&device, &cache)?);
    println!("\n== 1b. f32 library templates at awkward shapes, each against the CPU");
    failures.extend(check_library_templates(&device, &cache)?);

    println!("\n== 2. training steps of the tiny model, GPU against CPU");
    failures.extend(compare_training(args.steps)?);

    println!("\n== 3. FP8 GEMM templates against the exact product of their quantized operands");
    failures.extend(fp8::check_correctness(&device, &cache)?);
    println!("\n== 3b. quantisation templates against the CPU's quantizers, bit for bit");
    failures.extend(fp8::check_quantize(&device, &cache)?);
    println!("\n== 3c. MLA attention templates against the exact attention of their inputs");
    failures.extend(attention::check_attention(&device, &cache)?);
    println!("\n== 3d. attention as the CUDA backend compiles it, against the interpreter");
    failures.extend(attention::check_attention_calls(&device, &cache)?);
    println!("\n== 3e. the optimizer's device kernels against the host's optimizer, bit for bit");
    failures.extend(optimizer::check_optimizer(&device, &cache)?);

    if args.no_bench {
        println!("\n== 4. FP8 GEMM timings: skipped (--no-bench)");
    } else if device.compute_capability == (9, 0) {
        println!("\n== 4. FP8 GEMM timings at DeepSeek-V3 shapes (M = 4096)");
        fp8::bench(&device, &cache, args.iters, args.cublas.as_deref())?;
    } else {
        println!("\n== 4. FP8 GEMM timings: SKIP (needs sm_90a)");
    }
    if !args.no_bench {
        println!("\n== 4b. MLA attention templates' timings at DeepSeek-V3's sizes");
        attention_bench::bench(&device, &cache, args.iters, args.torch_attention.as_deref())?;
        println!("\n== 4c. FP8 operand paths, as written before and as the plan runs them");
        fp8::bench_saved_operands(&device, &cache, args.iters)?;
    }

    let counters = cache.counters();
    println!(
        "\nkernel cache: {} hits, {} compiles, {} rebuilt",
        counters.hits, counters.compiles, counters.rebuilt
    );
    if failures.is_empty() {
        println!("gpu-check: all checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("gpu-check: {} check(s) FAILED:", failures.len());
        for failure in &failures {
            println!("  {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The tiny model's training graph at batch 2 × 16 tokens, with random weights and tokens.
type TrainingCase = (
    fathom_compiler::Graph,
    HashMap<String, HostTensor>,
    HashMap<&'static str, HostTensor>,
);

fn tiny_training() -> anyhow::Result<TrainingCase> {
    let spec = fathom::zoo::architecture("tiny").context("the zoo has `tiny`")?;
    let (batch, seq) = (2, 16);
    let graph = training_graph(&spec, batch, seq, LossWeights::deepseek_v3())?.graph;
    let weights = init_parameters(&graph, spec.initializer_range, 0);
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i * 7 + 3) % spec.vocab_size) as i64)
        .collect();
    let inputs = HashMap::from([("input_ids", HostTensor::i64([batch, seq], ids))]);
    Ok((graph, weights, inputs))
}

/// Buffers a kernel wrote on the GPU, with their values.
type Written = Vec<(fathom_compiler::kernel::BufferId, Vec<f32>)>;

/// Check 1; returns the failures.
fn check_generated_kernels(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let (graph, weights, inputs) = tiny_training()?;
    let program = compile(&graph, &CompileOptions::default())?.program;
    let cuda = cuda_program(&program)?;
    let started = std::time::Instant::now();
    let kernels = GpuKernels::load(device, cache, &cuda)?;
    println!(
        "{} generated kernels ({} distinct sources, {} from the cache) loaded for {} in {:.1} s; \
         its {} library calls are checked in 1b and by the training steps",
        cuda.kernels.len(),
        cuda.sources.len(),
        kernels.cache_hits,
        kernels.arch,
        started.elapsed().as_secs_f64(),
        cuda.library_calls().count()
    );
    let stream = device.ctx.new_stream()?;
    let mut allocator = CachingAllocator::new(DriverMemory::new(device.ctx.clone()));
    let cpu = CpuProgram::new(program.clone());
    let feeds = Feeds::new(&inputs, &weights);

    // The GPU's result for the kernel about to run on the CPU: (kernel index, written buffers).
    let mut gpu_result: Option<(usize, Written)> = None;
    let mut failures = Vec::new();
    let mut checked = 0usize;
    let mut worst = (0f64, String::new());
    cpu.run_observed(&feeds, &mut |index, phase, buffers| {
        let CudaLaunch::Generated(k) = &cuda.launches[index] else {
            return;
        };
        let kernel = &cuda.kernels[*k];
        match phase {
            KernelPhase::Before => {
                let dead = kernel.args.iter().find(|a| {
                    buffers[a.buffer.index()].len() != program.buffer(a.buffer).ty.numel()
                });
                if let Some(arg) = dead {
                    failures.push(format!(
                        "{}: buffer {} is not live on the CPU",
                        kernel.name, arg.buffer
                    ));
                    return;
                }
                match kernels.run_isolated(&stream, &mut allocator, kernel, buffers) {
                    Ok(written) => gpu_result = Some((index, written)),
                    Err(e) => failures.push(format!("{}: {e}", kernel.name)),
                }
            }
            KernelPhase::After => {
                let Some((at, written)) = gpu_result.take() else {
                    return;
                };
                if at != index {
                    return;
                }
                checked += 1;
                for (buffer, gpu) in written {
                    let want = &buffers[buffer.index()];
                    let (error, bad) = compare(&gpu, want);
                    if error > worst.0 {
                        worst = (error, kernel.name.clone());
                    }
                    if let Some((i, g, c)) = bad {
                        failures.push(format!(
                            "{} ({}): {buffer}[{i}] = {g} on the GPU, {c} on the CPU",
                            kernel.name,
                            kernel.entry()
                        ));
                    }
                }
            }
        }
    })?;
    let stats = allocator.stats();
    println!(
        "{checked} of {} kernels checked: {} failed; worst error {:.2e} of the bound ({}); \
         allocator: {} device allocations, {} reuses, peak {} KiB",
        cuda.kernels.len(),
        failures.len(),
        worst.0,
        if worst.1.is_empty() {
            "-"
        } else {
            worst.1.as_str()
        },
        stats.device_allocs,
        stats.reuses,
        stats.peak_in_use / 1024
    );
    stream.synchronize()?;
    allocator.streams_synchronized();
    allocator.empty_cache()?;
    for failure in failures.iter().take(20) {
        println!("FAIL {failure}");
    }
    Ok(failures)
}

/// Check 1b; returns the failures.
fn check_library_templates(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    for sample in library_samples().map_err(anyhow::Error::msg)? {
        let problem = match run_sample(device, cache, &sample) {
            Ok(SampleResult {
                mismatch: None,
                worst_ratio,
            }) => {
                println!(
                    "ok   {:<30} {:?}: worst error {worst_ratio:.3} of the bound",
                    sample.name, sample.tolerance
                );
                continue;
            }
            Ok(SampleResult {
                mismatch: Some((i, g, c, bound)),
                ..
            }) => format!("y[{i}] = {g} on the GPU, {c} on the CPU (bound {bound:e})"),
            Err(e) => e.to_string(),
        };
        println!("FAIL {}: {problem}", sample.name);
        failures.push(format!("{}: {problem}", sample.name));
    }
    Ok(failures)
}

/// The largest error as a fraction of its bound, and the first element beyond the bound.
fn compare(gpu: &[f32], cpu: &[f32]) -> (f64, Option<(usize, f32, f32)>) {
    let max = cpu
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let mut worst = 0f64;
    let mut first_bad = None;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let same_non_finite = !c.is_finite() && (g == c || (g.is_nan() && c.is_nan()));
        if same_non_finite {
            continue;
        }
        let bound = ATOL_OF_MAX * max + RTOL * f64::from(c.abs());
        let error = (f64::from(g) - f64::from(c)).abs();
        let ratio = if bound > 0.0 {
            error / bound
        } else if error == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if (ratio.is_nan() || ratio > 1.0) && first_bad.is_none() {
            first_bad = Some((i, g, c));
        }
        if ratio.is_finite() {
            worst = worst.max(ratio);
        } else {
            worst = f64::INFINITY;
        }
    }
    (worst, first_bad)
}

/// The tiny model, or with `template_heads` its attention widened to head widths the
/// flash-attention templates take as they are (16 + 16 query/key channels, 64 value
/// channels), so that the CUDA backend runs its attention on them without padding.
fn tiny_spec(template_heads: bool) -> anyhow::Result<fathom_compiler::spec::ModelSpec> {
    let mut spec = fathom::zoo::architecture("tiny").context("the zoo has `tiny`")?;
    if template_heads {
        spec.attention.qk_nope_head_dim = 16;
        spec.attention.qk_rope_head_dim = 16;
        spec.attention.v_head_dim = 64;
    }
    Ok(spec)
}

/// A trainer of `spec` on the synthetic task, with the given backend, precision and pipeline.
/// Two micro-batches per step and replica, four in a pipeline: the GPU uploads the parameters
/// once per weights version, so the later ones run on what the first uploaded, and a step's
/// losses go wrong if an update is missed.
fn tiny_trainer(
    spec: fathom_compiler::spec::ModelSpec,
    backend: Backend,
    steps: u64,
    precision: PrecisionPolicy,
    pipeline: PipelineSettings,
) -> anyhow::Result<Trainer> {
    let (batch, seq) = (2, 16);
    let settings = TrainSettings {
        batch,
        seq,
        micro_batches: if pipeline.is_parallel() { 4 } else { 2 },
        steps,
        optimizer: AdamWConfig::default(),
        schedule: LrSchedule {
            peak_lr: 1e-3,
            warmup_steps: 0,
            hold_steps: u64::MAX / 4,
            decay_steps: 0,
            final_lr: 1e-3,
        },
        clip_norm: Some(1.0),
        losses: LossWeights::deepseek_v3(),
        bias_update_speed: 0.001,
        backend,
        precision,
        pipeline,
    };
    let weights = Weights::from(init_parameters(
        &parameter_graph(&spec)?,
        spec.initializer_range,
        0,
    ));
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 0)?;
    let data = SyntheticBatches::new(task, batch, seq)?;
    Ok(Trainer::new(spec, settings, weights, Box::new(data))?)
}

/// Check 2: the losses of `steps` training steps with the CUDA backend against the CPU's, in
/// f32, in FP8, in BF16 with attention on the flash-attention templates (padded heads, then
/// heads of the templates' widths), and in f32 under DualPipe: two stages on two ranks, two
/// replicas, four threads sharing each stage's executables on the one GPU, each rank summing
/// its micro-batches' gradients in device memory of its own. Then the optimizer kept on the
/// GPU against on the host, bit for bit (`device_optimizer`).
fn compare_training(steps: u64) -> anyhow::Result<Vec<String>> {
    let f32 = PrecisionPolicy::default();
    let one_rank = PipelineSettings::default;
    let f32_bounds = [1e-4, 1e-3];
    let mut failures =
        compare_training_at("f32", f32.clone(), false, one_rank(), steps, f32_bounds)?;
    let fp8 = PrecisionPolicy {
        accumulation: Accumulation::HOPPER,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    failures.extend(compare_training_at(
        "FP8, Hopper's accumulation",
        fp8,
        false,
        one_rank(),
        steps,
        [1e-2, 2e-2],
    )?);
    for (what, template_heads) in [
        (
            "BF16, attention on the templates (heads 16 + 8, v 16, padded)",
            false,
        ),
        (
            "BF16, attention on the templates (heads 16 + 16, v 64)",
            true,
        ),
    ] {
        failures.extend(compare_training_at(
            what,
            PrecisionPolicy::uniform(Precision::Bf16),
            template_heads,
            one_rank(),
            steps,
            [1e-2, 2e-2],
        )?);
    }
    failures.extend(compare_training_at(
        "f32, DualPipe: 2 stages × 2 replicas",
        f32,
        false,
        dualpipe(),
        steps,
        f32_bounds,
    )?);
    failures.extend(device_optimizer::compare_device_optimizer(steps)?);
    Ok(failures)
}

/// The pipeline of check 2's last comparison: DualPipe's two stages on two ranks, each stage on
/// both, in two replicas.
fn dualpipe() -> PipelineSettings {
    PipelineSettings {
        stages: 2,
        schedule: Method::DualPipe,
        data_parallel: 2,
        ..PipelineSettings::default()
    }
}

/// The losses of `steps` training steps at `precision` under `pipeline`, GPU against CPU,
/// each within `bounds` (the first step's, the later steps') relative to the CPU's loss.
///
/// f32: the first step within 1e-4 (the GPU sums rows and GEMMs in f32 in another order,
/// relative errors of order 1e-6 at the tiny model's sizes), later steps within 1e-3 (the
/// weights then also differ by the rounding of the earlier updates, which Adam's normalisation
/// can amplify for near-zero gradients).
///
/// FP8: the GPU's tensor cores accumulate as the CPU emulates them only up to the order of the
/// sums, and a value an f32 rounding away from an E4M3 rounding boundary can take the next code
/// (one E4M3 step, up to 6.25%, on that element): the first step within 1e-2, later steps 2e-2.
///
/// BF16 with attention on the templates (padded or not): the same bf16 operands on both
/// sides, but the GPU's attention stores its output in bf16 and normalises its probabilities
/// after rounding them (the CPU runs the matmuls and softmax), and a value an f32 rounding from
/// a bf16 boundary takes the next bf16 value: the FP8 bounds.
fn compare_training_at(
    what: &str,
    precision: PrecisionPolicy,
    template_heads: bool,
    pipeline: PipelineSettings,
    steps: u64,
    bounds: [f64; 2],
) -> anyhow::Result<Vec<String>> {
    println!("{what}:");
    let spec = tiny_spec(template_heads)?;
    let gpu = tiny_trainer(
        spec.clone(),
        Backend::Cuda,
        steps,
        precision.clone(),
        pipeline.clone(),
    );
    let mut gpu = match gpu {
        Ok(trainer) => trainer,
        Err(e) => {
            println!("FAIL: the tiny model cannot train on the GPU ({what}): {e:#}");
            return Ok(vec![format!("training on the GPU ({what}): {e:#}")]);
        }
    };
    let mut cpu = tiny_trainer(spec, Backend::Cpu, steps, precision, pipeline)?;
    let mut failures = Vec::new();
    for step in 1..=steps {
        let (g, c) = (gpu.step()?, cpu.step()?);
        let bound = if step == 1 { bounds[0] } else { bounds[1] };
        let ok = (g.loss - c.loss).abs() <= bound * c.loss.abs().max(1.0);
        println!(
            "step {step}: loss GPU {:.6}, CPU {:.6} ({}; bound {bound:e} relative)",
            g.loss,
            c.loss,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!(
                "training step {step} ({what}): loss GPU {}, CPU {}",
                g.loss, c.loss
            ));
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The BF16 training comparisons' models have their attention on the templates on the GPU
    /// (two calls per attention layer: the MLA layers' and the MTP block's), and train on the
    /// CPU.
    #[test]
    fn the_bf16_comparisons_run_attention_on_the_templates() {
        for template_heads in [false, true] {
            bf16_comparison_runs_attention_on_the_templates(template_heads);
        }
    }

    fn bf16_comparison_runs_attention_on_the_templates(template_heads: bool) {
        use fathom_compiler::compile::{CompileOptions, compile};
        use fathom_compiler::kernel::{KernelBody, Library};
        let spec = tiny_spec(template_heads).unwrap();
        let bf16 = PrecisionPolicy::uniform(Precision::Bf16);
        let graph = training_graph(&spec, 2, 16, LossWeights::deepseek_v3())
            .unwrap()
            .graph;
        let tiling = spec.fp8.clone().unwrap_or_default();
        let graph = fathom_compiler::precision::apply_precision(&graph, &bf16, &tiling).unwrap();
        let options = CompileOptions {
            lower: fathom_runtime::cuda::lower_options(),
            ..CompileOptions::default()
        };
        let program = compile(&graph, &options).unwrap().program;
        let calls = program
            .kernels
            .iter()
            .filter(|k| {
                matches!(
                    k.body,
                    KernelBody::Library(
                        Library::CausalAttention { .. } | Library::CausalAttentionGrad { .. }
                    )
                )
            })
            .count();
        let layers = spec.layers + spec.mtp_depth;
        assert_eq!(calls, 2 * layers);
        let mut cpu =
            tiny_trainer(spec, Backend::Cpu, 1, bf16, PipelineSettings::default()).unwrap();
        assert!(cpu.step().unwrap().loss.is_finite());
    }

    /// Check 2's pipeline is one the trainer takes, and trains on the CPU, its reference
    /// (`runtime/tests/pipeline.rs` checks that every schedule trains like one rank).
    #[test]
    fn the_dualpipe_comparison_trains_on_the_cpu() {
        let spec = tiny_spec(false).unwrap();
        let f32 = PrecisionPolicy::default();
        let mut trainer = tiny_trainer(spec, Backend::Cpu, 2, f32, dualpipe()).unwrap();
        let (first, second) = (trainer.step().unwrap(), trainer.step().unwrap());
        assert!(first.loss.is_finite() && second.loss.is_finite());
        assert_ne!(first.loss, second.loss, "the step changed the weights");
    }

    #[test]
    fn compare_accepts_rounding_and_rejects_wrong_values() {
        let cpu = [1.0f32, -2.0, 100.0, f32::NEG_INFINITY, f32::NAN];
        assert_eq!(compare(&cpu, &cpu), (0.0, None));
        let rounded = [1.00001f32, -2.0, 100.0, f32::NEG_INFINITY, f32::NAN];
        assert!(compare(&rounded, &cpu).1.is_none());
        let wrong = [1.0f32, 2.0, 100.0, f32::NEG_INFINITY, f32::NAN];
        assert_eq!(compare(&wrong, &cpu).1, Some((1, 2.0, -2.0)));
        let nan = [f32::NAN, -2.0, 100.0, f32::NEG_INFINITY, f32::NAN];
        assert_eq!(compare(&nan, &cpu).1.map(|b| b.0), Some(0));
        let infinite = [1.0f32, -2.0, 100.0, f32::INFINITY, f32::NAN];
        assert_eq!(compare(&infinite, &cpu).1.map(|b| b.0), Some(3));
    }
}
