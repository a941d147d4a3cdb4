//! The kernel IR's attention calls on the GPU: `fathom-kernels`' flash-attention templates
//! (`mla_attention_fwd`, `mla_attention_bwd_delta`, `mla_attention_bwd`, BF16 operands, FP32
//! softmax and accumulation) with the conversions around them.
//!
//! | IR call | steps |
//! |---|---|
//! | `CausalAttention` | `convert_f32_bf16_rows` × 4 (q, k_nope, k_rope, v, read where they lie, into the byte scratch), `mla_attention_fwd` (bf16 output, f32 statistic into `lse` or the scratch), `convert_bf16_f32` into `out` |
//! | `CausalAttentionGrad` | `convert_f32_bf16_rows` × 6 (the operands, the forward's output, the cotangent), `fill_zero_f32` of dq and dk_rope (accumulated), `mla_attention_bwd_delta`, `mla_attention_bwd` writing the f32 gradients where the call wants them (a gradient not wanted goes to the scratch) |
//!
//! The conversions read an operand's rows where they lie (`kernel::AttentionRows`): MLA's
//! `k_nope` and `v` are the two halves of each head's slice of one projection, converted from
//! it without an f32 copy of either.
//!
//! What the templates compute against the op's definition (`graph::Op::CausalAttention` with
//! `products_in` bf16, which is the only kind the lowering keeps whole for this plan): the same
//! bf16 operands and f32 sums, except that the forward's output is stored in bf16 (one more
//! rounding, 2⁻⁹ relative), the probabilities that weigh the values are rounded before the
//! softmax's normalisation rather than after it, and the backward's `Σ P ⊙ dP` is computed as
//! `Σ dO ⊙ O` of the bf16 output (flash-attention's identity). `fathom gpu-check` states the
//! tolerance these leave.

use fathom_compiler::graph::AttentionConfig;
use fathom_compiler::kernel::{AttentionRows, AttentionShape, BufferId};
use fathom_kernels::{
    ConvertKind, ConvertParams, MlaAttentionBwdParams, MlaAttentionFwdParams, MlaHeadDims,
};

use super::{LibraryKernel, LibraryStep, StepArg, int_arg};
use crate::cuda::library_fp8::ScratchLayout;

/// A plan's steps and the bytes of scratch they use.
type Planned = Result<(Vec<LibraryStep>, usize), String>;

/// The extents of an attention call's operands.
struct Extents {
    shape: AttentionShape,
    dims: MlaHeadDims,
}

impl Extents {
    fn of(shape: &AttentionShape) -> Result<Self, String> {
        let width = |w: usize| u32::try_from(w).map_err(|_| format!("head width {w} too large"));
        Ok(Extents {
            shape: *shape,
            dims: MlaHeadDims {
                nope: width(shape.nope)?,
                rope: width(shape.rope)?,
                v: width(shape.v)?,
            },
        })
    }

    /// Elements of a `[b, t, h, width]` tensor.
    fn per_head(&self, width: u32) -> usize {
        self.shape.batch * self.shape.tokens * self.shape.heads * width as usize
    }

    /// Elements of `[q, k_nope, k_rope, v]`, dense (their gradients).
    fn operand_sizes(&self) -> [usize; 4] {
        self.shape.operand_rows().map(|(rows, width)| rows * width)
    }

    /// The operands converted to dense bf16 into new regions of `scratch`; the regions'
    /// arguments.
    fn operands_to_bf16(
        &self,
        operands: &[AttentionRows; 4],
        steps: &mut Vec<LibraryStep>,
        scratch: &mut ScratchLayout,
    ) -> Result<Vec<StepArg>, String> {
        operands
            .iter()
            .zip(self.shape.operand_rows())
            .map(|(&from, rows)| to_bf16(steps, scratch, from, rows))
            .collect()
    }

