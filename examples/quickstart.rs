//! Take the small DeepSeek-V3 declared with `fathom::model!` in `src/zoo.rs` (`Tiny`), build
//! its graph, give it random weights and run a forward pass on the CPU with the reference
//! interpreter.
//!
//!     cargo run --example quickstart [-- OUT_DIR]
//!
//! The model is written to OUT_DIR (default `target/tiny-deepseek`) in the Hugging Face layout,
//! so `fathom forward --model OUT_DIR --tokens 72,105` and `transformers` can load it too.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use fathom::compiler::model::{ForwardOptions, ParameterSummary, forward_graph, parameter_graph};
use fathom::runtime::HostTensor;
use fathom::runtime::init::init_parameters;
use fathom::runtime::interp::{Feeds, evaluate};
use fathom::runtime::pretrained::save_pretrained;
use fathom::runtime::weights::Weights;

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/tiny-deepseek"), PathBuf::from);
    let spec = fathom::zoo::Tiny::spec();

    let weights_graph = parameter_graph(&spec)?;
    println!("{}", ParameterSummary::of(&spec, &weights_graph));
    let weights = Weights::from(init_parameters(&weights_graph, spec.initializer_range, 0));
    save_pretrained(&out, &spec, &weights)?;
    println!("wrote the model to {}", out.display());

    let text = "Hello, Fathom!";
    let tokens: Vec<i64> = text.bytes().map(i64::from).collect();
    let options = ForwardOptions {
        batch: 1,
        seq: tokens.len(),
        with_mtp: true,
    };
    let graph = forward_graph(&spec, options)?;
    println!(
        "forward graph: {} nodes for {} tokens (print it with `fathom graph --model {}`)",
        graph.nodes.len(),
        tokens.len(),
        out.display()
    );
    let inputs = HashMap::from([("input_ids", HostTensor::i64([1, tokens.len()], tokens))]);
    let outputs = evaluate(&graph, &Feeds::new(&inputs, &weights))?;
    let logits = outputs.get("logits").context("no logits")?;
    let vocab = spec.vocab_size;
    let rows = logits.as_f32().context("float logits")?.chunks(vocab);
    println!("untrained next-byte guesses (the weights are random):");
    for (byte, row) in text.bytes().zip(rows) {
        let (best, score) =
            row.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            );
        println!(
            "  after {:?}: {:?} (logit {score:+.3})",
            byte as char, best as u8 as char
        );
    }
    Ok(())
}
