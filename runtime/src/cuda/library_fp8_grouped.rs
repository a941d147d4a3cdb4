//! The experts' products as grouped FP8 GEMMs. A `GroupedMatMul` whose token rows the precision
//! pass rounded in 1×128 tiles and whose stacked expert weights it rounded in 128×128 blocks,
//! with Hopper's accumulation, runs in DeepGEMM's contiguous layout:
//!
//! 1. `group_rows`: the token-slots by expert (as the f32 plan);
//! 2. `pad_groups`: each expert's token-slots in a segment of its own, padded to 128 rows
//!    (`m_padded` rows in all: enough for any routing), the expert of each 128-row block (-1
//!    past the last segment), and each padded row's row of x and token-slot (-1 for padding);
//! 3. `quantize` 1×128 of x's rows gathered into that layout (zeros for padding);
//! 4. `quantize` 128×128 of every expert's weight, in one launch (a grid layer per expert);
//! 5. the grouped FP8 GEMM (padding blocks skipped), each row written straight to its
//!    token-slot's row of the output (`GemmOutput::F32Scattered`).
//!
//! The experts' weight gradients are a K-grouped GEMM over the same padded layout
//! ([`super::library_expert_wgrad`]).

use fathom_compiler::kernel::{BufferId, ExpertWeights, Program, grouped_rows};
use fathom_kernels::fp8_gemm::GROUPED_M_ALIGN;
use fathom_kernels::{
    BScaling, GemmGrouping, IndexOp, IndexOpParams, QuantizeInput, QuantizeKind, QuantizeParams,
};

use super::library::{LibraryKernel, LibraryStep, StepArg};
use super::library_fp8::{
    Fp8Operand, Fp8Target, GemmOut, GemmRegions, Rounding, ScratchLayout, gemm_problem, gemm_step,
};

/// The fields of a `Library::GroupedMatMul` the recognition reads.
pub(crate) struct GroupedCall<'a> {
    pub x: BufferId,
    pub weights: &'a ExpertWeights,
    pub expert_ids: BufferId,
    pub out: BufferId,
}

/// A `GroupedMatMul` that runs as a grouped FP8 GEMM: `out[t][s] = x[t][s or 0] · W[e]ᵀ`, with
/// `e = expert_ids[t][s]` and `W[e]` as `[N][K]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fp8GroupedProduct {
    x: BufferId,
    x_pow2: bool,
    /// Token-slots (`tokens × slots`), slots per token, and rows of x per token (1 or slots).
    rows: usize,
    slots: usize,
    x_slots: usize,
    weights: BufferId,
    w_pow2: bool,
    /// Each expert's matrix is stored `[K][N]` (read transposed) rather than `[N][K]`.
    w_transposed: bool,
    experts: usize,
    n: usize,
    k: usize,
    out: BufferId,
}

impl Fp8GroupedProduct {
    /// The grouped FP8 GEMM for `call`, a product with Hopper's accumulation, or why it has none
    /// (then the f32 grouped GEMM runs it).
    pub(crate) fn find(program: &Program, call: &GroupedCall<'_>) -> Result<Self, String> {
        let ExpertWeights::Stacked(view) = call.weights else {
            return Err("the experts' weights are not one stacked buffer".into());
        };
        let dims = |b: BufferId| program.buffer(b).ty.dims().to_vec();
        let (ids, out) = (dims(call.expert_ids), dims(call.out));
        let (tokens, slots) = (ids[0], ids[1]);
        let (x_slots, k) = grouped_rows(&dims(call.x), tokens);
        if tokens * slots == 0 || out[2] == 0 {
            return Err("an empty product".into());
        }
        let x = Rounding::of(program, call.x)?;
        if x.tile != (1, 128) || x.cols() != k {
            return Err(format!(
                "x is rounded in {}x{} tiles of {:?}: not 1×128 tiles along K",
                x.tile.0, x.tile.1, x.dims
            ));
        }
        let w = Rounding::of(program, view.buffer)?;
        let [experts, rows, cols] = w.dims[..] else {
            return Err(format!("the weights {:?} are not [experts, ·, ·]", w.dims));
        };
        let n = out[2];
        let strides = (view.strides[1], view.strides[2]);
        let w_transposed = match strides {
            _ if view.offset != 0
                || view.strides[0] != (rows * cols) as isize
                || w.tile != (128, 128) =>
            {
                None
            }
            (sn, 1) if sn == cols as isize && (rows, cols) == (n, k) => Some(false),
            (1, sk) if sk == cols as isize && (rows, cols) == (k, n) => Some(true),
            _ => None,
        }
        .ok_or_else(|| {
            format!(
                "the weights are rounded in {}x{} tiles of {:?}, read with strides {strides:?}: \
                 not each expert's 128×128 blocks",
                w.tile.0, w.tile.1, w.dims
            )
        })?;
        Ok(Fp8GroupedProduct {
            x: call.x,
            x_pow2: x.pow2_scales,
            rows: tokens * slots,
            slots,
            x_slots,
            weights: view.buffer,
            w_pow2: w.pow2_scales,
            w_transposed,
            experts,
            n,
            k,
            out: call.out,
        })
    }

