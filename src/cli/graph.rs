//! `fathom graph`: the model's graph as text, or its parameter counts.

use std::path::PathBuf;

use anyhow::{Context, bail};
use fathom_compiler::model::{ForwardOptions, ParameterSummary, forward_graph};
use fathom_compiler::spec::hf::spec_from_config_json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory (its config.json is read; weights are not needed).
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A Hugging Face DeepSeek-V3 config.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the parameter counts instead of the graph.
    #[arg(long)]
    summary: bool,
    /// Batch size the graph is built for.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Sequence length the graph is built for.
    #[arg(long, default_value_t = 8)]
    seq: usize,
    /// Include the MTP modules' forward pass.
    #[arg(long)]
    mtp: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match (&args.model, &args.config) {
        (Some(dir), None) => dir.join("config.json"),
        (None, Some(file)) => file.clone(),
        _ => bail!("give the model as --model DIR or --config FILE"),
    };
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    let spec = spec_from_config_json(&text).with_context(|| config.display().to_string())?;
    // Shapes only: building the graph allocates no weights, even for 671B parameters.
    let options = ForwardOptions {
        batch: args.batch,
        seq: args.seq,
        with_mtp: args.mtp || args.summary,
    };
    let graph = forward_graph(&spec, options)?;
    if args.summary {
        println!("{}", ParameterSummary::of(&spec, &graph));
    } else {
        print!("{graph}");
    }
    Ok(())
}
