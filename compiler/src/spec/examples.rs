//! Small specs with every feature, for tests, snapshots and examples across the workspace.

use super::{MlaSpec, ModelSpec, MoeSpec, RopeSpec, YarnSpec};

/// The smallest DeepSeek-V3 with every feature: two blocks (one dense, one MoE with 4 routed
/// experts in 2 groups, one kept, top-2, one shared expert), MLA with low-rank queries, YaRN
/// RoPE, one MTP module; hidden size 8, vocabulary 16. Its printed graph and kernels are small
/// enough to snapshot.
pub fn micro() -> ModelSpec {
    ModelSpec {
        vocab_size: 16,
        hidden_size: 8,
        layers: 2,
        dense_layers: 1,
        intermediate_size: 12,
        norm_eps: 1e-6,
        max_positions: 16,
        tie_embeddings: false,
        initializer_range: 0.02,
        attention: MlaSpec {
            heads: 2,
            q_lora_rank: Some(6),
            kv_lora_rank: 4,
            qk_nope_head_dim: 4,
            qk_rope_head_dim: 2,
            v_head_dim: 4,
        },
        rope: RopeSpec {
            theta: 10000.0,
            interleaved: true,
            yarn: Some(YarnSpec {
                factor: 4.0,
                original_max_positions: 4,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
                attention_factor: None,
                truncate: true,
            }),
        },
        moe: Some(MoeSpec {
            routed_experts: 4,
            shared_experts: 1,
            experts_per_token: 2,
            groups: 2,
            groups_per_token: 1,
            intermediate_size: 4,
            routed_scaling_factor: 2.5,
            normalize_gates: true,
        }),
        mtp_depth: 1,
        fp8: None,
    }
}

/// A model that learns the synthetic task within a few dozen steps on the CPU: hidden 32,
/// vocabulary 16, a dense block then an MoE block (4 experts in 2 groups, one kept, top-2, one
/// shared), MLA with low-rank queries, plain RoPE, one MTP module.
pub fn small() -> ModelSpec {
    ModelSpec {
        vocab_size: 16,
        hidden_size: 32,
        layers: 2,
        dense_layers: 1,
        intermediate_size: 64,
        norm_eps: 1e-6,
        max_positions: 64,
        tie_embeddings: false,
        initializer_range: 0.1,
        attention: MlaSpec {
            heads: 2,
            q_lora_rank: Some(16),
            kv_lora_rank: 16,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 8,
            v_head_dim: 8,
        },
        rope: RopeSpec::default(),
        moe: Some(MoeSpec {
            routed_experts: 4,
            shared_experts: 1,
            experts_per_token: 2,
            groups: 2,
            groups_per_token: 1,
            intermediate_size: 16,
            routed_scaling_factor: 1.0,
            normalize_gates: true,
        }),
        mtp_depth: 1,
        fp8: None,
    }
}
