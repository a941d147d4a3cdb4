//! Shape and dtype inference: the single source of truth for what each op accepts.
//!
//! Used by the builder for every new node and by [`Graph::validate`](super::Graph::validate)
//! for graphs from elsewhere. Errors are plain sentences naming the operand types; the caller
//! adds the node.

use crate::dtype::{DType, Shape, TensorType};

use super::op::Op;

/// The type of `op` applied to operands of `operands` types. Leaf ops (`Input`, `Parameter`,
/// `Constant`) have no operands and take their type from `declared`.
pub fn infer_type(
    op: &Op,
    operands: &[&TensorType],
    declared: Option<&TensorType>,
) -> Result<TensorType, String> {
    if let Some(arity) = op.arity() {
        if operands.len() != arity {
            return Err(format!("takes {arity} operands, got {}", operands.len()));
        }
    } else if operands.is_empty() {
        return Err("takes at least one operand, got none".into());
    }
    match op {
        Op::Input { name } | Op::Parameter { name, .. } => {
            if name.is_empty() {
                return Err("has an empty name".into());
            }
            declared
                .cloned()
                .ok_or_else(|| "has no declared type".into())
        }
        Op::Constant(data) => {
            let ty = declared.ok_or("has no declared type")?;
            if data.values.len() != ty.numel() {
                return Err(format!(
                    "holds {} values but its type {ty} has {} elements",
                    data.values.len(),
                    ty.numel()
                ));
            }
            Ok(ty.clone())
        }
        Op::Unary(_) => {
            float(operands[0], "operand")?;
            Ok(operands[0].clone())
        }
        Op::Binary(_) => {
            let (a, b) = (operands[0], operands[1]);
            same_dtype(a, b)?;
            if a.dtype == DType::Bool {
                return Err(format!("does not take bool operands: {a} and {b}"));
            }
            Ok(TensorType::new(a.dtype, broadcast(a, b)?))
        }
        Op::Compare(_) => {
            let (a, b) = (operands[0], operands[1]);
            same_dtype(a, b)?;
            Ok(TensorType::new(DType::Bool, broadcast(a, b)?))
        }
        Op::Select => {
            let (cond, a, b) = (operands[0], operands[1], operands[2]);
            if cond.dtype != DType::Bool {
                return Err(format!("condition must be bool, got {cond}"));
            }
            same_dtype(a, b)?;
            let values = broadcast(a, b)?;
            let shape = broadcast(cond, &TensorType::new(a.dtype, values))?;
            Ok(TensorType::new(a.dtype, shape))
        }
        Op::Cast { to } => Ok(TensorType::new(*to, operands[0].shape.clone())),
        Op::StopGradient => Ok(operands[0].clone()),
        Op::Reduce { axis, keep_dim, .. } => {
            let x = operands[0];
            check_axis(*axis, x)?;
            if x.dtype == DType::Bool {
                return Err(format!("cannot reduce a bool tensor {x}"));
            }
            let mut dims = x.dims().to_vec();
            if *keep_dim {
                dims[*axis] = 1;
            } else {
                dims.remove(*axis);
            }
            Ok(TensorType::new(x.dtype, dims))
        }
        Op::MatMul { accumulation, .. } => {
            accumulation.check()?;
            matmul(operands[0], operands[1])
        }
        Op::Reshape { shape } => {
            let x = operands[0];
            let target = Shape(shape.clone());
            if target.numel() != x.numel() {
                return Err(format!(
                    "cannot reshape {x} ({} elements) to {target} ({} elements)",
                    x.numel(),
                    target.numel()
                ));
            }
            Ok(TensorType::new(x.dtype, target))
        }
        Op::Permute { perm } => {
            let x = operands[0];
            let mut seen = vec![false; x.rank()];
            if perm.len() != x.rank() {
                return Err(format!("permutation {perm:?} does not fit {x}"));
            }
            for &p in perm {
                if p >= x.rank() || std::mem::replace(&mut seen[p], true) {
                    return Err(format!("{perm:?} is not a permutation of the axes of {x}"));
                }
            }
            let dims: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
            Ok(TensorType::new(x.dtype, dims))
        }
        Op::Expand { shape } => {
            let x = operands[0];
            let target = TensorType::new(x.dtype, shape.clone());
            if broadcast(x, &target)?.dims() != shape.as_slice() {
                return Err(format!("cannot expand {x} to {}", target.shape));
            }
            Ok(target)
        }
        Op::Slice { axis, start, end } => {
            let x = operands[0];
            check_axis(*axis, x)?;
            if start >= end || *end > x.dims()[*axis] {
                return Err(format!(
                    "range {start}..{end} is empty or outside axis {axis} of {x}"
                ));
            }
            let mut dims = x.dims().to_vec();
            dims[*axis] = end - start;
            Ok(TensorType::new(x.dtype, dims))
        }
        Op::Concat { axis } => {
            let first = operands[0];
            check_axis(*axis, first)?;
            let mut dims = first.dims().to_vec();
            for other in &operands[1..] {
                same_dtype(first, other)?;
                let compatible = other.rank() == first.rank()
                    && (0..first.rank()).all(|i| i == *axis || other.dims()[i] == first.dims()[i]);
                if !compatible {
                    return Err(format!(
                        "cannot concatenate {first} and {other} along axis {axis}"
                    ));
                }
                dims[*axis] += other.dims()[*axis];
            }
            Ok(TensorType::new(first.dtype, dims))
        }
        Op::Gather => {
            let (table, indices) = (operands[0], operands[1]);
            integer(indices, "indices")?;
            if table.rank() == 0 {
                return Err(format!("table must have at least one axis, got {table}"));
            }
            let mut dims = indices.dims().to_vec();
            dims.extend_from_slice(&table.dims()[1..]);
            Ok(TensorType::new(table.dtype, dims))
        }
        Op::IndexAdd { rows } => {
            let (values, indices) = (operands[0], operands[1]);
            integer(indices, "indices")?;
            float(values, "values")?;
            let lead = indices.rank();
            if values.rank() < lead || values.dims()[..lead] != *indices.dims() {
                return Err(format!(
                    "values {values} must start with the indices' shape {indices}"
                ));
            }
            if *rows == 0 {
                return Err("rows must be positive".into());
            }
            let mut dims = vec![*rows];
            dims.extend_from_slice(&values.dims()[lead..]);
            Ok(TensorType::new(values.dtype, dims))
        }
        Op::TakeAlong { axis } => {
            let (x, indices) = (operands[0], operands[1]);
            integer(indices, "indices")?;
            check_axis(*axis, x)?;
            let compatible = indices.rank() == x.rank()
                && (0..x.rank()).all(|i| i == *axis || indices.dims()[i] == x.dims()[i]);
            if !compatible {
                return Err(format!(
                    "indices {indices} must match {x} on every axis but {axis}"
                ));
            }
            Ok(TensorType::new(x.dtype, indices.shape.clone()))
        }
        Op::TopK { k } => {
            let x = operands[0];
            let last = x
                .dims()
                .last()
                .copied()
                .ok_or("cannot take top-k of a scalar")?;
            if *k == 0 || *k > last {
                return Err(format!("k = {k} must be in 1..={last} for {x}"));
            }
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank checked above") = *k;
            Ok(TensorType::new(DType::I64, dims))
        }
        Op::OneHot { depth, dtype } => {
            let indices = operands[0];
            integer(indices, "indices")?;
            if *depth == 0 {
                return Err("depth must be positive".into());
            }
            let mut dims = indices.dims().to_vec();
            dims.push(*depth);
            Ok(TensorType::new(*dtype, dims))
        }
        Op::GroupedMatMul { accumulation } => {
            accumulation.check()?;
            grouped_matmul(operands[0], operands[1], operands[2])
        }
        Op::GroupedMatMulWeightGrad {
            experts,
            accumulation,
            rounding,
        } => {
            accumulation.check()?;
            if rounding.is_some_and(|tiles| tiles.tile_rows == 0) {
                return Err("the rounding's expert tiles need at least one row".into());
            }
            grouped_matmul_weight_grad(*experts, operands[0], operands[1], operands[2])
        }
        Op::QuantizeDequantize {
            tile_rows,
            tile_cols,
            ..
        } => {
            let x = operands[0];
            float(x, "operand")?;
            if x.rank() < 2 {
                return Err(format!(
                    "tiles cover the last two axes; the operand {x} needs at least two"
                ));
            }
            if *tile_rows == 0 || *tile_cols == 0 {
                return Err(format!(
                    "tile {tile_rows}x{tile_cols} has a zero side; tiles must be at least 1x1"
                ));
            }
            Ok(x.clone())
        }
        Op::CrossEntropy => {
            let (logits, labels) = (operands[0], operands[1]);
            cross_entropy_rows(logits, labels)
        }
        Op::CrossEntropyGrad => {
            let (logits, labels) = (operands[0], operands[1]);
            let rows = cross_entropy_rows(logits, labels)?;
            for (what, operand) in [("loss", operands[2]), ("cotangent", operands[3])] {
                if *operand != rows {
                    return Err(format!(
                        "the {what} {operand} must have the loss rows' type {rows}"
                    ));
                }
            }
            Ok(logits.clone())
        }
        Op::CausalAttention(config) => {
            let dims = attention_operands(config, &operands[..4])?;
            Ok(TensorType::new(
                operands[0].dtype,
                [dims.batch, dims.tokens, dims.heads, dims.v],
            ))
        }
        Op::CausalAttentionLse(config) => {
            let dims = attention_operands(config, &operands[..4])?;
            Ok(TensorType::new(
                operands[0].dtype,
                [dims.batch, dims.heads, dims.tokens],
            ))
        }
        Op::CausalAttentionGrad { config, operand } => {
            let dims = attention_operands(config, &operands[..4])?;
            let dtype = operands[0].dtype;
            let out = TensorType::new(dtype, [dims.batch, dims.tokens, dims.heads, dims.v]);
            let lse = TensorType::new(dtype, [dims.batch, dims.heads, dims.tokens]);
            for (what, operand, want) in [
                ("out", operands[4], &out),
                ("lse", operands[5], &lse),
                ("d_out", operands[6], &out),
            ] {
                if operand != want {
                    return Err(format!("the {what} {operand} must be {want}"));
                }
            }
            Ok(operands[operand.index()].clone())
        }
        Op::Stack => {
            let first = operands[0];
            if let Some(other) = operands.iter().find(|t| **t != first) {
                return Err(format!("cannot stack {first} with {other}"));
            }
            let mut dims = vec![operands.len()];
            dims.extend_from_slice(first.dims());
            Ok(TensorType::new(first.dtype, dims))
        }
    }
}

