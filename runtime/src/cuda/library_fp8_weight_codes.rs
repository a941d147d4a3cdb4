//! FP8 codes of the weights, made once per weights version. A training step's FP8 GEMMs
//! quantise the same weights again and again: the forward and the recomputed forward each in
//! 128×128 blocks, the backward the transposed blocks, and every micro-batch anew although the
//! weights change only at the optimizer step. At DeepSeek-V3's sizes
//! (one rank's whole step, 4096 tokens) the weights' launches are 83 % of the elements
//! quantised per micro-batch.
//!
//! This pass takes every `quantize` of a weight out of the calls: each distinct launch
//! (kernel, source, shape) runs once, writing to a region of the byte scratch past every
//! call's own part and the kept activations, and every call that quantised it reads the codes
//! and scales there. A weight here is a parameter (or a stack of them, fed in place) no kernel
//! writes, or a buffer computed from such parameters alone by kernels whose results nothing
//! but these launches reads (say the experts' stacking by copies, where a weight is also read
//! elsewhere so that its stack is not fed in place, and its rounding): those kernels are
//! *hoisted*, run with the codes and skipped by the program. The executor runs the hoisted
//! kernels and the codes' launches, in program order, whenever it uploads the parameters (a
//! new weights version, `Feeds::parameters_version`), ahead of the program and outside any
//! captured CUDA graph, and nothing of it for the other micro-batches of the version. A hoisted kernel writes its
//! usual temporaries: in program order each is alive where it is read, so the memory plan's
//! slots hold them as in the program.
//!
//! The cost is memory held for the run: the codes (one byte per element per layout) and their
//! scales, about a quarter of the f32 weights per layout.
//!
//! Measured on the plan of DeepSeek-V3's step (`fathom inspect --config
//! examples/configs/deepseek-v3-671b.json --train --precision fp8 --accumulation hopper
//! --target sm_90a --seq 4096`, one rank's whole program): the `quantize` launches per
//! micro-batch fall from 4044 to 2572 and their elements from 1.64 T to 0.27 T; 1348 weight
//! launches (1.36 T elements, 1.36 TB of codes for the whole model) run once per version.
//! (Before the experts' weights were fed into their stacks in place, the stacking was 45 312
//! of 45 489 hoisted kernels: 256 per stacked weight, and 177 roundings.)

use fathom_compiler::kernel::{BufferId, BufferRole, Program};

use super::library::{LibraryCall, LibraryKernel, LibraryStep, Place, StepArg};
use super::library_fp8::REGION_ALIGN;
use super::library_fp8_sharing::{LaunchKey, Written, relocate};

/// The weights' codes: where they lie in the byte scratch and the launches that make them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightCodes {
    /// The region's first byte in the byte scratch (past every call's own scratch).
    pub base: usize,
    /// Its size.
    pub bytes: usize,
    pub quantizations: Vec<WeightQuantization>,
    /// The hoisted kernels (loop nests and calls), by position: they compute from the weights
    /// alone what only the codes' launches read, so they run before those, not in the program.
    pub hoisted: Vec<Hoisted>,
}

/// A kernel of the program that runs with the weight codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hoisted {
    pub position: usize,
    pub name: String,
}

/// One weight's codes in one layout.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightQuantization {
    /// The weight quantised.
    pub source: BufferId,
    /// Where its codes start in the byte scratch (its scales follow, aligned).
    pub at: usize,
    /// The `quantize` launch, writing into the weight codes' region.
    pub step: LibraryStep,
    /// The positions of the calls that read the codes, ascending.
    pub readers: Vec<usize>,
}

/// One launch of the weight codes, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightLaunch<'a> {
    /// The hoisted kernel at this position of the program.
    Kernel(usize),
    Quantization(&'a WeightQuantization),
}

