//! Expansion snapshots (the generated code, pretty-printed) and robustness checks. The errors
//! as a user sees them are checked by the trybuild tests in `tests/ui`.

mod module;

use proc_macro2::TokenStream;

use crate::debug::pretty;
use crate::model::expand_model;

fn tokens(source: &str) -> TokenStream {
    source.parse().expect("test input is valid Rust tokens")
}

fn model(source: &str) -> String {
    pretty(&expand_model(tokens(source)))
}

/// The example of the design brief, with FP8 tiles of `tile`.
fn tiny_v3(tile: usize) -> String {
    format!(
        r#"
        /// A tiny DeepSeek-V3 for tests.
        pub TinyV3 {{
            vocab_size: 256,
            hidden_size: 64,
            layers: 3,
            dense_layers: 1,
            intermediate_size: 128,
            norm_eps: 1e-6,
            max_positions: 64,
            tie_embeddings: false,
            attention: {{ heads: 4, q_lora_rank: 32, kv_lora_rank: 16, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16 }},
            rope: {{ theta: 10000.0, interleaved: true, yarn: {{ factor: 4.0, original_max_positions: 16, mscale_all_dim: 1.0 }} }},
            moe: {{ routed_experts: 16, shared_experts: 1, experts_per_token: 4, groups: 4, groups_per_token: 2, intermediate_size: 32, routed_scaling_factor: 2.5 }},
            mtp_depth: 1,
            fp8: {{ activation_tile: {tile}, weight_block: {tile} }},
        }}
        "#
    )
}

#[test]
fn full_example() {
    insta::assert_snapshot!(model(&tiny_v3(16)));
}

/// As first written, the example's 32-wide FP8 tiles do not divide `kv_lora_rank = 16` (a GEMM
/// reduction dimension): the declaration is refused, with both tiling fields named.
#[test]
fn full_example_with_tiles_too_wide() {
    insta::assert_snapshot!(model(&tiny_v3(32)));
}

/// Only the fields without defaults (a MoE model needs its `moe` section, whose own required
/// fields are given too); everything else shows ModelSpec's defaults.
#[test]
fn minimal_model() {
    insta::assert_snapshot!(model(
        r#"
        Minimal {
            vocab_size: 32,
            hidden_size: 16,
            layers: 2,
            intermediate_size: 32,
            attention: { heads: 2, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 },
            moe: { routed_experts: 4, experts_per_token: 2, intermediate_size: 8 },
        }
        "#
    ));
}

#[test]
fn dense_only_model() {
    insta::assert_snapshot!(model(
        r#"
        pub(crate) Dense {
            vocab_size: 32,
            hidden_size: 16,
            layers: 2,
            dense_layers: 2,
            intermediate_size: 32,
            attention: { heads: 2, q_lora_rank: 8, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 },
            moe: none,
        }
        "#
    ));
}

#[test]
fn queries_without_compression() {
    insta::assert_snapshot!(model(
        r#"
        NoQLora {
            vocab_size: 32,
            hidden_size: 16,
            layers: 1,
            dense_layers: 1,
            intermediate_size: 32,
            attention: { heads: 2, q_lora_rank: none, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 },
        }
        "#
    ));
}

/// Floats are written with the shortest digits that read back to the same `f64`.
#[test]
fn floats_round_trip_exactly() {
    for value in [
        0.1,
        1e-6,
        2.5,
        1e300,
        5e-324,
        f64::MAX,
        f64::MIN_POSITIVE,
        -0.0,
        -3.25,
    ] {
        let source = format!(
            "M {{ vocab_size: 1, hidden_size: 8, layers: 1, dense_layers: 1, intermediate_size: 8,
                  initializer_range: 0.5,
                  attention: {{ heads: 1, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 2, v_head_dim: 8 }},
                  rope: {{ yarn: {{ factor: 1.0, original_max_positions: 4, mscale: {value:e} }} }} }}"
        );
        let expanded = expand_model(tokens(&source)).to_string();
        let written = expanded
            .split("mscale :")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .expect("the expansion sets mscale");
        let digits = written.replace(' ', "");
        let digits = digits.trim_end_matches("f64");
        let read_back: f64 = digits.parse().expect("a float literal");
        assert_eq!(
            read_back.to_bits(),
            value.to_bits(),
            "{value:e} written as {written}"
        );
    }
}

/// Whatever the input, the macro answers with tokens (errors included), never a panic.
#[test]
fn never_panics() {
    let deep = format!("M {{ a: {}1{} }}", "{ b: ".repeat(500), " }".repeat(500));
    let inputs = [
        "",
        "pub",
        "M",
        "M { , }",
        "M { a }",
        "M { a: }",
        "M { a: 1 b: 2 }",
        "M { a: - }",
        "M { a: -true }",
        "M { a: 1e999 }",
        "M { a: 99999999999999999999999 }",
        "M { a: -99999999999999999999999 }",
        "M { a: 1u8, b: 'c', c: b\"x\", d: \"s\"x }",
        "M { type: 1, r#fn: 2 }",
        "M { a: { }, a: { } }",
        "M { attention: 5, rope: { yarn: none } }",
        "#[debug(x)] M {}",
        "M {} extra",
        &deep,
    ];
    for input in inputs {
        // `to_string` on an error carries `compile_error!`; reaching it means no panic.
        let _ = expand_model(tokens(input)).to_string();
    }
}

/// The errors of one declaration come back together, in source order.
#[test]
fn errors_are_all_reported_in_source_order() {
    let expanded = model(
        r#"
        Broken {
            vocab_size: 0,
            hiden_size: 64,
            hidden_size: 64,
            layers: LAYERS,
            layers: 2,
            intermediate_size: 32,
            attention: { heads: 2, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 },
        }
        "#,
    );
    let messages: Vec<&str> = expanded
        .lines()
        .filter_map(|line| line.trim().strip_prefix('"')?.strip_suffix('"'))
        .collect();
    insta::assert_snapshot!(messages.join("\n"));
}

/// `#[debug]` prints the expansion (to stderr) and is not put on the struct.
#[test]
fn the_debug_flag_is_not_emitted() {
    let expanded = model(
        "#[debug] #[allow(dead_code)] M { vocab_size: 8, hidden_size: 8, layers: 1, dense_layers: 1,
           intermediate_size: 8,
           attention: { heads: 1, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 2, v_head_dim: 8 } }",
    );
    assert!(!expanded.contains("debug]"), "{expanded}");
    assert!(expanded.contains("#[allow(dead_code)]\n"), "{expanded}");
    assert!(expanded.contains("impl ::fathom::compiler::spec::Architecture for M"));
}
