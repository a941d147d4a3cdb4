//! The FP8 products' plan without a GPU. The steps of every planned FP8 product run on the CPU,
//! each kernel replaced by what its contract says it computes (`quantize`: the CPU quantizers'
//! codes and scales in the kernel's layouts; the FP8 GEMMs: the codes' products, each 128-wide K
//! block scaled by its two scales, read through the tensor maps or pointers the step passes), and
//! must give the matmul of the program's rounded operands. So every operand layout, transpose,
//! scale layout, scratch offset and tensor map of the plan is checked here; the kernels
//! themselves are checked against the same contract by `fathom gpu-check`.

#![allow(clippy::unwrap_used)]

use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::dtype::{DType, TensorType};
use fathom_compiler::graph::ExpertTiles;
use fathom_compiler::graph::{Accumulation, QuantFormat};
use fathom_compiler::kernel::{
    Buffer, BufferRole, ExpertOutputs, ExpertWeights, Kernel, LoopNest, View,
};
use fathom_compiler::model::LossWeights;
use fathom_compiler::precision::{Precision, PrecisionPolicy, apply_precision};
use fathom_compiler::training::training_graph;
use fathom_kernels::TileSchedule;
use fathom_kernels::nvrtc::nvrtc_unless_skipped;

use super::*;
use crate::cuda::library::{LibraryCall, LibraryPlan};
use crate::fp8::{ScaleRounding, fake_quantize};

#[path = "library_fp8_emulator.rs"]
mod emulator;
#[path = "library_expert_wgrad_tests.rs"]
mod expert_wgrad;
#[path = "library_fp8_products_tests.rs"]
mod products;
#[path = "library_fp8_saved_tests.rs"]
mod saved;
#[path = "library_fp8_sources_tests.rs"]
mod sources;
#[path = "library_fp8_weight_codes_tests.rs"]
mod weight_codes;
use emulator::Memory;

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

/// The f64 grouped product `out[t][s] = x[t][s or 0] · W[e]ᵀ` (`e = expert_ids[t][s]`), and
/// the sum of the products' magnitudes of each element.
fn grouped_reference(
    program: &Program,
    call: &Library,
    buffers: &[Vec<f32>],
) -> (Vec<f64>, Vec<f64>) {
    let Library::GroupedMatMul {
        x,
        weights: ExpertWeights::Stacked(w),
        expert_ids,
        out,
        ..
    } = call
    else {
        panic!("not a grouped matmul of stacked weights")
    };
    let dims = |b: &BufferId| program.buffer(*b).ty.dims().to_vec();
    let (ids, n) = (dims(expert_ids), dims(out)[2]);
    let (x_slots, k) = fathom_compiler::kernel::grouped_rows(&dims(x), ids[0]);
    let (mut result, mut magnitude) = (Vec::new(), Vec::new());
    for token_slot in 0..ids[0] * ids[1] {
        let expert = buffers[expert_ids.index()][token_slot] as usize;
        let row = if x_slots == 1 {
            token_slot / ids[1]
        } else {
            token_slot
        };
        for j in 0..n {
            let products: Vec<f64> = (0..k)
                .map(|p| {
                    let at = w.offset as isize
                        + expert as isize * w.strides[0]
                        + j as isize * w.strides[1]
                        + p as isize * w.strides[2];
                    f64::from(buffers[x.index()][row * k + p])
                        * f64::from(buffers[w.buffer.index()][at as usize])
                })
                .collect();
            result.push(products.iter().sum());
            magnitude.push(products.iter().map(|v| v.abs()).sum());
        }
    }
    (result, magnitude)
}

/// The experts of a grouped call and its expert ids, if it is one.
fn experts_of(program: &Program, call: &Library) -> Option<(usize, BufferId)> {
    match call {
        Library::GroupedMatMul {
            weights,
            expert_ids,
            ..
        } => {
            let experts = match weights {
                ExpertWeights::Stacked(w) => program.buffer(w.buffer).ty.dims()[0],
                ExpertWeights::Parts(parts) => parts.len(),
            };
            Some((experts, *expert_ids))
        }
        Library::GroupedMatMulWeightGrad {
            out: ExpertOutputs::Stacked(out),
            expert_ids,
            ..
        } => Some((program.buffer(*out).ty.dims()[0], *expert_ids)),
        _ => None,
    }
}

/// The buffers of a run reaching `call`: [`operand_values`], the rest zero.
fn operands_of(program: &Program, call: &Library) -> Vec<Vec<f32>> {
    let mut buffers: Vec<Vec<f32>> = program
        .buffers
        .iter()
        .map(|b| vec![0f32; b.ty.numel()])
        .collect();
    for (buffer, values) in operand_values(program, call) {
        buffers[buffer.index()] = values;
    }
    buffers
}

