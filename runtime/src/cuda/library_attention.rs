//! The kernel IR's attention calls on the GPU: `fathom-kernels`' flash-attention templates
//! (`mla_attention_fwd`, `mla_attention_bwd_delta`, `mla_attention_bwd`, BF16 operands, FP32
//! softmax and accumulation) with the conversions around them.
//!
//! | IR call | steps |
//! |---|---|
//! | `CausalAttention` | `convert_f32_bf16` × 4 (q, k_nope, k_rope, v into the byte scratch), `mla_attention_fwd` (bf16 output, f32 statistic into `lse` or the scratch), `convert_bf16_f32` into `out` |
//! | `CausalAttentionGrad` | `convert_f32_bf16` × 6 (the operands, the forward's output, the cotangent), `fill_zero_f32` of dq and dk_rope (accumulated), `mla_attention_bwd_delta`, `mla_attention_bwd` writing the f32 gradients where the call wants them (a gradient not wanted goes to the scratch) |
//!
//! What the templates compute against the op's definition (`graph::Op::CausalAttention` with
//! `products_in` bf16, which is the only kind the lowering keeps whole for this plan): the same
//! bf16 operands and f32 sums, except that the forward's output is stored in bf16 (one more
//! rounding, 2⁻⁹ relative), the probabilities that weigh the values are rounded before the
//! softmax's normalisation rather than after it, and the backward's `Σ P ⊙ dP` is computed as
//! `Σ dO ⊙ O` of the bf16 output (flash-attention's identity). `fathom gpu-check` states the
//! tolerance these leave.

use fathom_compiler::graph::AttentionConfig;
use fathom_compiler::kernel::{BufferId, Program};
use fathom_kernels::{
    ConvertKind, ConvertParams, MlaAttentionBwdParams, MlaAttentionFwdParams, MlaHeadDims,
};

use super::{LibraryKernel, LibraryStep, StepArg, int_arg};
use crate::cuda::library_fp8::ScratchLayout;

/// A plan's steps and the bytes of scratch they use.
type Planned = Result<(Vec<LibraryStep>, usize), String>;

/// The extents of an attention call's operands.
struct Extents {
    batch: usize,
    tokens: usize,
    heads: usize,
    dims: MlaHeadDims,
}

impl Extents {
    fn of(program: &Program, [q, k_nope, _, v]: &[BufferId; 4]) -> Result<Self, String> {
        let dims = |b: &BufferId| program.buffer(*b).ty.dims().to_vec();
        let (q, nope, v) = (dims(q), dims(k_nope)[3], dims(v)[3]);
        let width = |w: usize| u32::try_from(w).map_err(|_| format!("head width {w} too large"));
        Ok(Extents {
            batch: q[0],
            tokens: q[1],
            heads: q[2],
            dims: MlaHeadDims {
                nope: width(nope)?,
                rope: width(q[3] - nope)?,
                v: width(v)?,
            },
        })
    }

    /// Elements of a `[b, t, h, width]` tensor.
    fn per_head(&self, width: u32) -> usize {
        self.batch * self.tokens * self.heads * width as usize
    }

    /// Elements of `k_rope` `[b, t, rope]`.
    fn rope_key(&self) -> usize {
        self.batch * self.tokens * self.dims.rope as usize
    }

    /// Elements of `[q, k_nope, k_rope, v]`.
    fn operand_sizes(&self) -> [usize; 4] {
        [
            self.per_head(self.dims.qk()),
            self.per_head(self.dims.nope),
            self.rope_key(),
            self.per_head(self.dims.v),
        ]
    }

    /// The operands converted to bf16 into new regions of `scratch`; the regions' arguments.
    fn operands_to_bf16(
        &self,
        operands: &[BufferId; 4],
        steps: &mut Vec<LibraryStep>,
        scratch: &mut ScratchLayout,
    ) -> Vec<StepArg> {
        operands
            .iter()
            .zip(self.operand_sizes())
            .map(|(&b, n)| to_bf16(steps, scratch, b, n))
            .collect()
    }

    /// Elements of a per-query statistic `[b, h, t]`.
    fn per_query(&self) -> usize {
        self.batch * self.heads * self.tokens
    }

    fn grid_dims(&self) -> Result<(u32, u32, u32), String> {
        let u32_of = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| format!("{what} = {v} is too large for a grid"))
        };
        Ok((
            u32_of(self.batch, "batch")?,
            u32_of(self.tokens, "tokens")?,
            u32_of(self.heads, "heads")?,
        ))
    }

    /// `seq_len, heads, softmax_scale`, the templates' last arguments.
    fn shape_args(&self, config: &AttentionConfig) -> Result<[StepArg; 3], String> {
        Ok([
            int_arg(self.tokens, "tokens")?,
            int_arg(self.heads, "heads")?,
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

/// `buffer`'s `n` f32 values as bf16 in a new region of `scratch`; the region's argument.
fn to_bf16(
    steps: &mut Vec<LibraryStep>,
    scratch: &mut ScratchLayout,
    buffer: BufferId,
    n: usize,
) -> StepArg {
    let region = StepArg::Bytes(scratch.region(2 * n));
    steps.push(convert(
        ConvertKind::F32ToBf16,
        Some(StepArg::Buffer(buffer, 0)),
        region,
        n,
    ));
    region
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
        program: &Program,
        operands: &[BufferId; 4],
        validate: impl FnOnce(MlaHeadDims) -> Result<(), fathom_kernels::KernelError>,
    ) -> Result<Option<Start>, String> {
        let x = Extents::of(program, operands)?;
        validate(x.dims).map_err(|e| e.to_string())?;
        let grid = x.grid_dims()?;
        if x.per_query() == 0 {
            return Ok(None);
        }
        let (mut steps, mut scratch) = (Vec::new(), ScratchLayout::default());
        let bf16_operands = x.operands_to_bf16(operands, &mut steps, &mut scratch);
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
    program: &Program,
    operands: &[BufferId; 4],
    (out, lse): (Option<BufferId>, Option<BufferId>),
    config: &AttentionConfig,
) -> Planned {
    let validate = |dims| MlaAttentionFwdParams::new(dims).validate();
    let Some(start) = Start::of(program, operands, validate)? else {
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
    program: &Program,
    operands: &[BufferId; 4],
    [out, lse, d_out]: [BufferId; 3],
    grads: &[Option<BufferId>; 4],
    config: &AttentionConfig,
) -> Planned {
    let validate = |dims| MlaAttentionBwdParams::new(dims).validate();
    let Some(start) = Start::of(program, operands, validate)? else {
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
    let outputs = x.per_head(x.dims.v);
    let o = to_bf16(&mut steps, &mut scratch, out, outputs);
    let d_o = to_bf16(&mut steps, &mut scratch, d_out, outputs);
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
            int_arg(x.batch, "batch")?,
            int_arg(x.tokens, "tokens")?,
            int_arg(x.heads, "heads")?,
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
