//! Checkpoints: the whole training state in a directory, written atomically.
//!
//! ```text
//! <root>/step-00000100/config.json          the model, as a Hugging Face config
//!                      model.safetensors    weights and balancing biases (HF names)
//!                      optimizer.safetensors AdamW moments and step
//!                      trainer.json         step, data position, settings, exact spec
//! <root>/latest                             the name of the newest complete checkpoint
//! ```
//! A checkpoint directory is assembled under a temporary name and renamed into place, and
//! `latest` is replaced by renaming a temporary file, so a crash at any moment leaves `latest`
//! naming a complete checkpoint.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use fathom_compiler::spec::ModelSpec;
use fathom_compiler::spec::hf::config_json;
use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::tensor::HostTensor;
use crate::weights::{Weights, read_safetensors, save_safetensors};

use super::{TrainError, TrainSettings, Trainer};

const FORMAT_VERSION: u32 = 1;
const LATEST: &str = "latest";

/// Where a run stands, besides its tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps taken.
    pub step: u64,
    /// Where the next batch starts.
    pub data_position: DataPosition,
    pub settings: TrainSettings,
}

/// `trainer.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerFile {
    format_version: u32,
    fathom_version: String,
    /// The exact spec (the HF config beside it cannot hold everything, e.g. FP8 tiling).
    spec: ModelSpec,
    #[serde(flatten)]
    state: TrainerState,
}

/// A loaded checkpoint, ready for [`Trainer::resume`].
#[derive(Debug)]
pub struct Checkpoint {
    pub spec: ModelSpec,
    pub weights: Weights,
    pub optimizer_state: Vec<(String, HostTensor)>,
    pub state: TrainerState,
    /// The directory it was read from.
    pub path: PathBuf,
}

impl Checkpoint {
    /// Reads a checkpoint directory (`<root>/step-…`).
    pub fn load(dir: &Path) -> Result<Self, TrainError> {
        let bad = |reason: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let trainer_path = dir.join("trainer.json");
        let text = fs::read_to_string(&trainer_path)
            .map_err(|e| bad(format!("cannot read trainer.json: {e}")))?;
        let file: TrainerFile = serde_json::from_str(&text)
            .map_err(|e| bad(format!("trainer.json is not a Fathom trainer state: {e}")))?;
        if file.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "trainer.json has format version {}, this Fathom reads version {FORMAT_VERSION}",
                file.format_version
            )));
        }
        let weights = Weights::load_file(&dir.join("model.safetensors"))?;
        let optimizer_state = read_safetensors(&dir.join("optimizer.safetensors"))?
            .into_iter()
            .collect();
        Ok(Checkpoint {
            spec: file.spec,
            weights,
            optimizer_state,
            state: file.state,
            path: dir.to_path_buf(),
        })
    }
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>, TrainError> {
    let pointer = root.join(LATEST);
    match fs::read_to_string(&pointer) {
        Ok(name) => {
            let dir = root.join(name.trim());
            if dir.is_dir() {
                Ok(Some(dir))
            } else {
                Err(TrainError::Checkpoint {
                    path: pointer,
                    reason: format!("names `{}`, which is not a directory", name.trim()),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TrainError::Io {
            path: pointer,
            source,
        }),
    }
}

impl Trainer {
    /// Writes the run's state to `<root>/step-<step>` and points `<root>/latest` at it.
    /// Returns the checkpoint's directory. When the ranks are processes every one must call
    /// this: they send their shares to rank 0, which alone writes.
    pub fn save_checkpoint(&mut self, root: &Path) -> Result<PathBuf, TrainError> {
        let name = format!("step-{:08}", self.step_count());
        let spec = self.spec().clone();
        let Some((state, weights, optimizer_state)) = self.checkpoint_state()? else {
            return Ok(root.join(name));
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        fs::create_dir_all(root).map_err(io(root))?;
        let staging = root.join(format!(".{name}.{}.tmp", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        fs::create_dir(&staging).map_err(io(&staging))?;

        let file = TrainerFile {
            format_version: FORMAT_VERSION,
            fathom_version: env!("CARGO_PKG_VERSION").to_owned(),
            spec,
            state,
        };
        let trainer_json = serde_json::to_string_pretty(&file).expect("trainer state serialises");
        write_synced(&staging.join("trainer.json"), trainer_json.as_bytes())?;
        let config = serde_json::to_string_pretty(&config_json(&file.spec)).expect("serialises");
        write_synced(&staging.join("config.json"), config.as_bytes())?;
        save_safetensors(&staging.join("model.safetensors"), weights.iter())?;
        save_safetensors(
            &staging.join("optimizer.safetensors"),
            optimizer_state.iter().map(|(n, t)| (n.as_str(), t)),
        )?;

        let dir = root.join(&name);
        if dir.exists() {
            // Re-saving a step (after a resume, say): replace it.
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        fs::rename(&staging, &dir).map_err(io(&dir))?;
        let pointer_tmp = root.join(format!(".{LATEST}.{}.tmp", std::process::id()));
        write_synced(&pointer_tmp, format!("{name}\n").as_bytes())?;
        fs::rename(&pointer_tmp, root.join(LATEST)).map_err(io(&root.join(LATEST)))?;
        if let Ok(d) = fs::File::open(root) {
            let _ = d.sync_all(); // make the renames durable where directories can be synced
        }
        Ok(dir)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::create(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}
