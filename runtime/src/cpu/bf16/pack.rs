//! Packing the bf16 kernel's operands: each operand's panel rows (`lhs`'s rows in panels of
//! `MR`, `rhs`'s columns in panels of `NR`) as 32-bit pairs of bf16 values along K, each value
//! rounded as the graph's casts round it. An operand is read where it lies: strided, or with
//! its rows (or columns) at addresses of their own (an expert's routed token rows), in one of
//! three ways (see [`Reading`]): rows contiguous along K through 16 × 16 transposes in
//! registers (an `lhs`'s only rounded, in rows: [`Layout`]), rows lying side by side through
//! masked 16-lane runs, or element by element.

use rayon::prelude::*;

use super::super::product::Operand;

/// A matrix operand of the bf16 kernel: element `(r, c)` of the `lhs (m × k)` or `rhs
/// (k × n)` it stands for.
#[derive(Clone, Copy, Debug)]
pub(in crate::cpu) enum Matrix {
    /// At `base + c · column stride + r · row stride`.
    Strided(Operand<*const f32>),
    /// Row `r` at `rows[r]`, its elements contiguous (an expert's token rows where they lie).
    Rows(*const *const f32),
    /// Column `c` at `columns[c]`, its elements contiguous (the transpose of [`Matrix::Rows`]).
    Columns(*const *const f32),
}

/// The addresses of a family of contiguous runs of values: `base + index · stride`, or
/// `table[index]`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Runs {
    Strided(*const f32, isize),
    Table(*const *const f32),
}

// SAFETY: addresses of values only read, which the caller of the product keeps alive and
// unwritten meanwhile (as `Source`'s).
unsafe impl Send for Runs {}
unsafe impl Sync for Runs {}

impl Runs {
    /// The first value of run `index` (no bounds: the caller checks).
    ///
    /// # Safety
    /// A table has an entry at `index`.
    #[inline(always)]
    pub(super) unsafe fn at(self, index: usize) -> *const f32 {
        match self {
            Runs::Strided(base, stride) => base.wrapping_offset(index as isize * stride),
            // SAFETY: the caller's promise.
            Runs::Table(table) => unsafe { *table.add(index) },
        }
    }

    /// The same runs from run `first` on.
    pub(super) fn from(self, first: usize) -> Runs {
        match self {
            Runs::Strided(base, stride) => {
                Runs::Strided(base.wrapping_offset(first as isize * stride), stride)
            }
            Runs::Table(table) => Runs::Table(table.wrapping_add(first)),
        }
    }
}

/// How a packed operand's pairs lie, each panel of `width` rows from `panel · pairs · width`:
/// pair `p` of the panel's row `i` at `p · width + i` (panels: a pair's rows side by side, as
/// the kernel loads `rhs`'s), or at `i · pairs + p` (rows: each row's pairs in K order, as they
/// lie in an `lhs` contiguous along K, which the kernel broadcasts pair by pair and so reads
/// either way: packed so, an `lhs` is only rounded, with no transpose).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Layout {
    Panels,
    Rows,
}

impl Layout {
    /// The distances, in pairs, from a panel's pair to the next row's and to the next pair's.
    pub(super) fn strides(self, pairs: usize, width: usize) -> (usize, usize) {
        match self {
            Layout::Panels => (1, width),
            Layout::Rows => (pairs, 1),
        }
    }
}

/// How the panel rows of an operand are read.
#[derive(Clone, Copy, Debug)]
enum Reading {
    /// Panel row `i`'s K values contiguous from `runs.at(i)`.
    AlongK(Runs),
    /// K value `kk` of every panel row contiguous from `runs.at(kk)`: the rows lie side by
    /// side (a weight gradient's `xᵀ` or `dyᵀ`, a weight read `k × n`).
    SideBySide(Runs),
    /// Element (row `i`, K `kk`) at `base + i · along + kk · across`.
    Strided {
        base: *const f32,
        along: isize,
        across: isize,
    },
}

/// A read-only operand shared by the packing threads, with the side packed: `lhs`'s rows
/// (`transposed` false) or `rhs`'s columns read as rows of its transpose.
#[derive(Clone, Copy, Debug)]
pub(super) struct Source {
    pub(super) matrix: Matrix,
    pub(super) transposed: bool,
}

// SAFETY: only read, and the caller of the product keeps it alive and unwritten meanwhile.
unsafe impl Send for Source {}
unsafe impl Sync for Source {}

