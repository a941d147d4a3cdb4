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
//! Layout: `lhs` is packed in panels of [`MR`] rows and `rhs` in panels of [`NR`] columns, one
//! 32-bit pair of bf16 values (two consecutive elements of K) per row or column and per pair of
//! K, zero-padded to whole panels and an even K. A register tile of `MR × NR` f32 sums runs
//! over K in blocks of [`PAIRS_PER_BLOCK`], each block's sums added to the output in turn, so
//! every output element is summed in one fixed order: the result does not depend on the thread
//! count.

use std::sync::OnceLock;

use fathom_compiler::graph::{MatMulPart, Triangle};
use rayon::prelude::*;

use super::product::Operand;

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
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
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
    unsafe {
        pack_operand(packed_lhs, Source(lhs), (m, k), MR, false, parallel);
        pack_operand(packed_rhs, Source(rhs), (n, k), NR, true, parallel);
    }
    // Tasks: a block of row panels times one column panel, column panels outermost so that
    // neighbouring tasks share their `rhs` panel.
    let row_blocks = row_panels.div_ceil(ROW_PANELS_PER_TASK);
    let out = Destination(dst);
    let task = |index: usize| {
        let (column_panel, row_block) = (index / row_blocks, index % row_blocks);
        let b = &packed_rhs[column_panel * pairs * NR..][..pairs * NR];
        let rows = row_block * ROW_PANELS_PER_TASK
            ..((row_block + 1) * ROW_PANELS_PER_TASK).min(row_panels);
        // (At least one block, so that K = 0 still writes its zeros.)
        for first_pair in (0..pairs.max(1)).step_by(PAIRS_PER_BLOCK) {
            let block_pairs = PAIRS_PER_BLOCK.min(pairs - first_pair);
            let b = &b[first_pair * NR..][..block_pairs * NR];
            // Later K blocks add to what the earlier ones stored.
            let add = add || first_pair > 0;
            for row_panel in rows.clone() {
                let a = &packed_lhs[(row_panel * pairs + first_pair) * MR..][..block_pairs * MR];
                let corner = (row_panel * MR, column_panel * NR);
                // SAFETY: the tile is inside `dst`, no other task writes it, and `supported()`
                // holds (the caller's promise).
                unsafe { out.tile((m, n), corner, (block_pairs, a, b), add) };
            }
        }
    };
    let tasks = column_panels * row_blocks;
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    give_back([lhs_buffer, rhs_buffer]);
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
fn give_back(buffers: [Vec<u32>; 2]) {
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
    let (lhs, rhs) = (Source(lhs), Source(rhs));
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
        let Source((base, column_stride, row_stride)) = lhs;
        // SAFETY: column `first_k ≤ k` of the operand, or one past its end when no column is
        // kept (then nothing is read).
        let shifted = Source((
            unsafe { base.offset(first_k as isize * column_stride) },
            column_stride,
            row_stride,
        ));
        let kept_out = &mut out[kept.start * MR..kept.end * MR];
        // SAFETY: rows `panel·MR..` below m and columns `first_k..end_k` below k lie in `lhs`
        // (the caller's promise).
        unsafe {
            pack(
                kept_out,
                shifted,
                (panel * MR, m),
                end_k - first_k,
                MR,
                false,
            )
        };
        if part == MatMulPart::Left {
            keep_triangle(out, panel * MR, triangle);
        }
    }
    // SAFETY: the k×n matrix lies in `rhs` (the caller's promise).
    unsafe { pack_operand(packed_rhs, rhs, (n, k), NR, true, false) };
    let out = Destination(dst);
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
                &a[first_pair * MR..][..block_pairs * MR],
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
/// (kept: K index ≤ row for a lower one, ≥ row for an upper one).
fn keep_triangle(panel: &mut [u32], first_row: usize, triangle: Triangle) {
    for (p, pairs) in panel.chunks_exact_mut(MR).enumerate() {
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

/// Packs the `bound` rows of `operand` (its columns, read as rows of its transpose, when
/// `transposed`) over K = `k` into `packed`, in panels of `width`, over rayon's threads when
/// `parallel`. Rows that lie side by side (K the strided axis: a weight gradient's `xᵀ` or
/// `dyᵀ`, a weight read `k × n`) are packed in tasks of up to [`SIDE_BY_SIDE`] panels and
/// [`PAIRS_PER_PACKING_TASK`] K pairs, so that an operand of few panels still spreads over the
/// threads; rows along K in tasks of [`SIDE_BY_SIDE`] panels.
///
/// # Safety
/// The `bound` rows and their `k` elements lie inside the operand; `supported()` holds.
unsafe fn pack_operand(
    packed: &mut [u32],
    operand @ Source((_, column_stride, row_stride)): Source,
    (bound, k): (usize, usize),
    width: usize,
    transposed: bool,
    parallel: bool,
) {
    let (along, across) = if transposed {
        (column_stride, row_stride)
    } else {
        (row_stride, column_stride)
    };
    let pairs = k.div_ceil(2);
    let panel_len = (pairs * width).max(1);
    let run = |tasks: usize, task: &(dyn Fn(usize) + Sync)| {
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    };
    if along == 1 && pairs > 0 {
        let groups = bound.div_ceil(width * SIDE_BY_SIDE);
        assert!(packed.len() >= bound.div_ceil(width) * panel_len);
        let blocks = pairs.div_ceil(PAIRS_PER_PACKING_TASK);
        let out = PackedPanels(packed.as_mut_ptr());
        let task = |index: usize| {
            let (group, block) = (index / blocks, index % blocks);
            let first_row = group * SIDE_BY_SIDE * width;
            let rows = (SIDE_BY_SIDE * width).min(bound - first_row);
            let first_pair = block * PAIRS_PER_PACKING_TASK;
            let block_pairs = first_pair..(first_pair + PAIRS_PER_PACKING_TASK).min(pairs);
            // SAFETY: the group's rows below `bound` and their k elements lie inside the
            // operand, its panels inside `packed` (asserted above); tasks write disjoint pairs
            // of them; `supported()` holds (the caller's promise).
            unsafe {
                kernel::pack_side_by_side(
                    (out.at(group * SIDE_BY_SIDE * panel_len), panel_len, width),
                    (operand.element(first_row as isize), across),
                    (rows, k),
                    block_pairs,
                )
            }
        };
        return run(groups * blocks, &task);
    }
    let out = PackedPanels(packed.as_mut_ptr());
    let panels = bound.div_ceil(width);
    assert!(packed.len() >= panels * panel_len);
    let task = |group: usize| {
        for panel in group * SIDE_BY_SIDE..((group + 1) * SIDE_BY_SIDE).min(panels) {
            // SAFETY: the panel lies inside `packed` (asserted above) and no other task writes
            // it.
            let out =
                unsafe { std::slice::from_raw_parts_mut(out.at(panel * panel_len), panel_len) };
            // SAFETY: the panel's rows below `bound` lie inside the operand (the caller's
            // promise).
            unsafe { pack(out, operand, (panel * width, bound), k, width, transposed) };
        }
    };
    run(panels.div_ceil(SIDE_BY_SIDE), &task);
}

/// The packed panels, written by the packing tasks at disjoint pairs.
#[derive(Clone, Copy)]
struct PackedPanels(*mut u32);

// SAFETY: every task writes its own panels' pairs only.
unsafe impl Send for PackedPanels {}
unsafe impl Sync for PackedPanels {}

impl PackedPanels {
    /// The packed value `offset` values from the first (no bounds: the caller checks).
    fn at(self, offset: usize) -> *mut u32 {
        self.0.wrapping_add(offset)
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
    let bf16_seconds = time(&|| unsafe { multiply((m, n, k), dst, a, b, false, true) });
    let flops = 2.0 * (m * n * k) as f64;
    Some((flops / f32_seconds / 1e9, flops / bf16_seconds / 1e9))
}

/// A read-only operand shared by the packing threads.
#[derive(Clone, Copy)]
struct Source(Operand<*const f32>);

// SAFETY: only read, and the caller of `multiply` keeps it alive and unwritten meanwhile.
unsafe impl Send for Source {}
unsafe impl Sync for Source {}

impl Source {
    /// The element `offset` elements from the first (no bounds: the caller checks).
    fn element(self, offset: isize) -> *const f32 {
        self.0.0.wrapping_offset(offset)
    }
}

/// The output, written by the tasks at disjoint tiles.
#[derive(Clone, Copy)]
struct Destination(Operand<*mut f32>);

// SAFETY: every task writes its own tile only.
unsafe impl Send for Destination {}
unsafe impl Sync for Destination {}

impl Destination {
    /// `block_pairs` K pairs of the packed panels `a` and `b` multiplied into the register tile
    /// whose corner is `(r0, c0)` of the `m × n` output, stored there or added to it.
    ///
    /// # Safety
    /// The tile's elements inside `m × n` are inside the destination and no other thread
    /// touches them; `supported()` holds.
    unsafe fn tile(
        self,
        (m, n): (usize, usize),
        (r0, c0): (usize, usize),
        (block_pairs, a, b): (usize, &[u32], &[u32]),
        add: bool,
    ) {
        let (rows, columns) = ((m - r0).min(MR), (n - c0).min(NR));
        let (base, column_stride, row_stride) = self.0;
        if column_stride == 1 {
            // Rows of the output are contiguous: the tile is stored (or added) where it goes,
            // with masks at the edges. (Through a tile and an element loop it cost about a
            // tenth of a K = 256 product.)
            // SAFETY: the caller's promise.
            unsafe {
                let first = base.offset(r0 as isize * row_stride + c0 as isize);
                let block = Block {
                    first,
                    row_stride,
                    rows,
                    columns,
                    add,
                };
                kernel::tile(block_pairs, a, b, block);
            }
        } else {
            let mut tile = [0f32; MR * NR];
            let block = Block {
                first: tile.as_mut_ptr(),
                row_stride: NR as isize,
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
        let (base, column_stride, row_stride) = self.0;
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

/// Two f32 values rounded to bf16 as one pair: `lo` in the lower half, as `vdpbf16ps` pairs
/// them with the other operand's lower half.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// The bits of `x` rounded to bf16 as `half::bf16::from_f32` and the graph's casts round it:
/// to nearest, ties to even (add `0x7FFF` and the lowest kept bit, keep the upper half; a
/// carry lands on the next binade or on infinity), a NaN made quiet. A bf16 value stays as it
/// is, so operands that hold bf16 values and operands the product rounds are packed alike.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    if x.is_nan() {
        (bits | 0x0040_0000) >> 16
    } else {
        bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16
    }
}

/// Panels packed by one task: where the rows lie side by side, each K pair is read across all
/// of the panels' rows in one run (12 rows of f32 are 48 bytes, less than a cache line, and
/// reading each panel's on its own walked all of K for every 48 bytes).
const SIDE_BY_SIDE: usize = 8;

/// K pairs packed by one task where the rows lie side by side (a weight gradient's operands
/// have a few panels of K = 1024 tokens).
const PAIRS_PER_PACKING_TASK: usize = 64;

/// Packs `width` rows (of `lhs`, or columns of `rhs` when `transposed`) starting at `first`
/// (of `bound`) into `out[pair · width + i]`, zeros past `bound` and past K.
///
/// # Safety
/// Rows below `bound` and their first `k` elements lie inside the operand; `supported()`
/// holds (the loops are compiled for AVX-512: 16 values a step where SSE took 4).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn pack(
    out: &mut [u32],
    Source((base, column_stride, row_stride)): Source,
    (first, bound): (usize, usize),
    k: usize,
    width: usize,
    transposed: bool,
) {
    // The strides along the packed rows and along K.
    let (along, across) = if transposed {
        (column_stride, row_stride)
    } else {
        (row_stride, column_stride)
    };
    let rows = width.min(bound - first);
    let pairs = k.div_ceil(2);
    // Memory is walked in the operand's own order, with the common contiguous cases on slices
    // the compiler vectorises: packing in the other order touched a new cache line for every
    // element (a transposed weight-gradient operand: 0.6× the f32 GEMM's speed), and packing
    // element by element through strides cost about a fifth of a 256×4096×1024 product.
    if along == 1 {
        if pairs > 0 {
            // SAFETY: the rows below `bound` and their k elements lie inside the operand,
            // `out` holds the panel (the caller's promise); `supported()` holds.
            unsafe {
                assert!(out.len() >= pairs * width);
                kernel::pack_side_by_side(
                    (out.as_mut_ptr(), pairs * width, width),
                    (base.offset(first as isize), across),
                    (rows, k),
                    0..pairs,
                )
            }
        }
        return;
    }
    // K contiguous along each row: whole blocks of 16 pairs (32 values) of 16 rows at a time
    // through a transpose in registers (element by element, the stores `width` apart made
    // this the slowest part of packing), the rest of K below.
    let transposed_pairs = if across == 1 {
        // SAFETY: rows first.. first + rows and their first k elements lie inside the operand
        // (the caller's promise); `supported()` holds.
        unsafe {
            kernel::pack_k_contiguous(
                out,
                (base.offset(first as isize * along), along),
                rows,
                k,
                width,
            )
        }
    } else {
        0
    };
    for i in 0..rows {
        // SAFETY: element `kk < k` of row `first + i < bound` (the caller's promise).
        let at = |kk: usize| unsafe {
            *base.offset((first + i) as isize * along + kk as isize * across)
        };
        if across == 1 {
            // SAFETY: as `at`, for the row's k contiguous elements.
            let row =
                unsafe { std::slice::from_raw_parts(base.offset((first + i) as isize * along), k) };
            for (p, two) in row.chunks_exact(2).enumerate().skip(transposed_pairs) {
                out[p * width + i] = pair(two[0], two[1]);
            }
        } else {
            for p in 0..k / 2 {
                out[p * width + i] = pair(at(2 * p), at(2 * p + 1));
            }
        }
        if k % 2 == 1 {
            out[(k / 2) * width + i] = pair(at(k - 1), 0.0);
        }
    }
}

/// Where a register tile goes: `rows × columns` (at most `MR × NR`) f32 values from `first`,
/// consecutive along a row, rows `row_stride` apart; overwritten or added to.
struct Block {
    first: *mut f32,
    row_stride: isize,
    rows: usize,
    columns: usize,
    add: bool,
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{Block, MR, NR};

    /// Packs the first `16 · ⌊k / 32⌋` K pairs of `rows` rows whose elements are contiguous
    /// along K (row `i` at `first + i · row_stride`) into `out[pair · width + i]`, and returns
    /// how many pairs that is. Each block of 16 rows × 16 pairs is loaded row by row, rounded to
    /// bf16 and its bf16 halves picked into pairs, transposed in registers, and stored pair by
    /// pair.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512BW; every row's first `k` elements are readable;
    /// `out` holds `pairs · width` values with `rows ≤ width`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_k_contiguous(
        out: &mut [u32],
        (first, row_stride): (*const f32, isize),
        rows: usize,
        k: usize,
        width: usize,
    ) -> usize {
        let blocks = k / 32;
        assert!(rows <= width && out.len() >= blocks * 16 * width);
        // Word w of a pair vector is the upper (bf16) word of value w of the 32: word 2w + 1
        // of the two loaded vectors.
        let upper_words = _mm512_set_epi16(
            63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21,
            19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
        );
        for group in (0..rows).step_by(16) {
            let count = (rows - group).min(16);
            let mask = ((1u32 << count) - 1) as __mmask16;
            for block in 0..blocks {
                let mut v = [_mm512_setzero_si512(); 16];
                for (r, vector) in v.iter_mut().take(count).enumerate() {
                    // SAFETY: values 32·block .. 32·block + 32 ≤ k of row group + r (the
                    // caller's promise).
                    unsafe {
                        let row =
                            first.offset((group + r) as isize * row_stride + 32 * block as isize);
                        let low = rounded(_mm512_loadu_si512(row.cast()));
                        let high = rounded(_mm512_loadu_si512(row.add(16).cast()));
                        *vector = _mm512_permutex2var_epi16(low, upper_words, high);
                    }
                }
                transpose(&mut v);
                for (q, pairs) in v.iter().enumerate() {
                    let at = (16 * block + q) * width + group;
                    // SAFETY: `count` values from `at` lie in `out` (asserted above).
                    unsafe {
                        _mm512_mask_storeu_epi32(out.as_mut_ptr().add(at).cast(), mask, *pairs)
                    };
                }
            }
        }
        16 * blocks
    }

    /// Packs K pairs `pairs` of `rows` rows that lie side by side (element kk of row i at
    /// `first + i + kk · across`) into panels of `width` rows `panel_len` apart from `out`:
    /// pair p of row i to `out[(i / width) · panel_len + p · width + i % width]`, each value
    /// rounded as [`super::bf16_bits`] rounds it, zeros past K. Each panel's pair is one or two
    /// masked runs of 16 rows (its padding rows past `rows` are left as they are).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512BW; the rows' first `k` elements are readable; every
    /// panel's pairs `pairs` are writable and written by no other thread.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_side_by_side(
        (out, panel_len, width): (*mut u32, usize, usize),
        (first, across): (*const f32, isize),
        (rows, k): (usize, usize),
        pairs: std::ops::Range<usize>,
    ) {
        let upper_half = _mm512_set1_epi32(0xffff_0000u32 as i32);
        for p in pairs {
            let lo = first.wrapping_offset(2 * p as isize * across);
            let hi = (2 * p + 1 < k).then(|| lo.wrapping_offset(across));
            let mut row = 0;
            while row < rows {
                // At most 16 rows, within one panel.
                let count = (rows - row).min(16).min(width - row % width);
                let mask = ((1u32 << count) - 1) as __mmask16;
                // SAFETY: rows row.. row + count of elements 2p and 2p + 1 (< k) are readable,
                // the pair's run inside its panel writable (the caller's promise).
                unsafe {
                    let low = rounded(_mm512_maskz_loadu_epi32(mask, lo.add(row).cast()));
                    let high = match hi {
                        Some(hi) => rounded(_mm512_maskz_loadu_epi32(mask, hi.add(row).cast())),
                        None => _mm512_setzero_si512(),
                    };
                    let pairs = _mm512_or_si512(
                        _mm512_srli_epi32::<16>(low),
                        _mm512_and_si512(high, upper_half),
                    );
                    let at = (row / width) * panel_len + p * width + row % width;
                    _mm512_mask_storeu_epi32(out.add(at).cast(), mask, pairs);
                }
                row += count;
            }
        }
    }

    /// 16 f32 values rounded to bf16 in their upper halves, as `super::bf16_bits` rounds.
    #[target_feature(enable = "avx512f")]
    fn rounded(x: __m512i) -> __m512i {
        let kept_lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        let biased = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), kept_lsb));
        let value = _mm512_castsi512_ps(x);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(value, value);
        let quiet = _mm512_or_si512(x, _mm512_set1_epi32(0x0040_0000));
        _mm512_mask_blend_epi32(nan, biased, quiet)
    }

    /// Transposes 16 vectors of 16 lanes (`v[r]` lane `c` becomes `v[c]` lane `r`): lanes
    /// interleaved in pairs, then in fours within each 128-bit quarter, then quarters moved.
    #[target_feature(enable = "avx512f")]
    fn transpose(v: &mut [__m512i; 16]) {
        // t[2a] quarter Q: rows 2a, 2a + 1 of columns 4Q, 4Q + 1; t[2a + 1]: of 4Q + 2, 4Q + 3.
        let mut t = [_mm512_setzero_si512(); 16];
        for a in 0..8 {
            t[2 * a] = _mm512_unpacklo_epi32(v[2 * a], v[2 * a + 1]);
            t[2 * a + 1] = _mm512_unpackhi_epi32(v[2 * a], v[2 * a + 1]);
        }
        // u[4b + j] quarter Q: rows 4b .. 4b + 4 of column 4Q + j.
        let mut u = [_mm512_setzero_si512(); 16];
        for b in 0..4 {
            u[4 * b] = _mm512_unpacklo_epi64(t[4 * b], t[4 * b + 2]);
            u[4 * b + 1] = _mm512_unpackhi_epi64(t[4 * b], t[4 * b + 2]);
            u[4 * b + 2] = _mm512_unpacklo_epi64(t[4 * b + 1], t[4 * b + 3]);
            u[4 * b + 3] = _mm512_unpackhi_epi64(t[4 * b + 1], t[4 * b + 3]);
        }
        // Column 4Q + j is quarter Q of u[j], u[4 + j], u[8 + j], u[12 + j], in that order.
        for j in 0..4 {
            let s0 = _mm512_shuffle_i32x4::<0x44>(u[j], u[4 + j]);
            let s1 = _mm512_shuffle_i32x4::<0xee>(u[j], u[4 + j]);
            let s2 = _mm512_shuffle_i32x4::<0x44>(u[8 + j], u[12 + j]);
            let s3 = _mm512_shuffle_i32x4::<0xee>(u[8 + j], u[12 + j]);
            v[j] = _mm512_shuffle_i32x4::<0x88>(s0, s2);
            v[4 + j] = _mm512_shuffle_i32x4::<0xdd>(s0, s2);
            v[8 + j] = _mm512_shuffle_i32x4::<0x88>(s1, s3);
            v[12 + j] = _mm512_shuffle_i32x4::<0xdd>(s1, s3);
        }
    }

    /// `block (+)= a · b` over `pairs` K pairs of packed panels.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512_BF16; `a` holds `pairs · MR` and `b` `pairs · NR` pairs;
    /// the block's elements are writable and touched by no other thread.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(pairs: usize, a: &[u32], b: &[u32], block: Block) {
        assert!(a.len() >= pairs * MR && b.len() >= pairs * NR);
        assert!(block.rows <= MR && block.columns <= NR);
        let mut sums = [[_mm512_setzero_ps(); 2]; MR];
        let (a, b) = (a.as_ptr(), b.as_ptr());
        for p in 0..pairs {
            // SAFETY: pair p of both panels is inside them (asserted above).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
                for (i, row) in sums.iter_mut().enumerate() {
                    let ai: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + i) as i32));
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
                    let at = block
                        .first
                        .offset(r as isize * block.row_stride)
                        .add(16 * half);
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
    use super::Block;

    /// Never called: [`super::supported`] is false off x86_64.
    pub(super) unsafe fn pack_side_by_side(
        _: (*mut u32, usize, usize),
        _: (*const f32, isize),
        _: (usize, usize),
        _: std::ops::Range<usize>,
    ) {
        unreachable!("the bf16 GEMM needs AVX512_BF16")
    }

    /// Never called: [`super::supported`] is false off x86_64.
    pub(super) unsafe fn pack_k_contiguous(
        _: &mut [u32],
        _: (*const f32, isize),
        _: usize,
        _: usize,
        _: usize,
    ) -> usize {
        unreachable!("the bf16 GEMM needs AVX512_BF16")
    }

    /// Never called: [`super::supported`] is false off x86_64.
    pub(super) unsafe fn tile(_: usize, _: &[u32], _: &[u32], _: Block) {
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
