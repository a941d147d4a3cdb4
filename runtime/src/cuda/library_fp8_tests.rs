//! The FP8 products' plan without a GPU. The steps of every planned FP8 product run on the CPU,
//! each kernel replaced by what its contract says it computes (`quantize`: the CPU quantizers'
//! codes and scales in the kernel's layouts; the FP8 GEMMs: the codes' products, each 128-wide K
//! block scaled by its two scales, read through the tensor maps or pointers the step passes), and
//! must give the matmul of the program's rounded operands. So every operand layout, transpose,
//! scale layout, scratch offset and tensor map of the plan is checked here; the kernels
//! themselves are checked against the same contract by `fathom gpu-check`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::dtype::{DType, TensorType};
use fathom_compiler::graph::{Accumulation, QuantFormat};
use fathom_compiler::kernel::{Buffer, BufferRole, Kernel};
use fathom_compiler::model::LossWeights;
use fathom_compiler::precision::{Precision, PrecisionPolicy, apply_precision};
use fathom_compiler::training::training_graph;
use fathom_kernels::TensorMapDesc;
use fathom_kernels::fp8_gemm::BLOCK_K;
use fathom_kernels::nvrtc::nvrtc_unless_skipped;

use super::*;
use crate::cuda::library::LibraryPlan;
use crate::cuda::quantize_samples::expected_quantization;
use crate::fp8::{ScaleRounding, e4m3_to_f32, fake_quantize};

const TARGETS: [Fp8Target; 2] = [Fp8Target::Hopper, Fp8Target::Portable];

#[test]
fn the_fp8_gemm_follows_the_architecture() {
    assert_eq!(Fp8Target::for_arch("sm_90a"), Some(Fp8Target::Hopper));
    for arch in ["sm_80", "sm_89", "sm_90", "sm_100a", "compute_86"] {
        assert_eq!(
            Fp8Target::for_arch(arch),
            Some(Fp8Target::Portable),
            "{arch}"
        );
    }
    for arch in ["sm_75", "compute_70", "gfx90a"] {
        assert_eq!(Fp8Target::for_arch(arch), None, "{arch}");
    }
}

/// The host memory a plan's steps touch: the program's buffers and the byte scratch.
struct Memory {
    buffers: Vec<Vec<f32>>,
    bytes: Vec<u8>,
}

