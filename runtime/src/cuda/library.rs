//! The kernel IR's library calls on the GPU, for programs whose operands are f32: which
//! `fathom-kernels` template runs each call, with which grid and arguments ([`LibraryPlan`]).
//! Planning needs no GPU (the tests check it and compile its kernels without one); the executor
//! resolves the arguments to device addresses and launches the steps in order. This file holds
//! the plan's types; `library_planner.rs` the planning of each call.
//!
//! | IR call | steps |
//! |---|---|
//! | `MatMul` | `gemm_f32_batched` on the views' strides (contiguous batch axes merged first) |
//! | `GroupedMatMul` | `index_group_rows` (token-slots by expert, stable), `gemm_f32_grouped` |
//! | `GroupedMatMulWeightGrad` | `index_group_rows`, `gemm_f32_grouped_wgrad` |
//! | `IndexAdd` | `index_group_rows` (positions by row, stable), `index_index_add` |
//! | `Gather`, `TakeAlong`, `OneHot`, `TopK` | `index_gather`, … one kernel each |
//! | `QuantizeDequantize` (E4M3) | `fake_quantize_e4m3[_pow2]` |
//! | `MatMul` of E4M3-rounded operands, Hopper's accumulation | `quantize` × 2, `fp8_gemm` or `fp8_gemm_fallback` ([`super::library_fp8`]) |
//! | `GroupedMatMul` likewise | `index_group_rows`, `index_pad_groups`, `quantize`s (x's rows gathered into the padded layout), the grouped FP8 GEMM writing each row to its token-slot ([`super::library_fp8_grouped`]) |
//! | `CausalAttention`, `CausalAttentionGrad` | conversions to bf16 and the flash-attention templates (`library_attention.rs`) |
//! | `GroupedMatMulWeightGrad` rounding its operands along each expert's rows | `index_group_rows`, `index_pad_groups`, then `fake_quantize_gathered_128x1` × 2 and `gemm_f32_grouped_wgrad`, or with Hopper's accumulation `quantize` 128×1 × 2 and the K-grouped FP8 GEMM ([`super::library_expert_wgrad`]) |
//!
//! Accumulation: `Exact` runs the f32 templates. `Accumulation::HOPPER` is what the FP8 tensor
//! cores do, so such a product runs as an FP8 GEMM when the kernels take it; otherwise as the
//! f32 GEMM, summing at least as exactly, with a note in the plan's table saying why. Other
//! limited accumulations are the CPU's emulations only.
//!
//! `group_rows` writes its offsets and members into a scratch area of ints shared by all calls
//! (they run one after another on one stream); the FP8 products keep their codes and scales in
//! a scratch area of bytes, shared the same way. The weights' codes lie past every call's part
//! of it, made once per weights version by launches of their own
//! ([`super::library_fp8_weight_codes`]). Kernels that read indices report an invalid one in
//! the status words, tagged with the call's position in the program plus one.
//!
//! After each call is planned, the FP8 plans are rewritten across calls, in order: roundings
//! read only by the products' quantisations are skipped, those read from their source
//! ([`super::library_fp8`]); a saved activation's rounding keeps its E4M3 codes in its own
//! buffer for the forward and backward products to read ([`super::library_fp8_saved`]); a
//! loop nest storing a product read only by quantisations launches nothing, its readers
//! multiplying the factors ([`super::library_fp8_products`]); repeated quantisations are
//! shared ([`super::library_fp8_sharing`]); the weights' codes are made once per weights
//! version.

use std::collections::{HashMap, HashSet};

use fathom_compiler::kernel::{BufferId, KernelBody, Library, MemoryPlan, Program};
use fathom_kernels::{
    ConvertParams, F32GemmParams, FakeQuantizeGatheredParams, FakeQuantizeParams,
    FallbackGemmParams, Fp8GemmParams, IndexOpParams, KernelError, KernelParam, KernelSource,
    MlaAttentionBwdParams, MlaAttentionFwdParams, ParamType, QuantizeParams, TensorMapDesc,
};

