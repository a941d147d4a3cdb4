#![allow(clippy::unwrap_used)]

use crate::autodiff::backward_parameters;
use crate::dtype::{DType, TensorType};
use crate::graph::{Accumulation, Graph, GraphBuilder, Op, ReduceOp, Tensor};
use crate::model::linear;
use crate::spec::Fp8Spec;

use super::*;

fn f32_ty(dims: &[usize]) -> TensorType {
    TensorType::new(DType::F32, dims)
}

fn total(g: &mut GraphBuilder, y: Tensor) -> Tensor {
    let n = g.ty(y).numel();
    let flat = g.reshape(y, &[n]).unwrap();
    g.reduce(ReduceOp::Sum, flat, 0, false).unwrap()
}

/// `loss = Σ second(first(x))` with the Linears at paths `first` and `second` (weights
/// `[6, 8]` and `[5, 6]`), plus an attention-like `y·yᵀ` term without parameters; the training
/// graph of all parameters.
fn two_linears(first: &str, second: &str) -> Graph {
    let mut g = GraphBuilder::new("two_linears");
    let x = g.input("x", f32_ty(&[2, 3, 8])).unwrap();
    let w1 = g
        .parameter(&format!("{first}.weight"), f32_ty(&[6, 8]))
        .unwrap();
    let w2 = g
        .parameter(&format!("{second}.weight"), f32_ty(&[5, 6]))
        .unwrap();
    let h = g.within(first, |g| linear(g, x, w1)).unwrap();
    let y = g.within(second, |g| linear(g, h, w2)).unwrap();
    let loss = g
        .within("scores", |g| {
            let yt = g.transpose(y)?;
            let scores = g.matmul(y, yt)?;
            Ok(total(g, scores))
        })
        .unwrap();
    backward_parameters(g.finish(), loss.id()).unwrap().graph
}

fn roles(graph: &Graph) -> Vec<(GemmRole, String)> {
    linear_gemms(graph)
        .into_iter()
        .map(|gemm| (gemm.role, gemm.path))
        .collect()
}

/// The `QuantizeDequantize` tiles feeding each operand of `node`, as the operand is read: a
/// matrix rounded below a transpose has its tiles transposed back (`None`: not quantized).
fn operand_tiles(graph: &Graph, node: crate::graph::NodeId) -> Vec<Option<(usize, usize, bool)>> {
    graph
        .node(node)
        .inputs
        .iter()
        .map(|&i| {
            let mut swaps = 0;
            let mut id = i;
            while let Op::Permute { perm } = &graph.node(id).op {
                swaps += usize::from(perm[..] == [1, 0]);
                id = graph.node(id).inputs[0];
            }
            let Op::QuantizeDequantize {
                tile_rows,
                tile_cols,
                pow2_scales,
                ..
            } = graph.node(id).op
            else {
                return None;
            };
            let (rows, cols) = match swaps % 2 {
                1 => (tile_cols, tile_rows),
                _ => (tile_rows, tile_cols),
            };
            Some((rows, cols, pow2_scales))
        })
        .collect()
}

fn below_permutes(graph: &Graph, mut id: crate::graph::NodeId) -> crate::graph::NodeId {
    while let Op::Permute { .. } = graph.node(id).op {
        id = graph.node(id).inputs[0];
    }
    id
}

fn tiles4() -> Fp8Spec {
    Fp8Spec {
        activation_tile: 4,
        weight_block: 4,
    }
}

#[test]
fn finds_the_three_gemms_of_each_linear_and_not_attention() {
    let graph = two_linears("a", "b");
    let mut found = roles(&graph);
    found.sort_by_key(|(role, path)| (path.clone(), *role as u8));
    use GemmRole::*;
    // `a`'s input is a graph input, which gets no gradient, so `a` has no input-gradient GEMM.
    assert_eq!(
        found,
        [
            (Forward, "a".to_owned()),
            (WeightGradient, "a".to_owned()),
            (Forward, "b".to_owned()),
            (InputGradient, "b".to_owned()),
            (WeightGradient, "b".to_owned()),
        ]
    );
}

