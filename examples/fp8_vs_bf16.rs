//! FP8 against BF16 training on the CPU (SPEC §2: DeepSeek-V3 keeps its FP8 loss within 0.25 %
//! of the BF16 baseline), with the ablations that show why the recipe is what it is.
//!
//! One DeepSeek-V3-style model with hidden size 256 (so DeepSeek-V3's 1×128 activation tiles and
//! 128×128 weight blocks are real: two per row), the same initial weights and the same batches,
//! trained with the precision pass (`fathom_compiler::precision`) putting every Linear GEMM —
//! forward, input gradient, weight gradient, dense and grouped — in:
//! - `bf16`: operands rounded to bf16, f32 accumulation (the baseline);
//! - `fp8`: DeepSeek-V3's recipe: operands quantized to E4M3 with fine-grained scales (1×128,
//!   128×128, 128×1 along the tokens for the weight gradients, from the activation saved in
//!   FP8), products summed in Hopper's 14-bit accumulator and promoted to FP32 every 128;
//! - `fp8 per-tensor`: the scaling ablation, one scale per operand matrix;
//! - `fp8 no promotion`: the accumulation ablation, all of K in the 14-bit accumulator;
//! - `fp32` (with `--with-fp32`): how far two runs drift apart without FP8, for scale.
//!
//! The batches are random windows of the compiler's own sources (a seeded sample, the same for
//! every run of a seed); every tenth window is held out, and the loss that decides is the mean
//! next-token loss over the held-out windows at the end of training (the same windows for every
//! run, in the run's own precision), so neither the order of the data nor the noise of one
//! batch's loss shows in it. Each `--seeds` value is a separate initialisation and sample (bf16
//! and fp8 on every seed, the ablations on the first); the fp8 gap is reported per seed and as
//! mean ± standard error. Then, at the bf16 run's final
//! weights, how far each precision's loss and gradients are from fp32's (the arithmetic error
//! alone, free of the drift between separate runs). Writes the held-out curves of the first
//! seed to `docs/fp8_vs_bf16.csv` and plots them into `docs/fp8_vs_bf16.png` (`--from-csv`
//! re-plots without training).
//!
//! ```text
//! cargo run --release --example fp8_vs_bf16 -- --seeds 0,1,2 --runs fp8,per-tensor,no-promotion,fp32
//!     # about 30 minutes on 2 cores
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use fathom_compiler::graph::Accumulation;
use fathom_compiler::model::{LossWeights, parameter_graph};
use fathom_compiler::precision::{Fp8Scaling, Precision, PrecisionPolicy, apply_precision};
use fathom_compiler::spec::{Fp8Spec, MlaSpec, ModelSpec, MoeSpec, RopeSpec};
use fathom_compiler::training::training_graph;
use fathom_runtime::HostTensor;
use fathom_runtime::data::{Batches, ByteTokenizer, DataError, DataPosition, TextDataset};
use fathom_runtime::exec::{Backend, Executable};
use fathom_runtime::init::init_parameters;
use fathom_runtime::interp::Feeds;
use fathom_runtime::optim::{AdamWConfig, LrSchedule};
use fathom_runtime::train::{TrainSettings, Trainer};
use fathom_runtime::weights::Weights;
use plotters::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Parser)]
struct Args {
    /// Optimizer steps of each run.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Byte tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Text to train on (a file or a directory); the compiler's own sources by default.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Held-out windows the final loss is measured on.
    #[arg(long, default_value_t = 128)]
    eval_windows: usize,
    /// Steps between two held-out measurements of the plotted curves.
    #[arg(long, default_value_t = 25)]
    eval_every: u64,
    /// Where the plot goes (the CSV goes beside it).
    #[arg(long, default_value = "docs/fp8_vs_bf16.png")]
    out: PathBuf,
    /// Peak learning rate (warm-up over the first 10 % of steps, held for a third, then a
    /// linear decay to a tenth of it).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Seeds of the initial weights and of the sample of windows: bf16 and fp8 run on each, the
    /// ablations on the first.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Which runs (bf16 always runs first): fp8, per-tensor, no-promotion, fp32.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fp8,per-tensor,no-promotion"
    )]
    runs: Vec<String>,
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

