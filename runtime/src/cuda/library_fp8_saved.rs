//! Saved FP8 activations kept as E4M3 codes (DeepSeek-V3 caches the inputs of its FP8 linears
//! in FP8 for the backward pass). The precision pass rounds such an input in 1×128 tiles; the
//! backward reads the rounded values again, re-tiled (the weight gradient's 128×1 tiles of xᵀ).
//! Run as written, the rounding writes f32 values that live from the forward to the backward,
//! and every reader quantises them again.
//!
//! When only FP8 quantisations read a 1×128 rounding's output (no loop nest, no f32 GEMM, no
//! program output), its call instead quantises its source once, into the output buffer's own
//! storage: codes `[rows][round_up(cols, 16)]` from byte 0, scales `[ceil(cols/128)]
//! [round_up(rows, 4)]` from the next multiple of 256 (what `quantize_1x128` writes). Then:
//! - a reader's `quantize` making those same codes (1×128, same rows and scale rounding) is
//!   dropped, and its GEMM reads the kept codes and scales where they lie;
//! - any other reader's `quantize` reads them as [`QuantizeInput::E4m3Tiles`]: each element
//!   its code times its scale rounded once to f32, which is bit for bit the value the rounding
//!   would have written (`fake_quantize_e4m3` computes it so), so every product is unchanged.
//!
//! The buffer then needs only the codes' and scales' bytes ([`KeptCodes::bytes`]), a little
//! over a quarter of its f32 values (`LibraryPlan::memory_plan` sizes it so).

use std::collections::HashSet;

use fathom_compiler::kernel::{BufferId, BufferRole, KernelBody, Library, Program};
use fathom_kernels::{QuantizeInput, QuantizeKind, QuantizeParams};

use super::library::{LibraryCall, LibraryKernel, LibraryStep, Place, StepArg};
use super::library_fp8::REGION_ALIGN;
use super::library_fp8_sharing::Written;
use super::library_fp8_weight_codes::FromWeights;

/// A rounding's output holding its E4M3 codes and scales instead of its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptCodes {
    pub buffer: BufferId,
    /// Its values as `[rows][cols]` (1×128 tiles along `cols`).
    pub rows: usize,
    pub cols: usize,
    /// Where the scales start in the buffer.
    pub scales_at: usize,
    /// Bytes of codes and scales (the buffer's storage needs no more).
    pub bytes: usize,
}

/// A call reading codes another call keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodesRead {
    /// The position of the rounding that keeps them, and its name.
    pub from: usize,
    pub from_name: String,
    pub buffer: BufferId,
    /// Whether the call's own `quantize` of them was dropped (it reads the codes in its GEMM).
    pub dropped_quantize: bool,
}

/// Keeps every eligible rounding of an activation as codes (see the module docs). Weights and
/// what is computed from them alone are left to `library_fp8_weight_codes`.
pub(crate) fn keep_roundings_as_codes(
    program: &Program,
    weights: &FromWeights,
    calls: &mut [Option<LibraryCall>],
) {
    for position in 0..program.kernels.len() {
        let KernelBody::Library(Library::QuantizeDequantize { x, .. }) =
            &program.kernels[position].body
        else {
            continue;
        };
        if program.buffer(*x).role.is_fed_weight() || weights.holds_weights(*x) {
            continue;
        }
        let Some(kept) = eligible(program, calls, position) else {
            continue;
        };
        keep(program, calls, position, kept);
    }
}

/// The codes a rounding at `position` may keep: a launched 1×128 E4M3 rounding of a whole
/// temporary (no output, no window into it) with room for the codes and scales, whose every
/// reader is a `quantize` of the whole output in its shape.
fn eligible(
    program: &Program,
    calls: &[Option<LibraryCall>],
    position: usize,
) -> Option<KeptCodes> {
    let KernelBody::Library(Library::QuantizeDequantize {
        tile_rows: 1,
        tile_cols: 128,
        out,
        ..
    }) = &program.kernels[position].body
    else {
        return None;
    };
    let out = *out;
    let call = calls[position].as_ref()?;
    let [step] = call.steps.as_slice() else {
        return None;
    };
    if !matches!(step.kernel, LibraryKernel::FakeQuantize(_))
        || !matches!(program.buffer(out).role, BufferRole::Temporary)
        || program
            .outputs
            .iter()
            .any(|(_, b)| program.holder(*b).0 == out)
    {
        return None;
    }
    let numel = program.buffer(out).ty.numel();
    let cols = *program.buffer(out).ty.dims().last()?;
    let rows = numel / cols;
    let tiles = QuantizeParams {
        kind: QuantizeKind::Tile1x128,
        input: QuantizeInput::F32,
        pow2_scales: false,
    };
    let (code_rows, code_cols) = tiles.codes_shape(rows, cols);
    let scales_at = (code_rows * code_cols).next_multiple_of(REGION_ALIGN);
    let bytes = scales_at + 4 * cols.div_ceil(128) * rows.next_multiple_of(4);
    if bytes > 4 * numel {
        return None;
    }
    // No loop nest reads it, and every step naming it (in any call but its rounding) is a
    // `quantize` reading it whole as `[rows][cols]`.
    let loop_reads = (program.kernels.iter()).any(|k| {
        !matches!(k.body, KernelBody::Library(_)) && k.reads_and_writes().0.contains(&out)
    });
    if loop_reads {
        return None;
    }
    let readers = (calls.iter().enumerate())
        .filter(|(j, _)| *j != position)
        .flat_map(|(_, c)| c.iter().flat_map(|c| &c.steps));
    for step in readers {
        if step.args.iter().any(|a| a.buffer() == Some(out)) && !reads_whole(step, out, rows, cols)
        {
            return None;
        }
    }
    Some(KeptCodes {
        buffer: out,
        rows,
        cols,
        scales_at,
        bytes,
    })
}

