//! The FP8 GEMM template on the GPU: every tile configuration the timings try, under each tile
//! schedule, against the exact product of its quantized operands (the three layouts: 128×128
//! weight scales, 1×128 scales on B with accumulation, grouped experts); then the timings at
//! DeepSeek-V3's shapes, every configuration side by side, beside `torch._scaled_mm`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fathom_kernels::{
    BScaling, Fp8GemmParams, GemmGrouping, GemmOutput, GemmProblem, TileSchedule,
};
use fathom_runtime::cuda::fp8_gemm::{Fp8Gemm, Fp8GemmOperands, HostFp8Operands};
use fathom_runtime::cuda::memory::{DriverMemory, download, stream_id, timing_event, upload};
use fathom_runtime::cuda::{CachingAllocator, CudaStream, GpuDevice, KernelCache};
use fathom_runtime::fp8::{bf16_to_f32, calc_diff};

/// DeepGEMM's bound on `calc_diff` for an FP8 GEMM.
const MAX_DIFF: f64 = 1e-3;
/// Hopper's dense FP8 tensor-core peak (H100/H200 SXM), TFLOPS.
const PEAK_TFLOPS: f64 = 1979.0;
/// DeepSeek-V3's linear shapes (N, K) timed at M = 4096.
const SHAPES: [(u32, u32); 6] = [
    (2112, 7168),
    (24576, 1536),
    (32768, 512),
    (7168, 16384),
    (4096, 7168),
    (7168, 2048),
];
const M: u32 = 4096;

/// A deterministic pseudo-random value in [-1, 1) (xorshift; no dependency for a check).
fn noise(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Host operands in the kernel's layout (see `HostFp8Operands`).
struct HostOperands<'a> {
    a: &'a [u8],
    b: &'a [u8],
    scale_a: &'a [f32],
    scale_b: &'a [f32],
    block_expert: &'a [i32],
}

impl<'a> From<&'a HostFp8Operands> for HostOperands<'a> {
    fn from(ops: &'a HostFp8Operands) -> Self {
        HostOperands {
            a: &ops.a,
            b: &ops.b,
            scale_a: &ops.scale_a,
            scale_b: &ops.scale_b,
            block_expert: &ops.block_expert,
        }
    }
}

/// Device copies of one problem's operands (freed by [`Operands::free`]).
struct Operands {
    blocks: Vec<fathom_runtime::cuda::alloc::Block>,
    addresses: Fp8GemmOperands,
}

impl Operands {
    fn upload(
        allocator: &mut CachingAllocator<DriverMemory>,
        stream: &CudaStream,
        host: HostOperands<'_>,
        out_bytes: usize,
    ) -> anyhow::Result<Self> {
        let mut blocks = Vec::new();
        let mut put = |bytes: &[u8]| -> anyhow::Result<u64> {
            let block = allocator.alloc(bytes.len().max(1), stream_id(stream))?;
            let ptr = block.ptr;
            blocks.push(block);
            upload(stream, ptr, bytes)?;
            Ok(ptr)
        };
        let a = put(host.a)?;
        let b = put(host.b)?;
        let scale_a = put(&le_bytes(host.scale_a, f32::to_le_bytes))?;
        let scale_b = put(&le_bytes(host.scale_b, f32::to_le_bytes))?;
        let out = put(&vec![0u8; out_bytes])?;
        let block_expert = if host.block_expert.is_empty() {
            None
        } else {
            Some(put(&le_bytes(host.block_expert, i32::to_le_bytes))?)
        };
        Ok(Operands {
            blocks,
            addresses: Fp8GemmOperands {
                a,
                b,
                scale_a,
                scale_b,
                out,
                block_expert,
            },
        })
    }

    fn free(self, allocator: &mut CachingAllocator<DriverMemory>) -> anyhow::Result<()> {
        for block in self.blocks {
            allocator.free(block)?;
        }
        Ok(())
    }
}

fn le_bytes<T: Copy, const W: usize>(values: &[T], to_bytes: fn(T) -> [u8; W]) -> Vec<u8> {
    values.iter().flat_map(|&v| to_bytes(v)).collect()
}

/// One correctness problem: operands, the output kind, and what the output holds before the
/// GEMM (accumulated into by `F32Accumulate`; zeros otherwise).
struct Case {
    what: &'static str,
    ops: HostFp8Operands,
    output: GemmOutput,
    initial: Vec<f32>,
}

