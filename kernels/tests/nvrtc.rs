//! Compile checks without a GPU (DESIGN.md, "GPU code without a GPU").
//!
//! Every template instantiation is compiled by NVRTC to a CUBIN: the Hopper FP8 GEMMs (dense,
//! grouped and K-grouped) for `sm_90a` at the tile configurations DeepSeek-V3's linear layers get and at every
//! candidate `fathom gpu-check` times (tiles up to 192 columns, clusters of two), the portable
//! kernels (quantisation, MLA attention forward/backward, the fallback GEMM, and the f32 library
//! kernels: strided/grouped GEMMs, index operations, fake quantisation) for `sm_80` and `sm_90a`.
//! ptxas' report must show no local-memory spills; when a disassembler is available the FP8
//! GEMMs' SASS must contain `QGMMA` (Hopper's FP8 tensor-core MMA), and in clusters the multicast
//! TMA load and the cluster barrier; the `mma.sync` kernels' `HMMA` and the f32 GEMMs' `FFMA`.
//! Run with `-- --nocapture` to see the resource table.
//!
//! NVRTC comes from `$FATHOM_NVRTC`, `$CUDA_HOME`, `/usr/local/cuda` or the project's `.nvrtc/`
//! (installed by `scripts/test.sh`). Without it these tests fail, saying how to install it, unless
//! `FATHOM_SKIP_NVRTC=1` is set explicitly. `FATHOM_KERNEL_DUMP_DIR=dir` writes every source there.

use std::path::PathBuf;
use std::process::Command;

use fathom_kernels::fp8_gemm::SM90_MAX_SMEM_BYTES;
use fathom_kernels::nvrtc::{
    CompiledKernel, Nvrtc, find_cuda_tool, nvrtc_unless_skipped, project_pip_dirs,
};
use fathom_kernels::{
    AccumulateScaled, AgreementParams, BScaling, ConvertKind, ConvertParams, Elem, F32GemmKind,
    F32GemmParams, FakeQuantizeGatheredParams, FakeQuantizeParams, FallbackGemmParams,
    Fp8GemmParams, GemmGrouping, GemmOutput, GemmProblem, IndexOpParams, KernelSource,
    MlaAttentionBwdParams, MlaAttentionFwdParams, MlaHeadDims, OptimizerKernel, QuantizeInput,
    QuantizeKind, QuantizeParams, TrainingGemm,
};

/// NVRTC, or `None` when the run opted out with `FATHOM_SKIP_NVRTC=1`; panics with install
/// instructions when it is missing.
fn nvrtc() -> Option<Nvrtc> {
    nvrtc_unless_skipped().unwrap_or_else(|e| {
        panic!("{e}\n(set FATHOM_SKIP_NVRTC=1 to skip the CUDA compile checks explicitly)")
    })
}

/// DeepSeek-V3's FP8 linears as (name, out features N, in features K).
const V3_LINEARS: &[(&str, u32, u32)] = &[
    ("q_a_proj", 1536, 7168),
    ("q_b_proj", 24576, 1536),
    ("kv_a_proj_with_mqa", 576, 7168),
    ("kv_b_proj", 32768, 512),
    ("o_proj", 7168, 16384),
    ("mlp.gate_up_proj (dense)", 36864, 7168),
    ("mlp.down_proj (dense)", 7168, 18432),
    ("shared_experts.gate_up_proj", 4096, 7168),
    ("shared_experts.down_proj", 7168, 2048),
];
/// Routed experts (grouped): (name, N, K) per expert; 256 experts.
const V3_EXPERTS: &[(&str, u32, u32)] = &[
    ("experts.gate_up_proj", 4096, 7168),
    ("experts.down_proj", 7168, 2048),
];
/// Token counts: a training micro-batch and a small decode-like batch.
const TOKENS: &[u32] = &[4096, 64];