impl Source {
    pub(super) fn lhs(matrix: Matrix) -> Source {
        Source {
            matrix,
            transposed: false,
        }
    }

    /// How the operand is packed: an `lhs` read along K in rows, everything else in panels.
    fn layout(self) -> Layout {
        match self.reading() {
            Reading::AlongK(_) if !self.transposed => Layout::Rows,
            _ => Layout::Panels,
        }
    }

    pub(super) fn rhs(matrix: Matrix) -> Source {
        Source {
            matrix,
            transposed: true,
        }
    }

    fn reading(self) -> Reading {
        match (self.matrix, self.transposed) {
            (Matrix::Strided((base, column_stride, row_stride)), transposed) => {
                // The strides along the packed rows and along K.
                let (along, across) = if transposed {
                    (column_stride, row_stride)
                } else {
                    (row_stride, column_stride)
                };
                if along == 1 {
                    Reading::SideBySide(Runs::Strided(base, across))
                } else if across == 1 {
                    Reading::AlongK(Runs::Strided(base, along))
                } else {
                    Reading::Strided {
                        base,
                        along,
                        across,
                    }
                }
            }
            (Matrix::Rows(table), false) | (Matrix::Columns(table), true) => {
                Reading::AlongK(Runs::Table(table))
            }
            (Matrix::Rows(table), true) | (Matrix::Columns(table), false) => {
                Reading::SideBySide(Runs::Table(table))
            }
        }
    }
}

/// Panels packed by one task: where the rows lie side by side, each K pair is read across all
/// of the panels' rows in one run (12 rows of f32 are 48 bytes, less than a cache line, and
/// reading each panel's on its own walked all of K for every 48 bytes).
const SIDE_BY_SIDE: usize = 8;

/// K pairs packed by one task where the rows lie side by side (a weight gradient's operands
/// have a few panels of K = 1024 tokens).
const PAIRS_PER_PACKING_TASK: usize = 64;

/// Packs panel rows `rows` of `operand` over K = `k` into `packed`, in panels of `width` (the
/// first from row `rows.start`), over rayon's threads when `parallel`, and says how the pairs
/// lie ([`Source::layout`]). Rows lying side by side are packed in tasks of up to
/// [`SIDE_BY_SIDE`] panels and [`PAIRS_PER_PACKING_TASK`] K pairs, so that an operand of few
/// panels still spreads over the threads; other rows in tasks of [`SIDE_BY_SIDE`] panels.
///
/// # Safety
/// The rows and their `k` elements lie inside the operand; `super::supported()` holds.
pub(super) unsafe fn pack_operand(
    packed: &mut [u32],
    operand: Source,
    (rows, k): (std::ops::Range<usize>, usize),
    width: usize,
    parallel: bool,
) -> Layout {
    let pairs = k.div_ceil(2);
    let panel_len = pairs * width;
    let layout = operand.layout();
    if pairs == 0 {
        return layout;
    }
    let (first, bound) = (rows.start, rows.end);
    let panels = (bound - first).div_ceil(width);
    assert!(packed.len() >= panels * panel_len);
    let out = PackedPanels(packed.as_mut_ptr());
    let run = |tasks: usize, task: &(dyn Fn(usize) + Sync)| {
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    };
    if let Reading::SideBySide(runs) = operand.reading() {
        let blocks = pairs.div_ceil(PAIRS_PER_PACKING_TASK);
        let task = |index: usize| {
            let (group, block) = (index / blocks, index % blocks);
            let first_row = first + group * SIDE_BY_SIDE * width;
            let rows = (SIDE_BY_SIDE * width).min(bound - first_row);
            let first_pair = block * PAIRS_PER_PACKING_TASK;
            let block_pairs = first_pair..(first_pair + PAIRS_PER_PACKING_TASK).min(pairs);
            // SAFETY: the group's rows below `bound` and their k elements lie inside the
            // operand, its panels inside `packed` (asserted above); tasks write disjoint pairs
            // of them; `supported()` holds (the caller's promise).
            unsafe {
                vector::pack_side_by_side(
                    (out.at(group * SIDE_BY_SIDE * panel_len), panel_len, width),
                    (runs, first_row),
                    (rows, k),
                    block_pairs,
                )
            }
        };
        run(panels.div_ceil(SIDE_BY_SIDE) * blocks, &task);
        return layout;
    }
    let task = |group: usize| {
        for panel in group * SIDE_BY_SIDE..((group + 1) * SIDE_BY_SIDE).min(panels) {
            // SAFETY: the panel lies inside `packed` (asserted above) and no other task writes
            // it.
            let out =
                unsafe { std::slice::from_raw_parts_mut(out.at(panel * panel_len), panel_len) };
            let panel_first = first + panel * width;
            match (layout, operand.reading()) {
                // SAFETY: the panel's rows below `bound` and their k elements lie inside the
                // operand (the caller's promise), its pairs in `out`.
                (Layout::Rows, Reading::AlongK(runs)) => unsafe {
                    pack_rows(
                        out,
                        runs.from(panel_first),
                        width.min(bound - panel_first),
                        k,
                    )
                },
                // SAFETY: as above.
                _ => unsafe { pack(out, operand, (panel_first, bound), k, width) },
            }
        }
    };
    run(panels.div_ceil(SIDE_BY_SIDE), &task);
    layout
}