use super::CudaError;
use super::library_fp8::{Fp8Target, quantize_activations_directly, quantize_weights_directly};
use super::library_fp8_products::quantize_products_where_read;
use super::library_fp8_saved::{CodesRead, KeptCodes, keep_roundings_as_codes, kept_sizes};
use super::library_fp8_sharing::{ReusedQuantization, share_quantizations};
use super::library_fp8_weight_codes::{FromWeights, WeightCodes, keep_weight_codes};

/// A template instantiation a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LibraryKernel {
    Gemm(F32GemmParams),
    Index(IndexOpParams),
    FakeQuantize(FakeQuantizeParams),
    FakeQuantizeGathered(FakeQuantizeGatheredParams),
    Quantize(QuantizeParams),
    Fp8Gemm(Fp8GemmParams),
    Fp8GemmFallback(FallbackGemmParams),
    Convert(ConvertParams),
    AttentionForward(MlaAttentionFwdParams),
    /// The backward's `delta` preprocessing (`MlaAttentionBwdParams::instantiate_delta`).
    AttentionDelta(MlaAttentionBwdParams),
    AttentionBackward(MlaAttentionBwdParams),
}

impl LibraryKernel {
    pub fn name(&self) -> String {
        match self {
            LibraryKernel::Gemm(p) => p.name(),
            LibraryKernel::Index(p) => p.name(),
            LibraryKernel::FakeQuantize(p) => p.name(),
            LibraryKernel::FakeQuantizeGathered(p) => p.name(),
            LibraryKernel::Quantize(p) => p.name(),
            LibraryKernel::Fp8Gemm(p) => p.name(),
            LibraryKernel::Fp8GemmFallback(p) => p.name(),
            LibraryKernel::Convert(p) => p.name(),
            LibraryKernel::AttentionForward(p) => p.name(),
            LibraryKernel::AttentionDelta(p) => p.delta_name(),
            LibraryKernel::AttentionBackward(p) => p.name(),
        }
    }

    pub fn block_threads(&self) -> u32 {
        match self {
            LibraryKernel::Gemm(p) => p.block_threads(),
            LibraryKernel::Index(p) => p.block_threads(),
            LibraryKernel::FakeQuantize(p) => p.block_threads(),
            LibraryKernel::FakeQuantizeGathered(p) => p.block_threads(),
            LibraryKernel::Quantize(p) => p.block_threads(),
            LibraryKernel::Fp8Gemm(p) => p.block_threads(),
            LibraryKernel::Fp8GemmFallback(p) => p.block_threads(),
            LibraryKernel::Convert(p) => p.block_threads(),
            LibraryKernel::AttentionForward(p) => p.block_threads(),
            LibraryKernel::AttentionDelta(p) => p.delta_block_threads(),
            LibraryKernel::AttentionBackward(p) => p.block_threads(),
        }
    }

    /// Dynamic shared memory of a launch (the Hopper FP8 GEMM's pipeline ring, the attention
    /// templates' tiles; 0 for the rest).
    pub fn dynamic_smem_bytes(&self) -> u32 {
        match self {
            LibraryKernel::Fp8Gemm(p) => p.dynamic_smem_bytes(),
            LibraryKernel::AttentionForward(p) => p.dynamic_smem_bytes(),
            LibraryKernel::AttentionBackward(p) => p.dynamic_smem_bytes(),
            _ => 0,
        }
    }

    /// The entry point's parameters, in order (what [`LibraryKernel::instantiate`] declares,
    /// without writing the source).
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        match self {
            LibraryKernel::Gemm(p) => p.kernel_params(),
            LibraryKernel::Index(p) => p.kernel_params(),
            LibraryKernel::FakeQuantize(p) => p.kernel_params(),
            LibraryKernel::FakeQuantizeGathered(p) => p.kernel_params(),
            LibraryKernel::Quantize(p) => p.kernel_params(),
            LibraryKernel::Fp8Gemm(p) => p.kernel_params(),
            LibraryKernel::Fp8GemmFallback(p) => p.kernel_params(),
            LibraryKernel::Convert(p) => p.kernel_params(),
            LibraryKernel::AttentionForward(p) => p.kernel_params(),
            LibraryKernel::AttentionDelta(p) => p.delta_kernel_params(),
            LibraryKernel::AttentionBackward(p) => p.kernel_params(),
        }
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        match self {
            LibraryKernel::Gemm(p) => p.instantiate(),
            LibraryKernel::Index(p) => p.instantiate(),
            LibraryKernel::FakeQuantize(p) => p.instantiate(),
            LibraryKernel::FakeQuantizeGathered(p) => p.instantiate(),
            LibraryKernel::Quantize(p) => p.instantiate(),
            LibraryKernel::Fp8Gemm(p) => p.instantiate(),
            LibraryKernel::Fp8GemmFallback(p) => p.instantiate(),
            LibraryKernel::Convert(p) => p.instantiate(),
            LibraryKernel::AttentionForward(p) => p.instantiate(),
            LibraryKernel::AttentionDelta(p) => p.instantiate_delta(),
            LibraryKernel::AttentionBackward(p) => p.instantiate(),
        }
    }
}

