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

use fathom_compiler::kernel::{BufferId, BufferRole, KernelBody, Library, Program};
use fathom_kernels::{QuantizeInput, QuantizeKind, QuantizeParams};

use super::library::{LibraryCall, LibraryKernel, LibraryStep, Place, StepArg, count_arg};
use super::library_fp8::{Fp8Operand, REGION_ALIGN};
use super::library_fp8_sharing::{Written, relocate};
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
    let [step] = calls[position].as_ref()?.steps.as_slice() else {
        return None;
    };
    let numel = program.buffer(out).ty.numel();
    let cols = *program.buffer(out).ty.dims().last()?;
    let rows = numel / cols;
    // The kernels' ints.
    i32::try_from(rows).ok()?;
    i32::try_from(cols).ok()?;
    // Laid out as a kept quantisation is (`library_fp8_sharing`): codes, then the scales.
    let codes = Fp8Operand {
        quantize: QuantizeParams {
            kind: QuantizeKind::Tile1x128,
            input: QuantizeInput::F32,
            pow2_scales: false,
        },
        source: StepArg::Buffer(out, 0),
        source_rows: None,
        rows,
        cols,
        matrices: 1,
    };
    let scales_at = codes.code_bytes().next_multiple_of(REGION_ALIGN);
    let bytes = scales_at + codes.scale_bytes();
    let fits = bytes <= 4 * numel;
    let fake_quantize = matches!(step.kernel, LibraryKernel::FakeQuantize(_));
    if !(fits && fake_quantize) {
        return None;
    }
    quantize_only_readers(program, calls, out, (rows, cols), position)?;
    Some(KeptCodes {
        buffer: out,
        rows,
        cols,
        scales_at,
        bytes,
    })
}

/// The positions of the calls whose steps name `out`, a temporary of `program` that no output
/// holds, when each of those steps (in any call but the one at `except`, its writer's) is an
/// f32 activation `quantize` reading `out` whole as `[rows][cols]` and no loop nest reads it;
/// `None` otherwise. What lets a pass change how `out` is held, and its readers read it.
pub(crate) fn quantize_only_readers(
    program: &Program,
    calls: &[Option<LibraryCall>],
    out: BufferId,
    (rows, cols): (usize, usize),
    except: usize,
) -> Option<Vec<usize>> {
    let private = matches!(program.buffer(out).role, BufferRole::Temporary)
        && !(program.outputs.iter()).any(|(_, b)| program.holder(*b).0 == out);
    let loop_reads = (program.kernels.iter())
        .any(|k| matches!(k.body, KernelBody::Loop(_)) && k.reads_and_writes().0.contains(&out));
    if !private || loop_reads {
        return None;
    }
    let mut readers = Vec::new();
    for (position, call) in calls.iter().enumerate().filter(|(j, _)| *j != except) {
        let steps = call.iter().flat_map(|c| &c.steps);
        let mut naming = steps.filter(|s| s.args.iter().any(|a| a.buffer() == Some(out)));
        let mut any = false;
        for step in naming.by_ref() {
            if !reads_whole(step, out, rows, cols) {
                return None;
            }
            any = true;
        }
        if any {
            readers.push(position);
        }
    }
    Some(readers)
}

/// The `quantize` steps of `call` that name `out` (those [`quantize_only_readers`] admitted),
/// made to read their input as `input` from `source` (the arguments of its leading parameters,
/// `QuantizeParams::input_params`) instead of the f32 `x`; their other arguments stay.
pub(crate) fn read_input_as(
    call: &mut LibraryCall,
    out: BufferId,
    input: QuantizeInput,
    source: &[StepArg],
) {
    for step in &mut call.steps {
        let LibraryKernel::Quantize(params) = step.kernel else {
            continue;
        };
        if step.args.iter().all(|a| a.buffer() != Some(out)) {
            continue;
        }
        let mut args = source.to_vec();
        args.extend(step.args.iter().skip(params.input_params()).copied());
        step.kernel = LibraryKernel::Quantize(QuantizeParams { input, ..params });
        step.args = args;
    }
}

/// Whether `step` is an f32 activation `quantize` whose only use of `buffer` is reading it
/// whole as `[rows][cols]` (a gathered kind: rows of it).
fn reads_whole(step: &LibraryStep, buffer: BufferId, rows: usize, cols: usize) -> bool {
    let LibraryKernel::Quantize(params) = step.kernel else {
        return false;
    };
    let named = step.named_args();
    let names_buffer_once = (step.args.iter())
        .filter(|a| a.buffer() == Some(buffer))
        .count()
        == 1;
    params.input == QuantizeInput::F32
        && !matches!(params.kind, QuantizeKind::Block128x128 { .. })
        && named.get("x") == Some(&StepArg::Buffer(buffer, 0))
        && names_buffer_once
        && count_arg(&named, "cols") == Some(cols)
        && (params.kind.gathers() || count_arg(&named, "rows") == Some(rows))
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
    // `eligible` checked that they fit the kernels' ints.
    let (rows, cols) = (kept.rows as u32, kept.cols as u32);
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
            StepArg::I32(rows as i32),
            StepArg::I32(cols as i32),
        ],
    }];
    rounding.keeps_codes = Some(kept);
    let from_name = rounding.name.clone();
    let codes = [
        StepArg::BufferBytes(out, 0),
        StepArg::BufferBytes(out, kept.scales_at),
        StepArg::I32(rows as i32),
    ];
    let readers = quantize_only_readers(program, calls, out, (kept.rows, kept.cols), position);
    for j in readers.unwrap_or_default() {
        let Some(call) = calls[j].as_mut() else {
            continue;
        };
        // A quantisation making the same codes as the kept ones: the GEMM reads those instead.
        let same_codes = |step: &LibraryStep| {
            let names_out = step.args.iter().any(|a| a.buffer() == Some(out));
            let same = names_out && step.kernel == LibraryKernel::Quantize(tiles);
            same.then(|| Written::of(step)).flatten()
        };
        let mut dropped_quantize = false;
        while let Some((index, written)) =
            (call.steps.iter().enumerate()).find_map(|(i, s)| Some((i, same_codes(s)?.2)))
        {
            call.steps.remove(index);
            relocate(&mut call.steps, &written, Place::Buffer(out, 0));
            dropped_quantize = true;
        }
        read_input_as(call, out, QuantizeInput::E4m3Tiles, &codes);
        call.reads_codes.push(CodesRead {
            from: position,
            from_name: from_name.clone(),
            buffer: out,
            dropped_quantize,
        });
    }
}

/// The buffers whose storage holds kept codes, and the bytes each needs.
pub(crate) fn kept_sizes(calls: &[Option<LibraryCall>]) -> Vec<(BufferId, usize)> {
    (calls.iter().flatten())
        .filter_map(|c| c.keeps_codes)
        .map(|k| (k.buffer, k.bytes))
        .collect()
}
