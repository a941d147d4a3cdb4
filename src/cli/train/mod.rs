//! `fathom train`: train a model on the CPU from a run file, with checkpoints that resume.

mod config;
mod progress;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use fathom_compiler::graph::Accumulation;
use fathom_compiler::pipeline::svg::timeline_svg;
use fathom_compiler::pipeline::{Method, simulate};
use fathom_compiler::precision::{Precision, PrecisionPolicy, accumulation_named};
use fathom_runtime::exec::Backend;
use fathom_runtime::parallel::{Comm, NcclComm, Rendezvous, TcpComm, local_rank_from_vars};
use fathom_runtime::train::{Checkpoint, TrainSettings, Trainer, latest_checkpoint};

use config::{DataSource, RunConfig};
use progress::Progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run file (TOML, or JSON by extension): [model], [data], [train], [checkpoint],
    /// metrics. See examples/train-tiny.toml.
    #[arg(long)]
    config: PathBuf,
    /// Override the number of optimizer steps (a resumed run may be extended this way).
    #[arg(long)]
    steps: Option<u64>,
    /// Override the sequences per micro-batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Override the tokens per sequence.
    #[arg(long)]
    seq: Option<usize>,
    /// Override the peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Train on this text file or directory instead of the run file's data.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Override the checkpoint directory (a run that finds a checkpoint there resumes it).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Override how often (in steps) a checkpoint is written.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Override the metrics file (one JSON line per step, appended).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Override the GEMM precision (fp32, bf16 or fp8): every eligible Linear GEMM in it; the
    /// run file's per-module overrides are dropped, its FP8 scaling is kept.
    #[arg(long)]
    precision: Option<Precision>,
    /// Override how FP8 GEMMs sum their products, emulated on the CPU: exact, hopper (Hopper's
    /// 14-bit tensor-core sums promoted to FP32 every 128 products, DeepSeek-V3's recipe) or
    /// hopper_without_promotion.
    #[arg(long, value_parser = accumulation_named)]
    accumulation: Option<Accumulation>,
    /// Override the micro-batches per optimizer step (gradient accumulation; the pipeline's
    /// micro-batches when --pp > 1).
    #[arg(long)]
    micro_batches: Option<usize>,
    /// Pipeline stages: the model's layers are split over this many ranks (CPU threads) that
    /// run the --schedule. 1 (the default) trains on one rank.
    #[arg(long)]
    pp: Option<usize>,
    /// Data-parallel replicas of the pipeline (each on its own micro-batches; the global batch
    /// grows accordingly), their gradients all-reduced.
    #[arg(long)]
    dp: Option<usize>,
    /// Expert parallelism: groups of this many data-parallel replicas split the routed experts
    /// of every MoE layer, token rows travelling to the expert's rank and back (divides --dp).
    #[arg(long)]
    ep: Option<usize>,
    /// The pipeline schedule: 1f1b, zb1p, dualpipe (PP ranks, two copies of each stage) or
    /// dualpipev (PP/2 ranks).
    #[arg(long)]
    schedule: Option<Method>,
    /// Draw the last step's measured pipeline timeline (ranks × milliseconds, coloured by
    /// F/B/W as `fathom schedule` draws a simulated one) into this SVG file, and print it beside
    /// the simulator's prediction from the measured op costs.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Without a terminal, print a progress line every this many steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// How the pipeline's ranks run: `threads` of this process (the default), or `env`: this
    /// process is one rank of a group started by a launcher (torchrun, mpirun, Slurm) that sets
    /// MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE; start one process per rank (pipeline
    /// ranks × --dp), each with the same flags. Rank 0 logs and writes the metrics and
    /// checkpoints.
    #[arg(long, value_enum, default_value_t = Launcher::Threads)]
    launcher: Launcher,
    /// With `backend = "cuda"` and no pipeline, keep the optimizer on the host (the gradients
    /// downloaded and the parameters uploaded every step) instead of on the GPU beside the
    /// parameters: the same results, slower; to rule the device's optimizer out.
    #[arg(long)]
    host_optimizer: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Launcher {
    Threads,
    Env,
}