/// Whether `step`'s arguments are of its kernel's parameters' kinds.
fn check_step_arguments(step: &LibraryStep, params: &[KernelParam]) -> Result<(), String> {
    if step.args.len() != params.len() {
        return Err(format!(
            "{} arguments for {} parameters",
            step.args.len(),
            params.len()
        ));
    }
    for (arg, param) in step.args.iter().zip(params) {
        let fits = match param.ty {
            ParamType::ConstPtr(_) | ParamType::MutPtr(_) => matches!(
                arg,
                StepArg::Buffer(..)
                    | StepArg::Scratch(_)
                    | StepArg::Bytes(_)
                    | StepArg::BufferBytes(..)
                    | StepArg::Null
                    | StepArg::Status
            ),
            ParamType::I32 => matches!(arg, StepArg::I32(_)),
            ParamType::I64 => matches!(arg, StepArg::I64(_)),
            ParamType::F32 => matches!(arg, StepArg::F32(_)),
            // No library call takes a double (the optimizer's kernels run outside the plans).
            ParamType::F64 => false,
            ParamType::TensorMap => matches!(arg, StepArg::TensorMap(..)),
        };
        if !fits {
            return Err(format!(
                "parameter `{}` ({:?}) given {arg:?}",
                param.name, param.ty
            ));
        }
    }
    Ok(())
}

/// `value` as a kernel's `int` argument, or why it cannot be one (`what` names it).
pub(crate) fn int_arg(value: usize, what: &str) -> Result<StepArg, String> {
    i32::try_from(value)
        .map(StepArg::I32)
        .map_err(|_| format!("{what} = {value} does not fit the kernels' 32-bit int"))
}

/// The non-negative `int` argument `name` of a step's arguments by name
/// ([`LibraryStep::named_args`]), if it has one: what [`int_arg`] made.
pub(crate) fn count_arg(named: &HashMap<&str, StepArg>, name: &str) -> Option<usize> {
    match named.get(name) {
        Some(StepArg::I32(v)) => usize::try_from(*v).ok(),
        _ => None,
    }
}

/// One argument of a step, in the kernel's parameter order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepArg {
    /// The device address of element `offset` of a buffer (f32 elements).
    Buffer(BufferId, usize),
    /// The device address of int `offset` of the scratch area.
    Scratch(usize),
    /// The device address of byte `offset` of the byte scratch area (FP8 codes and scales).
    Bytes(usize),
    /// The device address of byte `offset` of a buffer's storage: an activation kept as its
    /// E4M3 codes and scales in place of its rounded values ([`super::library_fp8_saved`]).
    BufferBytes(BufferId, usize),
    /// A TMA descriptor of the tensor at a place.
    TensorMap(TensorMapDesc, Place),
    /// A null pointer (a parameter the kernel does not read in this configuration).
    Null,
    /// The device address of the status words.
    Status,
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Where the bytes a tensor map describes lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Byte `offset` of the byte scratch area.
    Scratch(usize),
    /// Byte `offset` of a buffer's storage ([`StepArg::BufferBytes`]).
    Buffer(BufferId, usize),
}

impl Place {
    /// The pointer argument to the same bytes.
    pub fn arg(self) -> StepArg {
        match self {
            Place::Scratch(offset) => StepArg::Bytes(offset),
            Place::Buffer(b, offset) => StepArg::BufferBytes(b, offset),
        }
    }
}