/// The extents of a causal attention's operands.
struct AttentionDims {
    batch: usize,
    tokens: usize,
    heads: usize,
    v: usize,
}

/// Checks `[q (b, t, h, nope + rope), k_nope (b, t, h, nope), k_rope (b, t, rope), v (b, t, h,
/// dv)]`: one float type, agreeing extents, every width at least 1.
fn attention_operands(
    config: &crate::graph::AttentionConfig,
    operands: &[&TensorType],
) -> Result<AttentionDims, String> {
    let [q, k_nope, k_rope, v] = operands else {
        unreachable!("the arity is checked first")
    };
    float(q, "q")?;
    for other in [k_nope, k_rope, v] {
        same_dtype(q, other)?;
    }
    if !config.scale.is_finite() {
        return Err(format!("the softmax scale {} is not finite", config.scale));
    }
    if config.products_in.is_some_and(|t| !t.is_float()) {
        return Err("products_in must be a float type".into());
    }
    let named = [("q", q), ("k_nope", k_nope), ("k_rope", k_rope), ("v", v)];
    for (what, t, rank) in [
        ("q", q, 4),
        ("k_nope", k_nope, 4),
        ("k_rope", k_rope, 3),
        ("v", v, 4),
    ] {
        if t.rank() != rank {
            return Err(format!(
                "{what} {t} must have rank {rank} (q, k_nope, v: [batch, tokens, heads, width]; \
                 k_rope: [batch, tokens, width])"
            ));
        }
    }
    let (qd, nd, rd, vd) = (q.dims(), k_nope.dims(), k_rope.dims(), v.dims());
    let (batch, tokens, heads) = (qd[0], qd[1], qd[2]);
    let agree = nd[..3] == qd[..3] && vd[..3] == qd[..3] && rd[..2] == qd[..2];
    if !agree || qd[3] != nd[3] + rd[2] {
        let [q, n, r, v] = named.map(|(_, t)| t.to_string());
        return Err(format!(
            "operands q {q}, k_nope {n}, k_rope {r}, v {v} do not agree: batch, tokens and \
             heads must match, and q's width must be k_nope's plus k_rope's"
        ));
    }
    if let Some((what, _)) = [("k_nope", nd[3]), ("k_rope", rd[2]), ("v", vd[3])]
        .into_iter()
        .find(|(_, width)| *width == 0)
    {
        return Err(format!("{what} has an empty head width"));
    }
    Ok(AttentionDims {
        batch,
        tokens,
        heads,
        v: vd[3],
    })
}

