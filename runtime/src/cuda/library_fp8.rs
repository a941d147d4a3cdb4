//! FP8 products on the GPU. The precision pass rounds an FP8 GEMM's operands with
//! `QuantizeDequantize` (E4M3, DeepSeek-V3's tiles) and marks the product with Hopper's
//! accumulation (`Accumulation::HOPPER`); such a `MatMul` runs as a real FP8 GEMM:
//!
//! 1. `quantize` makes each operand's E4M3 codes and scales, in the orientation and scale layout
//!    the GEMM reads, from the operand buffer the matmul reads (the rounded values; quantising
//!    them again gives back the same codes, see below);
//! 2. the FP8 GEMM multiplies the codes, promoting each 128-wide K block's partial sums to f32
//!    with both scales applied: `fp8_gemm` (wgmma and TMA) on `sm_90a`, the portable
//!    `fp8_gemm_fallback` (`mma.sync`) on other GPUs from `sm_80` on.
//!
//! | operand | tiles of the rounding | as the matmul reads it | `quantize` | GEMM scales |
//! |---|---|---|---|---|
//! | A `[M][K]` | 1×128 of `[rows][K]` | rows (batch axes merged into M) | `1x128` | 1×128 |
//! | A `[M][K]` | 128×1 of `[K][M]` | transposed | `128x1t` | 1×128 |
//! | B `[K][N]` | 128×128 of `[K][N]` | as stored | `128x128t` | 128×128 |
//! | B `[K][N]` | 128×128 of `[N][K]` | transposed | `128x128` | 128×128 |
//! | B `[K][N]` | 1×128 of `[N][K]` | transposed | `1x128` | 1×128 (B as an activation) |
//! | B `[K][N]` | 128×1 of `[K][N]` | as stored | `128x1t` | 1×128 |
//!
//! A product the FP8 GEMM cannot take (other tiles, operands that are slices or batched
//! weights, K not a multiple of 16, …) runs as the f32 GEMM over the rounded operands, which
//! sums at least as exactly as the tensor cores; `Fp8Product::find` says why, and the plan's
//! table shows it.
//!
//! Why quantising the rounded values again is exact: a tile's largest element `amax` became
//! `448·s` (its code is the largest, 448), so the second scale `448·s / 448` is `s` up to one
//! f32 rounding, and every `code·s / s'` lies within 2⁻²³ of `code`, which E4M3 rounds back to
//! `code`. With power-of-two scales the second scale may halve (when the largest code is 224),
//! which doubles every code: the same values again. The CPU tests (`library_fp8_tests.rs`) check
//! it on every FP8 product of the `small` model's training step.

use fathom_compiler::graph::QuantFormat;
use fathom_compiler::kernel::{BufferId, KernelBody, Library, Program, View};
use fathom_kernels::{
    BScaling, FallbackGemmParams, Fp8GemmParams, GemmGrouping, GemmOutput, GemmProblem,
    KernelParam, QuantizeInput, QuantizeKind, QuantizeParams,
};

use super::gemm_choice::{GemmChoice, GemmForm};
use super::library::{LibraryCall, LibraryKernel, LibraryStep, Place, StepArg, merged_batch_axes};
use super::library_fp8_weight_codes::FromWeights;
use super::modules::args_by_name;

/// Which FP8 GEMM a device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Target {
    /// `fp8_gemm`: wgmma and TMA, `sm_90a` only.
    Hopper,
    /// `fp8_gemm_fallback`: `mma.sync` on codes widened to bf16, any GPU from `sm_80` on.
    Portable,
}

impl Fp8Target {
    /// The FP8 GEMM for kernels compiled for `arch` (`sm_90a`, `sm_89`, `compute_80`, …); none
    /// before `sm_80`.
    pub fn for_arch(arch: &str) -> Option<Self> {
        if arch == "sm_90a" {
            return Some(Fp8Target::Hopper);
        }
        let number: u32 = arch
            .trim_start_matches("sm_")
            .trim_start_matches("compute_")
            .trim_end_matches(['a', 'f'])
            .parse()
            .ok()?;
        (number >= 80).then_some(Fp8Target::Portable)
    }
}

