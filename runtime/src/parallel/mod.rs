//! Training on several ranks: pipeline parallelism under a schedule (1F1B, ZB1P, DualPipe,
//! DualPipeV) with ranks that really run, each a thread with its own work list, exchanging
//! activations and gradients through a [`Comm`].
//!
//! The compiler cuts the training step into stages and each stage's work into F, B and W
//! pieces (`fathom_compiler::partition`); [`Pipeline`] compiles the pieces and runs a
//! schedule's per-rank op lists for real: a rank's forward waits for the activation its
//! predecessor sent, its input-gradient backward for the gradient its successor sent, and its
//! weight-gradient backward runs wherever the schedule put it. Parameters held by several
//! ranks (DualPipe's two copies of every stage; the embedding, which the first and last
//! stages both read) have their gradients all-reduced among their holders.

mod comm;
mod error;
mod experts;
mod fault;
mod nccl;
mod pipeline;
mod process;
mod rank;
mod settings;
mod tcp;
mod timeline;
mod zero;

pub use comm::{Comm, CommError, Tag, ThreadComm};
pub use error::{PipelineError, RankFailure};
pub use experts::{ExpertExchange, gathered_at_owners, owner, products_where_owned};
pub use fault::{Fault, FaultKind};
pub use nccl::{NcclComm, nccl_present};
pub use pipeline::{Pipeline, PipelineRun, PipelineStep};
pub use process::{RankStep, any_rank, global_norm_over};
pub use settings::PipelineSettings;
pub use tcp::{Rendezvous, TcpComm, local_rank_from_vars};
pub use zero::{gather_state, share_updates};