impl StepArg {
    /// The buffer whose storage it points into, if any.
    pub fn buffer(&self) -> Option<BufferId> {
        match *self {
            StepArg::Buffer(b, _)
            | StepArg::BufferBytes(b, _)
            | StepArg::TensorMap(_, Place::Buffer(b, _)) => Some(b),
            _ => None,
        }
    }
}

/// One kernel launch of a library call.
#[derive(Clone, Debug, PartialEq)]
pub struct LibraryStep {
    pub kernel: LibraryKernel,
    pub grid: [u32; 3],
    pub args: Vec<StepArg>,
}

impl LibraryStep {
    /// Its arguments by its kernel's parameter names.
    pub fn named_args(&self) -> HashMap<&'static str, StepArg> {
        (self.kernel.kernel_params().iter())
            .map(|p| p.name)
            .zip(self.args.iter().copied())
            .collect()
    }
}

/// The steps of one library call (none when its output is empty).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LibraryCall {
    /// The kernel IR's name for it.
    pub name: String,
    pub steps: Vec<LibraryStep>,
    /// Ints of scratch its steps use.
    pub scratch_ints: usize,
    /// Bytes of the byte scratch its steps use.
    pub scratch_bytes: usize,
    /// Why a product marked with Hopper's accumulation runs as the f32 GEMM.
    pub note: Option<String>,
    /// Why the call launches nothing although its output is not empty.
    pub skipped: Option<&'static str>,
    /// Quantisations it reads from earlier calls instead of launching its own
    /// ([`super::library_fp8_sharing`]).
    pub reused: Vec<ReusedQuantization>,
    /// Weights whose codes it reads from the plan's [`WeightCodes`] instead of quantising them.
    pub weight_codes: Vec<BufferId>,
    /// For a rounding: the E4M3 codes it keeps in its output in place of the rounded values
    /// ([`super::library_fp8_saved`]).
    pub keeps_codes: Option<KeptCodes>,
    /// Codes kept by roundings that it reads.
    pub reads_codes: Vec<CodesRead>,
}

impl LibraryCall {
    /// Whether one of its steps is an FP8 GEMM.
    pub fn runs_fp8_gemm(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s.kernel,
                LibraryKernel::Fp8Gemm(_) | LibraryKernel::Fp8GemmFallback(_)
            )
        })
    }
}

/// The E4M3 roundings of a plan ([`LibraryPlan::roundings`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundingCount {
    /// Roundings launched as such (f32 values out).
    pub launched: usize,
    /// Elements the launched ones round.
    pub elements: u64,
    pub skipped: usize,
    /// Roundings launched as a quantisation kept as codes, and their elements.
    pub kept_as_codes: usize,
    pub kept_elements: u64,
}

/// The library calls of a program, by kernel position (`None` for loop nests, but for a loop
/// nest that launches nothing, a call with no steps saying why), and the weights' FP8 codes
/// they read (made once per weights version, before the calls).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LibraryPlan {
    pub calls: Vec<Option<LibraryCall>>,
    pub weight_codes: WeightCodes,
}

impl LibraryPlan {
    /// Plans every library call of `program` for a GPU whose FP8 GEMM is `fp8` (none before
    /// `sm_80`); refuses the program, listing every call that cannot run and why, when some
    /// cannot.
    pub fn of(program: &Program, fp8: Option<Fp8Target>) -> Result<Self, CudaError> {
        let mut calls = Vec::with_capacity(program.kernels.len());
        let mut refused = Vec::new();
        for (index, kernel) in program.kernels.iter().enumerate() {
            let KernelBody::Library(call) = &kernel.body else {
                calls.push(None);
                continue;
            };
            let planner = Planner {
                program,
                tag: index + 1,
                fp8,
            };
            match planner.plan_call(call) {
                Ok(planned) => {
                    let scratch_ints = planner.scratch_ints(call);
                    calls.push(Some(LibraryCall {
                        name: kernel.name.clone(),
                        steps: planned.steps,
                        scratch_ints,
                        scratch_bytes: planned.scratch_bytes,
                        note: planned.note,
                        ..LibraryCall::default()
                    }));
                }
                Err(reason) => {
                    refused.push(format!("{}: {reason}", kernel.name));
                    calls.push(None);
                }
            }
        }
        if refused.is_empty() {
            quantize_weights_directly(program, &mut calls);
            let weights = FromWeights::of(program, &calls);
            quantize_activations_directly(program, &weights, &mut calls);
            keep_roundings_as_codes(program, &weights, &mut calls);
            quantize_products_where_read(program, &mut calls);
            share_quantizations(program, &weights, &mut calls);
            let weight_codes = keep_weight_codes(program, &weights, &mut calls);
            let plan = LibraryPlan {
                calls,
                weight_codes,
            };
            // A planner's mistake, not the program's: said before anything launches.
            plan.check_arguments().map_err(|e| {
                CudaError::Launch(format!("a library step's arguments do not fit: {e}"))
            })?;
            Ok(plan)
        } else {
            Err(CudaError::UnsupportedLibraryCalls {
                program: program.name.clone(),
                count: refused.len(),
                summary: refused.join("; "),
            })
        }
    }

