//! The grouped expert GEMMs on the CPU: one GEMM per expert over the token-slot rows routed to
//! it, the experts spread over the threads (each GEMM is small and runs on one; an expert's
//! arithmetic is the same whatever the thread count). Under expert parallelism each expert's
//! GEMM runs on the rank that owns it (`crate::parallel::experts`).

use gemm::Parallelism;
use rayon::prelude::*;

use super::product::{Arithmetic, multiply};
use crate::parallel::{ExpertExchange, gathered_at_owners, products_where_owned};

/// Which rows go where: `groups[e]` lists the token-slots (`t·slots + s`) routed to expert e,
/// in order; `x` has `x_slots` rows per token (1: one row serves every slot).
pub(super) struct Routing {
    pub(super) groups: Vec<Vec<usize>>,
    pub(super) slots: usize,
    pub(super) x_slots: usize,
    /// How each expert's GEMM forms and sums its products (K: `k` forward, its token-slots
    /// for the weight gradient).
    pub(super) arithmetic: Arithmetic,
}

impl Routing {
    /// The `x` rows (width `k`) of expert `e`'s token-slots, contiguous.
    fn rows(&self, xs: &[f32], e: usize, k: usize) -> Vec<f32> {
        let mut rows = Vec::new();
        self.rows_into(xs, e, k, &mut rows);
        rows
    }

    /// [`Routing::rows`] into `rows` (cleared first, its allocation kept).
    fn rows_into(&self, xs: &[f32], e: usize, k: usize, rows: &mut Vec<f32>) {
        let members = &self.groups[e];
        rows.clear();
        rows.reserve(members.len() * k);
        for &ts in members {
            let (t, s) = (ts / self.slots, ts % self.slots);
            let row = t * self.x_slots + if self.x_slots == 1 { 0 } else { s };
            rows.extend_from_slice(&xs[row * k..][..k]);
        }
    }
}

thread_local! {
    /// Each thread's gathered rows and per-expert product, kept between calls: allocated fresh
    /// for every expert they were a few hundred KiB each, which the allocator maps and unmaps,
    /// and the page faults of touching them again cost more than the experts' GEMMs (a grouped
    /// GEMM of the small model took 2.2 ms for 0.5 ms of arithmetic).
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = Default::default();
}

/// The output rows of a grouped GEMM, written by several threads: each token-slot's row by the
/// one expert it is routed to.
#[derive(Clone, Copy)]
struct SharedRows(*mut f32);

// SAFETY: the threads write disjoint rows (a token-slot belongs to one expert's group).
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// Row `row` of width `n`.
    ///
    /// # Safety
    /// The row must lie inside the output, and no other thread may touch it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row<'a>(self, row: usize, n: usize) -> &'a mut [f32] {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(row * n), n) }
    }
}

/// `out[t, s] = W[e] · x[t, s]` for `e = ids[t, s]`, `weights[e] = (w, (sn, sk))` holding
/// `W[e][j][p]` at `w[j·sn + p·sk]` (`(k, 1)` row-major, `(1, n)` transposed); `result` holds
/// `tokens · slots · n` values.
pub(super) fn matmul(
    routing: &Routing,
    xs: &[f32],
    weights: &[(&[f32], (isize, isize))],
    (n, k): (usize, usize),
    exchange: Option<&dyn ExpertExchange>,
    result: &mut [f32],
) -> Result<(), String> {
    let Some(exchange) = exchange else {
        // Each expert gathers its rows, multiplies and writes its token-slots' rows of
        // `result`, in per-thread scratch.
        assert_eq!(
            result.len(),
            routing.groups.iter().map(Vec::len).sum::<usize>() * n
        );
        let out = SharedRows(result.as_mut_ptr());
        (0..routing.groups.len()).into_par_iter().for_each(|e| {
            let members = &routing.groups[e];
            if members.is_empty() {
                return;
            }
            SCRATCH.with_borrow_mut(|[rows, product]| {
                routing.rows_into(xs, e, k, rows);
                product.clear();
                product.resize(members.len() * n, 0.0);
                expert_product_into(weights[e], rows, (n, k), routing.arithmetic, product);
                for (r, &ts) in members.iter().enumerate() {
                    // SAFETY: `result` holds a row of n for every token-slot (asserted above),
                    // and token-slot `ts` is in this expert's group only, so no other thread
                    // writes its row.
                    let row = unsafe { out.row(ts, n) };
                    row.copy_from_slice(&product[r * n..][..n]);
                }
            });
        });
        return Ok(());
    };
    let product = |e: usize, rows: &[f32]| {
        let mut product = vec![0f32; rows.len() / k.max(1) * n];
        expert_product_into(weights[e], rows, (n, k), routing.arithmetic, &mut product);
        product
    };
    let requests = (0..routing.groups.len())
        .map(|e| routing.rows(xs, e, k))
        .collect();
    let products = products_where_owned(exchange, requests, &product)?;
    for (members, product) in routing.groups.iter().zip(products) {
        for (r, &ts) in members.iter().enumerate() {
            result[ts * n..][..n].copy_from_slice(&product[r * n..][..n]);
        }
    }
    Ok(())
}