#[test]
fn fp8_tiles_run_along_k() {
    let graph = two_linears("a", "b");
    let policy = PrecisionPolicy::uniform(Precision::Fp8);
    let out = apply_precision(&graph, &policy, &tiles4()).unwrap();
    out.validate().unwrap();
    // The rewritten graph is read the same way.
    assert_eq!(roles(&out), roles(&graph));
    for gemm in linear_gemms(&out) {
        let expected = match gemm.role {
            GemmRole::Forward | GemmRole::InputGradient => {
                [Some((1, 4, false)), Some((4, 4, false))]
            }
            GemmRole::WeightGradient => [Some((1, 4, false)), Some((4, 1, false))],
        };
        assert_eq!(operand_tiles(&out, gemm.node), expected, "{gemm:?}");
        // xᵀ is rounded below its transpose, in x's 4×1 tiles: the rounding reads x in place,
        // with no copy laying the transpose out.
        if gemm.role == GemmRole::WeightGradient {
            let xt = out.node(out.node(gemm.node).inputs[0]);
            assert!(matches!(xt.op, Op::Permute { .. }), "{gemm:?}: {:?}", xt.op);
            let rounding = &out.node(xt.inputs[0]).op;
            assert!(
                matches!(
                    rounding,
                    Op::QuantizeDequantize {
                        tile_rows: 4,
                        tile_cols: 1,
                        ..
                    }
                ),
                "{gemm:?}: {rounding:?}"
            );
        }
    }
    // A weight is rounded as stored, once for the forward GEMM and the input gradient's (`a`'s
    // input, x, needs no gradient): the rounding reads the parameter itself.
    for (path, gemms) in [("a", 1), ("b", 2)] {
        let weight_roundings: Vec<_> = linear_gemms(&out)
            .into_iter()
            .filter(|g| g.path == path && g.role != GemmRole::WeightGradient)
            .map(|g| below_permutes(&out, out.node(g.node).inputs[1]))
            .collect();
        assert_eq!(weight_roundings.len(), gemms, "{path}");
        assert!(
            weight_roundings.iter().all(|&r| r == weight_roundings[0]),
            "{path}: one rounding"
        );
        let source = out.node(weight_roundings[0]).inputs[0];
        assert!(
            matches!(out.node(source).op, Op::Parameter { .. }),
            "{path}: {:?}",
            out.node(source).op
        );
    }
    // The attention-like matmul is not quantized (it reads y in bf16, see below).
    let scores = out
        .node_ids()
        .find(|&id| out.node(id).origin == "scores" && matches!(out.node(id).op, Op::MatMul { .. }))
        .unwrap();
    assert_eq!(operand_tiles(&out, scores), [None, None]);
    // Gradients stay f32 and keep their names.
    assert_eq!(
        out.ty(out.output("grad.b.weight").unwrap()),
        &f32_ty(&[5, 6])
    );
}

#[test]
fn bf16_rounds_operands_and_keeps_f32_products() {
    let graph = two_linears("a", "b");
    let out = apply_precision(
        &graph,
        &PrecisionPolicy::uniform(Precision::Bf16),
        &tiles4(),
    )
    .unwrap();
    assert_eq!(linear_gemms(&out).len(), 5);
    for gemm in linear_gemms(&out) {
        assert_eq!(out.ty(gemm.node).dtype, DType::F32);
        for &operand in &out.node(gemm.node).inputs {
            // Rounded before the permutes and reshapes the GEMM reads it through (a weight
            // read transposed is rounded as stored).
            let mut read = operand;
            while let Op::Permute { .. } | Op::Reshape { .. } = out.node(read).op {
                read = out.node(read).inputs[0];
            }
            let back = out.node(read);
            assert_eq!(back.op, Op::Cast { to: DType::F32 });
            let narrow = out.node(back.inputs[0]);
            assert_eq!(narrow.op, Op::Cast { to: DType::BF16 });
            let rounded = &out.node(narrow.inputs[0]).op;
            assert!(
                !matches!(rounded, Op::Permute { .. } | Op::Reshape { .. }),
                "{rounded:?}"
            );
        }
    }
}

