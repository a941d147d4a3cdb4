//! Structure of the backward graphs: what nodes the rules emit, which nodes get a gradient,
//! and the errors. The values are checked against finite differences in
//! `runtime/tests/grad_check.rs`.

use crate::dtype::{DType, TensorType};
use crate::error::GraphError;
use crate::graph::{Graph, GraphBuilder, Op, ReduceOp};

use super::*;

type TestResult = Result<(), GraphError>;

fn f32(dims: &[usize]) -> TensorType {
    TensorType::new(DType::F32, dims)
}

/// The printed nodes from `first` on.
fn lines_from(graph: &Graph, first: usize) -> Vec<String> {
    let text = graph.to_string();
    let start = format!("  %{first}:");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(&start))
        .unwrap_or(lines.len());
    // Keep the origin comment just above the first backward node.
    let at = if at > 0 && lines[at - 1].trim_start().starts_with("//") {
        at - 1
    } else {
        at
    };
    lines[at..].iter().map(|l| l.to_string()).collect()
}

#[test]
fn gradient_of_a_sum_of_squares() -> TestResult {
    let mut g = GraphBuilder::new("squares");
    let x = g.parameter("x", f32(&[3]))?;
    let loss = g.within("loss", |g| {
        let squares = g.mul(x, x)?;
        g.reduce(ReduceOp::Sum, squares, 0, false)
    })?;
    let graph = g.finish();
    let Backward { graph, gradients } = backward(graph, loss.id(), &[x.id()])?;
    graph.validate()?;
    // d/dx sum(x·x) = 1·x + 1·x: the seed expanded back over the summed axis, then one
    // contribution per use of x, accumulated.
    let expected = [
        "  // backward:loss",
        "  %3: f32[] = constant 1",
        "  %4: f32[3] = expand<[3]>(%3)",
        "  %5: f32[3] = mul(%4, %0)",
        "  %6: f32[3] = mul(%4, %0)",
        "  // backward",
        "  %7: f32[3] = add(%5, %6)",
        "}",
    ];
    assert_eq!(lines_from(&graph, 3), expected);
    assert_eq!(gradients, vec![(x.id(), NodeId(7))]);
    Ok(())
}

#[test]
fn no_gradient_flows_through_a_stop_gradient() -> TestResult {
    let mut g = GraphBuilder::new("stopped");
    let x = g.parameter("x", f32(&[3]))?;
    let loss = g.within("loss", |g| {
        let constant_x = g.stop_gradient(x)?;
        let products = g.mul(constant_x, x)?;
        g.reduce(ReduceOp::Sum, products, 0, false)
    })?;
    let graph = g.finish();
    let Backward { graph, gradients } = backward(graph, loss.id(), &[x.id()])?;
    graph.validate()?;
    // d/dx sum(c·x) with c = x held constant is c: one contribution, not x + x.
    let expected = [
        "  // backward:loss",
        "  %4: f32[] = constant 1",
        "  %5: f32[3] = expand<[3]>(%4)",
        "  %6: f32[3] = mul(%5, %1)",
        "}",
    ];
    assert_eq!(lines_from(&graph, 4), expected);
    assert_eq!(gradients, vec![(x.id(), NodeId(6))]);
    Ok(())
}

#[test]
fn a_parameter_the_loss_ignores_gets_zeros() -> TestResult {
    let mut g = GraphBuilder::new("t");
    let x = g.parameter("x", f32(&[2]))?;
    let unused = g.within("model.unused", |g| g.parameter("unused", f32(&[2, 3])))?;
    let loss = g.reduce(ReduceOp::Mean, x, 0, false)?;
    let graph = g.finish();
    let Backward { graph, gradients } = backward(graph, loss.id(), &[unused.id(), x.id()])?;
    graph.validate()?;
    let (wrt, zero) = gradients[0];
    assert_eq!(wrt, unused.id());
    assert_eq!(graph.ty(zero), &f32(&[2, 3]));
    let node = graph.node(zero);
    assert_eq!(node.op, Op::Expand { shape: vec![2, 3] });
    assert_eq!(node.origin, "backward:model.unused");
    let scalar = graph.node(node.inputs[0]);
    assert!(matches!(&scalar.op, Op::Constant(c) if c.values == [0.0]));
    // Mean: the seed divided by the count, then expanded.
    let expected = [
        "  // backward",
        "  %3: f32[] = constant 1",
        "  %4: f32[] = constant 2",
        "  %5: f32[] = div(%3, %4)",
        "  %6: f32[2] = expand<[2]>(%5)",
    ];
    assert_eq!(&lines_from(&graph, 3)[..5], expected);
    assert_eq!(gradients[1], (x.id(), NodeId(6)));
    Ok(())
}