impl WeightCodes {
    /// The launches that make the codes: the hoisted kernels and the quantisations in program
    /// order, each quantisation where its first reader is.
    pub fn launches(&self) -> Vec<WeightLaunch<'_>> {
        let kernels =
            (self.hoisted.iter()).map(|h| ((h.position, 1), WeightLaunch::Kernel(h.position)));
        let quantizations =
            (self.quantizations.iter()).map(|q| ((q.readers[0], 0), WeightLaunch::Quantization(q)));
        let mut launches: Vec<_> = kernels.chain(quantizations).collect();
        // Stable: quantisations with one first reader keep their order, ahead of it.
        launches.sort_by_key(|(at, _)| *at);
        launches.into_iter().map(|(_, launch)| launch).collect()
    }

    /// The `quantize` launches, in order.
    pub fn steps(&self) -> impl Iterator<Item = &LibraryStep> {
        self.quantizations.iter().map(|q| &q.step)
    }

    /// The launches the call at `position` reads.
    pub fn read_by(&self, position: usize) -> impl Iterator<Item = &LibraryStep> {
        (self.quantizations.iter())
            .filter(move |q| q.readers.contains(&position))
            .map(|q| &q.step)
    }

    /// Whether the codes are made from `buffer` (a fed weight a quantisation or a hoisted
    /// kernel reads), so that they follow it: an executor that uploads only some weights (the
    /// others updated on the device) remakes them when it uploads one of these.
    pub fn made_from(&self, program: &Program, buffer: BufferId) -> bool {
        let hoisted = self.hoisted.iter().map(|h| &program.kernels[h.position]);
        self.quantizations.iter().any(|q| q.source == buffer)
            || hoisted
                .into_iter()
                .any(|k| k.reads_and_writes().0.contains(&buffer))
    }

    /// Whether the kernel at `position` runs with the codes instead of in the program.
    pub fn is_hoisted(&self, position: usize) -> bool {
        (self.hoisted)
            .binary_search_by_key(&position, |h| h.position)
            .is_ok()
    }
}

/// Which buffers hold weights (parameters no kernel writes, and what the hoisted kernels
/// compute from them alone), and which kernels are hoisted.
pub(crate) struct FromWeights {
    buffers: Vec<bool>,
    kernels: Vec<bool>,
}

impl FromWeights {
    /// The weights and hoisted kernels of `program`, its calls planned as `calls`.
    pub(crate) fn of(program: &Program, calls: &[Option<LibraryCall>]) -> Self {
        let accesses: Vec<(Vec<BufferId>, Vec<BufferId>)> = (program.kernels.iter())
            .map(|k| k.reads_and_writes())
            .collect();
        let mut writers = vec![Vec::new(); program.buffers.len()];
        let mut readers = vec![Vec::new(); program.buffers.len()];
        for (k, (reads, writes)) in accesses.iter().enumerate() {
            reads.iter().for_each(|b| readers[b.index()].push(k));
            writes.iter().for_each(|b| writers[b.index()].push(k));
        }
        let is_output = |b: BufferId| program.outputs.iter().any(|(_, o)| *o == b);
        let temporary = |b: &BufferId| {
            matches!(program.buffer(*b).role, BufferRole::Temporary) && !is_output(*b)
        };
        let mut buffers: Vec<bool> = (program.buffers.iter().enumerate())
            .map(|(b, buffer)| {
                let fixed =
                    buffer.role.is_fed_weight() || matches!(buffer.role, BufferRole::Constant(_));
                fixed && writers[b].is_empty()
            })
            .collect();
        let mut kernels = vec![false; program.kernels.len()];
        // Grow: kernels reading weights alone into temporaries, and the temporaries only such
        // kernels write.
        let mut grew = true;
        while grew {
            grew = false;
            for (k, (reads, writes)) in accesses.iter().enumerate() {
                let computes_from_weights = !writes.is_empty()
                    && reads.iter().all(|b| buffers[b.index()])
                    && writes.iter().all(temporary);
                if !kernels[k] && computes_from_weights {
                    kernels[k] = true;
                    grew = true;
                }
            }
            for b in 0..buffers.len() {
                let written = &writers[b];
                if !buffers[b] && !written.is_empty() && written.iter().all(|&k| kernels[k]) {
                    buffers[b] = true;
                    grew = true;
                }
            }
        }
        // Shrink: keep the kernels whose results only hoisted kernels and weight quantisations
        // read, and which read weights alone.
        let mut shrank = true;
        while shrank {
            shrank = false;
            for (k, (reads, writes)) in accesses.iter().enumerate() {
                if !kernels[k] {
                    continue;
                }
                let read_elsewhere = writes.iter().any(|b| {
                    !buffers[b.index()]
                        || readers[b.index()]
                            .iter()
                            .any(|&r| !kernels[r] && !quantizes_only(calls[r].as_ref(), *b))
                });
                if read_elsewhere || !reads.iter().all(|b| buffers[b.index()]) {
                    kernels[k] = false;
                    writes.iter().for_each(|b| buffers[b.index()] = false);
                    shrank = true;
                }
            }
        }
        FromWeights { buffers, kernels }
    }

