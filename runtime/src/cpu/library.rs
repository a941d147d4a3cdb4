//! The library calls of the kernel IR on the CPU: GEMMs through the `gemm` crate (threaded with
//! rayon; bf16 operands on `super::bf16` where it pays), grouped expert GEMMs as one GEMM per
//! expert over its gathered rows, the lookups, FP8 fake quantization through `crate::fp8`, and
//! the sixteen-lane routines of the loss (`super::cross_entropy`), of softmaxes
//! (`super::softmax`) and of SwiGLU's gating (`super::swiglu`).

use fathom_compiler::DType;
use fathom_compiler::graph::QuantFormat;
use fathom_compiler::graph::{Accumulation, MatMulPart, Triangular};
use fathom_compiler::kernel::{
    BufferId, ExpertOutputs, ExpertWeights, Library, Program, View, grouped_rows,
};
use gemm::Parallelism;
use rayon::prelude::*;

use super::bf16::{Head, HeadResults};
use super::cross_entropy;
use super::grouped::{self, Routing};
use super::head;
use super::product::{Arithmetic, Operand, multiply};
use super::softmax::{self, RowStarts};
use super::swiglu;
use super::{CpuError, Lent, Storage};
use crate::fp8::{ScaleRounding, fake_quantize_in_place, fake_quantize_into};
use crate::parallel::ExpertExchange;

