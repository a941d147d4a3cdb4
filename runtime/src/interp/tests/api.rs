//! The public API: outputs, intermediate values, what must be fed, freeing.

use std::collections::BTreeMap;

use fathom_compiler::DType;

use super::*;
use crate::interp::{TensorSource, evaluate_nodes, run};

/// `y = relu(x) * w` and `z = x + 1`, with an unused parameter.
fn graph() -> TestResult<(fathom_compiler::Graph, [Tensor; 4])> {
    let mut b = GraphBuilder::new("api");
    let x = b.input("x", ty(DType::F32, &[2]))?;
    let w = b.parameter("w", ty(DType::F32, &[2]))?;
    b.parameter("unused", ty(DType::F32, &[1000]))?;
    let zero = b.scalar(0.0, DType::F32)?;
    let relu = b.binary(fathom_compiler::graph::BinaryOp::Max, x, zero)?;
    let y = b.mul(relu, w)?;
    let z = b.offset(x, 1.0)?;
    b.output("y", y)?;
    b.output("z", z)?;
    b.output("y_again", y)?;
    Ok((b.finish(), [x, w, relu, y]))
}

#[test]
fn outputs_by_name_in_graph_order() -> TestResult {
    let (graph, _) = graph()?;
    let inputs = HashMap::from([("x".to_string(), f32s(&[2], &[-1.0, 2.0]))]);
    let parameters = BTreeMap::from([("w", f32s(&[2], &[3.0, 4.0]))]);
    let outputs = evaluate(&graph, &Feeds::new(&inputs, &parameters))?;
    assert_eq!(outputs.len(), 3);
    let names: Vec<&str> = outputs.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["y", "z", "y_again"]);
    assert_f32(outputs.get("y").ok_or("y")?, &[2], &[0.0, 8.0]);
    assert_f32(outputs.get("z").ok_or("z")?, &[2], &[0.0, 3.0]);
    assert_eq!(outputs.get("y"), outputs.get("y_again"));
    assert!(outputs.get("nope").is_none());
    Ok(())
}

#[test]
fn intermediate_nodes_can_be_requested() -> TestResult {
    let (graph, [x, w, relu, y]) = graph()?;
    let inputs = HashMap::from([("x", f32s(&[2], &[-1.0, 2.0]))]);
    let w_value = f32s(&[2], &[3.0, 4.0]);
    // Borrowed tensors work as a source too.
    let parameters = HashMap::from([("w", &w_value)]);
    let ids = [relu.id(), y.id(), relu.id(), w.id(), x.id()];
    let values = evaluate_nodes(&graph, &Feeds::new(&inputs, &parameters), &ids)?;
    assert_eq!(values.len(), 5);
    assert_f32(&values[0], &[2], &[0.0, 2.0]);
    assert_f32(&values[1], &[2], &[0.0, 8.0]);
    assert_eq!(values[2], values[0]);
    assert_eq!(values[3], w_value);
    assert_f32(&values[4], &[2], &[-1.0, 2.0]);
    Ok(())
}

#[test]
fn only_what_the_requested_nodes_need_is_fed() -> TestResult {
    let (graph, [x, ..]) = graph()?;
    // `z` needs only `x`: no parameter is fed, not even the unused one.
    let inputs = HashMap::from([("x", f32s(&[2], &[-1.0, 2.0]))]);
    let z = graph.output("z").ok_or("z")?;
    let values = evaluate_nodes(&graph, &Feeds::new(&inputs, &()), &[z, x.id()])?;
    assert_f32(&values[0], &[2], &[0.0, 3.0]);
    Ok(())
}

#[test]
fn intermediates_are_freed_after_their_last_use() -> TestResult {
    let (graph, [x, w, relu, y]) = graph()?;
    let inputs = HashMap::from([("x", f32s(&[2], &[-1.0, 2.0]))]);
    let parameters = HashMap::from([("w", f32s(&[2], &[3.0, 4.0]))]);
    let values = run(&graph, &Feeds::new(&inputs, &parameters), &[y.id()])?;
    let held: Vec<usize> = (0..values.len()).filter(|&i| values[i].is_some()).collect();
    assert_eq!(held, [y.id().index()], "only the target is left");
    // Fed tensors are borrowed, not copied.
    let values = run(
        &graph,
        &Feeds::new(&inputs, &parameters),
        &[w.id(), relu.id(), x.id()],
    )?;
    let w_fed = parameters.tensor("w").ok_or("w")?;
    let w_held = values[w.id().index()].as_deref().ok_or("w held")?;
    assert!(std::ptr::eq(w_fed, w_held));
    Ok(())
}

#[test]
fn outputs_can_be_taken_apart() -> TestResult {
    let (graph, _) = graph()?;
    let inputs = HashMap::from([("x", f32s(&[2], &[1.0, 2.0]))]);
    let parameters = HashMap::from([("w", f32s(&[2], &[1.0, 1.0]))]);
    let mut outputs = evaluate(&graph, &Feeds::new(&inputs, &parameters))?;
    let z = outputs.remove("z").ok_or("z")?;
    assert_f32(&z, &[2], &[2.0, 3.0]);
    assert!(outputs.remove("z").is_none());
    let rest: Vec<String> = outputs.into_iter().map(|(name, _)| name).collect();
    assert_eq!(rest, ["y", "y_again"]);
    Ok(())
}