/// Bytes between the starts of two scratch regions: what TMA and 16-byte loads need, rounded up
/// to a cache line pair.
pub(crate) const REGION_ALIGN: usize = 256;

/// One operand of an FP8 product: the `quantize` call that makes its codes and scales from the
/// buffer the matmul reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Fp8Operand {
    pub quantize: QuantizeParams,
    /// The f32 values it quantises: a buffer, or the byte scratch.
    pub source: StepArg,
    /// For the gathered kind: where the source row of each output row lies.
    pub source_rows: Option<StepArg>,
    /// The source as the quantize kernel reads it: `[rows][cols]`, or `matrices` of them one
    /// after another (the experts' weights, quantised in one launch).
    pub rows: usize,
    pub cols: usize,
    pub matrices: usize,
}

impl Fp8Operand {
    /// Bytes of the codes, their rows' padding included (every matrix's, one after another).
    pub(crate) fn code_bytes(&self) -> usize {
        let (rows, cols) = self.quantize.codes_shape(self.rows, self.cols);
        self.matrices * rows * cols
    }

    /// Bytes of the scales, in the layout `quantize` writes (see `QuantizeKind`; every
    /// matrix's, one after another).
    pub(crate) fn scale_bytes(&self) -> usize {
        let (rows, cols) = (self.rows, self.cols);
        4 * self.matrices
            * match self.quantize.kind {
                QuantizeKind::Tile1x128 | QuantizeKind::GatheredTile1x128 => {
                    cols.div_ceil(128) * rows.next_multiple_of(4)
                }
                QuantizeKind::Block128x128 { .. } => rows.div_ceil(128) * cols.div_ceil(128),
                QuantizeKind::Tile128x1Transposed | QuantizeKind::GatheredTile128x1Transposed => {
                    rows.div_ceil(128) * cols.next_multiple_of(4)
                }
            }
    }
}

/// A `MatMul` that runs as an FP8 GEMM: `out[M][N] = A[M][K] · B[N][K]ᵀ`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Fp8Product {
    pub a: Fp8Operand,
    pub b: Fp8Operand,
    pub b_scaling: BScaling,
    /// M with the batch axes merged into it.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub out: BufferId,
}

/// The fields of a `Library::MatMul` the FP8 recognition reads.
pub(crate) struct MatMulCall<'a> {
    pub batch: &'a [usize],
    pub mnk: (usize, usize, usize),
    pub views: [&'a View; 3],
    pub triangular: bool,
}

/// A `QuantizeDequantize` call of the program: its tile and rounding, over a `[.., rows, cols]`
/// buffer.
pub(crate) struct Rounding {
    pub tile: (usize, usize),
    pub pow2_scales: bool,
    pub dims: Vec<usize>,
}

impl Rounding {
    /// The call that writes `buffer`, if it is an E4M3 rounding.
    pub(crate) fn of(program: &Program, buffer: BufferId) -> Result<Rounding, String> {
        program
            .kernels
            .iter()
            .find_map(|kernel| match &kernel.body {
                KernelBody::Library(Library::QuantizeDequantize {
                    format: QuantFormat::E4M3,
                    tile_rows,
                    tile_cols,
                    pow2_scales,
                    out,
                    ..
                }) if *out == buffer => Some(Rounding {
                    tile: (*tile_rows, *tile_cols),
                    pow2_scales: *pow2_scales,
                    dims: program.buffer(buffer).ty.dims().to_vec(),
                }),
                _ => None,
            })
            .ok_or_else(|| format!("{buffer} is not rounded to E4M3 by the program"))
    }

    pub(crate) fn cols(&self) -> usize {
        self.dims.last().copied().unwrap_or(1)
    }

