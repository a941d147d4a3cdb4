//! Constant folding: a node computed from constants alone becomes a constant, when its value is
//! small and the compiler can compute it exactly as every backend does.
//!
//! - **Small**: at most [`FOLD_LIMIT`] elements. A broadcast of a constant (the zeros autodiff
//!   pads a slice's gradient with, say) stays a broadcast: as a view it costs no memory, as a
//!   folded constant it would cost all of it.
//! - **Exactly**: f32 arithmetic whose IEEE result does not depend on how it is computed (`+ − × ÷`,
//!   max, min, negation, absolute value, reciprocal, square root: each computed in f64 and
//!   rounded once to f32, which is the f32 operation's correctly rounded result), casts to f32,
//!   and reshapes and broadcasts of any element type. Transcendental functions are left to the
//!   backends, whose approximations differ in the last bits.
//!
//! Last, a sum of two zero-padded concatenations is one concatenation (see
//! [`merge_zero_padded_sums`]): autodiff's gradient of a value sliced in two.
//!
//! What it finds in a training graph: the scalar arithmetic of the loss scales and of the
//! balance loss's normalisation (`1 · 1e-4 / 4`), and small broadcasts of scalars (the ignored
//! label −1 of the targetless positions).

use crate::dtype::DType;
use crate::graph::{BinaryOp, ConstantData, Graph, NodeId, Op, UnaryOp};

use super::dead_code;

/// The most elements a folded constant may have.
pub const FOLD_LIMIT: usize = 4096;

/// `graph` with every foldable node replaced by a constant (labelled `folded`) and the constants
/// nothing reads any more dropped.
pub fn fold_constants(graph: &Graph) -> Graph {
    let mut folded = graph.clone();
    // The values of each constant node, as the node's type holds them.
    let mut values: Vec<Option<Vec<f64>>> = Vec::with_capacity(graph.nodes.len());
    for (id, node) in graph.node_ids().zip(&mut folded.nodes) {
        let value = match &node.op {
            // As the backends hold it: an f32 constant's values are rounded to f32 first.
            Op::Constant(data) if node.ty.dtype == DType::F32 => {
                Some(data.values.iter().map(|&x| f64::from(x as f32)).collect())
            }
            Op::Constant(data) => Some(data.values.clone()),
            _ => evaluate(graph, id, &values),
        };
        if let Some(value) = &value
            && !matches!(node.op, Op::Constant(_))
        {
            node.op = Op::Constant(ConstantData {
                label: "folded".into(),
                values: value.clone(),
            });
            node.inputs.clear();
        }
        values.push(value);
    }
    merge_zero_padded_sums(&mut folded);
    dead_code(&folded)
}

/// `add(concat(0, a), concat(b, 0))` → `concat(b, a)`: a sum of two concatenations along the same
/// axis, split at the same places, in which every pair of parts has a zero on one side (at least)
/// is the concatenation of the other sides. Autodiff writes the gradient of a value that was
/// sliced in two this way (each slice's gradient padded with zeros to the whole); lowered as
/// written, that is two zero fills, two copies and an addition over the whole tensor.
/// (`x + 0` is `x` for every `x` but `−0`, whose sum with `+0` is `+0`: the signs of zeros may
/// differ, no value does.)
fn merge_zero_padded_sums(graph: &mut Graph) {
    for i in 0..graph.nodes.len() {
        let node = &graph.nodes[i];
        if !matches!(node.op, Op::Binary(BinaryOp::Add)) {
            continue;
        }
        let (a, b) = (graph.node(node.inputs[0]), graph.node(node.inputs[1]));
        let (Op::Concat { axis }, Op::Concat { axis: b_axis }) = (&a.op, &b.op) else {
            continue;
        };
        let extent = |part: &NodeId| graph.ty(*part).dims()[*axis];
        let same_splits = axis == b_axis
            && a.inputs.len() == b.inputs.len()
            && a.inputs.iter().map(extent).eq(b.inputs.iter().map(extent))
            && a.ty == node.ty
            && b.ty == node.ty;
        if !same_splits {
            continue;
        }
        let parts: Option<Vec<NodeId>> = a
            .inputs
            .iter()
            .zip(&b.inputs)
            .map(|(&x, &y)| match (is_zero(graph, x), is_zero(graph, y)) {
                (_, true) => Some(x),
                (true, false) => Some(y),
                (false, false) => None,
            })
            .collect();
        if let Some(parts) = parts {
            let axis = *axis;
            let node = &mut graph.nodes[i];
            node.op = Op::Concat { axis };
            node.inputs = parts;
        }
    }
}