    /// The memory plan of `program` run as planned: a library call touches the buffers its
    /// steps' arguments name (an FP8 GEMM's `quantize` may read a rounding's source, kept
    /// alive for it) besides its operands, and a skipped call touches nothing; a buffer
    /// holding kept codes needs only their bytes. Kernels keep their places: the hoisted ones
    /// run ahead of the program but write their temporaries for the weight codes' launches
    /// alone, in program order.
    pub fn memory_plan(&self, program: &Program) -> MemoryPlan {
        let mut words: Vec<usize> = (program.buffers.iter()).map(|b| b.ty.numel()).collect();
        for (buffer, bytes) in kept_sizes(&self.calls) {
            words[buffer.index()] = bytes.div_ceil(4);
        }
        MemoryPlan::with_touches_and_sizes(program, &self.touches(program), &words)
    }

    /// The buffers each kernel of `program` touches as planned (see [`LibraryPlan::memory_plan`]).
    pub(crate) fn touches(&self, program: &Program) -> Vec<Vec<BufferId>> {
        let skipped =
            |call: &Option<LibraryCall>| call.as_ref().is_some_and(|c| c.skipped.is_some());
        // What the skipped calls would have written: their readers read it no more.
        let unwritten: HashSet<BufferId> = (program.kernels.iter().zip(&self.calls))
            .filter(|(_, call)| skipped(call))
            .flat_map(|(kernel, _)| kernel.reads_and_writes().1)
            .collect();
        (program.kernels.iter().zip(&self.calls))
            .map(|(kernel, call)| {
                if skipped(call) {
                    return Vec::new();
                }
                let mut touched = kernel.touches();
                let steps = call.iter().flat_map(|c| &c.steps);
                for arg in steps.flat_map(|step| &step.args) {
                    if let Some(b) = arg.buffer()
                        && !touched.contains(&b)
                    {
                        touched.push(b);
                    }
                }
                touched.retain(|b| !unwritten.contains(b));
                touched
            })
            .collect()
    }

    /// Whether the kernel at `position` launches nothing: a skipped library call, or a loop
    /// nest whose product its readers compute.
    pub fn skips(&self, position: usize) -> bool {
        (self.calls.get(position)).is_some_and(|c| c.as_ref().is_some_and(|c| c.skipped.is_some()))
    }

    /// The loop nests that launch nothing: how many, the elements they would have stored, and
    /// the bytes they would have read and written (`LoopNest::bytes_moved`).
    pub fn products_not_stored(&self, program: &Program) -> (usize, u64, u64) {
        let loops = (program.kernels.iter().enumerate()).filter_map(|(p, k)| match &k.body {
            KernelBody::Loop(nest) if self.skips(p) => Some((k, nest)),
            _ => None,
        });
        loops.fold((0, 0, 0), |(count, elements, bytes), (kernel, nest)| {
            let stored: u64 = (kernel.reads_and_writes().1.iter())
                .map(|b| program.buffer(*b).ty.numel() as u64)
                .sum();
            (count + 1, elements + stored, bytes + nest.bytes_moved())
        })
    }

