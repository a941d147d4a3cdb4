//! The kernel IR's attention calls on the GPU: `fathom-kernels`' flash-attention templates
//! (`mla_attention_fwd`, `mla_attention_bwd_delta`, `mla_attention_bwd`, BF16 operands, FP32
//! softmax and accumulation) with the conversions around them.
//!
//! | IR call | steps |
//! |---|---|
//! | `CausalAttention` | `convert_rows_f32_bf16` for q (twice when its halves are padded), k_nope, k_rope and v into the byte scratch, `mla_attention_fwd` (bf16 output, f32 statistic into `lse` or the scratch), `convert_rows_bf16_f32` into `out` |
//! | `CausalAttentionGrad` | the operands' conversions, and the forward's output's and the cotangent's, `fill_zero_f32` of dq and dk_rope (accumulated), `mla_attention_bwd_delta`, `mla_attention_bwd` writing the f32 gradients where the call wants them (a gradient not wanted goes to the scratch); with padded heads into the scratch, and `convert_rows_f32_f32` copies their channels out |
//!
//! The conversions read an operand's rows where they lie (`kernel::AttentionRows`): MLA's
//! `k_nope` and `v` are the two halves of each head's slice of one projection, converted from
//! it without an f32 copy of either. They also pad the heads with zero channels to the widths
//! the templates take (`cuda::attention_calls`: `nope` and `rope` to multiples of 16, `v` to
//! 64): a zero channel adds nothing to a score or an output, so the attention is the same, and
//! the padded channels of the gradients are left in the scratch.
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

/// `width` channels of an operand's rows at channel `from` in the program's layout and at
/// `to` in the templates' (padded) layout, followed there by zeros up to `padded`.
#[derive(Clone, Copy)]
struct Segment {
    from: usize,
    width: usize,
    to: usize,
    padded: usize,
}

/// An operand (or its gradient) in both layouts: `rows` rows of `width` channels in the
/// program, of `padded` in the templates, made of `segments`.
struct Layout {
    rows: usize,
    width: usize,
    padded: usize,
    segments: Vec<Segment>,
}

impl Layout {
    /// One run of channels, padded at its end.
    fn single(rows: usize, width: usize, padded: usize) -> Self {
        let segment = Segment {
            from: 0,
            width,
            to: 0,
            padded,
        };
        Layout {
            rows,
            width,
            padded,
            segments: vec![segment],
        }
    }

    fn is_padded(&self) -> bool {
        self.padded != self.width
    }

    /// Elements in the templates' layout.
    fn padded_len(&self) -> usize {
        self.rows * self.padded
    }
}

/// The extents of an attention call: its operands' in the program and the head widths the
/// templates run (padded).
struct Extents {
    shape: AttentionShape,
    dims: MlaHeadDims,
}

impl Extents {
    fn of(shape: &AttentionShape) -> Result<Self, String> {
        let widths = [shape.nope, shape.rope, shape.v];
        let [nope, rope, v] = super::super::attention_calls()
            .padded_widths(widths)
            .ok_or_else(|| {
                format!(
                    "head widths {} + {} and {} are past what the attention templates take",
                    shape.nope, shape.rope, shape.v
                )
            })?;
        let width = |w: usize| u32::try_from(w).map_err(|_| format!("head width {w} too large"));
        Ok(Extents {
            shape: *shape,
            dims: MlaHeadDims {
                nope: width(nope)?,
                rope: width(rope)?,
                v: width(v)?,
            },
        })
    }

    /// Rows of a `[b, t, h, ·]` tensor.
    fn head_rows(&self) -> usize {
        self.shape.batch * self.shape.tokens * self.shape.heads
    }

    /// `[q, k_nope, k_rope, v]`'s layouts. q's halves are padded each (`[nope, 0…, rope,
    /// 0…]`), so that the template's split of its channels falls where the key's does.
    fn operand_layouts(&self) -> [Layout; 4] {
        let s = &self.shape;
        let (nope, rope) = (self.dims.nope as usize, self.dims.rope as usize);
        let per_head = self.head_rows();
        let q = if nope == s.nope {
            Layout::single(per_head, s.nope + s.rope, nope + rope)
        } else {
            let halves = vec![
                Segment {
                    from: 0,
                    width: s.nope,
                    to: 0,
                    padded: nope,
                },
                Segment {
                    from: s.nope,
                    width: s.rope,
                    to: nope,
                    padded: rope,
                },
            ];
            Layout {
                rows: per_head,
                width: s.nope + s.rope,
                padded: nope + rope,
                segments: halves,
            }
        };
        [
            q,
            Layout::single(per_head, s.nope, nope),
            Layout::single(s.batch * s.tokens, s.rope, rope),
            self.values(),
        ]
    }

    /// The layout of a `[b, t, h, v]` tensor (values, the output, its cotangent).
    fn values(&self) -> Layout {
        Layout::single(self.head_rows(), self.shape.v, self.dims.v as usize)
    }

