//! The whole tiny DeepSeek-V3 (hidden 8, vocab 16, one dense and one MoE block with 4 routed
//! experts in 2 groups, MLA with a low-rank query and YaRN RoPE): the gradients of
//! `loss = mean(logits · R)` with respect to a sample of parameters of every kind, against
//! central differences at six random coordinates of each (for the embedding, in rows the
//! input looks up).
//!
//! Step h = 1e-3 on weights of scale 0.3 (norm weights 1). Routing is piecewise constant: a
//! step that changes any token's experts makes the finite difference meaningless (it measures
//! a jump, not a slope), so such coordinates are skipped and counted; the test fails if too
//! many are.
//!
//! Error measure: |autodiff - finite difference| / max |autodiff| over the whole parameter's
//! gradient. Tolerance 1e-2: the loss is an f32 (ulp about 1e-8 here) at the end of ~700
//! f32-rounded ops, so a difference of two losses divided by 2h = 2e-3 is good to a few 1e-6
//! absolute, against gradients whose largest component ranges from 3e-3 (the router) to 0.7:
//! up to ~1e-3 relative (measured: at most 6.7e-4, on the q_a_layernorm and router weights,
//! whose gradients are the smallest; 1.6e-5 for the embedding).
//! Any wrong rule gives errors of order 1.

use fathom_compiler::model::{DeepSeekV3, ForwardOptions, forward_outputs};
use fathom_compiler::module::{Module, Scope};
use fathom_compiler::spec::ModelSpec;
use fathom_runtime::init::init_parameters;

use super::*;

const STEP: f64 = 1e-3;
const MODEL_TOLERANCE: f64 = 1e-2;
const COORDINATES: usize = 6;

/// The workspace's smallest full-featured spec (`fathom_compiler::spec::examples::micro`),
/// with larger initial weights.
fn tiny() -> ModelSpec {
    ModelSpec {
        initializer_range: 0.3,
        ..fathom_compiler::spec::examples::micro()
    }
}

/// The forward graph with the loss, the loss node and the routing decisions (expert ids).
fn model_graph(batch: usize, seq: usize) -> TestResult<(Graph, NodeId, Vec<NodeId>)> {
    let mut g = GraphBuilder::new("tiny_deepseek_v3");
    let model: DeepSeekV3 = DeepSeekV3::declare(&mut Scope::root(&mut g), &tiny())?;
    let options = ForwardOptions {
        batch,
        seq,
        with_mtp: false,
    };
    let out = forward_outputs(&mut g, &model, options)?;
    let sum = weighted_sum(&mut g, out.logits, 5)?;
    let count = g.ty(out.logits).numel() as f64;
    let loss = g.scale(sum, 1.0 / count)?; // mean(logits · R)
    g.output("loss", loss)?;
    let routing = out.routings.iter().map(|r| r.experts.id()).collect();
    Ok((g.finish(), loss.id(), routing))
}

/// The loss and the routing decisions with `parameters`.
fn run(
    graph: &Graph,
    inputs: &HashMap<&str, HostTensor>,
    parameters: &HashMap<String, HostTensor>,
    loss: NodeId,
    routing: &[NodeId],
) -> TestResult<(f64, Vec<HostTensor>)> {
    let mut nodes = vec![loss];
    nodes.extend_from_slice(routing);
    let mut values = evaluate_nodes(graph, &Feeds::new(inputs, parameters), &nodes)?;
    let decisions = values.split_off(1);
    Ok((scalar(&values[0])?, decisions))
}

