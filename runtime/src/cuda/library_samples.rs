//! Small programs, one library call each, at awkward shapes (sides that are not multiples of the
//! GEMM tile, transposed and broadcast views, repeated and tied indices, partial and non-finite
//! quantisation tiles), with random inputs and the tolerance a GPU result must meet against the
//! CPU backend's. The GPU tests and `fathom gpu-check` run them; the planner's tests plan them.

use std::collections::HashMap;

use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::graph::{Accumulation, ExpertTiles, Op, QuantFormat};
use fathom_compiler::kernel::{KernelBody, Library, Program};
use fathom_compiler::{DType, GraphBuilder, GraphError, Tensor, TensorType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::gemm_tuning::TuningPolicy;
use super::{CudaError, GpuDevice, GpuExecutor, GpuOptions, KernelCache};
use crate::cpu::CpuProgram;
use crate::interp::Feeds;
use crate::tensor::{Data, HostTensor};

/// How close the GPU's output must be to the CPU's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// Bit for bit (NaN matching NaN): index operations, fake quantisation, and IndexAdd, which
    /// adds in the CPU's order.
    Exact,
    /// A sum of `k` products in f32, in a different order on each side: each side is within
    /// γ_k·Σ|a·b| ≤ k·2⁻²⁴·Σ|a·b| of the exact value (Higham, Accuracy and Stability of Numerical
    /// Algorithms, §3.1; FMAs only tighten it), so they differ by at most 2·k·2⁻²⁴·Σ|a·b| per
    /// element. Σ|a·b| is the same program run on the inputs' absolute values (the samples are
    /// bilinear).
    Dot { k: usize },
    /// An FP8 product with Hopper's accumulation, the GPU's tensor cores against the CPU's
    /// emulation of them: DeepGEMM's difference `1 - 2Σxy / Σ(x² + y²)` over the whole output
    /// at most `max` (the two sum in different orders, each truncating its own partial sums).
    Similarity { max: f64 },
}

/// A sample: a program with one library call, its inputs, and its tolerance.
#[derive(Debug)]
pub struct LibrarySample {
    pub name: &'static str,
    pub program: Program,
    pub inputs: HashMap<String, HostTensor>,
    pub tolerance: Tolerance,
    /// The executor's options on the GPU.
    pub options: GpuOptions,
}

impl LibrarySample {
    /// The inputs with every float replaced by its absolute value (for [`Tolerance::Dot`]).
    pub fn absolute_inputs(&self) -> HashMap<String, HostTensor> {
        self.inputs
            .iter()
            .map(|(name, t)| {
                let t = match &t.data {
                    Data::Float(v) => {
                        HostTensor::f32(t.dims().to_vec(), v.iter().map(|x| x.abs()).collect())
                    }
                    _ => t.clone(),
                };
                (name.clone(), t)
            })
            .collect()
    }
}

/// What [`run_sample`] found: the first element beyond the tolerance, if any (position, GPU
/// value, CPU value, bound), and the largest error relative to its bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleResult {
    pub mismatch: Option<(usize, f32, f32, f64)>,
    pub worst_ratio: f64,
}

/// Runs `sample` on the GPU executor and on the CPU backend and compares output `y`.
pub fn run_sample(
    device: &GpuDevice,
    cache: &KernelCache,
    sample: &LibrarySample,
) -> Result<SampleResult, CudaError> {
    let cpu_output = |inputs: &HashMap<String, HostTensor>| -> Result<Vec<f32>, CudaError> {
        let outputs = CpuProgram::new(sample.program.clone()).run(&Feeds::new(inputs, &()))?;
        Ok(outputs.get("y").map(values_f32).unwrap_or_default())
    };
    let cpu = cpu_output(&sample.inputs)?;
    let magnitude = match sample.tolerance {
        Tolerance::Exact | Tolerance::Similarity { .. } => vec![0.0; cpu.len()],
        Tolerance::Dot { .. } => cpu_output(&sample.absolute_inputs())?,
    };
    let executor = GpuExecutor::new(device, cache, sample.program.clone(), sample.options)?;
    let run = executor.run(&Feeds::new(&sample.inputs, &()))?;
    let gpu = run
        .outputs
        .iter()
        .find(|(name, _)| name == "y")
        .map(|(_, t)| values_f32(t))
        .unwrap_or_default();
    Ok(compare_outputs(&gpu, &cpu, &magnitude, sample.tolerance))
}