impl Memory {
    fn f32_at(&self, offset: usize) -> f32 {
        f32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap())
    }

    /// Element `(row, col)` of the 2-D tensor a tensor map describes, as TMA reads it.
    fn through_map(&self, desc: &TensorMapDesc, base: usize, (row, col): (usize, usize)) -> usize {
        assert!(
            (col as u64) < desc.global_dims[0] && (row as u64) < desc.global_dims[1],
            "{}: ({row}, {col}) outside {:?}",
            desc.param,
            desc.global_dims
        );
        let size = match desc.dtype {
            fathom_kernels::TensorMapDtype::U8 => 1,
            fathom_kernels::TensorMapDtype::F32 => 4,
        };
        base + row * desc.outer_stride_bytes as usize + col * size
    }

    fn run(&mut self, step: &LibraryStep) {
        match step.kernel {
            LibraryKernel::Quantize(params) => self.quantize(params, &step.args),
            LibraryKernel::Fp8Gemm(params) => {
                let named = by_name(&params.kernel_params(), &step.args);
                let map = |name: &str| match named[name] {
                    StepArg::TensorMap(desc, base) => (desc, base),
                    other => panic!("{name} is {other:?}, not a tensor map"),
                };
                let code = |(desc, base): (TensorMapDesc, usize)| -> ReadCode {
                    Box::new(move |mem, row, col| {
                        mem.bytes[mem.through_map(&desc, base, (row, col))]
                    })
                };
                let scale = |(desc, base): (TensorMapDesc, usize)| -> ReadScale {
                    Box::new(move |mem, kb, row| {
                        mem.f32_at(mem.through_map(&desc, base, (kb, row)))
                    })
                };
                let scale_b = match params.b_scaling {
                    BScaling::Block128x128 => {
                        block_scales(bytes(named["scale_b"]), int(named["k"]))
                    }
                    BScaling::Row1x128 => scale(map("tmap_scale_b")),
                };
                let operands = Operands {
                    a: code(map("tmap_a")),
                    b: code(map("tmap_b")),
                    scale_a: scale(map("tmap_scale_a")),
                    scale_b,
                };
                self.gemm(&named, &operands);
            }
            LibraryKernel::Fp8GemmFallback(params) => {
                let named = by_name(&params.kernel_params(), &step.args);
                assert_eq!(named["block_expert"], StepArg::Null);
                let (m, n, k) = (int(named["m"]), int(named["n"]), int(named["k"]));
                let [a, b, sa, sb] = ["a", "b", "scale_a", "scale_b"].map(|p| bytes(named[p]));
                // The contract's layouts: A `[M][K]`, B `[N][K]`, A's scales
                // `[ceil(K/128)][round_up(M, 4)]`, B's by rows `[ceil(K/128)][round_up(N, 4)]`.
                let scale_b = match params.b_scaling {
                    BScaling::Block128x128 => block_scales(sb, k),
                    BScaling::Row1x128 => Box::new(move |mem: &Memory, kb: usize, j: usize| {
                        mem.f32_at(sb + 4 * (kb * n.next_multiple_of(4) + j))
                    }) as ReadScale,
                };
                let operands = Operands {
                    a: Box::new(move |mem, i, p| mem.bytes[a + i * k + p]),
                    b: Box::new(move |mem, j, p| mem.bytes[b + j * k + p]),
                    scale_a: Box::new(move |mem, kb, i| {
                        mem.f32_at(sa + 4 * (kb * m.next_multiple_of(4) + i))
                    }),
                    scale_b,
                };
                self.gemm(&named, &operands);
            }
            other => panic!("{} is not an FP8 product's kernel", other.name()),
        }
    }

    fn quantize(&mut self, params: QuantizeParams, args: &[StepArg]) {
        let [StepArg::Buffer(x, 0), q, s, rows, cols] = args else {
            panic!("quantize arguments {args:?}");
        };
        let (rows, cols) = (int(*rows), int(*cols));
        let x = &self.buffers[x.index()];
        assert_eq!(
            x.len(),
            rows * cols,
            "the quantize input is the whole buffer"
        );
        let (codes, scales) = expected_quantization(params, x, rows, cols).unwrap();
        let (q, s) = (bytes(*q), bytes(*s));
        self.bytes[q..q + codes.len()].copy_from_slice(&codes);
        for (i, scale) in scales.iter().enumerate() {
            self.bytes[s + 4 * i..s + 4 * i + 4].copy_from_slice(&scale.to_le_bytes());
        }
    }

    /// `out[i][j] = Σ_kb sa(kb, i) · sb(kb, j) · Σ_{p in kb} a(i, p) · b(j, p)`, in f64.
    fn gemm(&mut self, named: &HashMap<&str, StepArg>, operands: &Operands) {
        let (m, n, k) = (int(named["m"]), int(named["n"]), int(named["k"]));
        let StepArg::Buffer(out, 0) = named["out"] else {
            panic!("out is {:?}", named["out"]);
        };
        let block = BLOCK_K as usize;
        let mut result = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0f64;
                for kb in 0..k.div_ceil(block) {
                    let partial: f64 = (kb * block..(kb * block + block).min(k))
                        .map(|p| {
                            f64::from(e4m3_to_f32((operands.a)(self, i, p)))
                                * f64::from(e4m3_to_f32((operands.b)(self, j, p)))
                        })
                        .sum();
                    let scales = f64::from((operands.scale_a)(self, kb, i))
                        * f64::from((operands.scale_b)(self, kb, j));
                    sum += partial * scales;
                }
                result[i * n + j] = sum as f32;
            }
        }
        let buffer = &mut self.buffers[out.index()];
        assert_eq!(buffer.len(), m * n, "the GEMM writes the whole output");
        buffer.copy_from_slice(&result);
    }
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
    scale_b: ReadScale,
}