#[test]
fn integer_paths_carry_no_gradient() -> TestResult {
    // The loss depends on x only through top-k indices and a one-hot of them.
    let mut g = GraphBuilder::new("t");
    let x = g.parameter("x", f32(&[2, 4]))?;
    let chosen = g.top_k(x, 2)?;
    let hot = g.one_hot(chosen, 4, DType::F32)?;
    let total = g.reduce(ReduceOp::Sum, hot, 2, false)?;
    let total = g.reduce(ReduceOp::Sum, total, 1, false)?;
    let loss = g.reduce(ReduceOp::Sum, total, 0, false)?;
    let graph = g.finish();
    let before = graph.nodes.len();
    let Backward { graph, gradients } = backward(graph, loss.id(), &[x.id()])?;
    // No seed, no rule: only the zero gradient (a scalar and its expand).
    assert_eq!(graph.nodes.len(), before + 2);
    assert_eq!(
        graph.node(gradients[0].1).op,
        Op::Expand { shape: vec![2, 4] }
    );
    Ok(())
}

#[test]
fn routing_is_not_differentiated_but_gates_are() -> TestResult {
    let mut g = GraphBuilder::new("t");
    let scores = g.parameter("scores", f32(&[3, 4]))?;
    let experts = g.top_k(scores, 2)?;
    let gates = g.take_along(scores, experts, 1)?;
    let total = g.reduce(ReduceOp::Sum, gates, 1, false)?;
    let loss = g.reduce(ReduceOp::Sum, total, 0, false)?;
    let graph = g.finish();
    let Backward { graph, gradients } = backward(graph, loss.id(), &[scores.id()])?;
    graph.validate()?;
    let ops: Vec<&str> = graph.nodes[loss.id().index() + 1..]
        .iter()
        .map(|n| n.op.name())
        .collect();
    // Seed, expands back over the sums (over axis 1, after a reshape to [3, 1]), then
    // take_along's one-hot scatter (axis 1 is the last axis: no permute).
    assert_eq!(
        ops,
        [
            "constant", "expand", "reshape", "expand", "one_hot", "reshape", "mul", "sum"
        ]
    );
    assert_eq!(graph.ty(gradients[0].1), &f32(&[3, 4]));
    assert!(
        !graph
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::TopK { .. }) && n.origin.starts_with("backward"))
    );
    Ok(())
}

#[test]
fn buffers_get_no_gradient_and_outputs_are_named() -> TestResult {
    let mut g = GraphBuilder::new("t");
    let x = g.input("x", f32(&[2, 3]))?;
    let (w, bias) = g.within("layer", |g| {
        Ok((
            g.parameter("layer.weight", f32(&[4, 3]))?,
            g.buffer("layer.bias", f32(&[4]))?,
        ))
    })?;
    let y = crate::model::linear(&mut g, x, w)?;
    let y = g.add(y, bias)?;
    let total = g.reduce(ReduceOp::Sum, y, 1, false)?;
    let loss = g.reduce(ReduceOp::Sum, total, 0, false)?;
    let graph = g.finish();
    let Backward { graph, gradients } = backward_parameters(graph, loss.id())?;
    graph.validate()?;
    assert_eq!(gradients.len(), 1);
    assert_eq!(gradients[0].0, w.id());
    let names: Vec<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["grad.layer.weight"]);
    assert_eq!(graph.ty(gradients[0].1), &f32(&[4, 3]));
    // The weight's gradient comes through the transpose of `linear`: the last node is the
    // inverse permute of `xᵀ·g`.
    assert_eq!(
        graph.node(gradients[0].1).op,
        Op::Permute { perm: vec![1, 0] }
    );
    Ok(())
}