/// What `call` reads: its rounded operands the rounding of fresh values (the roundings' sources
/// those values), its other operands fresh values, its expert ids spread over every expert but
/// expert 1 (an empty segment). A buffer's values depend on the buffer only, so that calls
/// reading the same weight or activation read the same.
fn operand_values(program: &Program, call: &Library) -> Vec<(BufferId, Vec<f32>)> {
    let mut fed = Vec::new();
    let (reads, _) = call.operands();
    for operand in reads {
        let dims = program.buffer(operand).ty.dims();
        let len = dims.iter().product::<usize>();
        if let Some((experts, expert_ids)) = experts_of(program, call)
            && operand == expert_ids
        {
            let ids = (0..len).map(|i| match (i * 7 + i / 5) % experts {
                1 if experts > 2 => 0.0,
                e => e as f32,
            });
            fed.push((operand, ids.collect()));
            continue;
        }
        rounded_values(program, operand, &mut fed);
    }
    fed
}

/// Fresh values of `buffer`, or when a rounding writes it the rounding of its source's values
/// (and so on up a chain of roundings: the weight gradient's xᵀ rounded from a rounded x),
/// pushed to `fed` with every source's: the quantize steps may read any of them
/// (`quantize_weights_directly`, `quantize_activations_directly`), or codes a rounding keeps
/// made from its source (`library_fp8_saved`).
fn rounded_values(
    program: &Program,
    buffer: BufferId,
    fed: &mut Vec<(BufferId, Vec<f32>)>,
) -> Vec<f32> {
    let dims = program.buffer(buffer).ty.dims();
    let writer = program.kernels.iter().find_map(|k| match &k.body {
        KernelBody::Library(Library::QuantizeDequantize {
            tile_rows,
            tile_cols,
            pow2_scales,
            x,
            out,
            ..
        }) if *out == buffer => Some((*x, (*tile_rows, *tile_cols), *pow2_scales)),
        _ => None,
    });
    let values = match writer {
        None => match stored_product(program, buffer) {
            Some((nest, x, y)) => {
                let (x_values, y_values) = (
                    rounded_values(program, x.buffer, fed),
                    rounded_values(program, y.buffer, fed),
                );
                product_values(&nest.domain, (&x, &x_values), (&y, &y_values))
            }
            None => values(dims.iter().product(), buffer.index()),
        },
        Some((source, (tile_rows, tile_cols), pow2)) => {
            let x = rounded_values(program, source, fed);
            fake_quantize(&x, dims, tile_rows, tile_cols, scale_rounding(pow2)).unwrap()
        }
    };
    fed.push((buffer, values.clone()));
    values
}

/// The loop nest storing `buffer` as the product of two loads (`x * y`), if one does: the
/// GPU's quantisations may read its factors in its place (`library_fp8_products`), so a test
/// gives the product the factors' values.
fn stored_product(program: &Program, buffer: BufferId) -> Option<(LoopNest, View, View)> {
    use crate::cuda::library_fp8_products::product_of_loads;
    program.kernels.iter().find_map(|k| {
        let KernelBody::Loop(nest) = &k.body else {
            return None;
        };
        let (out, x, y) = product_of_loads(nest)?;
        (out.buffer == buffer).then(|| (nest.clone(), x.clone(), y.clone()))
    })
}

/// `x * y` over `domain`, row-major (the product's own layout), each factor read through its view.
fn product_values(domain: &[usize], x: (&View, &[f32]), y: (&View, &[f32])) -> Vec<f32> {
    let total: usize = domain.iter().product();
    let at = |(view, values): (&View, &[f32]), mut flat: usize| {
        let mut offset = view.offset as isize;
        for (axis, &extent) in domain.iter().enumerate().rev() {
            offset += (flat % extent) as isize * view.strides[axis];
            flat /= extent;
        }
        values[offset as usize]
    };
    (0..total).map(|i| at(x, i) * at(y, i)).collect()
}

fn scale_rounding(pow2: bool) -> ScaleRounding {
    if pow2 {
        ScaleRounding::PowerOfTwo
    } else {
        ScaleRounding::Exact
    }
}

/// Runs every FP8 product (dense and grouped) of `program`'s plan for `target` on the CPU and
/// compares it with the product of its rounded operands; returns how many ran, and how many of
/// them were grouped.
fn check_fp8_products(program: &Program, target: Fp8Target) -> (usize, usize) {
    let plan = LibraryPlan::of(program, Some(target)).unwrap();
    check_products(program, &plan, LibraryCall::runs_fp8_gemm)
}