/// B's 128×128 block scales `[ceil(N/128)][ceil(K/128)]` at byte `base`, by (K block, row).
fn block_scales(base: usize, k: usize) -> ReadScale {
    let k_blocks = k.div_ceil(BLOCK_K as usize);
    Box::new(move |mem, kb, j| mem.f32_at(base + 4 * ((j / BLOCK_K as usize) * k_blocks + kb)))
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

fn bytes(arg: StepArg) -> usize {
    let StepArg::Bytes(offset) = arg else {
        panic!("{arg:?} is not in the byte scratch")
    };
    assert_eq!(
        offset % 16,
        0,
        "TMA and 16-byte loads need aligned operands"
    );
    offset
}

/// Deterministic values of every sign and a wide range of magnitudes.
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let wave = (((i + seed * 7919) * 2654435761) % 10007) as f32 / 10007.0 - 0.5;
            wave * (1 + (i * 13 + seed) % 97) as f32
        })
        .collect()
}

/// The f64 product of the matmul's views, `[batch][m][n]` row-major, and the sum of the
/// products' magnitudes of each element.
fn reference(call: &Library, buffers: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let Library::MatMul {
        batch,
        m,
        n,
        k,
        a,
        b,
        ..
    } = call
    else {
        panic!("not a matmul")
    };
    let rank = batch.len();
    let batches: usize = batch.iter().product();
    let at = |v: &View, index: usize, row: usize, col: usize| {
        let mut offset = v.offset as isize;
        let mut rest = index;
        for d in (0..rank).rev() {
            offset += (rest % batch[d]) as isize * v.strides[d];
            rest /= batch[d];
        }
        offset += row as isize * v.strides[rank] + col as isize * v.strides[rank + 1];
        f64::from(buffers[v.buffer.index()][offset as usize])
    };
    let (mut out, mut magnitude) = (Vec::new(), Vec::new());
    for index in 0..batches {
        for i in 0..*m {
            for j in 0..*n {
                let products: Vec<f64> = (0..*k)
                    .map(|p| at(a, index, i, p) * at(b, index, p, j))
                    .collect();
                out.push(products.iter().sum());
                magnitude.push(products.iter().map(|v| v.abs()).sum());
            }
        }
    }
    (out, magnitude)
}

/// Runs every FP8 product of `program`'s plan for `target` on the CPU and compares it with the
/// matmul of its rounded operands; returns how many ran.
fn check_fp8_products(program: &Program, target: Fp8Target) -> usize {
    let plan = LibraryPlan::of(program, Some(target)).unwrap();
    let mut checked = 0;
    for (kernel, call) in program.kernels.iter().zip(&plan.calls) {
        let Some(call) = call else { continue };
        let KernelBody::Library(matmul @ Library::MatMul { a, b, .. }) = &kernel.body else {
            continue;
        };
        let fp8_gemm = |s: &LibraryStep| {
            matches!(
                s.kernel,
                LibraryKernel::Fp8Gemm(_) | LibraryKernel::Fp8GemmFallback(_)
            )
        };
        if !call.steps.iter().any(fp8_gemm) {
            continue;
        }
        // The operands hold rounded values, as in a run: the rounding of fresh values.
        let mut buffers: Vec<Vec<f32>> = program
            .buffers
            .iter()
            .map(|b| vec![0f32; b.ty.numel()])
            .collect();
        for (seed, operand) in [a.buffer, b.buffer].into_iter().enumerate() {
            let writer = program.kernels.iter().find_map(|k| match &k.body {
                KernelBody::Library(Library::QuantizeDequantize {
                    tile_rows,
                    tile_cols,
                    pow2_scales,
                    out,
                    ..
                }) if *out == operand => Some((*tile_rows, *tile_cols, *pow2_scales)),
                _ => None,
            });
            let (tile_rows, tile_cols, pow2) = writer.unwrap();
            let rounding = if pow2 {
                ScaleRounding::PowerOfTwo
            } else {
                ScaleRounding::Exact
            };
            let dims = program.buffer(operand).ty.dims();
            let x = values(buffers[operand.index()].len(), seed + checked);
            buffers[operand.index()] =
                fake_quantize(&x, dims, tile_rows, tile_cols, rounding).unwrap();
        }
        let (expected, magnitude) = reference(matmul, &buffers);
        let mut memory = Memory {
            buffers,
            bytes: vec![0xa5; call.scratch_bytes],
        };
        for step in &call.steps {
            memory.run(step);
        }
        let out = match matmul {
            Library::MatMul { out, .. } => &memory.buffers[out.buffer.index()],
            _ => unreachable!(),
        };
        for (index, ((got, want), size)) in out.iter().zip(&expected).zip(&magnitude).enumerate() {
            // Quantising the rounded values again changes a scale by at most an f32 rounding:
            // a few 2⁻²⁴ of each product's magnitude, summed in f64 and rounded once to f32.
            let bound = 4e-7 * size + 1e-30;
            assert!(
                (f64::from(*got) - want).abs() <= bound,
                "{} ({target:?}): element {index} is {got}, the rounded operands' product {want} \
                 (bound {bound:e})\n{}",
                kernel.name,
                plan.table()
            );
        }
        checked += 1;
    }
    checked
}