fn float(t: &TensorType, what: &str) -> Result<(), String> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{what} must be floating point, got {t}"))
    }
}

/// The per-row loss type of a cross-entropy: the logits without their last (vocabulary) axis,
/// which the labels' shape must be.
fn cross_entropy_rows(logits: &TensorType, labels: &TensorType) -> Result<TensorType, String> {
    float(logits, "logits")?;
    integer(labels, "labels")?;
    let Some((&vocab, rows)) = logits.dims().split_last() else {
        return Err(format!("logits {logits} need a vocabulary axis"));
    };
    if vocab == 0 {
        return Err(format!("logits {logits} have an empty vocabulary axis"));
    }
    if labels.dims() != rows {
        return Err(format!(
            "labels {labels} must have the logits' shape without its last axis ({logits})"
        ));
    }
    Ok(TensorType::new(logits.dtype, rows.to_vec()))
}

fn integer(t: &TensorType, what: &str) -> Result<(), String> {
    if t.dtype.is_integer() {
        Ok(())
    } else {
        Err(format!("{what} must be integer, got {t}"))
    }
}

fn same_dtype(a: &TensorType, b: &TensorType) -> Result<(), String> {
    if a.dtype == b.dtype {
        Ok(())
    } else {
        Err(format!("element types differ: {a} and {b}"))
    }
}