impl Case {
    fn expected(&self) -> Vec<f32> {
        let mut expected = self.ops.reference();
        for (e, i) in expected.iter_mut().zip(&self.initial) {
            *e += i;
        }
        expected
    }

    fn initial_bytes(&self) -> Vec<u8> {
        let len = (self.ops.problem.m * self.ops.problem.n) as usize;
        match self.output {
            GemmOutput::Bf16 => vec![0u8; 2 * len],
            GemmOutput::F32 => vec![0u8; 4 * len],
            GemmOutput::F32Accumulate => le_bytes(&self.initial, f32::to_le_bytes),
        }
    }
}

/// Ragged M and K (partial tiles and scale groups), DeepSeek-V3-like N and K (2112 and 576 put
/// tiles of 144 to 192 columns across two weight scale blocks), all three outputs, B scaled per
/// 1×128 tile, and experts with a padding block.
fn cases() -> anyhow::Result<Vec<Case>> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut activations = |len: usize| -> Vec<f32> { (0..len).map(|_| noise(&mut seed)).collect() };
    // Weights with a few large channels, as trained weights have.
    let weights = |values: Vec<f32>| -> Vec<f32> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| v * if i % 97 == 0 { 8.0 } else { 0.05 })
            .collect()
    };
    let mut out = Vec::new();
    for (m, n, k, output) in [
        (200usize, 2112usize, 7168usize, GemmOutput::F32),
        (64, 576, 1040, GemmOutput::F32),
        (384, 4096, 512, GemmOutput::Bf16),
        (256, 7168, 2048, GemmOutput::Bf16),
    ] {
        let a = activations(m * k);
        let b = weights(activations(n * k));
        out.push(Case {
            what: "dense, 128x128 B scales",
            ops: HostFp8Operands::quantize(&a, &b, m, n, k)?,
            output,
            initial: Vec::new(),
        });
    }
    let (m, n, k) = (256, 1040, 640);
    let (a, b) = (activations(m * k), activations(n * k));
    out.push(Case {
        what: "dense, 1x128 B scales, +=",
        ops: HostFp8Operands::quantize_row_scaled_b(&a, &b, m, n, k)?,
        output: GemmOutput::F32Accumulate,
        initial: activations(m * n),
    });
    let (n, k) = (576, 768);
    let block_expert = vec![2, 0, -1, 1, 2];
    let m = 128 * block_expert.len();
    let a = activations(m * k);
    let experts: Vec<Vec<f32>> = (0..3).map(|_| weights(activations(n * k))).collect();
    let experts: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
    out.push(Case {
        what: "3 experts, a padding block",
        ops: HostFp8Operands::grouped(&a, &experts, m, n, k, block_expert)?,
        output: GemmOutput::Bf16,
        initial: Vec::new(),
    });
    Ok(out)
}

/// One block per tile; three blocks (one cluster of two) looping over many tiles each (the
/// ring's phases carried across tiles, bands of two row blocks); the persistent grid in bands of
/// eight.
fn checked_schedules(
    device: &GpuDevice,
    stream: &CudaStream,
    gemm: &Fp8Gemm,
) -> anyhow::Result<[TileSchedule; 3]> {
    Ok([
        TileSchedule::ONE_TILE_PER_BLOCK,
        TileSchedule::persistent(3, 2),
        gemm.persistent_schedule(stream, device.multiprocessors, 8)?,
    ])
}

/// How long one correctness launch may take before it counts as hung (they take milliseconds).
const HANG_LIMIT: Duration = Duration::from_secs(20);