pub(super) fn run(
    kernel: &str,
    call: &Library,
    program: &Program,
    buffers: &mut [Storage<'_>],
    experts_exchange: Option<&dyn ExpertExchange>,
) -> Result<(), CpuError> {
    let dims = |b: &BufferId| program.buffer(*b).ty.dims().to_vec();
    let index = |value: f32, bound: usize| -> Result<usize, CpuError> {
        if value >= 0.0 && (value as usize) < bound && value.fract() == 0.0 {
            Ok(value as usize)
        } else {
            Err(CpuError::IndexOutOfRange {
                kernel: kernel.to_owned(),
                index: value,
                bound,
            })
        }
    };
    match call {
        Library::MatMul {
            batch,
            m,
            n,
            k,
            a,
            b,
            out,
            accumulation,
            // Operands that hold bf16 values, or that the product rounds to bf16 as it reads
            // them, run on the bf16 kernel where it pays (`super::bf16`), on the f32 GEMM
            // otherwise: the products are identical.
            exact_in,
            rounds,
            triangular,
        } => {
            // Taken out and put back as it is: the GEMM writes only the elements of `out`'s
            // view, which may be one region of a concatenation whose other regions other
            // kernels write. (The other calls write whole buffers of their own.)
            let mut result = buffers[out.buffer.index()].lend();
            let (lhs, rhs) = (&buffers[a.buffer.index()], &buffers[b.buffer.index()]);
            let operands = [(a, &lhs[..]), (b, &rhs[..])];
            batched_matmul(
                batch,
                (*m, *n, *k),
                operands,
                out,
                (arithmetic(*accumulation, *exact_in, *rounds), *triangular),
                &mut result,
            );
            buffers[out.buffer.index()] = result.restore();
        }
        Library::GroupedMatMul {
            x,
            weights,
            expert_ids,
            out,
            accumulation,
            exact_in,
            rounds,
            ..
        } => {
            let idd = dims(expert_ids);
            let (n, k) = (dims(out)[2], grouped_rows(&dims(x), idd[0]).1);
            // Stale values (not zeroed: zeroing 4 MB cost as much as a small kernel): every
            // token-slot's row is written by the expert it is routed to.
            let mut result = buffers[out.index()].lend();
            // Expert e's matrix and its (n, k) strides.
            let matrices: Vec<(&[f32], (isize, isize))> = match weights {
                ExpertWeights::Stacked(view) => {
                    let stacked = &buffers[view.buffer.index()][view.offset..];
                    let layout = (view.strides[1], view.strides[2]);
                    let experts = dims(&view.buffer)[0];
                    (0..experts)
                        .map(|e| (&stacked[e * n * k..][..n * k], layout))
                        .collect()
                }
                ExpertWeights::Parts(parts) => parts
                    .iter()
                    .map(|p| {
                        let part = &buffers[p.buffer.index()][p.offset..][..n * k];
                        (part, (p.strides[0], p.strides[1]))
                    })
                    .collect(),
            };
            let experts = matrices.len();
            let routing = route(
                &buffers[expert_ids.index()],
                &idd,
                &dims(x),
                experts,
                arithmetic(*accumulation, *exact_in, *rounds),
                &index,
            )?;
            grouped::matmul(
                &routing,
                &buffers[x.index()],
                &matrices,
                (n, k),
                experts_exchange,
                &mut result,
            )
            .map_err(|reason| exchange_failed(kernel, reason))?;
            buffers[out.index()] = result.restore();
        }
        Library::GroupedMatMulWeightGrad {
            cotangent,
            x,
            expert_ids,
            out,
            accumulation,
            exact_in,
            rounds,
            rounding,
        } => {
            let (xd, cd) = (dims(x), dims(cotangent));
            let (n, k) = (cd[2], grouped_rows(&xd, dims(expert_ids)[0]).1);
            // Stale values: every expert's block is written, zeros where no row was routed.
            let written = out.buffers();
            let mut results: Vec<Lent> =
                written.iter().map(|b| buffers[b.index()].lend()).collect();
            let mut blocks: Vec<&mut [f32]> = match out {
                ExpertOutputs::Stacked(_) => results[0].chunks_mut((n * k).max(1)).collect(),
                ExpertOutputs::Parts(_) => results.iter_mut().map(|r| &mut r[..]).collect(),
            };
            let ids = &buffers[expert_ids.index()];
            let experts = blocks.len();
            let arithmetic = arithmetic(*accumulation, *exact_in, *rounds);
            let routing = route(ids, &dims(expert_ids), &xd, experts, arithmetic, &index)?;
            let (gs, xs) = (&buffers[cotangent.index()], &buffers[x.index()]);
            grouped::weight_grad(
                &routing,
                gs,
                xs,
                (n, k),
                *rounding,
                experts_exchange,
                &mut blocks,
            )
            .map_err(|reason| exchange_failed(kernel, reason))?;
            for (buffer, result) in written.iter().zip(results) {
                buffers[buffer.index()] = result.restore();
            }
        }
        Library::Gather {
            table,
            indices,
            out,
        } => {
            let td = dims(table);
            let rows = td[0];
            let width: usize = td[1..].iter().product();
            let mut result = buffers[out.index()].lend();
            for (p, &i) in buffers[indices.index()].iter().enumerate() {
                let r = index(i, rows)?;
                result[p * width..][..width]
                    .copy_from_slice(&buffers[table.index()][r * width..][..width]);
            }
            buffers[out.index()] = result.restore();
        }
        Library::IndexAdd {
            values,
            indices,
            out,
        } => {
            // Rows are added in index order, in f32 (the interpreter's f64 sums differ by
            // rounding only).
            let width: usize = dims(out)[1..].iter().product();
            let rows = dims(out)[0];
            let mut result = zeroed(buffers[out.index()].lend());
            assert_eq!(
                result.len(),
                rows * width,
                "kernel {kernel}: index-add output"
            );
            let (vs, is) = (&buffers[values.index()], &buffers[indices.index()]);
            for (i, &id) in is.iter().enumerate() {
                let r = index(id, rows)?;
                for (s, &x) in result[r * width..][..width]
                    .iter_mut()
                    .zip(&vs[i * width..][..width])
                {
                    *s += x;
                }
            }
            buffers[out.index()] = result.restore();
        }
        Library::TakeAlong {
            axis,
            x,
            indices,
            out,
        } => {
            let (xd, id) = (dims(x), dims(indices));
            let outer: usize = xd[..*axis].iter().product();
            let inner: usize = xd[axis + 1..].iter().product();
            let (x_len, len) = (xd[*axis], id[*axis]);
            let mut result = buffers[out.index()].lend();
            let (xs, is) = (&buffers[x.index()], &buffers[indices.index()]);
            for o in 0..outer {
                for j in 0..len {
                    for i in 0..inner {
                        let p = (o * len + j) * inner + i;
                        let chosen = index(is[p], x_len)?;
                        result[p] = xs[(o * x_len + chosen) * inner + i];
                    }
                }
            }
            buffers[out.index()] = result.restore();
        }
        Library::TopK { k, x, out } => {
            let xd = dims(x);
            let last = *xd.last().expect("top-k of a tensor with axes");
            assert!(*k <= last, "top-{k} of rows of {last}");
            let rows = buffers[x.index()].len() / last.max(1);
            let mut result = buffers[out.index()].lend();
            assert_eq!(result.len(), rows * k, "kernel {kernel}: top-{k} output");
            // Rows are independent: a few hundred per job on the threads.
            result
                .par_chunks_mut(*k)
                .zip(buffers[x.index()].par_chunks(last))
                .with_min_len(256)
                .for_each_init(Vec::new, |kept, (positions, row)| {
                    top_k_positions(row, *k, kept);
                    for (to, &from) in positions.iter_mut().zip(kept.iter()) {
                        *to = from as f32;
                    }
                });
            buffers[out.index()] = result.restore();
        }
        Library::QuantizeDequantize {
            format: QuantFormat::E4M3,
            tile_rows,
            tile_cols,
            pow2_scales,
            x,
            out,
        } => {
            let rounding = if *pow2_scales {
                ScaleRounding::PowerOfTwo
            } else {
                ScaleRounding::Exact
            };
            // Into the output's storage (no allocation), or in place when the memory plan gave
            // the two one buffer. Only a lowering bug (a zero tile side, which inference
            // rejects, or a buffer of the wrong length) makes this fail.
            let mut result = buffers[out.index()].lend();
            let tiles = (*tile_rows, *tile_cols);
            // Tiled in the output's shape: `x` may hold the same elements in another (a
            // reshape the lowering did not copy).
            let shape = dims(out);
            let done = if x == out {
                fake_quantize_in_place(&mut result, &shape, tiles.0, tiles.1, rounding)
            } else {
                let source = &buffers[x.index()];
                fake_quantize_into(source, &shape, tiles.0, tiles.1, rounding, &mut result)
            };
            done.unwrap_or_else(|e| panic!("kernel {kernel}: {e}"));
            buffers[out.index()] = result.restore();
        }
        Library::OneHot {
            depth,
            indices,
            out,
        } => {
            let len = buffers[indices.index()].len() * depth;
            let mut result = zeroed(buffers[out.index()].lend());
            assert_eq!(result.len(), len, "kernel {kernel}: one-hot output");
            for (p, &i) in buffers[indices.index()].iter().enumerate() {
                result[p * depth + index(i, *depth)?] = 1.0;
            }
            buffers[out.index()] = result.restore();
        }
        Library::CrossEntropy {
            logits,
            labels,
            loss,
            kept,
        } => {
            let vocab = *dims(logits).last().expect("logits have a vocabulary axis");
            let mut losses = buffers[loss.index()].lend();
            // Each kept buffer with its id, to be put back.
            let mut kept_values = kept.map(|ids| {
                let e = buffers[ids.exponentials.index()].lend();
                (ids, e, buffers[ids.sums.index()].lend())
            });
            let (xs, ls) = (&buffers[logits.index()], &buffers[labels.index()]);
            let rows = kept_values
                .as_mut()
                .map(|(_, e, s)| (&mut e[..], &mut s[..]));
            cross_entropy::forward(xs, ls, vocab, &mut losses, rows);
            buffers[loss.index()] = losses.restore();
            if let Some((ids, e, s)) = kept_values {
                buffers[ids.exponentials.index()] = e.restore();
                buffers[ids.sums.index()] = s.restore();
            }
        }
        Library::CrossEntropyGrad {
            kept,
            labels,
            cotangent,
            out,
        } => {
            let vocab = *dims(out).last().expect("logits have a vocabulary axis");
            let mut result = buffers[out.index()].lend();
            let kept_values = (
                &buffers[kept.exponentials.index()][..],
                &buffers[kept.sums.index()][..],
            );
            let (ls, gs) = (&buffers[labels.index()], &buffers[cotangent.index()]);
            cross_entropy::gradient(kept_values, ls, gs, vocab, &mut result);
            buffers[out.index()] = result.restore();
        }
        Library::Softmax {
            domain,
            scores,
            exponentials,
            sums,
            out,
        } => {
            let (&n, outer) = domain.split_last().expect("a softmax has a row axis");
            let (mut e, mut result) = (
                buffers[exponentials.buffer.index()].lend(),
                buffers[out.buffer.index()].lend(),
            );
            let mut row_sums = sums.as_ref().map(|v| buffers[v.buffer.index()].lend());
            let read: &[Storage<'_>] = buffers;
            let rows = softmax::ScoreRows::of(scores, outer, |v| &read[v.buffer.index()]);
            softmax::forward(&rows, n, &mut e, &mut result, row_sums.as_deref_mut());
            buffers[exponentials.buffer.index()] = e.restore();
            buffers[out.buffer.index()] = result.restore();
            if let (Some(view), Some(values)) = (sums, row_sums) {
                buffers[view.buffer.index()] = values.restore();
            }
        }
        Library::SoftmaxGrad {
            domain,
            cotangent,
            probabilities,
            sums,
            exponentials,
            mask,
            scale,
            out,
        } => {
            let (&n, outer) = domain.split_last().expect("a softmax has a row axis");
            let mut result = buffers[out.buffer.index()].lend();
            let read: &[Storage<'_>] = buffers;
            let rows_of = |v| rows_of(read, v, outer);
            let rows = softmax::GradientRows {
                cotangent: rows_of(cotangent),
                probabilities: rows_of(probabilities),
                sums: rows_of(sums),
                exponentials: rows_of(exponentials),
                mask: mask.as_ref().map(rows_of),
                scale: scale.map(|c| c as f32),
            };
            softmax::gradient(&rows, n, &mut result);
            buffers[out.buffer.index()] = result.restore();
        }
        Library::LinearCrossEntropy {
            hidden,
            weight,
            labels,
            cotangent,
            loss,
            hidden_grad,
            weight_grad,
            accumulation,
            exact_in,
            rounds,
        } => {
            let width = *dims(hidden).last().expect("hidden states have a width");
            let vocab = program.buffer(*weight).ty.numel() / width.max(1);
            let [mut losses, mut dh, mut dw] =
                [loss, hidden_grad, weight_grad].map(|b| buffers[b.index()].lend());
            let head = Head {
                hidden: &buffers[hidden.index()],
                weight: &buffers[weight.index()],
                labels: &buffers[labels.index()],
                cotangent: &buffers[cotangent.index()],
            };
            let results = HeadResults {
                loss: &mut losses,
                hidden_grad: &mut dh,
                weight_grad: &mut dw,
            };
            let arithmetic = arithmetic(*accumulation, *exact_in, *rounds);
            head::linear_cross_entropy(head, (width, vocab), arithmetic, results);
            buffers[loss.index()] = losses.restore();
            buffers[hidden_grad.index()] = dh.restore();
            buffers[weight_grad.index()] = dw.restore();
        }
        Library::CausalAttention { .. } | Library::CausalAttentionGrad { .. } => {
            return Err(CpuError::Unsupported {
                kernel: kernel.to_owned(),
                reason: "the CPU runs attention as the primitives it is made of; lower without \
                         `LowerOptions::attention_calls`"
                    .into(),
            });
        }
        Library::Swiglu {
            domain,
            gate,
            up,
            sigmoid,
            silu,
            out,
        } => {
            let (&n, outer) = domain.split_last().expect("a gating has a row axis");
            let [mut s, mut a, mut result] =
                [sigmoid, silu, out].map(|v| buffers[v.buffer.index()].lend());
            let read: &[Storage<'_>] = buffers;
            let rows = swiglu::GatingRows {
                gate: rows_of(read, gate, outer),
                up: rows_of(read, up, outer),
            };
            swiglu::forward(&rows, n, (&mut s, &mut a, &mut result));
            buffers[sigmoid.buffer.index()] = s.restore();
            buffers[silu.buffer.index()] = a.restore();
            buffers[out.buffer.index()] = result.restore();
        }
    }
    Ok(())
}

/// A view's buffer and where its rows start, over a domain whose outer axes are `outer`.
fn rows_of<'a>(
    buffers: &'a [Storage<'_>],
    view: &'a View,
    outer: &'a [usize],
) -> (&'a [f32], RowStarts<'a>) {
    (&buffers[view.buffer.index()], RowStarts::new(view, outer))
}

/// A batch of at least `MANY_GEMMS` GEMMs of fewer than `SMALL_GEMM` multiply-adds each
/// (attention's per-head products) runs one GEMM per thread, rather than each GEMM split
/// across the threads, whose hand-offs cost as much as such a GEMM computes and leave threads
/// idle at its edges. Decided by shape alone, so results do not depend on the thread count.
const MANY_GEMMS: usize = 4;
const SMALL_GEMM: usize = 1 << 27;
/// A single GEMM with fewer rows than this (a weight gradient: rows are output features, K the
/// tokens) runs as `SPLIT_COLUMNS`-wide column blocks, one single-threaded GEMM each, spread
/// over the threads: the gemm crate's own threading splits such a product poorly. Measured side
/// by side on 2 threads (GFLOP/s, whole with the crate's threads → 64-column blocks):
/// m704 n256 k1024 240 → 277, m256 n256 k1024 164 → 227, m64 n256 k1024 64 → 125, m16 n256
/// k1024 19 → 48; with 1024 rows and more the crate's threading was as fast or faster (m1024
/// n4096 k256 301 vs 287). The blocks depend on the shape alone, so results do not depend on
/// the thread count. Not on the bf16 kernel (`super::bf16`), whose own tasks (row panels by
/// one column panel) spread such a product after packing each operand once: in blocks, every
/// block packed all of `lhs` (a 256 × 704 weight gradient's eleven times).
const SPLIT_COLUMNS_BELOW_ROWS: usize = 1024;
const SPLIT_COLUMNS: usize = 64;

/// `out[b] = a[b] · rhs[b]` for every batch index (see [`Library::MatMul`]).
fn batched_matmul(
    batch: &[usize],
    (m, n, k): (usize, usize, usize),
    [(a, lhs), (b, rhs)]: [(&View, &[f32]); 2],
    out: &View,
    (arithmetic, triangular): (Arithmetic, Option<Triangular>),
    result: &mut [f32],
) {
    // Batch axes over which only `rhs` is shared (a Linear's weight, broadcast over the batch
    // and sequence axes) and whose `a` and `out` matrices follow each other row after row are
    // one GEMM with more rows: for the gemm crate, one 1024-row product runs 1.05–1.4× faster
    // than four 256-row ones (measured side by side at the small model's shapes). Not so for a
    // triangular product, whose triangles are per matrix.
    let rows_axis = batch.len();
    let (kept, m) = match triangular {
        None => fold_into_rows(batch, m, [a, b, out], rows_axis),
        Some(_) => (batch.len(), m),
    };
    let batch = &batch[..kept];
    let rank = batch.len();
    let batches: usize = batch.iter().product();
    // The element offsets of every batch's three matrices, batch indices row-major.
    let mut offsets = Vec::with_capacity(batches);
    let mut coords = vec![0usize; rank];
    for _ in 0..batches {
        let at = |view: &View| -> isize {
            view.offset as isize
                + coords
                    .iter()
                    .zip(&view.strides)
                    .map(|(&c, &s)| c as isize * s)
                    .sum::<isize>()
        };
        offsets.push((at(a), at(b), at(out)));
        for d in (0..rank).rev() {
            coords[d] += 1;
            if coords[d] < batch[d] {
                break;
            }
            coords[d] = 0;
        }
    }
    let out_ptr = SharedOutput(result.as_mut_ptr());
    if let Some(triangular) = triangular {
        // A matrix's (column, row) strides.
        let strides = |view: &View| (view.strides[rows_axis + 1], view.strides[rows_axis]);
        triangular_matmul(
            &offsets,
            (m, n, k),
            [(strides(a), lhs), (strides(b), rhs)],
            (strides(out), out_ptr),
            (arithmetic, triangular),
        );
        return;
    }
    // Columns `first..first + width` of one batch index's product.
    let one = |&(ao, bo, oo): &(isize, isize, isize),
               (first, width): (usize, usize),
               parallelism: Parallelism| {
        let (out_columns, b_columns) = (out.strides[rows_axis + 1], b.strides[rows_axis + 1]);
        // SAFETY: the offsets and strides come from views the lowering checked against the
        // buffers' shapes, so every element gemm touches is inside its slice (columns `first..
        // first + width` of at most n); the output's buffer is taken out of `buffers` and is
        // neither operand's (the lowering never has a matmul read the buffer it writes, also
        // when it writes a region of a concatenation), and distinct batch indices or column
        // blocks write disjoint parts of it.
        unsafe {
            multiply(
                (m, width, k),
                (
                    out_ptr.at(oo + first as isize * out_columns),
                    out_columns,
                    out.strides[rows_axis],
                ),
                (
                    lhs.as_ptr().offset(ao),
                    a.strides[rows_axis + 1],
                    a.strides[rows_axis],
                ),
                (
                    rhs.as_ptr().offset(bo + first as isize * b_columns),
                    b_columns,
                    b.strides[rows_axis],
                ),
                arithmetic,
                parallelism,
            );
        }
    };
    if batches >= MANY_GEMMS && m * n * k < SMALL_GEMM {
        offsets
            .par_iter()
            .for_each(|offsets| one(offsets, (0, n), Parallelism::None));
    } else if m < SPLIT_COLUMNS_BELOW_ROWS && n > SPLIT_COLUMNS && !arithmetic.on_bf16_kernel() {
        let blocks = n.div_ceil(SPLIT_COLUMNS);
        for offsets in &offsets {
            (0..blocks).into_par_iter().for_each(|block| {
                let first = block * SPLIT_COLUMNS;
                let columns = (first, SPLIT_COLUMNS.min(n - first));
                one(offsets, columns, Parallelism::None)
            });
        }
    } else {
        for offsets in &offsets {
            one(offsets, (0, n), Parallelism::Rayon(0));
        }
    }
}

/// A batched triangular product (see `super::triangular`): every row block of every batch
/// index is one single-threaded GEMM, spread over the threads. A right triangle is computed as
/// the left one of the transposed product, `outᵀ = T(b)ᵀ·aᵀ`.
fn triangular_matmul(
    offsets: &[(isize, isize, isize)],
    (m, n, k): (usize, usize, usize),
    [(a_strides, lhs), (b_strides, rhs)]: [((isize, isize), &[f32]); 2],
    (out_strides, out_ptr): ((isize, isize), SharedOutput),
    (arithmetic, triangular): (Arithmetic, Triangular),
) {
    // Cᵀ = Bᵀ·Aᵀ: for a right triangle the operands trade places, each read transposed.
    let transposed = triangular.part == MatMulPart::Right;
    let (t, m, n) = match transposed {
        true => (triangular.transposed(), n, m),
        false => (triangular, m, n),
    };
    let blocks = super::triangular::blocks(m, t.part, arithmetic);
    (0..offsets.len() * blocks).into_par_iter().for_each(|job| {
        let (ao, bo, oo) = offsets[job / blocks];
        // SAFETY: as in `batched_matmul`: offsets and strides from views the lowering checked,
        // the output neither operand's; different jobs write different row blocks or batch
        // indices of it.
        unsafe {
            let a = (lhs.as_ptr().offset(ao), a_strides.0, a_strides.1);
            let b = (rhs.as_ptr().offset(bo), b_strides.0, b_strides.1);
            let out = (out_ptr.at(oo), out_strides.0, out_strides.1);
            let (left, right, out) = match transposed {
                true => (transpose(b), transpose(a), transpose(out)),
                false => (a, b, out),
            };
            super::triangular::row_block(
                job % blocks,
                (m, n, k),
                out,
                left,
                right,
                (t.part, t.triangle),
                arithmetic,
            );
        }
    });
}

/// The same matrix read transposed: its column and row strides swapped.
fn transpose<P>((first, col, row): Operand<P>) -> Operand<P> {
    (first, row, col)
}

/// How many leading batch axes remain after folding trailing ones into the rows, and the rows
/// per GEMM then: a trailing batch axis folds when `rhs` does not move along it (stride 0) and
/// both `a` and `out` move along it by exactly their current rows' extent (the next batch's
/// first row follows the last row), so the GEMMs along it are one GEMM of the stacked rows.
fn fold_into_rows(
    batch: &[usize],
    mut m: usize,
    [a, b, out]: [&View; 3],
    rows_axis: usize,
) -> (usize, usize) {
    let mut kept = batch.len();
    while kept > 0 {
        let axis = kept - 1;
        let follows = |v: &View| v.strides[axis] == m as isize * v.strides[rows_axis];
        if b.strides[axis] != 0 || !follows(a) || !follows(out) {
            break;
        }
        m *= batch[axis];
        kept -= 1;
    }
    (kept, m)
}

/// The output of a batched GEMM, written by several threads at disjoint offsets.
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);

// SAFETY: each thread writes only the elements of its own batch index or column block (see
// `batched_matmul`).
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// # Safety
    /// `offset` must lie inside the output buffer.
    unsafe fn at(self, offset: isize) -> *mut f32 {
        // SAFETY: the caller's promise.
        unsafe { self.0.offset(offset) }
    }
}