/// [`check_fp8_products`] for the calls of `plan` that `which` picks.
pub(crate) fn check_products(
    program: &Program,
    plan: &LibraryPlan,
    which: impl Fn(&LibraryCall) -> bool,
) -> (usize, usize) {
    let (mut checked, mut grouped) = (0, 0);
    for (position, (kernel, call)) in program.kernels.iter().zip(&plan.calls).enumerate() {
        let (Some(call), KernelBody::Library(library)) = (call, &kernel.body) else {
            continue;
        };
        if !which(call) {
            continue;
        }
        let buffers = operands_of(program, library);
        // A quantisation read from an earlier call is made by running that call first, on
        // the same buffers and byte scratch (`library_fp8_sharing`), and so are codes a
        // rounding keeps (`library_fp8_saved`); the weights' codes by their own launches
        // before any call (`library_fp8_weight_codes`).
        let producers: Vec<&LibraryCall> = (call.reused.iter().map(|r| r.from))
            .chain(call.reads_codes.iter().map(|r| r.from))
            .filter_map(|from| plan.calls[from].as_ref())
            .collect();
        let scratch = |c: &&LibraryCall| (c.scratch_ints, c.scratch_bytes);
        let (ints, bytes) = std::iter::once(&call)
            .chain(&producers)
            .map(scratch)
            .fold((0, 0), |(i, b), (ci, cb)| (i.max(ci), b.max(cb)));
        let mut memory = Memory::new(buffers.clone(), ints, bytes);
        let steps = producers.iter().chain([&call]).flat_map(|c| &c.steps);
        for step in plan.weight_codes.read_by(position).chain(steps) {
            memory.run(step);
        }
        grouped += usize::from(assert_product(
            program,
            (kernel, call),
            &buffers,
            &memory,
            plan,
        ));
        checked += 1;
    }
    (checked, grouped)
}

/// Asserts that `memory` holds, in `kernel`'s output, the product of its rounded operands as
/// `buffers` hold them (`call`: its plan); returns whether it is a grouped product.
fn assert_product(
    program: &Program,
    (kernel, call): (&Kernel, &LibraryCall),
    buffers: &[Vec<f32>],
    memory: &Memory,
    plan: &LibraryPlan,
) -> bool {
    let KernelBody::Library(library) = &kernel.body else {
        panic!("{} is not a library call", kernel.name);
    };
    let (expected, magnitude) = match library {
        Library::MatMul { .. } => reference(library, buffers),
        Library::GroupedMatMulWeightGrad { .. } => {
            expert_wgrad::weight_grad_reference(program, library, buffers)
        }
        _ => grouped_reference(program, library, buffers),
    };
    let (_, writes) = library.operands();
    let out = &memory.buffers[writes[0].index()];
    let target = call.steps.iter().find_map(|s| match s.kernel {
        LibraryKernel::Fp8Gemm(_) => Some(Fp8Target::Hopper),
        LibraryKernel::Fp8GemmFallback(_) => Some(Fp8Target::Portable),
        _ => None,
    });
    assert_eq!(out.len(), expected.len());
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
    !matches!(library, Library::MatMul { .. })
}

/// Whether the FP8 emulator runs `step`'s kernel.
fn emulated(step: &LibraryStep) -> bool {
    use fathom_kernels::IndexOp;
    match step.kernel {
        LibraryKernel::Index(params) => {
            matches!(params.op, IndexOp::GroupRows | IndexOp::PadGroups)
        }
        LibraryKernel::Quantize(_)
        | LibraryKernel::Fp8Gemm(_)
        | LibraryKernel::Fp8GemmFallback(_)
        | LibraryKernel::FakeQuantizeGathered(_) => true,
        LibraryKernel::Gemm(params) => {
            params.kind == fathom_kernels::F32GemmKind::GroupedWeightGrad
        }
        _ => false,
    }
}

