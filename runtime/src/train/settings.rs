//! What a training run is: batch shape, steps, optimizer, schedule, losses and balancing.

use fathom_compiler::model::LossWeights;
use fathom_compiler::precision::PrecisionPolicy;
use serde::{Deserialize, Serialize};

use crate::exec::Backend;
use crate::optim::{AdamWConfig, LrSchedule};
use crate::parallel::PipelineSettings;

use super::TrainError;

/// The settings of a run. Serialised into every checkpoint so a resumed run continues the same
/// run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step (gradient
    /// accumulation); the global batch is `batch × micro_batches × data-parallel replicas`
    /// sequences.
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// Optimizer steps of the whole run.
    pub steps: u64,
    #[serde(default)]
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    /// Global gradient-norm clipping threshold; `None` disables clipping.
    #[serde(default = "default_clip")]
    pub clip_norm: Option<f64>,
    #[serde(default = "LossWeights::deepseek_v3")]
    pub losses: LossWeights,
    /// γ of the auxiliary-loss-free balancing: each step, every MoE layer's bias moves by γ
    /// against its expert's load relative to the mean (DeepSeek-V3: 0.001).
    #[serde(default = "default_gamma")]
    pub bias_update_speed: f64,
    /// Where the training graph runs: `cpu` (compiled, the default), `interpreter` (the
    /// reference) or `cuda` (GPU 0; the CPU, said in one line, where there is no GPU). Part of
    /// the run, since backends round differently.
    #[serde(default)]
    pub backend: Backend,
    /// The arithmetic of the Linear GEMMs (`fp32`, `bf16`, `fp8`, or a table with per-module
    /// overrides; see `fathom_compiler::precision`). Master weights, gradients and the
    /// optimizer stay f32 whatever it says.
    #[serde(default)]
    pub precision: PrecisionPolicy,
    /// Pipeline parallelism: stages, schedule and the receive timeout. One stage (the
    /// default) runs the whole model on one rank.
    #[serde(default)]
    pub pipeline: PipelineSettings,
}

fn one() -> usize {
    1
}

fn default_clip() -> Option<f64> {
    Some(1.0)
}

fn default_gamma() -> f64 {
    0.001
}

impl TrainSettings {
    /// Rejects settings no run can use, naming the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, reason: String| {
            Err(TrainError::Settings {
                field: field.to_owned(),
                reason,
            })
        };
        if self.batch == 0 {
            return bad("batch", "must be at least 1".into());
        }
        if self.seq < 2 {
            return bad(
                "seq",
                format!(
                    "must be at least 2 to predict a next token, got {}",
                    self.seq
                ),
            );
        }
        if self.micro_batches == 0 {
            return bad("micro_batches", "must be at least 1".into());
        }
        if !(self.bias_update_speed.is_finite() && self.bias_update_speed >= 0.0) {
            return bad(
                "bias_update_speed",
                format!(
                    "must be a finite number >= 0, got {}",
                    self.bias_update_speed
                ),
            );
        }
        if self.pipeline.stages == 0 {
            return bad("pipeline.stages", "must be at least 1".into());
        }
        if self.pipeline.data_parallel == 0 {
            return bad("pipeline.data_parallel", "must be at least 1".into());
        }
        if let Err(e) = self.precision.validate() {
            return bad("precision", e.to_string());
        }
        self.optimizer.validate().map_err(TrainError::from)?;
        self.schedule.validate().map_err(TrainError::from)?;
        Ok(())
    }

    /// Micro-batches consumed by one optimizer step: `micro_batches` for each data-parallel
    /// replica.
    pub fn micro_batches_per_step(&self) -> usize {
        self.micro_batches * self.pipeline.data_parallel
    }

    /// Tokens consumed by one optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.batch * self.seq * self.micro_batches_per_step()) as u64
    }
}