/// Into `kept`, the positions of the `k` largest values of `row`, largest first: NaN above
/// every number, ties to the lower position (the order a stable sort, largest first, gives).
/// Each value is inserted among the `k` kept so far, `len · k` comparisons rather than a sort of
/// the whole row (the routers' top-k of 16 to 256 experts keeps 2 to 8).
fn top_k_positions(row: &[f32], k: usize, kept: &mut Vec<usize>) {
    /// Whether `a` goes before `b`.
    fn beats(a: f32, b: f32) -> bool {
        match (a.is_nan(), b.is_nan()) {
            (true, false) => true,
            (_, true) => false,
            _ => a > b,
        }
    }
    kept.clear();
    for (i, &value) in row.iter().enumerate() {
        let at = kept
            .iter()
            .position(|&j| beats(value, row[j]))
            .unwrap_or(kept.len());
        if at < k {
            if kept.len() == k {
                kept.pop();
            }
            kept.insert(at, i);
        }
    }
}

/// The token-slot positions routed to each expert, in order, from `ids` `[tokens, slots]`; `x`
/// is `[tokens, slots or 1, k]`.
fn route(
    ids: &[f32],
    id_dims: &[usize],
    x_dims: &[usize],
    experts: usize,
    arithmetic: Arithmetic,
    index: &impl Fn(f32, usize) -> Result<usize, CpuError>,
) -> Result<Routing, CpuError> {
    let (tokens, slots) = (id_dims[0], id_dims[1]);
    let (x_slots, _) = grouped_rows(x_dims, tokens);
    let mut groups = vec![Vec::new(); experts];
    for (ts, &id) in ids[..tokens * slots].iter().enumerate() {
        groups[index(id, experts)?].push(ts);
    }
    Ok(Routing {
        groups,
        slots,
        x_slots,
        arithmetic,
    })
}

