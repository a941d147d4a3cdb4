//! Reading and writing Hugging Face DeepSeek-V3 `config.json` files.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use fathom_compiler::spec::hf::{
    ConfigError, config_json, spec_from_config, spec_from_config_json,
};
use serde_json::{Value, json};

fn fixture_config(name: &str) -> String {
    let path = format!(
        "{}/../tests/fixtures/{name}/config.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).expect("fixture config")
}

fn v3() -> Value {
    serde_json::from_str(include_str!("../../examples/configs/deepseek-v3-671b.json")).unwrap()
}

fn load(value: &Value) -> Result<fathom_compiler::spec::ModelSpec, ConfigError> {
    spec_from_config(value.as_object().unwrap())
}

#[test]
fn the_hub_config_of_deepseek_v3_reads_with_rope_scaling() {
    let spec = load(&v3()).unwrap();
    assert_eq!(spec.layers, 61);
    assert_eq!(spec.dense_layers, 3);
    let moe = spec.moe.as_ref().unwrap();
    assert_eq!(
        (moe.routed_experts, moe.groups, moe.groups_per_token),
        (256, 8, 4)
    );
    let yarn = spec.rope.yarn.as_ref().unwrap();
    assert_eq!((yarn.factor, yarn.original_max_positions), (40.0, 4096));
    assert_eq!((yarn.mscale, yarn.mscale_all_dim), (1.0, 1.0));
    assert_eq!(spec.mtp_depth, 1);
}

#[test]
fn newer_transformers_configs_read_with_rope_parameters() {
    let spec = spec_from_config_json(&fixture_config("yarn")).unwrap();
    let yarn = spec.rope.yarn.as_ref().unwrap();
    assert_eq!((yarn.factor, yarn.original_max_positions), (4.0, 16));
    assert_eq!(spec.rope.theta, 10000.0);
    let plain = spec_from_config_json(&fixture_config("moe_grouped")).unwrap();
    assert!(plain.rope.yarn.is_none());
    let direct = spec_from_config_json(&fixture_config("no_q_lora")).unwrap();
    assert_eq!(direct.attention.q_lora_rank, None);
    assert!(direct.tie_embeddings && !direct.rope.interleaved);
}

#[test]
fn what_fathom_writes_reads_back_identically() {
    for name in [
        "moe_grouped",
        "yarn",
        "yarn_ramp",
        "shared2_dense2",
        "no_q_lora",
    ] {
        let spec = spec_from_config_json(&fixture_config(name)).unwrap();
        let written = config_json(&spec);
        assert_eq!(load(&written).unwrap(), spec, "{name}");
    }
}

#[test]
fn errors_name_the_key() {
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unknown",
            Box::new(|c| {
                c.insert("hiden_size".into(), json!(8));
            }),
            "config key `hiden_size` is not a DeepSeek-V3 setting",
        ),
        (
            "missing",
            Box::new(|c| {
                c.remove("kv_lora_rank");
            }),
            "config key `kv_lora_rank` is missing",
        ),
        (
            "type",
            Box::new(|c| {
                c.insert("hidden_size".into(), json!("big"));
            }),
            "config key `hidden_size`: expected a non-negative integer, found \"big\"",
        ),
        (
            "act",
            Box::new(|c| {
                c.insert("hidden_act".into(), json!("gelu"));
            }),
            "config key `hidden_act` = \"gelu\"",
        ),
        (
            "rope",
            Box::new(|c| {
                c.insert(
                    "rope_scaling".into(),
                    json!({"type": "linear", "factor": 2.0}),
                );
            }),
            "`rope_scaling.rope_type` = \"linear\"",
        ),
        (
            "groups",
            Box::new(|c| {
                c.insert("n_group".into(), json!(7));
            }),
            "config key `n_group`: 7 groups do not divide 256 routed experts",
        ),
        (
            "topk",
            Box::new(|c| {
                c.insert("topk_group".into(), json!(9));
            }),
            "config key `topk_group`",
        ),
        (
            "rope dim",
            Box::new(|c| {
                c.insert("qk_rope_head_dim".into(), json!(63));
            }),
            "config key `qk_rope_head_dim`: must be even",
        ),
    ];
    for (what, edit, expected) in cases {
        let mut config = v3();
        edit(config.as_object_mut().unwrap());
        let error = load(&config).expect_err(what).to_string();
        assert!(error.contains(expected), "{what}: {error}");
    }
}

#[test]
fn malformed_json_is_an_error() {
    let error = spec_from_config_json("{\"hidden_size\": ").unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("config.json is not valid JSON"),
        "{error}"
    );
    assert_eq!(
        spec_from_config_json("[1]").unwrap_err(),
        ConfigError::NotAnObject
    );
}
