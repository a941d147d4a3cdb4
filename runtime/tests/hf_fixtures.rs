//! Fathom's forward pass against Hugging Face `transformers`' DeepseekV3ForCausalLM.
//!
//! Fixtures (tests/fixtures, made by scripts/fixtures/make_fixtures.py) are tiny random models
//! saved with `save_pretrained`, with the logits PyTorch computed for a batch of tokens.
//!
//! Tolerance: max |ours - ref| / max |ref| < 1e-4. Both sides compute in f32 but sum in
//! different orders (we accumulate dot products in f64; PyTorch uses blocked f32 kernels), so
//! each logit carries a few ulps of rounding noise times the depth of the network: about 1e-6
//! relative here. 1e-4 leaves room for that and still fails on any semantic difference (a wrong
//! RoPE pairing or routing choice moves logits by 1e-2 or more).

use std::path::{Path, PathBuf};

use fathom_runtime::pretrained::Pretrained;
use fathom_runtime::weights::read_safetensors;

const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// Loads the fixture, runs its reference batch, and returns max|diff| / max|ref|.
fn relative_logits_error(name: &str) -> f64 {
    let dir = fixture(name);
    let model = Pretrained::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = read_safetensors(&dir.join("reference.safetensors")).expect("reference loads");
    let ids = reference.get("input_ids").expect("input_ids");
    let seq = ids.dims()[1];
    let rows: Vec<Vec<i64>> = ids.as_i64().expect("i64 ids").chunks(seq).map(<[i64]>::to_vec).collect();
    let logits = model.logits(&rows).unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = reference.get("logits").expect("logits");
    assert_eq!(logits.dims(), want.dims(), "{name}: logits shape");
    let (got, want) = (logits.as_f32().expect("f32"), want.as_f32().expect("f32"));
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    let error = max_diff / max_ref;
    eprintln!("{name}: max|diff| = {max_diff:.3e}, max|ref| = {max_ref:.3}, relative {error:.3e}");
    error
}

macro_rules! fixture_tests {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            let error = relative_logits_error($name);
            assert!(error < TOLERANCE, "{}: relative error {error:.3e} >= {TOLERANCE:e}", $name);
        }
    )*};
}

fixture_tests! {
    group_limited_routing_with_balancing_bias => "moe_grouped",
    yarn_rope => "yarn",
    yarn_with_a_fractional_ramp_and_cos_sin_factor => "yarn_ramp",
    two_shared_experts_two_dense_layers => "shared2_dense2",
    direct_queries_tied_embeddings_half_split_rope => "no_q_lora",
    bf16_weights_in_shards => "bf16_sharded",
}

#[test]
fn checkpoints_without_mtp_weights_load_with_a_note() {
    let model = Pretrained::load(&fixture("moe_grouped")).expect("loads");
    assert_eq!(model.spec.mtp_depth, 0);
    assert!(model.notes.iter().any(|n| n.contains("no MTP weights")), "{:?}", model.notes);
}
