//! The steps of the FP8 plans run on the CPU, each kernel replaced by what its contract (the
//! template's comments and `fathom_kernels`' parameter docs) says it computes, reading and
//! writing where the step's arguments point: program buffers (as f32 values, or as the bytes of
//! their storage), the int scratch, the byte scratch, through tensor maps for the Hopper GEMM.
//! Written from the contracts, not from the planner, so that a planner that points a kernel at
//! the wrong place, in the wrong layout, fails.

use std::collections::HashMap;

use fathom_kernels::fp8_gemm::BLOCK_K;
use fathom_kernels::index_ops::PAD_ALIGN;
use fathom_kernels::{
    BScaling, F32GemmKind, GemmGrouping, GemmOutput, IndexOp, KernelParam, QuantizeInput,
    QuantizeParams, TensorMapDesc, TensorMapDtype,
};

use crate::cuda::library::{LibraryKernel, LibraryStep, Place, StepArg};
use crate::cuda::quantize_samples::expected_quantization;
use crate::fp8::{ScaleRounding, e4m3_to_f32, fake_quantize};

/// The host memory a plan's steps touch.
pub struct Memory {
    pub buffers: Vec<Vec<f32>>,
    pub ints: Vec<i32>,
    pub bytes: Vec<u8>,
}

/// Reads an operand's code at (row, K index).
type ReadCode = Box<dyn Fn(&Memory, usize, usize) -> u8>;
/// Reads an operand's scale at (K block, row).
type ReadScale = Box<dyn Fn(&Memory, usize, usize) -> f32>;

/// What a GEMM reads, wherever the step says it lies.
struct Operands {
    a: ReadCode,
    b: ReadCode,
    scale_a: ReadScale,
    /// By (K block, row of the whole `[groups·N][K]` B).
    scale_b: ReadScale,
    rows: RowGrouping,
}

/// Where a GEMM's grouping and output say its rows and K blocks go, from the step's arguments.
struct RowGrouping {
    /// The expert of each 128-row block of A (grouped GEMMs).
    block_expert: Option<StepArg>,
    /// The row of the output each product row goes to (the scattered output).
    out_rows: Option<StepArg>,
    /// The K-grouped GEMM's `groups + 1` segment starts along K, and the group count.
    k_offsets: Option<(StepArg, usize)>,
}

impl RowGrouping {
    fn of(grouping: GemmGrouping, output: GemmOutput, named: &HashMap<&str, StepArg>) -> Self {
        RowGrouping {
            block_expert: (grouping == GemmGrouping::Contiguous).then(|| named["block_expert"]),
            out_rows: (output == GemmOutput::F32Scattered).then(|| named["out_rows"]),
            k_offsets: (grouping == GemmGrouping::KGrouped)
                .then(|| (named["k_offsets"], int(named["groups"]))),
        }
    }
}

impl Memory {
    pub fn new(buffers: Vec<Vec<f32>>, ints: usize, bytes: usize) -> Self {
        Memory {
            buffers,
            ints: vec![-7; ints],
            // Garbage, so that reading what no step wrote shows.
            bytes: vec![0xa5; bytes],
        }
    }

