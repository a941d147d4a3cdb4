//! FP8 against BF16 training on the CPU (SPEC §2: DeepSeek-V3 keeps its FP8 loss within 0.25 %
//! of the BF16 baseline).
//!
//! One DeepSeek-V3-style model with hidden size 256 (so DeepSeek-V3's 1×128 activation tiles and
//! 128×128 weight blocks are real: two per row), the same initial weights and the same text
//! batches, trained three times with the precision pass (`fathom_compiler::precision`) putting
//! every Linear GEMM — forward, input gradient, weight gradient, dense and grouped — in:
//! - `bf16`: operands rounded to bf16, f32 accumulation (the baseline);
//! - `fp8`: operands quantized to E4M3 with fine-grained scales (1×128, 128×128, 128×1 for the
//!   weight gradients' token axis), exact accumulation;
//! - `fp8 per-tensor`: the ablation, one scale per operand matrix;
//! - `fp32` (with `--with-fp32`): how far two runs drift apart without FP8, for scale.
//!
//! Prints each run's final loss (mean next-token loss over the last 10 % of steps) and its
//! relative gap to `bf16`, writes the curves to `docs/fp8_vs_bf16.csv` and plots them into
//! `docs/fp8_vs_bf16.png`. Hopper's limited-precision accumulation ("no promotion") is not part
//! of this run: the GEMMs here accumulate exactly; `examples/fp8_accumulation.rs` measures that
//! effect on single GEMMs.
//!
//! ```text
//! cargo run --release --example fp8_vs_bf16 -- --steps 120
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use fathom_compiler::model::{LossWeights, parameter_graph};
use fathom_compiler::precision::{Fp8Scaling, Precision, PrecisionPolicy};
use fathom_compiler::spec::{Fp8Spec, MlaSpec, ModelSpec, MoeSpec, RopeSpec};
use fathom_runtime::data::TextDataset;
use fathom_runtime::exec::Backend;
use fathom_runtime::init::init_parameters;
use fathom_runtime::optim::{AdamWConfig, LrSchedule};
use fathom_runtime::train::{TrainSettings, Trainer};
use fathom_runtime::weights::Weights;
use plotters::prelude::*;

#[derive(Debug, Parser)]
struct Args {
    /// Optimizer steps of each run.
    #[arg(long, default_value_t = 120)]
    steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Byte tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Text to train on (a file or a directory); the compiler's own sources by default.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Where the plot goes (the CSV goes beside it).
    #[arg(long, default_value = "docs/fp8_vs_bf16.png")]
    out: PathBuf,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also train in fp32, to see how far two precisions drift apart without FP8.
    #[arg(long)]
    with_fp32: bool,
}

/// Hidden 256, two blocks (one dense, one MoE with 4 routed experts and a shared one), MLA with
/// 4 heads; every GEMM's K is a multiple of 128. About 1.5M parameters.
fn spec() -> ModelSpec {
    ModelSpec {
        vocab_size: 256,
        hidden_size: 256,
        layers: 2,
        dense_layers: 1,
        intermediate_size: 512,
        norm_eps: 1e-6,
        max_positions: 256,
        tie_embeddings: false,
        initializer_range: 0.02,
        attention: MlaSpec {
            heads: 4,
            q_lora_rank: Some(128),
            kv_lora_rank: 128,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 32,
            v_head_dim: 32,
        },
        rope: RopeSpec::default(),
        moe: Some(MoeSpec {
            routed_experts: 4,
            shared_experts: 1,
            experts_per_token: 2,
            groups: 1,
            groups_per_token: 1,
            intermediate_size: 128,
            routed_scaling_factor: 1.0,
            normalize_gates: true,
        }),
        mtp_depth: 0,
        fp8: Some(Fp8Spec::default()),
    }
}

fn settings(args: &Args, precision: PrecisionPolicy) -> TrainSettings {
    let warmup = (args.steps / 10).max(1);
    let hold = args.steps / 3;
    TrainSettings {
        batch: args.batch,
        seq: args.seq,
        micro_batches: 1,
        steps: args.steps,
        optimizer: AdamWConfig::default(),
        schedule: LrSchedule {
            peak_lr: 3e-3,
            warmup_steps: warmup,
            hold_steps: hold,
            decay_steps: args.steps.saturating_sub(warmup + hold),
            final_lr: 3e-4,
        },
        clip_norm: Some(1.0),
        losses: LossWeights::deepseek_v3(),
        bias_update_speed: 0.001,
        backend: Backend::Cpu,
        precision,
    }
}

struct Run {
    label: &'static str,
    losses: Vec<f64>,
    seconds: f64,
}

impl Run {
    /// Mean next-token loss over the last 10 % of steps (at least one).
    fn final_loss(&self) -> f64 {
        let tail = (self.losses.len() / 10).max(1);
        self.losses[self.losses.len() - tail..].iter().sum::<f64>() / tail as f64
    }
}

