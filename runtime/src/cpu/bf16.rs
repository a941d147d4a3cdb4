//! A GEMM in bf16 on `vdpbf16ps` (AVX512_BF16), for the products whose operands the kernel IR
//! marks `exact_in: bf16` (the Linear GEMMs and attention's products under the bf16 policy).
//! The operands are packed as bf16, each value rounded as the graph's casts round it: exact
//! for operands that hold bf16 values, and the rounding itself for those the product rounds
//! as it reads them (`rounds`, the kernel IR's folded round trips). Every product of two bf16
//! values is exact in f32: only the order of the f32 sums differs from the f32 GEMM's.
//!
//! Whether it pays depends on the CPU: `vdpbf16ps` does 64 FLOPs per instruction against
//! `vfmadd231ps`'s 32, and AMD's Zen 4 issues both at the same rate (twice the f32 FLOP rate in
//! bf16), while the Intel Emerald Rapids of an earlier session issued it at a quarter of the
//! FMA's rate (half the f32 FLOP rate). [`bf16_gemm`] measures the two instructions' rates once per process and
//! uses the kernel only where bf16 delivers clearly more, so the choice does not move with load.
//!
//! Layout (`pack`): `lhs` is packed in panels of [`MR`] rows (one read along K lies in rows,
//! only rounded: [`Layout`]) and `rhs` in panels of [`NR`] columns, one 32-bit pair of bf16
//! values (two consecutive elements of K) per row or column and per pair of K, an odd K's last
//! pair completed with a zero, the last panel's padding rows holding stale values whose sums
//! no store keeps. A register tile of `MR × NR` f32 sums runs
//! over K in blocks of [`PAIRS_PER_BLOCK`], each block's sums added to the output in turn, so
//! every output element is summed in one fixed order: the result does not depend on the thread
//! count. Operands are read where they lie, strided or through tables of row addresses, and
//! outputs written likewise ([`Matrix`], [`Output`]): a grouped GEMM's experts read and write
//! their routed token rows in place ([`multiply_each`]).

use std::sync::OnceLock;

use fathom_compiler::graph::{MatMulPart, Triangle};
use rayon::prelude::*;

use super::product::Operand;

mod head;
mod pack;

pub(super) use head::{Head, HeadResults, linear_cross_entropy};

pub(super) use pack::Matrix;
use pack::{Layout, Runs, Source, pack, pack_operand};

/// Rows of a register tile: one broadcast pair per row and K pair.
const MR: usize = 12;
/// Columns of a register tile: two vectors of 16 f32 sums per row, 24 accumulators in all.
const NR: usize = 32;
/// Row panels per task: the task's block of packed `lhs` (8 panels × 12 rows × 128 pairs × 4
/// bytes = 48 KB) stays in L2 while a column panel's block of `rhs` is reused over it from L1.
const ROW_PANELS_PER_TASK: usize = 8;

/// K pairs per block: a column panel's block of `rhs` (128 pairs × 128 bytes = 16 KB) stays in
/// L1 while the task's row panels run over it.
const PAIRS_PER_BLOCK: usize = 128;

/// `FATHOM_BF16_GEMM=on|off` forces the choice [`bf16_gemm`] otherwise makes by measurement.
pub const BF16_GEMM_ENV: &str = "FATHOM_BF16_GEMM";

/// Whether bf16-exact products run on this kernel, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bf16Gemm {
    /// The CPU has AVX512F and AVX512_BF16.
    pub supported: bool,
    /// `vdpbf16ps`'s FLOP rate over `vfmadd231ps`'s, measured once (when supported and not
    /// forced by [`BF16_GEMM_ENV`]).
    pub flop_ratio: Option<f64>,
    /// The kernel is used: supported, and the ratio at least [`MIN_FLOP_RATIO`] or the
    /// environment says `on`.
    pub enabled: bool,
}

/// How much more `vdpbf16ps` must deliver than the f32 FMA for the kernel to be used: about 2
/// (Zen 4) or 0.5 (Emerald Rapids) in practice, so the choice does not flip with noise.
pub const MIN_FLOP_RATIO: f64 = 1.3;

