//! The library calls of the kernel IR on the CPU: GEMMs through the `gemm` crate (threaded with
//! rayon), grouped expert GEMMs as one GEMM per expert over its gathered rows, the lookups, and
//! FP8 fake quantization through `crate::fp8`.

use fathom_compiler::graph::QuantFormat;
use fathom_compiler::kernel::{BufferId, Library, Program};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::{CpuError, Storage};
use crate::fp8::{ScaleRounding, fake_quantize};

pub(super) fn run(
    kernel: &str,
    call: &Library,
    program: &Program,
    buffers: &mut [Storage<'_>],
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
        } => {
            let batches: usize = batch.iter().product();
            let rank = batch.len();
            let mut coords = vec![0usize; rank];
            let mut result = buffers[out.buffer.index()].take_vec();
            let (lhs, rhs) = (&buffers[a.buffer.index()], &buffers[b.buffer.index()]);
            for _ in 0..batches {
                let offset = |strides: &[isize], base: usize| -> isize {
                    base as isize
                        + coords
                            .iter()
                            .zip(strides)
                            .map(|(&c, &s)| c as isize * s)
                            .sum::<isize>()
                };
                let (ao, bo, oo) = (
                    offset(&a.strides, a.offset),
                    offset(&b.strides, b.offset),
                    offset(&out.strides, out.offset),
                );
                // SAFETY: the offsets and strides come from views the lowering checked against
                // the buffers' shapes, so every element gemm touches is inside its slice; the
                // output is a buffer of its own (taken out of `buffers`), so it aliases neither
                // operand.
                unsafe {
                    gemm(
                        *m,
                        *n,
                        *k,
                        result.as_mut_ptr().offset(oo),
                        out.strides[rank + 1],
                        out.strides[rank],
                        false,
                        lhs.as_ptr().offset(ao),
                        a.strides[rank + 1],
                        a.strides[rank],
                        rhs.as_ptr().offset(bo),
                        b.strides[rank + 1],
                        b.strides[rank],
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::Rayon(0),
                    );
                }
                for d in (0..rank).rev() {
                    coords[d] += 1;
                    if coords[d] < batch[d] {
                        break;
                    }
                    coords[d] = 0;
                }
            }
            buffers[out.buffer.index()] = Storage::Owned(result);
        }
        Library::GroupedMatMul {
            x,
            weights,
            expert_ids,
            out,
        } => {
            let (xd, wd, idd) = (dims(x), dims(weights), dims(expert_ids));
            let (tokens, slots, x_slots) = (idd[0], idd[1], xd[1]);
            let (experts, n, k) = (wd[0], wd[1], wd[2]);
            let groups = group_by_expert(
                &buffers[expert_ids.index()],
                tokens * slots,
                experts,
                &index,
            )?;
            let mut result = reuse(buffers[out.index()].vec_mut(), tokens * slots * n);
            let (xs, ws) = (&buffers[x.index()], &buffers[weights.index()]);
            // One GEMM per expert, the experts spread over the threads (each GEMM is small and
            // runs on one); each expert's arithmetic is the same whatever the thread count.
            let products: Vec<(usize, Vec<f32>)> = groups
                .par_iter()
                .enumerate()
                .filter(|(_, m)| !m.is_empty())
                .map(|(e, members)| {
                    let rows = members.len();
                    let gathered = x_rows(xs, members, slots, x_slots, k);
                    let mut product = vec![0f32; rows * n];
                    // product [rows, n] = gathered [rows, k] · W_e^T, W_e stored [n, k].
                    // SAFETY: every pointer spans exactly the matrix its strides describe.
                    unsafe {
                        gemm(
                            rows,
                            n,
                            k,
                            product.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            gathered.as_ptr(),
                            1,
                            k as isize,
                            ws.as_ptr().add(e * n * k),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                    (e, product)
                })
                .collect();
            for (e, product) in products {
                for (r, &ts) in groups[e].iter().enumerate() {
                    result[ts * n..][..n].copy_from_slice(&product[r * n..][..n]);
                }
            }
            buffers[out.index()] = Storage::Owned(result);
        }
        Library::GroupedMatMulWeightGrad {
            cotangent,
            x,
            expert_ids,
            out,
        } => {
            let (xd, cd, idd, od) = (dims(x), dims(cotangent), dims(expert_ids), dims(out));
            let (tokens, slots, x_slots) = (idd[0], idd[1], xd[1]);
            let (experts, n, k) = (od[0], cd[2], xd[2]);
            let groups = group_by_expert(
                &buffers[expert_ids.index()],
                tokens * slots,
                experts,
                &index,
            )?;
            let mut result = reuse(buffers[out.index()].vec_mut(), experts * n * k);
            let (gs, xs) = (&buffers[cotangent.index()], &buffers[x.index()]);
            // Each expert writes its own n·k block: the experts spread over the threads.
            let blocks = result.par_chunks_mut((n * k).max(1)).zip(groups.par_iter());
            blocks
                .filter(|(_, members)| !members.is_empty())
                .for_each(|(block, members)| {
                    let rows = members.len();
                    let g: Vec<f32> = members
                        .iter()
                        .flat_map(|&ts| &gs[ts * n..][..n])
                        .copied()
                        .collect();
                    let xe = x_rows(xs, members, slots, x_slots, k);
                    // out_e [n, k] = g^T [n, rows] · xe [rows, k].
                    // SAFETY: as above; `block` is this expert's n·k values of `result`.
                    unsafe {
                        gemm(
                            n,
                            k,
                            rows,
                            block.as_mut_ptr(),
                            1,
                            k as isize,
                            false,
                            g.as_ptr(),
                            n as isize,
                            1,
                            xe.as_ptr(),
                            1,
                            k as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                });
            buffers[out.index()] = Storage::Owned(result);
        }
        Library::Gather {
            table,
            indices,
            out,
        } => {
            let td = dims(table);
            let rows = td[0];
            let width: usize = td[1..].iter().product();
            let mut result = emptied(buffers[out.index()].vec_mut());
            for &i in buffers[indices.index()].iter() {
                let r = index(i, rows)?;
                result.extend_from_slice(&buffers[table.index()][r * width..][..width]);
            }
            buffers[out.index()] = Storage::Owned(result);
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
            let mut result = reuse(buffers[out.index()].vec_mut(), rows * width);
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
            buffers[out.index()] = Storage::Owned(result);
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
            let mut result = emptied(buffers[out.index()].vec_mut());
            let (xs, is) = (&buffers[x.index()], &buffers[indices.index()]);
            for o in 0..outer {
                for j in 0..len {
                    for i in 0..inner {
                        let chosen = index(is[(o * len + j) * inner + i], x_len)?;
                        result.push(xs[(o * x_len + chosen) * inner + i]);
                    }
                }
            }
            buffers[out.index()] = Storage::Owned(result);
        }
        Library::TopK { k, x, out } => {
            let xd = dims(x);
            let last = *xd.last().expect("top-k of a tensor with axes");
            let mut result = emptied(buffers[out.index()].vec_mut());
            let mut order: Vec<usize> = Vec::with_capacity(last);
            for row in buffers[x.index()].chunks(last) {
                order.clear();
                order.extend(0..last);
                // Largest first; NaN above everything; ties to the lower index (stable sort).
                order.sort_by(|&i, &j| {
                    let (a, b) = (row[i], row[j]);
                    match (a.is_nan(), b.is_nan()) {
                        (true, true) => std::cmp::Ordering::Equal,
                        (true, false) => std::cmp::Ordering::Less,
                        (false, true) => std::cmp::Ordering::Greater,
                        _ => b.partial_cmp(&a).expect("not NaN"),
                    }
                });
                result.extend(order[..*k].iter().map(|&i| i as f32));
            }
            buffers[out.index()] = Storage::Owned(result);
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
            // Only a lowering bug (a zero tile side, which inference rejects, or a buffer of
            // the wrong length) makes this fail.
            let result = fake_quantize(
                &buffers[x.index()],
                &dims(x),
                *tile_rows,
                *tile_cols,
                rounding,
            )
            .unwrap_or_else(|e| panic!("kernel {kernel}: {e}"));
            buffers[out.index()] = Storage::Owned(result);
        }
        Library::OneHot {
            depth,
            indices,
            out,
        } => {
            let len = buffers[indices.index()].len() * depth;
            let mut result = reuse(buffers[out.index()].vec_mut(), len);
            for (p, &i) in buffers[indices.index()].iter().enumerate() {
                result[p * depth + index(i, *depth)?] = 1.0;
            }
            buffers[out.index()] = Storage::Owned(result);
        }
    }
    Ok(())
}

/// The `x` rows of the given token-slots (`t·slots + s`), contiguous: an `x` with one slot
/// serves every slot of its token.
fn x_rows(xs: &[f32], token_slots: &[usize], slots: usize, x_slots: usize, k: usize) -> Vec<f32> {
    let mut rows = Vec::with_capacity(token_slots.len() * k);
    for &ts in token_slots {
        let (t, s) = (ts / slots, ts % slots);
        let row = t * x_slots + if x_slots == 1 { 0 } else { s };
        rows.extend_from_slice(&xs[row * k..][..k]);
    }
    rows
}

/// Token-slot positions routed to each expert, in order.
fn group_by_expert(
    ids: &[f32],
    count: usize,
    experts: usize,
    index: &impl Fn(f32, usize) -> Result<usize, CpuError>,
) -> Result<Vec<Vec<usize>>, CpuError> {
    let mut groups = vec![Vec::new(); experts];
    for (ts, &id) in ids[..count].iter().enumerate() {
        groups[index(id, experts)?].push(ts);
    }
    Ok(groups)
}

/// The output buffer's storage, zeroed at `len` (its allocation is reused across runs, which
/// spares the page faults of fresh memory).
fn reuse(buffer: &mut Vec<f32>, len: usize) -> Vec<f32> {
    let mut v = std::mem::take(buffer);
    v.clear();
    v.resize(len, 0.0);
    v
}

/// The output buffer's storage, empty, keeping its allocation.
fn emptied(buffer: &mut Vec<f32>) -> Vec<f32> {
    let mut v = std::mem::take(buffer);
    v.clear();
    v
}
