//! FP8 quantisations of activations shared between library calls. Two products often read
//! one operand: the query and key-value down-projections the same normalised hidden states, an
//! MLP's gate and up projections the same input, their backward passes the same output
//! gradient. Planned call by call, each quantises it again into its own scratch. This pass
//! keeps the first call's codes and scales in a kept area of the byte scratch (beyond every
//! call's own scratch, which each call reuses from offset 0) and lets the later calls read them
//! there instead of launching their `quantize`.
//!
//! A later `quantize` is dropped only when it is the same launch (kernel, source, shape) and
//! nothing in between writes a buffer it reads; a source given by the scratch (gathered rows, whose
//! indices each call computes afresh) is never shared. The kept area holds a quantisation from
//! its first call to its last reader, placed first-fit among those alive; at most as many bytes
//! are kept at once as the largest call's scratch, and a quantisation that does not fit is
//! quantised again as before.
//!
//! Weights are left to `library_fp8_weight_codes`, which quantises each once per weights
//! version for all its calls. (Kept here, for the call span alone, they cost more memory than
//! they save work: at DeepSeek-V3's sizes, one rank's whole training step of 4096 tokens,
//! sharing weights too grew the byte scratch from 4.24 to 8.46 GB to save 0.6 % of the
//! quantised elements; activations alone drop 248 of 4292 `quantize` launches, 7.3 G elements,
//! for +0.7 % of scratch.)

use std::collections::HashMap;

use fathom_compiler::kernel::{BufferId, Program};
use fathom_kernels::QuantizeParams;

use super::library::{LibraryCall, LibraryKernel, LibraryStep, Place, StepArg};
use super::library_fp8::{Fp8Operand, REGION_ALIGN};
use super::library_fp8_weight_codes::FromWeights;

/// A `quantize` launch without where it writes: two launches with one key make the same codes
/// and scales. (`StepArg` holds an f32, so keys go in lists, not maps: a plan has some hundreds
/// of launches.)
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LaunchKey {
    params: QuantizeParams,
    /// Every argument but the byte-scratch regions it writes.
    inputs: Vec<StepArg>,
    /// The grid: the number of matrices quantised is in it alone.
    grid: [u32; 3],
}

impl LaunchKey {
    pub(crate) fn of(params: QuantizeParams, step: &LibraryStep) -> Self {
        let inputs = (step.args.iter())
            .filter(|arg| !matches!(arg, StepArg::Bytes(_)))
            .copied()
            .collect();
        LaunchKey {
            params,
            inputs,
            grid: step.grid,
        }
    }

    /// The buffers the launch reads (its source, and gathered rows given by a buffer).
    fn buffers_read(&self) -> impl Iterator<Item = BufferId> + '_ {
        self.inputs.iter().filter_map(|arg| match arg {
            StepArg::Buffer(b, _) => Some(*b),
            _ => None,
        })
    }
}

/// A quantisation a call reads from an earlier call's, kept in the byte scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReusedQuantization {
    /// The position of the call that quantised it, and its name.
    pub from: usize,
    pub from_name: String,
    /// The buffer quantised.
    pub source: BufferId,
}

/// Where a `quantize` step writes, and how much.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Written {
    codes: usize,
    code_bytes: usize,
    scales: usize,
    scale_bytes: usize,
}

