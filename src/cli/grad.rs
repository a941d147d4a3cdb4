//! `fathom grad`: the next-token loss of a batch and the gradient of every parameter.

use std::path::PathBuf;

use anyhow::Context;
use fathom_runtime::HostTensor;
use fathom_runtime::pretrained::Pretrained;
use fathom_runtime::weights::save_safetensors;

use super::forward::parse_row;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory: config.json and safetensors weights.
    #[arg(long)]
    model: PathBuf,
    /// One row of token ids, comma-separated; repeat for more rows of equal length (at least 2
    /// tokens: the loss predicts each next token).
    #[arg(long = "tokens", required = true, value_parser = parse_row)]
    rows: Vec<Vec<i64>>,
    /// Output safetensors file: `loss` (f32 scalar, mean next-token cross-entropy) and each
    /// parameter's gradient under its checkpoint name.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = Pretrained::load(&args.model)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    super::print_notes(&model.notes);
    let (loss, gradients) = model.gradients(&args.rows)?;
    let loss = HostTensor::f32(fathom_compiler::Shape::scalar(), vec![loss]);
    let tensors = std::iter::once(("loss", &loss))
        .chain(gradients.iter().map(|(name, grad)| (name.as_str(), grad)));
    save_safetensors(&args.out, tensors)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote the loss ({}) and {} gradients to {}",
        loss.as_f32().map_or(f32::NAN, |v| v[0]),
        gradients.len(),
        args.out.display()
    );
    Ok(())
}