/// Compares `gpu` with `cpu` under `tolerance` (`magnitude`: the output on absolute inputs, for
/// [`Tolerance::Dot`]).
pub fn compare_outputs(
    gpu: &[f32],
    cpu: &[f32],
    magnitude: &[f32],
    tolerance: Tolerance,
) -> SampleResult {
    let mut result = SampleResult {
        mismatch: None,
        worst_ratio: 0.0,
    };
    if gpu.len() != cpu.len() {
        result.mismatch = Some((gpu.len().min(cpu.len()), f32::NAN, f32::NAN, 0.0));
        result.worst_ratio = f64::INFINITY;
        return result;
    }
    if let Tolerance::Similarity { max } = tolerance {
        let difference = deepgemm_difference(gpu, cpu);
        result.worst_ratio = if difference.is_nan() {
            f64::INFINITY
        } else {
            difference / max
        };
        if result.worst_ratio > 1.0 {
            // The element farthest apart, to show.
            let far = (0..gpu.len()).max_by(|&i, &j| {
                let apart = |i: usize| (f64::from(gpu[i]) - f64::from(cpu[i])).abs();
                apart(i).total_cmp(&apart(j))
            });
            let i = far.unwrap_or(0);
            result.mismatch = Some((i, gpu[i], cpu[i], max));
        }
        return result;
    }
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()) {
            continue;
        }
        let bound = bound(tolerance, magnitude.get(i).copied().unwrap_or(0.0));
        let error = (f64::from(g) - f64::from(c)).abs();
        // -0 against +0 is no error; a NaN on one side only is an infinite one.
        let ratio = match (error, bound) {
            (0.0, _) => 0.0,
            (e, b) if b > 0.0 && !e.is_nan() => e / b,
            _ => f64::INFINITY,
        };
        result.worst_ratio = result.worst_ratio.max(ratio);
        if ratio > 1.0 && result.mismatch.is_none() {
            result.mismatch = Some((i, g, c, bound));
        }
    }
    result
}

/// The largest difference allowed for an element whose output on absolute inputs is
/// `magnitude`.
fn bound(tolerance: Tolerance, magnitude: f32) -> f64 {
    match tolerance {
        Tolerance::Exact => 0.0,
        Tolerance::Dot { k } => 2.0 * k as f64 * f64::powi(2.0, -24) * f64::from(magnitude),
        Tolerance::Similarity { .. } => unreachable!("compared as a whole"),
    }
}

/// DeepGEMM's `1 - 2Σxy / Σ(x² + y²)` (0 for equal outputs, NaN when either is not finite).
pub fn deepgemm_difference(x: &[f32], y: &[f32]) -> f64 {
    let (mut xy, mut squares) = (0f64, 0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (f64::from(a), f64::from(b));
        xy += a * b;
        squares += a * a + b * b;
    }
    if squares == 0.0 {
        return 0.0;
    }
    1.0 - 2.0 * xy / squares
}

/// A tensor's values as the f32 buffers hold them (integers and bools by value).
pub fn values_f32(t: &HostTensor) -> Vec<f32> {
    match &t.data {
        Data::Float(v) => v.clone(),
        Data::Int(v) => v.iter().map(|&x| x as f32).collect(),
        Data::Bool(v) => v.iter().map(|&x| f32::from(u8::from(x))).collect(),
    }
}

/// Builds samples with random inputs from one seed.
struct Samples {
    rng: ChaCha8Rng,
    out: Vec<LibrarySample>,
}

type Build<'a> = &'a mut dyn FnMut(&mut GraphBuilder, &[Tensor]) -> Result<Tensor, GraphError>;

impl Samples {
    fn floats(&mut self, dims: &[usize]) -> HostTensor {
        let n = dims.iter().product();
        let v = (0..n)
            .map(|_| self.rng.random_range(-1.0f32..1.0))
            .collect();
        HostTensor::f32(dims.to_vec(), v)
    }

    fn ints(&mut self, dims: &[usize], bound: usize) -> HostTensor {
        let n = dims.iter().product();
        let v = (0..n)
            .map(|_| self.rng.random_range(0..bound as i64))
            .collect();
        HostTensor::i64(dims.to_vec(), v)
    }

