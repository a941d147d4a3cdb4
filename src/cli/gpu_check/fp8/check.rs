//! Check 3: the FP8 GEMM templates (the sm_90a one's tile configurations under three schedules,
//! and the portable one) against the exact product of their quantized operands.

use fathom_kernels::{FallbackGemmParams, Fp8GemmParams, GemmOutput, TileSchedule};
use fathom_runtime::cuda::fp8_gemm::{Fp8Gemm, Fp8GemmFallback, HostFp8Operands};
use fathom_runtime::cuda::memory::{download, upload};
use fathom_runtime::cuda::{CudaStream, GpuDevice, KernelCache};
use fathom_runtime::fp8::{bf16_to_f32, calc_diff};

use super::{noise, upload_operands};
use crate::cli::gpu_check::launch::Buffers;
use fathom_runtime::cuda::memory::{HANG_LIMIT, finish_within};

/// DeepGEMM's bound on `calc_diff` for an FP8 GEMM.
const MAX_DIFF: f64 = 1e-3;

/// One correctness problem: operands, the output kind, what the output holds before the GEMM
/// (accumulated into by `F32Accumulate`; zeros otherwise), and for `F32Scattered` the output row
/// of each product row (-1: none).
struct Case {
    what: &'static str,
    ops: HostFp8Operands,
    output: GemmOutput,
    initial: Vec<f32>,
    out_rows: Vec<i32>,
}

impl Case {
    fn expected(&self) -> Vec<f32> {
        let mut expected = self.ops.reference();
        for (e, i) in expected.iter_mut().zip(&self.initial) {
            *e += i;
        }
        if self.out_rows.is_empty() {
            return expected;
        }
        let n = self.ops.problem.n as usize;
        let mut scattered = vec![0f32; self.out_len()];
        for (i, &row) in self.out_rows.iter().enumerate() {
            if let Ok(row) = usize::try_from(row) {
                scattered[row * n..(row + 1) * n].copy_from_slice(&expected[i * n..(i + 1) * n]);
            }
        }
        scattered
    }

    /// Rows of the output: M (per group when K-grouped), or as many as the scattered rows go to.
    fn out_len(&self) -> usize {
        let rows = match self.out_rows.iter().max() {
            Some(&last) => usize::try_from(last + 1).unwrap_or(0),
            None => self.ops.output_rows(),
        };
        rows * self.ops.problem.n as usize
    }

    fn out_bytes(&self) -> usize {
        self.out_len()
            * if self.output == GemmOutput::Bf16 {
                2
            } else {
                4
            }
    }

    /// The output as f32 (BF16 outputs widened exactly).
    fn read_output(&self, stream: &CudaStream, out: u64) -> anyhow::Result<Vec<f32>> {
        Ok(if self.output == GemmOutput::Bf16 {
            let mut bits = vec![0u16; self.out_len()];
            download(stream, out, &mut bits)?;
            bits.into_iter().map(bf16_to_f32).collect()
        } else {
            let mut values = vec![0f32; self.out_len()];
            download(stream, out, &mut values)?;
            values
        })
    }

    /// Puts the output back as the GEMM must find it.
    fn reset_output(&self, stream: &CudaStream, out: u64) -> anyhow::Result<()> {
        match self.output {
            GemmOutput::F32Accumulate => upload(stream, out, &self.initial)?,
            _ => upload(stream, out, &vec![0u8; self.out_bytes()])?,
        }
        Ok(())
    }
}

/// Ragged M and K (partial tiles and scale groups), DeepSeek-V3-like N and K (2112 and 576 put
/// tiles of 144 to 192 columns across two weight scale blocks), all three outputs, B scaled per
/// 1×128 tile, experts with a padding block, and the experts' weight gradient K-grouped (an
/// expert without tokens among them).
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
            out_rows: Vec::new(),
        });
    }
    let (m, n, k) = (256, 1040, 640);
    let (a, b) = (activations(m * k), activations(n * k));
    out.push(Case {
        what: "dense, 1x128 B scales, +=",
        ops: HostFp8Operands::quantize_row_scaled_b(&a, &b, m, n, k)?,
        output: GemmOutput::F32Accumulate,
        initial: activations(m * n),
        out_rows: Vec::new(),
    });
    let (n, k) = (576, 768);
    let block_expert = vec![2, 0, -1, 1, 2];
    let m = 128 * block_expert.len();
    let a = activations(m * k);
    let experts: Vec<Vec<f32>> = (0..3).map(|_| weights(activations(n * k))).collect();
    let experts: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
    out.push(Case {
        what: "3 experts, a padding block",
        ops: HostFp8Operands::grouped(&a, &experts, m, n, k, block_expert.clone())?,
        output: GemmOutput::Bf16,
        initial: Vec::new(),
        out_rows: Vec::new(),
    });
    // As the runtime's grouped FP8 plan launches it: rows scattered to their token-slots.
    let out_rows = scattered_rows(&block_expert);
    out.push(Case {
        what: "3 experts, rows scattered",
        ops: HostFp8Operands::grouped(&a, &experts, m, n, k, block_expert)?,
        output: GemmOutput::F32Scattered,
        initial: Vec::new(),
        out_rows,
    });
    // The experts' weight gradient: 4 experts' segments of K (the second empty: zeros).
    let (m, n) = (576, 1040);
    let k_offsets = vec![0, 384, 384, 1024, 1152];
    let k = 1152;
    let (a, b) = (activations(m * k), activations(n * k));
    out.push(Case {
        what: "K-grouped, an empty group",
        ops: HostFp8Operands::k_grouped(&a, &b, (m, n, k), k_offsets)?,
        output: GemmOutput::F32,
        initial: Vec::new(),
        out_rows: Vec::new(),
    });
    Ok(out)
}

