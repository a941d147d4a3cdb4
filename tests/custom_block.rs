//! A user-defined block, declared with `#[derive(fathom::Module)]`, composed with the built-in
//! attention, MLP and norms into the built-in model, and run.

use std::collections::HashMap;

use fathom::compiler::model::{
    AttentionContext, DeepSeekV3, ForwardOptions, Layer, LayerConfig, LayerOutput, Mla, Mlp,
    MlpShape, NormConfig, RmsNorm, forward_outputs,
};
use fathom::compiler::module::{Module, Scope};
use fathom::compiler::spec::Architecture;
use fathom::compiler::{GraphBuilder, GraphError, Tensor};
use fathom::runtime::HostTensor;
use fathom::runtime::init::init_parameters;
use fathom::runtime::interp::{Feeds, evaluate};

fathom::model! {
    /// Dense blocks only; the block type is chosen in Rust.
    Small {
        vocab_size: 32,
        hidden_size: 16,
        layers: 2,
        dense_layers: 2,
        intermediate_size: 24,
        max_positions: 16,
        attention: { heads: 2, q_lora_rank: 8, kv_lora_rank: 8, qk_nope_head_dim: 4, qk_rope_head_dim: 4, v_head_dim: 4 },
        moe: none,
    }
}

/// The original Transformer's post-norm placement: `h = norm(x + attn(x)); out = norm(h + mlp(h))`.
#[derive(fathom::Module)]
#[module(config = LayerConfig)]
struct PostNormBlock {
    #[module(name = "self_attn", config = config.spec)]
    attention: Mla,
    #[module(name = "mlp", config = MlpShape { hidden_size: config.spec.hidden_size, intermediate_size: config.spec.intermediate_size })]
    ffn: Mlp,
    #[module(name = "attention_norm", config = NormConfig::new(config.spec.hidden_size, config.spec.norm_eps))]
    attention_norm: RmsNorm,
    #[module(name = "ffn_norm", config = NormConfig::new(config.spec.hidden_size, config.spec.norm_eps))]
    ffn_norm: RmsNorm,
}

impl Layer for PostNormBlock {
    fn forward(
        &self,
        g: &mut GraphBuilder,
        x: Tensor,
        ctx: &AttentionContext,
    ) -> Result<LayerOutput, GraphError> {
        let attended = self.attention.forward(g, x, ctx)?;
        let h = g.add(x, attended)?;
        let h = self.attention_norm.forward(g, h)?;
        let transformed = self.ffn.forward(g, h)?;
        let out = g.add(h, transformed)?;
        Ok(self.ffn_norm.forward(g, out)?.into())
    }
}

#[test]
fn a_post_norm_block_composes_with_the_built_in_model() {
    let spec = Small::spec();
    let mut g = GraphBuilder::new("post_norm");
    let model: DeepSeekV3<PostNormBlock> =
        DeepSeekV3::declare(&mut Scope::root(&mut g), &spec).expect("declares");
    let names: Vec<String> = model.parameters().into_iter().map(|p| p.name).collect();
    assert!(names.contains(&"model.layers.1.attention_norm.weight".to_string()));
    assert!(names.contains(&"model.layers.0.self_attn.kv_b_proj.weight".to_string()));
    assert!(names.contains(&"model.layers.1.mlp.down_proj.weight".to_string()));
    assert!(!names.iter().any(|n| n.contains("input_layernorm")));

    let options = ForwardOptions {
        batch: 2,
        seq: 5,
        with_mtp: false,
    };
    forward_outputs(&mut g, &model, options).expect("builds");
    let graph = g.finish();
    graph.validate().expect("valid");
    let weights = init_parameters(&graph, 0.2, 1);
    let ids = HostTensor::i64([2, 5], (0..10).collect());
    let inputs = HashMap::from([("input_ids", ids)]);
    let outputs = evaluate(&graph, &Feeds::new(&inputs, &weights)).expect("runs");
    let logits = outputs.get("logits").unwrap();
    assert_eq!(logits.dims(), [2, 5, 32]);
    assert!(logits.as_f32().unwrap().iter().all(|v| v.is_finite()));
    assert_eq!(Small::NAME, "Small");
}