/// The distinct FP8 GEMM configurations DeepSeek-V3's layers get, each with one problem it runs.
fn v3_fp8_gemms() -> Vec<(Fp8GemmParams, GemmProblem)> {
    let mut out: Vec<(Fp8GemmParams, GemmProblem)> = Vec::new();
    let mut push = |params: Fp8GemmParams, problem: GemmProblem| {
        params
            .check_problem(&problem)
            .unwrap_or_else(|e| panic!("{}: {e}", params.name()));
        if !out.iter().any(|(p, _)| p == &params) {
            out.push((params, problem));
        }
    };
    let bf16 = (BScaling::Block128x128, GemmOutput::Bf16);
    let wgrad = (BScaling::Row1x128, GemmOutput::F32Accumulate);
    for &(_, n, k) in V3_LINEARS {
        for &t in TOKENS {
            let dense = GemmGrouping::Dense;
            push(
                Fp8GemmParams::for_shape(t, n, bf16.0, bf16.1, dense),
                GemmProblem {
                    m: t,
                    n,
                    k,
                    groups: 1,
                },
            );
            push(
                Fp8GemmParams::for_shape(t, k, bf16.0, bf16.1, dense),
                GemmProblem {
                    m: t,
                    n: k,
                    k: n,
                    groups: 1,
                },
            );
            push(
                Fp8GemmParams::for_shape(n, k, wgrad.0, wgrad.1, dense),
                GemmProblem {
                    m: n,
                    n: k,
                    k: t,
                    groups: 1,
                },
            );
        }
    }
    for &(_, n, k) in V3_EXPERTS {
        let grouped = GemmGrouping::Contiguous;
        let problem = |n, k| GemmProblem {
            m: 4096 * 8 + 256 * 128,
            n,
            k,
            groups: 256,
        };
        push(
            Fp8GemmParams::for_shape(4096, n, bf16.0, bf16.1, grouped),
            problem(n, k),
        );
        push(
            Fp8GemmParams::for_shape(4096, k, bf16.0, bf16.1, grouped),
            problem(k, n),
        );
        // The weight gradients dW_e [N][K] = dY_eᵀ X_e of all 256 experts, K-grouped over their
        // padded token-slots.
        push(
            Fp8GemmParams::for_shape(n, k, wgrad.0, GemmOutput::F32, GemmGrouping::KGrouped),
            GemmProblem {
                m: n,
                n: k,
                k: 4096 * 8 + 256 * 128,
                groups: 256,
            },
        );
    }
    // What the runtime's FP8 plans launch in training (f32 out; the runtime's
    // `cuda::library_fp8`): the tiny model's forward over 64 tokens, its weight gradient, the
    // experts' grouped product over 640 padded rows, scattered back to token-slots, and their
    // weight gradients K-grouped over the same 640 padded token-slots.
    let (f32_out, scattered) = (GemmOutput::F32, GemmOutput::F32Scattered);
    for (b_scaling, output, grouping, (m, n, k, groups)) in [
        (
            BScaling::Block128x128,
            f32_out,
            GemmGrouping::Dense,
            (64, 16, 32, 1),
        ),
        (
            BScaling::Row1x128,
            f32_out,
            GemmGrouping::Dense,
            (32, 16, 64, 1),
        ),
        (
            BScaling::Block128x128,
            scattered,
            GemmGrouping::Contiguous,
            (640, 16, 32, 4),
        ),
        (
            BScaling::Row1x128,
            f32_out,
            GemmGrouping::KGrouped,
            (32, 16, 640, 4),
        ),
    ] {
        push(
            Fp8GemmParams::for_shape(m, n, b_scaling, output, grouping),
            GemmProblem { m, n, k, groups },
        );
    }
    // The reference configuration (DeepGEMM's usual 128x128 tile with a 4-deep pipeline) and the
    // three training layouts at one tile.
    let problem = GemmProblem {
        m: 4096,
        n: 7168,
        k: 2048,
        groups: 1,
    };
    for gemm in [
        TrainingGemm::Forward,
        TrainingGemm::InputGrad,
        TrainingGemm::WeightGrad,
    ] {
        push(gemm.params(128, 128, 4, GemmGrouping::Dense), problem);
    }
    push(
        TrainingGemm::WeightGrad.params(128, 128, 4, GemmGrouping::KGrouped),
        GemmProblem {
            groups: 8,
            ..problem
        },
    );
    push(
        Fp8GemmParams {
            output: GemmOutput::F32,
            ..Fp8GemmParams::new(64, 64, 8)
        },
        problem,
    );
    // The tiles `fathom gpu-check` times (up to 192 columns, meeting two weight scale blocks),
    // in each of the three layouts, grouped and K-grouped; and those the runtime's tuner
    // (`cuda::gemm_tuning`) may choose for the training plans' forms (f32 out, rows scattered).
    for (b_scaling, output, grouping, groups) in [
        (bf16.0, bf16.1, GemmGrouping::Dense, 1),
        (wgrad.0, wgrad.1, GemmGrouping::Dense, 1),
        (bf16.0, bf16.1, GemmGrouping::Contiguous, 8),
        (wgrad.0, GemmOutput::F32, GemmGrouping::KGrouped, 8),
        (bf16.0, GemmOutput::F32, GemmGrouping::Dense, 1),
        (wgrad.0, GemmOutput::F32, GemmGrouping::Dense, 1),
        (
            bf16.0,
            GemmOutput::F32Scattered,
            GemmGrouping::Contiguous,
            8,
        ),
    ] {
        for params in Fp8GemmParams::candidates(4096, 7168, b_scaling, output, grouping) {
            push(params, GemmProblem { groups, ..problem });
        }
    }
    out
}

