//! `fathom forward`: logits of a batch, written as safetensors.

use std::path::PathBuf;

use anyhow::Context;
use fathom_runtime::pretrained::Pretrained;
use fathom_runtime::weights::save_safetensors;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory: config.json and safetensors weights (one file or shards with an index).
    #[arg(long)]
    model: PathBuf,
    /// One row of token ids, comma-separated (`5,17,42`). Repeat for more rows; rows have
    /// equal length.
    #[arg(long = "tokens", required = true, value_parser = parse_row)]
    rows: Vec<Vec<i64>>,
    /// Output file: a safetensors file with one f32 tensor `logits` [batch, seq, vocab].
    #[arg(long)]
    out: PathBuf,
}

pub(super) fn parse_row(text: &str) -> Result<Vec<i64>, String> {
    text.split(',')
        .map(|t| {
            t.trim()
                .parse::<i64>()
                .map_err(|_| format!("`{t}` is not a token id (expected integers like 5,17,42)"))
        })
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = Pretrained::load(&args.model)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    super::print_notes(&model.notes);
    let logits = model.logits(&args.rows)?;
    save_safetensors(&args.out, [("logits", &logits)])
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote logits {} to {}", logits.ty, args.out.display());
    Ok(())
}