    /// A dense `[b, t, h, v]` tensor (the output, its cotangent) as rows.
    fn dense_values(&self, buffer: BufferId) -> (AttentionRows, (usize, usize)) {
        let width = self.dims.v as usize;
        let rows = AttentionRows {
            buffer,
            offset: 0,
            row_stride: width,
        };
        (
            rows,
            (
                self.shape.batch * self.shape.tokens * self.shape.heads,
                width,
            ),
        )
    }

    /// Elements of a per-query statistic `[b, h, t]`.
    fn per_query(&self) -> usize {
        self.shape.batch * self.shape.heads * self.shape.tokens
    }

    fn grid_dims(&self) -> Result<(u32, u32, u32), String> {
        let u32_of = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| format!("{what} = {v} is too large for a grid"))
        };
        Ok((
            u32_of(self.shape.batch, "batch")?,
            u32_of(self.shape.tokens, "tokens")?,
            u32_of(self.shape.heads, "heads")?,
        ))
    }

    /// `seq_len, heads, softmax_scale`, the templates' last arguments.
    fn shape_args(&self, config: &AttentionConfig) -> Result<[StepArg; 3], String> {
        Ok([
            int_arg(self.shape.tokens, "tokens")?,
            int_arg(self.shape.heads, "heads")?,
            StepArg::F32(config.scale as f32),
        ])
    }
}

/// A conversion step over `n` elements.
fn convert(kind: ConvertKind, from: Option<StepArg>, to: StepArg, n: usize) -> LibraryStep {
    let params = ConvertParams::new(kind);
    let mut args: Vec<StepArg> = from.into_iter().collect();
    args.extend([to, StepArg::I64(n as i64)]);
    LibraryStep {
        kernel: LibraryKernel::Convert(params),
        grid: params.grid(n as u64),
        args,
    }
}

/// The `rows × width` f32 values of `from` as dense bf16 in a new region of `scratch`; the
/// region's argument.
fn to_bf16(
    steps: &mut Vec<LibraryStep>,
    scratch: &mut ScratchLayout,
    from: AttentionRows,
    (rows, width): (usize, usize),
) -> Result<StepArg, String> {
    if from.row_stride < width {
        return Err(format!(
            "rows of {} at stride {} overlap (width {width})",
            from.buffer, from.row_stride
        ));
    }
    let region = StepArg::Bytes(scratch.region(2 * rows * width));
    let params = ConvertParams::new(ConvertKind::F32RowsToBf16);
    let long = |n: usize| StepArg::I64(n as i64);
    steps.push(LibraryStep {
        kernel: LibraryKernel::Convert(params),
        grid: params.grid(rows as u64),
        args: vec![
            StepArg::Buffer(from.buffer, from.offset),
            region,
            long(rows),
            long(width),
            long(from.row_stride),
        ],
    });
    Ok(region)
}

/// `buffer`, or a new f32 region of `n` values in `scratch` where there is none.
fn f32_or_scratch(scratch: &mut ScratchLayout, buffer: Option<BufferId>, n: usize) -> StepArg {
    match buffer {
        Some(b) => StepArg::Buffer(b, 0),
        None => StepArg::Bytes(scratch.region(4 * n)),
    }
}

/// What both plans start with: the operands' extents, the templates' grid sizes, and the
/// steps converting the operands to bf16 into the scratch, with their regions.
struct Start {
    x: Extents,
    grid: (u32, u32, u32),
    steps: Vec<LibraryStep>,
    scratch: ScratchLayout,
    bf16_operands: Vec<StepArg>,
}

impl Start {
    /// `None` for an empty problem (nothing to launch); an error names what the template
    /// (checked by `validate`) refuses.
    fn of(
        shape: &AttentionShape,
        operands: &[AttentionRows; 4],
        validate: impl FnOnce(MlaHeadDims) -> Result<(), fathom_kernels::KernelError>,
    ) -> Result<Option<Start>, String> {
        let x = Extents::of(shape)?;
        validate(x.dims).map_err(|e| e.to_string())?;
        let grid = x.grid_dims()?;
        if x.per_query() == 0 {
            return Ok(None);
        }
        let (mut steps, mut scratch) = (Vec::new(), ScratchLayout::default());
        let bf16_operands = x.operands_to_bf16(operands, &mut steps, &mut scratch)?;
        Ok(Some(Start {
            x,
            grid,
            steps,
            scratch,
            bf16_operands,
        }))
    }
}