fn portable_kernels() -> Vec<KernelSource> {
    let mut kernels = Vec::new();
    for kind in [
        QuantizeKind::Tile1x128,
        QuantizeKind::GatheredTile1x128,
        QuantizeKind::Block128x128 { transpose: false },
        QuantizeKind::Block128x128 { transpose: true },
        QuantizeKind::Tile128x1Transposed,
        QuantizeKind::GatheredTile128x1Transposed,
    ] {
        let blocks = matches!(kind, QuantizeKind::Block128x128 { .. });
        let fused = [QuantizeInput::E4m3Tiles, QuantizeInput::F32Product];
        let fused = fused.into_iter().filter(|_| !blocks);
        for input in [QuantizeInput::F32, QuantizeInput::Bf16]
            .into_iter()
            .chain(fused)
        {
            for pow2_scales in [false, true] {
                kernels.push(
                    QuantizeParams {
                        kind,
                        input,
                        pow2_scales,
                    }
                    .instantiate()
                    .expect("quantize"),
                );
            }
        }
    }
    for kernel in [
        OptimizerKernel::SquareSums { chunk: 1 << 14 },
        OptimizerKernel::Scale,
        OptimizerKernel::AdamW {
            bf16_moments: true,
            decay: true,
        },
        OptimizerKernel::AdamW {
            bf16_moments: false,
            decay: false,
        },
    ] {
        kernels.push(kernel.instantiate().expect("optimizer"));
    }
    let dims = MlaHeadDims::DEEPSEEK_V3;
    kernels.push(
        MlaAttentionFwdParams::new(dims)
            .instantiate()
            .expect("attention fwd"),
    );
    let bwd = MlaAttentionBwdParams::new(dims);
    kernels.push(bwd.instantiate_delta().expect("attention bwd delta"));
    kernels.push(bwd.instantiate().expect("attention bwd"));
    let fallback = FallbackGemmParams::new(64, 64);
    for params in [
        fallback,
        FallbackGemmParams {
            b_scaling: BScaling::Row1x128,
            output: GemmOutput::F32Accumulate,
            ..fallback
        },
        FallbackGemmParams {
            grouping: GemmGrouping::Contiguous,
            ..fallback
        },
        FallbackGemmParams {
            b_scaling: BScaling::Row1x128,
            output: GemmOutput::F32,
            grouping: GemmGrouping::KGrouped,
            ..fallback
        },
    ] {
        kernels.push(params.instantiate().expect("fallback gemm"));
    }
    kernels
}