    fn f32_at(&self, offset: usize) -> f32 {
        f32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap())
    }

    /// Byte `i` of the bytes a pointer argument points at (a buffer's storage holds its f32
    /// values little-endian, as the GPU's does).
    pub fn byte(&self, at: StepArg, i: usize) -> u8 {
        match at {
            StepArg::Bytes(offset) => self.bytes[offset + i],
            StepArg::BufferBytes(b, offset) => {
                let at = offset + i;
                self.buffers[b.index()][at / 4].to_le_bytes()[at % 4]
            }
            other => panic!("{other:?} does not point at bytes"),
        }
    }

    fn set_byte(&mut self, at: StepArg, i: usize, value: u8) {
        match at {
            StepArg::Bytes(offset) => self.bytes[offset + i] = value,
            StepArg::BufferBytes(b, offset) => {
                let at = offset + i;
                let word = &mut self.buffers[b.index()][at / 4];
                let mut bytes = word.to_le_bytes();
                bytes[at % 4] = value;
                *word = f32::from_le_bytes(bytes);
            }
            other => panic!("{other:?} does not point at bytes"),
        }
    }

    /// Element `i` of the f32 array a pointer argument points at.
    pub fn get_f32(&self, at: StepArg, i: usize) -> f32 {
        match at {
            StepArg::Buffer(b, offset) => self.buffers[b.index()][offset + i],
            StepArg::Bytes(offset) => self.f32_at(aligned(offset, 4) + 4 * i),
            StepArg::BufferBytes(b, offset) => self.buffers[b.index()][aligned(offset, 4) / 4 + i],
            other => panic!("{other:?} does not point at f32s"),
        }
    }

    fn set_f32(&mut self, at: StepArg, i: usize, value: f32) {
        match at {
            StepArg::Buffer(b, offset) => self.buffers[b.index()][offset + i] = value,
            StepArg::Bytes(offset) => {
                let at = aligned(offset, 4) + 4 * i;
                self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            StepArg::BufferBytes(b, offset) => {
                self.buffers[b.index()][aligned(offset, 4) / 4 + i] = value;
            }
            other => panic!("{other:?} does not point at f32s"),
        }
    }

    fn get_i32(&self, at: StepArg, i: usize) -> i32 {
        match at {
            StepArg::Scratch(offset) => self.ints[offset + i],
            StepArg::Bytes(offset) => {
                let at = aligned(offset, 4) + 4 * i;
                i32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
            }
            other => panic!("{other:?} does not point at ints"),
        }
    }

    fn set_i32(&mut self, at: StepArg, i: usize, value: i32) {
        match at {
            StepArg::Scratch(offset) => self.ints[offset + i] = value,
            StepArg::Bytes(offset) => {
                let at = aligned(offset, 4) + 4 * i;
                self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            other => panic!("{other:?} does not point at ints"),
        }
    }

    /// A pointer to element `(row, col)` of the 2-D tensor a tensor map describes, as TMA
    /// reads it (no read outside the tensor: TMA would fill zeros, which no kernel relies on
    /// inside M, N and K).
    fn through_map(desc: &TensorMapDesc, base: Place, (row, col): (usize, usize)) -> StepArg {
        assert!(
            (col as u64) < desc.global_dims[0] && (row as u64) < desc.global_dims[1],
            "{}: ({row}, {col}) outside {:?}",
            desc.param,
            desc.global_dims
        );
        let size = match desc.dtype {
            TensorMapDtype::U8 => 1,
            TensorMapDtype::F32 => 4,
        };
        let within = row * desc.outer_stride_bytes as usize + col * size;
        match base {
            Place::Scratch(offset) => StepArg::Bytes(aligned(offset, 16) + within),
            Place::Buffer(b, offset) => StepArg::BufferBytes(b, aligned(offset, 16) + within),
        }
    }

    /// Runs one step.
    pub fn run(&mut self, step: &LibraryStep) {
        match step.kernel {
            // A grid layer per matrix of a stack (`QuantizeParams::stacked_grid`).
            LibraryKernel::Quantize(params) => {
                for matrix in 0..step.grid[2] as usize {
                    self.quantize(params, &step.args, matrix);
                }
            }
            LibraryKernel::Index(params) => {
                let named = by_name(&params.kernel_params(), &step.args);
                self.index(params.op, &named);
            }
            LibraryKernel::Fp8Gemm(params) => {
                let named = by_name(&params.kernel_params(), &step.args);
                let map = |name: &str| match named[name] {
                    StepArg::TensorMap(desc, base) => (desc, base),
                    other => panic!("{name} is {other:?}, not a tensor map"),
                };
                let code = |(desc, base): (TensorMapDesc, Place)| -> ReadCode {
                    Box::new(move |mem, row, col| {
                        mem.byte(Memory::through_map(&desc, base, (row, col)), 0)
                    })
                };
                let scale = |(desc, base): (TensorMapDesc, Place)| -> ReadScale {
                    Box::new(move |mem, kb, row| {
                        mem.get_f32(Memory::through_map(&desc, base, (kb, row)), 0)
                    })
                };
                let scale_b = match params.b_scaling {
                    BScaling::Block128x128 => block_scales(named["scale_b"], &named),
                    BScaling::Row1x128 => scale(map("tmap_scale_b")),
                };
                let operands = Operands {
                    a: code(map("tmap_a")),
                    b: code(map("tmap_b")),
                    scale_a: scale(map("tmap_scale_a")),
                    scale_b,
                    rows: RowGrouping::of(params.grouping, params.output, &named),
                };
                self.gemm(&named, &operands);
            }
            LibraryKernel::Fp8GemmFallback(params) => {
                let named = by_name(&params.kernel_params(), &step.args);
                let (m, n, k) = (int(named["m"]), int(named["n"]), int(named["k"]));
                let [a, b, sa, sb] = ["a", "b", "scale_a", "scale_b"].map(|p| named[p]);
                for at in [a, b, sa, sb] {
                    aligned_pointer(at, 16);
                }
                // The contract's layouts: A `[M][K]`, B `[groups·N][K]`, A's scales
                // `[ceil(K/128)][round_up(M, 4)]`, B's by rows `[ceil(K/128)][round_up(N, 4)]`.
                let scale_b = match params.b_scaling {
                    BScaling::Block128x128 => block_scales(named["scale_b"], &named),
                    BScaling::Row1x128 => Box::new(move |mem: &Memory, kb: usize, j: usize| {
                        mem.get_f32(sb, kb * n.next_multiple_of(4) + j)
                    }) as ReadScale,
                };
                let rows = RowGrouping::of(params.grouping, params.output, &named);
                if rows.block_expert.is_none() {
                    assert_eq!(named["block_expert"], StepArg::Null);
                }
                if rows.out_rows.is_none() {
                    assert_eq!(named["out_rows"], StepArg::Null);
                }
                let operands = Operands {
                    a: Box::new(move |mem, i, p| mem.byte(a, i * k + p)),
                    b: Box::new(move |mem, j, p| mem.byte(b, j * k + p)),
                    scale_a: Box::new(move |mem, kb, i| {
                        mem.get_f32(sa, kb * m.next_multiple_of(4) + i)
                    }),
                    scale_b,
                    rows,
                };
                self.gemm(&named, &operands);
            }
            LibraryKernel::FakeQuantizeGathered(params) => {
                let named = by_name(&params.kernel_params(), &step.args);
                self.fake_quantize_gathered(params.pow2_scales, &named);
            }
            LibraryKernel::Gemm(params) if params.kind == F32GemmKind::GroupedWeightGrad => {
                let named = by_name(&params.kernel_params(), &step.args);
                // One expert per grid layer (`weight_grad_grid`).
                self.f32_grouped_weight_grad(step.grid[2] as usize, &named);
            }
            other => panic!("{} is not a kernel of the FP8 plans", other.name()),
        }
    }

    /// `fake_quantize_gathered_128x1`: each 128 padded rows' column tile of the gathered values
    /// (zeros for rows -1), rounded, back to the rows `out_rows` names.
    fn fake_quantize_gathered(&mut self, pow2: bool, named: &HashMap<&str, StepArg>) {
        let (rows, cols) = (int(named["rows"]), int(named["cols"]));
        let rounding = if pow2 {
            ScaleRounding::PowerOfTwo
        } else {
            ScaleRounding::Exact
        };
        for first in (0..rows).step_by(128) {
            let tile_rows = (rows - first).min(128);
            let row_of = |mem: &Memory, name: &str, r: usize| {
                usize::try_from(mem.get_i32(named[name], first + r)).ok()
            };
            let block: Vec<f32> = (0..tile_rows * cols)
                .map(|i| match row_of(self, "source_rows", i / cols) {
                    Some(row) => self.get_f32(named["x"], row * cols + i % cols),
                    None => 0.0,
                })
                .collect();
            let rounded = fake_quantize(&block, &[tile_rows, cols], 128, 1, rounding).unwrap();
            for r in 0..tile_rows {
                if let Some(out) = row_of(self, "out_rows", r) {
                    for c in 0..cols {
                        self.set_f32(named["out"], out * cols + c, rounded[r * cols + c]);
                    }
                }
            }
        }
    }

    /// `gemm_f32`'s grouped weight gradient over `experts`: `out[e] = Σ g[ts]ᵀ · x[row(ts)]`
    /// over the members `ts` of group e (f64 here), x's row `ts / slots · x_slots` (+ the slot
    /// when x has one row per slot).
    fn f32_grouped_weight_grad(&mut self, experts: usize, named: &HashMap<&str, StepArg>) {
        let (slots, x_slots) = (int(named["slots"]), int(named["x_slots"]));
        let (n, k) = (int(named["n"]), int(named["k"]));
        let offset = |mem: &Memory, e: usize| mem.get_i32(named["offsets"], e) as usize;
        for e in 0..experts {
            let members: Vec<usize> = (offset(self, e)..offset(self, e + 1))
                .map(|i| self.get_i32(named["members"], i) as usize)
                .collect();
            for i in 0..n {
                for j in 0..k {
                    let sum: f64 = members
                        .iter()
                        .map(|&ts| {
                            let slot = if x_slots == 1 { 0 } else { ts % slots };
                            let x_row = ts / slots * x_slots + slot;
                            f64::from(self.get_f32(named["g"], ts * n + i))
                                * f64::from(self.get_f32(named["x"], x_row * k + j))
                        })
                        .sum();
                    self.set_f32(named["out"], (e * n + i) * k + j, sum as f32);
                }
            }
        }
    }

    /// `quantize` of matrix `matrix` of a stack of `[rows][cols]` matrices (0 for one), its codes
    /// and scales after the previous matrices'.
    fn quantize(&mut self, params: QuantizeParams, args: &[StepArg], matrix: usize) {
        let named = by_name(&params.kernel_params(), args);
        let (q, s) = (named["q"], named["scales"]);
        let (rows, cols) = (int(named["rows"]), int(named["cols"]));
        let first = matrix * rows * cols;
        // Row r of what is quantised: x's row r, or for the gathered kind x's row
        // source_rows[r] (zeros for -1).
        let source = |mem: &Memory, r: usize| match named.get("source_rows") {
            Some(&rows) => usize::try_from(mem.get_i32(rows, r)).ok(),
            None => Some(r),
        };
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| match source(self, i / cols) {
                Some(row) => self.input(params.input, &named, first, (row, i % cols)),
                None => 0.0,
            })
            .collect();
        let (codes, scales) = expected_quantization(params, &x, rows, cols).unwrap();
        let q_first = matrix * codes.len();
        aligned_pointer(q, 16);
        for (i, code) in codes.iter().enumerate() {
            self.set_byte(q, q_first + i, *code);
        }
        for (i, scale) in scales.iter().enumerate() {
            self.set_f32(s, matrix * scales.len() + i, *scale);
        }
    }

    /// Element `(row, col)` of a `quantize`'s input (of the matrix starting at element `first`
    /// of `x`, for a stack): an f32 value; for E4M3 tiles the code there times its tile's scale
    /// (`QuantizeInput::E4m3Tiles`: codes `[x_rows][round_up(cols, 16)]`, scales
    /// `[ceil(cols/128)][round_up(x_rows, 4)]`); for a product `x`'s element times `y`'s, at
    /// `(row / row_div)·row_stride + col·col_stride` each; rounded once to f32.
    fn input(
        &self,
        input: QuantizeInput,
        named: &HashMap<&str, StepArg>,
        first: usize,
        (row, col): (usize, usize),
    ) -> f32 {
        let (x, cols) = (named["x"], int(named["cols"]));
        match input {
            QuantizeInput::F32 | QuantizeInput::Bf16 => self.get_f32(x, first + row * cols + col),
            QuantizeInput::E4m3Tiles => {
                let x_rows = int(named["x_rows"]);
                aligned_pointer(x, 16);
                let code = self.byte(x, row * cols.next_multiple_of(16) + col);
                let scale = self.get_f32(
                    named["x_scales"],
                    col / 128 * x_rows.next_multiple_of(4) + row,
                );
                e4m3_to_f32(code) * scale
            }
            QuantizeInput::F32Product => {
                let factor = |name: &str, prefix: &str| {
                    let index = |what: &str| int(named[format!("{prefix}_{what}").as_str()]);
                    let at =
                        row / index("row_div") * index("row_stride") + col * index("col_stride");
                    self.get_f32(named[name], at)
                };
                factor("x", "x") * factor("y", "y")
            }
        }
    }

    /// `index_ops`' operations the FP8 plans launch.
    fn index(&mut self, op: IndexOp, named: &HashMap<&str, StepArg>) {
        match op {
            IndexOp::GroupRows => {
                let (count, groups) = (int(named["count"]), int(named["groups"]));
                let ids: Vec<usize> = (0..count)
                    .map(|i| self.get_f32(named["ids"], i) as usize)
                    .collect();
                let mut next = 0;
                self.set_i32(named["offsets"], 0, 0);
                for g in 0..groups {
                    for (i, _) in ids.iter().enumerate().filter(|(_, id)| **id == g) {
                        self.set_i32(named["members"], next, i as i32);
                        next += 1;
                    }
                    self.set_i32(named["offsets"], g + 1, next as i32);
                }
            }
            IndexOp::PadGroups => {
                let groups = int(named["groups"]);
                let (slots, x_slots) = (int(named["slots"]), int(named["x_slots"]));
                let m_padded = int(named["m_padded"]);
                let align = PAD_ALIGN as usize;
                let offset = |mem: &Memory, g| mem.get_i32(named["offsets"], g) as usize;
                let mut start = 0;
                for b in 0..m_padded / align {
                    self.set_i32(named["block_group"], b, -1);
                }
                for p in 0..m_padded {
                    self.set_i32(named["source_rows"], p, -1);
                    self.set_i32(named["out_rows"], p, -1);
                }
                for g in 0..groups {
                    self.set_i32(named["padded_offsets"], g, start as i32);
                    let first = offset(self, g);
                    let count = offset(self, g + 1) - first;
                    for local in 0..count {
                        let token_slot = self.get_i32(named["members"], first + local) as usize;
                        let source = if x_slots == 1 {
                            token_slot / slots
                        } else {
                            token_slot
                        };
                        self.set_i32(named["source_rows"], start + local, source as i32);
                        self.set_i32(named["out_rows"], start + local, token_slot as i32);
                    }
                    let end = start + count.next_multiple_of(align);
                    assert!(end <= m_padded, "m_padded {m_padded} is too small");
                    for b in start / align..end / align {
                        self.set_i32(named["block_group"], b, g as i32);
                    }
                    start = end;
                }
                self.set_i32(named["padded_offsets"], groups, start as i32);
            }
            other => panic!("{other:?} is not a step of the FP8 plans"),
        }
    }

    /// `out[r][j] = Σ_kb sa(kb, i) · sb(kb, e·N + j) · Σ_{p in kb} a(i, p) · b(e·N + j, p)` in
    /// f64, `e` the expert of row `i`'s block (0 when dense), `r` = `out_rows[i]` for the
    /// scattered output (no row where -1) and `i` otherwise; rows of a block of expert -1 are
    /// not written.
    fn gemm(&mut self, named: &HashMap<&str, StepArg>, operands: &Operands) {
        if let Some((offsets, groups)) = operands.rows.k_offsets {
            return self.k_grouped_gemm(named, operands, (offsets, groups));
        }
        let (m, n, k) = (int(named["m"]), int(named["n"]), int(named["k"]));
        let block = BLOCK_K as usize;
        for i in 0..m {
            let expert = match operands.rows.block_expert {
                Some(at) => self.get_i32(at, i / PAD_ALIGN as usize),
                None => 0,
            };
            let Ok(expert) = usize::try_from(expert) else {
                continue;
            };
            let row = match operands.rows.out_rows {
                Some(at) => self.get_i32(at, i),
                None => i as i32,
            };
            let Ok(row) = usize::try_from(row) else {
                continue;
            };
            for j in 0..n {
                let row_b = expert * n + j;
                let mut sum = 0f64;
                for kb in 0..k.div_ceil(block) {
                    let partial: f64 = (kb * block..(kb * block + block).min(k))
                        .map(|p| {
                            f64::from(e4m3_to_f32((operands.a)(self, i, p)))
                                * f64::from(e4m3_to_f32((operands.b)(self, row_b, p)))
                        })
                        .sum();
                    let scales = f64::from((operands.scale_a)(self, kb, i))
                        * f64::from((operands.scale_b)(self, kb, row_b));
                    sum += partial * scales;
                }
                self.set_f32(named["out"], row * n + j, sum as f32);
            }
        }
    }
}

