//! The FP8 GEMM template on the GPU: correctness against the exact product of its quantized
//! operands, and timings at DeepSeek-V3's shapes beside `torch._scaled_mm`.

use std::path::Path;

use anyhow::Context;
use fathom_kernels::{BScaling, Fp8GemmParams, GemmGrouping, GemmOutput, GemmProblem};
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
}

impl<'a> From<&'a HostFp8Operands> for HostOperands<'a> {
    fn from(ops: &'a HostFp8Operands) -> Self {
        HostOperands {
            a: &ops.a,
            b: &ops.b,
            scale_a: &ops.scale_a,
            scale_b: &ops.scale_b,
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
        let as_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let a = put(host.a)?;
        let b = put(host.b)?;
        let scale_a = put(&as_bytes(host.scale_a))?;
        let scale_b = put(&as_bytes(host.scale_b))?;
        let out = put(&vec![0u8; out_bytes])?;
        Ok(Operands {
            blocks,
            addresses: Fp8GemmOperands {
                a,
                b,
                scale_a,
                scale_b,
                out,
                block_expert: None,
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

/// Check 2; returns the failures.
pub fn check_correctness(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let stream = device.ctx.new_stream()?;
    let mut allocator = CachingAllocator::new(DriverMemory::new(device.ctx.clone()));
    let mut failures = Vec::new();
    // Ragged M and K (partial tiles and scale groups), DeepSeek-V3-like N and K, and both outputs.
    let cases = [
        (200usize, 2112usize, 7168usize, GemmOutput::F32),
        (64, 576, 1040, GemmOutput::F32),
        (384, 4096, 512, GemmOutput::Bf16),
        (256, 7168, 2048, GemmOutput::Bf16),
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for (m, n, k, output) in cases {
        let a: Vec<f32> = (0..m * k).map(|_| noise(&mut seed)).collect();
        // Weights with a few large channels, as trained weights have.
        let b: Vec<f32> = (0..n * k)
            .map(|i| noise(&mut seed) * if i % 97 == 0 { 8.0 } else { 0.05 })
            .collect();
        let ops = HostFp8Operands::quantize(&a, &b, m, n, k)?;
        let params = Fp8GemmParams::for_shape(
            ops.problem.m,
            ops.problem.n,
            BScaling::Block128x128,
            output,
            GemmGrouping::Dense,
        );
        let gemm = Fp8Gemm::load(&device.ctx, cache, params)?;
        let elem = if output == GemmOutput::Bf16 { 2 } else { 4 };
        let operands = Operands::upload(&mut allocator, &stream, (&ops).into(), m * n * elem)?;
        gemm.launch(&stream, &ops.problem, &operands.addresses)?;
        let got: Vec<f32> = if output == GemmOutput::Bf16 {
            let mut bits = vec![0u16; m * n];
            download(&stream, operands.addresses.out, &mut bits)?;
            bits.into_iter().map(bf16_to_f32).collect()
        } else {
            let mut values = vec![0f32; m * n];
            download(&stream, operands.addresses.out, &mut values)?;
            values
        };
        operands.free(&mut allocator)?;
        let diff = calc_diff(&got, &ops.reference())?;
        let ok = diff < MAX_DIFF;
        println!(
            "{:<48} M={m:<4} N={n:<5} K={k:<5} diff {diff:.2e} (< {MAX_DIFF:e}) {}",
            params.name(),
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("{} at {m}x{n}x{k}: diff {diff:.3e}", params.name()));
        }
    }
    stream.synchronize()?;
    allocator.streams_synchronized();
    allocator.empty_cache()?;
    Ok(failures)
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

/// Check 4: times the forward FP8 GEMM (BF16 output) at each shape.
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
    if let Some(t) = &torch {
        println!(
            "cuBLASLt via torch {} (_scaled_mm, per-tensor scales, BF16 out)",
            t.torch
        );
    }
    let stream = device.ctx.new_stream()?;
    let mut allocator = CachingAllocator::new(DriverMemory::new(device.ctx.clone()));
    println!(
        "{:>5} {:>6} {:>6} | {:>9} {:>8} {:>7} | {:>8} {:>6}  kernel",
        "M", "N", "K", "ms", "TFLOPS", "% peak", "cuBLAS", "ratio"
    );
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for (n, k) in SHAPES {
        let problem = GemmProblem {
            m: M,
            n,
            k,
            groups: 1,
        };
        let params = Fp8GemmParams::for_shape(
            M,
            n,
            BScaling::Block128x128,
            GemmOutput::Bf16,
            GemmGrouping::Dense,
        );
        let gemm = Fp8Gemm::load(&device.ctx, cache, params)?;
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
        };
        let operands = Operands::upload(&mut allocator, &stream, host, m * n_ * 2)?;
        for _ in 0..3 {
            gemm.launch(&stream, &problem, &operands.addresses)?;
        }
        let start = timing_event(&device.ctx)?;
        let end = timing_event(&device.ctx)?;
        start.record(&stream)?;
        for _ in 0..iters {
            gemm.launch(&stream, &problem, &operands.addresses)?;
        }
        end.record(&stream)?;
        stream.synchronize()?;
        let ms = f64::from(start.elapsed_ms(&end)?) / f64::from(iters.max(1));
        operands.free(&mut allocator)?;
        let tflops = 2.0 * f64::from(M) * f64::from(n) * f64::from(k) / (ms * 1e-3) / 1e12;
        let theirs = torch
            .as_ref()
            .and_then(|t| t.results.iter().find(|r| (r.m, r.n, r.k) == (M, n, k)))
            .map(|r| r.tflops);
        println!(
            "{M:>5} {n:>6} {k:>6} | {ms:>9.4} {tflops:>8.1} {:>6.1}% | {:>8} {:>6}  {}",
            100.0 * tflops / PEAK_TFLOPS,
            theirs.map_or("-".to_owned(), |t| format!("{t:.1}")),
            theirs.map_or("-".to_owned(), |t| format!("{:.2}x", tflops / t)),
            params.name()
        );
    }
    stream.synchronize()?;
    allocator.streams_synchronized();
    allocator.empty_cache()?;
    Ok(())
}
