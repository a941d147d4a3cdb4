//! The planner behind [`LibraryPlan`](super::LibraryPlan): which `fathom-kernels` template
//! runs each library call, with which grid and arguments; FP8 products through
//! `library_fp8`, `library_fp8_grouped` and `library_expert_wgrad`.

use fathom_compiler::graph::{Accumulation, MatMulPart, QuantFormat, Triangle, Triangular};
use fathom_compiler::kernel::{
    BufferId, ExpertOutputs, ExpertWeights, Library, Program, View, grouped_rows,
};
use fathom_kernels::gemm_f32::MAX_BATCH_AXES;
use fathom_kernels::{F32GemmKind, F32GemmParams, FakeQuantizeParams, IndexOp, IndexOpParams};

use super::attention::{forward_steps, gradient_steps};
use super::{LibraryKernel, LibraryStep, StepArg, int_arg};
use crate::cuda::library_expert_wgrad::{RoundedExpertWeightGrad, WeightGradCall};
use crate::cuda::library_fp8::{Fp8Product, Fp8Target, MatMulCall};
use crate::cuda::library_fp8_grouped::{Fp8GroupedProduct, GroupedCall};

/// Why a grouped GEMM whose experts' matrices lie in buffers of their own has no CUDA plan.
const NOT_IN_PARTS: &str = "the CUDA plan reads and writes the experts' matrices of grouped \
     GEMMs as one stacked buffer; lower without `LowerOptions::grouped_weights_in_place`";

/// Why a product that rounds its operands as it reads them has no CUDA plan.
const NOT_ROUNDING: &str = "the CUDA GEMM templates read operands as they are stored, rounded \
     by the program's casts; lower without `LowerOptions::products_round_operands`";

/// Why one of the CPU's routines (a call the lowering makes of a loop nest, under the option
/// named) has no CUDA plan: the plan runs `what` as generated loop kernels.
fn not_a_routine(what: &str, option: &str) -> String {
    format!(
        "the CUDA plan runs {what} as generated loop kernels; lower without \
         `LowerOptions::{option}`"
    )
}

/// Plans the calls of one kernel.
pub(super) struct Planner<'a> {
    pub(super) program: &'a Program,
    /// The call's tag in the status words: its position in the program plus one.
    pub(super) tag: usize,
    pub(super) fp8: Option<Fp8Target>,
}

type Planned = Result<Vec<LibraryStep>, String>;

/// The steps of a call and what else its plan says.
pub(super) struct PlannedCall {
    pub(super) steps: Vec<LibraryStep>,
    pub(super) scratch_bytes: usize,
    pub(super) note: Option<String>,
}

/// A plan's steps and the byte scratch they use, or why there is none.
type StepsAndScratch = Result<(Vec<LibraryStep>, usize), String>;

/// The FP8 plan when one was made and the kernels take the call; else the f32 plan, with the
/// reason when an FP8 GEMM was asked for.
fn fp8_or_f32(
    fp8_plan: Option<StepsAndScratch>,
    f32_plan: impl FnOnce() -> StepsAndScratch,
) -> Result<PlannedCall, String> {
    Ok(match fp8_plan {
        Some(Ok(planned)) => PlannedCall::of(planned, None),
        Some(Err(why)) => PlannedCall::of(f32_plan()?, Some(format!("f32 GEMM: {why}"))),
        None => PlannedCall::of(f32_plan()?, None),
    })
}

impl PlannedCall {
    /// Steps and the byte scratch they use, with the plan's note.
    fn of((steps, scratch_bytes): (Vec<LibraryStep>, usize), note: Option<String>) -> Self {
        PlannedCall {
            steps,
            scratch_bytes,
            note,
        }
    }
}