/// Whether every value of `id` is zero: a constant of zeros, or a broadcast or reshape of one.
fn is_zero(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    match &node.op {
        Op::Constant(data) => data.values.iter().all(|&v| v == 0.0),
        Op::Expand { .. } | Op::Reshape { .. } => is_zero(graph, node.inputs[0]),
        _ => false,
    }
}

/// The value of node `id` when it is foldable and its inputs are constants.
fn evaluate(graph: &Graph, id: NodeId, values: &[Option<Vec<f64>>]) -> Option<Vec<f64>> {
    let node = graph.node(id);
    let input_dims = |k: usize| graph.ty(node.inputs[k]).dims();
    let numel = node.ty.numel();
    if numel > FOLD_LIMIT || node.inputs.is_empty() {
        return None;
    }
    let inputs: Vec<&Vec<f64>> = node
        .inputs
        .iter()
        .map(|i| values[i.index()].as_ref())
        .collect::<Option<_>>()?;
    let f32_result = node.ty.dtype == DType::F32;
    let dims = node.ty.dims();
    let round = |x: f64| f64::from(x as f32);
    match &node.op {
        Op::Reshape { .. } => Some(inputs[0].clone()),
        Op::Expand { .. } => Some(broadcast(inputs[0], input_dims(0), dims)),
        Op::Cast { to: DType::F32 } => Some(inputs[0].iter().map(|&x| round(x)).collect()),
        Op::Unary(op) if f32_result => {
            let f: fn(f64) -> f64 = match op {
                UnaryOp::Neg => |x| -x,
                UnaryOp::Abs => f64::abs,
                UnaryOp::Recip => |x| 1.0 / x,
                UnaryOp::Sqrt => f64::sqrt,
                _ => return None,
            };
            Some(inputs[0].iter().map(|&x| round(f(x))).collect())
        }
        Op::Binary(op) if f32_result => {
            let f: fn(f64, f64) -> f64 = match op {
                BinaryOp::Add => |a, b| a + b,
                BinaryOp::Sub => |a, b| a - b,
                BinaryOp::Mul => |a, b| a * b,
                BinaryOp::Div => |a, b| a / b,
                BinaryOp::Max => max_propagating_nan,
                BinaryOp::Min => |a, b| -max_propagating_nan(-a, -b),
            };
            let a = broadcast(inputs[0], input_dims(0), dims);
            let b = broadcast(inputs[1], input_dims(1), dims);
            Some(a.iter().zip(&b).map(|(&a, &b)| round(f(a, b))).collect())
        }
        _ => None,
    }
}

