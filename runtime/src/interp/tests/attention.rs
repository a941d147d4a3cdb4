//! `CausalAttention`, its statistic and its gradients, computed head by head from their
//! definition, against the compiler's expansion of them into primitives (matmuls, a softmax,
//! and autodiff's rules for those), evaluated by the same interpreter: two derivations of the
//! same values.

use fathom_compiler::autodiff::backward;
use fathom_compiler::graph::{AttentionConfig, Op};
use fathom_compiler::passes::expand_attention;
use fathom_compiler::{DType, Graph, GraphBuilder, Tensor};

use super::{TestResult, ty};
use crate::interp::{Feeds, evaluate};
use crate::tensor::HostTensor;

const BATCH: usize = 2;
const TOKENS: usize = 5;
const HEADS: usize = 3;
const NOPE: usize = 4;
const ROPE: usize = 2;
const DV: usize = 3;
const SCALE: f64 = 0.37;

/// Deterministic values in (-1.5, 1.5), different per tensor.
fn values(seed: u64, dims: &[usize]) -> HostTensor {
    let n: usize = dims.iter().product();
    let data = (0..n as u64)
        .map(|i| {
            let x = (i * 2654435761 + seed * 40503) % 1000;
            (x as f32 / 1000.0 - 0.5) * 3.0
        })
        .collect();
    HostTensor::f32(dims, data)
}

const SHAPES: [(&str, &[usize]); 5] = [
    ("q", &[BATCH, TOKENS, HEADS, NOPE + ROPE]),
    ("k_nope", &[BATCH, TOKENS, HEADS, NOPE]),
    ("k_rope", &[BATCH, TOKENS, ROPE]),
    ("v", &[BATCH, TOKENS, HEADS, DV]),
    ("weights", &[BATCH, TOKENS, HEADS, DV]),
];

/// Outputs `out`, `lse` and `grad.<operand>` of the loss `Σ out ⊙ weights`.
fn attention_graph(products_in: Option<DType>) -> TestResult<Graph> {
    attention_graph_for(products_in, &[0, 1, 2, 3])
}

/// [`attention_graph`] with the gradients of the operands `wanted` (indices) only.
fn attention_graph_for(products_in: Option<DType>, wanted: &[usize]) -> TestResult<Graph> {
    let mut g = GraphBuilder::new("attention");
    let mut inputs = Vec::new();
    for (name, dims) in SHAPES {
        inputs.push(g.input(name, ty(DType::F32, dims))?);
    }
    let operands: Vec<Tensor> = inputs[..4].to_vec();
    let config = AttentionConfig {
        scale: SCALE,
        products_in,
    };
    let out = g.push(Op::CausalAttention(config), &operands, None)?;
    let lse = g.push(Op::CausalAttentionLse(config), &operands, None)?;
    let weighted = g.mul(out, inputs[4])?;
    let flat = g.reshape(weighted, &[BATCH * TOKENS * HEADS * DV])?;
    let loss = g.reduce(fathom_compiler::graph::ReduceOp::Sum, flat, 0, false)?;
    g.output("out", out)?;
    g.output("lse", lse)?;
    let graph = g.finish();
    let wrt: Vec<_> = wanted.iter().map(|&i| operands[i].id()).collect();
    let differentiated = backward(graph, loss.id(), &wrt)?;
    let mut g = GraphBuilder::from_graph(differentiated.graph);
    for (&i, (_, gradient)) in wanted.iter().zip(&differentiated.gradients) {
        g.output(&format!("grad.{}", SHAPES[i].0), Tensor(*gradient))?;
    }
    Ok(g.finish())
}

fn run(graph: &Graph) -> TestResult<std::collections::BTreeMap<String, HostTensor>> {
    let fed: Vec<(&str, HostTensor)> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, (name, dims))| (*name, values(i as u64 + 1, dims)))
        .collect();
    let inputs: std::collections::HashMap<&str, HostTensor> = fed.into_iter().collect();
    Ok(evaluate(graph, &Feeds::new(&inputs, &()))?
        .into_iter()
        .collect())
}

/// The largest difference between `a` and `b` over the largest magnitude of `b` (at least 1).
fn relative_error(a: &HostTensor, b: &HostTensor) -> f32 {
    let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
    assert_eq!(a.len(), b.len());
    let size = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / size
}

