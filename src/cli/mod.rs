//! Subcommands of `fathom`. Each lives in its own module with its arguments.

mod bench;
mod forward;
mod gpu_check;
mod grad;
mod graph;
mod init;
mod inspect;
mod schedule;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Fathom: declare DeepSeek-V3-style models in Rust, compile and train them.
#[derive(Debug, Parser)]
#[command(name = "fathom", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a batch of token ids through a model and write its logits.
    Forward(forward::Args),
    /// Write a model with random weights in the Hugging Face layout.
    Init(init::Args),
    /// Print a model's graph, or its parameter counts.
    Graph(graph::Args),
    /// The next-token loss of a batch and the gradient of every parameter.
    Grad(grad::Args),
    /// Train a model on the CPU from a run file.
    Train(train::Args),
    /// Write every artifact of compiling a model: graphs after each pass, fusion groups,
    /// kernels, memory plan, timings.
    Inspect(inspect::Args),
    /// Time the compiled training step and forward pass of a configuration.
    Bench(bench::Args),
    /// Print a pipeline schedule (1F1B, ZB1P, DualPipe, DualPipeV), simulate it, compare its
    /// bubble and memory with Table 2 of the DeepSeek-V3 report, and draw its timeline as SVG.
    Schedule(schedule::Args),
    /// The checks that need a GPU: every generated kernel and the FP8 GEMM against the CPU,
    /// training steps, FP8 GEMM timings (see scripts/gpu-check.sh).
    GpuCheck(gpu_check::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Forward(args) => done(forward::run(args)),
        Command::Init(args) => done(init::run(args)),
        Command::Graph(args) => done(graph::run(args)),
        Command::Grad(args) => done(grad::run(args)),
        Command::Train(args) => train::run(args),
        Command::Inspect(args) => done(inspect::run(args)),
        Command::Schedule(args) => done(schedule::run(args)),
        Command::Bench(args) => done(bench::run(args)),
        Command::GpuCheck(args) => gpu_check::run(args),
    }
}

/// Prints the loader's notes to stderr, so that stdout stays clean for data.
fn print_notes(notes: &[String]) {
    for note in notes {
        eprintln!("note: {note}");
    }
}
