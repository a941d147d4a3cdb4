//! The grouped expert GEMMs on the CPU: one GEMM per expert over the token-slot rows routed to
//! it, the experts spread over the threads (each GEMM is small and runs on one; an expert's
//! arithmetic is the same whatever the thread count). Under expert parallelism each expert's
//! GEMM runs on the rank that owns it (`crate::parallel::experts`).

use fathom_compiler::graph::Accumulation;
use gemm::Parallelism;
use rayon::prelude::*;

use super::product::multiply;
use crate::parallel::{ExpertExchange, gathered_at_owners, products_where_owned};

/// Which rows go where: `groups[e]` lists the token-slots (`t·slots + s`) routed to expert e,
/// in order; `x` has `x_slots` rows per token (1: one row serves every slot).
pub(super) struct Routing {
    pub(super) groups: Vec<Vec<usize>>,
    pub(super) slots: usize,
    pub(super) x_slots: usize,
    /// How each expert's GEMM sums its products (K: `k` forward, its token-slots for the
    /// weight gradient).
    pub(super) accumulation: Accumulation,
}

impl Routing {
    /// The `x` rows (width `k`) of expert `e`'s token-slots, contiguous.
    fn rows(&self, xs: &[f32], e: usize, k: usize) -> Vec<f32> {
        let members = &self.groups[e];
        let mut rows = Vec::with_capacity(members.len() * k);
        for &ts in members {
            let (t, s) = (ts / self.slots, ts % self.slots);
            let row = t * self.x_slots + if self.x_slots == 1 { 0 } else { s };
            rows.extend_from_slice(&xs[row * k..][..k]);
        }
        rows
    }
}

/// `out[t, s] = W[e] · x[t, s]` for `e = ids[t, s]`, W stored `[experts, n, k]`; `result` holds
/// `tokens · slots · n` values.
pub(super) fn matmul(
    routing: &Routing,
    xs: &[f32],
    ws: &[f32],
    (n, k): (usize, usize),
    exchange: Option<&dyn ExpertExchange>,
    result: &mut [f32],
) -> Result<(), String> {
    let product = |e: usize, rows: &[f32]| {
        expert_product(&ws[e * n * k..][..n * k], rows, n, k, routing.accumulation)
    };
    let products: Vec<Vec<f32>> = match exchange {
        None => (0..routing.groups.len())
            .into_par_iter()
            .map(|e| match routing.groups[e].is_empty() {
                true => Vec::new(),
                false => product(e, &routing.rows(xs, e, k)),
            })
            .collect(),
        Some(exchange) => {
            let requests = (0..routing.groups.len())
                .map(|e| routing.rows(xs, e, k))
                .collect();
            products_where_owned(exchange, requests, &product)?
        }
    };
    for (members, product) in routing.groups.iter().zip(products) {
        for (r, &ts) in members.iter().enumerate() {
            result[ts * n..][..n].copy_from_slice(&product[r * n..][..n]);
        }
    }
    Ok(())
}

/// `out[e] = Σ_{(t, s) routed to e} g[t, s]ᵀ · x[t, s]`, `[experts, n, k]` into `result`
/// (zeroed by the caller). Under expert parallelism a rank computes the experts it owns from
/// every rank's rows and leaves the others at zero.
pub(super) fn weight_grad(
    routing: &Routing,
    gs: &[f32],
    xs: &[f32],
    (n, k): (usize, usize),
    exchange: Option<&dyn ExpertExchange>,
    result: &mut [f32],
) -> Result<(), String> {
    let cotangent_rows = |e: usize| -> Vec<f32> {
        routing.groups[e]
            .iter()
            .flat_map(|&ts| &gs[ts * n..][..n])
            .copied()
            .collect()
    };
    // Per expert, the rows as (g, x) pairs.
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = match exchange {
        None => (0..routing.groups.len())
            .into_par_iter()
            .map(|e| (cotangent_rows(e), routing.rows(xs, e, k)))
            .collect(),
        Some(exchange) => {
            // Each row travels as its n cotangent values followed by its k inputs.
            let interleaved = (0..routing.groups.len())
                .map(|e| {
                    let (g, x) = (cotangent_rows(e), routing.rows(xs, e, k));
                    g.chunks(n)
                        .zip(x.chunks(k))
                        .flat_map(|(g, x)| g.iter().chain(x))
                        .copied()
                        .collect()
                })
                .collect();
            gathered_at_owners(exchange, interleaved)?
                .into_iter()
                .map(|rows| {
                    let (mut g, mut x) = (Vec::new(), Vec::new());
                    for row in rows.chunks(n + k) {
                        g.extend_from_slice(&row[..n]);
                        x.extend_from_slice(&row[n..]);
                    }
                    (g, x)
                })
                .collect()
        }
    };
    // Each expert writes its own n·k block: the experts spread over the threads.
    result
        .par_chunks_mut((n * k).max(1))
        .zip(pairs.par_iter())
        .filter(|(_, (g, _))| !g.is_empty())
        .for_each(|(block, (g, xe))| {
            let rows = g.len() / n;
            // out_e [n, k] = g^T [n, rows] · xe [rows, k].
            // SAFETY: every pointer spans exactly the matrix its strides describe; `block` is
            // this expert's n·k values.
            unsafe {
                multiply(
                    (n, k, rows),
                    (block.as_mut_ptr(), 1, k as isize),
                    (g.as_ptr(), n as isize, 1),
                    (xe.as_ptr(), 1, k as isize),
                    routing.accumulation,
                    Parallelism::None,
                );
            }
        });
    Ok(())
}

/// `rows [r, k] · W_eᵀ` with `W_e` stored `[n, k]`: `[r, n]`.
fn expert_product(
    w: &[f32],
    rows: &[f32],
    n: usize,
    k: usize,
    accumulation: Accumulation,
) -> Vec<f32> {
    let count = rows.len() / k;
    let mut product = vec![0f32; count * n];
    // SAFETY: every pointer spans exactly the matrix its strides describe.
    unsafe {
        multiply(
            (count, n, k),
            (product.as_mut_ptr(), 1, n as isize),
            (rows.as_ptr(), 1, k as isize),
            (w.as_ptr(), k as isize, 1),
            accumulation,
            Parallelism::None,
        );
    }
    product
}
