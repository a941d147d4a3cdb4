//! Autodiff against finite differences, on the reference interpreter.
//!
//! Per op: `f(x) = Σ op(x) · R` with `R` a fixed random tensor, differentiated with respect to
//! every float input by [`backward`], compared with the central difference
//! `(f(x + h) - f(x - h)) / (2h)` at every coordinate, h = 1e-2 (inputs have magnitudes
//! 0.5..2, so the step is 0.5-2 % of a value).
//!
//! Error measure: max over coordinates of |autodiff - finite difference|, divided by the
//! largest |autodiff| component of that input. Tolerance 2e-3, from two error sources:
//! - f32 rounding of `f`: the interpreter rounds every op to f32, so `f` (a sum of at most a
//!   few dozen O(1) terms) carries about 1e-6 absolute noise, which the division by
//!   2h = 2e-2 turns into about 5e-5;
//! - truncation: the central difference is off by h²/6 · f''' ≈ 2e-5 · f''', at most about
//!   1e-3 relative for the most curved functions here (exp at 2, recip and rsqrt at 0.5).
//!
//! Measured: at most 3.3e-4 (div, with respect to the divisor: the most curved case), most
//! ops 1e-6..3e-5. Any wrong rule (a missing transpose, a wrong broadcast reduction, a dropped
//! term, ties not split) gives errors of order 1e-1..1.

use std::collections::HashMap;
use std::error::Error;

use fathom_compiler::autodiff::{Backward, backward, backward_parameters};
use fathom_compiler::graph::{BinaryOp, ReduceOp, UnaryOp};
use fathom_compiler::{DType, Graph, GraphBuilder, GraphError, NodeId, Tensor, TensorType};
use fathom_runtime::HostTensor;
use fathom_runtime::interp::{Feeds, evaluate_nodes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The whole tiny model.
#[path = "grad_check/model.rs"]
mod model;

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const H: f64 = 1e-2;
const TOLERANCE: f64 = 2e-3;

fn f32_ty(dims: &[usize]) -> TensorType {
    TensorType::new(DType::F32, dims)
}

/// `n` values with magnitudes uniform in `lo..hi`, signs random when `signed`.
fn values(rng: &mut ChaCha8Rng, n: usize, (lo, hi): (f32, f32), signed: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.random_range(lo..hi);
            if signed && rng.random_bool(0.5) {
                -v
            } else {
                v
            }
        })
        .collect()
}

/// A positive f32 input of magnitudes 0.5..2.
fn positive(seed: u64, dims: &[usize]) -> HostTensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product();
    HostTensor::f32(dims, values(&mut rng, n, (0.5, 2.0), false))
}

/// An f32 input of magnitudes 0.5..2 and random signs.
fn signed(seed: u64, dims: &[usize]) -> HostTensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product();
    HostTensor::f32(dims, values(&mut rng, n, (0.5, 2.0), true))
}

fn ids(dims: &[usize], values: &[i64]) -> HostTensor {
    HostTensor::i64(dims, values.to_vec())
}

/// `Σ y · R` as a scalar node, `R` a constant of `y`'s shape with values uniform in -1..1.
fn weighted_sum(g: &mut GraphBuilder, y: Tensor, seed: u64) -> Result<Tensor, GraphError> {
    let ty = g.ty(y).clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r: Vec<f64> = (0..ty.numel())
        .map(|_| f64::from(rng.random_range(-1.0f32..1.0)))
        .collect();
    let r = g.constant("R", ty.clone(), r)?;
    let weighted = g.mul(y, r)?;
    let flat = g.reshape(weighted, &[ty.numel()])?;
    g.reduce(ReduceOp::Sum, flat, 0, false)
}

/// Evaluates one node with `inputs` fed.
fn eval(
    graph: &Graph,
    inputs: &HashMap<String, HostTensor>,
    node: NodeId,
) -> TestResult<HostTensor> {
    let mut values = evaluate_nodes(graph, &Feeds::new(inputs, &()), &[node])?;
    Ok(values.pop().ok_or("no value")?)
}

fn scalar(t: &HostTensor) -> TestResult<f64> {
    Ok(f64::from(
        *t.as_f32()
            .and_then(|v| v.first())
            .ok_or("not a float scalar")?,
    ))
}

