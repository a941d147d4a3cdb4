//! The run file of `fathom train` (TOML or JSON) and the flags that override it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::spec::hf::spec_from_config_json;
use fathom_runtime::data::{
    Batches, ByteTokenizer, SyntheticBatches, SyntheticKind, SyntheticTask, TextDataset,
};
use fathom_runtime::init::init_parameters;
use fathom_runtime::pretrained::Pretrained;
use fathom_runtime::train::TrainSettings;
use fathom_runtime::weights::Weights;
use serde::Deserialize;

/// A whole run: which model, which data, how to train, where to write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSource,
    pub data: DataSource,
    pub train: TrainSettings,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Where to append one JSON line of metrics per step.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
}

/// Exactly one of the three ways to name a model.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    /// A built-in architecture (`fathom::zoo`), with random weights.
    pub architecture: Option<String>,
    /// A Hugging Face DeepSeek-V3 config.json, with random weights.
    pub config: Option<PathBuf>,
    /// A model directory (config.json + safetensors) whose weights training starts from.
    pub pretrained: Option<PathBuf>,
    /// Seed of the random weights.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    /// Generated sequences with a known loss floor (`fathom_runtime::data::SyntheticKind`).
    Synthetic {
        #[serde(default)]
        task: SyntheticKind,
        /// Tokens the task draws from (0..vocab); at most the model's vocabulary, which is the
        /// default.
        vocab: Option<usize>,
        #[serde(default)]
        seed: u64,
    },
    /// A text file or a directory of them, read as bytes.
    Text { path: PathBuf },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Where checkpoints go; a run finding one there resumes from it.
    pub dir: Option<PathBuf>,
    /// Write one every this many steps (and always at the end and on Ctrl-C).
    pub every: Option<u64>,
}

impl RunConfig {
    /// Reads a `.toml` or `.json` run file; paths in it are relative to the file's folder.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: RunConfig = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid run file", path.display()))?
        } else {
            toml::from_str(&text)
                .with_context(|| format!("{} is not a valid run file", path.display()))?
        };
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.model.config.as_mut().map(fix);
        self.model.pretrained.as_mut().map(fix);
        if let DataSource::Text { path } = &mut self.data {
            fix(path);
        }
        self.checkpoint.dir.as_mut().map(fix);
        self.metrics.as_mut().map(fix);
    }
}

impl ModelSource {
    /// The spec and the starting weights.
    pub fn load(&self) -> anyhow::Result<(ModelSpec, Weights, Vec<String>)> {
        let spec = match (&self.architecture, &self.config, &self.pretrained) {
            (Some(name), None, None) => fathom::zoo::architecture(name).with_context(|| {
                format!(
                    "unknown architecture `{name}`; built-in: {}",
                    fathom::zoo::NAMES.join(", ")
                )
            })?,
            (None, Some(path), None) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                spec_from_config_json(&text).with_context(|| path.display().to_string())?
            }
            (None, None, Some(dir)) => {
                let model = Pretrained::load(dir)
                    .with_context(|| format!("loading the model in {}", dir.display()))?;
                return Ok((model.spec, model.weights, model.notes));
            }
            _ => bail!("[model] needs exactly one of `architecture`, `config` or `pretrained`"),
        };
        let graph = fathom_compiler::model::parameter_graph(&spec)?;
        let weights = Weights::from(init_parameters(&graph, spec.initializer_range, self.seed));
        Ok((spec, weights, Vec::new()))
    }
}

impl DataSource {
    pub fn open(
        &self,
        spec: &ModelSpec,
        batch: usize,
        seq: usize,
    ) -> anyhow::Result<Box<dyn Batches>> {
        Ok(match self {
            DataSource::Synthetic { task, vocab, seed } => {
                let vocab = vocab.unwrap_or(spec.vocab_size);
                if vocab > spec.vocab_size {
                    bail!(
                        "[data] vocab = {vocab} exceeds the model's vocabulary ({})",
                        spec.vocab_size
                    );
                }
                let task = SyntheticTask::new(*task, vocab, *seed)?;
                Box::new(SyntheticBatches::new(task, batch, seq)?)
            }
            DataSource::Text { path } => {
                ByteTokenizer::check_vocab(spec.vocab_size)?;
                Box::new(TextDataset::open(path, batch, seq)?)
            }
        })
    }

    /// The loss a perfect model reaches on this data, when known.
    pub fn loss_floor(&self, spec: &ModelSpec, seq: usize) -> Option<f64> {
        match self {
            DataSource::Synthetic { task, vocab, seed } => {
                let task =
                    SyntheticTask::new(*task, vocab.unwrap_or(spec.vocab_size), *seed).ok()?;
                Some(task.loss_floor(seq))
            }
            DataSource::Text { .. } => None,
        }
    }
}