/// NumPy's maximum: NaN if either is NaN.
fn max_propagating_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// `values` (extents `from`, row-major) broadcast to `to` by NumPy's rules.
fn broadcast(values: &[f64], from: &[usize], to: &[usize]) -> Vec<f64> {
    let offset = to.len() - from.len();
    // The stride of each output axis in `values`: 0 where the input has extent 1 or no axis.
    let mut strides = vec![0usize; to.len()];
    let mut stride = 1;
    for (axis, &extent) in from.iter().enumerate().rev() {
        if extent != 1 {
            strides[offset + axis] = stride;
        }
        stride *= extent;
    }
    let count: usize = to.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; to.len()];
    for _ in 0..count {
        out.push(
            values[index
                .iter()
                .zip(&strides)
                .map(|(i, s)| i * s)
                .sum::<usize>()],
        );
        for axis in (0..to.len()).rev() {
            index[axis] += 1;
            if index[axis] < to[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::dtype::{DType, TensorType};
    use crate::graph::GraphBuilder;

    #[test]
    fn scalar_arithmetic_and_small_broadcasts_fold() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", TensorType::new(DType::F32, [2, 3])).unwrap();
        let one = g.scalar(1.0, DType::F32).unwrap();
        let tiny = g.scalar(1e-4, DType::F32).unwrap();
        let four = g.scalar(4.0, DType::F32).unwrap();
        let product = g.mul(one, tiny).unwrap();
        let scale = g.div(product, four).unwrap();
        let row = g.expand(scale, &[3]).unwrap();
        let y = g.mul(x, row).unwrap();
        g.output("y", y).unwrap();
        let folded = super::fold_constants(&g.finish());
        folded.validate().unwrap();
        // f32(1e-4) / 4, rounded to f32 as the backends compute it.
        let want = f64::from(1e-4f32 / 4.0);
        assert_eq!(
            folded.to_string(),
            "graph t {\n  %0: f32[2,3] = input \"x\"\n  %1: f32[3] = constant \"folded\"\n  \
             %2: f32[2,3] = mul(%0, %1)\n  output \"y\" = %2\n}\n",
            "{folded}"
        );
        let crate::graph::Op::Constant(data) = &folded.nodes[1].op else {
            panic!("{folded}");
        };
        assert_eq!(data.values, vec![want; 3]);
    }

    #[test]
    fn large_broadcasts_transcendentals_and_integer_arithmetic_stay() {
        let mut g = GraphBuilder::new("t");
        let zero = g.scalar(0.0, DType::F32).unwrap();
        let zeros = g.expand(zero, &[super::FOLD_LIMIT + 1]).unwrap();
        let two = g.scalar(2.0, DType::F32).unwrap();
        let e = g.exp(two).unwrap();
        let i = g.scalar(3.0, DType::I64).unwrap();
        let j = g.add(i, i).unwrap();
        g.output("zeros", zeros).unwrap();
        g.output("e", e).unwrap();
        g.output("j", j).unwrap();
        let graph = g.finish();
        assert_eq!(super::fold_constants(&graph), graph);
    }

    #[test]
    fn a_sum_of_zero_padded_concatenations_is_one_concatenation() {
        let f32_ty = |dims: &[usize]| TensorType::new(DType::F32, dims.to_vec());
        let mut g = GraphBuilder::new("t");
        let a = g.input("a", f32_ty(&[2, 3])).unwrap();
        let b = g.input("b", f32_ty(&[2, 5])).unwrap();
        let c = g.input("c", f32_ty(&[2, 5])).unwrap();
        let zero = g.scalar(0.0, DType::F32).unwrap();
        // Large enough that the zeros stay broadcasts (not folded constants).
        let zeros_3 = g.expand(zero, &[2, 3]).unwrap();
        let zeros_5 = g.expand(zero, &[2, 5]).unwrap();
        let padded_a = g.concat(&[a, zeros_5], 1).unwrap();
        let padded_b = g.concat(&[zeros_3, b], 1).unwrap();
        let sum = g.add(padded_a, padded_b).unwrap();
        g.output("sum", sum).unwrap();
        // Split elsewhere, or with values on both sides of a part: stays a sum.
        let other = g.concat(&[b, zeros_3], 1).unwrap();
        let kept = g.add(padded_a, other).unwrap();
        g.output("kept", kept).unwrap();
        let both = g.concat(&[zeros_3, c], 1).unwrap();
        let both_sides = g.concat(&[a, b], 1).unwrap();
        let kept_too = g.add(both, both_sides).unwrap();
        g.output("kept_too", kept_too).unwrap();
        let folded = super::fold_constants(&g.finish());
        folded.validate().unwrap();
        let text = folded.to_string();
        assert!(
            text.contains("output \"sum\" = %") && text.contains("concat<axis=1>(%0, %1)"),
            "{text}"
        );
        assert_eq!(text.matches(" = add(").count(), 2, "{text}");
    }

    #[test]
    fn f32_constants_are_rounded_before_the_arithmetic() {
        // In f64, 0.1 + 0.2 rounds to a different f32 than f32(0.1) + f32(0.2) would only if the
        // inputs were not rounded first; either way the result must be the f32 sum.
        let mut g = GraphBuilder::new("t");
        let a = g.scalar(0.1, DType::F32).unwrap();
        let b = g.scalar(0.2, DType::F32).unwrap();
        let c = g.add(a, b).unwrap();
        let d = g.sub(c, a).unwrap();
        g.output("d", d).unwrap();
        let folded = super::fold_constants(&g.finish());
        let crate::graph::Op::Constant(data) = &folded.nodes[0].op else {
            panic!("{folded}");
        };
        assert_eq!(data.values, vec![f64::from((0.1f32 + 0.2f32) - 0.1f32)]);
    }
}
