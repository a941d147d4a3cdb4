//! Hugging Face `config.json` <-> [`ModelSpec`].
//!
//! Accepts both RoPE layouts in the wild: hub checkpoints' `rope_theta` + `rope_scaling`, and
//! newer `transformers`' `rope_parameters`. Keys that `transformers` writes but that do not change
//! the model (token ids, dtype, caching flags) are accepted and ignored; an unknown key, a missing
//! required key, a value of the wrong type, or a setting Fathom does not implement is an error that
//! names the key.

use serde_json::{Map, Value, json};
use thiserror::Error;

use super::{MlaSpec, ModelSpec, MoeSpec, RopeSpec, SpecError, YarnSpec};

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("config.json is not valid JSON: {0}")]
    Json(String),
    #[error("config.json must be a JSON object")]
    NotAnObject,
    #[error("config key `{key}` is missing")]
    Missing { key: String },
    #[error("config key `{key}`: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("config key `{key}` is not a DeepSeek-V3 setting Fathom knows")]
    Unknown { key: String },
    #[error("config key `{key}` = {value}: {reason}")]
    Unsupported {
        key: String,
        value: String,
        reason: String,
    },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// Keys written by `transformers` (or found in hub configs) that carry nothing Fathom's model
/// depends on.
const IGNORED_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "attention_dropout",
    "pretraining_tp",
    "num_key_value_heads",
    "head_dim",
    "qk_head_dim",
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "quantization_config",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "task_specific_params",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "chunk_size",
    "mlp_bias",
    "output_router_logits",
    "router_aux_loss_coef",
    "layer_types",
];

/// Keys with a fixed value in DeepSeek-V3 that Fathom implements only in that form.
const FIXED_KEYS: &[(&str, &str)] = &[
    ("hidden_act", "\"silu\""),
    ("scoring_func", "\"sigmoid\""),
    ("topk_method", "\"noaux_tc\""),
    ("attention_bias", "false"),
    ("moe_layer_freq", "1"),
];

/// Reads a `config.json`. Returns the spec and notes for the user (such as a key that was
/// ignored because it does not affect the model).
pub fn spec_from_config_json(text: &str) -> Result<ModelSpec, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(ConfigError::NotAnObject);
    };
    spec_from_config(&map)
}

pub fn spec_from_config(map: &Map<String, Value>) -> Result<ModelSpec, ConfigError> {
    let c = Config(map);
    for key in map.keys() {
        let known = KNOWN_KEYS.contains(&key.as_str())
            || IGNORED_KEYS.contains(&key.as_str())
            || FIXED_KEYS.iter().any(|(k, _)| k == key);
        if !known {
            return Err(ConfigError::Unknown { key: key.clone() });
        }
    }
    for (key, expected) in FIXED_KEYS {
        if let Some(value) = map.get(*key) {
            let expected_value: Value = serde_json::from_str(expected).expect("valid literal");
            if *value != expected_value {
                return Err(ConfigError::Unsupported {
                    key: (*key).into(),
                    value: value.to_string(),
                    reason: format!("Fathom implements DeepSeek-V3's {expected} only"),
                });
            }
        }
    }

    let routed = c.opt_usize("n_routed_experts")?;
    let moe = match routed {
        Some(routed_experts) if routed_experts > 0 => Some(MoeSpec {
            routed_experts,
            shared_experts: c.opt_usize("n_shared_experts")?.unwrap_or(0),
            experts_per_token: c.usize("num_experts_per_tok")?,
            groups: c.opt_usize("n_group")?.unwrap_or(1),
            groups_per_token: c.opt_usize("topk_group")?.unwrap_or(1),
            intermediate_size: c.usize("moe_intermediate_size")?,
            routed_scaling_factor: c.opt_f64("routed_scaling_factor")?.unwrap_or(1.0),
            normalize_gates: c.opt_bool("norm_topk_prob")?.unwrap_or(true),
        }),
        _ => None,
    };
    let layers = c.usize("num_hidden_layers")?;
    let spec = ModelSpec {
        vocab_size: c.usize("vocab_size")?,
        hidden_size: c.usize("hidden_size")?,
        layers,
        dense_layers: match &moe {
            Some(_) => c.opt_usize("first_k_dense_replace")?.unwrap_or(0),
            None => layers,
        },
        intermediate_size: c.usize("intermediate_size")?,
        norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        max_positions: c.opt_usize("max_position_embeddings")?.unwrap_or(4096),
        tie_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        initializer_range: c.opt_f64("initializer_range")?.unwrap_or(0.02),
        attention: MlaSpec {
            heads: c.usize("num_attention_heads")?,
            q_lora_rank: c.opt_usize("q_lora_rank")?,
            kv_lora_rank: c.usize("kv_lora_rank")?,
            qk_nope_head_dim: c.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: c.usize("qk_rope_head_dim")?,
            v_head_dim: c.usize("v_head_dim")?,
        },
        rope: rope_from_config(&c)?,
        moe,
        mtp_depth: c.opt_usize("num_nextn_predict_layers")?.unwrap_or(0),
        fp8: None,
    };
    if let Some(error) = spec.validate().into_iter().next() {
        return Err(ConfigError::Invalid {
            key: hf_key(&error.field).to_owned(),
            message: error.message,
        });
    }
    Ok(spec)
}