/// The choice for this process, made on first use.
pub fn bf16_gemm() -> Bf16Gemm {
    static CHOICE: OnceLock<Bf16Gemm> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let supported = supported();
        let forced = match std::env::var(BF16_GEMM_ENV).as_deref() {
            Ok("on") if !supported => {
                eprintln!("{BF16_GEMM_ENV}=on: this CPU has no AVX512_BF16; using the f32 GEMM");
                Some(false)
            }
            Ok("on") => Some(true),
            Ok("off") => Some(false),
            Ok(other) => {
                eprintln!("{BF16_GEMM_ENV}={other}: expected `on` or `off`; measuring instead");
                None
            }
            Err(_) => None,
        };
        let flop_ratio = (supported && forced.is_none()).then(probe::bf16_flops_over_f32);
        let enabled =
            forced.unwrap_or_else(|| flop_ratio.is_some_and(|ratio| ratio >= MIN_FLOP_RATIO));
        Bf16Gemm {
            supported,
            flop_ratio,
            enabled,
        }
    })
}

pub(super) fn enabled() -> bool {
    bf16_gemm().enabled
}

/// Whether this CPU can run the kernel at all.
fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst (m×n) = lhs (m×k) · rhs (k×n)`, or `+=` when `add`, over rayon's threads when
/// `parallel`.
///
/// # Safety
/// As `product::multiply`, and [`supported`] must hold. The operands' values are rounded to
/// bf16 as they are packed (those that are bf16 values stay as they are).
pub(super) unsafe fn multiply(
    (m, n, k): (usize, usize, usize),
    dst: Output,
    lhs: Matrix,
    rhs: Matrix,
    add: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let pairs = k.div_ceil(2);
    let (row_panels, column_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (mut lhs_buffer, mut rhs_buffer) = (packing_buffer(), packing_buffer());
    let packed_lhs = lent(&mut lhs_buffer, row_panels * pairs * MR);
    let packed_rhs = lent(&mut rhs_buffer, column_panels * pairs * NR);
    // SAFETY: the m×k and k×n matrices lie in `lhs` and `rhs` (the caller's promise).
    let layout = unsafe {
        pack_operand(packed_rhs, Source::rhs(rhs), (0..n, k), NR, parallel);
        pack_operand(packed_lhs, Source::lhs(lhs), (0..m, k), MR, parallel)
    };
    // SAFETY: the caller's promise; both operands are packed over `pairs`.
    unsafe {
        multiply_packed(
            (m, n, pairs),
            dst,
            (packed_lhs, layout),
            packed_rhs,
            add,
            parallel,
        )
    };
    give_back([lhs_buffer, rhs_buffer]);
}

/// `dst (m×n) = lhs · rhs`, or `+=` when `add`, from operands packed over `pairs` K pairs
/// (`lhs` in panels of [`MR`] rows laid out as `layout` says, `rhs` in panels of [`NR`]
/// columns), over rayon's threads when `parallel`.
///
/// # Safety
/// The packed operands hold every panel of `m` rows and `n` columns; `dst`'s `m × n`
/// elements are writable and touched by no other thread; `supported()` holds.
unsafe fn multiply_packed(
    (m, n, pairs): (usize, usize, usize),
    dst: Output,
    (packed_lhs, layout): (&[u32], Layout),
    packed_rhs: &[u32],
    add: bool,
    parallel: bool,
) {
    let (row_panels, column_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    assert!(packed_lhs.len() >= row_panels * pairs * MR);
    assert!(packed_rhs.len() >= column_panels * pairs * NR);
    // Tasks: a block of row panels times one column panel, column panels outermost so that
    // neighbouring tasks share their `rhs` panel.
    let row_blocks = row_panels.div_ceil(ROW_PANELS_PER_TASK);
    let task = |index: usize| {
        let (column_panel, row_block) = (index / row_blocks, index % row_blocks);
        let b = &packed_rhs[column_panel * pairs * NR..][..pairs * NR];
        let rows = row_block * ROW_PANELS_PER_TASK
            ..((row_block + 1) * ROW_PANELS_PER_TASK).min(row_panels);
        let a = &packed_lhs[rows.start * pairs * MR..rows.end * pairs * MR];
        // SAFETY: the tiles are inside `dst`, no other task writes them, and `supported()`
        // holds (the caller's promise).
        let a = (rows.start * MR, rows.len(), a, layout);
        unsafe { dst.tiles((m, n), a, (column_panel, b), pairs, add) };
    };
    let tasks = column_panels * row_blocks;
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// One product of [`multiply_each`]: `out (m × n) = lhs (m × k) · rhs (k × n)` (an `m` of 0
/// writes nothing).
#[derive(Clone, Copy, Debug)]
pub(super) struct Product {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) lhs: Matrix,
    pub(super) rhs: Matrix,
    pub(super) out: Output,
}

// SAFETY: the operands are only read and each output written at its own tiles (the promise of
// `multiply_each`'s caller).
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

/// Rows of one task of [`multiply_each`].
const ROWS_PER_TASK: usize = ROW_PANELS_PER_TASK * MR;

/// Independent products of `n` columns each (a grouped GEMM's experts) over rayon's threads:
/// one task per product packs its `rhs`, then tasks of [`ROWS_PER_TASK`] rows of its `lhs` each
/// pack them and multiply them by all of the `rhs`. A thread that runs out of products takes
/// row tasks of another's, so the threads finish together (one product per thread left a
/// thread idle while another finished the largest expert), and a packed `rhs` is used while it
/// is in cache (packing every `rhs` first, 16 MB of them on the medium model, made its grouped
/// GEMMs 15% slower).
///
/// # Safety
/// As [`multiply`] for every product; no two products' outputs overlap.
pub(super) unsafe fn multiply_each(n: usize, products: &[Product]) {
    let column_panels = n.div_ceil(NR);
    products.par_iter().filter(|p| p.m > 0).for_each(|p| {
        let &Product {
            m,
            k,
            lhs,
            rhs,
            out,
        } = p;
        let (lhs, rhs) = (Source::lhs(lhs), Source::rhs(rhs));
        let pairs = k.div_ceil(2);
        let mut rhs_buffer = packing_buffer();
        let packed_rhs = lent(&mut rhs_buffer, column_panels * pairs * NR);
        // SAFETY: the k×n matrix lies in `rhs` (the caller's promise).
        unsafe { pack_operand(packed_rhs, rhs, (0..n, k), NR, false) };
        let packed_rhs = &packed_rhs[..];
        (0..m.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|block| {
                let rows = block * ROWS_PER_TASK..((block + 1) * ROWS_PER_TASK).min(m);
                let mut lhs_buffer = packing_buffer();
                let packed_lhs = lent(&mut lhs_buffer, rows.len().div_ceil(MR) * pairs * MR);
                // SAFETY: rows `rows` of the m×k matrix lie in `lhs` (the caller's promise).
                let layout = unsafe { pack_operand(packed_lhs, lhs, (rows.clone(), k), MR, false) };
                let a = (rows.start, rows.len().div_ceil(MR), &packed_lhs[..], layout);
                for column_panel in 0..column_panels {
                    let b = &packed_rhs[column_panel * pairs * NR..][..pairs * NR];
                    // SAFETY: the tiles are inside `out`, written by this task only (the caller's
                    // promise); `supported()` holds.
                    unsafe { out.tiles((m, n), a, (column_panel, b), pairs, false) };
                }
                give_back([lhs_buffer]);
            });
        give_back([rhs_buffer]);
    });
}

thread_local! {
    /// Each thread's packing buffers, kept between products: made anew (zeroed) for every
    /// product they cost a memset of every packed operand, a few milliseconds of a small
    /// training step.
    static PACKING_BUFFERS: std::cell::RefCell<Vec<Vec<u32>>> = const {
        std::cell::RefCell::new(Vec::new())
    };
}

/// A packing buffer of this thread's (or a new one when a product that this thread waits
/// inside holds them). Its values are stale: packing writes every pair the tiles keep a sum
/// of, and the stale ones are read only into sums no store keeps (padding rows and columns of
/// the last panels; a left triangle's pairs outside a panel's kept range are not read).
fn packing_buffer() -> Vec<u32> {
    PACKING_BUFFERS
        .with_borrow_mut(Vec::pop)
        .unwrap_or_default()
}

/// The first `len` values of `buffer`, grown (with zeros) if it is shorter.
fn lent(buffer: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// Keeps the buffers for this thread's next product.
fn give_back<const N: usize>(buffers: [Vec<u32>; N]) {
    PACKING_BUFFERS.with_borrow_mut(|kept| {
        kept.extend(buffers);
        // Two per product; more only after nested products, and those are rare.
        kept.truncate(4);
    });
}

/// `dst (m×n) = T(lhs) · rhs` (`part` Left) or `T(lhs · rhs)` (Output) on this thread, for a
/// triangle `T`: each operand packed once (the left one with zeros outside a Left triangle),
/// and each register tile multiplies only the K pairs its rows keep (Left) or is skipped when
/// the triangle keeps none of it (Output, whose elements outside the triangle are left for
/// the caller to zero). Row blocks of whole GEMMs, as the f32 path does, would pack the shared
/// operand once per block: on attention's per-head products (K = 64 to 256) that packing cost
/// more than the multiplications.
///
/// # Safety
/// As [`multiply`].
pub(super) unsafe fn multiply_triangular(
    (m, n, k): (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    (part, triangle): (MatMulPart, Triangle),
) {
    assert!(
        part != MatMulPart::Right,
        "a right triangle is the transposed left one"
    );
    if m == 0 || n == 0 {
        return;
    }
    let pairs = k.div_ceil(2);
    let (row_panels, column_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (mut lhs_buffer, mut rhs_buffer) = (packing_buffer(), packing_buffer());
    let packed_lhs = lent(&mut lhs_buffer, row_panels * pairs * MR);
    let packed_rhs = lent(&mut rhs_buffer, column_panels * pairs * NR);
    let rhs = Source::rhs(Matrix::Strided(rhs));
    // The K pairs the rows of the panel from `r0` keep of a left triangle (all K for an output
    // one): only those are packed and multiplied (the rest of the panel is not read).
    let kept_pairs = |r0: usize| {
        let last_row = (r0 + MR).min(m) - 1;
        match (part, triangle) {
            (MatMulPart::Left, Triangle::Lower) => 0..(last_row + 1).min(k).div_ceil(2),
            (MatMulPart::Left, Triangle::Upper) => (r0 / 2).min(pairs)..pairs,
            _ => 0..pairs,
        }
    };
    for (panel, out) in packed_lhs.chunks_mut((pairs * MR).max(1)).enumerate() {
        let kept = kept_pairs(panel * MR);
        // From K index 2·kept.start (even, so the pairs stay aligned) to the end of the range.
        let (first_k, end_k) = ((2 * kept.start).min(k), (2 * kept.end).min(k));
        let (base, column_stride, row_stride) = lhs;
        // Column `first_k ≤ k` of the operand, or one past its end when no column is kept
        // (then nothing is read).
        let shifted = (
            base.wrapping_offset(first_k as isize * column_stride),
            column_stride,
            row_stride,
        );
        let kept_out = &mut out[kept.start * MR..kept.end * MR];
        // SAFETY: rows `panel·MR..` below m and columns `first_k..end_k` below k lie in `lhs`
        // (the caller's promise).
        unsafe {
            pack(
                kept_out,
                Source::lhs(Matrix::Strided(shifted)),
                (panel * MR, m),
                end_k - first_k,
                MR,
            )
        };
        if part == MatMulPart::Left {
            keep_triangle(out, panel * MR, triangle);
        }
    }
    // SAFETY: the k×n matrix lies in `rhs` (the caller's promise).
    unsafe { pack_operand(packed_rhs, rhs, (0..n, k), NR, false) };
    let out = Output::Strided(dst);
    for (column_panel, row_panel) in
        (0..column_panels).flat_map(|c| (0..row_panels).map(move |r| (c, r)))
    {
        let (r0, c0) = (row_panel * MR, column_panel * NR);
        let (last_row, last_column) = ((r0 + MR).min(m) - 1, (c0 + NR).min(n) - 1);
        let kept_pairs = kept_pairs(r0);
        let outside = match (part, triangle) {
            (MatMulPart::Output, Triangle::Lower) => c0 > last_row,
            (MatMulPart::Output, Triangle::Upper) => last_column < r0,
            _ => false,
        };
        if outside {
            continue;
        }
        let b = &packed_rhs[column_panel * pairs * NR..][..pairs * NR];
        let a = &packed_lhs[row_panel * pairs * MR..][..pairs * MR];
        // At least one block, so that tiles with no kept pair store their zeros.
        let mut first_pair = kept_pairs.start;
        loop {
            let block_pairs = PAIRS_PER_BLOCK.min(kept_pairs.end.saturating_sub(first_pair));
            let blocks = (
                block_pairs,
                PanelPairs::new(
                    &a[first_pair * MR..][..block_pairs * MR],
                    Layout::Panels.strides(pairs, MR),
                ),
                &b[first_pair * NR..][..block_pairs * NR],
            );
            let add = first_pair > kept_pairs.start;
            // SAFETY: the tile is inside `dst`, written by this thread only, and `supported()`
            // holds (the caller's promise).
            unsafe { out.tile((m, n), (r0, c0), blocks, add) };
            first_pair += block_pairs;
            if first_pair >= kept_pairs.end {
                break;
            }
        }
    }
    give_back([lhs_buffer, rhs_buffer]);
}

/// Zeros the packed pairs of a row panel whose rows start at `first_row` outside `triangle`
/// (kept: K index ≤ row for a lower one, ≥ row for an upper one). Only the pairs the diagonal
/// crosses hold both kinds: before them a lower triangle keeps every pair and an upper one
/// multiplies none (its kept pairs start there), after them the reverse. (Walking every pair
/// of every panel cost attention's products a few percent.)
fn keep_triangle(panel: &mut [u32], first_row: usize, triangle: Triangle) {
    let crossed = first_row / 2..(first_row + MR).div_ceil(2);
    let pairs = panel.chunks_exact_mut(MR).enumerate();
    for (p, pairs) in pairs.skip(crossed.start).take(crossed.len()) {
        for (i, pair) in pairs.iter_mut().enumerate() {
            let row = first_row + i;
            // The lower half holds K index 2p, the upper one 2p + 1.
            let keep = |kk: usize| triangle.keeps(row, kk);
            let mask = match (keep(2 * p), keep(2 * p + 1)) {
                (true, true) => continue,
                (true, false) => 0x0000_ffff,
                (false, true) => 0xffff_0000,
                (false, false) => 0,
            };
            *pair &= mask;
        }
    }
}

/// GFLOP/s of the f32 GEMM (the `gemm` crate) and of this kernel on one product of random
/// bf16 values, `lhs (m×k)` row-major times a weight stored `n×k` as a Linear's is (best of
/// five, over rayon's threads, side by side); `None` where the CPU cannot run the kernel.
pub fn compare_with_f32((m, n, k): (usize, usize, usize)) -> Option<(f64, f64)> {
    if !supported() {
        return None;
    }
    let values = |len: usize, seed: u32| -> Vec<f32> {
        // Small bf16 values from a multiplicative hash: no generator needed for a timing.
        (0..len as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(0x9e37_79b9) >> 16;
                f32::from_bits((h as f32 / 65536.0 - 0.5).to_bits() & 0xffff_0000)
            })
            .collect()
    };
    let (lhs, weight) = (values(m * k, 1), values(n * k, 2));
    let mut out = vec![0f32; m * n];
    let dst = (out.as_mut_ptr(), 1, n as isize);
    let (a, b) = (
        (lhs.as_ptr(), 1, k as isize),
        (weight.as_ptr(), k as isize, 1),
    );
    let time = |run: &dyn Fn()| {
        (0..5)
            .map(|_| {
                let start = std::time::Instant::now();
                run();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    // SAFETY: the three operands describe exactly their vectors; `supported()` holds.
    let f32_seconds = time(&|| unsafe {
        super::product::multiply(
            (m, n, k),
            dst,
            a,
            b,
            Default::default(),
            gemm::Parallelism::Rayon(0),
        )
    });
    // SAFETY: as above.
    let (out, a, b) = (Output::Strided(dst), Matrix::Strided(a), Matrix::Strided(b));
    let bf16_seconds = time(&|| unsafe { multiply((m, n, k), out, a, b, false, true) });
    let flops = 2.0 * (m * n * k) as f64;
    Some((flops / f32_seconds / 1e9, flops / bf16_seconds / 1e9))
}

/// The output of a product, written by the tasks at disjoint tiles: strided, or with each row
/// at an address of its own (an expert's token rows of a grouped GEMM, written where they lie).
#[derive(Clone, Copy, Debug)]
pub(super) enum Output {
    Strided(Operand<*mut f32>),
    /// Row `r` at `rows[r]`, its elements contiguous.
    Rows(*const *mut f32),
}

// SAFETY: every task writes its own tile only.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// `row_panels` row panels `a` (packed from output row `first_row` on, each `pairs` long,
    /// laid out as `layout` says) times column panel `column_panel` (`b`, packed) into the
    /// `m × n` output, over K in blocks of [`PAIRS_PER_BLOCK`] so that `b`'s block stays in L1
    /// across the row panels.
    ///
    /// # Safety
    /// As [`Output::tile`] for every tile.
    unsafe fn tiles(
        self,
        (m, n): (usize, usize),
        (first_row, row_panels, a, layout): (usize, usize, &[u32], Layout),
        (column_panel, b): (usize, &[u32]),
        pairs: usize,
        add: bool,
    ) {
        let strides = layout.strides(pairs, MR);
        // (At least one block, so that K = 0 still writes its zeros.)
        for first_pair in (0..pairs.max(1)).step_by(PAIRS_PER_BLOCK) {
            let block_pairs = PAIRS_PER_BLOCK.min(pairs - first_pair);
            let b = &b[first_pair * NR..][..block_pairs * NR];
            // Later K blocks add to what the earlier ones stored.
            let add = add || first_pair > 0;
            for row_panel in 0..row_panels {
                let a = &a[row_panel * pairs * MR + first_pair * strides.1..];
                let a = PanelPairs::new(a, strides);
                let corner = (first_row + row_panel * MR, column_panel * NR);
                // SAFETY: the caller's promise.
                unsafe { self.tile((m, n), corner, (block_pairs, a, b), add) };
            }
        }
    }

    /// `block_pairs` K pairs of the packed panels `a` (with its row and pair strides) and `b`
    /// multiplied into the register tile whose corner is `(r0, c0)` of the `m × n` output,
    /// stored there or added to it.
    ///
    /// # Safety
    /// The tile's elements inside `m × n` are inside the destination and no other thread
    /// touches them; `supported()` holds.
    unsafe fn tile(
        self,
        (m, n): (usize, usize),
        (r0, c0): (usize, usize),
        (block_pairs, a, b): (usize, PanelPairs<'_>, &[u32]),
        add: bool,
    ) {
        let (rows, columns) = ((m - r0).min(MR), (n - c0).min(NR));
        // Rows of the output contiguous: the tile is stored (or added) where it goes, with
        // masks at the edges. (Through a tile and an element loop it cost about a tenth of a
        // K = 256 product.)
        let rows_from = match self {
            Output::Strided((base, 1, row_stride)) => {
                Some(Runs::Strided(base.cast_const(), row_stride).from(r0))
            }
            Output::Rows(table) => Some(Runs::Table(table.cast()).from(r0)),
            Output::Strided(_) => None,
        };
        if let Some(rows_from) = rows_from {
            let block = Block {
                rows_from,
                first_column: c0,
                rows,
                columns,
                add,
            };
            // SAFETY: the caller's promise.
            unsafe { kernel::tile(block_pairs, a, b, block) };
        } else {
            let mut tile = [0f32; MR * NR];
            let block = Block {
                rows_from: Runs::Strided(tile.as_mut_ptr().cast_const(), NR as isize),
                first_column: 0,
                rows: MR,
                columns: NR,
                add: false,
            };
            // SAFETY: the block is the local tile; the caller's promise.
            unsafe { kernel::tile(block_pairs, a, b, block) };
            // SAFETY: as above, through the output's strides.
            unsafe { self.write(&tile, (r0, rows), (c0, columns), add) };
        }
    }

    /// Writes (or adds) the `rows × columns` corner of a register tile at `(r0, c0)`.
    ///
    /// # Safety
    /// The elements are inside the destination and no other thread touches them.
    unsafe fn write(
        self,
        tile: &[f32; MR * NR],
        (r0, rows): (usize, usize),
        (c0, columns): (usize, usize),
        add: bool,
    ) {
        let Output::Strided((base, column_stride, row_stride)) = self else {
            unreachable!("rows at addresses of their own are written by the kernel")
        };
        for (r, sums) in tile.chunks_exact(NR).take(rows).enumerate() {
            // SAFETY: the caller's promise.
            let row = unsafe { base.offset((r0 + r) as isize * row_stride) };
            for (c, &sum) in sums[..columns].iter().enumerate() {
                // SAFETY: the caller's promise.
                let element = unsafe { &mut *row.offset((c0 + c) as isize * column_stride) };
                *element = if add { *element + sum } else { sum };
            }
        }
    }
}

/// Pairs of a packed `lhs` panel from its first pair in use: pair `p` of the panel's row `i`
/// at `i · row_stride + p · pair_stride` of `values` (see [`Layout`]).
#[derive(Clone, Copy)]
struct PanelPairs<'a> {
    values: &'a [u32],
    row_stride: usize,
    pair_stride: usize,
}

impl<'a> PanelPairs<'a> {
    fn new(values: &'a [u32], (row_stride, pair_stride): (usize, usize)) -> Self {
        PanelPairs {
            values,
            row_stride,
            pair_stride,
        }
    }
}

/// Where a register tile goes: `rows × columns` (at most `MR × NR`) f32 values, row `r` from
/// column `first_column` of the row at `rows_from.at(r)`, consecutive along it; overwritten or
/// added to.
struct Block {
    rows_from: Runs,
    first_column: usize,
    rows: usize,
    columns: usize,
    add: bool,
}

impl Block {
    /// The first element of the block's row `r`.
    ///
    /// # Safety
    /// `r` is below `rows` (a table has its entry).
    #[inline(always)]
    unsafe fn row(&self, r: usize) -> *mut f32 {
        // SAFETY: the caller's promise.
        unsafe {
            self.rows_from
                .at(r)
                .cast_mut()
                .wrapping_add(self.first_column)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{Block, MR, NR, PanelPairs};

    /// `block (+)= a · b` over `pairs` K pairs of packed panels, pair `p` of `a`'s row `i` at
    /// `i · row_stride + p · pair_stride` (the kernel broadcasts them one at a time, so `a`'s
    /// rows may lie apart).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512_BF16; `a` holds those pairs and `b` `pairs · NR`; the
    /// block's elements are writable and touched by no other thread.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(pairs: usize, a: PanelPairs<'_>, b: &[u32], block: Block) {
        let PanelPairs {
            values: a,
            row_stride,
            pair_stride,
        } = a;
        let a_last = (MR - 1) * row_stride + pairs.saturating_sub(1) * pair_stride;
        assert!((pairs == 0 || a.len() > a_last) && b.len() >= pairs * NR);
        assert!(block.rows <= MR && block.columns <= NR);
        let mut sums = [[_mm512_setzero_ps(); 2]; MR];
        let rows: [*const u32; MR] =
            std::array::from_fn(|i| a.as_ptr().wrapping_add(i * row_stride));
        let b = b.as_ptr();
        for p in 0..pairs {
            // SAFETY: pair p of both panels is inside them (asserted above).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
                for (i, row) in sums.iter_mut().enumerate() {
                    let pair = *rows[i].add(p * pair_stride);
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
                }
            }
        }
        // The columns of each half of a row that the block holds.
        let mask = |half: usize| -> __mmask16 {
            let kept = block.columns.saturating_sub(16 * half).min(16);
            ((1u32 << kept) - 1) as __mmask16
        };
        let masks = [mask(0), mask(1)];
        for (r, row) in sums.iter().take(block.rows).enumerate() {
            for (half, (&sum, &mask)) in row.iter().zip(&masks).enumerate() {
                // SAFETY: the masked lanes are columns below `block.columns` of row r below
                // `block.rows` (the caller's promise).
                unsafe {
                    let at = block.row(r).add(16 * half);
                    let value = if block.add {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), sum)
                    } else {
                        sum
                    };
                    _mm512_mask_storeu_ps(at, mask, value);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{Block, PanelPairs};

    /// Never called: [`super::supported`] is false off x86_64.
    pub(super) unsafe fn tile(_: usize, _: PanelPairs<'_>, _: &[u32], _: Block) {
        unreachable!("the bf16 GEMM needs AVX512_BF16")
    }
}

/// The FLOP rates of `vdpbf16ps` and `vfmadd231ps`, measured side by side on this core.
mod probe {
    use std::time::Instant;

    /// `vdpbf16ps`'s FLOPs per second over `vfmadd231ps`'s (best of five short runs each).
    pub(super) fn bf16_flops_over_f32() -> f64 {
        let best = |run: fn(usize) -> f32| {
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    std::hint::black_box(run(20_000));
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        // Same instruction count; a bf16 one does 64 FLOPs, an f32 FMA 32.
        2.0 * best(chains::f32) / best(chains::bf16)
    }

    #[cfg(target_arch = "x86_64")]
    mod chains {
        use std::arch::x86_64::*;

        /// `iterations` × 12 independent `vfmadd231ps` (enough chains to fill the pipes).
        pub(super) fn f32(iterations: usize) -> f32 {
            // SAFETY: only called once `supported()` holds.
            unsafe { f32_chains(iterations) }
        }

        /// `iterations` × 12 independent `vdpbf16ps`.
        pub(super) fn bf16(iterations: usize) -> f32 {
            // SAFETY: only called once `supported()` holds.
            unsafe { bf16_chains(iterations) }
        }

        #[target_feature(enable = "avx512f")]
        unsafe fn f32_chains(iterations: usize) -> f32 {
            let x = _mm512_set1_ps(std::hint::black_box(0.999));
            let y = _mm512_set1_ps(std::hint::black_box(1e-3));
            let mut sums = [_mm512_setzero_ps(); 12];
            for _ in 0..iterations {
                for s in &mut sums {
                    *s = _mm512_fmadd_ps(*s, x, y);
                }
            }
            sums.iter().map(|s| _mm512_reduce_add_ps(*s)).sum()
        }

        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn bf16_chains(iterations: usize) -> f32 {
            let half = _mm512_set1_ps(std::hint::black_box(0.5));
            let x: __m512bh = _mm512_cvtne2ps_pbh(half, half);
            let mut sums = [_mm512_setzero_ps(); 12];
            for _ in 0..iterations {
                for s in &mut sums {
                    *s = _mm512_dpbf16_ps(*s, x, x);
                }
            }
            sums.iter().map(|s| _mm512_reduce_add_ps(*s)).sum()
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    mod chains {
        pub(super) fn f32(_: usize) -> f32 {
            0.0
        }
        pub(super) fn bf16(_: usize) -> f32 {
            0.0
        }
    }
}

#[cfg(test)]
mod tests;
