//! Host-side optimisation for training, following DeepSeek-V3 (SPEC §1–2): AdamW with FP32
//! master weights and BF16 moments ([`AdamW`]), the learning-rate schedule ([`LrSchedule`]),
//! global-norm gradient clipping and micro-batch accumulation ([`clip_global_norm`],
//! [`accumulate`]), and auxiliary-loss-free expert balancing ([`update_balancing_bias`],
//! [`LoadStats`]).
//!
//! Plain host code over name-keyed maps: every loop runs in name order, so results are
//! deterministic. Gradients are [`Grads`], one flat row-major `Vec<f32>` per parameter. Nothing
//! here panics on bad input: every check returns an [`OptimError`] naming the parameter, tensor
//! or field, and every function that mutates validates first, so an error leaves its inputs
//! untouched.

mod adamw;
mod balance;
mod config;
mod grads;
mod schedule;
mod store;
mod zero;

pub use adamw::{
    AdamW, MomentPart, UpdateScalars, update_with_bf16_moments, update_with_f32_moments,
};
pub use balance::{LoadStats, add_expert_load, update_balancing_bias};
pub use config::{AdamWConfig, MomentPrecision, decays, is_balancing_bias};
pub use grads::{
    NORM_CHUNK, accumulate, accumulate_owned, clip_coefficient, clip_global_norm, clip_to_norm,
    global_norm, norm_of_square_sums, square_sums,
};
pub use schedule::LrSchedule;
pub use store::ParamStore;
pub use zero::{Piece, ShardPlan, ShardedAdamW};

use std::collections::BTreeMap;

use thiserror::Error;

/// Gradients by parameter name: flat, row-major, as many values as the parameter has.
pub type Grads = BTreeMap<String, Vec<f32>>;

/// Everything the optimiser can refuse. Each variant names the parameter, state tensor or
/// configuration field concerned.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum OptimError {
    /// A configuration value or argument out of range (`field` is e.g. `beta2`, `final_lr`,
    /// `lr`, `max_norm`, `gamma`).
    #[error("invalid {field} = {value}: {reason}")]
    InvalidValue {
        field: &'static str,
        value: f64,
        reason: &'static str,
    },
    /// A trainable parameter got no gradient this step.
    #[error("no gradient for trainable parameter `{param}`")]
    MissingGradient { param: String },
    /// A gradient for a name the optimiser does not train.
    #[error("gradient for `{param}`, which is not a trainable parameter")]
    UnexpectedGradient { param: String },
    /// A gradient (or accumulated gradient) of the wrong length.
    #[error("gradient for `{param}` has {found} values, expected {expected}")]
    GradientLength {
        param: String,
        expected: usize,
        found: usize,
    },
    /// A trainable parameter absent from the parameters passed to `step`.
    #[error("trainable parameter `{param}` is missing from the parameters")]
    MissingParameter { param: String },
    /// The same parameter given twice.
    #[error("parameter `{param}` is given twice")]
    DuplicateParameter { param: String },
    /// A parameter that is not an f32 tensor, or not of the shape the optimiser state has.
    #[error("parameter `{param}`: {detail}")]
    BadParameter { param: String, detail: String },
    /// Optimiser state lacking a tensor it needs.
    #[error("optimizer state lacks `{tensor}`")]
    MissingState { tensor: String },
    /// An optimiser state tensor of the wrong name, type, shape or value.
    #[error("optimizer state tensor `{tensor}`: {detail}")]
    BadState { tensor: String, detail: String },
    /// Per-expert vectors that disagree in length (`what` says which).
    #[error("{what}: {found} values, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    /// An expert load that is negative or not finite.
    #[error("load of expert {expert} is {value}: loads must be finite and non-negative")]
    BadLoad { expert: usize, value: f64 },
    /// A routed expert id outside `0..experts`.
    #[error("expert id {id} at position {position} is outside 0..{experts}")]
    ExpertOutOfRange {
        id: i64,
        position: usize,
        experts: usize,
    },
}

/// Checks `value` is finite and not negative.
pub(crate) fn non_negative(field: &'static str, value: f64) -> Result<(), OptimError> {
    check(
        field,
        value,
        value >= 0.0,
        "must be finite and not negative",
    )
}

/// Checks `value` is finite and positive.
pub(crate) fn positive(field: &'static str, value: f64) -> Result<(), OptimError> {
    check(field, value, value > 0.0, "must be finite and positive")
}

fn check(
    field: &'static str,
    value: f64,
    ok: bool,
    reason: &'static str,
) -> Result<(), OptimError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(OptimError::InvalidValue {
            field,
            value,
            reason,
        })
    }
}