fn check_axis(axis: usize, x: &TensorType) -> Result<(), String> {
    if axis < x.rank() {
        Ok(())
    } else {
        Err(format!("axis {axis} is out of range for {x}"))
    }
}

/// NumPy broadcasting of two shapes.
pub(crate) fn broadcast(a: &TensorType, b: &TensorType) -> Result<Shape, String> {
    let rank = a.rank().max(b.rank());
    let mut dims = vec![0; rank];
    for (i, dim) in dims.iter_mut().enumerate() {
        let da = extent_from_right(a.dims(), rank - 1 - i);
        let db = extent_from_right(b.dims(), rank - 1 - i);
        *dim = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes do not broadcast: {a} and {b}")),
        };
    }
    Ok(Shape(dims))
}

/// The extent `from_right` axes from the last one, 1 where the shape has no such axis.
fn extent_from_right(dims: &[usize], from_right: usize) -> usize {
    if from_right < dims.len() {
        dims[dims.len() - 1 - from_right]
    } else {
        1
    }
}

fn matmul(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    same_dtype(a, b)?;
    float(a, "lhs")?;
    if a.rank() < 2 || b.rank() < 2 {
        return Err(format!("operands need at least two axes: {a} and {b}"));
    }
    let (m, k) = (a.dims()[a.rank() - 2], a.dims()[a.rank() - 1]);
    let (k2, n) = (b.dims()[b.rank() - 2], b.dims()[b.rank() - 1]);
    if k != k2 {
        return Err(format!("inner dimensions differ: lhs {a} vs rhs {b}"));
    }
    let batch_a = TensorType::new(a.dtype, &a.dims()[..a.rank() - 2]);
    let batch_b = TensorType::new(b.dtype, &b.dims()[..b.rank() - 2]);
    let mut dims = broadcast(&batch_a, &batch_b)
        .map_err(|_| format!("batch axes do not broadcast: lhs {a} vs rhs {b}"))?
        .0;
    dims.extend([m, n]);
    Ok(TensorType::new(a.dtype, dims))
}

fn grouped_matmul(
    x: &TensorType,
    weights: &TensorType,
    expert_ids: &TensorType,
) -> Result<TensorType, String> {
    same_dtype(x, weights)?;
    float(x, "x")?;
    integer(expert_ids, "expert ids")?;
    if x.rank() != 3 || weights.rank() != 3 || expert_ids.rank() != 2 {
        return Err(format!(
            "expects x (tokens, slots, k), weights (experts, n, k), expert ids (tokens, slots); \
             got {x}, {weights}, {expert_ids}"
        ));
    }
    let (tokens, slots) = (expert_ids.dims()[0], expert_ids.dims()[1]);
    if x.dims()[0] != tokens || (x.dims()[1] != slots && x.dims()[1] != 1) {
        return Err(format!("x {x} does not match expert ids {expert_ids}"));
    }
    if x.dims()[2] != weights.dims()[2] {
        return Err(format!(
            "inner dimensions differ: x {x} vs weights {weights}"
        ));
    }
    Ok(TensorType::new(x.dtype, [tokens, slots, weights.dims()[1]]))
}

fn grouped_matmul_weight_grad(
    experts: usize,
    cotangent: &TensorType,
    x: &TensorType,
    expert_ids: &TensorType,
) -> Result<TensorType, String> {
    same_dtype(cotangent, x)?;
    float(x, "x")?;
    integer(expert_ids, "expert ids")?;
    if experts == 0 {
        return Err("needs at least one expert".into());
    }
    if cotangent.rank() != 3 || x.rank() != 3 || expert_ids.rank() != 2 {
        return Err(format!(
            "expects cotangent (tokens, slots, n), x (tokens, slots, k), expert ids \
             (tokens, slots); got {cotangent}, {x}, {expert_ids}"
        ));
    }
    let (tokens, slots) = (expert_ids.dims()[0], expert_ids.dims()[1]);
    if cotangent.dims()[..2] != [tokens, slots] {
        return Err(format!(
            "cotangent {cotangent} does not match expert ids {expert_ids}"
        ));
    }
    if x.dims()[0] != tokens || (x.dims()[1] != slots && x.dims()[1] != 1) {
        return Err(format!("x {x} does not match expert ids {expert_ids}"));
    }
    Ok(TensorType::new(
        x.dtype,
        [experts, cotangent.dims()[2], x.dims()[2]],
    ))
}