    /// Adds a sample whose inputs are `x0, x1, …` (in order) and whose output is `build`'s.
    fn add(
        &mut self,
        name: &'static str,
        inputs: Vec<HostTensor>,
        tolerance: Tolerance,
        build: Build<'_>,
    ) -> Result<(), String> {
        let graph = |e: GraphError| format!("sample {name}: {e}");
        let hopper = matches!(tolerance, Tolerance::Similarity { .. });
        let mut b = GraphBuilder::new(name);
        let mut tensors = Vec::new();
        let mut feeds = HashMap::new();
        for (i, t) in inputs.into_iter().enumerate() {
            let dtype = match t.data {
                Data::Float(_) => DType::F32,
                Data::Int(_) => DType::I64,
                Data::Bool(_) => DType::Bool,
            };
            let input_name = format!("x{i}");
            let ty = TensorType::new(dtype, t.dims().to_vec());
            tensors.push(b.input(&input_name, ty).map_err(graph)?);
            feeds.insert(input_name, t);
        }
        let y = build(&mut b, &tensors).map_err(graph)?;
        b.output("y", y).map_err(graph)?;
        let mut program = compile(&b.finish(), &CompileOptions::default())
            .map_err(|e| format!("sample {name}: {e}"))?
            .program;
        if hopper {
            // As the precision pass marks the FP8 products (the builder has no such option).
            for kernel in &mut program.kernels {
                if let KernelBody::Library(
                    Library::MatMul { accumulation, .. }
                    | Library::GroupedMatMul { accumulation, .. }
                    | Library::GroupedMatMulWeightGrad { accumulation, .. },
                ) = &mut kernel.body
                {
                    *accumulation = Accumulation::HOPPER;
                }
            }
        }
        self.out.push(LibrarySample {
            name,
            program,
            inputs: feeds,
            tolerance,
            options: GpuOptions::default(),
        });
        Ok(())
    }
}

