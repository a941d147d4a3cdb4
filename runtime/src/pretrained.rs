//! A model directory in the Hugging Face layout (`config.json` + safetensors), loaded, checked
//! against the graph it must feed, and run through the reference interpreter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fathom_compiler::model::{ForwardOptions, LossWeights, forward_graph, parameter_graph};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::spec::hf::{ConfigError, config_json, spec_from_config_json};
use fathom_compiler::training::training_graph;
use fathom_compiler::{Graph, GraphError};
use thiserror::Error;

use crate::exec::{Backend, ExecError, Executable};
use crate::interp::{Feeds, InterpError, TensorSource};
use crate::tensor::HostTensor;
use crate::weights::{Weights, WeightsError, is_layer_at_or_above, save_safetensors};

#[derive(Debug, Error)]
pub enum PretrainedError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("cannot build the model graph: {0}")]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("token batch: {0}")]
    Tokens(String),
}

/// A loaded model: its spec, its weights (every tensor as exact f32) and what the loader noticed.
#[derive(Debug)]
pub struct Pretrained {
    pub spec: ModelSpec,
    pub weights: Weights,
    /// Things the user should know, such as MTP being off because the checkpoint has no MTP
    /// weights.
    pub notes: Vec<String>,
}

impl Pretrained {
    /// Loads `dir/config.json` and the safetensors in `dir` (one file or shards with an index),
    /// and checks every tensor against the model's parameters.
    pub fn load(dir: &Path) -> Result<Self, PretrainedError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| PretrainedError::Io {
            path: config_path.clone(),
            source,
        })?;
        let mut spec = spec_from_config_json(&text).map_err(|source| PretrainedError::Config {
            path: config_path,
            source,
        })?;
        let weights = Weights::load_dir(dir)?;
        let mut notes = Vec::new();
        let has_mtp_weights = weights
            .names()
            .any(|n| is_layer_at_or_above(n, spec.layers));
        if spec.mtp_depth > 0 && !has_mtp_weights {
            notes.push(format!(
                "the checkpoint has no MTP weights (layers {}..{}), so MTP is off \
                 (transformers' save_pretrained writes none)",
                spec.layers,
                spec.layers + spec.mtp_depth
            ));
            spec.mtp_depth = 0;
        }
        let model = Pretrained {
            spec,
            weights,
            notes,
        };
        let graph = parameter_graph(&model.spec)?;
        let layers = model.spec.layers;
        let report = model
            .weights
            .check_against(&graph, |name| is_mtp_copy(name, layers))?;
        let mut model = model;
        if !report.ignored.is_empty() {
            model.notes.push(format!(
                "ignored {} copies of the shared embedding and head stored with the MTP layers",
                report.ignored.len()
            ));
        }
        Ok(model)
    }

    /// The forward graph for `batch` rows of `seq` tokens, MTP modules included when present.
    pub fn graph(&self, batch: usize, seq: usize) -> Result<Graph, GraphError> {
        let with_mtp = self.spec.mtp_depth > 0 && seq > self.spec.mtp_depth;
        forward_graph(
            &self.spec,
            ForwardOptions {
                batch,
                seq,
                with_mtp,
            },
        )
    }

    /// Logits `[batch, seq, vocab]` of the main model for rows of token ids, compiled for the
    /// CPU.
    pub fn logits(&self, rows: &[Vec<i64>]) -> Result<HostTensor, PretrainedError> {
        self.logits_on(rows, Backend::Cpu)
    }

    /// [`Pretrained::logits`] on a chosen backend.
    pub fn logits_on(
        &self,
        rows: &[Vec<i64>],
        backend: Backend,
    ) -> Result<HostTensor, PretrainedError> {
        let ids = token_batch(rows, self.spec.vocab_size)?;
        let (batch, seq) = (ids.dims()[0], ids.dims()[1]);
        let graph = forward_graph(
            &self.spec,
            ForwardOptions {
                batch,
                seq,
                with_mtp: false,
            },
        )?;
        let inputs = HashMap::from([("input_ids", ids)]);
        let mut outputs =
            Executable::new(graph, backend)?.run(&Feeds::new(&inputs, &self.weights))?;
        outputs
            .remove("logits")
            .ok_or_else(|| PretrainedError::Tokens("the graph has no logits output".into()))
    }
}