/// One compiled kernel's line of the report, and what failed for it.
struct Checked {
    compiled: CompiledKernel,
    millis: u128,
    sass_note: String,
    failures: Vec<String>,
}

/// Compiles for `arch`, checks warnings, spills and (when a disassembler exists) the expected
/// SASS opcode, and in a cluster kernel the multicast load and the cluster barrier.
fn check(
    nvrtc: &Nvrtc,
    kernel: &KernelSource,
    arch: &str,
    expect_sass: Option<&str>,
) -> Result<Checked, String> {
    let start = std::time::Instant::now();
    let compiled = nvrtc
        .compile(kernel, Some(arch))
        .map_err(|e| e.to_string())?;
    let millis = start.elapsed().as_millis();
    let mut failures = Vec::new();
    if compiled.cubin.is_empty() {
        failures.push("empty CUBIN".to_owned());
    }
    if compiled.log.contains("warning") {
        failures.push(format!("compiler warnings:\n{}", compiled.log));
    }
    match compiled.resources {
        None => failures.push(format!(
            "no ptxas resource report in the log:\n{}",
            compiled.log
        )),
        Some(r) if r.spill_store_bytes > 0 || r.spill_load_bytes > 0 => failures.push(format!(
            "spills: {} bytes stored, {} bytes loaded (stack frame {})",
            r.spill_store_bytes, r.spill_load_bytes, r.stack_frame_bytes
        )),
        Some(r)
            if u64::from(r.static_smem_bytes) + u64::from(kernel.dynamic_smem_bytes)
                > u64::from(SM90_MAX_SMEM_BYTES) =>
        {
            failures.push(format!(
                "shared memory {} + {} exceeds 227 KiB",
                r.static_smem_bytes, kernel.dynamic_smem_bytes
            ))
        }
        Some(r) if kernel.block_threads == 384 && r.registers != 168 => failures.push(format!(
            "{} registers at launch: the producer/math hand-over (setmaxnreg 40 / 232) needs exactly \
             168 (65536 / 384), or the math warp groups would wait forever for registers",
            r.registers
        )),
        Some(_) => {}
    }
    let sass = expect_sass.and_then(|_| disassemble(&compiled));
    // Clusters of two share B by multicast and meet at a cluster barrier: both must be there.
    if let (true, Some(Ok(sass))) = (kernel.source.contains("__cluster_dims__("), &sass) {
        for needed in ["UTMALDG.2D.MULTICAST", "UCGABAR_WAIT"] {
            if !sass.contains(needed) {
                failures.push(format!("a cluster kernel's SASS has no {needed}"));
            }
        }
    }
    let sass_note = match expect_sass.zip(sass) {
        None => "-".to_owned(),
        Some((_, Err(e))) => {
            failures.push(e);
            "error".to_owned()
        }
        Some((expect_sass, Ok(sass))) => {
            let count = sass.lines().filter(|l| l.contains(expect_sass)).count();
            if count == 0 {
                failures.push(format!("SASS has no {expect_sass}"));
            }
            let example = sass
                .lines()
                .find_map(|l| l.split_whitespace().find(|w| w.starts_with(expect_sass)))
                .unwrap_or("")
                .trim_end_matches(';')
                .to_owned();
            format!("{count}x {example}")
        }
    };
    Ok(Checked {
        compiled,
        millis,
        sass_note,
        failures,
    })
}

