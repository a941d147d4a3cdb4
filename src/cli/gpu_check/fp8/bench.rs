//! Check 4: the FP8 GEMM's TFLOPS at DeepSeek-V3's shapes, every tile configuration under every
//! schedule, the fastest beside cuBLASLt.

use std::path::Path;

use fathom_kernels::{BScaling, GemmGrouping, GemmOutput, GemmProblem, TileSchedule};
use fathom_runtime::cuda::fp8_gemm::Fp8Gemm;
use fathom_runtime::cuda::gemm_choice::GemmForm;
use fathom_runtime::cuda::gemm_tuning::TimingOperands;
use fathom_runtime::cuda::{CudaStream, GpuDevice, KernelCache};

use super::upload_operands;
use crate::cli::gpu_check::launch::{Buffers, optional_json, time_launches};

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

/// The fastest configuration found for one shape.
struct Best {
    tflops: f64,
    ms: f64,
    name: String,
    schedule: TileSchedule,
}

/// The forward GEMM of DeepSeek-V3's linear shape `n × k` at M = 4096: 128×128 weight scales,
/// BF16 out, as cuBLASLt is timed.
fn forward_layout((n, k): (u32, u32)) -> GemmForm {
    GemmForm {
        problem: GemmProblem {
            m: M,
            n,
            k,
            groups: 1,
        },
        b_scaling: BScaling::Block128x128,
        output: GemmOutput::Bf16,
        grouping: GemmGrouping::Dense,
    }
}

/// The other layouts at DeepSeek-V3's sizes, which cuBLASLt has no counterpart for: the weight
/// gradient of a 7168 × 2048 Linear over 4096 tokens (1×128 scales on B, accumulated), and the
/// experts' grouped GEMMs over 8 experts of 1024 tokens each, with their weight gradients
/// (K-grouped over the same tokens).
fn other_layouts() -> [(&'static str, GemmForm); 5] {
    let grouped = |n, k| GemmForm {
        problem: GemmProblem {
            m: 8 * 1024,
            n,
            k,
            groups: 8,
        },
        b_scaling: BScaling::Block128x128,
        output: GemmOutput::Bf16,
        grouping: GemmGrouping::Contiguous,
    };
    let k_grouped = |m, n| GemmForm {
        problem: GemmProblem {
            m,
            n,
            k: 8 * 1024,
            groups: 8,
        },
        b_scaling: BScaling::Row1x128,
        output: GemmOutput::F32,
        grouping: GemmGrouping::KGrouped,
    };
    [
        (
            "weight grad",
            GemmForm {
                problem: GemmProblem {
                    m: 7168,
                    n: 2048,
                    k: 4096,
                    groups: 1,
                },
                b_scaling: BScaling::Row1x128,
                output: GemmOutput::F32Accumulate,
                grouping: GemmGrouping::Dense,
            },
        ),
        ("experts gate_up", grouped(4096, 7168)),
        ("experts down", grouped(7168, 2048)),
        ("experts gate_up wgrad", k_grouped(4096, 7168)),
        ("experts down wgrad", k_grouped(7168, 2048)),
    ]
}

/// Times every candidate tile of `layout` under one block per tile and persistent grids in
/// bands of 1, 8 and 16 row blocks, printing a row per tile; returns the default's TFLOPS (the
/// shape heuristic's tile, one block per tile) and the fastest.
fn sweep(
    device: &GpuDevice,
    cache: &KernelCache,
    stream: &CudaStream,
    layout: GemmForm,
    iters: u32,
    seed: &mut u64,
) -> anyhow::Result<(f64, Option<Best>)> {
    let problem = layout.problem;
    // Timing does not depend on the values (the tuner's operands, `gemm_tuning`).
    let host = TimingOperands::of(&layout, seed);
    let mut buffers = Buffers::new(device, stream);
    let operands = upload_operands(&mut buffers, (&host).into(), host.out_bytes)?;
    let candidates = layout.candidates();
    let flops = 2.0 * f64::from(problem.m) * f64::from(problem.n) * f64::from(problem.k);
    let mut default_tflops = 0.0;
    let mut best: Option<Best> = None;
    for (index, params) in candidates.into_iter().enumerate() {
        let gemm = Fp8Gemm::load(&device.ctx, cache, params)?;
        let mut schedules = vec![TileSchedule::ONE_TILE_PER_BLOCK];
        for band in [1, 8, 16] {
            schedules.push(gemm.persistent_schedule(stream, device.multiprocessors, band)?);
        }
        let mut row = Vec::new();
        for schedule in schedules {
            let launch = || Ok(gemm.launch(stream, &problem, &operands, &schedule)?);
            let ms = time_launches(stream, launch, iters, || {
                format!("{} with {schedule}", params.name())
            })?;
            let tflops = flops / (ms * 1e-3) / 1e12;
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
    buffers.free()?;
    Ok((default_tflops, best))
}

/// Check 4: times the forward FP8 GEMM (BF16 output) at each shape, then the weight-gradient and
/// grouped layouts, with every candidate tile under every schedule, side by side in one run.
pub fn bench(
    device: &GpuDevice,
    cache: &KernelCache,
    iters: u32,
    cublas: Option<&Path>,
) -> anyhow::Result<()> {
    let torch: Option<TorchTimings> = optional_json(cublas, "no --cublas JSON: torch._scaled_mm")?;
    let stream = device.ctx.new_stream()?;
    println!(
        "TFLOPS of each tile configuration (rows) under each schedule (columns; persistent: one \
         block per SM, or as many clusters as fit at once)"
    );
    println!(
        "{:<46} {:>14} {:>14} {:>14} {:>14}",
        "shape / kernel", "tile per block", "persist. b1", "persist. b8", "persist. b16"
    );
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut summary = Vec::new();
    for (n, k) in SHAPES {
        println!("forward {M} x {n} x {k}");
        let (default_tflops, best) = sweep(
            device,
            cache,
            &stream,
            forward_layout((n, k)),
            iters,
            &mut seed,
        )?;
        let theirs = torch
            .as_ref()
            .and_then(|t| t.results.iter().find(|r| (r.m, r.n, r.k) == (M, n, k)))
            .map(|r| r.tflops);
        summary.push((
            format!("{M:>5} {n:>6} {k:>6}"),
            default_tflops,
            best,
            theirs,
        ));
    }
    for (what, layout) in other_layouts() {
        let GemmProblem { m, n, k, groups } = layout.problem;
        println!("{what} {m} x {n} x {k}, {groups} group(s)");
        let (default_tflops, best) = sweep(device, cache, &stream, layout, iters, &mut seed)?;
        summary.push((format!("{m:>5} {n:>6} {k:>6}"), default_tflops, best, None));
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
    for (shape, default_tflops, best, theirs) in summary {
        let Some(best) = best else { continue };
        println!(
            "{shape} | {default_tflops:>8.1} | {:>9.4} {:>8.1} {:>6.1}% | {:>8} {:>6}  {}, {}",
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every timed configuration instantiates and can run its problem (checked here, so that a
    /// lent GPU's minutes are not spent finding out).
    #[test]
    fn every_timed_configuration_takes_its_problem() {
        let forward = SHAPES.map(forward_layout);
        let others = other_layouts().map(|(_, layout)| layout);
        let mut configurations = 0;
        for layout in forward.into_iter().chain(others) {
            for params in layout.candidates() {
                params.instantiate().unwrap();
                params.tensor_maps(&layout.problem).unwrap();
                configurations += 1;
            }
        }
        assert!(configurations >= 6 * 5 + 5 * 5, "{configurations}");
    }
}
