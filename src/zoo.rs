//! Built-in architectures, declared with [`model!`](crate::model), that `fathom train` knows by
//! name (`architecture = "tiny"`).

use crate::compiler::spec::ModelSpec;

crate::model! {
    /// The README's model: every DeepSeek-V3 feature at laptop size. MLA with low-rank queries
    /// and a shared RoPE key under YaRN, DeepSeekMoE with group-limited routing and a shared
    /// expert after one dense block, one Multi-Token Prediction module, and a byte-level
    /// vocabulary so it can read any text. About 300 thousand parameters.
    pub Tiny {
        vocab_size: 256,
        hidden_size: 64,
        layers: 3,
        dense_layers: 1,
        intermediate_size: 128,
        max_positions: 256,
        initializer_range: 0.05,
        attention: {
            heads: 4,
            q_lora_rank: 32,
            kv_lora_rank: 32,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
        },
        rope: {
            theta: 10000.0,
            yarn: { factor: 4.0, original_max_positions: 64, mscale: 1.0, mscale_all_dim: 1.0 },
        },
        moe: {
            routed_experts: 8,
            shared_experts: 1,
            experts_per_token: 2,
            groups: 4,
            groups_per_token: 2,
            intermediate_size: 32,
            routed_scaling_factor: 2.5,
        },
        mtp_depth: 1,
    }
}

/// The names `architecture = "..."` accepts.
pub const NAMES: &[&str] = &["tiny"];

/// The spec of a built-in architecture.
pub fn architecture(name: &str) -> Option<ModelSpec> {
    match name {
        "tiny" => Some(Tiny::spec()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::spec::Architecture;

    #[test]
    fn every_name_resolves_to_a_valid_spec() {
        for name in NAMES {
            let spec = architecture(name).expect("listed names resolve");
            assert_eq!(spec.validate(), vec![], "{name}");
        }
        assert_eq!(Tiny::NAME, "Tiny");
        assert!(architecture("huge").is_none());
    }
}