/// Builds `f = Σ build(inputs) · R`, differentiates it with respect to every float input and
/// checks each gradient against central differences. Returns the worst relative error.
fn grad_check(
    name: &str,
    feeds: Vec<(&str, HostTensor)>,
    build: impl FnOnce(&mut GraphBuilder, &[Tensor]) -> Result<Tensor, GraphError>,
) -> TestResult<f64> {
    let mut g = GraphBuilder::new(name);
    let inputs = feeds
        .iter()
        .map(|(n, t)| g.input(n, t.ty.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let y = build(&mut g, &inputs)?;
    let loss = weighted_sum(&mut g, y, 7)?;
    let wrt: Vec<NodeId> = feeds
        .iter()
        .zip(&inputs)
        .filter(|((_, t), _)| t.ty.dtype.is_float())
        .map(|(_, x)| x.id())
        .collect();
    let Backward { graph, gradients } = backward(g.finish(), loss.id(), &wrt)?;
    let mut fed: HashMap<String, HostTensor> =
        feeds.into_iter().map(|(n, t)| (n.to_owned(), t)).collect();

    let mut worst = 0.0f64;
    for (wrt, gradient) in gradients {
        let name = graph
            .inputs()
            .find(|(id, _, _)| *id == wrt)
            .ok_or("wrt is an input")?
            .1;
        let name = name.to_owned();
        let analytic = eval(&graph, &fed, gradient)?;
        assert_eq!(analytic.ty, *graph.ty(wrt), "gradient type");
        let analytic = analytic.as_f32().ok_or("float gradient")?.to_vec();
        let scale = analytic
            .iter()
            .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
        assert!(scale > 0.0, "{name}: the gradient is all zeros");
        let mut error = 0.0f64;
        for (i, &ad) in analytic.iter().enumerate() {
            let fd = central_difference(&graph, &mut fed, &name, i, loss.id(), H)?;
            error = error.max((fd - f64::from(ad)).abs() / scale);
        }
        println!(
            "{:<28} d/d{name:<6} max error {error:.1e} (max |grad| {scale:.2})",
            graph.name
        );
        assert!(
            error < TOLERANCE,
            "{}: d/d{name}: error {error:e}",
            graph.name
        );
        worst = worst.max(error);
    }
    Ok(worst)
}

/// `(f(x + h e_i) - f(x - h e_i)) / (x_i+ - x_i-)` with the actual f32 step.
fn central_difference(
    graph: &Graph,
    fed: &mut HashMap<String, HostTensor>,
    input: &str,
    i: usize,
    loss: NodeId,
    h: f64,
) -> TestResult<f64> {
    let original = fed.get(input).ok_or("fed")?.clone();
    let x = f64::from(original.as_f32().ok_or("float input")?[i]);
    let mut at = |value: f64| -> TestResult<(f64, f64)> {
        let mut moved = original.clone();
        let v = value as f32;
        if let fathom_runtime::Data::Float(data) = &mut moved.data {
            data[i] = v;
        }
        fed.insert(input.to_owned(), moved);
        Ok((f64::from(v), scalar(&eval(graph, fed, loss)?)?))
    };
    let (xp, fp) = at(x + h)?;
    let (xm, fm) = at(x - h)?;
    fed.insert(input.to_owned(), original);
    Ok((fp - fm) / (xp - xm))
}

fn unary(op: UnaryOp, x: HostTensor) -> TestResult<f64> {
    grad_check(&format!("unary {op:?}"), vec![("x", x)], |g, t| {
        g.unary(op, t[0])
    })
}

#[test]
fn neg() -> TestResult {
    unary(UnaryOp::Neg, signed(1, &[2, 3])).map(drop)
}

#[test]
fn exp() -> TestResult {
    unary(UnaryOp::Exp, signed(2, &[2, 3])).map(drop)
}

#[test]
fn log() -> TestResult {
    unary(UnaryOp::Log, positive(3, &[2, 3])).map(drop)
}

#[test]
fn sqrt() -> TestResult {
    unary(UnaryOp::Sqrt, positive(4, &[2, 3])).map(drop)
}

#[test]
fn rsqrt() -> TestResult {
    unary(UnaryOp::Rsqrt, positive(5, &[2, 3])).map(drop)
}

#[test]
fn recip() -> TestResult {
    unary(UnaryOp::Recip, signed(6, &[2, 3])).map(drop)
}

#[test]
fn abs() -> TestResult {
    unary(UnaryOp::Abs, signed(7, &[2, 3])).map(drop)
}

#[test]
fn sigmoid() -> TestResult {
    unary(UnaryOp::Sigmoid, signed(8, &[2, 3])).map(drop)
}

fn binary(op: BinaryOp, a: HostTensor, b: HostTensor) -> TestResult<f64> {
    let name = format!("{op:?} {} {}", a.ty, b.ty);
    grad_check(&name, vec![("a", a), ("b", b)], |g, t| {
        g.binary(op, t[0], t[1])
    })
}

#[test]
fn add_broadcasts() -> TestResult {
    binary(BinaryOp::Add, signed(10, &[2, 3]), signed(11, &[3])).map(drop)
}

#[test]
fn sub_broadcasts_both_ways() -> TestResult {
    binary(BinaryOp::Sub, signed(12, &[2, 1, 3]), signed(13, &[4, 1])).map(drop)
}

#[test]
fn mul_broadcasts() -> TestResult {
    binary(BinaryOp::Mul, signed(14, &[2, 3]), signed(15, &[2, 1])).map(drop)?;
    binary(BinaryOp::Mul, signed(16, &[]), signed(17, &[3, 2])).map(drop)
}

#[test]
fn div_broadcasts() -> TestResult {
    binary(BinaryOp::Div, signed(18, &[3]), positive(19, &[2, 3])).map(drop)?;
    binary(BinaryOp::Div, signed(20, &[2, 3]), signed(21, &[2, 1])).map(drop)
}

/// `b` and `a = b ± (0.1..0.6)`, broadcast `[2, 3]` against `[3]`: never within a step of a
/// tie, so the finite difference sees one smooth branch.
fn separated(seed: u64) -> (HostTensor, HostTensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let b = values(&mut rng, 3, (0.5, 2.0), true);
    let gaps = values(&mut rng, 6, (0.1, 0.6), true);
    let a = (0..6).map(|i| b[i % 3] + gaps[i]).collect();
    (HostTensor::f32([2, 3], a), HostTensor::f32([3], b))
}

#[test]
fn max_and_min_broadcast() -> TestResult {
    let (a, b) = separated(22);
    binary(BinaryOp::Max, a.clone(), b.clone())?;
    binary(BinaryOp::Min, b, a).map(drop)
}

#[test]
fn max_and_min_split_ties_evenly() -> TestResult {
    // At a tie, the central difference is (a + h - a) / 2h = 1/2 for each operand: exactly
    // torch.maximum's even split.
    let a = HostTensor::f32([4], vec![1.0, 0.5, -2.0, 1.5]);
    let b = HostTensor::f32([4], vec![1.0, 1.25, -2.0, 1.5]);
    binary(BinaryOp::Max, a.clone(), b.clone())?;
    binary(BinaryOp::Min, a, b).map(drop)
}

#[test]
fn select_broadcasts_its_branches() -> TestResult {
    let cond = HostTensor {
        ty: TensorType::new(DType::Bool, [2, 3]),
        data: fathom_runtime::Data::Bool(vec![true, false, false, true, true, false]),
    };
    let feeds = vec![
        ("cond", cond),
        ("a", signed(23, &[2, 3])),
        ("b", signed(24, &[3])),
    ];
    grad_check("select", feeds, |g, t| g.select(t[0], t[1], t[2])).map(drop)
}

#[test]
fn cast_f32_to_f32() -> TestResult {
    grad_check("cast", vec![("x", signed(25, &[2, 3]))], |g, t| {
        let squares = g.mul(t[0], t[0])?;
        g.cast(squares, DType::F32)
    })
    .map(drop)
}

fn reduce(op: ReduceOp, x: HostTensor, axis: usize, keep: bool) -> TestResult<f64> {
    let name = format!("reduce {op:?} axis {axis}");
    grad_check(&name, vec![("x", x)], |g, t| g.reduce(op, t[0], axis, keep))
}

#[test]
fn reduce_sum_and_mean() -> TestResult {
    reduce(ReduceOp::Sum, signed(26, &[2, 3, 4]), 1, false)?;
    reduce(ReduceOp::Sum, signed(27, &[2, 3]), 0, true)?;
    reduce(ReduceOp::Mean, signed(28, &[2, 3, 4]), 2, true)?;
    reduce(ReduceOp::Mean, signed(29, &[3, 2]), 0, false).map(drop)
}

#[test]
fn reduce_max() -> TestResult {
    reduce(ReduceOp::Max, signed(30, &[2, 3, 4]), 1, false)?;
    reduce(ReduceOp::Max, signed(31, &[3, 5]), 1, true).map(drop)
}

#[test]
fn reduce_max_splits_ties_evenly() -> TestResult {
    // Each row's maximum appears twice: autodiff gives each copy half the cotangent (amax),
    // the central difference 1/2 too (raising one copy moves the max, lowering it does not).
    let x = HostTensor::f32([2, 4], vec![1.5, 0.5, 1.5, -1.0, 0.25, 2.0, 1.0, 2.0]);
    reduce(ReduceOp::Max, x, 1, false).map(drop)
}

fn matmul(a: HostTensor, b: HostTensor) -> TestResult<f64> {
    let name = format!("matmul {} @ {}", a.ty, b.ty);
    grad_check(&name, vec![("a", a), ("b", b)], |g, t| g.matmul(t[0], t[1]))
}

#[test]
fn matmul_linear_layer() -> TestResult {
    matmul(signed(32, &[2, 3, 4]), signed(33, &[4, 5])).map(drop)
}

#[test]
fn matmul_broadcasts_batches() -> TestResult {
    matmul(signed(34, &[2, 1, 3, 4]), signed(35, &[3, 4, 2]))?;
    matmul(signed(36, &[3, 4]), signed(37, &[2, 4, 5])).map(drop)
}

/// Every triangular part and triangle, on batched non-square matrices (the gradients'
/// triangles come from `Triangular::gradients`; a wrong one leaves or drops whole triangles).
#[test]
fn triangular_matmuls() -> TestResult {
    use fathom_compiler::graph::{MatMulPart, Triangle, Triangular};
    for part in [MatMulPart::Left, MatMulPart::Right, MatMulPart::Output] {
        for triangle in [Triangle::Lower, Triangle::Upper] {
            let t = Triangular::new(part, triangle);
            let feeds = vec![("a", signed(50, &[2, 4, 5])), ("b", signed(51, &[2, 5, 3]))];
            grad_check(&format!("matmul<{t}>"), feeds, |g, x| {
                g.matmul_triangular(x[0], x[1], Some(t))
            })?;
        }
    }
    Ok(())
}

#[test]
fn softmax() -> TestResult {
    grad_check("softmax", vec![("x", signed(38, &[2, 5]))], |g, t| {
        g.softmax(t[0])
    })
    .map(drop)
}

#[test]
fn rms_norm_chain() -> TestResult {
    let feeds = vec![("x", signed(39, &[3, 6])), ("w", signed(40, &[6]))];
    grad_check("rms_norm", feeds, |g, t| {
        let (x, w) = (t[0], t[1]);
        let squares = g.mul(x, x)?;
        let mean = g.reduce(ReduceOp::Mean, squares, 1, true)?;
        let shifted = g.offset(mean, 1e-6)?;
        let inv_rms = g.rsqrt(shifted)?;
        let normed = g.mul(x, inv_rms)?;
        g.mul(w, normed)
    })
    .map(drop)
}

#[test]
fn reshape_and_permute() -> TestResult {
    grad_check("reshape", vec![("x", signed(41, &[2, 6]))], |g, t| {
        let y = g.reshape(t[0], &[3, 4])?;
        g.mul(y, y)
    })?;
    grad_check("permute", vec![("x", signed(42, &[2, 3, 4]))], |g, t| {
        let y = g.permute(t[0], &[2, 0, 1])?;
        g.mul(y, y)
    })
    .map(drop)
}

#[test]
fn expand() -> TestResult {
    grad_check("expand", vec![("x", signed(43, &[3, 1]))], |g, t| {
        g.expand(t[0], &[2, 3, 4])
    })
    .map(drop)
}

#[test]
fn slice() -> TestResult {
    grad_check("slice middle", vec![("x", signed(44, &[3, 5]))], |g, t| {
        g.slice(t[0], 1, 1, 4)
    })?;
    grad_check("slice prefix", vec![("x", signed(45, &[3, 5]))], |g, t| {
        let y = g.slice(t[0], 0, 0, 2)?;
        g.mul(y, y)
    })
    .map(drop)
}

#[test]
fn concat() -> TestResult {
    let feeds = vec![
        ("a", signed(46, &[2, 1])),
        ("b", signed(47, &[2, 3])),
        ("c", signed(48, &[2, 2])),
    ];
    grad_check("concat", feeds, |g, t| {
        let y = g.concat(&[t[0], t[1], t[2]], 1)?;
        g.mul(y, y)
    })
    .map(drop)
}

#[test]
fn stack() -> TestResult {
    let feeds = vec![("a", signed(49, &[2, 3])), ("b", signed(50, &[2, 3]))];
    grad_check("stack", feeds, |g, t| {
        let y = g.stack(&[t[0], t[1], t[0]])?;
        g.mul(y, y)
    })
    .map(drop)
}

#[test]
fn gather_scatters_rows() -> TestResult {
    // Rows 0 and 2 are looked up twice, row 3 never (its gradient must be zero).
    let feeds = vec![
        ("table", signed(51, &[5, 3])),
        ("indices", ids(&[2, 3], &[0, 2, 2, 4, 0, 1])),
    ];
    grad_check("gather", feeds, |g, t| g.gather(t[0], t[1])).map(drop)
}

#[test]
fn take_along_axis_1_and_last() -> TestResult {
    // Axis 1 of a matrix (the MoE gates): the last axis.
    let feeds = vec![
        ("x", signed(52, &[3, 4])),
        ("indices", ids(&[3, 2], &[1, 3, 0, 0, 2, 1])),
    ];
    grad_check("take_along last of 2", feeds, |g, t| {
        g.take_along(t[0], t[1], 1)
    })?;
    // Axis 2 of 3.
    let feeds = vec![
        ("x", signed(53, &[2, 3, 4])),
        (
            "indices",
            ids(&[2, 3, 2], &[3, 0, 1, 1, 2, 3, 0, 0, 3, 2, 1, 0]),
        ),
    ];
    grad_check("take_along last of 3", feeds, |g, t| {
        g.take_along(t[0], t[1], 2)
    })?;
    // Axis 1 of 3 (the one-hot axis is moved back by a permute), with more picks than rows.
    let feeds = vec![
        ("x", signed(54, &[2, 3, 2])),
        (
            "indices",
            ids(
                &[2, 4, 2],
                &[0, 2, 1, 1, 2, 0, 2, 2, 1, 0, 0, 0, 2, 1, 1, 2],
            ),
        ),
    ];
    grad_check("take_along axis 1 of 3", feeds, |g, t| {
        g.take_along(t[0], t[1], 1)
    })?;
    // Axis 0 of 2.
    let feeds = vec![
        ("x", signed(55, &[3, 2])),
        ("indices", ids(&[2, 2], &[2, 0, 1, 1])),
    ];
    grad_check("take_along axis 0", feeds, |g, t| {
        g.take_along(t[0], t[1], 0)
    })
    .map(drop)
}

/// Token-slot routing over 4 experts; expert 3 gets no token.
fn expert_ids() -> HostTensor {
    ids(&[4, 2], &[0, 1, 1, 2, 2, 0, 0, 0])
}

#[test]
fn grouped_matmul_with_one_slot() -> TestResult {
    let feeds = vec![
        ("x", signed(56, &[4, 1, 3])),
        ("w", signed(57, &[4, 2, 3])),
        ("ids", expert_ids()),
    ];
    grad_check("grouped_matmul x[4,1,3]", feeds, |g, t| {
        g.grouped_matmul(t[0], t[1], t[2])
    })
    .map(drop)
}

#[test]
fn grouped_matmul_with_a_row_per_slot() -> TestResult {
    let feeds = vec![
        ("x", signed(58, &[4, 2, 3])),
        ("w", signed(59, &[4, 2, 3])),
        ("ids", expert_ids()),
    ];
    grad_check("grouped_matmul x[4,2,3]", feeds, |g, t| {
        g.grouped_matmul(t[0], t[1], t[2])
    })
    .map(drop)
}

#[test]
fn grouped_matmul_weight_grad() -> TestResult {
    // The weight-gradient op's own adjoint (a second derivative of a grouped matmul).
    let feeds = vec![
        ("c", signed(60, &[4, 2, 2])),
        ("x", signed(61, &[4, 1, 3])),
        ("ids", expert_ids()),
    ];
    grad_check("grouped_matmul_weight_grad", feeds, |g, t| {
        g.grouped_matmul_weight_grad(t[0], t[1], t[2], 4)
    })
    .map(drop)
}

/// `backward_parameters` names its outputs; the interpreter runs them.
#[test]
fn named_parameter_gradients_evaluate() -> TestResult {
    let mut g = GraphBuilder::new("linear");
    let x = g.input("x", f32_ty(&[2, 3]))?;
    let w = g.parameter("layer.weight", f32_ty(&[4, 3]))?;
    let wt = g.transpose(w)?;
    let y = g.matmul(x, wt)?;
    let loss = weighted_sum(&mut g, y, 3)?;
    let Backward { graph, .. } = backward_parameters(g.finish(), loss.id())?;
    let inputs = HashMap::from([("x", signed(62, &[2, 3]))]);
    let params = HashMap::from([("layer.weight", signed(63, &[4, 3]))]);
    let out = fathom_runtime::interp::evaluate(&graph, &Feeds::new(&inputs, &params))?;
    let grad = out.get("grad.layer.weight").ok_or("named output")?;
    assert_eq!(grad.ty, f32_ty(&[4, 3]));
    Ok(())
}

/// `QuantizeDequantize` is differentiated straight through: its cotangent passes unchanged.
/// Finite differences would see the rounding's steps (zero slope, or a jump), so the oracle is
/// the same graph without the op: `d/dx Σ (qdq(x) · B) · R` must equal `d/dx Σ (x · B) · R`
/// bit for bit, and `d/dx Σ qdq(x) · R` must be `R` itself.
#[test]
fn quantize_dequantize_is_straight_through() -> TestResult {
    use fathom_compiler::graph::QuantFormat;

    let build = |quantize: bool, with_matmul: bool| -> TestResult<(Graph, NodeId)> {
        let mut g = GraphBuilder::new("qdq");
        let x = g.input("x", f32_ty(&[2, 3, 8]))?;
        let b = g.input("b", f32_ty(&[8, 5]))?;
        let xq = if quantize {
            g.quantize_dequantize(x, QuantFormat::E4M3, (1, 4), false)?
        } else {
            x
        };
        let y = if with_matmul { g.matmul(xq, b)? } else { xq };
        let loss = weighted_sum(&mut g, y, 7)?;
        let Backward { graph, gradients } = backward(g.finish(), loss.id(), &[x.id()])?;
        Ok((graph, gradients[0].1))
    };
    let inputs: HashMap<String, HostTensor> = HashMap::from([
        ("x".to_owned(), signed(70, &[2, 3, 8])),
        ("b".to_owned(), signed(71, &[8, 5])),
    ]);
    for with_matmul in [false, true] {
        let (graph, dx) = build(true, with_matmul)?;
        let (plain, plain_dx) = build(false, with_matmul)?;
        let got = eval(&graph, &inputs, dx)?;
        let want = eval(&plain, &inputs, plain_dx)?;
        assert_eq!(got, want, "with matmul: {with_matmul}");
        // The forward value really is rounded (or the check would be vacuous).
        let x = graph.inputs().next().ok_or("x")?.0;
        let q = graph
            .node_ids()
            .find(|&id| {
                graph.node(id).inputs == [x] && graph.node(id).op.name() == "quantize_dequantize"
            })
            .ok_or("qdq node")?;
        assert_ne!(eval(&graph, &inputs, q)?, inputs["x"]);
    }
    // Without the matmul the gradient is R: the weights of `weighted_sum`, all nonzero.
    let (graph, dx) = build(true, false)?;
    let r = eval(&graph, &inputs, dx)?;
    assert!(
        r.as_f32()
            .ok_or("floats")?
            .iter()
            .all(|v| *v != 0.0 && v.abs() < 1.0)
    );
    Ok(())
}

#[test]
fn cross_entropy_with_an_ignored_row() -> TestResult {
    // Rows 0, 1 and 3 count (row 3's label is the last index); row 2 is ignored, so its
    // logits get exactly zero gradient (checked against the finite difference, also zero).
    let feeds = vec![
        ("logits", signed(56, &[2, 2, 5])),
        ("labels", ids(&[2, 2], &[1, 0, -1, 4])),
    ];
    grad_check("cross_entropy", feeds, |g, t| g.cross_entropy(t[0], t[1])).map(drop)
}