/// Whether `step` is an f32 activation `quantize` whose only use of `buffer` is reading it
/// whole as `[rows][cols]` (a gathered kind: rows of it).
pub(crate) fn reads_whole(step: &LibraryStep, buffer: BufferId, rows: usize, cols: usize) -> bool {
    let LibraryKernel::Quantize(params) = step.kernel else {
        return false;
    };
    let named = step.named_args();
    let int = |name: &str| match named.get(name) {
        Some(StepArg::I32(v)) => usize::try_from(*v).ok(),
        _ => None,
    };
    let names_buffer_once = (step.args.iter())
        .filter(|a| a.buffer() == Some(buffer))
        .count()
        == 1;
    params.input == QuantizeInput::F32
        && !matches!(params.kind, QuantizeKind::Block128x128 { .. })
        && named.get("x") == Some(&StepArg::Buffer(buffer, 0))
        && names_buffer_once
        && int("cols") == Some(cols)
        && (params.kind.gathers() || int("rows") == Some(rows))
}

/// Makes the rounding at `position` keep `kept`, and its readers read it.
fn keep(program: &Program, calls: &mut [Option<LibraryCall>], position: usize, kept: KeptCodes) {
    let KernelBody::Library(Library::QuantizeDequantize { x, pow2_scales, .. }) =
        &program.kernels[position].body
    else {
        return;
    };
    let out = kept.buffer;
    let tiles = QuantizeParams {
        kind: QuantizeKind::Tile1x128,
        input: QuantizeInput::F32,
        pow2_scales: *pow2_scales,
    };
    // Sizes past the kernels' 32-bit ints keep the rounding as it was.
    let (Ok(rows_arg), Ok(cols_arg)) = (i32::try_from(kept.rows), i32::try_from(kept.cols)) else {
        return;
    };
    let (rows, cols) = (rows_arg.unsigned_abs(), cols_arg.unsigned_abs());
    let Some(rounding) = calls[position].as_mut() else {
        return;
    };
    rounding.steps = vec![LibraryStep {
        kernel: LibraryKernel::Quantize(tiles),
        grid: tiles.grid(rows, cols),
        args: vec![
            StepArg::Buffer(*x, 0),
            StepArg::BufferBytes(out, 0),
            StepArg::BufferBytes(out, kept.scales_at),
            StepArg::I32(rows_arg),
            StepArg::I32(cols_arg),
        ],
    }];
    rounding.keeps_codes = Some(kept);
    let from_name = rounding.name.clone();
    for (j, call) in calls.iter_mut().enumerate() {
        let Some(call) = call.as_mut().filter(|_| j != position) else {
            continue;
        };
        let mut read = None;
        let mut index = 0;
        while index < call.steps.len() {
            // `eligible` admitted `quantize` steps alone among the steps naming `out`.
            let step = &call.steps[index];
            let (LibraryKernel::Quantize(params), true) = (
                step.kernel,
                step.args.iter().any(|a| a.buffer() == Some(out)),
            ) else {
                index += 1;
                continue;
            };
            // The same codes as the kept ones: the GEMM reads those instead.
            if params == tiles
                && let Some((_, _, written)) = Written::of(step)
            {
                call.steps.remove(index);
                super::library_fp8_sharing::relocate(
                    &mut call.steps,
                    &written,
                    Place::Buffer(out, 0),
                );
                read = Some(true);
                continue;
            }
            let step = &mut call.steps[index];
            step.kernel = LibraryKernel::Quantize(QuantizeParams {
                input: QuantizeInput::E4m3Tiles,
                ..params
            });
            let mut args = vec![
                StepArg::BufferBytes(out, 0),
                StepArg::BufferBytes(out, kept.scales_at),
                StepArg::I32(rows_arg),
            ];
            args.extend(step.args.iter().skip(1).copied());
            step.args = args;
            read.get_or_insert(false);
            index += 1;
        }
        if let Some(dropped_quantize) = read {
            call.reads_codes.push(CodesRead {
                from: position,
                from_name: from_name.clone(),
                buffer: out,
                dropped_quantize,
            });
        }
    }
}

/// The buffers whose storage holds kept codes, and the bytes each needs.
pub(crate) fn kept_sizes(calls: &[Option<LibraryCall>]) -> Vec<(BufferId, usize)> {
    let mut seen = HashSet::new();
    (calls.iter().flatten())
        .filter_map(|c| c.keeps_codes)
        .filter(|k| seen.insert(k.buffer))
        .map(|k| (k.buffer, k.bytes))
        .collect()
}
