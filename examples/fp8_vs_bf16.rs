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
//! relative gap to `bf16`, then, at the bf16 run's final weights, how far each precision's loss
//! and gradients are from fp32's (the arithmetic error alone, free of the run-to-run drift that
//! dominates loss curves at this scale); writes the curves to `docs/fp8_vs_bf16.csv` and plots
//! them into `docs/fp8_vs_bf16.png` (`--from-csv` re-plots without training). Hopper's limited-precision accumulation ("no promotion") is not part
//! of this run: the GEMMs here accumulate exactly; `examples/fp8_accumulation.rs` measures that
//! effect on single GEMMs.
//!
//! ```text
//! cargo run --release --example fp8_vs_bf16            # about 5 minutes on 2 cores
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use fathom_compiler::model::{LossWeights, parameter_graph};
use fathom_compiler::precision::{Fp8Scaling, Precision, PrecisionPolicy, apply_precision};
use fathom_compiler::spec::{Fp8Spec, MlaSpec, ModelSpec, MoeSpec, RopeSpec};
use fathom_compiler::training::training_graph;
use fathom_runtime::data::{Batches, TextDataset};
use fathom_runtime::exec::{Backend, Executable};
use fathom_runtime::init::init_parameters;
use fathom_runtime::interp::Feeds;
use fathom_runtime::optim::{AdamWConfig, LrSchedule};
use fathom_runtime::train::{TrainSettings, Trainer};
use fathom_runtime::weights::Weights;
use plotters::prelude::*;

#[derive(Debug, Parser)]
struct Args {
    /// Optimizer steps of each run.
    #[arg(long, default_value_t = 600)]
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
    /// Peak learning rate (warm-up over the first 10 % of steps, held for a third, then a
    /// linear decay to a tenth of it).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also train in fp32, to see how far two precisions drift apart without FP8.
    #[arg(long)]
    with_fp32: bool,
    /// Do not train: read the curves of an earlier run from this CSV, print and plot them.
    #[arg(long)]
    from_csv: Option<PathBuf>,
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
            peak_lr: args.lr,
            warmup_steps: warmup,
            hold_steps: hold,
            decay_steps: args.steps.saturating_sub(warmup + hold),
            final_lr: args.lr / 10.0,
        },
        clip_norm: Some(1.0),
        losses: LossWeights::deepseek_v3(),
        bias_update_speed: 0.001,
        backend: Backend::Cpu,
        precision,
        pipeline: Default::default(),
    }
}

struct Run {
    label: String,
    losses: Vec<f64>,
    seconds: f64,
    /// The weights at the end (not kept for curves read from a CSV).
    weights: Option<Weights>,
}

impl Run {
    /// Mean next-token loss over the last 10 % of steps (at least one).
    fn final_loss(&self) -> f64 {
        let tail = (self.losses.len() / 10).max(1);
        self.losses[self.losses.len() - tail..].iter().sum::<f64>() / tail as f64
    }
}