/// The precision policy of a run, by label.
fn policy(label: &str) -> anyhow::Result<PrecisionPolicy> {
    let recipe = PrecisionPolicy {
        accumulation: Accumulation::HOPPER,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    Ok(match label {
        "bf16" => PrecisionPolicy::uniform(Precision::Bf16),
        "fp32" => PrecisionPolicy::default(),
        "fp8" => recipe,
        "fp8 per-tensor" => PrecisionPolicy {
            scaling: Fp8Scaling::PerTensor,
            ..recipe
        },
        "fp8 no promotion" => PrecisionPolicy {
            accumulation: Accumulation::HOPPER_WITHOUT_PROMOTION,
            ..recipe
        },
        other => anyhow::bail!("unknown run `{other}`"),
    })
}

/// `--runs` names to labels, bf16 first.
fn labels(args: &Args) -> anyhow::Result<Vec<&'static str>> {
    let mut labels = vec!["bf16"];
    for run in &args.runs {
        labels.push(match run.as_str() {
            "fp8" => "fp8",
            "per-tensor" => "fp8 per-tensor",
            "no-promotion" => "fp8 no promotion",
            "fp32" => "fp32",
            other => anyhow::bail!(
                "unknown run `{other}`; expected fp8, per-tensor, no-promotion or fp32"
            ),
        });
    }
    Ok(labels)
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

/// The text as byte tokens, cut into windows of `seq`: every tenth window held out.
struct Corpus {
    train: Arc<Vec<Vec<i64>>>,
    held_out: Vec<Vec<i64>>,
}

impl Corpus {
    fn read(path: &Path, seq: usize) -> anyhow::Result<Corpus> {
        // The files a text dataset reads (sorted, hidden entries skipped), in its order.
        let files = TextDataset::open(path, 1, seq)?.files().to_vec();
        let mut text = String::new();
        for file in &files {
            // Sources only; anything that is not UTF-8 text is skipped.
            if let Ok(contents) = std::fs::read_to_string(file) {
                text.push_str(&contents);
            }
        }
        let tokens = ByteTokenizer.encode(&text);
        let (mut train, mut held_out) = (Vec::new(), Vec::new());
        for (i, window) in tokens.chunks_exact(seq).enumerate() {
            match i % 10 {
                9 => held_out.push(window.to_vec()),
                _ => train.push(window.to_vec()),
            }
        }
        anyhow::ensure!(
            !held_out.is_empty(),
            "{}: fewer than ten windows of {seq} tokens",
            path.display()
        );
        Ok(Corpus {
            train: Arc::new(train),
            held_out,
        })
    }
}

/// Batches of training windows drawn at random (with replacement): batch `i` of a seed is a
/// function of the seed and `i` alone, so every run of a seed sees the same batches.
struct RandomWindows {
    windows: Arc<Vec<Vec<i64>>>,
    batch: usize,
    seed: u64,
    next: u64,
}

impl Batches for RandomWindows {
    fn next_batch(&mut self) -> Result<HostTensor, DataError> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.next);
        self.next += 1;
        let seq = self.windows[0].len();
        let ids = (0..self.batch)
            .flat_map(|_| {
                self.windows[rng.random_range(0..self.windows.len())]
                    .iter()
                    .copied()
            })
            .collect();
        Ok(HostTensor::i64([self.batch, seq], ids))
    }

    fn batch_shape(&self) -> (usize, usize) {
        (self.batch, self.windows[0].len())
    }

    fn position(&self) -> DataPosition {
        DataPosition::Synthetic {
            batch_index: self.next,
        }
    }

    fn seek(&mut self, position: &DataPosition) -> Result<(), DataError> {
        if let DataPosition::Synthetic { batch_index } = position {
            self.next = *batch_index;
        }
        Ok(())
    }
}

/// The mean next-token loss over the held-out windows, computed in `policy`'s precision.
struct HeldOut {
    executable: Executable,
    batches: Vec<HostTensor>,
}

impl HeldOut {
    /// Batches of 16 windows (the last one dropped if partial).
    const BATCH: usize = 16;