    /// How many of `program`'s E4M3 roundings launch, over how many elements, and how many
    /// launch nothing (their readers quantise the source).
    pub fn roundings(&self, program: &Program) -> RoundingCount {
        let mut count = RoundingCount::default();
        for (kernel, call) in program.kernels.iter().zip(&self.calls) {
            let (KernelBody::Library(Library::QuantizeDequantize { out, .. }), Some(call)) =
                (&kernel.body, call)
            else {
                continue;
            };
            if call.skipped.is_some() {
                count.skipped += 1;
            } else if call.keeps_codes.is_some() {
                count.kept_as_codes += 1;
                count.kept_elements += program.buffer(*out).ty.numel() as u64;
            } else if !call.steps.is_empty() {
                count.launched += 1;
                count.elements += program.buffer(*out).ty.numel() as u64;
            }
        }
        count
    }

    /// The scratch ints the largest call needs.
    pub fn scratch_ints(&self) -> usize {
        self.calls
            .iter()
            .flatten()
            .map(|c| c.scratch_ints)
            .max()
            .unwrap_or(0)
    }

    /// How many products run as FP8 GEMMs, and how many marked with Hopper's accumulation run
    /// as f32 GEMMs (each with its `note`).
    pub fn fp8_summary(&self) -> (usize, usize) {
        let calls = || self.calls.iter().flatten();
        let fp8 = calls().filter(|c| c.runs_fp8_gemm()).count();
        (fp8, calls().filter(|c| c.note.is_some()).count())
    }

    /// The byte scratch the largest call needs, and the weight codes.
    pub fn scratch_bytes(&self) -> usize {
        let codes = &self.weight_codes;
        (self.calls.iter().flatten())
            .map(|c| c.scratch_bytes)
            .chain((codes.bytes > 0).then_some(codes.base + codes.bytes))
            .max()
            .unwrap_or(0)
    }

    /// Every launch with the name of what it belongs to: the weight codes' first, then each
    /// call's in order.
    pub fn steps(&self) -> impl Iterator<Item = (&str, &LibraryStep)> {
        let codes = self.weight_codes.steps().map(|s| (WEIGHT_CODES, s));
        let calls = (self.calls.iter().flatten())
            .flat_map(|c| c.steps.iter().map(move |s| (c.name.as_str(), s)));
        codes.chain(calls)
    }

    /// Checks that every step passes its kernel's parameters: as many arguments, each of the
    /// parameter's kind (a pointer for a pointer, a 64-bit int for a `long long`...). A launch
    /// takes its arguments by size, so an `int` where the kernel reads a `long long` would
    /// read past it on the GPU; this fails first, on any machine, naming the step
    /// (`LibraryPlan::of` checks every plan it makes).
    pub fn check_arguments(&self) -> Result<(), String> {
        let mut params: HashMap<LibraryKernel, Vec<KernelParam>> = HashMap::new();
        for (name, step) in self.steps() {
            let expected = params
                .entry(step.kernel)
                .or_insert_with(|| step.kernel.kernel_params());
            check_step_arguments(step, expected)
                .map_err(|e| format!("{name} ({}): {e}", step.kernel.name()))?;
        }
        Ok(())
    }

    /// Every distinct kernel the plan launches, in order of first use.
    pub fn kernels(&self) -> Vec<LibraryKernel> {
        let mut kernels = Vec::new();
        for (_, step) in self.steps() {
            if !kernels.contains(&step.kernel) {
                kernels.push(step.kernel);
            }
        }
        kernels
    }

    /// The name of the call tagged `tag` in the status words.
    pub fn name_of_tag(&self, tag: i32) -> Option<&str> {
        let index = usize::try_from(tag).ok()?.checked_sub(1)?;
        self.calls.get(index)?.as_ref().map(|c| c.name.as_str())
    }