/// A program of one product `out = A · B` over buffers rounded by `QuantizeDequantize`: A's
/// source `a_dims` rounded in `a_tile` tiles and read with `a_strides` (batch strides first),
/// B likewise.
#[derive(Clone)]
struct OneProduct {
    batch: Vec<usize>,
    mnk: (usize, usize, usize),
    a: (Vec<usize>, (usize, usize), Vec<isize>),
    b: (Vec<usize>, (usize, usize), Vec<isize>),
    pow2: bool,
}

impl OneProduct {
    fn program(&self) -> Program {
        let (m, n, k) = self.mnk;
        let batches: usize = self.batch.iter().product();
        let ty = |dims: &[usize]| TensorType::new(DType::F32, dims.to_vec());
        let buffer = |dims: &[usize], role| Buffer { ty: ty(dims), role };
        let mut out_dims = self.batch.clone();
        out_dims.extend([m, n]);
        let mut out_strides: Vec<isize> = (0..self.batch.len())
            .map(|d| (self.batch[d + 1..].iter().product::<usize>() * m * n) as isize)
            .collect();
        out_strides.extend([n as isize, 1]);
        let qdq = |x: usize, out: usize, (tile_rows, tile_cols): (usize, usize)| Kernel {
            name: format!("k{}_quantize_dequantize", x),
            nodes: Vec::new(),
            origin: String::new(),
            body: KernelBody::Library(Library::QuantizeDequantize {
                format: QuantFormat::E4M3,
                tile_rows,
                tile_cols,
                pow2_scales: self.pow2,
                x: BufferId(x as u32),
                out: BufferId(out as u32),
            }),
        };
        let view = |buffer: u32, strides: &[isize]| View {
            buffer: BufferId(buffer),
            offset: 0,
            strides: strides.to_vec(),
        };
        assert_eq!(batches * m * n, out_dims.iter().product::<usize>());
        Program {
            name: "one_fp8_product".to_owned(),
            buffers: vec![
                buffer(&self.a.0, BufferRole::Input("x".to_owned())),
                buffer(&self.a.0, BufferRole::Temporary),
                buffer(&self.b.0, BufferRole::Input("w".to_owned())),
                buffer(&self.b.0, BufferRole::Temporary),
                buffer(&out_dims, BufferRole::Temporary),
            ],
            kernels: vec![
                qdq(0, 1, self.a.1),
                qdq(2, 3, self.b.1),
                Kernel {
                    name: "k2_matmul".to_owned(),
                    nodes: Vec::new(),
                    origin: String::new(),
                    body: KernelBody::Library(Library::MatMul {
                        batch: self.batch.clone(),
                        m,
                        n,
                        k,
                        a: view(1, &self.a.2),
                        b: view(3, &self.b.2),
                        out: view(4, &out_strides),
                        accumulation: Accumulation::HOPPER,
                        exact_in: None,
                        rounds: false,
                        triangular: None,
                    }),
                },
            ],
            outputs: vec![("y".to_owned(), BufferId(4))],
        }
    }
}

