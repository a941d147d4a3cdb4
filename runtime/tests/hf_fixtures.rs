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

mod common;

use std::collections::HashMap;

use fathom_compiler::GraphBuilder;
use fathom_compiler::model::{DeepSeekV3, LossWeights, add_objective};
use fathom_compiler::module::{Module, Scope};
use fathom_runtime::exec::Backend;
use fathom_runtime::interp::{Feeds, evaluate};
use fathom_runtime::pretrained::Pretrained;
use fathom_runtime::weights::read_safetensors;

use common::fixture;

const TOLERANCE: f64 = 1e-4;

/// Every fixture `scripts/fixtures/make_fixtures.py` writes.
const FIXTURES: [&str; 6] = [
    "moe_grouped",
    "yarn",
    "yarn_ramp",
    "shared2_dense2",
    "no_q_lora",
    "bf16_sharded",
];

/// The fixture's model and the reference tensors PyTorch computed for it.
fn load_with_reference(name: &str) -> (Pretrained, fathom_runtime::weights::Weights) {
    let dir = fixture(name);
    let model = Pretrained::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = read_safetensors(&dir.join("reference.safetensors")).expect("reference loads");
    (model, reference)
}

/// Loads the fixture, runs its reference batch on `backend`, and returns max|diff| / max|ref|.
fn relative_logits_error(name: &str, backend: Backend) -> f64 {
    let dir = fixture(name);
    let model = Pretrained::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = read_safetensors(&dir.join("reference.safetensors")).expect("reference loads");
    let ids = reference.get("input_ids").expect("input_ids");
    let seq = ids.dims()[1];
    let rows: Vec<Vec<i64>> = ids
        .as_i64()
        .expect("i64 ids")
        .chunks(seq)
        .map(<[i64]>::to_vec)
        .collect();
    let logits = model
        .logits(&rows)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = reference.get("logits").expect("logits");
    assert_eq!(logits.dims(), want.dims(), "{name}: logits shape");
    let (got, want) = (logits.as_f32().expect("f32"), want.as_f32().expect("f32"));
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    let error = max_diff / max_ref;
    eprintln!(
        "{name} ({backend:?}): max|diff| = {max_diff:.3e}, max|ref| = {max_ref:.3}, relative {error:.3e}"
    );
    error
}

macro_rules! fixture_tests {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            for backend in [Backend::Interpreter, Backend::Cpu] {
                let error = relative_logits_error($name, backend);
                assert!(error < TOLERANCE, "{} ({backend:?}): relative error {error:.3e} >= {TOLERANCE:e}", $name);
            }
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
    assert!(
        model.notes.iter().any(|n| n.contains("no MTP weights")),
        "{:?}",
        model.notes
    );
}

/// The next-token loss, as `transformers` computes it with `labels=input_ids`. Tolerance 1e-5
/// relative: the loss is a mean of log-probabilities whose rounding noise (~1e-7 each) averages
/// out; a wrong shift or a wrong mean would be off by far more.
#[test]
fn next_token_loss_matches_transformers() {
    for name in FIXTURES {
        let (model, reference) = load_with_reference(name);
        let ids = reference.get("input_ids").unwrap();
        let (batch, seq) = (ids.dims()[0], ids.dims()[1]);
        let mut g = GraphBuilder::new("loss");
        let net: DeepSeekV3 = DeepSeekV3::declare(&mut Scope::root(&mut g), &model.spec).unwrap();
        add_objective(&mut g, &net, batch, seq, LossWeights::next_token_only()).unwrap();
        let graph = g.finish();
        let inputs = HashMap::from([("input_ids", ids.clone())]);
        let outputs = evaluate(&graph, &Feeds::new(&inputs, &model.weights)).unwrap();
        let loss = outputs.get("loss").unwrap().as_f32().unwrap()[0] as f64;
        let want = reference.get("loss").unwrap().as_f32().unwrap()[0] as f64;
        let error = (loss - want).abs() / want.abs();
        eprintln!("{name}: loss {loss:.7} vs {want:.7}, relative {error:.2e}");
        assert!(error < 1e-5, "{name}: loss {loss} vs transformers {want}");
    }
}

/// Gradients against PyTorch autograd through `transformers`: every parameter's gradient within
/// 1e-3 of that tensor's max|ref|. Both sides compute in f32 with different summation orders;
/// backward chains roughly twice as many roundings as forward, and small gradients (an expert
/// that got one token) amplify them relative to their own maximum, hence the looser bound than
/// the logits'. A wrong rule (a missing 1/n, a transposed weight gradient) is off by O(1).
#[test]
fn gradients_match_pytorch_autograd() {
    use fathom_compiler::training::training_graph;
    for name in FIXTURES {
        let (model, reference) = load_with_reference(name);
        let ids = reference.get("input_ids").unwrap();
        let (batch, seq) = (ids.dims()[0], ids.dims()[1]);
        let train =
            training_graph(&model.spec, batch, seq, LossWeights::next_token_only()).unwrap();
        let inputs = HashMap::from([("input_ids", ids.clone())]);
        let outputs = evaluate(&train.graph, &Feeds::new(&inputs, &model.weights)).unwrap();
        let mut worst = (0f64, String::new());
        for parameter in &train.parameters {
            let got = outputs
                .get(&format!("grad.{parameter}"))
                .unwrap()
                .as_f32()
                .unwrap();
            let want = reference
                .get(&format!("grad.{parameter}"))
                .unwrap_or_else(|| panic!("{name}: no reference gradient for {parameter}"));
            let want = want.as_f32().unwrap();
            assert_eq!(got.len(), want.len(), "{name}: {parameter}");
            let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let max_diff = got
                .iter()
                .zip(want)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
            let error = if max_ref == 0.0 {
                max_diff
            } else {
                max_diff / max_ref
            };
            assert!(
                error < 1e-3,
                "{name}: {parameter}: max|diff| {max_diff:.3e}, max|ref| {max_ref:.3e}"
            );
            if error > worst.0 {
                worst = (error, parameter.clone());
            }
        }
        eprintln!(
            "{name}: {} gradients, worst relative error {:.2e} ({})",
            train.parameters.len(),
            worst.0,
            worst.1
        );
    }
}
