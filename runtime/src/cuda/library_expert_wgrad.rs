//! The experts' weight gradient when it rounds its operands itself (`graph::ExpertTiles`: the
//! FP8 policy's 128×1 tiles along each expert's token-slots). Both plans lay the token-slots out
//! by expert as the grouped FP8 GEMMs do, so that a 128-row block of that layout is one of the
//! op's tiles:
//!
//! 1. `group_rows`: the token-slots by expert;
//! 2. `pad_groups`: each expert's token-slots in a segment of its own, padded to 128 rows, and
//!    each padded row's token-slot (the cotangent's row) and row of x (-1 for padding).
//!
//! Then, with exact accumulation:
//!
//! 3. `fake_quantize_gathered_128x1` rounds the cotangent's and x's rows in those tiles, written
//!    back in token-slot order (f32, in the byte scratch; x once per slot, as each slot is a row
//!    of K of its own);
//! 4. the f32 grouped weight-gradient GEMM multiplies the rounded rows.
//!
//! With Hopper's accumulation:
//!
//! 3. `quantize` 128×1 of the gathered rows makes both operands' codes, transposed:
//!    `dYᵀ [n][m_padded]` and `Xᵀ [k][m_padded]`, one scale per 128 token-slots of a channel;
//! 4. the K-grouped FP8 GEMM computes every expert's `dW_e = dY_eᵀ · X_e` over its own segment
//!    of K (`k_offsets` = the padded segments' starts), zeros for an expert with none.

use fathom_compiler::graph::{ExpertTiles, QuantFormat};
use fathom_compiler::kernel::{BufferId, Program, grouped_rows};
use fathom_kernels::fp8_gemm::GROUPED_M_ALIGN;
use fathom_kernels::{
    BScaling, F32GemmKind, F32GemmParams, FakeQuantizeGatheredParams, GemmGrouping, QuantizeInput,
    QuantizeKind, QuantizeParams,
};

use super::library::{LibraryKernel, LibraryStep, StepArg, int_arg};
use super::library_fp8::{
    Fp8Operand, Fp8Target, GemmOut, GemmRegions, ScratchLayout, gemm_problem, gemm_step, ordered,
};
use super::library_fp8_grouped::{PaddedRows, m_padded};

/// The fields of a `Library::GroupedMatMulWeightGrad` the plans read.
pub(crate) struct WeightGradCall {
    pub cotangent: BufferId,
    pub x: BufferId,
    pub expert_ids: BufferId,
    /// The stacked `[experts, n, k]` gradient.
    pub out: BufferId,
    pub tiles: ExpertTiles,
}

/// A grouped weight gradient that rounds its operands in tiles along each expert's rows:
/// `out[e] = Σ_{(t, s) → e} round(cotangent[t, s])ᵀ · round(x[t, s or 0])`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RoundedExpertWeightGrad {
    cotangent: BufferId,
    x: BufferId,
    /// Token-slots (`tokens × slots`), slots per token, and rows of x per token (1 or slots).
    rows: usize,
    slots: usize,
    x_slots: usize,
    experts: usize,
    n: usize,
    k: usize,
    out: BufferId,
    pow2_scales: bool,
}

impl RoundedExpertWeightGrad {
    /// The plan's view of `call`, or why the GPU's kernels cannot round as it says.
    pub(crate) fn of(program: &Program, call: &WeightGradCall) -> Result<Self, String> {
        let dims = |b: BufferId| program.buffer(b).ty.dims().to_vec();
        let (ids, out) = (dims(call.expert_ids), dims(call.out));
        let (tokens, slots) = (ids[0], ids[1]);
        let (x_slots, k) = grouped_rows(&dims(call.x), tokens);
        let ExpertTiles {
            format: QuantFormat::E4M3,
            tile_rows,
            pow2_scales,
        } = call.tiles;
        if tile_rows != GROUPED_M_ALIGN as usize {
            return Err(format!(
                "the experts' weight gradient rounds its operands in tiles of {tile_rows} \
                 token-slots; the GPU's kernels round in tiles of {GROUPED_M_ALIGN} (the model's \
                 `fp8.activation_tile`)"
            ));
        }
        Ok(RoundedExpertWeightGrad {
            cotangent: call.cotangent,
            x: call.x,
            rows: tokens * slots,
            slots,
            x_slots,
            experts: out[0],
            n: out[1],
            k,
            out: call.out,
            pow2_scales,
        })
    }

    fn m_padded(&self) -> usize {
        m_padded(self.rows, self.experts)
    }

    /// `group_rows` (given, made by the caller) and `pad_groups`, the padding placed in `layout`.
    fn padding(
        &self,
        layout: &mut ScratchLayout,
        group_rows: LibraryStep,
    ) -> (Vec<LibraryStep>, PaddedRows) {
        let sizes = (self.experts, self.slots, self.x_slots, self.m_padded());
        let (pad_groups, padded) = PaddedRows::step(layout, sizes);
        (vec![group_rows, pad_groups], padded)
    }