/// Every operand layout of the module's table, at sizes of several 128-blocks with ragged ends
/// (M = 2 × 80, K = 272, N = 144), for both GEMMs and both scale roundings.
#[test]
fn every_operand_layout_gives_the_product_of_the_rounded_operands() {
    let (m, n, k) = (80usize, 144usize, 272usize);
    let (mi, ni, ki) = (m as isize, n as isize, k as isize);
    let rows_of_a = (vec![2, m, k], (1, 128), vec![mi * ki, ki, 1]);
    let t = 2 * m;
    let cases = [
        // Forward: X [2][80][272] rows, W [N][K] in 128×128 blocks read transposed.
        (
            vec![2],
            rows_of_a.clone(),
            (vec![n, k], (128, 128), vec![0, 1, ki]),
        ),
        // Input gradient: W [K][N] blocks read as stored.
        (vec![2], rows_of_a, (vec![k, n], (128, 128), vec![0, ni, 1])),
        // Weight gradient: dYᵀ and Xᵀ of [T][·] in 128×1 tiles; B as stored.
        (
            vec![],
            (vec![k, t], (128, 1), vec![1, t as isize]),
            (vec![k, n], (128, 1), vec![ni, 1]),
        ),
        // B an activation transposed, rounded in 1×128 tiles along K.
        (
            vec![],
            (vec![t, k], (1, 128), vec![ki, 1]),
            (vec![n, k], (1, 128), vec![1, ki]),
        ),
    ];
    for (batch, a, b) in cases {
        let rows = if batch.is_empty() { t } else { m };
        for pow2 in [false, true] {
            let product = OneProduct {
                batch: batch.clone(),
                mnk: (rows, n, k),
                a: a.clone(),
                b: b.clone(),
                pow2,
            };
            let program = product.program();
            for target in TARGETS {
                let plan = LibraryPlan::of(&program, Some(target)).unwrap();
                let call = plan.calls[2].as_ref().unwrap();
                assert_eq!(call.note, None, "{}", plan.table());
                assert_eq!(check_fp8_products(&program, target), 1);
            }
        }
    }
}

/// A mutation the check must catch: B's codes read from A's region.
#[test]
fn a_wrong_operand_address_is_caught() {
    let product = OneProduct {
        batch: vec![],
        mnk: (64, 32, 128),
        a: (vec![64, 128], (1, 128), vec![128, 1]),
        b: (vec![32, 128], (128, 128), vec![1, 128]),
        pow2: false,
    };
    let program = product.program();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Portable)).unwrap();
    let mut call = plan.calls[2].clone().unwrap();
    let gemm = call.steps.last_mut().unwrap();
    gemm.args[1] = gemm.args[0];
    let mut memory = Memory {
        buffers: program
            .buffers
            .iter()
            .map(|b| values(b.ty.numel(), 3))
            .collect(),
        bytes: vec![0; call.scratch_bytes],
    };
    for step in &call.steps {
        memory.run(step);
    }
    let (expected, _) = reference(
        match &program.kernels[2].body {
            KernelBody::Library(call) => call,
            _ => unreachable!(),
        },
        &memory.buffers,
    );
    let out = &memory.buffers[4];
    assert!(
        out.iter()
            .zip(&expected)
            .any(|(g, w)| (f64::from(*g) - w).abs() > 1e-3 * w.abs().max(1.0))
    );
}