    fn new(args: &Args, corpus: &Corpus, policy: &PrecisionPolicy) -> anyhow::Result<HeldOut> {
        let spec = spec();
        let train = training_graph(&spec, Self::BATCH, args.seq, LossWeights::deepseek_v3())?;
        let tiling = spec.fp8.clone().unwrap_or_default();
        let graph = apply_precision(&train.graph, policy, &tiling)?;
        let windows = &corpus.held_out[..args.eval_windows.min(corpus.held_out.len())];
        let batches = windows
            .chunks_exact(Self::BATCH)
            .map(|rows| HostTensor::i64([Self::BATCH, args.seq], rows.concat()))
            .collect::<Vec<_>>();
        anyhow::ensure!(
            !batches.is_empty(),
            "fewer than {} held-out windows",
            Self::BATCH
        );
        Ok(HeldOut {
            executable: Executable::new(graph, Backend::Cpu)?,
            batches,
        })
    }

    fn loss(&self, weights: &Weights) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for ids in &self.batches {
            let inputs = HashMap::from([("input_ids", ids.clone())]);
            let outputs = self.executable.run(&Feeds::new(&inputs, weights))?;
            let loss = outputs["loss.next_token"].as_f32().context("an f32 loss")?[0];
            total += f64::from(loss);
        }
        Ok(total / self.batches.len() as f64)
    }
}

struct Run {
    label: String,
    /// `(step, held-out loss)`, from step 0 (the initial weights) to the last.
    curve: Vec<(u64, f64)>,
    seconds: f64,
    /// The weights at the end (not kept for curves read from a CSV).
    weights: Option<Weights>,
}

impl Run {
    fn final_loss(&self) -> f64 {
        self.curve.last().map_or(f64::NAN, |&(_, loss)| loss)
    }
}

fn train(args: &Args, corpus: &Corpus, seed: u64, label: &str) -> anyhow::Result<Run> {
    let spec = spec();
    let policy = policy(label)?;
    let held_out = HeldOut::new(args, corpus, &policy)?;
    let weights = Weights::from(init_parameters(
        &parameter_graph(&spec)?,
        spec.initializer_range,
        seed,
    ));
    let data = RandomWindows {
        windows: Arc::clone(&corpus.train),
        batch: args.batch,
        seed,
        next: 0,
    };
    let mut trainer = Trainer::new(spec, settings(args, policy), weights, Box::new(data))?;
    let started = Instant::now();
    let mut curve = vec![(0, held_out.loss(trainer.weights()?)?)];
    while !trainer.is_done() {
        let report = trainer.step()?;
        if report.step % args.eval_every == 0 || report.step == args.steps {
            let loss = held_out.loss(trainer.weights()?)?;
            curve.push((report.step, loss));
            eprintln!(
                "seed {seed} {label:>16} step {:>4}/{}  train {:.4}  held-out {loss:.4}  {:.0} tok/s",
                report.step,
                args.steps,
                report.loss_next_token,
                report.tokens_per_second()
            );
        }
    }
    Ok(Run {
        label: label.to_owned(),
        curve,
        seconds: started.elapsed().as_secs_f64(),
        weights: Some(trainer.weights()?.clone()),
    })
}
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = args
        .text
        .clone()
        .unwrap_or_else(|| root.join("compiler/src"));
    let labels = labels(&args)?;
    // Read once, for the training runs and the arithmetic error at the end.
    let corpus = match &args.from_csv {
        Some(_) => None,
        None => Some(Corpus::read(&text, args.seq)?),
    };
    let seeds: Vec<Vec<Run>> = match &corpus {
        None => vec![read_csv(args.from_csv.as_deref().context("a CSV")?)?],
        Some(corpus) => {
            println!(
                "{} training and {} held-out windows of {} tokens; final loss = mean next-token \
                 loss over {} held-out windows",
                corpus.train.len(),
                corpus.held_out.len(),
                args.seq,
                args.eval_windows.min(corpus.held_out.len()) / HeldOut::BATCH * HeldOut::BATCH
            );
            let mut seeds = Vec::new();
            for (i, &seed) in args.seeds.iter().enumerate() {
                // The ablations run on the first seed; the claim itself on every seed.
                let runs = labels
                    .iter()
                    .filter(|label| i == 0 || ["bf16", "fp8"].contains(label))
                    .map(|label| train(&args, corpus, seed, label))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                report_seed(seed, &runs);
                seeds.push(runs);
            }
            seeds
        }
    };
    if seeds.len() > 1 {
        report_gaps(&seeds);
    }
    if let (Some(corpus), Some(weights)) = (&corpus, &seeds[0][0].weights) {
        gradient_errors(&args, corpus, weights)?;
    }

    let runs = &seeds[0];
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let csv = args.out.with_extension("csv");
    if args.from_csv.is_none() {
        let mut table = String::from("step");
        for run in runs {
            write!(table, ",{}", run.label.replace(' ', "_"))?;
        }
        for (i, &(step, _)) in runs[0].curve.iter().enumerate() {
            write!(table, "\n{step}")?;
            for run in runs {
                write!(table, ",{:.6}", run.curve[i].1)?;
            }
        }
        table.push('\n');
        std::fs::write(&csv, table).with_context(|| format!("writing {}", csv.display()))?;
    }
    plot(&args.out, runs).map_err(|e| anyhow::anyhow!("plotting {}: {e}", args.out.display()))?;
    match args.from_csv {
        None => println!("wrote {} and {}", args.out.display(), csv.display()),
        Some(_) => println!("wrote {}", args.out.display()),
    }
    Ok(())
}

