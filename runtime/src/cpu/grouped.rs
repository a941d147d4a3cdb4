//! The grouped expert GEMMs on the CPU: one GEMM per expert over the token-slot rows routed to
//! it (an expert's arithmetic is the same whatever the thread count). On the bf16 kernel an
//! expert's rows are read and written where they lie, through tables of their addresses, and
//! its row blocks are tasks any thread takes (`bf16::multiply_each`); elsewhere the experts
//! are spread over the threads, each GEMM on one, its rows gathered into a contiguous copy and
//! its product's rows scattered back. Under expert parallelism each expert's GEMM runs on the
//! rank that owns it (`crate::parallel::experts`). A weight gradient that rounds its operands
//! in tiles along each expert's token-slots (`graph::ExpertTiles`) rounds the gathered rows on
//! the rank that holds them: each rank's rows in tiles of their own, as that rank's graph
//! says, before they travel to the expert's owner.

use fathom_compiler::graph::ExpertTiles;
use gemm::Parallelism;
use rayon::prelude::*;

use super::bf16::{self, Matrix, Output};
use super::product::{Arithmetic, multiply};
use crate::fp8::round_in_expert_tiles;
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
            rows.extend_from_slice(self.x_row(xs, ts, k));
        }
    }

    /// Where each expert's members lie in `groups` laid end to end (the order of
    /// `groups.iter().flatten()`, in which the row tables are built).
    fn member_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.groups.iter().scan(0, |first, members| {
            let rows = *first..*first + members.len();
            *first = rows.end;
            Some(rows)
        })
    }

    /// Token-slot `ts`'s row of `x` (width `k`).
    fn x_row<'x>(&self, xs: &'x [f32], ts: usize, k: usize) -> &'x [f32] {
        let (t, s) = (ts / self.slots, ts % self.slots);
        let row = t * self.x_slots + if self.x_slots == 1 { 0 } else { s };
        &xs[row * k..][..k]
    }
}