impl Planner<'_> {
    fn dims(&self, b: &BufferId) -> &[usize] {
        self.program.buffer(*b).ty.dims()
    }

    fn numel(&self, b: &BufferId) -> usize {
        self.program.buffer(*b).ty.numel()
    }

    /// `value` as a kernel's `int`, or why it cannot be one.
    fn int(&self, value: usize, what: &str) -> Result<StepArg, String> {
        int_arg(value, what)
    }

    fn tag(&self) -> Result<StepArg, String> {
        self.int(self.tag, "the call's position")
    }

    /// Scratch for `group_rows` over `count` ids into `groups` groups: offsets, then members.
    pub(super) fn scratch_ints(&self, call: &Library) -> usize {
        match call {
            Library::GroupedMatMul {
                weights,
                expert_ids,
                ..
            } => self.experts(weights) + 1 + self.numel(expert_ids),
            Library::GroupedMatMulWeightGrad {
                expert_ids, out, ..
            } => self.experts_written(out) + 1 + self.numel(expert_ids),
            Library::IndexAdd { indices, out, .. } => self.dims(out)[0] + 1 + self.numel(indices),
            _ => 0,
        }
    }

    /// How many experts a grouped matmul's weights hold.
    fn experts(&self, weights: &ExpertWeights) -> usize {
        match weights {
            ExpertWeights::Stacked(view) => self.dims(&view.buffer)[0],
            ExpertWeights::Parts(parts) => parts.len(),
        }
    }

    /// How many experts a grouped weight gradient writes.
    fn experts_written(&self, out: &ExpertOutputs) -> usize {
        match out {
            ExpertOutputs::Stacked(stacked) => self.dims(stacked)[0],
            ExpertOutputs::Parts(parts) => parts.len(),
        }
    }

    /// `group_rows` of `ids` (`count` of them) into `groups`, offsets at scratch 0 and members
    /// after them.
    fn group_rows(
        &self,
        ids: BufferId,
        count: usize,
        groups: usize,
    ) -> Result<LibraryStep, String> {
        let args = vec![
            StepArg::Buffer(ids, 0),
            self.int(count, "ids")?,
            self.int(groups, "groups")?,
            StepArg::Scratch(0),
            StepArg::Scratch(groups + 1),
            StepArg::Status,
            self.tag()?,
        ];
        Ok(self.index_step(IndexOp::GroupRows, count, args))
    }

    /// A grouped GEMM (experts' products or their weight gradient): the grouping of
    /// `expert_ids` (`rows` token-slots over `experts`) into the scratch area, then `gemm` over
    /// `grid` reading `[a, b]` with that grouping into `out`, its `sizes` after the buffers.
    fn grouped_gemm(
        &self,
        gemm: F32GemmParams,
        grid: [u32; 3],
        expert_ids: BufferId,
        (rows, experts): (usize, usize),
        [a, b, out]: [BufferId; 3],
        sizes: Vec<StepArg>,
    ) -> Planned {
        let mut args = vec![
            StepArg::Buffer(a, 0),
            StepArg::Buffer(b, 0),
            StepArg::Scratch(0),
            StepArg::Scratch(experts + 1),
            StepArg::Buffer(out, 0),
        ];
        args.extend(sizes);
        Ok(vec![
            self.group_rows(expert_ids, rows, experts)?,
            LibraryStep {
                kernel: LibraryKernel::Gemm(gemm),
                grid,
                args,
            },
        ])
    }

    /// A step of an index operation over `work` items.
    fn index_step(&self, op: IndexOp, work: usize, args: Vec<StepArg>) -> LibraryStep {
        let params = IndexOpParams::new(op);
        LibraryStep {
            kernel: LibraryKernel::Index(params),
            grid: params.grid(work as u64),
            args,
        }
    }

    /// The call's steps: an FP8 GEMM for a product with Hopper's accumulation when the kernels
    /// take it, the f32 templates otherwise.
    pub(super) fn plan_call(&self, call: &Library) -> Result<PlannedCall, String> {
        let accumulation = match call {
            Library::MatMul { accumulation, .. }
            | Library::GroupedMatMul { accumulation, .. }
            | Library::GroupedMatMulWeightGrad { accumulation, .. } => *accumulation,
            _ => Accumulation::Exact,
        };
        if !accumulation.is_exact() && accumulation != Accumulation::HOPPER {
            return Err(format!(
                "accumulation {accumulation} is emulated on the CPU only; on a GPU use `exact` \
                 or `hopper` (the FP8 tensor cores' own)"
            ));
        }
        // With Hopper's accumulation, the FP8 GEMM of this GPU, or why it has none.
        let fp8 = (!accumulation.is_exact()).then(|| {
            self.fp8
                .ok_or_else(|| "this GPU has no FP8 GEMM (before sm_80)".to_owned())
        });
        match call {
            Library::CausalAttention {
                operands,
                shape,
                out,
                lse,
                config,
            } => {
                let planned = forward_steps((shape, operands), (*out, *lse), config)?;
                return Ok(PlannedCall::of(planned, None));
            }
            Library::CausalAttentionGrad {
                operands,
                shape,
                out,
                lse,
                d_out,
                grads,
                config,
            } => {
                let read = [*out, *lse, *d_out];
                let planned = gradient_steps((shape, operands), read, grads, config)?;
                return Ok(PlannedCall::of(planned, None));
            }
            _ => {}
        }
        // The experts' weight gradient that rounds its operands along each expert's rows: its
        // plans round them (`library_expert_wgrad`).
        if let Some((wgrad, group_rows)) = self.rounded_weight_grad(call)? {
            let fp8_plan = fp8.map(|target| wgrad.fp8_steps(target?, group_rows.clone()));
            return fp8_or_f32(fp8_plan, || wgrad.f32_steps(group_rows));
        }
        let f32_plan = || Ok((self.plan(call)?, 0));
        let Some(fp8) = fp8 else {
            return fp8_or_f32(None, f32_plan);
        };
        let fp8_plan = match call {
            // (A product that rounds its operands as it reads them is refused by `plan`.)
            Library::MatMul {
                batch,
                m,
                n,
                k,
                a,
                b,
                out,
                triangular,
                rounds: false,
                ..
            } => fp8.and_then(|target| {
                let matmul = MatMulCall {
                    batch,
                    mnk: (*m, *n, *k),
                    views: [a, b, out],
                    triangular: triangular.is_some(),
                };
                Fp8Product::find(self.program, &matmul)?.steps(target)
            }),
            Library::GroupedMatMul {
                x,
                weights,
                expert_ids,
                out,
                rounds: false,
                ..
            } => fp8.and_then(|target| {
                let grouped = GroupedCall {
                    x: *x,
                    weights,
                    expert_ids: *expert_ids,
                    out: *out,
                };
                let product = Fp8GroupedProduct::find(self.program, &grouped)?;
                let ids = self.dims(expert_ids);
                let experts = self.experts(weights);
                let group_rows = self.group_rows(*expert_ids, ids[0] * ids[1], experts)?;
                product.steps(target, group_rows)
            }),
            // (One that rounds its operands itself was planned above.)
            Library::GroupedMatMulWeightGrad { .. } => Err(
                "the experts' weight gradient's operands are not rounded along each expert's \
                 token-slots (`ExpertTiles`)"
                    .to_owned(),
            ),
            _ => return fp8_or_f32(None, f32_plan),
        };
        fp8_or_f32(Some(fp8_plan), f32_plan)
    }

    /// For a grouped weight gradient that rounds its operands itself: its plans' view of it,
    /// and the `group_rows` step both plans start with.
    fn rounded_weight_grad(
        &self,
        call: &Library,
    ) -> Result<Option<(RoundedExpertWeightGrad, LibraryStep)>, String> {
        let Library::GroupedMatMulWeightGrad {
            cotangent,
            x,
            expert_ids,
            out,
            rounding: Some(tiles),
            ..
        } = call
        else {
            return Ok(None);
        };
        let ExpertOutputs::Stacked(out) = out else {
            return Err(NOT_IN_PARTS.into());
        };
        if self.numel(out) == 0 {
            return Ok(None);
        }
        let weight_grad = WeightGradCall {
            cotangent: *cotangent,
            x: *x,
            expert_ids: *expert_ids,
            out: *out,
            tiles: *tiles,
        };
        let wgrad = RoundedExpertWeightGrad::of(self.program, &weight_grad)?;
        let ids = self.dims(expert_ids);
        let group_rows = self.group_rows(*expert_ids, ids[0] * ids[1], self.dims(out)[0])?;
        Ok(Some((wgrad, group_rows)))
    }

    fn plan(&self, call: &Library) -> Planned {
        if let Library::MatMul { rounds: true, .. }
        | Library::GroupedMatMul { rounds: true, .. }
        | Library::GroupedMatMulWeightGrad { rounds: true, .. } = call
        {
            return Err(NOT_ROUNDING.into());
        }
        match call {
            Library::CrossEntropy { .. } | Library::CrossEntropyGrad { .. } => {
                Err(not_a_routine("cross-entropies", "cross_entropy_routines"))
            }
            Library::Softmax { .. } | Library::SoftmaxGrad { .. } => {
                Err(not_a_routine("softmaxes", "softmax_routines"))
            }
            Library::Swiglu { .. } => Err(not_a_routine("SwiGLU's gating", "swiglu_routines")),
            Library::CausalAttention { .. } | Library::CausalAttentionGrad { .. } => {
                unreachable!("planned by plan_call")
            }
            Library::LinearCrossEntropy { .. } => Err(not_a_routine(
                "heads with their loss",
                "linear_cross_entropy_routines",
            )),
            Library::MatMul {
                batch,
                m,
                n,
                k,
                a,
                b,
                out,
                triangular,
                ..
            } => self.matmul(batch, (*m, *n, *k), [a, b, out], *triangular),
            Library::GroupedMatMul {
                x,
                weights,
                expert_ids,
                out,
                ..
            } => {
                let (ids, xd) = (self.dims(expert_ids), self.dims(x));
                let ExpertWeights::Stacked(weights) = weights else {
                    return Err(NOT_IN_PARTS.into());
                };
                let (experts, n) = (self.dims(&weights.buffer)[0], self.dims(out)[2]);
                let (x_slots, k) = grouped_rows(xd, ids[0]);
                let (rows, slots) = (ids[0] * ids[1], ids[1]);
                if rows == 0 || n == 0 {
                    return Ok(Vec::new());
                }
                let gemm = F32GemmParams::new(F32GemmKind::Grouped);
                let grid = gemm.grouped_grid(
                    self.u32(rows, "token-slots")?,
                    self.u32(experts, "experts")?,
                    self.u32(n, "n")?,
                );
                let sizes = vec![
                    self.int(experts, "experts")?,
                    self.int(slots, "slots")?,
                    self.int(x_slots, "x slots")?,
                    self.int(n, "n")?,
                    self.int(k, "k")?,
                    // W[e][j][p] at e·n·k + j·sn + p·sk (a transposed block read across).
                    self.int(weights.strides[1].unsigned_abs(), "the weights' n stride")?,
                    self.int(weights.strides[2].unsigned_abs(), "the weights' k stride")?,
                ];
                let buffers = [*x, weights.buffer, *out];
                self.grouped_gemm(gemm, grid, *expert_ids, (rows, experts), buffers, sizes)
            }
            Library::GroupedMatMulWeightGrad {
                cotangent,
                x,
                expert_ids,
                out,
                rounding,
                ..
            } => {
                let ExpertOutputs::Stacked(out) = out else {
                    return Err(NOT_IN_PARTS.into());
                };
                let (od, ids) = (self.dims(out), self.dims(expert_ids));
                let (experts, n, k) = (od[0], od[1], od[2]);
                let (rows, slots) = (ids[0] * ids[1], ids[1]);
                if experts * n * k == 0 {
                    return Ok(Vec::new());
                }
                if rounding.is_some() {
                    return Err(
                        "a weight gradient that rounds its operands is planned with the \
                                byte scratch it needs (`RoundedExpertWeightGrad`)"
                            .into(),
                    );
                }
                let gemm = F32GemmParams::new(F32GemmKind::GroupedWeightGrad);
                let grid = gemm.weight_grad_grid(
                    self.u32(experts, "experts")?,
                    self.u32(n, "n")?,
                    self.u32(k, "k")?,
                );
                let sizes = vec![
                    self.int(slots, "slots")?,
                    self.int(grouped_rows(self.dims(x), ids[0]).0, "x slots")?,
                    self.int(n, "n")?,
                    self.int(k, "k")?,
                ];
                let buffers = [*cotangent, *x, *out];
                self.grouped_gemm(gemm, grid, *expert_ids, (rows, experts), buffers, sizes)
            }
            Library::Gather {
                table,
                indices,
                out,
            } => {
                let td = self.dims(table);
                let width: usize = td[1..].iter().product();
                let count = self.numel(indices);
                if count * width == 0 {
                    return Ok(Vec::new());
                }
                let args = vec![
                    StepArg::Buffer(*table, 0),
                    StepArg::Buffer(*indices, 0),
                    StepArg::Buffer(*out, 0),
                    StepArg::I64(count as i64),
                    self.int(td[0], "table rows")?,
                    self.int(width, "row width")?,
                    StepArg::Status,
                    self.tag()?,
                ];
                Ok(vec![self.index_step(IndexOp::Gather, count * width, args)])
            }
            Library::TakeAlong {
                axis,
                x,
                indices,
                out,
            } => {
                let (xd, id) = (self.dims(x), self.dims(indices));
                let outer: usize = xd[..*axis].iter().product();
                let inner: usize = xd[axis + 1..].iter().product();
                let work = self.numel(indices);
                if work == 0 {
                    return Ok(Vec::new());
                }
                let args = vec![
                    StepArg::Buffer(*x, 0),
                    StepArg::Buffer(*indices, 0),
                    StepArg::Buffer(*out, 0),
                    self.int(outer, "outer extent")?,
                    self.int(id[*axis], "indices along the axis")?,
                    self.int(inner, "inner extent")?,
                    self.int(xd[*axis], "x along the axis")?,
                    StepArg::Status,
                    self.tag()?,
                ];
                Ok(vec![self.index_step(IndexOp::TakeAlong, work, args)])
            }
            Library::IndexAdd {
                values,
                indices,
                out,
            } => {
                let od = self.dims(out);
                let (rows, width) = (od[0], od[1..].iter().product::<usize>());
                let count = self.numel(indices);
                if rows * width == 0 {
                    return Ok(Vec::new());
                }
                let args = vec![
                    StepArg::Buffer(*values, 0),
                    StepArg::Scratch(0),
                    StepArg::Scratch(rows + 1),
                    StepArg::Buffer(*out, 0),
                    self.int(rows, "rows")?,
                    self.int(width, "row width")?,
                ];
                Ok(vec![
                    self.group_rows(*indices, count, rows)?,
                    self.index_step(IndexOp::IndexAdd, rows * width, args),
                ])
            }
            Library::OneHot {
                depth,
                indices,
                out,
            } => {
                let count = self.numel(indices);
                if count * depth == 0 {
                    return Ok(Vec::new());
                }
                let args = vec![
                    StepArg::Buffer(*indices, 0),
                    StepArg::Buffer(*out, 0),
                    StepArg::I64(count as i64),
                    self.int(*depth, "depth")?,
                    StepArg::Status,
                    self.tag()?,
                ];
                Ok(vec![self.index_step(IndexOp::OneHot, count * depth, args)])
            }
            Library::TopK { k, x, out } => {
                let len = self.dims(x).last().copied().unwrap_or(1);
                let rows = self.numel(x) / len.max(1);
                if rows * k == 0 {
                    return Ok(Vec::new());
                }
                let args = vec![
                    StepArg::Buffer(*x, 0),
                    StepArg::Buffer(*out, 0),
                    self.int(rows, "rows")?,
                    self.int(len, "row length")?,
                    self.int(*k, "k")?,
                ];
                Ok(vec![self.index_step(IndexOp::TopK, rows, args)])
            }
            Library::QuantizeDequantize {
                format: QuantFormat::E4M3,
                tile_rows,
                tile_cols,
                pow2_scales,
                x,
                out,
            } => {
                // Tiled in the output's shape: `x` may hold the same elements in another.
                let dims = self.dims(out);
                let rank = dims.len();
                let cols = dims.last().copied().unwrap_or(1);
                let rows = if rank >= 2 { dims[rank - 2] } else { 1 };
                let matrices: usize = dims[..rank.saturating_sub(2)].iter().product();
                if matrices * rows * cols == 0 {
                    return Ok(Vec::new());
                }
                let params = FakeQuantizeParams {
                    pow2_scales: *pow2_scales,
                };
                let tile = (*tile_rows as u64, *tile_cols as u64);
                let grid = params
                    .grid(matrices as u64, (rows as u64, cols as u64), tile)
                    .ok_or_else(|| "more tiles than a grid holds".to_owned())?;
                Ok(vec![LibraryStep {
                    kernel: LibraryKernel::FakeQuantize(params),
                    grid,
                    args: vec![
                        StepArg::Buffer(*x, 0),
                        StepArg::Buffer(*out, 0),
                        self.int(rows, "rows")?,
                        self.int(cols, "cols")?,
                        self.int(*tile_rows, "tile rows")?,
                        self.int(*tile_cols, "tile cols")?,
                    ],
                }])
            }
        }
    }

    fn u32(&self, value: usize, what: &str) -> Result<u32, String> {
        u32::try_from(value).map_err(|_| format!("{what} = {value} is too large for a grid"))
    }

    /// The batched GEMM on the three views (`[a, b, out]`, each `batch.len() + 2` strides).
    fn matmul(
        &self,
        batch: &[usize],
        (m, n, k): (usize, usize, usize),
        views: [&View; 3],
        triangular: Option<Triangular>,
    ) -> Planned {
        let batches: usize = batch.iter().product();
        if batches * m * n == 0 {
            return Ok(Vec::new());
        }
        // The kernel walks the batch with an int index.
        self.int(batches, "batches")?;
        let rank = batch.len();
        let axes = merged_batch_axes(batch, views.map(|v| &v.strides[..rank]));
        if axes.len() > MAX_BATCH_AXES {
            return Err(format!(
                "{} batch axes that cannot be merged (batch {batch:?}); the f32 GEMM takes {MAX_BATCH_AXES}",
                axes.len()
            ));
        }
        // Unused leading axes: extent 1, stride 0.
        let mut padded = vec![(1usize, [0isize; 3]); MAX_BATCH_AXES - axes.len()];
        padded.extend(axes);
        let gemm = F32GemmParams::new(F32GemmKind::Batched);
        let mut args: Vec<StepArg> = views
            .iter()
            .map(|v| StepArg::Buffer(v.buffer, v.offset))
            .collect();
        args.extend([self.int(m, "m")?, self.int(n, "n")?, self.int(k, "k")?]);
        for (extent, _) in &padded {
            args.push(self.int(*extent, "batch extent")?);
        }
        for (operand, view) in views.iter().enumerate() {
            args.extend(padded.iter().map(|(_, s)| StepArg::I64(s[operand] as i64)));
            args.push(StepArg::I64(view.strides[rank] as i64));
            args.push(StepArg::I64(view.strides[rank + 1] as i64));
        }
        // Each matrix's triangle as the template's `Keep`: 0 all, 1 lower, 2 upper.
        let keep = |part: MatMulPart| match triangular {
            Some(t) if t.part == part => match t.triangle {
                Triangle::Lower => 1,
                Triangle::Upper => 2,
            },
            _ => 0,
        };
        args.extend(
            [MatMulPart::Left, MatMulPart::Right, MatMulPart::Output]
                .map(|p| StepArg::I32(keep(p))),
        );
        let grid = gemm.batched_grid(
            self.u32(m, "m")?,
            self.u32(n, "n")?,
            self.u32(batches, "batches")?,
        );
        Ok(vec![LibraryStep {
            kernel: LibraryKernel::Gemm(gemm),
            grid,
            args,
        }])
    }
}

/// The batch axes as (extent, stride of a, b and out), axes of extent 1 dropped and each axis
/// folded into the next one when all three views step over it as one longer axis (stride =
/// next stride × next extent), so that e.g. `[batch, heads]` becomes one axis.
pub(crate) fn merged_batch_axes(
    batch: &[usize],
    strides: [&[isize]; 3],
) -> Vec<(usize, [isize; 3])> {
    let mut axes: Vec<(usize, [isize; 3])> = Vec::new();
    for (d, &extent) in batch.iter().enumerate() {
        if extent == 1 {
            continue;
        }
        let s = strides.map(|s| s[d]);
        match axes.last_mut() {
            Some((outer, outer_s)) if (0..3).all(|i| outer_s[i] == s[i] * extent as isize) => {
                *outer *= extent;
                *outer_s = s;
            }
            _ => axes.push((extent, s)),
        }
    }
    axes
}