/// A call that reads a quantisation kept from an earlier call finds it intact after every
/// library call in between has run on the same byte scratch (each from offset 0, over its own
/// regions), and gives the product of its rounded operands; and a source written in between
/// is quantised again.
#[test]
fn shared_quantizations_survive_the_calls_between() {
    let program = small_fp8_program_with_rounded_outputs();
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let mut readers = 0;
        for (position, (kernel, call)) in program.kernels.iter().zip(&plan.calls).enumerate() {
            let (Some(call), KernelBody::Library(library)) = (call, &kernel.body) else {
                continue;
            };
            let Some(first) = call.reused.iter().map(|r| r.from).min() else {
                continue;
            };
            let buffers = operands_of(&program, library);
            let mut memory =
                Memory::new(buffers.clone(), plan.scratch_ints(), plan.scratch_bytes());
            for step in plan.weight_codes.read_by(position) {
                memory.run(step);
            }
            for step in plan.calls[first..position]
                .iter()
                .flatten()
                .flat_map(|c| &c.steps)
            {
                if emulated(step) {
                    memory.run(step);
                } else {
                    // Not one of the FP8 plans' kernels (the f32 ones, the roundings): it
                    // must leave the byte scratch alone.
                    assert!(
                        !step
                            .args
                            .iter()
                            .any(|a| matches!(a, StepArg::Bytes(_) | StepArg::TensorMap(..))),
                        "{} uses the byte scratch",
                        step.kernel.name()
                    );
                }
            }
            // The calls between wrote their own outputs; this call's operands are as made
            // (the shared sources no call in between writes, as the plan requires).
            let (reads, _) = library.operands();
            for operand in reads {
                memory.buffers[operand.index()] = buffers[operand.index()].clone();
            }
            for step in &call.steps {
                memory.run(step);
            }
            assert_product(&program, (kernel, call), &buffers, &memory, &plan);
            readers += 1;
        }
        assert_eq!(
            readers, 12,
            "{target:?}: the calls reading a kept quantisation"
        );
    }
}

/// A source that a kernel between two calls writes is quantised again by the second.
#[test]
fn a_source_written_between_two_calls_is_quantised_again() {
    let mut program = small_fp8_program_with_rounded_outputs();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let (reader, reused) = (plan.calls.iter().enumerate())
        .find_map(|(i, c)| Some((i, c.as_ref()?.reused.first()?.clone())))
        .unwrap();
    // A loop nest between them now stores into the shared source.
    store_into(&mut program, reused.from + 1..reader, reused.source);
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let call = plan.calls[reader].as_ref().unwrap();
    assert!(
        call.reused.iter().all(|r| r.source != reused.source),
        "{}",
        plan.table()
    );
    let quantizes_source = call.steps.iter().any(|step| {
        matches!(step.kernel, LibraryKernel::Quantize(_))
            && matches!(step.args[0], StepArg::Buffer(b, _) if b == reused.source)
    });
    assert!(quantizes_source, "{} quantises its source again", call.name);
}

/// Makes the first loop nest of `program` among `positions` store into `buffer` (a write the
/// plans must see).
pub(crate) fn store_into(
    program: &mut Program,
    positions: std::ops::Range<usize>,
    buffer: BufferId,
) {
    use fathom_compiler::kernel::Stmt;
    let writer = positions
        .into_iter()
        .find(|&k| matches!(program.kernels[k].body, KernelBody::Loop(_)))
        .unwrap();
    let KernelBody::Loop(nest) = &mut program.kernels[writer].body else {
        unreachable!()
    };
    let store = nest.body.iter_mut().find_map(|stmt| match stmt {
        Stmt::Store { view, .. } | Stmt::StoreRow { view, .. } => Some(view),
        _ => None,
    });
    store.unwrap().buffer = buffer;
}

/// The precision pass's E4M3 rounding of buffer `x` into `out` in `tile_rows`×`tile_cols` tiles.
fn rounding_kernel(x: u32, out: u32, (tile_rows, tile_cols): (usize, usize), pow2: bool) -> Kernel {
    Kernel {
        name: format!("k{x}_quantize_dequantize"),
        nodes: Vec::new(),
        origin: String::new(),
        body: KernelBody::Library(Library::QuantizeDequantize {
            format: QuantFormat::E4M3,
            tile_rows,
            tile_cols,
            pow2_scales: pow2,
            x: BufferId(x),
            out: BufferId(out),
        }),
    }
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
    /// The forward form at one block each way: rows in 1×128 tiles, the weight `[N][K]` in
    /// 128×128 blocks read transposed.
    fn forward_64x32x128() -> Self {
        OneProduct {
            batch: vec![],
            mnk: (64, 32, 128),
            a: (vec![64, 128], (1, 128), vec![128, 1]),
            b: (vec![32, 128], (128, 128), vec![1, 128]),
            pow2: false,
        }
    }

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
        let qdq = |x, out, tile| rounding_kernel(x, out, tile, self.pow2);
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
                assert_eq!(check_fp8_products(&program, target), (1, 0));
            }
        }
    }
}