fn train(args: &Args, text: &Path, label: &str, policy: PrecisionPolicy) -> anyhow::Result<Run> {
    let spec = spec();
    let weights = Weights::from(init_parameters(
        &parameter_graph(&spec)?,
        spec.initializer_range,
        args.seed,
    ));
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
        label: label.to_owned(),
        losses,
        seconds: started.elapsed().as_secs_f64(),
        weights: Some(trainer.weights().clone()),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = args
        .text
        .clone()
        .unwrap_or_else(|| root.join("compiler/src"));
    let runs = match &args.from_csv {
        Some(path) => read_csv(path)?,
        None => train_all(&args, &text)?,
    };
    let steps = runs[0].losses.len();

    let baseline = runs[0].final_loss();
    let fp32 = runs.iter().find(|r| r.label == "fp32").map(Run::final_loss);
    println!(
        "{steps} steps; final loss = mean over the last {} steps",
        (steps / 10).max(1)
    );
    for run in &runs {
        let loss = run.final_loss();
        let to_fp32 = fp32.map_or(String::new(), |f| {
            format!("  gap to fp32 {:+.3} %", 100.0 * (loss - f) / f)
        });
        let time = if run.weights.is_some() {
            format!("  ({:.0} s)", run.seconds)
        } else {
            String::new()
        };
        println!(
            "{:>15}: final loss {loss:.4}  gap to bf16 {:+.3} %{to_fp32}{time}",
            run.label,
            100.0 * (loss - baseline) / baseline,
        );
    }

    if let Some(weights) = &runs[0].weights {
        gradient_errors(&args, &text, weights)?;
    }

    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let csv = args.out.with_extension("csv");
    if args.from_csv.is_none() {
        let mut table = String::from("step");
        for run in &runs {
            write!(table, ",{}", run.label.replace(' ', "_"))?;
        }
        for step in 0..steps {
            write!(table, "\n{}", step + 1)?;
            for run in &runs {
                write!(table, ",{:.6}", run.losses[step])?;
            }
        }
        table.push('\n');
        std::fs::write(&csv, table).with_context(|| format!("writing {}", csv.display()))?;
    }
    plot(&args.out, &runs).map_err(|e| anyhow::anyhow!("plotting {}: {e}", args.out.display()))?;
    if args.from_csv.is_none() {
        println!("wrote {} and {}", args.out.display(), csv.display());
    } else {
        println!("wrote {}", args.out.display());
    }
    Ok(())
}

/// How far each precision's loss and gradients are from fp32's at the same weights (the bf16
/// run's final ones) on the first four batches: the arithmetic error alone, without the drift
/// of separate training runs that dominates the curves at this scale.
fn gradient_errors(args: &Args, text: &Path, weights: &Weights) -> anyhow::Result<()> {
    let spec = spec();
    let train = training_graph(&spec, args.batch, args.seq, LossWeights::deepseek_v3())?;
    let tiling = spec.fp8.clone().unwrap_or_default();
    let mut data = TextDataset::open(text, args.batch, args.seq)?;
    let batches = (0..4)
        .map(|_| data.next_batch())
        .collect::<Result<Vec<_>, _>>()?;
    let fp8 = PrecisionPolicy::uniform(Precision::Fp8);
    let policies = [
        ("fp32", PrecisionPolicy::default()),
        ("bf16", PrecisionPolicy::uniform(Precision::Bf16)),
        ("fp8", fp8.clone()),
        (
            "fp8 per-tensor",
            PrecisionPolicy {
                scaling: Fp8Scaling::PerTensor,
                ..fp8
            },
        ),
    ];
    let mut outputs = Vec::new();
    for (_, policy) in &policies {
        let graph = apply_precision(&train.graph, policy, &tiling)?;
        let executable = Executable::new(graph, Backend::Cpu)?;
        let mut per_batch = Vec::new();
        for ids in &batches {
            let inputs = HashMap::from([("input_ids", ids.clone())]);
            per_batch.push(executable.run(&Feeds::new(&inputs, weights))?);
        }
        outputs.push(per_batch);
    }
    println!("at the bf16 run's final weights, against fp32 (4 batches):");
    let floats =
        |t: &fathom_runtime::HostTensor| t.as_f32().map(<[f32]>::to_vec).unwrap_or_default();
    for ((label, _), runs) in policies.iter().zip(&outputs).skip(1) {
        let (mut diff, mut norm, mut loss_err) = (0.0f64, 0.0f64, 0.0f64);
        for (got, want) in runs.iter().zip(&outputs[0]) {
            let loss = |o: &std::collections::BTreeMap<String, _>| {
                f64::from(floats(&o["loss.next_token"])[0])
            };
            loss_err += (loss(got) - loss(want)).abs() / loss(want) / batches.len() as f64;
            for (name, w) in want.iter().filter(|(n, _)| n.starts_with("grad.")) {
                for (g, w) in floats(&got[name]).iter().zip(floats(w)) {
                    diff += f64::from(g - w).powi(2);
                    norm += f64::from(w).powi(2);
                }
            }
        }
        println!(
            "{label:>15}: next-token loss off by {:.3} % (mean), gradients by {:.2} % (relative L2)",
            100.0 * loss_err,
            100.0 * (diff / norm).sqrt()
        );
    }
    Ok(())
}

