//! `fathom bench`: training-step and forward throughput of the compiled CPU path (or, with
//! `--backend cuda`, of the GPU's), with the FLOPs the compiler counts and the machine's GEMM
//! peak, for side-by-side comparisons (scripts/bench/compare_pytorch.py runs PyTorch in the same
//! run and prints the ratios; scripts/gpu-check.sh runs f32 and FP8 on the GPU).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::graph::Accumulation;
use fathom_compiler::model::{ForwardOptions, LossWeights, forward_graph, parameter_graph};
use fathom_compiler::precision::{Precision, PrecisionPolicy, accumulation_named, apply_precision};
use fathom_compiler::spec::hf::spec_from_config_json;
use fathom_compiler::training::training_graph;
use fathom_runtime::HostTensor;
use fathom_runtime::data::{Batches, SyntheticBatches, SyntheticKind, SyntheticTask};
use fathom_runtime::exec::{Backend, Executable};
use fathom_runtime::init::init_parameters;
use fathom_runtime::interp::Feeds;
use fathom_runtime::optim::{AdamWConfig, LrSchedule, MomentPrecision};
use fathom_runtime::train::{TrainSettings, Trainer};
use fathom_runtime::weights::Weights;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face DeepSeek-V3 config.json (benches/configs/small.json, medium.json).
    #[arg(long)]
    config: PathBuf,
    /// A model directory whose weights to use instead of random ones (the comparison script
    /// passes the directory it gave PyTorch).
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed training steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The Linear GEMMs' arithmetic in the training step and the forward pass (fp32, bf16 or
    /// fp8; see `fathom train --precision`).
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// How the FP8 GEMMs sum (see `fathom train --accumulation`); on the GPU `hopper` runs them
    /// as real FP8 GEMMs.
    #[arg(long, value_parser = accumulation_named, default_value = "exact")]
    accumulation: Accumulation,
    /// `cpu` (the compiled CPU path) or `cuda` (the GPU; the CPU, said once, where there is none).
    #[arg(long, value_parser = backend_named, default_value = "cpu")]
    backend: Backend,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("configuring the thread pool")?;
    }
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let spec = spec_from_config_json(&text).with_context(|| args.config.display().to_string())?;
    let weights = match &args.weights {
        Some(dir) => fathom_runtime::pretrained::Pretrained::load(dir)?.weights,
        None => Weights::from(init_parameters(
            &parameter_graph(&spec)?,
            spec.initializer_range,
            0,
        )),
    };
    let (batch, seq) = (args.batch, args.seq);
    let tokens = (batch * seq) as f64;

    let policy = PrecisionPolicy {
        accumulation: args.accumulation,
        ..PrecisionPolicy::uniform(args.precision)
    };
    // What PyTorch's baseline does: next-token loss, backward, AdamW with f32 moments.
    let started = Instant::now();
    let train = training_graph(&spec, batch, seq, LossWeights::next_token_only())?.without_logits();
    let options = CompileOptions {
        lower: fathom_runtime::cpu::lower_options(),
        ..CompileOptions::from_env()
    };
    let compiled = compile(&train.graph, &options)?;
    let flops_per_step = compiled.program.matmul_flops();
    let temporaries = compiled.plan.peak_bytes();
    let settings = TrainSettings {
        batch,
        seq,
        micro_batches: 1,
        steps: args.steps + 1,
        optimizer: AdamWConfig {
            moments: MomentPrecision::F32,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        schedule: LrSchedule {
            peak_lr: 1e-4,
            warmup_steps: 0,
            hold_steps: u64::MAX / 4,
            decay_steps: 0,
            final_lr: 1e-4,
        },
        clip_norm: None,
        losses: LossWeights::next_token_only(),
        bias_update_speed: 0.0,
        backend: args.backend,
        precision: policy.clone(),
        pipeline: Default::default(),
    };
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 0)?;
    let data = SyntheticBatches::new(task, batch, seq)?;
    let mut trainer = Trainer::new(spec.clone(), settings, weights.clone(), Box::new(data))?;
    let compile_seconds = started.elapsed().as_secs_f64();
    trainer.step()?; // warm-up
    let t = Instant::now();
    for _ in 0..args.steps {
        trainer.step()?;
    }
    let train_seconds = t.elapsed().as_secs_f64() / args.steps as f64;

    let forward = forward_graph(
        &spec,
        ForwardOptions {
            batch,
            seq,
            with_mtp: false,
        },
    )?;
    // The forward pass in the same arithmetic as the step (its Linear GEMMs' operands rounded
    // to bf16 under `--precision bf16`, as torch's autocast forward is compared with it).
    let forward = apply_precision(&forward, &policy, &spec.fp8.clone().unwrap_or_default())?;
    let executable = Executable::new(forward, args.backend)?;
    let mut data = SyntheticBatches::new(
        SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 1)?,
        batch,
        seq,
    )?;
    let ids: HostTensor = data.next_batch()?;
    let inputs = std::collections::HashMap::from([("input_ids", ids)]);
    executable.run(&Feeds::new(&inputs, &weights))?; // warm-up
    let t = Instant::now();
    for _ in 0..args.steps {
        executable.run(&Feeds::new(&inputs, &weights))?;
    }
    let forward_seconds = t.elapsed().as_secs_f64() / args.steps as f64;

    // The CPU's GEMM figures, beside a CPU run.
    let on_cpu = executable.backend() == Backend::Cpu;
    let peak = on_cpu.then(gemm_peak_gflops);
    let bf16_gemm =
        on_cpu.then(|| bf16_gemm_report(batch * seq, spec.hidden_size, spec.intermediate_size));
    let report = json!({
        "config": args.config.display().to_string(),
        "backend": format!("{:?}", executable.backend()).to_lowercase(),
        "precision": args.precision.to_string(),
        "accumulation": args.accumulation.to_string(),
        "threads": rayon::current_num_threads(),
        "batch": batch,
        "seq": seq,
        "train_tokens_per_second": tokens / train_seconds,
        "forward_tokens_per_second": tokens / forward_seconds,
        "train_step_seconds": train_seconds,
        "matmul_flops_per_token": flops_per_step as f64 / tokens,
        "train_gflops": flops_per_step as f64 / train_seconds / 1e9,
        "f32_gemm_peak_gflops": peak,
        "temporaries_bytes": temporaries,
        "compile_seconds": compile_seconds,
        "bf16_gemm": bf16_gemm,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// A backend by name: `cpu` or `cuda` (the interpreter is not a thing to time).
fn backend_named(name: &str) -> Result<Backend, String> {
    match name {
        "cpu" => Ok(Backend::Cpu),
        "cuda" => Ok(Backend::Cuda),
        other => Err(format!("unknown backend `{other}`; expected cpu or cuda")),
    }
}

/// Whether bf16 Linear GEMMs run on the bf16 kernel here (`fathom_runtime::cpu::bf16_gemm`),
/// and both GEMMs' GFLOP/s side by side at the dense MLP's forward shapes (gate/up: tokens ×
/// intermediate × hidden; down: tokens × hidden × intermediate).
fn bf16_gemm_report(tokens: usize, hidden: usize, intermediate: usize) -> serde_json::Value {
    let choice = fathom_runtime::cpu::bf16_gemm();
    let shapes: Vec<_> = [
        (tokens, intermediate, hidden),
        (tokens, hidden, intermediate),
    ]
    .into_iter()
    .filter_map(|shape| {
        let (f32_rate, bf16_rate) = fathom_runtime::cpu::compare_with_f32(shape)?;
        Some(json!({
            "m_n_k": [shape.0, shape.1, shape.2],
            "f32_gflops": f32_rate,
            "bf16_gflops": bf16_rate,
            "ratio": bf16_rate / f32_rate,
        }))
    })
    .collect();
    json!({
        "supported": choice.supported,
        "enabled": choice.enabled,
        "vdpbf16ps_over_fma_flop_ratio": choice.flop_ratio,
        "shapes": shapes,
    })
}

/// GFLOP/s of a 2048² f32 matmul through the same GEMM the backend uses (best of 3).
fn gemm_peak_gflops() -> f64 {
    let n = 2048;
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: three n×n row-major matrices, each exactly n·n long.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}