    /// Whether `buffer` holds weights.
    pub(crate) fn holds_weights(&self, buffer: BufferId) -> bool {
        self.buffers[buffer.index()]
    }
}

/// Whether `call` reads `buffer` only as the source of `quantize` launches the weight codes
/// can take.
fn quantizes_only(call: Option<&LibraryCall>, buffer: BufferId) -> bool {
    call.is_some_and(|call| {
        call.steps.iter().all(|step| {
            let named = step.named_args();
            let reads = |arg: &StepArg| matches!(arg, StepArg::Buffer(b, _) if *b == buffer);
            let as_source = matches!(step.kernel, LibraryKernel::Quantize(_))
                && Written::of(step).is_some_and(|(_, source, _)| source == buffer)
                && named
                    .iter()
                    .filter(|(_, arg)| reads(arg))
                    .all(|(n, _)| *n == "x");
            as_source || !step.args.iter().any(reads)
        })
    })
}

/// Takes the weights' `quantize` launches out of `calls` into [`WeightCodes`] (see the module
/// docs). Runs after every other pass that places byte-scratch regions, so that the region lies
/// past all of them.
pub(crate) fn keep_weight_codes(
    program: &Program,
    weights: &FromWeights,
    calls: &mut [Option<LibraryCall>],
) -> WeightCodes {
    let base = (calls.iter().flatten())
        .map(|c| c.scratch_bytes)
        .max()
        .unwrap_or(0)
        .next_multiple_of(REGION_ALIGN);
    // A call with no launches left (a weight's rounding its readers skip) runs nothing either
    // way: it is not listed.
    let runs_nothing =
        |position: usize| calls[position].as_ref().is_some_and(|c| c.steps.is_empty());
    let hoisted = (weights.kernels.iter().enumerate())
        .filter(|&(position, hoisted)| *hoisted && !runs_nothing(position))
        .map(|(position, _)| Hoisted {
            position,
            name: program.kernels[position].name.clone(),
        })
        .collect();
    let mut codes = WeightCodes {
        base,
        hoisted,
        ..WeightCodes::default()
    };
    // Each distinct launch's key, by index into `codes.quantizations`.
    let mut keys: Vec<LaunchKey> = Vec::new();
    for (position, call) in calls.iter_mut().enumerate() {
        let Some(call) = call else { continue };
        let mut index = 0;
        while index < call.steps.len() {
            let step = &call.steps[index];
            let Some((params, source, regions)) = Written::of(step) else {
                index += 1;
                continue;
            };
            if !weights.holds_weights(source) {
                index += 1;
                continue;
            }
            let key = LaunchKey::of(params, step);
            let kept = match keys.iter().position(|k| *k == key) {
                Some(known) => {
                    let known = &mut codes.quantizations[known];
                    if known.readers.last() != Some(&position) {
                        known.readers.push(position);
                    }
                    known.at
                }
                None => {
                    let kept = base + codes.bytes;
                    let mut step = step.clone();
                    relocate(
                        std::slice::from_mut(&mut step),
                        &regions,
                        Place::Scratch(kept),
                    );
                    codes.bytes += regions.kept_bytes();
                    codes.quantizations.push(WeightQuantization {
                        source,
                        at: kept,
                        step,
                        readers: vec![position],
                    });
                    keys.push(key);
                    kept
                }
            };
            call.steps.remove(index);
            relocate(&mut call.steps, &regions, Place::Scratch(kept));
            call.scratch_bytes = call.scratch_bytes.max(kept + regions.kept_bytes());
            call.weight_codes.push(source);
        }
    }
    codes
}