    pub(crate) fn rows(&self) -> usize {
        self.dims.iter().product::<usize>() / self.cols().max(1)
    }

    /// Whether the buffer is one matrix (tiles of 128 rows would otherwise restart at each).
    fn is_one_matrix(&self) -> bool {
        self.dims.len() <= 2 || self.dims[..self.dims.len() - 2].iter().all(|&d| d == 1)
    }

    pub(crate) fn operand(&self, kind: QuantizeKind, source: BufferId) -> Fp8Operand {
        Fp8Operand {
            quantize: QuantizeParams {
                kind,
                input: QuantizeInput::F32,
                pow2_scales: self.pow2_scales,
            },
            source: StepArg::Buffer(source, 0),
            source_rows: None,
            rows: self.rows(),
            cols: self.cols(),
            matrices: 1,
        }
    }
}

impl Fp8Product {
    /// The FP8 GEMM for `call`, a product with Hopper's accumulation, or why it has none (then
    /// the f32 GEMM runs it).
    pub(crate) fn find(program: &Program, call: &MatMulCall<'_>) -> Result<Fp8Product, String> {
        if call.triangular {
            return Err("a triangular product".into());
        }
        let (m, n, k) = call.mnk;
        let [a, b, out] = call.views;
        let rounded = (
            Rounding::of(program, a.buffer)?,
            Rounding::of(program, b.buffer)?,
        );
        if [a, b, out].iter().any(|v| v.offset != 0) {
            return Err("an operand is a slice of its buffer".into());
        }
        let rank = call.batch.len();
        let axes = merged_batch_axes(call.batch, call.views.map(|v| &v.strides[..rank]));
        let batches: usize = call.batch.iter().product();
        let [sa, sb, so] = match axes.as_slice() {
            [] => [0; 3],
            [(_, strides)] => *strides,
            _ => return Err("batch axes that do not merge into M".into()),
        };
        let rows = batches * m;
        let matrix = |v: &View| (v.strides[rank], v.strides[rank + 1]);
        if sb != 0 {
            return Err("B differs between batches".into());
        }
        let numel = |b: BufferId| program.buffer(b).ty.numel();
        if matrix(out) != (n as isize, 1)
            || (batches > 1 && so != (m * n) as isize)
            || numel(out.buffer) != rows * n
        {
            return Err("the output is not one row-major [M][N] matrix".into());
        }
        let a = Self::operand_a(&rounded.0, a, (m, k), (batches, sa))?;
        let (b, b_scaling) = Self::operand_b(&rounded.1, b, (k, n))?;
        Ok(Fp8Product {
            a,
            b,
            b_scaling,
            m: rows,
            n,
            k,
            out: out.buffer,
        })
    }

    /// A `[M][K]` with 1×128 scales along K: rows rounded in 1×128 tiles (batches merged into
    /// M), or the transpose of a `[K][M]` matrix rounded in 128×1 tiles.
    fn operand_a(
        rounding: &Rounding,
        view: &View,
        (m, k): (usize, usize),
        (batches, batch_stride): (usize, isize),
    ) -> Result<Fp8Operand, String> {
        let rank = view.strides.len() - 2;
        let strides = (view.strides[rank], view.strides[rank + 1]);
        let (rows, cols) = (rounding.rows(), rounding.cols());
        let whole_rows = strides == (k as isize, 1)
            && cols == k
            && rows == batches * m
            && (batches == 1 || batch_stride == (m * k) as isize);
        match rounding.tile {
            (1, 128) if whole_rows => Ok(rounding.operand(QuantizeKind::Tile1x128, view.buffer)),
            (128, 1)
                if batches == 1
                    && rounding.is_one_matrix()
                    && strides == (1, cols as isize)
                    && (rows, cols) == (k, m) =>
            {
                Ok(rounding.operand(QuantizeKind::Tile128x1Transposed, view.buffer))
            }
            (tile_rows, tile_cols) => Err(format!(
                "A is rounded in {tile_rows}x{tile_cols} tiles of {:?}, read with strides \
                 {strides:?}: not 1×128 tiles along K",
                rounding.dims
            )),
        }
    }