/// Every sample (seeded: the same inputs on every run).
pub fn library_samples() -> Result<Vec<LibrarySample>, String> {
    let mut s = Samples {
        rng: ChaCha8Rng::seed_from_u64(6),
        out: Vec::new(),
    };
    let dot = |k| Tolerance::Dot { k };

    // GEMMs: sides off the 64×64×16 tile, a transposed operand, a broadcast batch, batched Qᵀ.
    let ab = vec![s.floats(&[67, 45]), s.floats(&[45, 70])];
    s.add("matmul_odd_sides", ab, dot(45), &mut |b, x| {
        b.matmul(x[0], x[1])
    })?;
    let ab = vec![s.floats(&[45, 67]), s.floats(&[45, 70])];
    s.add("matmul_transposed_a", ab, dot(45), &mut |b, x| {
        let at = b.transpose(x[0])?;
        b.matmul(at, x[1])
    })?;
    let ab = vec![s.floats(&[3, 5, 33, 20]), s.floats(&[20, 17])];
    s.add("matmul_broadcast_batch", ab, dot(20), &mut |b, x| {
        let rhs = b.expand(x[1], &[3, 5, 20, 17])?;
        b.matmul(x[0], rhs)
    })?;
    let qk = vec![s.floats(&[2, 4, 9, 16]), s.floats(&[2, 4, 9, 16])];
    s.add("matmul_batched_q_kt", qk, dot(16), &mut |b, x| {
        let kt = b.permute(x[1], &[0, 1, 3, 2])?;
        b.matmul(x[0], kt)
    })?;

    // Grouped expert GEMMs: 7 tokens × 2 slots over 5 experts; one x row per token or per slot.
    let (tokens, slots, experts, n, k) = (7, 2, 5, 40, 24);
    let inputs = vec![
        s.floats(&[tokens, 1, k]),
        s.floats(&[experts, n, k]),
        s.ints(&[tokens, slots], experts),
    ];
    s.add("grouped_matmul_shared_x", inputs, dot(k), &mut |b, x| {
        b.grouped_matmul(x[0], x[1], x[2])
    })?;
    let inputs = vec![
        s.floats(&[tokens, slots, k]),
        s.floats(&[experts, n, k]),
        s.ints(&[tokens, slots], experts),
    ];
    s.add("grouped_matmul_per_slot_x", inputs, dot(k), &mut |b, x| {
        b.grouped_matmul(x[0], x[1], x[2])
    })?;
    // Expert 5 of 6 gets no token: its gradient must be exact zeros.
    let inputs = vec![
        s.floats(&[tokens, slots, n]),
        s.floats(&[tokens, 1, k]),
        s.ints(&[tokens, slots], experts),
    ];
    s.add(
        "grouped_matmul_weight_grad",
        inputs,
        dot(tokens * slots),
        &mut |b, x| b.grouped_matmul_weight_grad(x[0], x[1], x[2], experts + 1),
    )?;

    // Index operations, with repeated indices.
    let inputs = vec![s.floats(&[50, 13]), s.ints(&[4, 6], 50)];
    s.add("gather", inputs, Tolerance::Exact, &mut |b, x| {
        b.gather(x[0], x[1])
    })?;
    let inputs = vec![s.floats(&[4, 6, 13]), s.ints(&[4, 6], 9)];
    s.add(
        "index_add_repeated_rows",
        inputs,
        Tolerance::Exact,
        &mut |b, x| b.index_add(x[0], x[1], 11),
    )?;
    let inputs = vec![s.floats(&[3, 10, 4]), s.ints(&[3, 5, 4], 10)];
    s.add(
        "take_along_axis_1",
        inputs,
        Tolerance::Exact,
        &mut |b, x| b.take_along(x[0], x[1], 1),
    )?;
    let inputs = vec![s.ints(&[9], 7)];
    s.add("one_hot", inputs, Tolerance::Exact, &mut |b, x| {
        b.one_hot(x[0], 7, DType::F32)
    })?;
    // Few distinct values (many ties), a NaN and a -0.0 beside 0.0.
    let mut scores = s.floats(&[6, 37]);
    if let Data::Float(v) = &mut scores.data {
        for x in v.iter_mut() {
            *x = (*x * 3.0).round();
        }
        v[5] = f32::NAN;
        v[40] = -0.0;
    }
    s.add(
        "top_k_ties_and_nan",
        vec![scores],
        Tolerance::Exact,
        &mut |b, x| b.top_k(x[0], 5),
    )?;

    // Fake quantisation: partial tiles both ways, power-of-two scales, a poisoned tile.
    let mut x = s.floats(&[2, 130, 200]);
    if let Data::Float(v) = &mut x.data {
        for (i, value) in v.iter_mut().enumerate() {
            *value *= [1e-6, 1.0, 300.0][i % 3];
        }
        v[7] = f32::INFINITY;
    }
    for (name, tile, pow2) in [
        ("fake_quantize_1x128", (1, 128), false),
        ("fake_quantize_128x128_pow2", (128, 128), true),
        ("fake_quantize_3x5", (3, 5), false),
    ] {
        s.add(name, vec![x.clone()], Tolerance::Exact, &mut |b, t| {
            b.quantize_dequantize(t[0], QuantFormat::E4M3, tile, pow2)
        })?;
    }

    // FP8 products with Hopper's accumulation (`cuda::library_fp8`): several 128-blocks with
    // ragged ends in M, N and K. DeepGEMM's bound, as for the FP8 GEMM alone.
    let similar = Tolerance::Similarity { max: 1e-3 };
    let e4m3 = QuantFormat::E4M3;
    let (m, n, k) = (80, 144, 272);
    let inputs = vec![s.floats(&[2, m, k]), s.floats(&[k, n])];
    for (name, gemm_tuning) in [
        ("fp8_matmul_forward", None),
        // Its tile and schedule timed on the device first (`gemm_tuning`), every candidate.
        ("fp8_matmul_forward_tuned", Some(TuningPolicy::All)),
    ] {
        s.add(name, inputs.clone(), similar, &mut |b, x| {
            let rows = b.quantize_dequantize(x[0], e4m3, (1, 128), true)?;
            let weight = b.quantize_dequantize(x[1], e4m3, (128, 128), false)?;
            let weight = b.expand(weight, &[2, k, n])?;
            b.matmul(rows, weight)
        })?;
        if let Some(sample) = s.out.last_mut() {
            sample.options.gemm_tuning = gemm_tuning;
        }
    }
    // The weight gradient's form: both operands in 128×1 tiles along the tokens, A transposed.
    let inputs = vec![s.floats(&[k, m]), s.floats(&[k, n])];
    s.add("fp8_matmul_weight_grad", inputs, similar, &mut |b, x| {
        let a = b.quantize_dequantize(x[0], e4m3, (128, 1), false)?;
        let a = b.transpose(a)?;
        let tokens = b.quantize_dequantize(x[1], e4m3, (128, 1), false)?;
        b.matmul(a, tokens)
    })?;
    let (tokens, slots, experts) = (150, 2, 5);
    let inputs = vec![
        s.floats(&[tokens, 1, k]),
        s.floats(&[experts, n, k]),
        s.ints(&[tokens, slots], experts),
    ];
    s.add("fp8_grouped_matmul", inputs, similar, &mut |b, x| {
        let rows = b.quantize_dequantize(x[0], e4m3, (1, 128), true)?;
        let weights = b.quantize_dequantize(x[1], e4m3, (128, 128), false)?;
        b.grouped_matmul(rows, weights, x[2])
    })?;
    // Its weight gradient, rounding both operands in 128×1 tiles along each expert's
    // token-slots: the K-grouped FP8 GEMM (`cuda::library_expert_wgrad`).
    let inputs = vec![
        s.floats(&[tokens, slots, n]),
        s.floats(&[tokens, 1, k]),
        s.ints(&[tokens, slots], experts),
    ];
    s.add(
        "fp8_grouped_matmul_weight_grad",
        inputs,
        similar,
        &mut |b, x| {
            let op = Op::GroupedMatMulWeightGrad {
                experts,
                accumulation: Accumulation::Exact,
                rounding: Some(ExpertTiles {
                    format: e4m3,
                    tile_rows: 128,
                    pow2_scales: false,
                }),
            };
            b.push(op, &[x[0], x[1], x[2]], None)
        },
    )?;
    Ok(s.out)
}
