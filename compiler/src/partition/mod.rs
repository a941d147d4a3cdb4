//! Cutting a training step into pipeline stages and each stage's work into phases.
//!
//! - [`balance`]: the decoder layers split into contiguous stages of about equal cost, the
//!   embedding on the first stage and the output head with the MTP modules on the last (as in
//!   the DeepSeek-V3 report, where DualPipe puts both ends of the model on one rank).
//! - [`stage`]: one stage's training graph, built from the model library: its forward pass
//!   (from token ids or from the previous stage's hidden states), its share of the objective,
//!   and the gradients of its parameters and of its input.
//! - [`phases`]: a stage graph cut into the three pieces a pipeline schedule runs at different
//!   times: the forward F, the input-gradient backward B (what the previous stage waits for),
//!   and the weight-gradient backward W (which zero-bubble schedules defer), with the tensors
//!   each piece hands to a later one.
//!
//! A stage's objective is its part of the loss: the last stage has the next-token and MTP
//! losses, every stage the balance loss of its own MoE layers, and a stage that is not last
//! adds `Σ hidden.out ⊙ grad.hidden.out`, whose gradient is exactly the backward of the later
//! stages fed back through its output (a vector-Jacobian product). Summed over stages, the
//! parameter gradients are those of the whole model's loss.

pub mod balance;
pub mod phases;
pub mod stage;

pub use balance::{StagePlan, layer_costs};
pub use phases::{Phase, PhaseGraphs, split_phases};
pub use stage::{StageGraph, names, stage_graph};