/// Packs K pairs `pairs` of the `rows` panel rows (of K = `k`) whose K value `kk` lies at
/// `runs.at(kk)`, the rows side by side from there, into `packed`: [`Layout::Panels`] of
/// `width` rows over all `k.div_ceil(2)` pairs. Tasks that each hold some of K (a chunk of
/// tokens of a weight gradient's `dyᵀ`) fill one operand this way, pair range by pair range,
/// as [`pack_operand`] packs it whole.
///
/// # Safety
/// K values `2 · pairs.start .. min(2 · pairs.end, k)` of the rows are readable through
/// `runs`; `packed` holds `rows.div_ceil(width)` panels of `k.div_ceil(2)` pairs, and no other
/// thread touches their pairs `pairs` meanwhile; `super::supported()` holds.
pub(super) unsafe fn pack_pairs_side_by_side(
    packed: *mut u32,
    runs: Runs,
    (rows, k): (usize, usize),
    width: usize,
    pairs: std::ops::Range<usize>,
) {
    assert!(pairs.end <= k.div_ceil(2));
    let panel_len = k.div_ceil(2) * width;
    // SAFETY: the caller's promise.
    unsafe { vector::pack_side_by_side((packed, panel_len, width), (runs, 0), (rows, k), pairs) }
}

/// Packs `rows` rows contiguous along K (row `i` from `runs.at(i)`) in [`Layout::Rows`]: pair
/// `p` of row `i` to `out[i · pairs + p]`, zeros past K (the panel's padding rows past `rows`
/// are left as they are).
///
/// # Safety
/// The rows' first `k` elements are readable; `supported()` holds.
unsafe fn pack_rows(out: &mut [u32], runs: Runs, rows: usize, k: usize) {
    let pairs = k.div_ceil(2);
    assert!(out.len() >= rows * pairs);
    for (i, out) in out.chunks_exact_mut(pairs).take(rows).enumerate() {
        // SAFETY: the row's k contiguous elements (the caller's promise).
        let values = unsafe { std::slice::from_raw_parts(runs.at(i), k) };
        // SAFETY: the caller's promise.
        let rounded = unsafe { vector::round_pairs(values, out) };
        for (p, two) in values.chunks(2).enumerate().skip(rounded) {
            out[p] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
        }
    }
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

/// Two f32 values rounded to bf16 as one pair: `lo` in the lower half, as `vdpbf16ps` pairs
/// them with the other operand's lower half.
pub(super) fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// The bits of `x` rounded to bf16 as `half::bf16::from_f32` and the graph's casts round it:
/// to nearest, ties to even (add `0x7FFF` and the lowest kept bit, keep the upper half; a
/// carry lands on the next binade or on infinity), a NaN made quiet. A bf16 value stays as it
/// is, so operands that hold bf16 values and operands the product rounds are packed alike.
#[inline(always)]
pub(super) fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    if x.is_nan() {
        (bits | 0x0040_0000) >> 16
    } else {
        bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16
    }
}

