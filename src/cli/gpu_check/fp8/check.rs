//! Check 3: the FP8 GEMM's tile configurations against the exact product of their quantized
//! operands.

use fathom_kernels::{Fp8GemmParams, GemmOutput, GemmProblem, TileSchedule};
use fathom_runtime::cuda::fp8_gemm::{Fp8Gemm, HostFp8Operands};
use fathom_runtime::cuda::memory::{DriverMemory, download, upload};
use fathom_runtime::cuda::{CachingAllocator, CudaStream, GpuDevice, KernelCache};
use fathom_runtime::fp8::{bf16_to_f32, calc_diff};

use super::{HANG_LIMIT, Operands, finish_within, le_bytes, noise};

/// DeepGEMM's bound on `calc_diff` for an FP8 GEMM.
const MAX_DIFF: f64 = 1e-3;

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
