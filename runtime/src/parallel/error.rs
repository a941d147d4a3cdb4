//! How a parallel step fails: the rank, the op of its schedule, and what went wrong there.

use super::comm::CommError;
use super::fault::Fault;
use crate::exec::ExecError;
use crate::optim::OptimError;
use fathom_compiler::GraphError;
use fathom_compiler::partition::Phase;
use thiserror::Error;

/// Why a pipelined step failed.
#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("pipeline setting: {0}")]
    Settings(String),
    #[error("cannot build the pipeline stages: {0}")]
    Graph(#[from] GraphError),
    #[error("cannot compile stage {stage}'s {phase} piece: {source}")]
    Compile {
        stage: usize,
        phase: Phase,
        source: Box<ExecError>,
    },
    #[error("pipeline rank {rank} failed at op {index} ({op}): {failure}")]
    Rank {
        rank: usize,
        index: usize,
        op: String,
        failure: Box<RankFailure>,
    },
    #[error("pipeline rank {rank} failed after its schedule: {failure}")]
    Reduce {
        rank: usize,
        failure: Box<RankFailure>,
    },
    #[error("pipeline rank {rank} panicked: {message}")]
    Panicked { rank: usize, message: String },
    #[error("pipeline rank {rank} failed while {what}: {source}")]
    Collective {
        rank: usize,
        what: &'static str,
        source: CommError,
    },
}

/// What went wrong on a rank.
#[derive(Debug, Error)]
pub enum RankFailure {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Exec(Box<ExecError>),
    #[error("{0}")]
    Schedule(String),
    #[error(transparent)]
    Gradients(#[from] OptimError),
    #[error("injected failure ({})", Fault::ENV)]
    Injected,
    #[error("abandoned: another rank failed first")]
    Cancelled,
}

impl From<ExecError> for RankFailure {
    fn from(error: ExecError) -> Self {
        RankFailure::Exec(Box::new(error))
    }
}

impl RankFailure {
    /// Failures that only report another rank's failure: a stopped peer or an abandoned step.
    fn is_consequence(&self) -> bool {
        matches!(
            self,
            RankFailure::Cancelled | RankFailure::Comm(CommError::PeerStopped { .. })
        )
    }
}

pub(super) fn is_consequence(error: &PipelineError) -> bool {
    match error {
        PipelineError::Rank { failure, .. } | PipelineError::Reduce { failure, .. } => {
            failure.is_consequence()
        }
        _ => false,
    }
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