/// Products the FP8 GEMM cannot take run as the f32 GEMM, and the plan says why.
#[test]
fn products_the_fp8_gemm_cannot_take_run_in_f32_with_a_reason() {
    let base = OneProduct {
        batch: vec![],
        mnk: (64, 32, 128),
        a: (vec![64, 128], (1, 128), vec![128, 1]),
        b: (vec![32, 128], (128, 128), vec![1, 128]),
        pow2: false,
    };
    let note = |product: &OneProduct, target: Option<Fp8Target>| {
        let plan = LibraryPlan::of(&product.program(), target).unwrap();
        let call = plan.calls[2].clone().unwrap();
        assert!(call.steps[0].kernel.name().starts_with("gemm_f32"));
        call.note.unwrap()
    };
    // K = 120: not a multiple of 16.
    let odd_k = OneProduct {
        mnk: (64, 32, 120),
        a: (vec![64, 120], (1, 128), vec![120, 1]),
        b: (vec![32, 120], (128, 128), vec![1, 120]),
        ..base.clone()
    };
    let why = note(&odd_k, Some(Fp8Target::Hopper));
    assert!(
        why.contains("120") && why.contains("multiple of 16"),
        "{why}"
    );
    // A rounded in 128×128 blocks: not 1×128 tiles.
    let blocks_on_a = OneProduct {
        a: (vec![64, 128], (128, 128), vec![128, 1]),
        ..base.clone()
    };
    let why = note(&blocks_on_a, Some(Fp8Target::Portable));
    assert!(why.contains("A is rounded in 128x128 tiles"), "{why}");
    // No FP8 GEMM on this GPU.
    assert!(note(&base, None).contains("no FP8 GEMM"));
}

/// The `small` model's training step at precision FP8 with Hopper's accumulation, lowered for
/// CUDA.
fn small_fp8_training_program() -> Program {
    let spec = fathom_compiler::spec::examples::small();
    let train = training_graph(&spec, 2, 32, LossWeights::deepseek_v3()).unwrap();
    let policy = PrecisionPolicy {
        accumulation: Accumulation::HOPPER,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let tiling = fathom_compiler::spec::Fp8Spec::default();
    let graph = apply_precision(&train.graph, &policy, &tiling).unwrap();
    compile(&graph, &CompileOptions::default()).unwrap().program
}

/// Every FP8 product of a real training step (forward, input and weight gradients) runs as the
/// FP8 GEMM and gives the product of its rounded operands; the rest say why not (snapshot).
#[test]
fn the_fp8_training_steps_products_run_as_fp8_gemms() {
    let program = small_fp8_training_program();
    for target in TARGETS {
        let checked = check_fp8_products(&program, target);
        assert!(checked >= 20, "{target:?}: only {checked} FP8 products");
    }
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let kinds: std::collections::BTreeSet<String> = plan
        .kernels()
        .iter()
        .map(LibraryKernel::name)
        .filter(|name| name.starts_with("quantize_") || name.starts_with("fp8_gemm"))
        .collect();
    for kind in ["1x128", "128x128t", "128x1t"] {
        assert!(
            kinds.contains(&format!("quantize_{kind}_f32_e4m3")),
            "{kind}: {kinds:?}"
        );
    }
    // The products' lines of the table (the rest of the plan is the f32 one, snapshotted in
    // `library_tests`).
    let mut table = String::new();
    for (kernel, call) in program.kernels.iter().zip(&plan.calls) {
        let (Some(call), KernelBody::Library(Library::MatMul { .. })) = (call, &kernel.body) else {
            continue;
        };
        let one = LibraryPlan {
            calls: vec![Some(call.clone())],
        };
        table.push_str(&one.table());
    }
    insta::assert_snapshot!("small_fp8_training_products", table);
}

#[test]
fn the_fp8_plans_kernels_compile_for_their_targets() {
    let Some(nvrtc) = nvrtc_unless_skipped().unwrap_or_else(|e| {
        panic!("{e}\n(set FATHOM_SKIP_NVRTC=1 to skip the CUDA compile checks explicitly)")
    }) else {
        return;
    };
    let program = small_fp8_training_program();
    let mut failures = Vec::new();
    for (target, arch) in [
        (Fp8Target::Hopper, "sm_90a"),
        (Fp8Target::Portable, "sm_80"),
    ] {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        for kernel in plan.kernels() {
            let name = kernel.name();
            if !(name.starts_with("quantize_") || name.contains("fp8_gemm")) {
                continue;
            }
            let source = kernel.instantiate().unwrap();
            match nvrtc.compile(&source, Some(arch)) {
                Ok(compiled) => {
                    let r = compiled.resources.unwrap_or_default();
                    if r.spill_store_bytes + r.spill_load_bytes > 0 {
                        failures.push(format!("{name} ({arch}) spills"));
                    }
                }
                Err(e) => failures.push(format!("{name} ({arch}): {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
