//! What one optimizer step reports (and what the metrics file records, one JSON line a step).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step just taken, counting from 1.
    pub step: u64,
    /// The weighted total loss, averaged over the micro-batches.
    pub loss: f64,
    /// The next-token cross-entropy alone.
    pub loss_next_token: f64,
    /// The unweighted MTP loss, when on.
    pub loss_mtp: Option<f64>,
    /// The unweighted balance loss (summed over MoE layers), when on.
    pub loss_balance: Option<f64>,
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Worst MoE layer's `(max load - mean load) / mean load` over the step's tokens (0 is
    /// perfectly balanced); `None` without MoE layers.
    pub max_load_violation: Option<f64>,
    /// Tokens routed to each expert during the step, per MoE layer (keyed by the layer's
    /// balancing-bias name), summed over micro-batches.
    pub expert_loads: std::collections::BTreeMap<String, Vec<f64>>,
    pub tokens: u64,
    pub seconds: f64,
}

impl StepReport {
    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// One JSON line for the metrics file.
    pub fn json_line(&self) -> String {
        let mut value = serde_json::to_value(self).expect("reports serialise");
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("tokens_per_second".into(), self.tokens_per_second().into());
        }
        value.to_string()
    }
}