fn train_all(args: &Args, text: &Path) -> anyhow::Result<Vec<Run>> {
    let fp8 = PrecisionPolicy::uniform(Precision::Fp8);
    let per_tensor = PrecisionPolicy {
        scaling: Fp8Scaling::PerTensor,
        ..fp8.clone()
    };
    let mut runs = vec![
        train(
            args,
            text,
            "bf16",
            PrecisionPolicy::uniform(Precision::Bf16),
        )?,
        train(args, text, "fp8", fp8)?,
        train(args, text, "fp8 per-tensor", per_tensor)?,
    ];
    if args.with_fp32 {
        runs.push(train(args, text, "fp32", PrecisionPolicy::default())?);
    }
    Ok(runs)
}

/// The curves this program wrote: `step,<label>,...` then one row per step (`_` for spaces).
fn read_csv(path: &Path) -> anyhow::Result<Vec<Run>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header = lines.next().context("an empty CSV")?;
    let mut runs: Vec<Run> = header
        .split(',')
        .skip(1)
        .map(|label| Run {
            label: label.replace('_', " "),
            losses: Vec::new(),
            seconds: 0.0,
            weights: None,
        })
        .collect();
    anyhow::ensure!(
        runs.first().is_some_and(|r| r.label == "bf16"),
        "{}: the first curve must be bf16",
        path.display()
    );
    for (i, line) in lines.enumerate() {
        let values: Vec<&str> = line.split(',').skip(1).collect();
        anyhow::ensure!(
            values.len() == runs.len(),
            "{} line {}: {} values",
            path.display(),
            i + 2,
            values.len()
        );
        for (run, value) in runs.iter_mut().zip(values) {
            run.losses.push(
                value
                    .parse()
                    .with_context(|| format!("{} line {}", path.display(), i + 2))?,
            );
        }
    }
    anyhow::ensure!(!runs[0].losses.is_empty(), "{}: no steps", path.display());
    Ok(runs)
}

/// The mean over a window of `2 · half + 1` steps centred on each step (narrower at the ends),
/// so the smoothed curve does not lag the raw one.
fn moving_average(values: &[f64], half: usize) -> Vec<f64> {
    (0..values.len())
        .map(|i| {
            let window = &values[i.saturating_sub(half)..(i + half + 1).min(values.len())];
            window.iter().sum::<f64>() / window.len() as f64
        })
        .collect()
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

/// Steps on each side of a step in the plotted averages.
const SMOOTHING: usize = 10;

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
        chart.caption(
            "next-token loss (bf16 per step, faint; all runs averaged over 21 steps), same data and weights",
            ("sans-serif", 20),
        );
    }
    let mut chart = chart.build_cartesian_2d(1..steps, (lo * 0.97)..(hi * 1.02))?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("step").y_desc("loss");
    if !labels {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    // The batches are the same for every run, so one run's per-step losses show the noise.
    let raw = runs[0].losses.iter().enumerate().map(|(i, &l)| (i + 1, l));
    chart.draw_series(LineSeries::new(raw, colors[0].mix(0.2)))?;
    for (run, color) in runs.iter().zip(colors) {
        let smooth = moving_average(&run.losses, SMOOTHING)
            .into_iter()
            .enumerate();
        let series = chart.draw_series(LineSeries::new(
            smooth.map(|(i, l)| (i + 1, l)),
            color.stroke_width(2),
        ))?;
        if labels {
            series.label(run.label.as_str()).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }

    // Relative gap per step, smoothed (the batches are the same across runs, so most of the
    // per-batch noise cancels in the difference).
    let gaps: Vec<Vec<f64>> = runs[1..]
        .iter()
        .map(|run| {
            let gap: Vec<f64> = run
                .losses
                .iter()
                .zip(&runs[0].losses)
                .map(|(l, b)| 100.0 * (l - b) / b)
                .collect();
            moving_average(&gap, SMOOTHING)
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
        chart.caption(
            "gap to bf16 (%, averaged over 21 steps)",
            ("sans-serif", 18),
        );
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