const KNOWN_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_shared_experts",
    "n_routed_experts",
    "routed_scaling_factor",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "n_group",
    "topk_group",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "norm_topk_prob",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_interleave",
    "num_nextn_predict_layers",
];

/// The HF key that sets a `ModelSpec` field, for error messages about loaded configs.
pub fn hf_key(field: &str) -> &str {
    match field {
        "layers" => "num_hidden_layers",
        "dense_layers" => "first_k_dense_replace",
        "norm_eps" => "rms_norm_eps",
        "max_positions" => "max_position_embeddings",
        "tie_embeddings" => "tie_word_embeddings",
        "attention.heads" => "num_attention_heads",
        "attention.q_lora_rank" => "q_lora_rank",
        "attention.kv_lora_rank" => "kv_lora_rank",
        "attention.qk_nope_head_dim" => "qk_nope_head_dim",
        "attention.qk_rope_head_dim" => "qk_rope_head_dim",
        "attention.v_head_dim" => "v_head_dim",
        "rope.theta" => "rope_theta",
        "rope.yarn.factor" => "rope_scaling.factor",
        "rope.yarn.original_max_positions" => "rope_scaling.original_max_position_embeddings",
        "rope.yarn.beta_fast" => "rope_scaling.beta_fast",
        "rope.yarn.beta_slow" => "rope_scaling.beta_slow",
        "moe" | "moe.routed_experts" => "n_routed_experts",
        "moe.shared_experts" => "n_shared_experts",
        "moe.experts_per_token" => "num_experts_per_tok",
        "moe.groups" => "n_group",
        "moe.groups_per_token" => "topk_group",
        "moe.intermediate_size" => "moe_intermediate_size",
        "moe.routed_scaling_factor" => "routed_scaling_factor",
        other => other,
    }
}