/// Waits for the work queued on `stream`, giving up after `limit`: a kernel whose pipeline
/// deadlocks would otherwise hold the check until the script's timeout, saying nothing of which.
fn finish_within(
    device: &GpuDevice,
    stream: &CudaStream,
    limit: Duration,
    what: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let done = timing_event(&device.ctx)?;
    done.record(stream)?;
    let started = Instant::now();
    while !done.try_is_complete()? {
        if started.elapsed() > limit {
            anyhow::bail!(
                "{} did not finish within {limit:?}: the kernel hangs (the GPU context cannot be \
                 recovered; stopping here)",
                what()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Check 3; returns the failures.
pub fn check_correctness(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let stream = device.ctx.new_stream()?;
    let mut allocator = CachingAllocator::new(DriverMemory::new(device.ctx.clone()));
    let mut failures = Vec::new();
    for case in cases()? {
        let problem = case.ops.problem;
        let expected = case.expected();
        let operands = Operands::upload(
            &mut allocator,
            &stream,
            (&case.ops).into(),
            case.initial_bytes().len(),
        )?;
        let candidates = Fp8GemmParams::candidates(
            problem.m,
            problem.n,
            case.ops.b_scaling,
            case.output,
            case.ops.grouping(),
        );
        for params in candidates {
            let gemm = Fp8Gemm::load(&device.ctx, cache, params)?;
            let (mut worst, mut all_ok) = (0.0f64, true);
            for schedule in checked_schedules(device, &stream, &gemm)? {
                upload(&stream, operands.addresses.out, &case.initial_bytes())?;
                gemm.launch(&stream, &problem, &operands.addresses, &schedule)?;
                finish_within(device, &stream, HANG_LIMIT, || {
                    format!("{} ({}) with {schedule}", params.name(), case.what)
                })?;
                let got = download_output(&stream, operands.addresses.out, case.output, &problem)?;
                let diff = calc_diff(&got, &expected)?;
                worst = worst.max(diff);
                // Written so that a NaN difference fails.
                let ok = diff < MAX_DIFF;
                all_ok &= ok;
                if !ok {
                    failures.push(format!(
                        "{} ({}) at {}x{}x{} with {schedule}: diff {diff:.3e}",
                        params.name(),
                        case.what,
                        problem.m,
                        problem.n,
                        problem.k
                    ));
                }
            }
            println!(
                "{:<52} {:<27} M={:<4} N={:<5} K={:<5} diff <= {worst:.2e} (< {MAX_DIFF:e}, 3 schedules) {}",
                params.name(),
                case.what,
                problem.m,
                problem.n,
                problem.k,
                if all_ok { "ok" } else { "FAIL" }
            );
        }
        operands.free(&mut allocator)?;
    }
    stream.synchronize()?;
    allocator.streams_synchronized();
    allocator.empty_cache()?;
    Ok(failures)
}

fn download_output(
    stream: &CudaStream,
    out: u64,
    output: GemmOutput,
    problem: &GemmProblem,
) -> anyhow::Result<Vec<f32>> {
    let len = (problem.m * problem.n) as usize;
    Ok(if output == GemmOutput::Bf16 {
        let mut bits = vec![0u16; len];
        download(stream, out, &mut bits)?;
        bits.into_iter().map(bf16_to_f32).collect()
    } else {
        let mut values = vec![0f32; len];
        download(stream, out, &mut values)?;
        values
    })
}

/// One cuBLASLt timing from `scripts/scaled_mm_bench.py`.
#[derive(Debug, serde::Deserialize)]
struct TorchTiming {
    m: u32,
    n: u32,
    k: u32,
    tflops: f64,
}

#[derive(Debug, serde::Deserialize)]
struct TorchTimings {
    torch: String,
    results: Vec<TorchTiming>,
}

/// Milliseconds per launch, averaged over `iters` launches after three unmeasured ones (which
/// must finish within [`HANG_LIMIT`]).
fn time_launches(
    device: &GpuDevice,
    stream: &CudaStream,
    launch: impl Fn() -> anyhow::Result<()>,
    iters: u32,
    what: impl FnOnce() -> String,
) -> anyhow::Result<f64> {
    for _ in 0..3 {
        launch()?;
    }
    finish_within(device, stream, HANG_LIMIT, what)?;
    let start = timing_event(&device.ctx)?;
    let end = timing_event(&device.ctx)?;
    start.record(stream)?;
    for _ in 0..iters {
        launch()?;
    }
    end.record(stream)?;
    stream.synchronize()?;
    Ok(f64::from(start.elapsed_ms(&end)?) / f64::from(iters.max(1)))
}

/// The fastest configuration found for one shape.
struct Best {
    tflops: f64,
    ms: f64,
    name: String,
    schedule: TileSchedule,
}

/// Check 4: times the forward FP8 GEMM (BF16 output) at each shape, with every candidate tile
/// under every schedule, side by side in one run.
pub fn bench(
    device: &GpuDevice,
    cache: &KernelCache,
    iters: u32,
    cublas: Option<&Path>,
) -> anyhow::Result<()> {
    let torch: Option<TorchTimings> = match cublas {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| path.display().to_string())?)
        }
        None => {
            println!("(no --cublas JSON: torch._scaled_mm is not compared)");
            None
        }
    };
    // One block per tile, and persistent grids in bands of 1, 8 and 16 row blocks.
    let bands = [1, 8, 16];
    let stream = device.ctx.new_stream()?;
    let mut allocator = CachingAllocator::new(DriverMemory::new(device.ctx.clone()));
    println!(
        "TFLOPS of each tile configuration (rows) under each schedule (columns; persistent: one \
         block per SM, or as many clusters as fit at once)"
    );
    println!(
        "{:<46} {:>14} {:>14} {:>14} {:>14}",
        "shape / kernel", "tile per block", "persist. b1", "persist. b8", "persist. b16"
    );
    let mut summary = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for (n, k) in SHAPES {
        let problem = GemmProblem {
            m: M,
            n,
            k,
            groups: 1,
        };
        // Random E4M3 codes of moderate magnitude (exponent field below 8: no NaN codes) and
        // unit scales: timing does not depend on the values.
        let (m, n_, k_) = (M as usize, n as usize, k as usize);
        let mut code = || ((noise(&mut seed).to_bits() >> 8) as u8) & 0xb7;
        let a: Vec<u8> = (0..m * k_).map(|_| code()).collect();
        let b: Vec<u8> = (0..n_ * k_).map(|_| code()).collect();
        let host = HostOperands {
            a: &a,
            b: &b,
            scale_a: &vec![1.0; k_.div_ceil(128) * m.next_multiple_of(4)],
            scale_b: &vec![1.0; n_.div_ceil(128) * k_.div_ceil(128)],
            block_expert: &[],
        };
        let operands = Operands::upload(&mut allocator, &stream, host, m * n_ * 2)?;
        println!("{M} x {n} x {k}");
        let candidates = Fp8GemmParams::candidates(
            M,
            n,
            BScaling::Block128x128,
            GemmOutput::Bf16,
            GemmGrouping::Dense,
        );
        let mut default_tflops = 0.0;
        let mut best: Option<Best> = None;
        for (index, params) in candidates.into_iter().enumerate() {
            let gemm = Fp8Gemm::load(&device.ctx, cache, params)?;
            let mut schedules = vec![TileSchedule::ONE_TILE_PER_BLOCK];
            for band in bands {
                schedules.push(gemm.persistent_schedule(&stream, device.multiprocessors, band)?);
            }
            let mut row = Vec::new();
            for schedule in schedules {
                let launch =
                    || Ok(gemm.launch(&stream, &problem, &operands.addresses, &schedule)?);
                let ms = time_launches(device, &stream, launch, iters, || {
                    format!("{} with {schedule}", params.name())
                })?;
                let tflops = 2.0 * f64::from(M) * f64::from(n) * f64::from(k) / (ms * 1e-3) / 1e12;
                if index == 0 && schedule == TileSchedule::ONE_TILE_PER_BLOCK {
                    default_tflops = tflops;
                }
                if best.as_ref().is_none_or(|b| tflops > b.tflops) {
                    best = Some(Best {
                        tflops,
                        ms,
                        name: params.name(),
                        schedule,
                    });
                }
                row.push(format!("{tflops:>14.1}"));
            }
            println!("  {:<44} {}", params.name(), row.join(" "));
        }
        operands.free(&mut allocator)?;
        let theirs = torch
            .as_ref()
            .and_then(|t| t.results.iter().find(|r| (r.m, r.n, r.k) == (M, n, k)))
            .map(|r| r.tflops);
        summary.push((n, k, default_tflops, best, theirs));
    }
    println!();
    if let Some(t) = &torch {
        println!(
            "cuBLASLt via torch {} (_scaled_mm, per-tensor scales, BF16 out)",
            t.torch
        );
    }
    println!(
        "{:>5} {:>6} {:>6} | {:>8} | {:>9} {:>8} {:>7} | {:>8} {:>6}  fastest kernel, schedule",
        "M", "N", "K", "default", "ms", "TFLOPS", "% peak", "cuBLAS", "ratio"
    );
    for (n, k, default_tflops, best, theirs) in summary {
        let Some(best) = best else { continue };
        println!(
            "{M:>5} {n:>6} {k:>6} | {default_tflops:>8.1} | {:>9.4} {:>8.1} {:>6.1}% | {:>8} {:>6}  {}, {}",
            best.ms,
            best.tflops,
            100.0 * best.tflops / PEAK_TFLOPS,
            theirs.map_or("-".to_owned(), |t| format!("{t:.1}")),
            theirs.map_or("-".to_owned(), |t| format!("{:.2}x", best.tflops / t)),
            best.name,
            best.schedule
        );
    }
    println!("(default: the shape heuristic's tile, one block per tile, as timed in session 12)");
    stream.synchronize()?;
    allocator.streams_synchronized();
    allocator.empty_cache()?;
    Ok(())
}
