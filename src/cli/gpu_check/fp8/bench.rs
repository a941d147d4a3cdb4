//! Check 4: the FP8 GEMM's TFLOPS at DeepSeek-V3's shapes, every tile configuration under every
//! schedule, the fastest beside cuBLASLt.

use std::path::Path;

use anyhow::Context;
use fathom_kernels::{
    BScaling, Fp8GemmParams, GemmGrouping, GemmOutput, GemmProblem, TileSchedule,
};
use fathom_runtime::cuda::fp8_gemm::Fp8Gemm;
use fathom_runtime::cuda::memory::{DriverMemory, timing_event};
use fathom_runtime::cuda::{CachingAllocator, CudaStream, GpuDevice, KernelCache};

use super::{HostOperands, Operands, noise};
use crate::cli::gpu_check::launch::{HANG_LIMIT, finish_within};

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