pub fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let mut config = RunConfig::read(&args.config)?;
    apply_overrides(&mut config, &args);

    let group = match args.launcher {
        Launcher::Threads => None,
        Launcher::Env => {
            if args.timeline.is_some() {
                bail!(
                    "--timeline draws the threads' measured timeline; ranks that are processes \
                     share no clock (use --launcher threads)"
                );
            }
            Some(join_group(&config.train)?)
        }
    };
    let mut trainer = start(&config, group)?;
    if args.host_optimizer {
        trainer.keep_optimizer_on_host()?;
    }
    let leader = trainer.is_leader();
    if let Some(pipeline) = trainer.pipeline()
        && leader
    {
        eprint!("{}", pipeline.describe());
        eprintln!("{}", trainer.describe_optimizer());
    }
    if trainer.optimizer_on_device() {
        eprintln!("{}", trainer.describe_optimizer());
    }
    let floor = config
        .data
        .loss_floor(trainer.spec(), trainer.settings().seq);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let mut metrics = match config.metrics.as_ref().filter(|_| leader) {
        Some(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            Some((path.clone(), file))
        }
        None => None,
    };

    let total = trainer.settings().steps;
    let first_step = trainer.step_count();
    let mut progress = Progress::new(trainer.step_count(), total, args.log_every, floor);
    if !leader {
        progress = progress.quiet();
    }
    let mut interrupted = false;
    while !trainer.is_done() {
        if trainer.any_rank_stops(stop.load(Ordering::SeqCst))? {
            interrupted = true;
            break;
        }
        let report = match trainer.step() {
            Ok(report) => report,
            Err(error) => {
                progress.finish();
                return Err(error).context(match &config.checkpoint.dir {
                    Some(dir) => format!(
                        "training stopped; the last checkpoint in {} is intact",
                        dir.display()
                    ),
                    None => "training stopped".to_owned(),
                });
            }
        };
        if let Some((path, file)) = &mut metrics {
            writeln!(file, "{}", report.json_line())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        progress.update(&report);
        let due = config
            .checkpoint
            .every
            .is_some_and(|every| every > 0 && report.step % every == 0);
        if due
            && !trainer.is_done()
            && let Some(dir) = &config.checkpoint.dir
        {
            let saved = trainer.save_checkpoint(dir)?;
            progress.println(&format!("checkpoint: {}", saved.display()));
        }
    }
    progress.finish();
    if let Some(path) = &args.timeline {
        write_timeline(&trainer, path)?;
    }
    if trainer.step_count() == first_step {
        if !leader {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        eprintln!(
            "the run is complete at step {}; pass --steps to extend it",
            trainer.step_count()
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Some(dir) = &config.checkpoint.dir {
        let saved = trainer.save_checkpoint(dir)?;
        if leader {
            eprintln!(
                "checkpoint: {} (a model directory: `fathom forward --model` reads it)",
                saved.display()
            );
        }
    }
    if interrupted && leader {
        eprintln!(
            "interrupted at step {}/{}; run the same command to continue",
            trainer.step_count(),
            total
        );
        return Ok(std::process::ExitCode::from(130));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn apply_overrides(config: &mut RunConfig, args: &Args) {
    let train = &mut config.train;
    if let Some(steps) = args.steps {
        train.steps = steps;
    }
    if let Some(batch) = args.batch {
        train.batch = batch;
    }
    if let Some(seq) = args.seq {
        train.seq = seq;
    }
    if let Some(lr) = args.lr {
        train.schedule.peak_lr = lr;
        train.schedule.final_lr = train.schedule.final_lr.min(lr);
    }
    if let Some(precision) = args.precision {
        train.precision = PrecisionPolicy {
            scaling: train.precision.scaling,
            accumulation: train.precision.accumulation,
            ..PrecisionPolicy::uniform(precision)
        };
    }
    if let Some(accumulation) = args.accumulation {
        train.precision.accumulation = accumulation;
    }
    if let Some(micro) = args.micro_batches {
        train.micro_batches = micro;
    }
    if let Some(pp) = args.pp {
        train.pipeline.stages = pp;
    }
    if let Some(dp) = args.dp {
        train.pipeline.data_parallel = dp;
    }
    if let Some(ep) = args.ep {
        train.pipeline.expert_parallel = ep;
    }
    if let Some(schedule) = args.schedule {
        train.pipeline.schedule = schedule;
    }
    if let Some(path) = &args.text {
        config.data = DataSource::Text { path: path.clone() };
    }
    if let Some(dir) = &args.checkpoint_dir {
        config.checkpoint.dir = Some(dir.clone());
    }
    if let Some(every) = args.checkpoint_every {
        config.checkpoint.every = Some(every);
    }
    if let Some(path) = &args.metrics {
        config.metrics = Some(path.clone());
    }
}

/// Joins the group of processes a launcher started (`--launcher env`), waiting for the others
/// at most the pipeline's receive timeout: over TCP, or with the collectives over NCCL on GPU
/// `LOCAL_RANK` when the run's backend is `cuda`.
fn join_group(settings: &TrainSettings) -> anyhow::Result<Box<dyn Comm>> {
    let rendezvous = Rendezvous::from_env()
        .map_err(anyhow::Error::msg)
        .context("--launcher env reads the launcher's variables")?;
    let timeout = std::time::Duration::from_secs_f64(settings.pipeline.timeout_seconds.max(1.0));
    let joining = || {
        format!(
            "rank {} joining the group at {}",
            rendezvous.rank, rendezvous.master
        )
    };
    if settings.backend == Backend::Cuda {
        let device = local_rank_from_vars(|name| std::env::var(name).ok())
            .map_err(anyhow::Error::msg)?
            .unwrap_or(0);
        let comm = NcclComm::connect(&rendezvous, device, timeout).with_context(joining)?;
        return Ok(Box::new(comm));
    }
    let comm = TcpComm::connect(&rendezvous, timeout).with_context(joining)?;
    Ok(Box::new(comm))
}

/// A fresh trainer, or the one saved in the checkpoint directory; `group` makes it one rank of
/// a run whose ranks are processes.
fn start(config: &RunConfig, group: Option<Box<dyn Comm>>) -> anyhow::Result<Trainer> {
    let leader = group.as_ref().is_none_or(|g| g.rank() == 0);
    let settings = &config.train;
    if let Some(dir) = &config.checkpoint.dir
        && let Some(latest) = latest_checkpoint(dir)?
    {
        let mut checkpoint = Checkpoint::load(&latest)?;
        check_same_run(&checkpoint.state.settings, settings)
            .with_context(|| format!("resuming {}", latest.display()))?;
        checkpoint.state.settings.steps = settings.steps;
        let data = config
            .data
            .open(&checkpoint.spec, settings.batch, settings.seq)?;
        if leader {
            eprintln!(
                "resuming from {} (step {})",
                latest.display(),
                checkpoint.state.step
            );
        }
        return Ok(match group {
            Some(group) => Trainer::resume_rank(checkpoint, data, group)?,
            None => Trainer::resume(checkpoint, data)?,
        });
    }
    let (spec, weights, notes) = config.model.load()?;
    if leader {
        super::print_notes(&notes);
    }
    let data = config.data.open(&spec, settings.batch, settings.seq)?;
    Ok(match group {
        Some(group) => Trainer::new_rank(spec, settings.clone(), weights, data, group)?,
        None => Trainer::new(spec, settings.clone(), weights, data)?,
    })
}

/// A checkpoint continues only the run that wrote it: every setting but the step count and the
/// pipeline layout must be the same (another pipeline computes the same step, up to the order
/// of a few sums, so a run may move to more or fewer stages; the data-parallel replicas must
/// stay, since they set the global batch).
fn check_same_run(saved: &TrainSettings, asked: &TrainSettings) -> anyhow::Result<()> {
    let saved = serde_json::to_value(saved)?;
    let asked = serde_json::to_value(asked)?;
    let (Some(saved), Some(asked)) = (saved.as_object(), asked.as_object()) else {
        bail!("settings are not objects");
    };
    let differing: Vec<String> = saved
        .iter()
        .filter(|(key, value)| {
            !matches!(key.as_str(), "steps" | "pipeline") && asked.get(*key) != Some(value)
        })
        .map(|(key, value)| {
            let now = asked
                .get(key)
                .map_or("(none)".to_owned(), ToString::to_string);
            format!("`{key}` was {value}, now {now}")
        })
        .collect();
    // Of the pipeline, only the replicas change the step (they multiply the global batch).
    let replicas = |settings: &serde_json::Map<String, serde_json::Value>| {
        settings
            .get("pipeline")
            .and_then(|p| p.get("data_parallel"))
            .cloned()
    };
    let mut differing = differing;
    if replicas(saved) != replicas(asked) {
        differing.push(format!(
            "`pipeline.data_parallel` was {}, now {}",
            replicas(saved).unwrap_or_default(),
            replicas(asked).unwrap_or_default()
        ));
    }
    if differing.is_empty() {
        Ok(())
    } else {
        bail!(
            "the checkpoint was written by a run with other settings: {}; use another checkpoint \
             directory for a new run",
            differing.join("; ")
        )
    }
}

/// `--timeline`: the measured step as an SVG, and how it compares with the simulator.
fn write_timeline(trainer: &Trainer, path: &std::path::Path) -> anyhow::Result<()> {
    let (Some(measured), Some(pipeline)) = (trainer.last_timeline(), trainer.pipeline()) else {
        bail!("--timeline needs a pipelined run (--pp or --dp above 1) that took a step");
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, timeline_svg(measured))
        .with_context(|| format!("writing {}", path.display()))?;
    let c = &measured.costs;
    eprintln!(
        "timeline of the last step: {} (ms; mean F {:.1}, B {:.1}, W {:.1})",
        path.display(),
        c.f,
        c.b,
        c.w
    );
    eprintln!(
        "  measured: makespan {:.1} ms, largest bubble {:.1} ms, peak activations {}",
        measured.makespan,
        measured.bubble(),
        measured.peak_activations()
    );
    match simulate(pipeline.schedule(), c) {
        Ok(predicted) => eprintln!(
            "  simulated from those costs: makespan {:.1} ms, largest bubble {:.1} ms, peak \
             activations {} (ranks sharing cores run slower than the simulator assumes)",
            predicted.makespan,
            predicted.bubble(),
            predicted.peak_activations()
        ),
        Err(e) => eprintln!("  (cannot simulate with the measured costs: {e})"),
    }
    Ok(())
}