impl Written {
    /// The step's output regions, when it is a quantisation that may be shared: a `quantize`
    /// whose every input is a buffer or an integer.
    pub(crate) fn of(step: &LibraryStep) -> Option<(QuantizeParams, BufferId, Written)> {
        let LibraryKernel::Quantize(params) = step.kernel else {
            return None;
        };
        let named = step.named_args();
        let inputs_shareable = named
            .iter()
            .filter(|(name, _)| !matches!(**name, "q" | "scales"))
            .all(|(_, arg)| matches!(arg, StepArg::Buffer(..) | StepArg::I32(_)));
        let (
            Some(StepArg::Buffer(source, _)),
            Some(StepArg::Bytes(codes)),
            Some(StepArg::Bytes(scales)),
            Some(StepArg::I32(rows)),
            Some(StepArg::I32(cols)),
        ) = (
            named.get("x").copied(),
            named.get("q").copied(),
            named.get("scales").copied(),
            named.get("rows").copied(),
            named.get("cols").copied(),
        )
        else {
            return None;
        };
        if !inputs_shareable {
            return None;
        }
        let operand = Fp8Operand {
            quantize: params,
            source: StepArg::Buffer(source, 0),
            source_rows: None,
            rows: usize::try_from(rows).ok()?,
            cols: usize::try_from(cols).ok()?,
            // A stack of matrices is a grid layer each (`QuantizeParams::stacked_grid`).
            matrices: step.grid[2] as usize,
        };
        let written = Written {
            codes,
            code_bytes: operand.code_bytes(),
            scales,
            scale_bytes: operand.scale_bytes(),
        };
        Some((params, source, written))
    }

    /// Bytes it takes in the kept area (codes, then scales, each region aligned).
    pub(crate) fn kept_bytes(&self) -> usize {
        self.code_bytes.next_multiple_of(REGION_ALIGN)
            + self.scale_bytes.next_multiple_of(REGION_ALIGN)
    }

    /// Where the kept copy's scales start, from its start.
    fn kept_scales(&self) -> usize {
        self.code_bytes.next_multiple_of(REGION_ALIGN)
    }

    /// `offset`, if it lies in this step's regions, as an offset into the kept copy.
    fn moved(&self, offset: usize) -> Option<usize> {
        if (self.codes..self.codes + self.code_bytes).contains(&offset) {
            Some(offset - self.codes)
        } else if (self.scales..self.scales + self.scale_bytes).contains(&offset) {
            Some(self.kept_scales() + (offset - self.scales))
        } else {
            None
        }
    }
}

/// One quantisation planned to be shared: the first call's step and the later calls reading it.
struct Shared {
    from: usize,
    source: BufferId,
    written: Written,
    /// Calls whose own `quantize` (step index, its regions) it replaces.
    readers: Vec<(usize, usize, Written)>,
}

/// Shares repeated quantisations between the calls of `program` (see the module docs).
pub(crate) fn share_quantizations(
    program: &Program,
    weights: &FromWeights,
    calls: &mut [Option<LibraryCall>],
) {
    let shared = find_repeats(program, weights, calls);
    let own_scratch = calls
        .iter()
        .flatten()
        .map(|c| c.scratch_bytes)
        .max()
        .unwrap_or(0);
    let base = own_scratch.next_multiple_of(REGION_ALIGN);
    // Kept copies alive: (offset, bytes, last reader).
    let mut alive: Vec<(usize, usize, usize)> = Vec::new();
    // The planned indices of the steps removed from each call so far.
    let mut removed: HashMap<usize, Vec<usize>> = HashMap::new();
    for group in shared {
        alive.retain(|&(_, _, until)| until >= group.from);
        let bytes = group.written.kept_bytes();
        let Some(offset) = first_fit(&alive, bytes, own_scratch) else {
            continue;
        };
        let until = group
            .readers
            .iter()
            .map(|r| r.0)
            .max()
            .unwrap_or(group.from);
        alive.push((offset, bytes, until));
        let kept = base + offset;
        let end = kept + bytes;
        let Some(first) = calls[group.from].as_mut() else {
            continue;
        };
        relocate(&mut first.steps, &group.written, Place::Scratch(kept));
        first.scratch_bytes = first.scratch_bytes.max(end);
        let from_name = first.name.clone();
        for &(reader, step, written) in &group.readers {
            let Some(call) = calls[reader].as_mut() else {
                continue;
            };
            let earlier = removed.entry(reader).or_default();
            call.steps
                .remove(step - earlier.iter().filter(|&&r| r < step).count());
            earlier.push(step);
            relocate(&mut call.steps, &written, Place::Scratch(kept));
            call.scratch_bytes = call.scratch_bytes.max(end);
            call.reused.push(ReusedQuantization {
                from: group.from,
                from_name: from_name.clone(),
                source: group.source,
            });
        }
    }
}

