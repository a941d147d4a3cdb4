//! AdamW's hyper-parameters and which parameters it decays.

use serde::{Deserialize, Serialize};

use super::{OptimError, non_negative, positive};

/// How the moments are stored. Arithmetic is f32 either way; `Bf16` rounds each moment to the
/// nearest bf16 (ties to even) every time it is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentPrecision {
    F32,
    #[default]
    Bf16,
}

impl MomentPrecision {
    /// Bytes of one moment element.
    pub fn bytes(self) -> usize {
        match self {
            MomentPrecision::F32 => 4,
            MomentPrecision::Bf16 => 2,
        }
    }
}

/// AdamW hyper-parameters (the learning rate comes from the schedule, per step). Serialised
/// with these field names; absent fields take the DeepSeek-V3 values of [`Default`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub moments: MomentPrecision,
}

impl Default for AdamWConfig {
    /// DeepSeek-V3's settings (report §4.2): betas (0.9, 0.95), weight decay 0.1, BF16 moments;
    /// eps 1e-8.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            moments: MomentPrecision::Bf16,
        }
    }
}

impl AdamWConfig {
    /// Betas in `[0, 1)`, `eps > 0` (so a zero gradient cannot divide 0 by 0), weight decay
    /// `>= 0`, all finite.
    pub fn validate(&self) -> Result<(), OptimError> {
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(OptimError::InvalidValue {
                    field,
                    value: beta,
                    reason: "must be in [0, 1)",
                });
            }
        }
        positive("eps", self.eps)?;
        non_negative("weight_decay", self.weight_decay)
    }
}

/// Whether AdamW applies weight decay to a parameter: matrices and higher-rank tensors (linear
/// weights, embeddings, stacked experts) decay; vectors and scalars (RMSNorm weights, biases)
/// do not. The rule is the rank alone; `name` is taken so that a name-based exception can be
/// added without changing callers.
pub fn decays(name: &str, dims: &[usize]) -> bool {
    let _ = name;
    dims.len() >= 2
}

/// Whether `name` is a MoE gate's balancing bias (`….mlp.gate.e_score_correction_bias`). It gets
/// no gradient ([`super::update_balancing_bias`] moves it), so leave it out of [`super::AdamW::new`].
pub fn is_balancing_bias(name: &str) -> bool {
    name.rsplit('.').next() == Some("e_score_correction_bias")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decay_rule_and_balancing_bias_names() {
        assert!(decays(
            "model.layers.0.self_attn.q_a_proj.weight",
            &[24, 32]
        ));
        assert!(decays("model.embed_tokens.weight", &[64, 32]));
        assert!(decays("experts", &[4, 8, 16]));
        assert!(!decays("model.norm.weight", &[32]));
        assert!(!decays("scalar", &[]));
        assert!(is_balancing_bias(
            "model.layers.3.mlp.gate.e_score_correction_bias"
        ));
        assert!(!is_balancing_bias("model.layers.3.mlp.gate.weight"));
    }

    #[test]
    fn config_serde_and_validation() {
        let c = AdamWConfig::default();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"beta1":0.9,"beta2":0.95,"eps":1e-8,"weight_decay":0.1,"moments":"bf16"}"#
        );
        let partial: AdamWConfig = serde_json::from_str(r#"{"moments":"f32","eps":1e-6}"#).unwrap();
        assert_eq!(
            partial,
            AdamWConfig {
                moments: MomentPrecision::F32,
                eps: 1e-6,
                ..c
            }
        );
        assert!(serde_json::from_str::<AdamWConfig>(r#"{"beta":0.9}"#).is_err());
        assert!(serde_json::from_str::<AdamWConfig>(r#"{"moments":"fp8"}"#).is_err());
        c.validate().unwrap();
        let err = |c: AdamWConfig| c.validate().unwrap_err().to_string();
        assert_eq!(
            err(AdamWConfig { beta1: -0.1, ..c }),
            "invalid beta1 = -0.1: must be in [0, 1)"
        );
        assert_eq!(
            err(AdamWConfig { eps: 0.0, ..c }),
            "invalid eps = 0: must be finite and positive"
        );
        assert_eq!(
            err(AdamWConfig {
                weight_decay: f64::INFINITY,
                ..c
            }),
            "invalid weight_decay = inf: must be finite and not negative"
        );
    }
}