impl Memory {
    /// The K-grouped GEMM: `out[g][i][j] = Σ_kb sa(kb, i) · sb(kb, j) · Σ_{p in kb} a(i, p) ·
    /// b(j, p)` over the K blocks of group g's segment `[k_offsets[g], k_offsets[g + 1])` (in
    /// f64), every group's `[M][N]` written (zeros for an empty segment).
    fn k_grouped_gemm(
        &mut self,
        named: &HashMap<&str, StepArg>,
        operands: &Operands,
        (offsets, groups): (StepArg, usize),
    ) {
        let (m, n) = (int(named["m"]), int(named["n"]));
        let block = BLOCK_K as usize;
        for g in 0..groups {
            let start = usize::try_from(self.get_i32(offsets, g)).unwrap();
            let end = usize::try_from(self.get_i32(offsets, g + 1)).unwrap();
            assert!(start % block == 0 && end % block == 0 && start <= end);
            for i in 0..m {
                for j in 0..n {
                    let mut sum = 0f64;
                    for kb in start / block..end / block {
                        let partial: f64 = (kb * block..kb * block + block)
                            .map(|p| {
                                f64::from(e4m3_to_f32((operands.a)(self, i, p)))
                                    * f64::from(e4m3_to_f32((operands.b)(self, j, p)))
                            })
                            .sum();
                        let scales = f64::from((operands.scale_a)(self, kb, i))
                            * f64::from((operands.scale_b)(self, kb, j));
                        sum += partial * scales;
                    }
                    self.set_f32(named["out"], (g * m + i) * n + j, sum as f32);
                }
            }
        }
    }
}

