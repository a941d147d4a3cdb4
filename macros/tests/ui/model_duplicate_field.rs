fathom_macros::model! {
    /// A tiny DeepSeek-V3.
    pub TinyV3 {
        vocab_size: 256,
        hidden_size: 64,
        layers: 3,
        dense_layers: 1,
        intermediate_size: 128,
        layers: 4,
        attention: { heads: 4, q_lora_rank: 32, kv_lora_rank: 16, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16 },
        moe: { routed_experts: 16, experts_per_token: 4, groups: 4, groups_per_token: 2, intermediate_size: 32 },
    }
}

fn main() {}