/// A program of one grouped product over `experts` experts: x `[tokens][x_slots][k]` rounded in
/// 1×128 tiles, the stacked weights rounded in 128×128 blocks per expert, stored `[E][N][K]` or
/// (`transposed`) `[E][K][N]`, `slots` experts per token.
fn one_grouped_product(
    (tokens, slots, x_slots): (usize, usize, usize),
    (experts, n, k): (usize, usize, usize),
    transposed: bool,
) -> Program {
    let ty = |dtype, dims: &[usize]| TensorType::new(dtype, dims.to_vec());
    let buffer = |dims: &[usize], role| Buffer {
        ty: ty(DType::F32, dims),
        role,
    };
    let w_dims = if transposed {
        [experts, k, n]
    } else {
        [experts, n, k]
    };
    let qdq = rounding_kernel;
    let (sn, sk) = if transposed {
        (1, n as isize)
    } else {
        (k as isize, 1)
    };
    Program {
        name: "one_grouped_fp8_product".to_owned(),
        buffers: vec![
            buffer(&[tokens, x_slots, k], BufferRole::Input("x".to_owned())),
            buffer(&[tokens, x_slots, k], BufferRole::Temporary),
            buffer(&w_dims, BufferRole::Input("w".to_owned())),
            buffer(&w_dims, BufferRole::Temporary),
            Buffer {
                ty: ty(DType::I64, &[tokens, slots]),
                role: BufferRole::Input("expert_ids".to_owned()),
            },
            buffer(&[tokens, slots, n], BufferRole::Temporary),
        ],
        kernels: vec![
            qdq(0, 1, (1, 128), true),
            qdq(2, 3, (128, 128), false),
            Kernel {
                name: "k2_grouped_matmul".to_owned(),
                nodes: Vec::new(),
                origin: String::new(),
                body: KernelBody::Library(Library::GroupedMatMul {
                    x: BufferId(1),
                    weights: ExpertWeights::Stacked(View {
                        buffer: BufferId(3),
                        offset: 0,
                        strides: vec![(n * k) as isize, sn, sk],
                    }),
                    expert_ids: BufferId(4),
                    out: BufferId(5),
                    accumulation: Accumulation::HOPPER,
                    exact_in: None,
                    rounds: false,
                }),
            },
        ],
        outputs: vec![("y".to_owned(), BufferId(5))],
    }
}

/// The experts' grouped products in both weight orientations, with x per token or per slot, at
/// sizes of several 128-blocks with ragged ends (and an expert without tokens), the experts'
/// weights quantised in one launch whether or not a 128×128 block of the stack would straddle
/// two experts (N = 144 or 128).
#[test]
fn every_grouped_layout_gives_the_product_of_the_rounded_operands() {
    for (slots, x_slots) in [(2, 1), (3, 3)] {
        for (n, transposed) in [(144, false), (144, true), (128, false)] {
            let program = one_grouped_product((150, slots, x_slots), (5, n, 272), transposed);
            for target in TARGETS {
                let plan = LibraryPlan::of(&program, Some(target)).unwrap();
                let call = plan.calls[2].as_ref().unwrap();
                assert_eq!(call.note, None, "{}", plan.table());
                // Every expert's weight in one launch, a grid layer each.
                let weight_quantizes: Vec<_> = call
                    .steps
                    .iter()
                    .filter(|s| s.kernel.name().starts_with("quantize_128x128"))
                    .collect();
                assert_eq!(weight_quantizes.len(), 1);
                assert_eq!(weight_quantizes[0].grid[2], 5);
                assert_eq!(check_fp8_products(&program, target), (1, 1));
            }
        }
    }
}

/// The experts' products with K = 264 (not a multiple of 16): x's gathered codes and each
/// expert's weight codes are padded with zero codes to 272, and the grouped GEMM runs over 272.
#[test]
fn a_grouped_product_with_k_off_16_pads_k_with_zero_codes() {
    for transposed in [false, true] {
        let program = one_grouped_product((150, 2, 1), (5, 144, 264), transposed);
        for target in TARGETS {
            let plan = LibraryPlan::of(&program, Some(target)).unwrap();
            let call = plan.calls[2].as_ref().unwrap();
            assert_eq!(call.note, None, "{}", plan.table());
            let gemm = call.steps.last().unwrap();
            assert!(gemm.args.contains(&StepArg::I32(272)), "{}", plan.table());
            assert_eq!(check_fp8_products(&program, target), (1, 1));
        }
    }
}