#[test]
fn bad_requests_are_errors() -> TestResult {
    let mut g = GraphBuilder::new("t");
    let x = g.parameter("x", f32(&[2]))?;
    let ids = g.input("ids", TensorType::new(DType::I64, [2]))?;
    let y = g.mul(x, x)?;
    let loss = g.reduce(ReduceOp::Sum, y, 0, false)?;
    let graph = g.finish();
    let message = |r: Result<Backward, GraphError>| match r {
        Ok(_) => "no error".to_owned(),
        Err(e) => e.to_string(),
    };
    let not_scalar = message(backward(graph.clone(), y.id(), &[x.id()]));
    assert!(
        not_scalar.contains("must be a float scalar, not f32[2]"),
        "{not_scalar}"
    );
    let integer = message(backward(graph.clone(), loss.id(), &[ids.id()]));
    assert!(
        integer.contains("cannot differentiate with respect to %1 of type i64[2]"),
        "{integer}"
    );
    let outside = message(backward(graph, loss.id(), &[NodeId(99)]));
    assert!(outside.contains("%99 is not in the graph"), "{outside}");
    Ok(())
}

#[test]
fn backward_is_deterministic_and_keeps_the_forward_graph() -> TestResult {
    let mut g = GraphBuilder::new("t");
    let x = g.parameter("x", f32(&[2, 3]))?;
    let s = g.softmax(x)?;
    let m = g.binary(crate::graph::BinaryOp::Max, s, x)?;
    let m = g.reduce(ReduceOp::Max, m, 1, false)?;
    let loss = g.reduce(ReduceOp::Mean, m, 0, false)?;
    g.output("loss", loss)?;
    let graph = g.finish();
    let first = backward(graph.clone(), loss.id(), &[x.id()])?;
    let second = backward(graph.clone(), loss.id(), &[x.id()])?;
    assert_eq!(first, second);
    assert_eq!(first.graph.nodes[..graph.nodes.len()], graph.nodes[..]);
    assert_eq!(first.graph.outputs, graph.outputs);
    first.graph.validate()
}

/// The workspace's micro spec (`crate::spec::examples::micro`) with plain RoPE.
fn tiny_spec() -> crate::spec::ModelSpec {
    let mut spec = crate::spec::examples::micro();
    spec.rope.yarn = None;
    spec
}

#[test]
fn the_whole_model_differentiates_and_validates() -> TestResult {
    use crate::model::{DeepSeekV3, ForwardOptions, forward_outputs};
    use crate::module::{Module, Scope};
    let mut g = GraphBuilder::new("tiny");
    let model: DeepSeekV3 = DeepSeekV3::declare(&mut Scope::root(&mut g), &tiny_spec())?;
    let options = ForwardOptions {
        batch: 2,
        seq: 3,
        with_mtp: false,
    };
    let out = forward_outputs(&mut g, &model, options)?;
    let flat = g.reshape(out.logits, &[2 * 3 * 16])?;
    let loss = g.reduce(ReduceOp::Mean, flat, 0, false)?;
    let graph = g.finish();
    let forward_len = graph.nodes.len();
    let trainable = graph
        .parameters()
        .filter(|(id, _, _)| graph.is_trainable(*id))
        .count();
    let Backward { graph, gradients } = backward_parameters(graph, loss.id())?;
    graph.validate()?;
    assert_eq!(gradients.len(), trainable);
    // Every backward node is used: by a later node or as a gradient output.
    let mut used = vec![false; graph.nodes.len()];
    for node in &graph.nodes {
        for input in &node.inputs {
            used[input.index()] = true;
        }
    }
    for output in &graph.outputs {
        used[output.node.index()] = true;
    }
    let dead: Vec<usize> = (forward_len..graph.nodes.len())
        .filter(|&i| !used[i])
        .collect();
    assert!(dead.is_empty(), "unused backward nodes: {dead:?}");
    for &(wrt, gradient) in &gradients {
        assert_eq!(graph.ty(wrt), graph.ty(gradient));
    }
    // Without the MTP pass, the MTP module's parameters get zeros; the routed experts get
    // their weight gradients from the grouped-matmul op.
    let zero_named = |name: &str| {
        let id = graph.output(name).map(|id| graph.node(id));
        matches!(id, Some(n) if matches!(n.op, Op::Expand { .. }))
    };
    assert!(zero_named("grad.model.layers.2.eh_proj.weight"));
    assert!(!zero_named(
        "grad.model.layers.1.mlp.experts.3.down_proj.weight"
    ));
    assert!(
        graph
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::GroupedMatMulWeightGrad { experts: 4, .. }))
    );
    Ok(())
}