#[test]
fn tiny_model_gradients_match_finite_differences() -> TestResult {
    let (batch, seq) = (2, 4);
    let (forward, loss, routing) = model_graph(batch, seq)?;
    let mut parameters = init_parameters(&forward, 0.3, 2024);
    let Backward { graph, gradients } = backward_parameters(forward, loss)?;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let tokens: Vec<i64> = (0..batch * seq).map(|_| rng.random_range(0..16)).collect();
    let inputs = HashMap::from([("input_ids", ids(&[batch, seq], &tokens))]);
    let (_, base_routing) = run(&graph, &inputs, &parameters, loss, &routing)?;
    // The expert chosen first for the first token: it has at least one token.
    let expert = base_routing[0].as_i64().ok_or("ids")?[0];

    let names = [
        "model.embed_tokens.weight".to_owned(),
        "model.layers.0.input_layernorm.weight".to_owned(),
        "model.layers.0.self_attn.q_a_proj.weight".to_owned(),
        "model.layers.0.self_attn.q_a_layernorm.weight".to_owned(),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight".to_owned(),
        "model.layers.0.self_attn.o_proj.weight".to_owned(),
        "model.layers.0.mlp.down_proj.weight".to_owned(),
        "model.layers.1.self_attn.kv_b_proj.weight".to_owned(),
        "model.layers.1.post_attention_layernorm.weight".to_owned(),
        "model.layers.1.mlp.gate.weight".to_owned(),
        format!("model.layers.1.mlp.experts.{expert}.gate_proj.weight"),
        format!("model.layers.1.mlp.experts.{expert}.down_proj.weight"),
        "model.layers.1.mlp.shared_experts.up_proj.weight".to_owned(),
        "model.norm.weight".to_owned(),
        "lm_head.weight".to_owned(),
    ];
    let ids_of = |name: &str| -> TestResult<(NodeId, NodeId)> {
        let param = graph
            .parameters()
            .find(|(_, n, _)| *n == name)
            .ok_or("no such parameter")?
            .0;
        let gradient = gradients
            .iter()
            .find(|(w, _)| *w == param)
            .ok_or("no gradient")?
            .1;
        Ok((param, gradient))
    };
    let gradient_nodes: Vec<NodeId> = names
        .iter()
        .map(|n| ids_of(n).map(|(_, g)| g))
        .collect::<TestResult<_>>()?;
    let analytic = evaluate_nodes(&graph, &Feeds::new(&inputs, &parameters), &gradient_nodes)?;

    let (mut checked, mut skipped, mut worst) = (0, 0, 0.0f64);
    for (name, analytic) in names.iter().zip(&analytic) {
        let analytic = analytic.as_f32().ok_or("float gradient")?;
        let scale = analytic
            .iter()
            .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        let mut error = 0.0f64;
        for _ in 0..COORDINATES {
            let i = if name == "model.embed_tokens.weight" {
                // A row some token looks up (the others have zero gradients).
                let row = tokens[rng.random_range(0..tokens.len())] as usize;
                row * 8 + rng.random_range(0..8)
            } else {
                rng.random_range(0..analytic.len())
            };
            let original = parameters[name].clone();
            let x = original.as_f32().ok_or("float parameter")?[i];
            let mut at = |value: f64| -> TestResult<(f64, f64, Vec<HostTensor>)> {
                let mut moved = original.clone();
                let v = value as f32;
                if let fathom_runtime::Data::Float(data) = &mut moved.data {
                    data[i] = v;
                }
                parameters.insert(name.clone(), moved);
                let (l, decisions) = run(&graph, &inputs, &parameters, loss, &routing)?;
                Ok((f64::from(v), l, decisions))
            };
            let (xp, lp, rp) = at(f64::from(x) + STEP)?;
            let (xm, lm, rm) = at(f64::from(x) - STEP)?;
            parameters.insert(name.clone(), original);
            if rp != base_routing || rm != base_routing {
                skipped += 1;
                continue;
            }
            let fd = (lp - lm) / (xp - xm);
            error = error.max((fd - f64::from(analytic[i])).abs() / scale);
            checked += 1;
        }
        println!("{name:<52} max error {error:.1e} (max |grad| {scale:.1e})");
        assert!(error < MODEL_TOLERANCE, "{name}: error {error:e}");
        worst = worst.max(error);
    }
    println!(
        "checked {checked} coordinates, skipped {skipped} (routing changed), worst {worst:.1e}"
    );
    assert!(
        skipped * 5 <= checked,
        "too many routing flips: {skipped} of {}",
        checked + skipped
    );
    Ok(())
}