fn rope_from_config(c: &Config<'_>) -> Result<RopeSpec, ConfigError> {
    let interleaved = c.opt_bool("rope_interleave")?.unwrap_or(true);
    // Newer transformers: everything in `rope_parameters`; hub configs: `rope_theta` beside an
    // optional `rope_scaling`.
    let (params_key, params) = match (c.0.get("rope_parameters"), c.0.get("rope_scaling")) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let params = match params {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(other) => {
            return Err(ConfigError::WrongType {
                key: params_key.into(),
                expected: "an object",
                found: other.to_string(),
            });
        }
    };
    let nested = params.map(Config);
    let theta = match nested
        .as_ref()
        .map(|n| n.opt_f64("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(theta) => theta,
        None => c.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    let Some(p) = nested else {
        return Ok(RopeSpec {
            theta,
            interleaved,
            yarn: None,
        });
    };
    let key = |k: &str| format!("{params_key}.{k}");
    let kind = p
        .opt_str("rope_type")?
        .or(p.opt_str("type")?)
        .unwrap_or("default");
    let yarn = match kind {
        "default" => None,
        "yarn" => Some(YarnSpec {
            factor: p
                .opt_f64("factor")?
                .ok_or(ConfigError::Missing { key: key("factor") })?,
            original_max_positions: p
                .opt_usize("original_max_position_embeddings")?
                .or(c.opt_usize("max_position_embeddings")?)
                .ok_or(ConfigError::Missing {
                    key: key("original_max_position_embeddings"),
                })?,
            beta_fast: p.opt_f64("beta_fast")?.unwrap_or(32.0),
            beta_slow: p.opt_f64("beta_slow")?.unwrap_or(1.0),
            mscale: p.opt_f64("mscale")?.unwrap_or(0.0),
            mscale_all_dim: p.opt_f64("mscale_all_dim")?.unwrap_or(0.0),
            attention_factor: p.opt_f64("attention_factor")?,
            truncate: p.opt_bool("truncate")?.unwrap_or(true),
        }),
        other => {
            return Err(ConfigError::Unsupported {
                key: key("rope_type"),
                value: format!("\"{other}\""),
                reason: "Fathom implements the `default` and `yarn` RoPE types".into(),
            });
        }
    };
    for k in p.0.keys() {
        const YARN_KEYS: &[&str] = &[
            "rope_type",
            "type",
            "rope_theta",
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "attention_factor",
            "truncate",
        ];
        if !YARN_KEYS.contains(&k.as_str()) {
            return Err(ConfigError::Unknown { key: key(k) });
        }
    }
    Ok(RopeSpec {
        theta,
        interleaved,
        yarn,
    })
}

/// The `config.json` `transformers` would write for this spec (DeepseekV3, `rope_scaling` form,
/// which every version of `transformers` that has DeepseekV3 reads).
pub fn config_json(spec: &ModelSpec) -> Value {
    let a = &spec.attention;
    let mut map = json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.heads,
        "q_lora_rank": a.q_lora_rank,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "first_k_dense_replace": spec.dense_layers,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "initializer_range": spec.initializer_range,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_theta": spec.rope.theta,
        "rope_interleave": spec.rope.interleaved,
        "rope_scaling": spec.rope.yarn.as_ref().map(|y| json!({
            "type": "yarn",
            "rope_type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_positions,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
            "attention_factor": y.attention_factor,
            "truncate": y.truncate,
        })),
        "num_nextn_predict_layers": spec.mtp_depth,
        "attention_bias": false,
        "torch_dtype": "float32",
    });
    if let (Some(m), Value::Object(obj)) = (&spec.moe, &mut map) {
        let moe = json!({
            "n_routed_experts": m.routed_experts,
            "n_shared_experts": m.shared_experts,
            "num_experts_per_tok": m.experts_per_token,
            "n_group": m.groups,
            "topk_group": m.groups_per_token,
            "moe_intermediate_size": m.intermediate_size,
            "routed_scaling_factor": m.routed_scaling_factor,
            "norm_topk_prob": m.normalize_gates,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
        });
        if let Value::Object(moe) = moe {
            obj.extend(moe);
        }
    }
    map
}

/// Typed access to a config object, with errors naming the key.
struct Config<'a>(&'a Map<String, Value>);

impl Config<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| ConfigError::Missing { key: key.into() })
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.present(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| wrong(key, "a non-negative integer", v))
            })
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.present(key)
            .map(|v| v.as_f64().ok_or_else(|| wrong(key, "a number", v)))
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.present(key)
            .map(|v| v.as_bool().ok_or_else(|| wrong(key, "true or false", v)))
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        self.present(key)
            .map(|v| v.as_str().ok_or_else(|| wrong(key, "a string", v)))
            .transpose()
    }
}

fn wrong(key: &str, expected: &'static str, found: &Value) -> ConfigError {
    ConfigError::WrongType {
        key: key.into(),
        expected,
        found: found.to_string(),
    }
}

impl From<SpecError> for ConfigError {
    fn from(e: SpecError) -> Self {
        ConfigError::Invalid {
            key: hf_key(&e.field).to_owned(),
            message: e.message,
        }
    }
}