/// The forward's steps (see the module docs).
pub(super) fn forward_steps(
    (shape, operands): (&AttentionShape, &[AttentionRows; 4]),
    (out, lse): (Option<BufferId>, Option<BufferId>),
    config: &AttentionConfig,
) -> Planned {
    let validate = |dims| MlaAttentionFwdParams::new(dims).validate();
    let Some(start) = Start::of(shape, operands, validate)? else {
        return Ok((Vec::new(), 0));
    };
    let Start {
        x,
        grid: (batch, tokens, heads),
        mut steps,
        mut scratch,
        bf16_operands: mut args,
    } = start;
    let params = MlaAttentionFwdParams::new(x.dims);
    let outputs = x.per_head(x.dims.v);
    let o = StepArg::Bytes(scratch.region(2 * outputs));
    args.extend([o, f32_or_scratch(&mut scratch, lse, x.per_query())]);
    args.extend(x.shape_args(config)?);
    steps.push(LibraryStep {
        kernel: LibraryKernel::AttentionForward(params),
        grid: params.grid(batch, tokens, heads),
        args,
    });
    if let Some(out) = out {
        steps.push(convert(
            ConvertKind::Bf16ToF32,
            Some(o),
            StepArg::Buffer(out, 0),
            outputs,
        ));
    }
    Ok((steps, scratch.bytes))
}

/// The gradients' steps (see the module docs).
pub(super) fn gradient_steps(
    (shape, operands): (&AttentionShape, &[AttentionRows; 4]),
    [out, lse, d_out]: [BufferId; 3],
    grads: &[Option<BufferId>; 4],
    config: &AttentionConfig,
) -> Planned {
    let validate = |dims| MlaAttentionBwdParams::new(dims).validate();
    let Some(start) = Start::of(shape, operands, validate)? else {
        return Ok((Vec::new(), 0));
    };
    let Start {
        x,
        grid: (batch, tokens, heads),
        mut steps,
        mut scratch,
        bf16_operands: bf16,
    } = start;
    let params = MlaAttentionBwdParams::new(x.dims);
    let sizes = x.operand_sizes();
    let (out, out_rows) = x.dense_values(out);
    let o = to_bf16(&mut steps, &mut scratch, out, out_rows)?;
    let (d_out, d_out_rows) = x.dense_values(d_out);
    let d_o = to_bf16(&mut steps, &mut scratch, d_out, d_out_rows)?;
    let delta = StepArg::Bytes(scratch.region(4 * x.per_query()));
    let written: Vec<StepArg> = grads
        .iter()
        .zip(sizes)
        .map(|(&grad, n)| f32_or_scratch(&mut scratch, grad, n))
        .collect();
    // dq and dk_rope are accumulated with atomics.
    for i in [0, 2] {
        steps.push(convert(ConvertKind::ZeroF32, None, written[i], sizes[i]));
    }
    steps.push(LibraryStep {
        kernel: LibraryKernel::AttentionDelta(params),
        grid: params.delta_grid(batch, tokens, heads),
        args: vec![
            o,
            d_o,
            delta,
            int_arg(x.shape.batch, "batch")?,
            int_arg(x.shape.tokens, "tokens")?,
            int_arg(x.shape.heads, "heads")?,
        ],
    });
    let mut args = bf16;
    args.extend([d_o, StepArg::Buffer(lse, 0), delta]);
    args.extend(written);
    args.extend(x.shape_args(config)?);
    steps.push(LibraryStep {
        kernel: LibraryKernel::AttentionBackward(params),
        grid: params.grid(batch, tokens, heads),
        args,
    });
    Ok((steps, scratch.bytes))
}