    /// The exact plan: both operands rounded in f32 back to token-slot order, then the f32
    /// grouped weight-gradient GEMM; and the byte scratch it uses.
    pub(crate) fn f32_steps(
        &self,
        group_rows: LibraryStep,
    ) -> Result<(Vec<LibraryStep>, usize), String> {
        let (rows, experts, n, k) = (self.rows, self.experts, self.n, self.k);
        let m_padded = self.m_padded();
        let mut layout = ScratchLayout::default();
        let (mut steps, padded) = self.padding(&mut layout, group_rows);
        let rounded_cotangent = layout.region(4 * rows * n);
        let rounded_x = layout.region(4 * rows * k);
        let params = FakeQuantizeGatheredParams {
            pow2_scales: self.pow2_scales,
        };
        // The cotangent's padded rows are token-slots; x's are its own rows.
        for (source, source_rows, cols, rounded) in [
            (self.cotangent, padded.out_rows, n, rounded_cotangent),
            (self.x, padded.source_rows, k, rounded_x),
        ] {
            let named = [
                ("x", StepArg::Buffer(source, 0)),
                ("source_rows", StepArg::Bytes(source_rows)),
                ("out_rows", StepArg::Bytes(padded.out_rows)),
                ("out", StepArg::Bytes(rounded)),
                ("rows", int_arg(m_padded, "padded rows")?),
                ("cols", int_arg(cols, "columns")?),
            ];
            steps.push(LibraryStep {
                kernel: LibraryKernel::FakeQuantizeGathered(params),
                grid: params.grid(m_padded as u32, cols as u32),
                args: ordered(&params.name(), &params.kernel_params(), &named)?,
            });
        }
        let gemm = F32GemmParams::new(F32GemmKind::GroupedWeightGrad);
        let named = [
            ("g", StepArg::Bytes(rounded_cotangent)),
            ("x", StepArg::Bytes(rounded_x)),
            ("offsets", StepArg::Scratch(0)),
            ("members", StepArg::Scratch(experts + 1)),
            ("out", StepArg::Buffer(self.out, 0)),
            ("slots", int_arg(self.slots, "slots")?),
            // The rounded x has a row per token-slot.
            ("x_slots", int_arg(self.slots, "x slots")?),
            ("n", int_arg(n, "n")?),
            ("k", int_arg(k, "k")?),
        ];
        let u32_of = |v: usize| u32::try_from(v).map_err(|e| e.to_string());
        steps.push(LibraryStep {
            kernel: LibraryKernel::Gemm(gemm),
            grid: gemm.weight_grad_grid(u32_of(experts)?, u32_of(n)?, u32_of(k)?),
            args: ordered(&gemm.name(), &gemm.kernel_params(), &named)?,
        });
        Ok((steps, layout.bytes))
    }

    /// The FP8 plan for `target`: both operands quantised transposed from their gathered rows,
    /// then the K-grouped FP8 GEMM; and the byte scratch it uses. Or why the kernels cannot
    /// take the shapes.
    pub(crate) fn fp8_steps(
        &self,
        target: Fp8Target,
        group_rows: LibraryStep,
    ) -> Result<(Vec<LibraryStep>, usize), String> {
        let (m_padded, experts, n, k) = (self.m_padded(), self.experts, self.n, self.k);
        // dW_e [n][k] = dY_eᵀ · X_e: M = n, N = k, K = the padded token-slots.
        let problem = gemm_problem([n, k, m_padded], experts)?;
        let mut layout = ScratchLayout::default();
        let (mut steps, padded) = self.padding(&mut layout, group_rows);
        let transposed = |source: BufferId, source_rows: usize, cols: usize| Fp8Operand {
            quantize: QuantizeParams {
                kind: QuantizeKind::GatheredTile128x1Transposed,
                input: QuantizeInput::F32,
                pow2_scales: self.pow2_scales,
            },
            source: StepArg::Buffer(source, 0),
            source_rows: Some(StepArg::Bytes(source_rows)),
            rows: m_padded,
            cols,
            matrices: 1,
        };
        let a = transposed(self.cotangent, padded.out_rows, n);
        let b = transposed(self.x, padded.source_rows, k);
        let (regions, quantize) = GemmRegions::quantized(&mut layout, &a, &b)?;
        steps.extend(quantize);
        let out = GemmOut {
            at: StepArg::Buffer(self.out, 0),
            rows: None,
        };
        let groups = [
            ("k_offsets", StepArg::Bytes(padded.padded_offsets)),
            ("groups", StepArg::I32(problem.groups as i32)),
        ];
        let shape = (BScaling::Row1x128, GemmGrouping::KGrouped);
        steps.push(gemm_step(target, shape, &problem, &regions, out, &groups)?);
        Ok((steps, layout.bytes))
    }
}