#[test]
fn kept_modules_and_overrides() {
    // The router stays f32 and the head goes no lower than BF16: under an FP8 policy only the
    // head's three GEMMs (and the attention-like products) are rounded, each operand to bf16,
    // and nothing is quantized.
    let graph = two_linears("model.layers.0.mlp.gate", "lm_head");
    let out =
        apply_precision(&graph, &PrecisionPolicy::uniform(Precision::Fp8), &tiles4()).unwrap();
    let ops = |op: &dyn Fn(&Op) -> bool| out.nodes.iter().filter(|n| op(&n.op)).count();
    assert_eq!(ops(&|op| matches!(op, Op::QuantizeDequantize { .. })), 0);
    let to_bf16 = |origin: &str| {
        out.nodes
            .iter()
            .filter(|n| n.op == Op::Cast { to: DType::BF16 } && n.origin.ends_with(origin))
            .count()
    };
    assert!(
        (3..=6).contains(&to_bf16("lm_head")),
        "{} casts",
        to_bf16("lm_head")
    );
    assert_eq!(to_bf16("gate"), 0);
    for node in out.nodes.iter().filter(|n| matches!(n.op, Op::Cast { .. })) {
        assert!(
            node.origin.ends_with("lm_head") || node.origin.ends_with("scores"),
            "{}",
            node.origin
        );
    }
    assert_eq!(precision_floor("model.layers.0.mlp.gate"), Precision::Fp32);
    assert_eq!(precision_floor("lm_head"), Precision::Bf16);
    assert_eq!(
        precision_floor("model.layers.0.mlp.gate_proj"),
        Precision::Fp8
    );
    assert_eq!(Precision::Fp8.at_least(Precision::Bf16), Precision::Bf16);
    assert_eq!(Precision::Fp32.at_least(Precision::Bf16), Precision::Fp32);
    let f32_policy = PrecisionPolicy::uniform(Precision::Fp32);
    assert_eq!(
        apply_precision(&graph, &f32_policy, &tiles4()).unwrap(),
        graph
    );

    let graph = two_linears("model.layers.1.x", "model.layers.10.x");
    let policy = PrecisionPolicy {
        default: Precision::Fp32,
        overrides: vec![
            ("model".into(), Precision::Bf16),
            ("model.layers.1".into(), Precision::Fp8),
        ],
        scaling: Fp8Scaling::FineGrained,
        accumulation: Accumulation::HOPPER,
    };
    assert_eq!(policy.precision_of("model.layers.1.x"), Precision::Fp8);
    assert_eq!(policy.precision_of("model.layers.10.x"), Precision::Bf16);
    assert_eq!(policy.precision_of("lm"), Precision::Fp32);
    let out = apply_precision(&graph, &policy, &tiles4()).unwrap();
    assert_eq!(linear_gemms(&out).len(), 5);
    for gemm in linear_gemms(&out) {
        let first = out.node(below_permutes(&out, out.node(gemm.node).inputs[0]));
        let fp8 = matches!(first.op, Op::QuantizeDequantize { .. });
        assert_eq!(fp8, gemm.path == "model.layers.1.x", "{gemm:?}");
        // Only the FP8 GEMMs take the limited accumulator; BF16 ones sum in f32.
        let (Op::MatMul { accumulation, .. } | Op::GroupedMatMul { accumulation }) =
            out.node(gemm.node).op
        else {
            panic!("{gemm:?}");
        };
        assert_eq!(accumulation.is_exact(), !fp8, "{gemm:?}");
        if fp8 {
            assert_eq!(out.node(gemm.node).op.to_string(), "matmul<acc=13b/128>");
        }
    }
}