    /// Elements of a per-query statistic `[b, h, t]`.
    fn per_query(&self) -> usize {
        self.head_rows()
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

/// `arg` moved on by `elements` of `bytes` each.
fn advance(arg: StepArg, elements: usize, bytes: usize) -> StepArg {
    match arg {
        StepArg::Buffer(b, offset) => StepArg::Buffer(b, offset + elements),
        StepArg::Bytes(offset) => StepArg::Bytes(offset + elements * bytes),
        other => other,
    }
}

/// The steps converting `layout`'s rows between the program's layout at `program` (rows
/// `program_stride` apart) and the templates' at `padded` — towards the templates (zeros in
/// the padding) or, `back`, towards the program (the padding dropped).
fn convert_rows(
    steps: &mut Vec<LibraryStep>,
    kind: ConvertKind,
    (layout, back): (&Layout, bool),
    (program, program_stride): (StepArg, usize),
    padded: StepArg,
) {
    let params = ConvertParams::new(kind);
    let (from, to) = params.elements().expect("a conversion over rows");
    let (from_bytes, to_bytes) = (from.bytes(), to.bytes());
    for s in &layout.segments {
        let (x, y, x_stride, y_stride, padded_width) = if back {
            let x = advance(padded, s.to, from_bytes);
            let y = advance(program, s.from, to_bytes);
            (x, y, layout.padded, program_stride, s.width)
        } else {
            let x = advance(program, s.from, from_bytes);
            let y = advance(padded, s.to, to_bytes);
            (x, y, program_stride, layout.padded, s.padded)
        };
        let long = |n: usize| StepArg::I64(n as i64);
        steps.push(LibraryStep {
            kernel: LibraryKernel::Convert(params),
            grid: params.grid(layout.rows as u64),
            args: vec![
                x,
                y,
                long(layout.rows),
                long(s.width),
                long(padded_width),
                long(x_stride),
                long(y_stride),
            ],
        });
    }
}

/// The rows of `from` as padded bf16 in a new region of `scratch`; the region's argument.
fn to_bf16(
    steps: &mut Vec<LibraryStep>,
    scratch: &mut ScratchLayout,
    from: AttentionRows,
    layout: &Layout,
) -> Result<StepArg, String> {
    if from.row_stride < layout.width {
        return Err(format!(
            "rows of {} at stride {} overlap (width {})",
            from.buffer, from.row_stride, layout.width
        ));
    }
    let region = StepArg::Bytes(scratch.region(2 * layout.padded_len()));
    let program = (StepArg::Buffer(from.buffer, from.offset), from.row_stride);
    convert_rows(
        steps,
        ConvertKind::F32ToBf16,
        (layout, false),
        program,
        region,
    );
    Ok(region)
}

/// A dense buffer of the program read as rows of `layout`.
fn dense_rows(buffer: BufferId, layout: &Layout) -> AttentionRows {
    AttentionRows {
        buffer,
        offset: 0,
        row_stride: layout.width,
    }
}

/// What both plans start with: the operands' extents and layouts, the templates' grid sizes,
/// and the steps converting the operands to bf16 into the scratch, with their regions.
struct Start {
    x: Extents,
    layouts: [Layout; 4],
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
        let layouts = x.operand_layouts();
        let bf16_operands = operands
            .iter()
            .zip(&layouts)
            .map(|(&from, layout)| to_bf16(&mut steps, &mut scratch, from, layout))
            .collect::<Result<_, _>>()?;
        Ok(Some(Start {
            x,
            layouts,
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
        ..
    } = start;
    let params = MlaAttentionFwdParams::new(x.dims);
    let values = x.values();
    let o = StepArg::Bytes(scratch.region(2 * values.padded_len()));
    let lse = match lse {
        Some(b) => StepArg::Buffer(b, 0),
        None => StepArg::Bytes(scratch.region(4 * x.per_query())),
    };
    args.extend([o, lse]);
    args.extend(x.shape_args(config)?);
    steps.push(LibraryStep {
        kernel: LibraryKernel::AttentionForward(params),
        grid: params.grid(batch, tokens, heads),
        args,
    });
    if let Some(out) = out {
        let program = (StepArg::Buffer(out, 0), values.width);
        convert_rows(
            &mut steps,
            ConvertKind::Bf16ToF32,
            (&values, true),
            program,
            o,
        );
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
        layouts,
        grid: (batch, tokens, heads),
        mut steps,
        mut scratch,
        bf16_operands: bf16,
    } = start;
    let params = MlaAttentionBwdParams::new(x.dims);
    let values = x.values();
    let o = to_bf16(&mut steps, &mut scratch, dense_rows(out, &values), &values)?;
    let d_o = to_bf16(
        &mut steps,
        &mut scratch,
        dense_rows(d_out, &values),
        &values,
    )?;
    let delta = StepArg::Bytes(scratch.region(4 * x.per_query()));
    // Where the template writes each gradient: the program's buffer when it is wanted and not
    // padded, else the scratch (copied out after when wanted).
    let written: Vec<StepArg> = grads
        .iter()
        .zip(&layouts)
        .map(|(&grad, layout)| match grad {
            Some(b) if !layout.is_padded() => StepArg::Buffer(b, 0),
            _ => StepArg::Bytes(scratch.region(4 * layout.padded_len())),
        })
        .collect();
    // dq and dk_rope are accumulated with atomics.
    for i in [0, 2] {
        let params = ConvertParams::new(ConvertKind::ZeroF32);
        let n = layouts[i].padded_len();
        steps.push(LibraryStep {
            kernel: LibraryKernel::Convert(params),
            grid: params.grid(n as u64),
            args: vec![written[i], StepArg::I64(n as i64)],
        });
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
    args.extend(written.iter().copied());
    args.extend(x.shape_args(config)?);
    steps.push(LibraryStep {
        kernel: LibraryKernel::AttentionBackward(params),
        grid: params.grid(batch, tokens, heads),
        args,
    });
    for ((grad, layout), from) in grads.iter().zip(&layouts).zip(written) {
        if let Some(b) = grad.filter(|_| layout.is_padded()) {
            let program = (StepArg::Buffer(b, 0), layout.width);
            convert_rows(
                &mut steps,
                ConvertKind::F32ToF32,
                (layout, true),
                program,
                from,
            );
        }
    }
    Ok((steps, scratch.bytes))
}