/// B's 128×128 block scales, `[groups][ceil(N/128)][ceil(K/128)]`, by (K block, row of B).
fn block_scales(at: StepArg, named: &HashMap<&str, StepArg>) -> ReadScale {
    let (n, k) = (int(named["n"]), int(named["k"]));
    let (n_blocks, k_blocks) = (n.div_ceil(128), k.div_ceil(BLOCK_K as usize));
    Box::new(move |mem, kb, row| {
        let (expert, j) = (row / n, row % n);
        mem.get_f32(at, (expert * n_blocks + j / 128) * k_blocks + kb)
    })
}

fn by_name(params: &[KernelParam], args: &[StepArg]) -> HashMap<&'static str, StepArg> {
    assert_eq!(params.len(), args.len(), "one argument per parameter");
    params
        .iter()
        .map(|p| p.name)
        .zip(args.iter().copied())
        .collect()
}

fn int(arg: StepArg) -> usize {
    let StepArg::I32(v) = arg else {
        panic!("{arg:?} is not an int")
    };
    usize::try_from(v).unwrap()
}

/// Checks a pointer to bytes is `to`-aligned, as TMA and 16-byte loads need.
fn aligned_pointer(arg: StepArg, to: usize) {
    match arg {
        StepArg::Bytes(offset) | StepArg::BufferBytes(_, offset) => {
            aligned(offset, to);
        }
        other => panic!("{other:?} does not point at bytes"),
    }
}

fn aligned(offset: usize, to: usize) -> usize {
    assert_eq!(
        offset % to,
        0,
        "a byte-scratch pointer at {offset} is not {to}-aligned"
    );
    offset
}