/// A weight gradient over 150 tokens (not a multiple of 16): both operands' codes are padded
/// with zero codes to 160 along K, and the GEMM runs over K = 160.
#[test]
fn a_token_count_off_16_pads_k_with_zero_codes() {
    let (m, n, t) = (64usize, 48usize, 150usize);
    let product = OneProduct {
        batch: vec![],
        mnk: (m, n, t),
        a: (vec![t, m], (128, 1), vec![1, m as isize]),
        b: (vec![n, t], (1, 128), vec![1, t as isize]),
        pow2: false,
    };
    let program = product.program();
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let call = plan.calls[2].as_ref().unwrap();
        assert_eq!(call.note, None, "{}", plan.table());
        let gemm = call.steps.last().unwrap();
        assert!(gemm.args.contains(&StepArg::I32(160)), "{}", plan.table());
        assert_eq!(check_fp8_products(&program, target), (1, 0));
    }
}

/// A mutation the check must catch: B's codes read from A's region.
#[test]
fn a_wrong_operand_address_is_caught() {
    let product = OneProduct::forward_64x32x128();
    let program = product.program();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Portable)).unwrap();
    let mut call = plan.calls[2].clone().unwrap();
    let gemm = call.steps.last_mut().unwrap();
    gemm.args[1] = gemm.args[0];
    let buffers = program
        .buffers
        .iter()
        .map(|b| values(b.ty.numel(), 3))
        .collect();
    let mut memory = Memory::new(buffers, 0, call.scratch_bytes);
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
    let base = OneProduct::forward_64x32x128();
    let note = |product: &OneProduct, target: Option<Fp8Target>| {
        let plan = LibraryPlan::of(&product.program(), target).unwrap();
        let call = plan.calls[2].clone().unwrap();
        assert!(call.steps[0].kernel.name().starts_with("gemm_f32"));
        call.note.unwrap()
    };
    // K = 122: the weight's 128×128 blocks are read 4 values at a time.
    let odd_k = OneProduct {
        mnk: (64, 32, 122),
        a: (vec![64, 122], (1, 128), vec![122, 1]),
        b: (vec![32, 122], (128, 128), vec![1, 122]),
        ..base.clone()
    };
    let why = note(&odd_k, Some(Fp8Target::Hopper));
    assert!(
        why.contains("122") && why.contains("multiple of 4"),
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
pub(crate) fn small_fp8_training_program() -> Program {
    let graph = small_fp8_training_graph();
    compile(&graph, &CompileOptions::default()).unwrap().program
}

/// [`small_fp8_training_program`] with every activation's rounding a program output too, so
/// that the GPU writes their values: neither skipped nor kept as codes, they are quantised
/// where read, and the products reading one share its quantisation (`library_fp8_sharing`).
pub(crate) fn small_fp8_program_with_rounded_outputs() -> Program {
    let mut program = small_fp8_training_program();
    let rounded: Vec<BufferId> = (program.kernels.iter())
        .filter_map(|k| match &k.body {
            KernelBody::Library(Library::QuantizeDequantize { x, out, .. })
                if !program.buffer(*x).role.is_fed_weight() =>
            {
                Some(*out)
            }
            _ => None,
        })
        .collect();
    for (i, out) in rounded.into_iter().enumerate() {
        program.outputs.push((format!("rounded.{i}"), out));
    }
    program
}

/// The graph of [`small_fp8_training_program`].
pub(crate) fn small_fp8_training_graph() -> fathom_compiler::Graph {
    let spec = fathom_compiler::spec::examples::small();
    let train = training_graph(&spec, 2, 32, LossWeights::deepseek_v3()).unwrap();
    let policy = PrecisionPolicy {
        accumulation: Accumulation::HOPPER,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let tiling = fathom_compiler::spec::Fp8Spec::default();
    apply_precision(&train.graph, &policy, &tiling).unwrap()
}

/// Every FP8 product of a real training step (forward, input and weight gradients, the
/// experts' grouped products) runs as the FP8 GEMM and gives the product of its rounded
/// operands; the rest say why not (snapshot).
#[test]
fn the_fp8_training_steps_products_run_as_fp8_gemms() {
    let program = small_fp8_training_program();
    for target in TARGETS {
        let (checked, grouped) = check_fp8_products(&program, target);
        assert!(checked >= 20, "{target:?}: only {checked} FP8 products");
        assert!(
            grouped >= 3,
            "{target:?}: only {grouped} grouped FP8 products"
        );
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let notes = plan.calls.iter().flatten().filter(|c| c.note.is_some());
        assert_eq!(plan.fp8_summary(), (checked, notes.count()));
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
    // The weight codes' and the products' lines of the table (the rest of the plan is the f32
    // one, snapshotted in `library_tests`).
    let mut table = plan.weight_codes_table();
    for (kernel, call) in program.kernels.iter().zip(&plan.calls) {
        let (
            Some(call),
            KernelBody::Library(
                Library::MatMul { .. }
                | Library::GroupedMatMul { .. }
                | Library::GroupedMatMulWeightGrad { .. },
            ),
        ) = (call, &kernel.body)
        else {
            continue;
        };
        let one = LibraryPlan {
            calls: vec![Some(call.clone())],
            ..LibraryPlan::default()
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

/// The FP8 samples `fathom gpu-check` runs on a GPU (`library_samples`) plan as FP8 GEMMs, and
/// their plans give the product of the rounded operands on the CPU; the one the GPU tunes does
/// under every candidate the tuner may choose, one block per tile or persistent.
#[test]
fn the_fp8_library_samples_run_as_fp8_gemms() {
    use crate::cuda::gemm_choice::GemmChoice;
    use crate::cuda::library_samples::{Tolerance, library_samples};
    let samples = library_samples().unwrap();
    let fp8: Vec<_> = samples
        .iter()
        .filter(|s| matches!(s.tolerance, Tolerance::Similarity { .. }))
        .collect();
    assert_eq!(fp8.len(), 5);
    let tuned: Vec<_> = fp8
        .iter()
        .filter(|s| s.options.gemm_tuning.is_some())
        .collect();
    assert_eq!(tuned.len(), 1);
    let plan = LibraryPlan::of(&tuned[0].program, Some(Fp8Target::Hopper)).unwrap();
    let [form] = plan.fp8_gemm_forms()[..] else {
        panic!("one FP8 GEMM form: {}", plan.table())
    };
    let schedules = [
        TileSchedule::ONE_TILE_PER_BLOCK,
        TileSchedule::persistent(132, 8),
    ];
    for params in form.candidates() {
        for schedule in schedules {
            let mut plan = plan.clone();
            let choice = GemmChoice { params, schedule };
            plan.apply_gemm_choices(&[(form, choice)].into()).unwrap();
            let (checked, _) = check_products(&tuned[0].program, &plan, LibraryCall::runs_fp8_gemm);
            assert_eq!(checked, 1, "{} {schedule}", params.name());
        }
    }
    for sample in fp8 {
        for target in TARGETS {
            let plan = LibraryPlan::of(&sample.program, Some(target)).unwrap();
            assert!(
                plan.calls.iter().flatten().all(|c| c.note.is_none()),
                "{}: {}",
                sample.name,
                plan.table()
            );
            let (checked, grouped) = check_fp8_products(&sample.program, target);
            assert_eq!(checked, 1, "{}", sample.name);
            assert_eq!(grouped, usize::from(sample.name.contains("grouped")));
        }
    }
}

/// At DeepSeek-V3's sizes (hidden 7168, MLA's 128 heads, 256 experts of 2048 with 8 per token;
/// one dense layer and one MoE layer here, and the MTP block), compiled as the CUDA backend
/// compiles it, every FP8 product of the training step plans as an FP8 GEMM on both targets
/// and attention on its templates: the ints the kernels take hold the
/// padded layouts (256 experts: token-slots + 127 · 256 rows), the experts' weights quantise in
/// one launch of 256 grid layers, and the K-grouped weight gradients take 256 groups.
#[test]
fn deepseek_v3_sized_products_plan_as_fp8_gemms() {
    let config = include_str!("../../../examples/configs/deepseek-v3-671b.json");
    let mut spec = fathom_compiler::spec::hf::spec_from_config_json(config).unwrap();
    spec.layers = 2;
    spec.dense_layers = 1;
    let train = training_graph(&spec, 1, 64, LossWeights::deepseek_v3()).unwrap();
    let policy = PrecisionPolicy {
        accumulation: Accumulation::HOPPER,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let tiling = spec.fp8.clone().unwrap_or_default();
    let graph = apply_precision(&train.graph, &policy, &tiling).unwrap();
    let options = CompileOptions {
        lower: crate::cuda::lower_options(),
        ..CompileOptions::default()
    };
    let program = compile(&graph, &options).unwrap().program;
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let (fp8, in_f32) = plan.fp8_summary();
        assert_eq!(in_f32, 0, "{target:?}: {}", plan.table());
        // MLA's 128 + 64 and 128 wide heads run on the flash-attention templates: one forward
        // and one backward per attention (two layers and the MTP block's).
        let launches = |name: &str| {
            let steps = plan.steps();
            steps.filter(|(_, s)| s.kernel.name() == name).count()
        };
        assert_eq!(launches("mla_attention_fwd_d128r64v128_m64n64"), 3);
        assert_eq!(launches("mla_attention_bwd_d128r64v128_m64n64c2"), 3);
        assert!(fp8 >= 40, "{target:?}: {fp8}");
        // The weight codes' launches too (`library_fp8_weight_codes`).
        let steps: Vec<&LibraryStep> = plan.steps().map(|(_, s)| s).collect();
        let stacked = steps
            .iter()
            .filter(|s| s.kernel.name().starts_with("quantize_128x128") && s.grid[2] == 256)
            .count();
        assert!(
            stacked >= 4,
            "{target:?}: {stacked} stacked weight quantisations"
        );
        let k_grouped = steps
            .iter()
            .filter(|s| {
                s.kernel.name().starts_with("kgrouped_") && s.args.contains(&StepArg::I32(256))
            })
            .count();
        assert_eq!(
            k_grouped, 6,
            "{target:?}: the two MoE blocks' three weight gradients"
        );
        if target == Fp8Target::Hopper {
            tuning_reads_every_form(&plan);
        }
        // Every buffer a launch names is alive when it runs in the executor's memory plan,
        // the activations whose roundings the experts' and the dense products skip included.
        sources::assert_alive_where_named(&program, &plan, &plan.memory_plan(&program));
        let roundings = plan.roundings(&program);
        assert!(roundings.skipped > roundings.launched, "{roundings:?}");
    }
}

/// At DeepSeek-V3's sizes every sm_90a FP8 GEMM step's form reads back from its arguments and
/// the default choice redoes it exactly (256 experts, K-grouped over their padded token-slots),
/// and the forms `FATHOM_GEMM_TUNING=large` times are those of at least 2³³ FLOPs.
fn tuning_reads_every_form(plan: &LibraryPlan) {
    use crate::cuda::gemm_choice::tests::redo_every_step_by_default;
    use crate::cuda::gemm_tuning::TuningPolicy;
    let steps = redo_every_step_by_default(plan);
    let forms = plan.fp8_gemm_forms();
    let large: Vec<_> = forms
        .iter()
        .filter(|f| TuningPolicy::Large.takes(f))
        .collect();
    let candidates: std::collections::HashSet<String> = large
        .iter()
        .flat_map(|f| f.candidates())
        .map(|p| p.name())
        .collect();
    // 99 steps, 42 forms, 16 of them large (at 64 tokens: the dense MLP's and the output
    // projections' products with N or K of 14336 to 18432, the experts' grouped products over
    // their padded rows and their weight gradients), whose candidates are 24 kernels: what a
    // first run on a device compiles and times.
    assert!(steps >= 40, "{steps}");
    assert!(
        large.len() >= 8 && candidates.len() <= 40,
        "{} large forms, {} candidates",
        large.len(),
        candidates.len()
    );
}

/// A weight's rounding that only FP8 GEMMs read is not computed: their `quantize` steps read
/// the weight itself (the same codes), and the product is still that of the rounded operands.
/// One a non-FP8 product reads is.
#[test]
fn a_weights_rounding_read_only_by_fp8_gemms_is_skipped() {
    let mut program = OneProduct::forward_64x32x128().program();
    program.buffers[2].role = BufferRole::Parameter("w".to_owned());
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let rounding = plan.calls[1].as_ref().unwrap();
        assert!(rounding.steps.is_empty(), "{}", plan.table());
        assert_eq!(rounding.skipped, Some(QUANTIZED_WHERE_READ));
        // B's codes are the weight's own, made before the calls (`library_fp8_weight_codes`).
        let [codes] = &plan.weight_codes.quantizations[..] else {
            panic!("one weight quantisation\n{}", plan.table());
        };
        assert_eq!(codes.step.args[0], StepArg::Buffer(BufferId(2), 0));
        assert_eq!(codes.readers, [2]);
        // The activation's rounding (an input, not a parameter) is skipped too, its source
        // quantised where read (`quantize_activations_directly`).
        let activation = plan.calls[0].as_ref().unwrap();
        assert_eq!(activation.skipped, Some(SOURCE_QUANTIZED_WHERE_READ));
        assert_eq!(check_fp8_products(&program, target), (1, 0));
    }
    // Read by the f32 GEMM (exact accumulation): computed.
    let KernelBody::Library(Library::MatMul { accumulation, .. }) = &mut program.kernels[2].body
    else {
        unreachable!()
    };
    *accumulation = Accumulation::Exact;
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    assert_eq!(plan.calls[1].as_ref().unwrap().skipped, None);
    assert!(!plan.calls[1].as_ref().unwrap().steps.is_empty());
}