/// The products of two activations (here `y·yᵀ` and its two gradients) read both operands in
/// bf16 under a BF16 or an FP8 policy, never quantized and summed exactly; an FP32 policy, or
/// an FP32 override covering their module, leaves them as they are.
#[test]
fn activation_products_run_in_bf16_at_most() {
    let graph = two_linears("a", "b");
    let products = activation_products(&graph);
    assert_eq!(products.len(), 3, "{products:?}");
    assert!(products.iter().all(|p| p.path == "scores"), "{products:?}");
    // The operand of `node` read through movements, seen as (is a bf16 round trip).
    let in_bf16 = |graph: &Graph, operand| {
        let mut read = operand;
        while let Op::Permute { .. } | Op::Reshape { .. } = graph.node(read).op {
            read = graph.node(read).inputs[0];
        }
        let back = graph.node(read);
        back.op == Op::Cast { to: DType::F32 }
            && graph.node(back.inputs[0]).op == Op::Cast { to: DType::BF16 }
    };
    let scores_only = |precision| PrecisionPolicy {
        default: Precision::Fp8,
        overrides: vec![("scores".into(), precision)],
        ..PrecisionPolicy::default()
    };
    for (policy, rounded) in [
        (PrecisionPolicy::uniform(Precision::Bf16), true),
        (PrecisionPolicy::uniform(Precision::Fp8), true),
        (scores_only(Precision::Fp8), true),
        (scores_only(Precision::Fp32), false),
        (PrecisionPolicy::uniform(Precision::Fp32), false),
    ] {
        let out = apply_precision(&graph, &policy, &tiles4()).unwrap();
        out.validate().unwrap();
        let found = activation_products(&out);
        assert_eq!(found.len(), 3, "{policy:?}");
        for product in found {
            let node = out.node(product.node);
            assert_eq!(node.op, graph.node(products[0].node).op, "{policy:?}");
            for &operand in &node.inputs {
                assert_eq!(in_bf16(&out, operand), rounded, "{policy:?} {product:?}");
            }
        }
    }
}