/// The CUBIN's SASS via nvdisasm (or cuobjdump); `None` when neither is installed.
fn disassemble(compiled: &CompiledKernel) -> Option<Result<String, String>> {
    let dirs = project_pip_dirs();
    let (tool, args): (PathBuf, &[&str]) = if let Some(t) = find_cuda_tool("nvdisasm", &dirs) {
        (t, &[])
    } else {
        (find_cuda_tool("cuobjdump", &dirs)?, &["-sass"])
    };
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir
        .path()
        .join(format!("{}.{}.cubin", compiled.name, compiled.arch));
    std::fs::write(&path, &compiled.cubin).expect("write CUBIN");
    let output = Command::new(&tool).args(args).arg(&path).output();
    Some(match output {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(format!(
            "{} failed: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("cannot run {}: {e}", tool.display())),
    })
}

/// Compiles every (kernel, arch, expected opcode) on two threads, prints the table, and fails
/// with every problem found.
type Job = (KernelSource, &'static str, Option<&'static str>);

fn compile_all(nvrtc: &Nvrtc, jobs: Vec<Job>) {
    // FATHOM_KERNEL_DUMP_DIR: write every source there, to read or to compile by hand.
    if let Some(dir) = std::env::var_os("FATHOM_KERNEL_DUMP_DIR").map(PathBuf::from) {
        std::fs::create_dir_all(&dir).expect("create the dump folder");
        for (kernel, _, _) in &jobs {
            std::fs::write(dir.join(format!("{}.cu", kernel.name)), &kernel.source)
                .expect("write a source");
        }
    }
    let results: Vec<Result<Checked, String>> = std::thread::scope(|scope| {
        let halves: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(2).max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(k, arch, sass)| check(nvrtc, k, arch, *sass))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves
            .into_iter()
            .flat_map(|h| h.join().expect("compile thread"))
            .collect()
    });
    let mut table = format!(
        "{:<58} {:<7} {:>5} {:>7} {:>8} {:>7} {:>6}  {}\n",
        "kernel", "arch", "regs", "smem", "dyn smem", "spills", "ms", "SASS"
    );
    let mut failures = Vec::new();
    for ((kernel, arch, _), result) in jobs.iter().zip(results) {
        match result {
            Err(e) => failures.push(format!("{} ({arch}): {e}", kernel.name)),
            Ok(checked) => {
                let r = checked.compiled.resources.unwrap_or_default();
                table.push_str(&format!(
                    "{:<58} {:<7} {:>5} {:>7} {:>8} {:>7} {:>6}  {}\n",
                    kernel.name,
                    arch,
                    r.registers,
                    r.static_smem_bytes,
                    kernel.dynamic_smem_bytes,
                    r.spill_store_bytes + r.spill_load_bytes,
                    checked.millis,
                    checked.sass_note
                ));
                failures.extend(
                    checked
                        .failures
                        .into_iter()
                        .map(|f| format!("{} ({arch}): {f}", kernel.name)),
                );
            }
        }
    }
    println!(
        "NVRTC {:?} from {}\n{table}",
        nvrtc.version(),
        nvrtc.install().library.display()
    );
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn fp8_gemms_compile_for_sm90a_to_qgmma_without_spills() {
    let Some(nvrtc) = nvrtc() else { return };
    let jobs: Vec<_> = v3_fp8_gemms()
        .into_iter()
        .map(|(params, problem)| {
            params
                .tensor_maps(&problem)
                .unwrap_or_else(|e| panic!("{}: {e}", params.name()));
            (
                params.instantiate().expect("valid configuration"),
                "sm_90a",
                Some("QGMMA"),
            )
        })
        .collect();
    assert!(
        jobs.iter()
            .any(|(k, _, _)| k.name == "fp8_gemm_1x128_128x128_m128n128k128_s4_bf16")
    );
    for family in ["grouped_fp8_gemm_", "kgrouped_fp8_gemm_"] {
        assert!(jobs.iter().any(|(k, _, _)| k.name.starts_with(family)));
    }
    compile_all(&nvrtc, jobs);
}

#[test]
fn portable_kernels_compile_for_sm80_and_sm90a_without_spills() {
    let Some(nvrtc) = nvrtc() else { return };
    let mut jobs = Vec::new();
    for kernel in portable_kernels() {
        // Power-of-two scales change no architecture-dependent code: compile those once.
        let archs: &[&str] = if kernel.name.ends_with("_pow2") {
            &["sm_90a"]
        } else {
            &["sm_80", "sm_90a"]
        };
        for &arch in archs {
            // mma.sync kernels show HMMA; quantisation on sm_90 converts with F2FP (sm_80 has no
            // FP8 conversion instruction and uses cuda_fp8.h's software path).
            let sass = if kernel.name.starts_with("quantize") {
                (arch == "sm_90a").then_some("F2FP.SATFINITE.E4M3")
            } else if kernel.name.contains("delta") {
                None
            } else if kernel.name.starts_with("square_sums_f64") {
                // The optimizer's: sums in f64, the clipping's product in f64, AdamW's lerp fused.
                Some("DADD")
            } else if kernel.name == "scale_f64" {
                Some("DMUL")
            } else if kernel.name.starts_with("adamw_update") {
                Some("FFMA")
            } else {
                Some("HMMA")
            };
            jobs.push((kernel.clone(), arch, sass));
        }
    }
    compile_all(&nvrtc, jobs);
}

/// The f32 library templates the GPU executor runs for f32 programs (every variant: sizes and
/// strides are launch arguments, so these are all the sources there are), on both
/// architectures. The GEMMs must be FFMA loops.
#[test]
fn f32_library_kernels_compile_for_sm80_and_sm90a_without_spills() {
    let Some(nvrtc) = nvrtc() else { return };
    let mut kernels: Vec<(KernelSource, Option<&'static str>)> = Vec::new();
    for kind in [
        F32GemmKind::Batched,
        F32GemmKind::Grouped,
        F32GemmKind::GroupedWeightGrad,
    ] {
        let gemm = F32GemmParams::new(kind).instantiate().expect("gemm_f32");
        kernels.push((gemm, Some("FFMA")));
    }
    for op in IndexOpParams::all() {
        kernels.push((op.instantiate().expect("index op"), None));
    }
    for pow2_scales in [false, true] {
        let params = FakeQuantizeParams { pow2_scales };
        kernels.push((params.instantiate().expect("fake quantize"), None));
        let gathered = FakeQuantizeGatheredParams { pow2_scales };
        kernels.push((
            gathered.instantiate().expect("gathered fake quantize"),
            None,
        ));
    }
    for kind in [
        ConvertKind::F32ToBf16,
        ConvertKind::Bf16ToF32,
        ConvertKind::F32ToF32,
        ConvertKind::ZeroF32,
    ] {
        let convert = ConvertParams::new(kind).instantiate().expect("convert");
        kernels.push((convert, None));
    }
    kernels.push((AccumulateScaled.instantiate().expect("accumulate"), None));
    for elem in [Elem::F32, Elem::Bf16] {
        let agreement = AgreementParams { elem }.instantiate().expect("agreement");
        kernels.push((agreement, None));
    }
    assert_eq!(kernels.len(), 21);
    let jobs = kernels
        .into_iter()
        .flat_map(|(kernel, sass)| ["sm_80", "sm_90a"].map(|arch| (kernel.clone(), arch, sass)))
        .collect();
    compile_all(&nvrtc, jobs);
}

#[test]
fn compile_errors_show_the_failing_source_lines() {
    let Some(nvrtc) = nvrtc() else { return };
    let mut kernel = QuantizeParams {
        kind: QuantizeKind::Tile1x128,
        input: QuantizeInput::F32,
        pow2_scales: false,
    }
    .instantiate()
    .expect("valid");
    kernel
        .source
        .push_str("\n__device__ int broken() { return undefined_name; }\n");
    let err = nvrtc
        .compile(&kernel, None)
        .expect_err("must not compile")
        .to_string();
    assert!(err.contains("undefined_name"), "{err}");
    assert!(err.contains("--- source around line"), "{err}");
    assert!(err.contains("> "), "{err}");
}