/// The repeated quantisations, in order of first call; a reader's step index counts its steps
/// as planned.
fn find_repeats(
    program: &Program,
    weights: &FromWeights,
    calls: &[Option<LibraryCall>],
) -> Vec<Shared> {
    let writes: Vec<Vec<BufferId>> = program
        .kernels
        .iter()
        .map(|k| k.reads_and_writes().1)
        .collect();
    let mut shared: Vec<Shared> = Vec::new();
    // The latest shareable quantisation of each launch, by index into `shared`.
    let mut latest: Vec<(LaunchKey, usize)> = Vec::new();
    for (position, call) in calls.iter().enumerate() {
        let Some(call) = call else { continue };
        for (index, step) in call.steps.iter().enumerate() {
            let Some((params, source, written)) = Written::of(step) else {
                continue;
            };
            if weights.holds_weights(source) {
                continue;
            }
            let key = LaunchKey::of(params, step);
            // Every buffer the launch reads must be as the first call read it.
            let read: Vec<BufferId> = key.buffers_read().collect();
            let unchanged_since = |from: usize| {
                (from..position)
                    .all(|k| !(writes.get(k)).is_some_and(|w| read.iter().any(|b| w.contains(b))))
            };
            let repeats = latest
                .iter()
                .find(|(k, _)| *k == key)
                .map(|&(_, first)| first)
                .filter(|&first| {
                    shared[first].from != position && unchanged_since(shared[first].from)
                });
            if let Some(first) = repeats {
                shared[first].readers.push((position, index, written));
                continue;
            }
            let fresh = shared.len();
            shared.push(Shared {
                from: position,
                source,
                written,
                readers: Vec::new(),
            });
            match latest.iter_mut().find(|(k, _)| *k == key) {
                Some((_, first)) => *first = fresh,
                None => latest.push((key, fresh)),
            }
        }
    }
    shared.retain(|s| !s.readers.is_empty());
    shared
}

/// The lowest offset where `bytes` fit among `alive` without passing `cap`.
fn first_fit(alive: &[(usize, usize, usize)], bytes: usize, cap: usize) -> Option<usize> {
    let mut taken: Vec<(usize, usize)> = alive.iter().map(|&(o, b, _)| (o, o + b)).collect();
    taken.sort_unstable();
    let mut offset = 0;
    for (start, end) in taken {
        if offset + bytes <= start {
            break;
        }
        offset = offset.max(end);
    }
    (offset + bytes <= cap).then_some(offset)
}

/// Points every argument of `steps` into `written`'s regions of the byte scratch at the kept
/// copy at `kept` (codes first, then scales at [`Written::kept_scales`]).
pub(crate) fn relocate(steps: &mut [LibraryStep], written: &Written, kept: Place) {
    let moved = |offset: usize| {
        written.moved(offset).map(|within| match kept {
            Place::Scratch(at) => Place::Scratch(at + within),
            Place::Buffer(b, at) => Place::Buffer(b, at + within),
        })
    };
    for arg in steps.iter_mut().flat_map(|s| s.args.iter_mut()) {
        match *arg {
            StepArg::Bytes(offset) => {
                if let Some(place) = moved(offset) {
                    *arg = place.arg();
                }
            }
            StepArg::TensorMap(desc, Place::Scratch(offset)) => {
                if let Some(place) = moved(offset) {
                    *arg = StepArg::TensorMap(desc, place);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_copies_go_first_fit_under_the_cap() {
        assert_eq!(first_fit(&[], 100, 100), Some(0));
        assert_eq!(first_fit(&[], 101, 100), None);
        let alive = [(0, 256, 9), (512, 256, 9)];
        assert_eq!(first_fit(&alive, 256, 1024), Some(256));
        // Not between the two: after them, if the cap leaves room.
        assert_eq!(first_fit(&alive, 257, 1025), Some(768));
        assert_eq!(first_fit(&alive, 257, 1024), None);
    }
}
