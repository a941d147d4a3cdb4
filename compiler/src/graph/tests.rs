use crate::dtype::{DType, TensorType};
use crate::error::GraphError;

use super::*;

fn f32(dims: &[usize]) -> TensorType {
    TensorType::new(DType::F32, dims)
}

#[test]
fn a_bad_matmul_names_the_node_its_origin_and_both_shapes() {
    let mut g = GraphBuilder::new("t");
    let a = g.input("a", f32(&[2, 8, 32])).unwrap();
    let b = g.parameter("w", f32(&[16, 64])).unwrap();
    let error = g
        .within("model.layers.0.mlp", |g| g.matmul(a, b))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "matmul %2 (in model.layers.0.mlp): inner dimensions differ: lhs f32[2,8,32] vs rhs f32[16,64]"
    );
}

#[test]
fn shape_rules_reject_what_they_must() {
    let mut g = GraphBuilder::new("t");
    let x = g.input("x", f32(&[2, 3])).unwrap();
    let ids = g.input("ids", TensorType::new(DType::I64, [2])).unwrap();
    let broadcast = g.input("y", f32(&[4, 3])).unwrap();
    let detail = |e: GraphError| match e {
        GraphError::Invalid { detail, .. } => detail,
        other => panic!("{other}"),
    };
    assert_eq!(
        detail(g.add(x, broadcast).unwrap_err()),
        "shapes do not broadcast: f32[2,3] and f32[4,3]"
    );
    assert_eq!(
        detail(g.reshape(x, &[4]).unwrap_err()),
        "cannot reshape f32[2,3] (6 elements) to [4] (4 elements)"
    );
    assert!(detail(g.top_k(x, 4).unwrap_err()).contains("k = 4 must be in 1..=3"));
    assert!(detail(g.gather(x, x).unwrap_err()).contains("indices must be integer"));
    assert!(detail(g.add(x, ids).unwrap_err()).contains("element types differ"));
    assert!(detail(g.slice(x, 1, 2, 2).unwrap_err()).contains("empty or outside"));
    assert!(detail(g.permute(x, &[0, 0]).unwrap_err()).contains("not a permutation"));
    assert!(matches!(
        g.input("x", f32(&[1])).unwrap_err(),
        GraphError::DuplicateName { kind: "input", .. }
    ));
}

/// Causal attention checks its four operands against each other and names them all.
#[test]
fn causal_attention_names_operands_that_do_not_agree() {
    let mut g = GraphBuilder::new("t");
    let q = g.input("q", f32(&[2, 5, 3, 6])).unwrap();
    let k_nope = g.input("k_nope", f32(&[2, 5, 3, 4])).unwrap();
    let k_rope = g.input("k_rope", f32(&[2, 5, 2])).unwrap();
    let v = g.input("v", f32(&[2, 5, 3, 8])).unwrap();
    let short_v = g.input("short_v", f32(&[2, 4, 3, 8])).unwrap();
    let flat_rope = g.input("flat_rope", f32(&[10, 2])).unwrap();
    let out = g.causal_attention([q, k_nope, k_rope, v], 0.5).unwrap();
    assert_eq!(g.ty(out), &f32(&[2, 5, 3, 8]));
    let detail = |e: GraphError| match e {
        GraphError::Invalid { detail, .. } => detail,
        other => panic!("{other}"),
    };
    assert_eq!(
        detail(
            g.causal_attention([q, k_nope, k_rope, short_v], 0.5)
                .unwrap_err()
        ),
        "operands q f32[2,5,3,6], k_nope f32[2,5,3,4], k_rope f32[2,5,2], v f32[2,4,3,8] do \
         not agree: batch, tokens and heads must match, and q's width must be k_nope's plus \
         k_rope's"
    );
    assert!(
        detail(
            g.causal_attention([q, k_nope, flat_rope, v], 0.5)
                .unwrap_err()
        )
        .starts_with("k_rope f32[10,2] must have rank 3")
    );
    assert!(
        detail(
            g.causal_attention([q, k_nope, k_rope, v], f64::NAN)
                .unwrap_err()
        )
        .contains("not finite")
    );
}

#[test]
fn validate_catches_a_graph_edited_out_of_shape() {
    let mut g = GraphBuilder::new("t");
    let x = g.input("x", f32(&[2, 3])).unwrap();
    let y = g.add(x, x).unwrap();
    g.output("y", y).unwrap();
    let mut graph = g.finish();
    graph.validate().unwrap();

    let mut wrong_type = graph.clone();
    wrong_type.nodes[1].ty = f32(&[3, 2]);
    let error = wrong_type.validate().unwrap_err().to_string();
    assert_eq!(
        error,
        "add %1: recorded type f32[3,2] but inference gives f32[2,3]"
    );

    graph.nodes[1].inputs[0] = NodeId(1);
    assert_eq!(
        graph.validate().unwrap_err(),
        GraphError::NotTopological {
            node: NodeId(1),
            operand: NodeId(1)
        }
    );
}

#[test]
fn graphs_round_trip_through_json() {
    let mut g = GraphBuilder::new("t");
    let x = g.input("x", f32(&[2, 3])).unwrap();
    let s = g.softmax(x).unwrap();
    g.output("p", s).unwrap();
    let graph = g.finish();
    let text = serde_json::to_string(&graph).unwrap();
    let back: Graph = serde_json::from_str(&text).unwrap();
    assert_eq!(back, graph);
    back.validate().unwrap();
}

#[test]
fn the_printer_is_one_line_per_node_with_origins() {
    let mut g = GraphBuilder::new("norm");
    let x = g.input("x", f32(&[2, 4])).unwrap();
    let w = g.parameter("norm.weight", f32(&[4])).unwrap();
    let y = g
        .within("norm", |g| {
            let sq = g.mul(x, x)?;
            let mean = g.reduce(ReduceOp::Mean, sq, 1, true)?;
            let r = g.rsqrt(mean)?;
            let n = g.mul(x, r)?;
            g.mul(w, n)
        })
        .unwrap();
    g.output("y", y).unwrap();
    let expected = "\
graph norm {
  %0: f32[2,4] = input \"x\"
  %1: f32[4] = param \"norm.weight\"
  // norm
  %2: f32[2,4] = mul(%0, %0)
  %3: f32[2,1] = mean<axis=1, keep>(%2)
  %4: f32[2,1] = rsqrt(%3)
  %5: f32[2,4] = mul(%0, %4)
  %6: f32[2,4] = mul(%1, %5)
  output \"y\" = %6
}
";
    assert_eq!(g.finish().to_string(), expected);
}