impl Pretrained {
    /// The mean next-token cross-entropy of the rows (what `transformers` reports with
    /// `labels=input_ids`: no MTP or balance term) and its gradient for every trainable
    /// parameter, by name, compiled for the CPU.
    pub fn gradients(
        &self,
        rows: &[Vec<i64>],
    ) -> Result<(f32, Vec<(String, HostTensor)>), PretrainedError> {
        self.gradients_on(rows, Backend::Cpu)
    }

    /// [`Pretrained::gradients`] on a chosen backend.
    pub fn gradients_on(
        &self,
        rows: &[Vec<i64>],
        backend: Backend,
    ) -> Result<(f32, Vec<(String, HostTensor)>), PretrainedError> {
        let ids = token_batch(rows, self.spec.vocab_size)?;
        let (batch, seq) = (ids.dims()[0], ids.dims()[1]);
        if seq < 2 {
            return Err(PretrainedError::Tokens(
                "a next-token loss needs rows of at least 2 tokens".into(),
            ));
        }
        let program = training_graph(&self.spec, batch, seq, LossWeights::next_token_only())?;
        let inputs = HashMap::from([("input_ids", ids)]);
        let executable = Executable::new(program.graph, backend)?;
        let mut outputs = executable.run(&Feeds::new(&inputs, &self.weights))?;
        let missing =
            |name: &str| PretrainedError::Tokens(format!("the training graph has no `{name}`"));
        let loss = outputs
            .get("loss")
            .and_then(HostTensor::as_f32)
            .ok_or_else(|| missing("loss"))?[0];
        let mut gradients = Vec::with_capacity(program.parameters.len());
        for name in program.parameters {
            let key = format!("grad.{name}");
            let grad = outputs.remove(&key).ok_or_else(|| missing(&key))?;
            gradients.push((name, grad));
        }
        Ok((loss, gradients))
    }
}

/// DeepSeek's released checkpoints store copies of the shared embedding and output head with
/// each MTP layer (`model.layers.61.embed_tokens.weight`, `…shared_head.head.weight`); the
/// model uses the main ones.
fn is_mtp_copy(name: &str, layers: usize) -> bool {
    is_layer_at_or_above(name, layers)
        && (name.ends_with(".embed_tokens.weight") || name.ends_with(".shared_head.head.weight"))
}

/// Rows of token ids as an `i64 [batch, seq]` tensor: rows must be non-empty, of equal length,
/// and every id inside the vocabulary.
pub fn token_batch(rows: &[Vec<i64>], vocab_size: usize) -> Result<HostTensor, PretrainedError> {
    let bad = |message: String| Err(PretrainedError::Tokens(message));
    let Some(first) = rows.first() else {
        return bad("no rows of tokens were given".into());
    };
    let seq = first.len();
    if seq == 0 {
        return bad("row 0 is empty".into());
    }
    for (r, row) in rows.iter().enumerate() {
        if row.len() != seq {
            return bad(format!(
                "rows must have equal length: row 0 has {seq} tokens, row {r} has {}",
                row.len()
            ));
        }
        if let Some((p, t)) = row
            .iter()
            .enumerate()
            .find(|(_, t)| **t < 0 || **t as u64 >= vocab_size as u64)
        {
            return bad(format!(
                "row {r}, position {p}: token {t} is outside the vocabulary 0..{vocab_size}"
            ));
        }
    }
    Ok(HostTensor::i64([rows.len(), seq], rows.concat()))
}

/// Writes `dir/config.json` (the HF DeepseekV3 config) and `dir/model.safetensors`, each
/// atomically, creating `dir` if needed.
pub fn save_pretrained(
    dir: &Path,
    spec: &ModelSpec,
    weights: &Weights,
) -> Result<(), PretrainedError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PretrainedError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = serde_json::to_string_pretty(&config_json(spec)).expect("JSON values serialise");
    let config_path = dir.join("config.json");
    let temp = dir.join(".config.json.tmp");
    std::fs::write(&temp, config + "\n").map_err(io(&temp))?;
    std::fs::rename(&temp, &config_path).map_err(io(&config_path))?;
    save_safetensors(&dir.join("model.safetensors"), weights.iter())?;
    Ok(())
}

impl TensorSource for Weights {
    fn tensor(&self, name: &str) -> Option<&HostTensor> {
        self.get(name)
    }
}
