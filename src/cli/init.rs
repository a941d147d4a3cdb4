//! `fathom init`: a model with random weights, ready for `fathom forward`.

use std::path::PathBuf;

use anyhow::Context;
use fathom_compiler::model::{ParameterSummary, grouped, parameter_graph};
use fathom_compiler::spec::hf::spec_from_config_json;
use fathom_runtime::init::init_parameters;
use fathom_runtime::pretrained::save_pretrained;
use fathom_runtime::weights::Weights;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face DeepSeek-V3 config.json.
    #[arg(long)]
    config: PathBuf,
    /// Seed of the random weights: the same seed gives the same bits.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory to write config.json and model.safetensors into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let spec = spec_from_config_json(&text).with_context(|| args.config.display().to_string())?;
    let graph = parameter_graph(&spec)?;
    let weights = Weights::from(init_parameters(&graph, spec.initializer_range, args.seed));
    save_pretrained(&args.out, &spec, &weights)
        .with_context(|| format!("writing the model to {}", args.out.display()))?;
    eprintln!(
        "wrote {} tensors ({} parameters) to {}",
        weights.len(),
        grouped(ParameterSummary::of(&spec, &graph).total()),
        args.out.display()
    );
    Ok(())
}