/// Relative gap of `loss` to `baseline`, in percent.
fn gap(loss: f64, baseline: f64) -> f64 {
    100.0 * (loss - baseline) / baseline
}

/// One seed's final held-out losses and their gaps to bf16.
fn report_seed(seed: u64, runs: &[Run]) {
    let baseline = runs[0].final_loss();
    println!("seed {seed}:");
    for run in runs {
        let loss = run.final_loss();
        println!(
            "{:>18}: held-out loss {loss:.4}  gap to bf16 {:+.3} %  ({:.0} s)",
            run.label,
            gap(loss, baseline),
            run.seconds
        );
    }
}

/// Each precision's gap to bf16 over the seeds that ran it: mean ± standard error of the mean.
fn report_gaps(seeds: &[Vec<Run>]) {
    for run in &seeds[0][1..] {
        let gaps: Vec<f64> = seeds
            .iter()
            .filter_map(|runs| {
                let other = runs.iter().find(|r| r.label == run.label)?;
                Some(gap(other.final_loss(), runs[0].final_loss()))
            })
            .collect();
        if gaps.len() < 2 {
            continue;
        }
        let n = gaps.len() as f64;
        let mean = gaps.iter().sum::<f64>() / n;
        let variance = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1.0);
        println!(
            "{:>18}: gap to bf16 over {} seeds {mean:+.3} % ± {:.3} % (standard error; per seed: {})",
            run.label,
            gaps.len(),
            (variance / n).sqrt(),
            gaps.iter()
                .map(|g| format!("{g:+.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// How far each precision's loss and gradients are from fp32's at the same weights (the bf16
/// run's final ones) on four held-out batches: the arithmetic error alone, without the drift
/// of separate training runs.
fn gradient_errors(args: &Args, corpus: &Corpus, weights: &Weights) -> anyhow::Result<()> {
    let labels = ["fp32", "bf16", "fp8", "fp8 per-tensor", "fp8 no promotion"];
    let mut outputs = Vec::new();
    for label in labels {
        let held_out = HeldOut::new(args, corpus, &policy(label)?)?;
        let mut per_batch = Vec::new();
        for ids in held_out.batches.iter().take(4) {
            let inputs = HashMap::from([("input_ids", ids.clone())]);
            per_batch.push(held_out.executable.run(&Feeds::new(&inputs, weights))?);
        }
        outputs.push(per_batch);
    }
    println!("at the bf16 run's final weights, against fp32 (4 held-out batches):");
    let floats = |t: &HostTensor| t.as_f32().map(<[f32]>::to_vec).unwrap_or_default();
    for (label, runs) in labels.iter().zip(&outputs).skip(1) {
        let (mut diff, mut norm, mut loss_err) = (0.0f64, 0.0f64, 0.0f64);
        for (got, want) in runs.iter().zip(&outputs[0]) {
            let loss = |o: &std::collections::BTreeMap<String, HostTensor>| {
                f64::from(floats(&o["loss.next_token"])[0])
            };
            loss_err += (loss(got) - loss(want)).abs() / loss(want) / runs.len() as f64;
            for (name, w) in want.iter().filter(|(n, _)| n.starts_with("grad.")) {
                for (g, w) in floats(&got[name]).iter().zip(floats(w)) {
                    diff += f64::from(g - w).powi(2);
                    norm += f64::from(w).powi(2);
                }
            }
        }
        println!(
            "{label:>18}: next-token loss off by {:.3} % (mean), gradients by {:.2} % (relative L2)",
            100.0 * loss_err,
            100.0 * (diff / norm).sqrt()
        );
    }
    Ok(())
}

/// The curves this program wrote: `step,<label>,...` then one row per measurement (`_` for
/// spaces).
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
            curve: Vec::new(),
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
        let at = || format!("{} line {}", path.display(), i + 2);
        let mut fields = line.split(',');
        let step: u64 = fields.next().unwrap_or("").parse().with_context(at)?;
        let values: Vec<&str> = fields.collect();
        anyhow::ensure!(
            values.len() == runs.len(),
            "{}: {} values",
            at(),
            values.len()
        );
        for (run, value) in runs.iter_mut().zip(values) {
            run.curve.push((step, value.parse().with_context(at)?));
        }
    }
    anyhow::ensure!(runs[0].curve.len() > 1, "{}: no steps", path.display());
    report_seed(0, &runs);
    Ok(runs)
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

/// Held-out loss curves (top) and each other run's relative gap to bf16 (bottom).
fn plot(out: &Path, runs: &[Run]) -> Result<(), Box<dyn std::error::Error>> {
    let labels = register_font();
    let root = BitMapBackend::new(out, (1100, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(500);
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(127, 127, 127),
    ];
    let last_step = runs[0].curve.last().map_or(1, |&(s, _)| s.max(1));
    // The initial loss (ln 256 and above) would flatten the rest: the plot starts at the first
    // measurement after step 0.
    let shown = |run: &Run| run.curve.iter().copied().skip(1).collect::<Vec<_>>();
    let all: Vec<f64> = runs
        .iter()
        .flat_map(|r| shown(r).into_iter().map(|p| p.1))
        .collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));

    let mut chart = ChartBuilder::on(&top);
    chart.margin(15).x_label_area_size(35).y_label_area_size(55);
    if labels {
        chart.caption(
            "held-out next-token loss, same initial weights and batches",
            ("sans-serif", 20),
        );
    }
    let mut chart = chart.build_cartesian_2d(0..last_step, (lo * 0.98)..(hi * 1.02))?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("step").y_desc("loss");
    if !labels {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    for (run, color) in runs.iter().zip(colors) {
        let series = chart.draw_series(LineSeries::new(shown(run), color.stroke_width(2)))?;
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

    let gaps: Vec<Vec<(u64, f64)>> = runs[1..]
        .iter()
        .map(|run| {
            shown(run)
                .iter()
                .zip(shown(&runs[0]))
                .map(|(&(step, l), (_, b))| (step, gap(l, b)))
                .collect()
        })
        .collect();
    let (glo, ghi) = gaps
        .iter()
        .flatten()
        .fold((0.0f64, 0.0f64), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));
    let pad = 0.1 * (ghi - glo).max(0.1);
    let mut chart = ChartBuilder::on(&bottom);
    chart.margin(15).x_label_area_size(35).y_label_area_size(55);
    if labels {
        chart.caption("held-out loss: gap to bf16 (%)", ("sans-serif", 18));
    }
    let mut chart = chart.build_cartesian_2d(0..last_step, (glo - pad)..(ghi + pad))?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("step").y_desc("%");
    if !labels {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    chart.draw_series(LineSeries::new(
        [(0, 0.0), (last_step, 0.0)],
        BLACK.mix(0.5),
    ))?;
    for (gap, color) in gaps.iter().zip(&colors[1..]) {
        chart.draw_series(LineSeries::new(gap.iter().copied(), color.stroke_width(2)))?;
    }
    root.present()?;
    Ok(())
}