thread_local! {
    /// Each thread's tables of the experts' row addresses for the bf16 kernel (a product's
    /// rows read and written, or a weight gradient's two operands), kept between calls.
    static ROW_TABLES: std::cell::RefCell<[Vec<*const f32>; 2]> = Default::default();
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
        let token_slots = routing.groups.iter().map(Vec::len).sum::<usize>();
        assert_eq!(result.len(), token_slots * n);
        let out = SharedRows(result.as_mut_ptr());
        if routing.arithmetic.on_bf16_kernel() {
            matmul_where_the_rows_lie(routing, xs, weights, (n, k), out, token_slots);
            return Ok(());
        }
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
/// the others at zero. With `rounding`, each expert's rows of both operands are rounded in its
/// own tiles first.
pub(super) fn weight_grad(
    routing: &Routing,
    gs: &[f32],
    xs: &[f32],
    (n, k): (usize, usize),
    rounding: Option<ExpertTiles>,
    exchange: Option<&dyn ExpertExchange>,
    blocks: &mut [&mut [f32]],
) -> Result<(), String> {
    // Expert e's rows (one per token-slot) of the cotangent (width n) into `g` and of x
    // (width k) into `xe`, contiguous and rounded as the op says.
    let rows_into = |e: usize, g: &mut Vec<f32>, xe: &mut Vec<f32>| -> Result<(), String> {
        g.clear();
        for &ts in &routing.groups[e] {
            g.extend_from_slice(&gs[ts * n..][..n]);
        }
        routing.rows_into(xs, e, k, xe);
        if let Some(tiles) = rounding {
            round_in_expert_tiles(g, n, tiles).map_err(|e| e.to_string())?;
            round_in_expert_tiles(xe, k, tiles).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    assert_eq!(blocks.len(), routing.groups.len());
    assert!(blocks.iter().all(|b| b.len() == n * k));
    let Some(exchange) = exchange else {
        if routing.arithmetic.on_bf16_kernel() && rounding.is_none() {
            weight_grad_where_the_rows_lie(routing, gs, xs, (n, k), blocks);
            return Ok(());
        }
        // Each expert gathers its rows in per-thread scratch and writes its own n·k block.
        return blocks
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(e, block)| {
                if routing.groups[e].is_empty() {
                    block.fill(0.0);
                    return Ok(());
                }
                SCRATCH.with_borrow_mut(|[g, xe]| {
                    rows_into(e, g, xe)?;
                    let rows = routing.groups[e].len();
                    expert_weight_grad((g, xe), (n, k, rows), routing.arithmetic, block);
                    Ok(())
                })
            });
    };
    // Each row travels as its n cotangent values followed by its k inputs.
    let interleaved = (0..routing.groups.len())
        .map(|e| {
            let (mut g, mut x) = (Vec::new(), Vec::new());
            rows_into(e, &mut g, &mut x)?;
            Ok(g.chunks(n)
                .zip(x.chunks(k))
                .flat_map(|(g, x)| g.iter().chain(x))
                .copied()
                .collect())
        })
        .collect::<Result<_, String>>()?;
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

/// [`matmul`] on the bf16 kernel: every expert reads its token-slots' rows of `x` and writes
/// theirs of the output where they lie, through tables of their addresses (no gathered copy of
/// the rows, no product to scatter), in row-block tasks (`bf16::multiply_each`).
fn matmul_where_the_rows_lie(
    routing: &Routing,
    xs: &[f32],
    weights: &[(&[f32], (isize, isize))],
    (n, k): (usize, usize),
    out: SharedRows,
    token_slots: usize,
) {
    // Taken, not borrowed: a thread waiting inside `multiply_each` may run another grouped GEMM.
    let [mut inputs, mut outputs] = ROW_TABLES.take();
    inputs.clear();
    outputs.clear();
    for &ts in routing.groups.iter().flatten() {
        assert!(ts < token_slots, "token-slot {ts} of {token_slots}");
        inputs.push(routing.x_row(xs, ts, k).as_ptr());
        // SAFETY: row `ts` lies inside the output (asserted), and only its expert's
        // product writes it (a token-slot is in one group).
        outputs.push(unsafe { out.row(ts, n) }.as_mut_ptr().cast_const());
    }
    let products: Vec<bf16::Product> = routing
        .member_ranges()
        .zip(weights)
        .map(|(rows, &(w, (sn, sk)))| {
            assert_expert_weight(w, (sn, sk), (n, k));
            bf16::Product {
                m: rows.len(),
                k,
                lhs: Matrix::Rows(inputs[rows.clone()].as_ptr()),
                // B[p][j] = W_e[j][p]: columns j, rows p.
                rhs: Matrix::Strided((w.as_ptr(), sn, sk)),
                out: Output::Rows(outputs[rows].as_ptr().cast()),
            }
        })
        .collect();
    // SAFETY: each table holds a row of k inputs or n outputs per member, each weight n·k
    // values read through its strides (asserted above), and no two experts' output rows
    // are the same; `on_bf16_kernel` implies the kernel's CPU support.
    unsafe { bf16::multiply_each(n, &products) };
    ROW_TABLES.set([inputs, outputs]);
}

/// [`weight_grad`] on the bf16 kernel: expert e's `gᵀ · x` read through tables of its
/// token-slots' cotangent and input rows where they lie, every expert's block written (zeros
/// for an expert routed nothing: a product over K = 0), in row-block tasks.
fn weight_grad_where_the_rows_lie(
    routing: &Routing,
    gs: &[f32],
    xs: &[f32],
    (n, k): (usize, usize),
    blocks: &mut [&mut [f32]],
) {
    // Taken, not borrowed: a thread waiting inside `multiply_each` may run another grouped GEMM.
    let [mut cotangents, mut inputs] = ROW_TABLES.take();
    cotangents.clear();
    inputs.clear();
    for &ts in routing.groups.iter().flatten() {
        cotangents.push(gs[ts * n..][..n].as_ptr());
        inputs.push(routing.x_row(xs, ts, k).as_ptr());
    }
    let products: Vec<bf16::Product> = routing
        .member_ranges()
        .zip(blocks.iter_mut())
        .map(|(rows, block)| {
            assert!(block.len() == n * k);
            bf16::Product {
                m: n,
                k: rows.len(),
                // gᵀ: column r is member r's cotangent row.
                lhs: Matrix::Columns(cotangents[rows.clone()].as_ptr()),
                rhs: Matrix::Rows(inputs[rows].as_ptr()),
                out: Output::Strided((block.as_mut_ptr(), 1, k as isize)),
            }
        })
        .collect();
    // SAFETY: the tables hold a row of n cotangents and one of k inputs per member, each
    // block n·k values (asserted above) of its own; `on_bf16_kernel` implies the kernel's
    // CPU support.
    unsafe { bf16::multiply_each(k, &products) };
    ROW_TABLES.set([cotangents, inputs]);
}

/// An expert's weight is n·k values read row-major (`(k, 1)`) or transposed (`(1, n)`).
fn assert_expert_weight(w: &[f32], strides: (isize, isize), (n, k): (usize, usize)) {
    let layouts = [(k as isize, 1), (1, n as isize)];
    assert!(
        w.len() == n * k && layouts.contains(&strides),
        "{strides:?}"
    );
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
    assert_expert_weight(w, (sn, sk), (n, k));
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
    use super::{Arithmetic, Routing, matmul, weight_grad};
    use fathom_compiler::graph::Accumulation;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

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
        weight_grad(&routing(), &gs, &xs, (n, k), None, None, &mut blocks).unwrap();
        // Expert 1 got no token: exact zeros. Expert 2: the outer product of token 1's rows.
        assert_eq!(grad[n * k..2 * n * k], vec![0.0; n * k]);
        for (j, p) in (0..n).flat_map(|j| (0..k).map(move |p| (j, p))) {
            assert_eq!(grad[2 * n * k + j * k + p], gs[n + j] * xs[k + p]);
        }
        assert!(grad.iter().all(|v| v.is_finite()), "{grad:?}");
    }

    /// On the bf16 kernel, where each expert reads its token-slots' rows and writes theirs
    /// through tables of their addresses, both routines give the exact sums of the bf16-rounded
    /// values within the bound of f32 summation, `(K + 1) · 2⁻²⁴ · Σ|a·b|`: 40 tokens of 3 slots
    /// over 5 experts (one routed nothing), rows of `x` shared by a token's slots or one per
    /// slot, widths that are not whole panels.
    #[test]
    fn experts_read_and_write_their_rows_where_they_lie_on_the_bf16_kernel() {
        let Some(arithmetic) = Arithmetic::bf16_kernel_or_skip() else {
            return;
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (tokens, slots, experts, n, k) = (40, 3, 5, 37, 70);
        let mut groups = vec![Vec::new(); experts];
        for ts in 0..tokens * slots {
            groups[rng.random_range(0..experts - 1)].push(ts);
        }
        let round = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        let values = |len: usize, rng: &mut ChaCha8Rng| -> Vec<f32> {
            (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
        };
        let within = |got: f32, products: &[f64], what: &str| {
            let exact: f64 = products.iter().sum();
            let magnitude: f64 = products.iter().map(|p| p.abs()).sum::<f64>() + 1e-30;
            let bound = (products.len() + 1) as f64 * f64::powi(2.0, -24) * magnitude;
            assert!(
                (got as f64 - exact).abs() <= bound,
                "{what}: {got} vs {exact}"
            );
        };
        for x_slots in [1, slots] {
            let routing = Routing {
                groups: groups.clone(),
                slots,
                x_slots,
                arithmetic,
            };
            let xs = values(tokens * x_slots * k, &mut rng);
            let x = |ts: usize, p: usize| {
                let row = ts / slots * x_slots + if x_slots == 1 { 0 } else { ts % slots };
                round(xs[row * k + p])
            };
            let ws = values(experts * n * k, &mut rng);
            let mut out = vec![f32::NAN; tokens * slots * n];
            matmul(
                &routing,
                &xs,
                &per_expert(&ws, n * k, (k as isize, 1)),
                (n, k),
                None,
                &mut out,
            )
            .unwrap();
            let gs = values(tokens * slots * n, &mut rng);
            let mut grad = vec![f32::NAN; experts * n * k];
            let mut blocks: Vec<&mut [f32]> = grad.chunks_mut(n * k).collect();
            weight_grad(&routing, &gs, &xs, (n, k), None, None, &mut blocks).unwrap();
            for (e, members) in groups.iter().enumerate() {
                let w = |j: usize, p: usize| round(ws[e * n * k + j * k + p]);
                for &ts in members {
                    for j in 0..n {
                        let products: Vec<f64> = (0..k).map(|p| w(j, p) * x(ts, p)).collect();
                        within(
                            out[ts * n + j],
                            &products,
                            &format!("x_slots {x_slots}: out[{ts}][{j}]"),
                        );
                    }
                }
                for (j, p) in (0..n).flat_map(|j| (0..k).map(move |p| (j, p))) {
                    let products: Vec<f64> = members
                        .iter()
                        .map(|&ts| round(gs[ts * n + j]) * x(ts, p))
                        .collect();
                    let what = format!("x_slots {x_slots}: expert {e} grad[{j}][{p}]");
                    within(grad[e * n * k + j * k + p], &products, &what);
                }
            }
        }
    }

    /// Two ranks' exchange in one process: each `all_to_all` posts every part to its receiver's
    /// mailbox and waits until both ranks have posted.
    struct Mailboxes {
        posted: std::sync::Mutex<Vec<Vec<Vec<f32>>>>,
        barrier: std::sync::Barrier,
    }

    struct ThreadExchange<'a> {
        me: usize,
        boxes: &'a Mailboxes,
    }

    impl crate::parallel::ExpertExchange for ThreadExchange<'_> {
        fn member(&self) -> usize {
            self.me
        }

        fn members(&self) -> usize {
            2
        }

        fn all_to_all(&self, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, String> {
            for (to, part) in parts.into_iter().enumerate() {
                self.boxes.posted.lock().unwrap()[to][self.me] = part;
            }
            self.boxes.barrier.wait();
            let received = std::mem::take(&mut self.boxes.posted.lock().unwrap()[self.me]);
            self.boxes.barrier.wait();
            let mut received = received;
            received.resize(2, Vec::new());
            Ok(received)
        }
    }

    /// Under expert parallelism with the operands rounded along each expert's rows, each rank
    /// rounds its own rows in tiles of their own (as its graph says) before they travel: the
    /// owner's gradient is the sum of the two ranks' local ones, whose products differ by 2⁻¹⁶
    /// (far above the sum's rounding).
    #[test]
    fn expert_parallel_ranks_round_their_own_rows() {
        use fathom_compiler::graph::{ExpertTiles, QuantFormat};
        let (tokens, experts, n, k) = (12, 4, 3, 5);
        let tiles = Some(ExpertTiles {
            format: QuantFormat::E4M3,
            tile_rows: 128,
            pow2_scales: false,
        });
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Per rank: its routing, cotangent rows and x rows.
        let ranks: Vec<(Routing, Vec<f32>, Vec<f32>)> = (0..2)
            .map(|rank| {
                let mut groups = vec![Vec::new(); experts];
                for t in 0..tokens {
                    groups[rng.random_range(0..experts)].push(t);
                }
                // Rank 0's cotangents 2⁻²⁰ of rank 1's, its x 16 times: tiles over both ranks'
                // rows would round its cotangents to zero.
                let (g_size, x_size) = if rank == 0 {
                    (2f32.powi(-20), 16.0)
                } else {
                    (1.0, 1.0)
                };
                let mut values = |len: usize, size: f32| -> Vec<f32> {
                    (0..len)
                        .map(|_| size * rng.random_range(-2.0f32..2.0))
                        .collect()
                };
                let routing = Routing {
                    groups,
                    slots: 1,
                    x_slots: 1,
                    arithmetic: Accumulation::default().into(),
                };
                (
                    routing,
                    values(tokens * n, g_size),
                    values(tokens * k, x_size),
                )
            })
            .collect();
        let local: Vec<Vec<f32>> = ranks
            .iter()
            .map(|(routing, gs, xs)| {
                let mut grad = vec![f32::NAN; experts * n * k];
                let mut blocks: Vec<&mut [f32]> = grad.chunks_mut(n * k).collect();
                weight_grad(routing, gs, xs, (n, k), tiles, None, &mut blocks).unwrap();
                grad
            })
            .collect();
        let boxes = Mailboxes {
            posted: std::sync::Mutex::new(vec![vec![Vec::new(); 2]; 2]),
            barrier: std::sync::Barrier::new(2),
        };
        let exchanged: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(me, (routing, gs, xs))| {
                    let boxes = &boxes;
                    scope.spawn(move || {
                        let exchange = ThreadExchange { me, boxes };
                        let mut grad = vec![f32::NAN; experts * n * k];
                        let mut blocks: Vec<&mut [f32]> = grad.chunks_mut(n * k).collect();
                        weight_grad(routing, gs, xs, (n, k), tiles, Some(&exchange), &mut blocks)
                            .unwrap();
                        grad
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The sums differ from the local ones' sum only by f32 rounding: 1e-6 of the largest
        // element. Rank 0's part of an element is 2⁻¹⁶ of a product, well above that.
        let scale = local[1].iter().fold(0f32, |m, v| m.max(v.abs()));
        let bound = 1e-6 * scale;
        let largest_small = local[0].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(largest_small > 5.0 * bound, "{largest_small} vs {bound}");
        for (me, grad) in exchanged.iter().enumerate() {
            for e in 0..experts {
                let block = &grad[e * n * k..(e + 1) * n * k];
                if crate::parallel::owner(e, experts, 2) != me {
                    assert!(block.iter().all(|&v| v == 0.0), "expert {e} on rank {me}");
                    continue;
                }
                for (i, &got) in block.iter().enumerate() {
                    let want = local[0][e * n * k + i] + local[1][e * n * k + i];
                    assert!(
                        (got - want).abs() <= bound,
                        "expert {e} element {i} on rank {me}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