/// Output rows for a grouped GEMM's rows (`block_expert` per 128): the real rows (the first 100
/// of each expert's block) each to a row of their own in a scrambled order, the padding block
/// and each block's last 28 rows (padding) nowhere (-1).
fn scattered_rows(block_expert: &[i32]) -> Vec<i32> {
    let m = 128 * block_expert.len();
    let real = |i: usize| block_expert[i / 128] >= 0 && i % 128 < 100;
    let count = (0..m).filter(|&i| real(i)).count();
    let mut next = 0;
    (0..m)
        .map(|i| {
            if !real(i) {
                return -1;
            }
            next += 1;
            // 7919 is prime and does not divide `count`: a permutation.
            ((next * 7919) % count) as i32
        })
        .collect()
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
    let mut failures = Vec::new();
    let hopper = device.compute_capability == (9, 0);
    if !hopper {
        println!(
            "(the sm_90a template needs Hopper; this is {}: the portable GEMM alone)",
            device.arch()
        );
    }
    for case in cases()? {
        let problem = case.ops.problem;
        let mut buffers = Buffers::new(device, &stream);
        let mut operands = upload_operands(&mut buffers, (&case.ops).into(), case.out_bytes())?;
        if !case.out_rows.is_empty() {
            operands.out_rows = Some(buffers.put(&case.out_rows)?);
        }
        let run = Run {
            stream: &stream,
            case: &case,
            expected: case.expected(),
            out: operands.out,
        };
        let mut report = |name: String, diffs: Vec<(f64, String)>| {
            let worst = diffs.iter().map(|(d, _)| *d).fold(0.0, f64::max);
            let bad: Vec<_> = diffs
                .iter()
                .filter(|(d, _)| d.is_nan() || *d >= MAX_DIFF)
                .collect();
            println!(
                "{name:<52} {:<27} M={:<4} N={:<5} K={:<5} diff <= {worst:.2e} (< {MAX_DIFF:e}, {} run(s)) {}",
                case.what,
                problem.m,
                problem.n,
                problem.k,
                diffs.len(),
                if bad.is_empty() { "ok" } else { "FAIL" }
            );
            for (diff, how) in bad {
                failures.push(format!(
                    "{name} ({}) at {}x{}x{}{how}: diff {diff:.3e}",
                    case.what, problem.m, problem.n, problem.k
                ));
            }
        };
        let candidates = Fp8GemmParams::candidates(
            problem.m,
            problem.n,
            case.ops.b_scaling,
            case.output,
            case.ops.grouping(),
        );
        for params in candidates.into_iter().filter(|_| hopper) {
            let gemm = Fp8Gemm::load(&device.ctx, cache, params)?;
            let mut diffs = Vec::new();
            for schedule in checked_schedules(device, &stream, &gemm)? {
                let how = format!(" with {schedule}");
                let diff = run.diff(&how, || {
                    Ok(gemm.launch(&stream, &problem, &operands, &schedule)?)
                })?;
                diffs.push((diff, how));
            }
            report(params.name(), diffs);
        }
        // The portable GEMM, on any GPU.
        let fallback = FallbackGemmParams {
            b_scaling: case.ops.b_scaling,
            output: case.output,
            grouping: case.ops.grouping(),
            ..FallbackGemmParams::new(64, 64)
        };
        let gemm = Fp8GemmFallback::load(&device.ctx, cache, fallback, &device.arch())?;
        let diff = run.diff("", || Ok(gemm.launch(&stream, &problem, &operands)?))?;
        report(fallback.name(), vec![(diff, String::new())]);
        buffers.free()?;
    }
    Ok(failures)
}

/// One case's operands on the device and what the output must come to.
struct Run<'a> {
    stream: &'a CudaStream,
    case: &'a Case,
    expected: Vec<f32>,
    out: u64,
}

impl Run<'_> {
    /// Resets the output, runs `launch`, and returns DeepGEMM's difference from the expected
    /// output (`how` names the run if it hangs).
    fn diff(&self, how: &str, launch: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
        self.case.reset_output(self.stream, self.out)?;
        launch()?;
        finish_within(self.stream, HANG_LIMIT, || {
            format!("the GEMM of {}{how}", self.case.what)
        })?;
        let got = self.case.read_output(self.stream, self.out)?;
        Ok(calc_diff(&got, &self.expected)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_rows_send_every_real_row_to_a_row_of_its_own() {
        let rows = scattered_rows(&[2, 0, -1, 1]);
        assert_eq!(rows.len(), 512);
        assert!(rows[256..384].iter().all(|&r| r == -1), "the padding block");
        assert!(
            rows[100..128].iter().all(|&r| r == -1),
            "a segment's padding rows"
        );
        let mut targets: Vec<i32> = rows.iter().copied().filter(|&r| r >= 0).collect();
        assert_ne!(targets[..5], [0, 1, 2, 3, 4], "scrambled");
        targets.sort_unstable();
        assert_eq!(targets, (0..300).collect::<Vec<i32>>());
    }
}
