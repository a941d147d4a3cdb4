//! A tiny DeepSeek-style model (attention plus a routed mixture of experts; hidden 64, vocab
//! 256, sequence 16, 3 layers) end to end, to keep the interpreter fast enough for tests.

use std::time::Instant;

use fathom_compiler::graph::ReduceOp;
use fathom_compiler::{DType, Graph};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

const VOCAB: usize = 256;
const HIDDEN: usize = 64;
const SEQ: usize = 16;
const LAYERS: usize = 3;
const HEADS: usize = 4;
const HEAD_DIM: usize = HIDDEN / HEADS;
const EXPERTS: usize = 4;
const TOP_K: usize = 2;
const EXPERT_DIM: usize = 32;

fn f32_ty(dims: &[usize]) -> TensorType {
    ty(DType::F32, dims)
}

fn rms_norm(b: &mut GraphBuilder, x: Tensor, name: &str) -> Result<Tensor, GraphError> {
    let w = b.parameter(name, f32_ty(&[HIDDEN]))?;
    let squares = b.mul(x, x)?;
    let mean = b.reduce(ReduceOp::Mean, squares, 1, true)?;
    let mean = b.offset(mean, 1e-6)?;
    let scale = b.rsqrt(mean)?;
    let normed = b.mul(x, scale)?;
    b.mul(normed, w)
}

/// `x @ weightᵀ` with a Hugging Face `[out, in]` weight.
fn linear(b: &mut GraphBuilder, x: Tensor, name: &str, out: usize) -> Result<Tensor, GraphError> {
    let in_dim = *b.dims(x).last().unwrap_or(&0);
    let w = b.parameter(name, f32_ty(&[out, in_dim]))?;
    let wt = b.transpose(w)?;
    b.matmul(x, wt)
}

/// `[SEQ, HIDDEN]` -> `[HEADS, SEQ, HEAD_DIM]`.
fn heads(b: &mut GraphBuilder, x: Tensor) -> Result<Tensor, GraphError> {
    let x = b.reshape(x, &[SEQ, HEADS, HEAD_DIM])?;
    b.permute(x, &[1, 0, 2])
}

fn attention(b: &mut GraphBuilder, x: Tensor, mask: Tensor, p: &str) -> Result<Tensor, GraphError> {
    let q = linear(b, x, &format!("{p}.q_proj.weight"), HIDDEN)?;
    let k = linear(b, x, &format!("{p}.k_proj.weight"), HIDDEN)?;
    let v = linear(b, x, &format!("{p}.v_proj.weight"), HIDDEN)?;
    let (q, k, v) = (heads(b, q)?, heads(b, k)?, heads(b, v)?);
    let kt = b.transpose(k)?;
    let scores = b.matmul(q, kt)?;
    let scores = b.scale(scores, 1.0 / (HEAD_DIM as f64).sqrt())?;
    let scores = b.add(scores, mask)?;
    let probs = b.softmax(scores)?;
    let out = b.matmul(probs, v)?;
    let out = b.permute(out, &[1, 0, 2])?;
    let out = b.reshape(out, &[SEQ, HIDDEN])?;
    linear(b, out, &format!("{p}.o_proj.weight"), HIDDEN)
}

