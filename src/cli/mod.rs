//! Subcommands of `fathom`. Each lives in its own module with its arguments.

mod forward;
mod graph;
mod init;

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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Forward(args) => forward::run(args),
        Command::Init(args) => init::run(args),
        Command::Graph(args) => graph::run(args),
    }
}

/// Prints the loader's notes to stderr, so that stdout stays clean for data.
fn print_notes(notes: &[String]) {
    for note in notes {
        eprintln!("note: {note}");
    }
}