    /// B `[K][N]` as the GEMM's K-major `[N][K]`, with 128×128 or 1×128 scales.
    fn operand_b(
        rounding: &Rounding,
        view: &View,
        (k, n): (usize, usize),
    ) -> Result<(Fp8Operand, BScaling), String> {
        let rank = view.strides.len() - 2;
        let strides = (view.strides[rank], view.strides[rank + 1]);
        let (rows, cols) = (rounding.rows(), rounding.cols());
        let one = rounding.is_one_matrix();
        // As stored: `[K][N]` row-major; transposed: `[N][K]` row-major.
        let as_stored = strides == (cols as isize, 1) && (rows, cols) == (k, n);
        let transposed = strides == (1, cols as isize) && (rows, cols) == (n, k);
        let (kind, scaling) = match rounding.tile {
            (128, 128) if one && as_stored => (
                QuantizeKind::Block128x128 { transpose: true },
                BScaling::Block128x128,
            ),
            (128, 128) if one && transposed => (
                QuantizeKind::Block128x128 { transpose: false },
                BScaling::Block128x128,
            ),
            (1, 128) if transposed => (QuantizeKind::Tile1x128, BScaling::Row1x128),
            (128, 1) if one && as_stored => (QuantizeKind::Tile128x1Transposed, BScaling::Row1x128),
            (tile_rows, tile_cols) => {
                return Err(format!(
                    "B is rounded in {tile_rows}x{tile_cols} tiles of {:?}, read with strides \
                     {strides:?}: not the FP8 GEMM's 128×128 blocks or 1×128 tiles along K",
                    rounding.dims
                ));
            }
        };
        Ok((rounding.operand(kind, view.buffer), scaling))
    }

    /// The steps (quantise A, quantise B, the GEMM) for `target`, and the scratch bytes they
    /// use; or why the kernels cannot take the shapes.
    pub(crate) fn steps(&self, target: Fp8Target) -> Result<(Vec<LibraryStep>, usize), String> {
        let mut layout = ScratchLayout::default();
        let (regions, quantize) = GemmRegions::quantized(&mut layout, &self.a, &self.b)?;
        let mut steps = Vec::from(quantize);
        // K as the codes lie: both operands' K runs along their codes' rows, padded with zero
        // codes to 16 bytes.
        let problem = gemm_problem([self.m, self.n, self.k.next_multiple_of(16)], 1)?;
        let out = GemmOut {
            at: StepArg::Buffer(self.out, 0),
            rows: None,
        };
        let shape = (self.b_scaling, GemmGrouping::Dense);
        steps.push(gemm_step(target, shape, &problem, &regions, out, &[])?);
        Ok((steps, layout.bytes))
    }
}

/// A GEMM's sizes, when the kernels' 32-bit ints hold them.
pub(crate) fn gemm_problem([m, n, k]: [usize; 3], groups: usize) -> Result<GemmProblem, String> {
    let int = |d: usize| {
        i32::try_from(d)
            .map(|d| d as u32)
            .map_err(|_| format!("{d} does not fit the kernels' 32-bit int"))
    };
    Ok(GemmProblem {
        m: int(m)?,
        n: int(n)?,
        k: int(k)?,
        groups: int(groups)?,
    })
}

/// Where a GEMM's codes and scales lie in the byte scratch.
pub(crate) struct GemmRegions {
    pub qa: usize,
    pub sa: usize,
    pub qb: usize,
    pub sb: usize,
}