fn train(args: &Args, text: &Path, label: &'static str, policy: PrecisionPolicy) -> anyhow::Result<Run> {
    let spec = spec();
    let weights = Weights::from(init_parameters(&parameter_graph(&spec)?, spec.initializer_range, args.seed));
    let data = TextDataset::open(text, args.batch, args.seq)?;
    let mut trainer = Trainer::new(spec, settings(args, policy), weights, Box::new(data))?;
    let started = Instant::now();
    let mut losses = Vec::new();
    while !trainer.is_done() {
        let report = trainer.step()?;
        losses.push(report.loss_next_token);
        if report.step % 10 == 0 || report.step == args.steps {
            eprintln!(
                "{label:>15} step {:>4}/{}  loss {:.4}  {:.0} tok/s",
                report.step,
                args.steps,
                report.loss_next_token,
                report.tokens_per_second()
            );
        }
    }
    Ok(Run {
        label,
        losses,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = args.text.clone().unwrap_or_else(|| root.join("compiler/src"));
    let fp8 = PrecisionPolicy::uniform(Precision::Fp8);
    let per_tensor = PrecisionPolicy {
        scaling: Fp8Scaling::PerTensor,
        ..fp8.clone()
    };
    let mut runs = vec![
        train(&args, &text, "bf16", PrecisionPolicy::uniform(Precision::Bf16))?,
        train(&args, &text, "fp8", fp8)?,
        train(&args, &text, "fp8 per-tensor", per_tensor)?,
    ];
    if args.with_fp32 {
        runs.push(train(&args, &text, "fp32", PrecisionPolicy::default())?);
    }

    let baseline = runs[0].final_loss();
    println!(
        "{} steps of {}×{} byte tokens; final loss = mean over the last {} steps",
        args.steps,
        args.batch,
        args.seq,
        (args.steps / 10).max(1)
    );
    for run in &runs {
        let loss = run.final_loss();
        println!(
            "{:>15}: final loss {loss:.4}  gap to bf16 {:+.3} %  ({:.0} s)",
            run.label,
            100.0 * (loss - baseline) / baseline,
            run.seconds
        );
    }

    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let csv = args.out.with_extension("csv");
    let mut table = String::from("step");
    runs.iter().for_each(|r| write!(table, ",{}", r.label.replace(' ', "_")).expect("a String"));
    for step in 0..args.steps as usize {
        write!(table, "\n{}", step + 1)?;
        runs.iter().for_each(|r| write!(table, ",{:.6}", r.losses[step]).expect("a String"));
    }
    table.push('\n');
    std::fs::write(&csv, table).with_context(|| format!("writing {}", csv.display()))?;
    plot(&args.out, &runs).map_err(|e| anyhow::anyhow!("plotting {}: {e}", args.out.display()))?;
    println!("wrote {} and {}", args.out.display(), csv.display());
    Ok(())
}

/// Registers a system sans-serif font for the labels (plotters draws no text without one);
/// `$FATHOM_FONT` names a .ttf to use instead. Returns whether one was found.
fn register_font() -> bool {
    let candidates = std::env::var("FATHOM_FONT").into_iter().chain(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
        ]
        .map(String::from),
    );
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // plotters keeps fonts for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    eprintln!("no font found (set FATHOM_FONT to a .ttf): the plot has no labels");
    false
}

/// Loss curves (top) and each other run's relative gap to bf16, smoothed (bottom).
fn plot(out: &Path, runs: &[Run]) -> Result<(), Box<dyn std::error::Error>> {
    let labels = register_font();
    let root = BitMapBackend::new(out, (1100, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(500);
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(127, 127, 127),
    ];
    let steps = runs[0].losses.len();
    let all = runs.iter().flat_map(|r| r.losses.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));

    let mut chart = ChartBuilder::on(&top);
    chart.margin(15).x_label_area_size(35).y_label_area_size(55);
    if labels {
        chart.caption("next-token loss, same data and initial weights", ("sans-serif", 22));
    }
    let mut chart = chart.build_cartesian_2d(1..steps, (lo * 0.97)..(hi * 1.02).min(lo * 3.0))?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("step").y_desc("loss");
    if !labels {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    for (run, color) in runs.iter().zip(colors) {
        let points = run.losses.iter().enumerate().map(|(i, &l)| (i + 1, l));
        let series = chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        if labels {
            series
                .label(run.label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }

    // Relative gap per step, smoothed with an exponential moving average (the batches are the
    // same across runs, so most of the per-step noise cancels in the difference).
    let gaps: Vec<Vec<f64>> = runs[1..]
        .iter()
        .map(|run| {
            let mut ema = 0.0;
            run.losses
                .iter()
                .zip(&runs[0].losses)
                .enumerate()
                .map(|(i, (l, b))| {
                    let gap = 100.0 * (l - b) / b;
                    ema = if i == 0 { gap } else { 0.9 * ema + 0.1 * gap };
                    ema
                })
                .collect()
        })
        .collect();
    let (glo, ghi) = gaps
        .iter()
        .flatten()
        .fold((0.0f64, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let pad = 0.1 * (ghi - glo).max(0.1);
    let mut chart = ChartBuilder::on(&bottom);
    chart.margin(15).x_label_area_size(35).y_label_area_size(55);
    if labels {
        chart.caption("gap to bf16 (%, moving average)", ("sans-serif", 18));
    }
    let mut chart = chart.build_cartesian_2d(1..steps, (glo - pad)..(ghi + pad))?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("step").y_desc("%");
    if !labels {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    chart.draw_series(LineSeries::new([(1, 0.0), (steps, 0.0)], BLACK.mix(0.5)))?;
    for (gap, color) in gaps.iter().zip(&colors[1..]) {
        let points = gap.iter().enumerate().map(|(i, &g)| (i + 1, g));
        chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
    }
    root.present()?;
    Ok(())
}
