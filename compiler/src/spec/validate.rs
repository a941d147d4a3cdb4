//! The rules a `ModelSpec` must satisfy. Each broken rule is reported with the path of the field
//! to fix (`moe.groups`), so the macro can point at it and the config loader can name the key.

use std::fmt;

use super::ModelSpec;

/// One broken rule: the field to fix and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// Dotted path of the field in `ModelSpec` (`attention.qk_rope_head_dim`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for SpecError {}

struct Rules(Vec<SpecError>);

impl Rules {
    fn check(&mut self, ok: bool, field: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(SpecError {
                field: field.to_owned(),
                message: message(),
            });
        }
    }

    fn positive(&mut self, value: usize, field: &str) {
        self.check(value > 0, field, || "must be at least 1".into());
    }

    fn positive_real(&mut self, value: f64, field: &str) {
        self.check(value.is_finite() && value > 0.0, field, || {
            format!("must be a positive finite number, got {value}")
        });
    }
}

impl ModelSpec {
    /// Every broken rule, in field order; empty when the spec describes a buildable model.
    pub fn validate(&self) -> Vec<SpecError> {
        let mut r = Rules(Vec::new());
        r.positive(self.vocab_size, "vocab_size");
        r.positive(self.hidden_size, "hidden_size");
        r.positive(self.layers, "layers");
        r.check(self.dense_layers <= self.layers, "dense_layers", || {
            format!(
                "is {} but the model has only {} layers",
                self.dense_layers, self.layers
            )
        });
        let any_dense = self.dense_layers > 0 || self.moe.is_none();
        if any_dense {
            r.positive(self.intermediate_size, "intermediate_size");
        }
        r.positive_real(self.norm_eps, "norm_eps");
        r.positive(self.max_positions, "max_positions");
        r.check(
            self.initializer_range.is_finite() && self.initializer_range >= 0.0,
            "initializer_range",
            || {
                format!(
                    "must be a finite number >= 0, got {}",
                    self.initializer_range
                )
            },
        );

        let a = &self.attention;
        r.positive(a.heads, "attention.heads");
        if let Some(rank) = a.q_lora_rank {
            r.positive(rank, "attention.q_lora_rank");
        }
        r.positive(a.kv_lora_rank, "attention.kv_lora_rank");
        r.positive(a.qk_nope_head_dim, "attention.qk_nope_head_dim");
        r.positive(a.v_head_dim, "attention.v_head_dim");
        r.check(
            a.qk_rope_head_dim > 0 && a.qk_rope_head_dim.is_multiple_of(2),
            "attention.qk_rope_head_dim",
            || {
                format!(
                    "must be even and positive (RoPE rotates pairs), got {}",
                    a.qk_rope_head_dim
                )
            },
        );

        r.positive_real(self.rope.theta, "rope.theta");
        if let Some(y) = &self.rope.yarn {
            r.check(
                y.factor.is_finite() && y.factor >= 1.0,
                "rope.yarn.factor",
                || format!("must be at least 1, got {}", y.factor),
            );
            r.positive(y.original_max_positions, "rope.yarn.original_max_positions");
            r.positive_real(y.beta_fast, "rope.yarn.beta_fast");
            r.positive_real(y.beta_slow, "rope.yarn.beta_slow");
            r.check(y.beta_fast > y.beta_slow, "rope.yarn.beta_fast", || {
                format!("must exceed beta_slow ({} <= {})", y.beta_fast, y.beta_slow)
            });
        }

        match &self.moe {
            None => r.check(self.dense_layers == self.layers, "moe", || {
                format!(
                    "is missing, but layers {}..{} are MoE layers (dense_layers = {})",
                    self.dense_layers, self.layers, self.dense_layers
                )
            }),
            Some(m) => {
                r.positive(m.routed_experts, "moe.routed_experts");
                r.positive(m.intermediate_size, "moe.intermediate_size");
                r.positive_real(m.routed_scaling_factor, "moe.routed_scaling_factor");
                r.positive(m.groups, "moe.groups");
                let groups_ok = m.groups > 0 && m.routed_experts % m.groups == 0;
                r.check(groups_ok, "moe.groups", || {
                    format!(
                        "{} groups do not divide {} routed experts",
                        m.groups, m.routed_experts
                    )
                });
                if groups_ok {
                    // A group's score is the sum of its two best experts.
                    r.check(m.experts_per_group() >= 2, "moe.groups", || {
                        format!(
                            "each group needs at least 2 experts (its score sums its top 2), \
                             but {} experts in {} groups give {}",
                            m.routed_experts,
                            m.groups,
                            m.experts_per_group()
                        )
                    });
                }
                r.check(
                    m.groups_per_token >= 1 && m.groups_per_token <= m.groups,
                    "moe.groups_per_token",
                    || {
                        format!(
                            "must be in 1..={} (the groups), got {}",
                            m.groups, m.groups_per_token
                        )
                    },
                );
                let reachable = m.groups_per_token.min(m.groups) * m.experts_per_group();
                r.check(
                    m.experts_per_token >= 1 && (!groups_ok || m.experts_per_token <= reachable),
                    "moe.experts_per_token",
                    || {
                        format!(
                            "must be in 1..={reachable} ({} groups per token x {} experts per \
                             group), got {}",
                            m.groups_per_token,
                            m.experts_per_group(),
                            m.experts_per_token
                        )
                    },
                );
            }
        }

        if let Some(fp8) = &self.fp8 {
            for (value, field) in [
                (fp8.activation_tile, "fp8.activation_tile"),
                (fp8.weight_block, "fp8.weight_block"),
            ] {
                r.positive(value, field);
                if value == 0 {
                    continue;
                }
                // Scales are promoted once per tile of the reduction axis, so every GEMM's K must
                // be a whole number of tiles.
                for (dim, name) in self.gemm_reduction_dims() {
                    r.check(dim % value == 0, field, || {
                        format!(
                            "{value} does not divide {name} = {dim}, a GEMM reduction dimension"
                        )
                    });
                }
            }
        }
        r.0
    }