impl GemmRegions {
    /// The codes and scales of `a` and `b` placed in `layout`, and the `quantize` steps that
    /// make them.
    pub(crate) fn quantized(
        layout: &mut ScratchLayout,
        a: &Fp8Operand,
        b: &Fp8Operand,
    ) -> Result<(Self, [LibraryStep; 2]), String> {
        let (qa, sa) = (
            layout.region(a.code_bytes()),
            layout.region(a.scale_bytes()),
        );
        let (qb, sb) = (
            layout.region(b.code_bytes()),
            layout.region(b.scale_bytes()),
        );
        let steps = [quantize_step(a, qa, sa)?, quantize_step(b, qb, sb)?];
        Ok((GemmRegions { qa, sa, qb, sb }, steps))
    }
}

/// Where a GEMM writes its f32 product.
pub(crate) struct GemmOut {
    pub at: StepArg,
    /// Each product row's row of the output (-1: none), when not the same row.
    pub rows: Option<StepArg>,
}

/// The FP8 GEMM step of `target` for `problem` (B's scaling and the grouping as `shape`), f32
/// out into `out`; `groups` names the grouping's arguments (a grouped GEMM's `block_expert`, a
/// K-grouped one's `k_offsets` and `groups`).
pub(crate) fn gemm_step(
    target: Fp8Target,
    (b_scaling, grouping): (BScaling, GemmGrouping),
    problem: &GemmProblem,
    regions: &GemmRegions,
    out: GemmOut,
    groups: &[(&'static str, StepArg)],
) -> Result<LibraryStep, String> {
    let GemmRegions { qa, sa, qb, sb } = *regions;
    let output = match out.rows {
        Some(_) => GemmOutput::F32Scattered,
        None => GemmOutput::F32,
    };
    // The grouping's arguments first: `args_by_name` takes a name's first entry.
    let mut named = groups.to_vec();
    named.extend([
        ("out", out.at),
        ("out_rows", out.rows.unwrap_or(StepArg::Null)),
        ("m", StepArg::I32(problem.m as i32)),
        ("n", StepArg::I32(problem.n as i32)),
        ("k", StepArg::I32(problem.k as i32)),
        ("block_expert", StepArg::Null),
        ("scale_b", StepArg::Bytes(sb)),
    ]);
    match target {
        Fp8Target::Hopper => {
            // The untuned choice; the tuner may redo the step with another (`gemm_choice`).
            let form = GemmForm {
                problem: *problem,
                b_scaling,
                output,
                grouping,
            };
            let GemmChoice { params, schedule } = form.default_choice();
            named.push(("raster_band", StepArg::I32(schedule.raster_band as i32)));
            for desc in params.tensor_maps(problem).map_err(|e| e.to_string())? {
                let base = match desc.param {
                    "tmap_a" => qa,
                    "tmap_b" => qb,
                    "tmap_scale_a" => sa,
                    _ => sb,
                };
                named.push((desc.param, StepArg::TensorMap(desc, Place::Scratch(base))));
            }
            Ok(LibraryStep {
                kernel: LibraryKernel::Fp8Gemm(params),
                grid: params.grid(problem, &schedule),
                args: ordered(&params.name(), &params.kernel_params(), &named)?,
            })
        }
        Fp8Target::Portable => {
            let params = FallbackGemmParams {
                b_scaling,
                output,
                grouping,
                ..FallbackGemmParams::new(64, 64)
            };
            // The portable kernel has the same contract, so the same limits.
            let contract = Fp8GemmParams {
                grouping,
                ..Fp8GemmParams::new(128, 64, 1)
            };
            contract.check_problem(problem).map_err(|e| e.to_string())?;
            named.extend([
                ("a", StepArg::Bytes(qa)),
                ("b", StepArg::Bytes(qb)),
                ("scale_a", StepArg::Bytes(sa)),
            ]);
            Ok(LibraryStep {
                kernel: LibraryKernel::Fp8GemmFallback(params),
                grid: params.grid_for(problem),
                args: ordered(&params.name(), &params.kernel_params(), &named)?,
            })
        }
    }
}

/// A template's step arguments in its parameters' order.
pub(crate) fn ordered(
    kernel: &str,
    params: &[KernelParam],
    named: &[(&str, StepArg)],
) -> Result<Vec<StepArg>, String> {
    args_by_name(kernel, params, named).map_err(|e| e.to_string())
}

/// The `quantize` step of an operand: codes at byte `codes`, scales at byte `scales`.
pub(crate) fn quantize_step(
    operand: &Fp8Operand,
    codes: usize,
    scales: usize,
) -> Result<LibraryStep, String> {
    let params = operand.quantize;
    let [rows, cols, matrices] = [operand.rows, operand.cols, operand.matrices]
        .map(|v| u32::try_from(v).map_err(|e| e.to_string()));
    let (rows, cols, matrices) = (rows?, cols?, matrices?);
    params
        .check_problem(rows, cols)
        .map_err(|e| e.to_string())?;
    let mut named = vec![
        ("x", operand.source),
        ("q", StepArg::Bytes(codes)),
        ("scales", StepArg::Bytes(scales)),
        ("rows", StepArg::I32(rows as i32)),
        ("cols", StepArg::I32(cols as i32)),
    ];
    if let Some(source_rows) = operand.source_rows {
        named.push(("source_rows", source_rows));
    }
    Ok(LibraryStep {
        kernel: LibraryKernel::Quantize(params),
        grid: params
            .stacked_grid(rows, cols, matrices)
            .map_err(|e| e.to_string())?,
        args: ordered(&params.name(), &params.kernel_params(), &named)?,
    })
}

/// Regions of the byte scratch, each aligned to [`REGION_ALIGN`].
#[derive(Default)]
pub(crate) struct ScratchLayout {
    pub bytes: usize,
}

impl ScratchLayout {
    pub(crate) fn region(&mut self, bytes: usize) -> usize {
        let start = self.bytes;
        self.bytes = (start + bytes).next_multiple_of(REGION_ALIGN);
        start
    }
}

/// Why a weight's rounding launches nothing ([`quantize_weights_directly`]).
pub(crate) const QUANTIZED_WHERE_READ: &str =
    "read only by FP8 GEMMs, whose quantize steps read the weight itself";

/// Why an activation's rounding launches nothing ([`quantize_activations_directly`]).
pub(crate) const SOURCE_QUANTIZED_WHERE_READ: &str =
    "read only by FP8 GEMMs, whose quantize steps read its source (kept alive until then)";

/// A weight's E4M3 rounding (`QuantizeDequantize` of a parameter) whose output only FP8 GEMMs
/// read, all through their `quantize` steps, is not computed: those steps read the weight
/// instead. They make the same codes and scales (the rounding's values are the codes times the
/// scales `quantize` computes from the weight, see the module docs), and the weight saves an
/// f32 write and read of its whole size at every use. The weight is a parameter, alive for the
/// whole run; a rounding another kernel reads, or that is a program output, is computed.
pub(crate) fn quantize_weights_directly(program: &Program, calls: &mut [Option<LibraryCall>]) {
    let is_weight = |x: BufferId| program.buffer(x).role.is_fed_weight();
    quantize_sources_directly(program, calls, is_weight, QUANTIZED_WHERE_READ);
}

/// The same for an activation's rounding (a source that is not a weight, nor computed from the
/// weights alone: those the weight codes take, `library_fp8_weight_codes`): the GEMMs'
/// `quantize` steps read the source, which no kernel writes between the rounding and them.
/// At DeepSeek-V3's sizes these roundings were a third of the f32 traffic of a micro-batch
/// (2159 launches, 87 G elements read and written again). The source then lives until its
/// last GEMM reads it: the executor's memory plan follows the steps'
/// arguments ([`super::library::LibraryPlan::memory_plan`]), not the kernel IR's operands.
pub(crate) fn quantize_activations_directly(
    program: &Program,
    from_weights: &FromWeights,
    calls: &mut [Option<LibraryCall>],
) {
    let is_activation = |x: BufferId| {
        let role = &program.buffer(x).role;
        !role.is_fed_weight() && !from_weights.holds_weights(x)
    };
    quantize_sources_directly(program, calls, is_activation, SOURCE_QUANTIZED_WHERE_READ);
}

/// Skips every E4M3 rounding of an `eligible` source whose output is no program output and is
/// read only as the source of FP8 GEMMs' `quantize` steps, which then read the rounding's
/// source; `why` says so in the plan. A source some kernel writes after the rounding, before
/// a GEMM reads it, is not eligible (the GEMM would quantise other values).
fn quantize_sources_directly(
    program: &Program,
    calls: &mut [Option<LibraryCall>],
    eligible: impl Fn(BufferId) -> bool,
    why: &'static str,
) {
    let accesses: Vec<(Vec<BufferId>, Vec<BufferId>)> = (program.kernels.iter())
        .map(|kernel| kernel.reads_and_writes())
        .collect();
    for (index, kernel) in program.kernels.iter().enumerate() {
        let KernelBody::Library(Library::QuantizeDequantize { x, out, .. }) = &kernel.body else {
            continue;
        };
        let (x, out) = (*x, *out);
        if !eligible(x) || program.outputs.iter().any(|(_, b)| *b == out) {
            continue;
        }
        let reading: Vec<usize> = (0..program.kernels.len())
            .filter(|&j| j != index && accesses[j].0.contains(&out))
            .collect();
        let by_quantize_only = |j: &usize| {
            requantizes_roundings(&program.kernels[*j].body)
                && calls[*j].as_ref().is_some_and(|call| {
                    call.runs_fp8_gemm()
                        && call.steps.iter().all(|step| {
                            step.args.iter().enumerate().all(|(position, arg)| {
                                !matches!(arg, StepArg::Buffer(b, _) if *b == out)
                                    || quantize_source(step, position)
                            })
                        })
                })
        };
        let last_reader = reading.iter().copied().max().unwrap_or(index);
        let storage = [x, program.holder(x).0];
        let written_before_read =
            (index + 1..=last_reader).any(|j| accesses[j].1.iter().any(|w| storage.contains(w)));
        if reading.is_empty() || written_before_read || !reading.iter().all(by_quantize_only) {
            continue;
        }
        for j in reading {
            let steps = calls[j].as_mut().map_or(&mut [][..], |c| &mut c.steps[..]);
            for arg in steps.iter_mut().flat_map(|s| s.args.iter_mut()) {
                if let StepArg::Buffer(b, offset) = *arg
                    && b == out
                {
                    *arg = StepArg::Buffer(x, offset);
                }
            }
        }
        if let Some(call) = calls[index].as_mut() {
            call.steps.clear();
            call.skipped = Some(why);
        }
    }
}

/// Whether a call's FP8 `quantize` steps quantise its rounded operands in the tiles of their
/// roundings, so that reading a rounding's source instead makes the same codes: a product
/// ([`Fp8Product::find`]) and the experts' grouped product (1×128 tiles along K, in any order
/// of the rows). Not the experts' weight gradient: it rounds its operands itself, in 128
/// gathered rows per expert, whatever rounding they went through before.
fn requantizes_roundings(body: &KernelBody) -> bool {
    matches!(
        body,
        KernelBody::Library(Library::MatMul { .. } | Library::GroupedMatMul { .. })
    )
}

/// Whether argument `position` of `step` is a `quantize` step's source (`x`).
fn quantize_source(step: &LibraryStep, position: usize) -> bool {
    match step.kernel {
        LibraryKernel::Quantize(params) => params
            .kernel_params()
            .get(position)
            .is_some_and(|p| p.name == "x"),
        _ => false,
    }
}

#[cfg(test)]
#[path = "library_fp8_tests.rs"]
pub(crate) mod tests;
