//! The facade's macros end to end: `fathom::model!` declarations and `#[derive(fathom::Module)]`
//! structs, expanded against the real compiler API. (The macro errors are tested with trybuild
//! in `macros/tests/ui`.)

use fathom::compiler::GraphBuilder;
use fathom::compiler::module::{Module, Param, Scope};
use fathom::compiler::spec::{
    Architecture, Fp8Spec, MlaSpec, ModelSpec, MoeSpec, RopeSpec, YarnSpec,
};

fathom::model! {
    /// A tiny DeepSeek-V3 for tests.
    pub TinyV3 {
        vocab_size: 256,
        hidden_size: 64,
        layers: 3,
        dense_layers: 1,
        intermediate_size: 128,
        norm_eps: 1e-6,
        max_positions: 64,
        tie_embeddings: false,
        attention: { heads: 4, q_lora_rank: 32, kv_lora_rank: 16, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16 },
        rope: { theta: 10000.0, interleaved: true, yarn: { factor: 4.0, original_max_positions: 16, mscale_all_dim: 1.0 } },
        moe: { routed_experts: 16, shared_experts: 1, experts_per_token: 4, groups: 4, groups_per_token: 2, intermediate_size: 32, routed_scaling_factor: 2.5 },
        mtp_depth: 1,
        fp8: { activation_tile: 16, weight_block: 16 },
    }
}

fathom::model! {
    /// Dense layers only, queries without compression.
    Dense {
        vocab_size: 32,
        hidden_size: 16,
        layers: 2,
        dense_layers: 2,
        intermediate_size: 32,
        attention: { heads: 2, q_lora_rank: none, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 },
        moe: none,
    }
}

#[test]
fn a_declared_model_has_the_written_spec() {
    let expected = ModelSpec {
        vocab_size: 256,
        hidden_size: 64,
        layers: 3,
        dense_layers: 1,
        intermediate_size: 128,
        norm_eps: 1e-6,
        max_positions: 64,
        tie_embeddings: false,
        initializer_range: 0.02,
        attention: MlaSpec {
            heads: 4,
            q_lora_rank: Some(32),
            kv_lora_rank: 16,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
        },
        rope: RopeSpec {
            theta: 10000.0,
            interleaved: true,
            yarn: Some(YarnSpec {
                factor: 4.0,
                original_max_positions: 16,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 0.0,
                mscale_all_dim: 1.0,
                attention_factor: None,
                truncate: true,
            }),
        },
        moe: Some(MoeSpec {
            routed_experts: 16,
            shared_experts: 1,
            experts_per_token: 4,
            groups: 4,
            groups_per_token: 2,
            intermediate_size: 32,
            routed_scaling_factor: 2.5,
            normalize_gates: true,
        }),
        mtp_depth: 1,
        fp8: Some(Fp8Spec {
            activation_tile: 16,
            weight_block: 16,
        }),
    };
    assert_eq!(TinyV3::spec(), expected);
    assert_eq!(<TinyV3 as Architecture>::spec(), expected);
    assert_eq!(TinyV3::NAME, "TinyV3");
    assert_eq!(expected.validate(), vec![]);
}

/// Omitted fields take the same defaults as a deserialized config.
#[test]
fn omitted_fields_take_the_serde_defaults() {
    let json = serde_json::json!({
        "vocab_size": 32, "hidden_size": 16, "layers": 2, "dense_layers": 2,
        "intermediate_size": 32,
        "attention": { "heads": 2, "q_lora_rank": null, "kv_lora_rank": 8,
                       "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8 },
        "moe": null,
    });
    let expected: ModelSpec = serde_json::from_value(json).expect("a valid spec");
    assert_eq!(Dense::spec(), expected);
    assert_eq!(Dense::NAME, "Dense");
    assert_eq!(Dense::spec().validate(), vec![]);
}

#[derive(fathom::Module)]
#[module(config = usize)]
struct Inner {
    #[module(config = [*config, *config])]
    weight: Param,
}

#[derive(fathom::Module)]
#[module(config = usize)]
struct Expert {
    #[module(config = [2 * *config, *config])]
    w: Param,
}

/// Declared with `name = ""`: its parameters land in the parent's scope.
#[derive(fathom::Module)]
#[module(config = usize)]
struct Bias {
    #[module(config = [*config])]
    bias: Param,
}

#[derive(fathom::Module)]
#[module(config = ModelSpec)]
struct Block {
    #[module(config = config.hidden_size)]
    inner: Inner,
    #[module(name = "post_norm", config = [config.hidden_size])]
    gain: Param,
    #[module(config = (config.moe.as_ref().map_or(0, |moe| moe.routed_experts), config.hidden_size))]
    experts: Vec<Expert>,
    #[module(name = "", config = config.hidden_size)]
    flattened: Bias,
    #[module(skip)]
    forward_calls: usize,
}

#[derive(fathom::Module)]
#[module(config = ModelSpec)]
struct Top {
    #[module(config = *config)]
    block: Block,
}

/// Generic over the sub-module, as a layer stack would be.
#[derive(fathom::Module)]
#[module(config = M::Config)]
struct Pair<M: Module>
where
    M::Config: Sized,
{
    #[module(name = "a", config = *config)]
    first: M,
    #[module(name = "b", config = *config)]
    second: M,
}

#[test]
fn derived_modules_declare_their_parameters_under_checkpoint_names() {
    let spec = TinyV3::spec();
    let mut builder = GraphBuilder::new("t");
    let top = Top::declare(&mut Scope::root(&mut builder), &spec).expect("declares");
    assert_eq!(top.block.forward_calls, 0);
    assert_eq!(top.block.experts.len(), 16);

    let graph = builder.finish();
    let declared: Vec<(String, Vec<usize>)> = graph
        .parameters()
        .map(|(_, name, ty)| (name.to_owned(), ty.dims().to_vec()))
        .collect();
    let mut expected = vec![
        ("block.inner.weight".to_owned(), vec![64, 64]),
        ("block.post_norm".to_owned(), vec![64]),
    ];
    expected.extend((0..16).map(|e| (format!("block.experts.{e}.w"), vec![128, 64])));
    expected.push(("block.bias".to_owned(), vec![64]));
    assert_eq!(declared, expected);

    // `parameters()` visits in declaration order, with the graph's names and nodes.
    let visited: Vec<(String, _)> = top
        .parameters()
        .into_iter()
        .map(|p| (p.name, p.tensor))
        .collect();
    let in_graph: Vec<(String, _)> = graph
        .parameters()
        .map(|(id, name, _)| (name.to_owned(), id))
        .collect();
    assert_eq!(visited.len(), in_graph.len());
    for ((name, tensor), (graph_name, id)) in visited.iter().zip(&in_graph) {
        assert_eq!(name, graph_name);
        assert_eq!(tensor.id(), *id);
    }
}

#[test]
fn a_generic_module_declares_each_instance() {
    let mut builder = GraphBuilder::new("t");
    let mut root = Scope::root(&mut builder);
    let pair = root.declare::<Pair<Inner>>("pair", &8).expect("declares");
    let names: Vec<String> = pair.parameters().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["pair.a.weight", "pair.b.weight"]);
}

/// The builder refuses a second parameter of the same name, and the derived `declare` passes
/// the error on.
#[test]
fn declaring_twice_is_an_error_not_a_panic() {
    let mut builder = GraphBuilder::new("t");
    let mut root = Scope::root(&mut builder);
    root.declare::<Inner>("x", &4).expect("first declaration");
    assert!(root.declare::<Inner>("x", &4).is_err());
}