/// The fused ops (one f64 computation, rounded once) against their expansion (each primitive
/// rounded to f32; sums of at most `TOKENS` or `NOPE + ROPE` terms): a few f32 ulps, so 2e-6 of
/// the largest value.
#[test]
fn the_fused_ops_equal_their_expansion_into_primitives() -> TestResult {
    let graph = attention_graph(None)?;
    let printed = graph.to_string();
    assert!(
        printed.contains("causal_attention<scale=0.37>"),
        "{printed}"
    );
    assert_eq!(
        printed.matches("causal_attention_grad<").count(),
        4,
        "{printed}"
    );
    let expanded = expand_attention(&graph, |_, _| false)?;
    assert!(
        !expanded.to_string().contains("causal_attention"),
        "{expanded}"
    );

    let (fused, primitives) = (run(&graph)?, run(&expanded)?);
    for (name, value) in &fused {
        let error = relative_error(value, &primitives[name]);
        assert!(error <= 2e-6, "{name}: {error:e}");
    }

    // The first query sees only the first key: its output is that token's value, its
    // statistic that one scaled score.
    let (q, k_nope, k_rope, v) = (
        values(1, SHAPES[0].1),
        values(2, SHAPES[1].1),
        values(3, SHAPES[2].1),
        values(4, SHAPES[3].1),
    );
    let (q, k_nope, k_rope, v) = (
        q.as_f32().unwrap(),
        k_nope.as_f32().unwrap(),
        k_rope.as_f32().unwrap(),
        v.as_f32().unwrap(),
    );
    let out = fused["out"].as_f32().unwrap();
    let lse = fused["lse"].as_f32().unwrap();
    for b in 0..BATCH {
        for h in 0..HEADS {
            let at = |width: usize| (b * TOKENS * HEADS + h) * width;
            assert_eq!(&out[at(DV)..at(DV) + DV], &v[at(DV)..at(DV) + DV]);
            let key: Vec<f32> = k_nope[at(NOPE)..at(NOPE) + NOPE]
                .iter()
                .chain(&k_rope[b * TOKENS * ROPE..][..ROPE])
                .copied()
                .collect();
            let score: f64 = q[at(NOPE + ROPE)..][..NOPE + ROPE]
                .iter()
                .zip(&key)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert_eq!(lse[(b * HEADS + h) * TOKENS], (SCALE * score) as f32);
        }
    }
    Ok(())
}

/// With bf16 products, the fused ops round `q`, `k`, `v`, the probabilities, `d_out` and the
/// scores' gradient as the expansion's products do (the precision pass's round trips). A value
/// that one computation gets 1 f32 ulp away from the other's may round to the neighbouring
/// bf16 value (one bf16 ulp, 2⁻⁸ relative, in one operand of one product), so the bound is
/// 1e-2 of the largest value; the rounding itself moves the results far more than f32 noise.
#[test]
fn bf16_products_round_the_same_operands_as_the_expansion() -> TestResult {
    let exact = run(&attention_graph(None)?)?;
    let graph = attention_graph(Some(DType::BF16))?;
    assert!(graph.to_string().contains("products=bf16"));
    let expanded = expand_attention(&graph, |_, _| false)?;
    let casts = expanded.to_string().matches("cast<bf16>").count();
    assert!(casts >= 6, "{casts} roundings in {expanded}");

    let (fused, primitives) = (run(&graph)?, run(&expanded)?);
    for (name, value) in &fused {
        let error = relative_error(value, &primitives[name]);
        assert!(error <= 1e-2, "{name}: {error:e}");
        let moved = relative_error(value, &exact[name]);
        assert!(
            moved > 1e-5,
            "{name}: bf16 products moved the result by only {moved:e}"
        );
    }
    Ok(())
}

/// Gradients of some operands only (the shared rope key and the values): autodiff emits
/// those two, and the expansion, which differentiates for all four, gives the same values.
#[test]
fn gradients_of_some_operands_agree_too() -> TestResult {
    let graph = attention_graph_for(None, &[2, 3])?;
    assert_eq!(
        graph.to_string().matches("causal_attention_grad<").count(),
        2
    );
    let expanded = expand_attention(&graph, |_, _| false)?;
    let (fused, primitives) = (run(&graph)?, run(&expanded)?);
    assert_eq!(fused.len(), 4, "out, lse and two gradients");
    for (name, value) in &fused {
        let error = relative_error(value, &primitives[name]);
        assert!(error <= 2e-6, "{name}: {error:e}");
    }
    Ok(())
}