    /// The K extents of the model's Linear layers, with the field that sets each.
    pub fn gemm_reduction_dims(&self) -> Vec<(usize, &'static str)> {
        let a = &self.attention;
        let mut dims = vec![
            (self.hidden_size, "hidden_size"),
            (a.kv_lora_rank, "attention.kv_lora_rank"),
            (
                a.heads * a.v_head_dim,
                "attention.heads x attention.v_head_dim",
            ),
        ];
        if let Some(rank) = a.q_lora_rank {
            dims.push((rank, "attention.q_lora_rank"));
        }
        if self.dense_layers > 0 || self.moe.is_none() {
            dims.push((self.intermediate_size, "intermediate_size"));
        }
        if let Some(m) = &self.moe {
            dims.push((m.intermediate_size, "moe.intermediate_size"));
        }
        dims
    }
}

#[cfg(test)]
mod tests {
    use super::super::{MlaSpec, ModelSpec, MoeSpec};

    fn tiny() -> ModelSpec {
        ModelSpec {
            vocab_size: 64,
            hidden_size: 32,
            layers: 2,
            dense_layers: 1,
            intermediate_size: 48,
            norm_eps: 1e-6,
            max_positions: 64,
            tie_embeddings: false,
            initializer_range: 0.02,
            attention: MlaSpec {
                heads: 2,
                q_lora_rank: Some(16),
                kv_lora_rank: 16,
                qk_nope_head_dim: 8,
                qk_rope_head_dim: 4,
                v_head_dim: 8,
            },
            rope: Default::default(),
            moe: Some(MoeSpec {
                routed_experts: 8,
                shared_experts: 1,
                experts_per_token: 2,
                groups: 4,
                groups_per_token: 2,
                intermediate_size: 16,
                routed_scaling_factor: 2.5,
                normalize_gates: true,
            }),
            mtp_depth: 1,
            fp8: None,
        }
    }

    fn fields(spec: &ModelSpec) -> Vec<String> {
        spec.validate().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_consistent_spec_passes() {
        assert_eq!(tiny().validate(), vec![]);
    }

    #[test]
    fn routing_rules_name_their_fields() {
        let mut s = tiny();
        s.moe.as_mut().unwrap().groups = 3;
        assert_eq!(fields(&s), ["moe.groups"]);

        let mut s = tiny();
        s.moe.as_mut().unwrap().groups_per_token = 5;
        assert!(fields(&s).contains(&"moe.groups_per_token".to_string()));

        let mut s = tiny();
        s.moe.as_mut().unwrap().experts_per_token = 5; // 2 groups x 2 experts reachable
        assert_eq!(fields(&s), ["moe.experts_per_token"]);

        let mut s = tiny();
        s.moe.as_mut().unwrap().groups = 8; // one expert per group
        assert_eq!(fields(&s), ["moe.groups"]);
    }

    #[test]
    fn rope_dims_must_be_even_and_tiles_must_divide() {
        let mut s = tiny();
        s.attention.qk_rope_head_dim = 5;
        assert_eq!(fields(&s), ["attention.qk_rope_head_dim"]);

        let mut s = tiny();
        s.fp8 = Some(super::super::Fp8Spec {
            activation_tile: 16,
            weight_block: 128,
        });
        let errors = s.validate();
        assert!(
            errors.iter().all(|e| e.field == "fp8.weight_block"),
            "{errors:?}"
        );
        assert!(
            errors[0]
                .message
                .contains("does not divide hidden_size = 32")
        );
    }

    #[test]
    fn moe_layers_need_moe_settings() {
        let mut s = tiny();
        s.moe = None;
        assert_eq!(fields(&s), ["moe"]);
    }
}