    /// Rows of the padded layout.
    pub(crate) fn m_padded(&self) -> usize {
        m_padded(self.rows, self.experts)
    }

    /// The steps after `group_rows` (which put the offsets and members at ints 0 and
    /// `experts + 1` of the int scratch) for `target`, and the byte scratch they use.
    pub(crate) fn steps(
        &self,
        target: Fp8Target,
        group_rows: LibraryStep,
    ) -> Result<(Vec<LibraryStep>, usize), String> {
        let (m_padded, n, k, experts) = (self.m_padded(), self.n, self.k, self.experts);
        // K as the codes lie, their rows padded with zero codes to 16 bytes.
        let problem = gemm_problem([m_padded, n, k.next_multiple_of(16)], experts)?;
        let a = Fp8Operand {
            quantize: QuantizeParams {
                kind: QuantizeKind::GatheredTile1x128,
                input: QuantizeInput::F32,
                pow2_scales: self.x_pow2,
            },
            source: StepArg::Buffer(self.x, 0),
            source_rows: None,
            rows: m_padded,
            cols: k,
            matrices: 1,
        };
        let b = self.expert_weights();
        let mut layout = ScratchLayout::default();
        let sizes = (experts, self.slots, self.x_slots, m_padded);
        let (pad_groups, padded) = PaddedRows::step(&mut layout, sizes);
        let gathered = Fp8Operand {
            source_rows: Some(StepArg::Bytes(padded.source_rows)),
            ..a
        };
        let (regions, quantize) = GemmRegions::quantized(&mut layout, &gathered, &b)?;
        let mut steps = vec![group_rows, pad_groups];
        steps.extend(quantize);
        let shape = (BScaling::Block128x128, GemmGrouping::Contiguous);
        let out = GemmOut {
            at: StepArg::Buffer(self.out, 0),
            rows: Some(StepArg::Bytes(padded.out_rows)),
        };
        let groups = [("block_expert", StepArg::Bytes(padded.block_group))];
        steps.push(gemm_step(target, shape, &problem, &regions, out, &groups)?);
        Ok((steps, layout.bytes))
    }

    /// The experts' weights as one operand, each quantised into B's `[N][K]` with 128×128 block
    /// scales, in one launch (a grid layer per expert).
    fn expert_weights(&self) -> Fp8Operand {
        let (rows, cols) = if self.w_transposed {
            (self.k, self.n)
        } else {
            (self.n, self.k)
        };
        Fp8Operand {
            quantize: QuantizeParams {
                kind: QuantizeKind::Block128x128 {
                    transpose: self.w_transposed,
                },
                input: QuantizeInput::F32,
                pow2_scales: self.w_pow2,
            },
            source: StepArg::Buffer(self.weights, 0),
            source_rows: None,
            rows,
            cols,
            matrices: self.experts,
        }
    }
}

/// Rows of the padded layout of `rows` token-slots over `experts`: each expert's segment padded
/// to [`GROUPED_M_ALIGN`] rows, enough for any routing.
pub(crate) fn m_padded(rows: usize, experts: usize) -> usize {
    let align = GROUPED_M_ALIGN as usize;
    (rows + experts * (align - 1)).next_multiple_of(align)
}

/// Where `pad_groups` writes the padded layout, in the byte scratch (ints).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PaddedRows {
    /// `experts + 1` segment starts; the last is the end of the last segment.
    pub padded_offsets: usize,
    /// The expert of each 128-row block (-1 past the last segment).
    pub block_group: usize,
    /// Each padded row's row of x (-1 for padding).
    pub source_rows: usize,
    /// Each padded row's token-slot (-1 for padding).
    pub out_rows: usize,
}

impl PaddedRows {
    /// The `pad_groups` step after `group_rows` (which put the offsets and members at ints 0
    /// and `experts + 1` of the int scratch), its outputs placed in `layout`.
    pub(crate) fn step(
        layout: &mut ScratchLayout,
        (experts, slots, x_slots, m_padded): (usize, usize, usize, usize),
    ) -> (LibraryStep, PaddedRows) {
        let padded = PaddedRows {
            padded_offsets: layout.region(4 * (experts + 1)),
            block_group: layout.region(4 * m_padded / GROUPED_M_ALIGN as usize),
            source_rows: layout.region(4 * m_padded),
            out_rows: layout.region(4 * m_padded),
        };
        let int = |v: usize| StepArg::I32(v as i32);
        let params = IndexOpParams::new(IndexOp::PadGroups);
        let step = LibraryStep {
            kernel: LibraryKernel::Index(params),
            grid: params.grid(m_padded as u64),
            args: vec![
                StepArg::Scratch(0),
                StepArg::Scratch(experts + 1),
                int(experts),
                int(slots),
                int(x_slots),
                int(m_padded),
                StepArg::Bytes(padded.padded_offsets),
                StepArg::Bytes(padded.block_group),
                StepArg::Bytes(padded.source_rows),
                StepArg::Bytes(padded.out_rows),
            ],
        };
        (step, padded)
    }
}