/// `out[e] = Σ_{(t, s) routed to e} g[t, s]ᵀ · x[t, s]`, expert e's row-major `[n, k]` into
/// `blocks[e]` (every element written: an expert no row was routed to gets zeros). Under
/// expert parallelism a rank computes the experts it owns from every rank's rows and leaves
/// the others at zero.
pub(super) fn weight_grad(
    routing: &Routing,
    gs: &[f32],
    xs: &[f32],
    (n, k): (usize, usize),
    exchange: Option<&dyn ExpertExchange>,
    blocks: &mut [&mut [f32]],
) -> Result<(), String> {
    // Expert e's cotangent rows (width n, one per token-slot), contiguous, into `g`.
    let cotangent_rows_into = |e: usize, g: &mut Vec<f32>| {
        g.clear();
        for &ts in &routing.groups[e] {
            g.extend_from_slice(&gs[ts * n..][..n]);
        }
    };
    assert_eq!(blocks.len(), routing.groups.len());
    assert!(blocks.iter().all(|b| b.len() == n * k));
    let Some(exchange) = exchange else {
        // Each expert gathers its rows in per-thread scratch and writes its own n·k block.
        blocks.par_iter_mut().enumerate().for_each(|(e, block)| {
            if routing.groups[e].is_empty() {
                return block.fill(0.0);
            }
            SCRATCH.with_borrow_mut(|[g, xe]| {
                cotangent_rows_into(e, g);
                routing.rows_into(xs, e, k, xe);
                let rows = routing.groups[e].len();
                expert_weight_grad((g, xe), (n, k, rows), routing.arithmetic, block);
            });
        });
        return Ok(());
    };
    // Each row travels as its n cotangent values followed by its k inputs.
    let interleaved = (0..routing.groups.len())
        .map(|e| {
            let mut g = Vec::new();
            cotangent_rows_into(e, &mut g);
            let x = routing.rows(xs, e, k);
            g.chunks(n)
                .zip(x.chunks(k))
                .flat_map(|(g, x)| g.iter().chain(x))
                .copied()
                .collect()
        })
        .collect();
    // Per expert, the rows as (g, x) pairs.
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = gathered_at_owners(exchange, interleaved)?
        .into_iter()
        .map(|rows| {
            let (mut g, mut x) = (Vec::new(), Vec::new());
            for row in rows.chunks(n + k) {
                g.extend_from_slice(&row[..n]);
                x.extend_from_slice(&row[n..]);
            }
            (g, x)
        })
        .collect();
    // Each expert writes its own n·k block: the experts spread over the threads.
    blocks
        .par_iter_mut()
        .zip(pairs.par_iter())
        .for_each(|(block, (g, xe))| {
            if g.is_empty() {
                return block.fill(0.0);
            }
            let rows = g.len() / n;
            expert_weight_grad((g, xe), (n, k, rows), routing.arithmetic, block);
        });
    Ok(())
}

/// `out_e [n, k] = g [rows, n]ᵀ · xe [rows, k]`, one expert's weight gradient, into `block`.
fn expert_weight_grad(
    (g, xe): (&[f32], &[f32]),
    (n, k, rows): (usize, usize, usize),
    arithmetic: Arithmetic,
    block: &mut [f32],
) {
    assert!(g.len() == rows * n && xe.len() == rows * k && block.len() >= n * k);
    // SAFETY: every pointer spans exactly the matrix its strides describe (asserted above).
    unsafe {
        multiply(
            (n, k, rows),
            (block.as_mut_ptr(), 1, k as isize),
            (g.as_ptr(), n as isize, 1),
            (xe.as_ptr(), 1, k as isize),
            arithmetic,
            Parallelism::None,
        );
    }
}

