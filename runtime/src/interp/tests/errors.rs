//! Bad feeds and bad data give errors naming the culprit; nothing panics.

use fathom_compiler::graph::{Node, Op};
use fathom_compiler::{DType, Graph, NodeId};

use super::*;
use crate::interp::{InterpError, evaluate_nodes};

/// `x @ w` with `x` an input f32[2,3] and `w` a parameter f32[3,2].
fn linear() -> TestResult<Graph> {
    let mut b = GraphBuilder::new("linear");
    let x = b.input("x", ty(DType::F32, &[2, 3]))?;
    let w = b.parameter("layer.weight", ty(DType::F32, &[3, 2]))?;
    let y = b.matmul(x, w)?;
    b.output("y", y)?;
    Ok(b.finish())
}

fn run_linear(x: HostTensor, w: Option<HostTensor>) -> TestResult<InterpError> {
    let graph = linear()?;
    let inputs = HashMap::from([("x", x)]);
    let parameters: HashMap<&str, HostTensor> =
        w.into_iter().map(|w| ("layer.weight", w)).collect();
    match evaluate(&graph, &Feeds::new(&inputs, &parameters)) {
        Ok(_) => Err("expected an error".into()),
        Err(e) => Ok(e),
    }
}

#[test]
fn missing_parameter_is_named() -> TestResult {
    let err = run_linear(iota(&[2, 3]), None)?;
    assert!(
        matches!(&err, InterpError::Missing { kind: "parameter", name, .. } if name == "layer.weight"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("parameter `layer.weight`"), "{message}");
    assert!(message.contains("f32[3,2]"), "{message}");
    Ok(())
}

#[test]
fn missing_input_is_named() -> TestResult {
    let graph = linear()?;
    let parameters = HashMap::from([("layer.weight", iota(&[3, 2]))]);
    let err = evaluate(&graph, &Feeds::new(&(), &parameters))
        .err()
        .ok_or("no error")?;
    assert!(
        matches!(&err, InterpError::Missing { kind: "input", name, .. } if name == "x"),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn wrong_fed_shape_names_both_types() -> TestResult {
    let err = run_linear(iota(&[3, 2]), Some(iota(&[3, 2])))?;
    assert!(
        matches!(&err, InterpError::TypeMismatch { name, .. } if name == "x"),
        "{err:?}"
    );
    let message = err.to_string();
    for part in ["input `x`", "f32[3,2]", "f32[2,3]"] {
        assert!(message.contains(part), "{message} lacks {part}");
    }
    Ok(())
}

#[test]
fn wrong_fed_dtype_is_a_mismatch() -> TestResult {
    let w = floats(DType::BF16, &[3, 2], &[0.0; 6]);
    let err = run_linear(iota(&[2, 3]), Some(w))?;
    assert!(
        matches!(
            &err,
            InterpError::TypeMismatch {
                kind: "parameter",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("bf16[3,2]"), "{err}");
    Ok(())
}

#[test]
fn malformed_feeds_are_rejected() -> TestResult {
    // Too few values for the type.
    let short = HostTensor {
        ty: ty(DType::F32, &[2, 3]),
        data: Data::Float(vec![0.0; 5]),
    };
    let err = run_linear(short, Some(iota(&[3, 2])))?;
    assert!(
        matches!(&err, InterpError::MalformedFeed { name, .. } if name == "x"),
        "{err:?}"
    );
    // Integer storage for floats.
    let wrong_kind = HostTensor {
        ty: ty(DType::F32, &[2, 3]),
        data: Data::Int(vec![0; 6]),
    };
    let err = run_linear(wrong_kind, Some(iota(&[3, 2])))?;
    assert!(matches!(&err, InterpError::MalformedFeed { .. }), "{err:?}");
    // A bf16 tensor holding a value that is not a bf16.
    let x = floats(DType::BF16, &[2], &[1.0, 1.00390625]);
    let err = eval_x(x, |b, x| b.neg(x)).err().ok_or("no error")?;
    assert!(err.to_string().contains("element 1 is 1.00390625"), "{err}");
    // An i32 tensor holding an i64 beyond the i32 range.
    let ids = ints(DType::I32, &[1], &[1 << 40]);
    let err = eval_x(ids, |b, x| b.one_hot(x, 2, DType::F32))
        .err()
        .ok_or("no error")?;
    assert!(err.to_string().contains("out of the i32 range"), "{err}");
    Ok(())
}

/// The index error of evaluating `build` on the feeds.
fn index_error(
    feeds: &[(&str, HostTensor)],
    build: impl FnOnce(&mut GraphBuilder, &[Tensor]) -> Result<Tensor, GraphError>,
) -> TestResult<(&'static str, i64, usize, String)> {
    let err = eval_one(feeds, |b, x| {
        b.within("model.embed_tokens", |b| build(b, x))
    })
    .err()
    .ok_or("no error")?;
    match err.downcast_ref::<InterpError>() {
        Some(InterpError::IndexOutOfRange {
            op,
            index,
            bound,
            origin,
            ..
        }) => {
            assert_eq!(origin, "model.embed_tokens");
            Ok((op, *index, *bound, err.to_string()))
        }
        _ => Err(format!("not an index error: {err}").into()),
    }
}

#[test]
fn gather_index_out_of_range_is_named() -> TestResult {
    let table = iota(&[3, 2]);
    let (op, index, bound, message) = index_error(
        &[("t", table.clone()), ("i", i64s(&[2], &[1, 3]))],
        |g, x| g.gather(x[0], x[1]),
    )?;
    assert_eq!((op, index, bound), ("gather", 3, 3));
    assert!(
        message.contains("gather %2 (in model.embed_tokens)"),
        "{message}"
    );
    assert!(
        message.contains("index 3 is out of range 0..3"),
        "{message}"
    );
    let (_, index, _, _) = index_error(&[("t", table), ("i", i64s(&[1], &[-1]))], |g, x| {
        g.gather(x[0], x[1])
    })?;
    assert_eq!(index, -1, "negative indices do not wrap");
    Ok(())
}

#[test]
fn other_index_ops_check_their_range() -> TestResult {
    let x = iota(&[2, 3]);
    let (op, index, bound, _) = index_error(&[("x", x), ("i", i64s(&[2, 1], &[0, 3]))], |g, t| {
        g.take_along(t[0], t[1], 1)
    })?;
    assert_eq!((op, index, bound), ("take_along", 3, 3));

    let (op, index, bound, _) = index_error(&[("i", i64s(&[2], &[0, 4]))], |g, t| {
        g.one_hot(t[0], 4, DType::F32)
    })?;
    assert_eq!((op, index, bound), ("one_hot", 4, 4));

    let feeds = [
        ("x", iota(&[1, 2, 3])),
        ("w", iota(&[2, 2, 3])),
        ("ids", i64s(&[1, 2], &[1, 2])),
    ];
    let (op, index, bound, _) = index_error(&feeds, |g, t| g.grouped_matmul(t[0], t[1], t[2]))?;
    assert_eq!((op, index, bound), ("grouped_matmul", 2, 2));
    Ok(())
}

#[test]
fn integer_division_by_zero_is_an_error() -> TestResult {
    let feeds = [("a", i64s(&[2], &[1, 2])), ("b", i64s(&[2], &[1, 0]))];
    let err = eval_one(&feeds, |g, x| g.div(x[0], x[1]))
        .err()
        .ok_or("no error")?;
    assert!(
        matches!(err.downcast_ref(), Some(InterpError::DivisionByZero { .. })),
        "{err}"
    );
    Ok(())
}

#[test]
fn unknown_requested_node_is_an_error() -> TestResult {
    let graph = linear()?;
    let err = evaluate_nodes(&graph, &Feeds::new(&(), &()), &[NodeId(17)])
        .err()
        .ok_or("no error")?;
    assert_eq!(
        err,
        InterpError::UnknownNode {
            node: NodeId(17),
            len: 3
        }
    );
    Ok(())
}

#[test]
fn invalid_graph_is_an_error() -> TestResult {
    let mut graph = linear()?;
    // Record a wrong type on the matmul.
    graph.nodes[2].ty = ty(DType::F32, &[3, 3]);
    let err = evaluate(&graph, &Feeds::new(&(), &()))
        .err()
        .ok_or("no error")?;
    assert!(matches!(err, InterpError::InvalidGraph(_)), "{err:?}");
    // An operand after its user.
    let graph = Graph {
        name: "bad".into(),
        nodes: vec![Node {
            op: Op::Unary(fathom_compiler::graph::UnaryOp::Neg),
            inputs: vec![NodeId(0)],
            ty: ty(DType::F32, &[]),
            origin: String::new(),
        }],
        outputs: vec![],
    };
    let err = evaluate_nodes(&graph, &Feeds::new(&(), &()), &[NodeId(0)])
        .err()
        .ok_or("no error")?;
    assert!(matches!(err, InterpError::InvalidGraph(_)), "{err:?}");
    Ok(())
}
