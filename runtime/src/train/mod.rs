//! Training on the CPU: the step (forward, backward, gradient accumulation, clipping, AdamW,
//! balancing-bias update), its report, and checkpoints that resume bit-identically.

mod checkpoint;
mod report;
mod settings;
mod trainer;

use std::path::PathBuf;

use fathom_compiler::GraphError;
use thiserror::Error;

use crate::data::DataError;
use crate::interp::InterpError;
use crate::optim::OptimError;
use crate::weights::WeightsError;

pub use checkpoint::{Checkpoint, TrainerState, latest_checkpoint};
pub use report::StepReport;
pub use settings::TrainSettings;
pub use trainer::Trainer;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("training setting `{field}`: {reason}")]
    Settings { field: String, reason: String },
    #[error("cannot build the training graph: {0}")]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Exec(#[from] crate::exec::ExecError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("step {step}: the {what} is not finite ({value}); stopping before the update")]
    Diverged {
        step: u64,
        what: &'static str,
        value: f64,
    },
    #[error(transparent)]
    Pipeline(#[from] crate::parallel::PipelineError),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