fn arithmetic(accumulation: Accumulation, exact_in: Option<DType>, rounds: bool) -> Arithmetic {
    Arithmetic {
        accumulation,
        exact_in,
        rounds,
    }
}

fn exchange_failed(kernel: &str, reason: String) -> CpuError {
    CpuError::Exchange {
        kernel: kernel.to_owned(),
        reason,
    }
}

/// An output's storage with its values zeroed, for the kernels that add or set only some.
fn zeroed(mut lent: Lent) -> Lent {
    lent.fill(0.0);
    lent
}

#[cfg(test)]
mod tests {
    use super::{
        Arithmetic, SPLIT_COLUMNS, SPLIT_COLUMNS_BELOW_ROWS, batched_matmul, fold_into_rows,
        top_k_positions,
    };
    use fathom_compiler::DType;
    use fathom_compiler::graph::{Accumulation, MatMulPart, Triangle, Triangular};
    use fathom_compiler::kernel::{BufferId, View};

    fn view(strides: &[isize]) -> View {
        View {
            buffer: BufferId(0),
            offset: 0,
            strides: strides.to_vec(),
        }
    }

    /// `batched_matmul` on a pool of `threads` threads, into `len` values prefilled with NaN
    /// (stale storage: every element must be written).
    fn product_on(
        threads: usize,
        (batch, shape): (&[usize], (usize, usize, usize)),
        operands: [(&View, &[f32]); 2],
        out: &View,
        arithmetic: (Arithmetic, Option<Triangular>),
        len: usize,
    ) -> Vec<f32> {
        let mut result = vec![f32::NAN; len];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| batched_matmul(batch, shape, operands, out, arithmetic, &mut result));
        result
    }

    #[test]
    fn batches_sharing_only_the_rhs_fold_into_rows() {
        // A Linear: x [2, 3, 5, k=4] · w [4, 6] broadcast, out [2, 3, 5, 6]: one 30-row GEMM.
        let (a, w, out) = (
            view(&[60, 20, 4, 1]),
            view(&[0, 0, 6, 1]),
            view(&[90, 30, 6, 1]),
        );
        assert_eq!(fold_into_rows(&[2, 3], 5, [&a, &w, &out], 2), (0, 30));
        // A transposed rhs folds too (only its batch strides matter).
        let wt = view(&[0, 0, 1, 4]);
        assert_eq!(fold_into_rows(&[2, 3], 5, [&a, &wt, &out], 2), (0, 30));
        // The rhs moves along the last batch axis (attention's per-head products): none.
        let per_head = view(&[0, 24, 6, 1]);
        assert_eq!(fold_into_rows(&[2, 3], 5, [&a, &per_head, &out], 2), (2, 5));
        // ... or only along the first: the last folds, the first stays.
        let per_batch = view(&[24, 0, 6, 1]);
        assert_eq!(
            fold_into_rows(&[2, 3], 5, [&a, &per_batch, &out], 2),
            (1, 15)
        );
        // The output's batches do not follow row after row (written in a permuted order).
        let permuted = view(&[90, 6, 18, 1]);
        assert_eq!(fold_into_rows(&[2, 3], 5, [&a, &w, &permuted], 2), (2, 5));
        // No batch axes: nothing to fold.
        assert_eq!(
            fold_into_rows(&[], 5, [&view(&[4, 1]), &view(&[6, 1]), &view(&[6, 1])], 0),
            (0, 5)
        );
    }

    /// A weight gradient's shape (few rows, a long K) runs in column blocks, the last one
    /// partial; written into a column-major output (the transposed product), read from a
    /// transposed lhs: every element is the product's, and the result is the same on one
    /// thread as on several.
    #[test]
    fn short_products_in_column_blocks_match_the_definition() {
        let (m, n, k) = (37, 2 * SPLIT_COLUMNS + 9, 50);
        assert!(m < SPLIT_COLUMNS_BELOW_ROWS);
        let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let rhs: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
            .collect();
        // lhs stored [k, m] (read transposed), rhs [k, n], out stored [n, m] (column-major).
        let (a, b, out) = (
            view(&[1, m as isize]),
            view(&[n as isize, 1]),
            view(&[1, m as isize]),
        );
        let run = |threads: usize| {
            let operands = [(&a, &lhs[..]), (&b, &rhs[..])];
            let exact = (Accumulation::default().into(), None);
            product_on(threads, (&[], (m, n, k)), operands, &out, exact, m * n)
        };
        let result = run(2);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| f64::from(lhs[p * m + i]) * f64::from(rhs[p * n + j]))
                    .sum();
                // Small integers and halves: every partial sum is exact in f32.
                assert_eq!(f64::from(result[j * m + i]), want, "({i}, {j})");
            }
        }
        assert_eq!(run(1), result);
    }

    /// Triangular products, every part and triangle, against the definition (the operand's
    /// elements outside the triangle taken as zeros, the result's written as zeros): two batch
    /// indices, shapes that are not square and not whole blocks, a transposed lhs, an output
    /// prefilled with NaN; one thread gives what two give. The values are bf16 values, and the
    /// products marked as such run on the bf16 kernel where this CPU uses it.
    #[test]
    fn triangular_products_match_the_definition() {
        let batches = 2;
        for (m, n, k) in [(70, 45, 150), (150, 130, 70), (33, 200, 33)] {
            let lhs: Vec<f32> = (0..batches * m * k)
                .map(|i| ((i * 7) % 13) as f32 - 6.0)
                .collect();
            let rhs: Vec<f32> = (0..batches * k * n)
                .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
                .collect();
            // lhs stored [batch, k, m] (read transposed), rhs [batch, k, n], out [batch, m, n].
            let a = view(&[(m * k) as isize, 1, m as isize]);
            let b = view(&[(k * n) as isize, n as isize, 1]);
            let out = view(&[(m * n) as isize, n as isize, 1]);
            let parts = [MatMulPart::Left, MatMulPart::Right, MatMulPart::Output];
            let triangles = [Triangle::Lower, Triangle::Upper];
            for exact_in in [None, Some(DType::BF16)] {
                for (part, triangle) in parts.into_iter().flat_map(|p| triangles.map(|t| (p, t))) {
                    let t = Triangular::new(part, triangle);
                    let run = |threads: usize| {
                        let operands = [(&a, &lhs[..]), (&b, &rhs[..])];
                        let shape = (&[batches][..], (m, n, k));
                        let len = batches * m * n;
                        let accumulation = Accumulation::default();
                        let arithmetic = Arithmetic {
                            accumulation,
                            exact_in,
                            rounds: false,
                        };
                        let arithmetic = (arithmetic, Some(t));
                        product_on(threads, shape, operands, &out, arithmetic, len)
                    };
                    let result = run(2);
                    let keeps =
                        |p: MatMulPart, r: usize, c: usize| part != p || triangle.keeps(r, c);
                    for (e, i, j) in (0..batches)
                        .flat_map(|e| (0..m).flat_map(move |i| (0..n).map(move |j| (e, i, j))))
                    {
                        let want: f64 = match keeps(MatMulPart::Output, i, j) {
                            false => 0.0,
                            true => (0..k)
                                .filter(|&p| keeps(MatMulPart::Left, i, p))
                                .filter(|&p| keeps(MatMulPart::Right, p, j))
                                .map(|p| {
                                    f64::from(lhs[e * m * k + p * m + i])
                                        * f64::from(rhs[e * k * n + p * n + j])
                                })
                                .sum(),
                        };
                        // Small integers and halves: every partial sum is exact in f32.
                        let got = result[e * m * n + i * n + j];
                        let at = format!("{m}x{n}x{k} {t} {exact_in:?}: [{e}, {i}, {j}]");
                        assert_eq!(f64::from(got), want, "{at}");
                    }
                    assert_eq!(run(1), result, "{t}");
                }
            }
        }
    }

    /// The selection gives the first k positions of a stable sort, largest first with NaN
    /// above everything, on rows full of ties, NaNs and signed zeros.
    #[test]
    fn top_k_is_the_head_of_a_stable_descending_sort() {
        let pool = [
            f32::NAN,
            1.0,
            -1.0,
            0.0,
            -0.0,
            2.5,
            2.5,
            f32::NEG_INFINITY,
            7.0,
        ];
        let mut state = 1u64;
        let mut kept = Vec::new();
        for len in [1, 2, 5, 16, 33] {
            for _ in 0..200 {
                let row: Vec<f32> = (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        pool[(state >> 33) as usize % pool.len()]
                    })
                    .collect();
                let mut order: Vec<usize> = (0..len).collect();
                order.sort_by(|&i, &j| match (row[i].is_nan(), row[j].is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Less,
                    (false, true) => std::cmp::Ordering::Greater,
                    _ => row[j].partial_cmp(&row[i]).unwrap(),
                });
                for k in 1..=len.min(8) {
                    top_k_positions(&row, k, &mut kept);
                    assert_eq!(kept, order[..k], "top-{k} of {row:?}");
                }
            }
        }
    }
}
