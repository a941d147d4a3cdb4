//! Adjoints of the contractions: `MatMul`, `GroupedMatMul`, `GroupedMatMulWeightGrad` and
//! `CausalAttention`.

use crate::error::GraphError;
use crate::graph::{AttentionConfig, AttentionOperand, GraphBuilder, Op, Tensor, Triangular};

use super::Adjoint;
use super::reduce_to::sum_to;

/// `[a (..., m, k), b (..., k, n)]`: `da = g·bᵀ`, `db = aᵀ·g`, each summed back to its
/// operand's batch shape, with the triangles [`Triangular::gradients`] gives when the product
/// is triangular. A matrix `b` under a batched `a` (a linear layer) gets its gradient from one
/// matmul of `a` and `g` flattened to `[batch·m, k]` and `[batch·m, n]` (not a triangular
/// product: flattening would mix its matrices' rows).
pub(super) fn matmul(
    g: &mut GraphBuilder,
    triangular: Option<Triangular>,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (lhs, rhs, cot) = (a.inputs[0], a.inputs[1], a.cot);
    let lhs_dims = g.dims(lhs).to_vec();
    let rhs_dims = g.dims(rhs).to_vec();
    let (tri_l, tri_r) = match triangular {
        Some(t) => {
            let (da, db) = t.gradients();
            (Some(da), Some(db))
        }
        None => (None, None),
    };
    let dl = if a.wanted[0] {
        let rhs_t = g.transpose(rhs)?;
        let dl = g.matmul_triangular(cot, rhs_t, tri_l)?;
        Some(sum_to(g, dl, &lhs_dims)?)
    } else {
        None
    };
    let dr = if !a.wanted[1] {
        None
    } else if rhs_dims.len() == 2 && lhs_dims.len() > 2 && triangular.is_none() {
        let (k, n) = (rhs_dims[0], rhs_dims[1]);
        let rows = lhs_dims[..lhs_dims.len() - 1].iter().product();
        let flat_lhs = g.reshape(lhs, &[rows, k])?;
        let flat_cot = g.reshape(cot, &[rows, n])?;
        let lhs_t = g.transpose(flat_lhs)?;
        Some(g.matmul(lhs_t, flat_cot)?)
    } else {
        let lhs_t = g.transpose(lhs)?;
        let dr = g.matmul_triangular(lhs_t, cot, tri_r)?;
        Some(sum_to(g, dr, &rhs_dims)?)
    };
    Ok(vec![dl, dr])
}

/// `[x (T, S|1, K), w (E, N, K), ids (T, S)]`: `dx = grouped_matmul(g, wᵀ, ids)` (each
/// token-slot's cotangent through its expert's weight, untransposed), summed over the slots
/// when `x` has one; `dw = grouped_matmul_weight_grad(g, x, ids)`. None for the ids.
pub(super) fn grouped_matmul(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (x, w, ids, cot) = (a.inputs[0], a.inputs[1], a.inputs[2], a.cot);
    let dx = if a.wanted[0] {
        let w_t = g.permute(w, &[0, 2, 1])?;
        let dx = g.grouped_matmul(cot, w_t, ids)?;
        let x_dims = g.dims(x).to_vec();
        Some(sum_to(g, dx, &x_dims)?)
    } else {
        None
    };
    let dw = if a.wanted[1] {
        let experts = g.dims(w)[0];
        Some(g.grouped_matmul_weight_grad(cot, x, ids, experts)?)
    } else {
        None
    };
    Ok(vec![dx, dw, None])
}

/// `[c (T, S, N), x (T, S|1, K), ids (T, S)] -> (E, N, K)`, cotangent `G`:
/// `dc = grouped_matmul(x, G, ids)`, `dx = grouped_matmul(c, Gᵀ, ids)` summed over the slots
/// when `x` has one. (Only a second derivative needs this.)
pub(super) fn grouped_matmul_weight_grad(
    g: &mut GraphBuilder,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let (c, x, ids, cot) = (a.inputs[0], a.inputs[1], a.inputs[2], a.cot);
    let dc = if a.wanted[0] {
        Some(g.grouped_matmul(x, cot, ids)?)
    } else {
        None
    };
    let dx = if a.wanted[1] {
        let cot_t = g.permute(cot, &[0, 2, 1])?;
        let dx = g.grouped_matmul(c, cot_t, ids)?;
        let x_dims = g.dims(x).to_vec();
        Some(sum_to(g, dx, &x_dims)?)
    } else {
        None
    };
    Ok(vec![dc, dx, None])
}

/// `[q, k_nope, k_rope, v]` of a causal attention: one `CausalAttentionGrad` per wanted
/// operand, all reading one `CausalAttentionLse` of the same operands (a backend computes
/// them together: one backward call writes the four gradients). The statistic is recorded
/// with the forward's origin: it is a forward value, which a fused forward computes along
/// with its output and the backward reads like any activation kept for it (recomputation
/// leaves it alone).
pub(super) fn causal_attention(
    g: &mut GraphBuilder,
    config: AttentionConfig,
    a: &Adjoint<'_>,
) -> Result<Vec<Option<Tensor>>, GraphError> {
    let operands = &a.inputs[..4];
    let forward = g.graph().node(a.out.id()).origin.clone();
    let lse = g.within(&forward, |g| {
        g.push(Op::CausalAttentionLse(config), operands, None)
    })?;
    let mut inputs = operands.to_vec();
    inputs.extend([a.out, lse, a.cot]);
    AttentionOperand::ALL
        .into_iter()
        .map(|operand| {
            a.wanted[operand.index()]
                .then(|| g.push(Op::CausalAttentionGrad { config, operand }, &inputs, None))
                .transpose()
        })
        .collect()
}