/// Packs the `width` panel rows from `first` (of `bound`) into `out[pair · width + i]`, zeros
/// past K (padding rows past `bound` are left as they are).
///
/// # Safety
/// Rows below `bound` and their first `k` elements lie inside the operand; `out` holds the
/// panel; `super::supported()` holds (the loops are compiled for AVX-512: 16 values a step
/// where SSE took 4).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
pub(super) unsafe fn pack(
    out: &mut [u32],
    operand: Source,
    (first, bound): (usize, usize),
    k: usize,
    width: usize,
) {
    let rows = width.min(bound - first);
    let pairs = k.div_ceil(2);
    assert!(out.len() >= pairs * width);
    // Memory is walked in the operand's own order: packing in the other order touched a new
    // cache line for every element (a transposed weight-gradient operand: 0.6× the f32 GEMM's
    // speed), and packing element by element through strides cost about a fifth of a
    // 256×4096×1024 product.
    let row = match operand.reading() {
        Reading::SideBySide(runs) => {
            // SAFETY: the caller's promise; `out` holds the panel's pairs (asserted above).
            unsafe {
                vector::pack_side_by_side(
                    (out.as_mut_ptr(), pairs * width, width),
                    (runs, first),
                    (rows, k),
                    0..pairs,
                )
            }
            return;
        }
        Reading::AlongK(runs) => runs.from(first),
        Reading::Strided {
            base,
            along,
            across,
        } => {
            for i in 0..rows {
                // SAFETY: element `kk < k` of row `first + i < bound` (the caller's promise).
                let at = |kk: usize| unsafe {
                    *base.offset((first + i) as isize * along + kk as isize * across)
                };
                for p in 0..pairs {
                    let hi = if 2 * p + 1 < k { at(2 * p + 1) } else { 0.0 };
                    out[p * width + i] = pair(at(2 * p), hi);
                }
            }
            return;
        }
    };
    // K contiguous along each row: whole blocks of 16 pairs (32 values) of 16 rows at a time
    // through a transpose in registers (element by element, the stores `width` apart made
    // this the slowest part of packing), the rest of K below.
    // SAFETY: rows first.. first + rows and their first k elements lie inside the operand
    // (the caller's promise); `supported()` holds.
    let transposed_pairs = unsafe { vector::pack_k_contiguous(out, row, rows, k, width) };
    for i in 0..rows {
        // SAFETY: the row's k contiguous elements (the caller's promise).
        let values = unsafe { std::slice::from_raw_parts(row.at(i), k) };
        for (p, two) in values.chunks(2).enumerate().skip(transposed_pairs) {
            out[p * width + i] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vector {
    use std::arch::x86_64::*;

    use super::Runs;

    /// Packs the first `16 · ⌊k / 32⌋` K pairs of `panel_rows` rows whose elements are contiguous
    /// along K (row `i` from `rows.at(i)`) into `out[pair · width + i]`, and returns how many
    /// pairs that is. Each block of 16 rows × 16 pairs is loaded row by row, rounded to bf16
    /// and its bf16 halves picked into pairs, transposed in registers, and stored pair by pair.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512BW; every row's first `k` elements are readable;
    /// `out` holds `pairs · width` values with `panel_rows ≤ width`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
    pub(super) unsafe fn pack_k_contiguous(
        out: &mut [u32],
        rows: Runs,
        panel_rows: usize,
        k: usize,
        width: usize,
    ) -> usize {
        let blocks = k / 32;
        assert!(panel_rows <= width && out.len() >= blocks * 16 * width);
        for group in (0..panel_rows).step_by(16) {
            let count = (panel_rows - group).min(16);
            let mask = ((1u32 << count) - 1) as __mmask16;
            for block in 0..blocks {
                let mut v = [_mm512_setzero_si512(); 16];
                for (r, vector) in v.iter_mut().take(count).enumerate() {
                    // SAFETY: values 32·block .. 32·block + 32 ≤ k of row group + r (the
                    // caller's promise).
                    unsafe {
                        let row = rows.at(group + r).add(32 * block);
                        *vector = rounded_words(_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)));
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

    /// Rounds the first `32 · ⌊len / 32⌋` values of `values` into pairs `out[p] = (values[2p],
    /// values[2p + 1])`, and returns how many pairs that is: `vcvtne2ps2bf16` leaves the 32
    /// rounded values of two vectors in order, which is the pairs' order.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW, AVX512DQ and AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
    pub(super) unsafe fn round_pairs(values: &[f32], out: &mut [u32]) -> usize {
        let blocks = values.len() / 32;
        assert!(out.len() >= 16 * blocks);
        for block in 0..blocks {
            // SAFETY: values 32·block .. 32·block + 32 and pairs 16·block .. 16·block + 16 lie
            // in the slices (asserted above).
            unsafe {
                let at = values.as_ptr().add(32 * block);
                let words = rounded_words(_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)));
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * block).cast(), words);
            }
        }
        16 * blocks
    }

    /// Packs K pairs `pairs` of `rows` rows that lie side by side (element kk of row i at
    /// `runs.at(kk) + first_row + i`) into panels of `width` rows `panel_len` apart from `out`:
    /// pair p of row i to `out[(i / width) · panel_len + p · width + i % width]`, each value
    /// rounded as [`super::bf16_bits`] rounds it, zeros past K. Each panel's pair is one or two
    /// masked runs of 16 rows (its padding rows past `rows` are left as they are).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512BW; the rows' first `k` elements are readable; every
    /// panel's pairs `pairs` are writable and written by no other thread.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
    pub(super) unsafe fn pack_side_by_side(
        (out, panel_len, width): (*mut u32, usize, usize),
        (runs, first_row): (Runs, usize),
        (rows, k): (usize, usize),
        pairs: std::ops::Range<usize>,
    ) {
        // Word 2i of the pairs is value i of the low run, word 2i + 1 value i of the high one.
        let interleaved = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for p in pairs {
            // SAFETY: K values 2p and 2p + 1 (< k) have runs (the caller's promise).
            let lo = unsafe { runs.at(2 * p) }.wrapping_add(first_row);
            let hi = (2 * p + 1 < k).then(|| unsafe { runs.at(2 * p + 1) }.wrapping_add(first_row));
            let mut row = 0;
            while row < rows {
                // At most 16 rows, within one panel.
                let count = (rows - row).min(16).min(width - row % width);
                let mask = ((1u32 << count) - 1) as __mmask16;
                // SAFETY: rows row.. row + count of elements 2p and 2p + 1 (< k) are readable,
                // the pair's run inside its panel writable (the caller's promise).
                unsafe {
                    let low = _mm512_maskz_loadu_ps(mask, lo.add(row));
                    let high = match hi {
                        Some(hi) => _mm512_maskz_loadu_ps(mask, hi.add(row)),
                        None => _mm512_setzero_ps(),
                    };
                    let pairs = _mm512_permutexvar_epi16(interleaved, rounded_words(low, high));
                    let at = (row / width) * panel_len + p * width + row % width;
                    _mm512_mask_storeu_epi32(out.add(at).cast(), mask, pairs);
                }
                row += count;
            }
        }
    }

    /// 32 f32 values (`low`'s, then `high`'s) rounded to bf16 as [`super::bf16_bits`] rounds
    /// them, word w holding value w. `vcvtne2ps2bf16` rounds alike (nearest, ties to even, a NaN
    /// made quiet with its upper bits kept) but flushes subnormal inputs to zero, which the
    /// graph's casts keep: vectors holding one take the rounding on the bits instead. (The
    /// instruction alone made packing rows along K about 30% faster.)
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
    fn rounded_words(low: __m512, high: __m512) -> __m512i {
        const SUBNORMAL: i32 = 0x20;
        let subnormal =
            _mm512_fpclass_ps_mask::<SUBNORMAL>(low) | _mm512_fpclass_ps_mask::<SUBNORMAL>(high);
        if subnormal == 0 {
            // SAFETY: 32 bf16 values are 512 bits, as the integer vector.
            unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low)) }
        } else {
            // Word w is the upper (bf16) word of value w of the 32: word 2w + 1 of the two.
            let upper_words = _mm512_set_epi16(
                63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23,
                21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
            );
            let (low, high) = (_mm512_castps_si512(low), _mm512_castps_si512(high));
            _mm512_permutex2var_epi16(rounded(low), upper_words, rounded(high))
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
}

#[cfg(not(target_arch = "x86_64"))]
mod vector {
    use super::Runs;

    /// Never called: `super::super::supported` is false off x86_64.
    pub(super) unsafe fn pack_k_contiguous(
        _: &mut [u32],
        _: Runs,
        _: usize,
        _: usize,
        _: usize,
    ) -> usize {
        unreachable!("the bf16 GEMM needs AVX512_BF16")
    }

    /// Never called: `super::super::supported` is false off x86_64.
    pub(super) unsafe fn round_pairs(_: &[f32], _: &mut [u32]) -> usize {
        unreachable!("the bf16 GEMM needs AVX512_BF16")
    }

    /// Never called: `super::super::supported` is false off x86_64.
    pub(super) unsafe fn pack_side_by_side(
        _: (*mut u32, usize, usize),
        _: (Runs, usize),
        _: (usize, usize),
        _: std::ops::Range<usize>,
    ) {
        unreachable!("the bf16 GEMM needs AVX512_BF16")
    }
}