#[test]
fn accumulation_is_read_by_name_or_as_a_table_and_checked() {
    let read = |json: &str| serde_json::from_str::<PrecisionPolicy>(json);
    for (json, want) in [
        (r#"{"default": "fp8"}"#, Accumulation::Exact),
        (r#"{"accumulation": "hopper"}"#, Accumulation::HOPPER),
        (
            r#"{"accumulation": "hopper_without_promotion"}"#,
            Accumulation::HOPPER_WITHOUT_PROMOTION,
        ),
        (
            r#"{"accumulation": {"mantissa_bits": 10, "promotion_interval": 64}}"#,
            Accumulation::Limited {
                mantissa_bits: 10,
                promotion_interval: Some(64),
            },
        ),
        (
            r#"{"accumulation": {"mantissa_bits": 13}}"#,
            Accumulation::HOPPER_WITHOUT_PROMOTION,
        ),
    ] {
        let policy = read(json).unwrap();
        assert_eq!(policy.accumulation, want, "{json}");
        let again = read(&serde_json::to_string(&policy).unwrap()).unwrap();
        assert_eq!(again, policy, "{json}");
    }
    let err = read(r#"{"accumulation": "volta"}"#).unwrap_err();
    assert!(
        err.to_string().contains("unknown accumulation `volta`"),
        "{err}"
    );
    let err = read(r#"{"accumulation": {"mantissa_bits": 30}}"#).unwrap_err();
    assert!(err.to_string().contains("keeps 30 mantissa bits"), "{err}");
    let err =
        read(r#"{"accumulation": {"mantissa_bits": 13, "promotion_interval": 0}}"#).unwrap_err();
    assert!(err.to_string().contains("at least 1 product"), "{err}");
    // The graph checks the op the same way.
    let mut g = GraphBuilder::new("acc");
    let a = g.input("a", f32_ty(&[2, 3])).unwrap();
    let b = g.input("b", f32_ty(&[3, 4])).unwrap();
    let op = Op::MatMul {
        accumulation: Accumulation::Limited {
            mantissa_bits: 0,
            promotion_interval: None,
        },
        triangular: None,
    };
    let err = g.push(op, &[a, b], None).unwrap_err();
    assert!(
        err.to_string()
            .contains("keeps 0 mantissa bits; expected 1 to 23"),
        "{err}"
    );
}

#[test]
fn per_tensor_scaling_uses_one_tile_per_operand() {
    let graph = two_linears("a", "b");
    let policy = PrecisionPolicy {
        scaling: Fp8Scaling::PerTensor,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let out = apply_precision(&graph, &policy, &tiles4()).unwrap();
    out.validate().unwrap();
    let forward_b = linear_gemms(&out)
        .into_iter()
        .find(|g| g.role == GemmRole::Forward && g.path == "b")
        .unwrap();
    // h [2, 3, 6] is viewed as [6, 6]; the weight (transposed, [6, 5]) is one tile.
    let lhs = out.node(forward_b.node).inputs[0];
    assert_eq!(
        out.node(lhs).op,
        Op::Reshape {
            shape: vec![2, 3, 6]
        }
    );
    let q = out.node(out.node(lhs).inputs[0]);
    assert!(matches!(
        q.op,
        Op::QuantizeDequantize {
            tile_rows: 6,
            tile_cols: 6,
            ..
        }
    ));
    // The weight is one tile as stored, [5, 6]: [6, 5] as read, transposed.
    assert_eq!(operand_tiles(&out, forward_b.node)[1], Some((6, 5, false)));
}

#[test]
fn an_fp32_policy_changes_nothing() {
    let graph = two_linears("a", "b");
    let out = apply_precision(&graph, &PrecisionPolicy::default(), &tiles4()).unwrap();
    assert_eq!(out, graph);
}

#[test]
fn bad_settings_are_errors() {
    let graph = two_linears("a", "b");
    let policy = PrecisionPolicy {
        overrides: vec![("model.".into(), Precision::Fp8)],
        ..PrecisionPolicy::default()
    };
    let err = apply_precision(&graph, &policy, &tiles4()).unwrap_err();
    assert!(
        err.to_string().contains("`model.` is not a module path"),
        "{err}"
    );
    let tiling = Fp8Spec {
        activation_tile: 0,
        weight_block: 4,
    };
    let err =
        apply_precision(&graph, &PrecisionPolicy::uniform(Precision::Fp8), &tiling).unwrap_err();
    assert_eq!(
        err,
        PrecisionError::EmptyTile {
            field: "activation_tile"
        }
    );
    assert_eq!(
        "fp16".parse::<Precision>().unwrap_err().to_string(),
        "unknown precision `fp16`; expected fp32, bf16 or fp8"
    );
}

#[test]
fn policies_read_from_a_word_or_a_table() {
    let word: PrecisionPolicy = serde_json::from_str("\"fp8\"").unwrap();
    assert_eq!(word, PrecisionPolicy::uniform(Precision::Fp8));
    let table: PrecisionPolicy = serde_json::from_str(
        r#"{"default": "bf16", "overrides": [["lm", "fp32"]], "scaling": "per_tensor"}"#,
    )
    .unwrap();
    assert_eq!(table.overrides, [("lm".to_owned(), Precision::Fp32)]);
    assert_eq!(table.scaling, Fp8Scaling::PerTensor);
    // What is written reads back.
    let again: PrecisionPolicy =
        serde_json::from_str(&serde_json::to_string(&table).unwrap()).unwrap();
    assert_eq!(again, table);
    let err = serde_json::from_str::<PrecisionPolicy>("\"fp4\"").unwrap_err();
    assert!(err.to_string().contains("unknown precision `fp4`"), "{err}");
    let err = serde_json::from_str::<PrecisionPolicy>(r#"{"defualt": "fp8"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `defualt`"), "{err}");
}

#[test]
fn quantize_dequantize_checks_its_operand_and_tiles() {
    use crate::graph::QuantFormat;
    let mut g = GraphBuilder::new("qdq");
    let x = g.input("x", f32_ty(&[2, 3, 8])).unwrap();
    let q = g
        .quantize_dequantize(x, QuantFormat::E4M3, (1, 4), true)
        .unwrap();
    assert_eq!(g.ty(q), &f32_ty(&[2, 3, 8]));
    assert_eq!(
        g.graph().node(q.id()).op.to_string(),
        "quantize_dequantize<e4m3, tile=1x4, pow2>"
    );
    let err = g
        .quantize_dequantize(x, QuantFormat::E4M3, (0, 4), false)
        .unwrap_err();
    assert!(
        err.to_string().contains("tile 0x4 has a zero side"),
        "{err}"
    );
    let v = g.input("v", f32_ty(&[8])).unwrap();
    let err = g
        .quantize_dequantize(v, QuantFormat::E4M3, (1, 4), false)
        .unwrap_err();
    assert!(err.to_string().contains("needs at least two"), "{err}");
    let ids = g.input("ids", TensorType::new(DType::I64, [2, 3])).unwrap();
    assert!(
        g.quantize_dequantize(ids, QuantFormat::E4M3, (1, 4), false)
            .is_err()
    );
}