fn moe(b: &mut GraphBuilder, x: Tensor, p: &str) -> Result<Tensor, GraphError> {
    let logits = linear(b, x, &format!("{p}.gate.weight"), EXPERTS)?;
    let scores = b.sigmoid(logits)?;
    let chosen = b.top_k(scores, TOP_K)?;
    let weights = b.take_along(scores, chosen, 1)?;
    let total = b.reduce(ReduceOp::Sum, weights, 1, true)?;
    let weights = b.div(weights, total)?;

    let experts = |b: &mut GraphBuilder, name: &str, n, k| {
        b.parameter(&format!("{p}.experts.{name}"), f32_ty(&[EXPERTS, n, k]))
    };
    let gate_w = experts(b, "gate_proj", EXPERT_DIM, HIDDEN)?;
    let up_w = experts(b, "up_proj", EXPERT_DIM, HIDDEN)?;
    let down_w = experts(b, "down_proj", HIDDEN, EXPERT_DIM)?;
    let x3 = b.reshape(x, &[SEQ, 1, HIDDEN])?;
    let gate = b.grouped_matmul(x3, gate_w, chosen)?;
    let up = b.grouped_matmul(x3, up_w, chosen)?;
    let act = b.silu(gate)?;
    let hidden = b.mul(act, up)?;
    let down = b.grouped_matmul(hidden, down_w, chosen)?;
    let weights = b.reshape(weights, &[SEQ, TOP_K, 1])?;
    let weighted = b.mul(down, weights)?;
    b.reduce(ReduceOp::Sum, weighted, 1, false)
}

fn tiny_model() -> Result<Graph, GraphError> {
    let mut b = GraphBuilder::new("tiny");
    let ids = b.input("input_ids", ty(DType::I64, &[SEQ]))?;
    let embed = b.parameter("model.embed_tokens.weight", f32_ty(&[VOCAB, HIDDEN]))?;
    let mut h = b.gather(embed, ids)?;
    let causal: Vec<f64> = (0..SEQ * SEQ)
        .map(|i| if i % SEQ > i / SEQ { -1e9 } else { 0.0 })
        .collect();
    let mask = b.constant("causal_mask", f32_ty(&[SEQ, SEQ]), causal)?;
    for layer in 0..LAYERS {
        let p = format!("model.layers.{layer}");
        let normed = rms_norm(&mut b, h, &format!("{p}.input_layernorm.weight"))?;
        let attn = b.within(&format!("{p}.self_attn"), |b| {
            attention(b, normed, mask, &format!("{p}.self_attn"))
        })?;
        h = b.add(h, attn)?;
        let normed = rms_norm(&mut b, h, &format!("{p}.post_attention_layernorm.weight"))?;
        let mlp = b.within(&format!("{p}.mlp"), |b| moe(b, normed, &format!("{p}.mlp")))?;
        h = b.add(h, mlp)?;
    }
    let h = rms_norm(&mut b, h, "model.norm.weight")?;
    let logits = linear(&mut b, h, "lm_head.weight", VOCAB)?;
    b.output("logits", logits)?;
    Ok(b.finish())
}

fn random_parameters(graph: &Graph) -> HashMap<String, HostTensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    graph
        .parameters()
        .map(|(_, name, ty)| {
            let values = (0..ty.numel())
                .map(|_| rng.random_range(-0.2f32..0.2))
                .collect();
            (name.to_owned(), HostTensor::f32(ty.dims(), values))
        })
        .collect()
}

#[test]
fn tiny_model_runs_quickly_and_deterministically() -> TestResult {
    let graph = tiny_model()?;
    let parameters = random_parameters(&graph);
    let ids: Vec<i64> = (0..SEQ as i64)
        .map(|i| (i * 37 + 11) % VOCAB as i64)
        .collect();
    let inputs = HashMap::from([("input_ids", i64s(&[SEQ], &ids))]);
    let feeds = Feeds::new(&inputs, &parameters);

    let start = Instant::now();
    let first = evaluate(&graph, &feeds)?;
    let elapsed = start.elapsed();
    eprintln!(
        "tiny model: {} nodes evaluated in {elapsed:?}",
        graph.nodes.len()
    );
    // Well under a second normally; generous here so a loaded machine does not fail the test.
    assert!(elapsed.as_secs_f64() < 5.0, "took {elapsed:?}");

    let logits = first.get("logits").ok_or("logits")?;
    assert_eq!(logits.ty, f32_ty(&[SEQ, VOCAB]));
    assert!(
        logits
            .as_f32()
            .ok_or("floats")?
            .iter()
            .all(|v| v.is_finite())
    );
    let second = evaluate(&graph, &feeds)?;
    assert_eq!(first, second);
    Ok(())
}