    /// The weight codes' lines of [`LibraryPlan::table`]: each weight's launch and its readers.
    pub fn weight_codes_table(&self) -> String {
        let mut table = String::new();
        let codes = &self.weight_codes;
        if !(codes.quantizations.is_empty() && codes.hoisted.is_empty()) {
            table.push_str(&format!(
                "{WEIGHT_CODES} (bytes+{}, {} bytes; made when the weights change)\n",
                codes.base, codes.bytes
            ));
            for hoisted in &codes.hoisted {
                table.push_str(&format!("  (runs {})\n", hoisted.name));
            }
            for quantization in &codes.quantizations {
                let readers: Vec<&str> = (quantization.readers.iter())
                    .filter_map(|&r| Some(self.calls.get(r)?.as_ref()?.name.as_str()))
                    .collect();
                table.push_str(&format!(
                    "  ({} for {})\n",
                    quantization.source,
                    readers.join(", ")
                ));
                table.push_str(&step_line(&quantization.step));
            }
        }
        table
    }

    /// One line per step: call, kernel, grid, block and arguments (what the snapshot shows).
    pub fn table(&self) -> String {
        let mut table = self.weight_codes_table();
        let codes = &self.weight_codes;
        for (position, call) in self.calls.iter().enumerate() {
            let Some(call) = call else { continue };
            table.push_str(&format!("{}\n", call.name));
            if let Some(note) = &call.note {
                table.push_str(&format!("  ({note})\n"));
            }
            for reused in &call.reused {
                table.push_str(&format!(
                    "  (reads the quantised {} of {})\n",
                    reused.source, reused.from_name
                ));
            }
            if codes.is_hoisted(position) {
                table.push_str(&format!("  (runs with the {WEIGHT_CODES})\n"));
            }
            for weight in &call.weight_codes {
                table.push_str(&format!("  (reads the {WEIGHT_CODES} of {weight})\n"));
            }
            if let Some(kept) = &call.keeps_codes {
                table.push_str(&format!(
                    "  (keeps E4M3 codes and scales in {}: {} bytes for {} f32 values)\n",
                    kept.buffer,
                    kept.bytes,
                    kept.rows * kept.cols
                ));
            }
            for read in &call.reads_codes {
                let how = if read.dropped_quantize {
                    "its GEMM reads them"
                } else {
                    "quantised again from them"
                };
                table.push_str(&format!(
                    "  (reads the codes of {} kept by {}: {how})\n",
                    read.buffer, read.from_name
                ));
            }
            match call.skipped {
                Some(why) => table.push_str(&format!("  (skipped: {why})\n")),
                None if call.steps.is_empty() => {
                    table.push_str("  (empty output: nothing to launch)\n")
                }
                None => {}
            }
            for step in &call.steps {
                table.push_str(&step_line(step));
            }
        }
        table
    }
}

/// What the plan calls the launches of [`WeightCodes`].
const WEIGHT_CODES: &str = "weight codes";

/// A step's line in the plan's table: kernel, grid, block and arguments.
fn step_line(step: &LibraryStep) -> String {
    let [x, y, z] = step.grid;
    let args: Vec<String> = step.args.iter().map(arg_text).collect();
    format!(
        "  {} grid ({x}, {y}, {z}) block {}: {}\n",
        step.kernel.name(),
        step.kernel.block_threads(),
        args.join(", ")
    )
}

fn arg_text(arg: &StepArg) -> String {
    match arg {
        StepArg::Buffer(b, 0) => b.to_string(),
        StepArg::Buffer(b, offset) => format!("{b}+{offset}"),
        StepArg::Scratch(offset) => format!("scratch+{offset}"),
        StepArg::Bytes(offset) => format!("bytes+{offset}"),
        StepArg::BufferBytes(b, offset) => format!("{b}.bytes+{offset}"),
        StepArg::TensorMap(desc, place) => {
            let ([inner, outer], [box_inner, box_outer]) = (desc.global_dims, desc.box_dims);
            let at = arg_text(&place.arg());
            format!("map({at}: {outer}x{inner}, box {box_outer}x{box_inner})")
        }
        StepArg::Null => "null".to_owned(),
        StepArg::Status => "status".to_owned(),
        StepArg::I32(v) => v.to_string(),
        StepArg::I64(v) => v.to_string(),
        StepArg::F32(v) => format!("{v}f"),
    }
}

#[path = "library_attention.rs"]
mod attention;
#[path = "library_planner.rs"]
mod planner;
use planner::Planner;
pub(crate) use planner::merged_batch_axes;

#[cfg(test)]
#[path = "library_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "library_attention_tests.rs"]
mod attention_tests;