/// `product [r, n] = rows [r, k] · W_eᵀ` with `W_e[j][p]` at `j·sn + p·sk` of `w`.
fn expert_product_into(
    (w, (sn, sk)): (&[f32], (isize, isize)),
    rows: &[f32],
    (n, k): (usize, usize),
    arithmetic: Arithmetic,
    product: &mut [f32],
) {
    let count = product.len() / n.max(1);
    assert_eq!(rows.len(), count * k);
    assert!(w.len() == n * k && [(k as isize, 1), (1, n as isize)].contains(&(sn, sk)));
    // SAFETY: every pointer spans exactly the matrix its strides describe (asserted above).
    unsafe {
        multiply(
            (count, n, k),
            (product.as_mut_ptr(), 1, n as isize),
            (rows.as_ptr(), 1, k as isize),
            // B[p][j] = W_e[j][p]: columns j, rows p.
            (w.as_ptr(), sn, sk),
            arithmetic,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Routing, matmul, weight_grad};
    use fathom_compiler::graph::Accumulation;

    /// Tokens 0..3 with one slot each, routed to experts 0, 2, 0 of 3 (expert 1 gets none).
    fn routing() -> Routing {
        Routing {
            groups: vec![vec![0, 2], vec![], vec![1]],
            slots: 1,
            x_slots: 1,
            arithmetic: Accumulation::default().into(),
        }
    }

    /// Stacked weights as one matrix per expert, each `size` values read with `layout`.
    fn per_expert(
        ws: &[f32],
        size: usize,
        layout: (isize, isize),
    ) -> Vec<(&[f32], (isize, isize))> {
        ws.chunks(size).map(|w| (w, layout)).collect()
    }

    /// The routines write every element of their output: it arrives holding stale values
    /// (pooled storage), here NaNs, and none survives.
    #[test]
    fn every_output_element_is_written_over_stale_values() {
        let (n, k) = (2, 3);
        let xs: Vec<f32> = (0..3 * k).map(|i| i as f32).collect();
        let ws: Vec<f32> = (0..3 * n * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let mut out = vec![f32::NAN; 3 * n];
        matmul(
            &routing(),
            &xs,
            &per_expert(&ws, n * k, (k as isize, 1)),
            (n, k),
            None,
            &mut out,
        )
        .unwrap();
        // Token 1 went to expert 2: out[1] = W_2 · x_1.
        let w2 = &ws[2 * n * k..];
        for j in 0..n {
            let want: f32 = (0..k).map(|p| w2[j * k + p] * xs[k + p]).sum();
            assert_eq!(out[n + j], want);
        }
        assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
        // The same weights stored with each expert's block transposed ([k, n]), read across.
        let transposed: Vec<f32> = (0..3 * n * k)
            .map(|i| {
                let (e, p, j) = (i / (n * k), i / n % k, i % n);
                ws[e * n * k + j * k + p]
            })
            .collect();
        let mut across = vec![f32::NAN; 3 * n];
        let layout = (1, n as isize);
        matmul(
            &routing(),
            &xs,
            &per_expert(&transposed, n * k, layout),
            (n, k),
            None,
            &mut across,
        )
        .unwrap();
        assert_eq!(across, out);

        let gs: Vec<f32> = (0..3 * n).map(|i| i as f32 * 0.5).collect();
        let mut grad = vec![f32::NAN; 3 * n * k];
        let mut blocks: Vec<&mut [f32]> = grad.chunks_mut(n * k).collect();
        weight_grad(&routing(), &gs, &xs, (n, k), None, &mut blocks).unwrap();
        // Expert 1 got no token: exact zeros. Expert 2: the outer product of token 1's rows.
        assert_eq!(grad[n * k..2 * n * k], vec![0.0; n * k]);
        for (j, p) in (0..n).flat_map(|j| (0..k).map(move |p| (j, p))) {
            assert_eq!(grad[2 * n * k + j * k + p], gs[n + j] * xs[k + p]);
        }
        assert!(grad.iter().all(|v| v.is_finite()), "{grad:?}");
    }
}
