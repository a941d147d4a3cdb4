//! Every CUDA kernel the compiler generates compiles with NVRTC for sm_90a, without a GPU
//! (DESIGN.md, "GPU code without a GPU"): the tiny model's whole training step (forward,
//! losses, backward) and the full DeepSeek-V3 671B forward pass (batch 1, seq 4), every unique
//! source, with no errors, warnings or register spills. Run with `-- --nocapture` for the
//! counts, the NVRTC time and the resource table.
//!
//! NVRTC comes from `$FATHOM_NVRTC`, `$CUDA_HOME`, `/usr/local/cuda` or the project's `.nvrtc/`
//! (installed by `scripts/test.sh`). Without it these tests fail, saying how to install it,
//! unless `FATHOM_SKIP_NVRTC=1` is set explicitly. `FATHOM_KERNEL_DUMP_DIR=dir` writes every
//! generated source there.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fathom_compiler::codegen::sample::coverage_program;
use fathom_compiler::codegen::{CudaProgram, cuda_program};
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::model::{ForwardOptions, LossWeights, forward_graph};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::spec::hf::spec_from_config_json;
use fathom_compiler::training::training_graph;
use fathom_kernels::nvrtc::{Nvrtc, ResourceUsage, nvrtc_unless_skipped};
use fathom_kernels::{ArchRequirement, KernelSource};

/// NVRTC, or `None` when the run opted out with `FATHOM_SKIP_NVRTC=1`; panics with install
/// instructions when it is missing.
fn nvrtc() -> Option<Nvrtc> {
    nvrtc_unless_skipped().unwrap_or_else(|e| {
        panic!("{e}\n(set FATHOM_SKIP_NVRTC=1 to skip the CUDA compile checks explicitly)")
    })
}

/// The workspace's smallest full-featured spec (`fathom_compiler::spec::examples::micro`).
fn tiny() -> ModelSpec {
    fathom_compiler::spec::examples::micro()
}

fn tiny_training_step() -> CudaProgram {
    let graph = training_graph(&tiny(), 1, 3, LossWeights::deepseek_v3())
        .expect("the training graph builds")
        .graph;
    let compiled = compile(&graph, &CompileOptions::default()).expect("it compiles");
    cuda_program(&compiled.program).expect("CUDA is generated")
}

fn deepseek_v3_671b_forward() -> CudaProgram {
    let config = include_str!("../../examples/configs/deepseek-v3-671b.json");
    let spec = spec_from_config_json(config).expect("the hub config loads");
    let options = ForwardOptions {
        batch: 1,
        seq: 4,
        with_mtp: false,
    };
    let graph = forward_graph(&spec, options).expect("the graph builds");
    let compiled = compile(&graph, &CompileOptions::default()).expect("it compiles");
    cuda_program(&compiled.program).expect("CUDA is generated")
}

/// A unique generated source as the kernels crate's compile unit.
fn kernel_source(program: &CudaProgram, index: usize) -> KernelSource {
    let source = &program.sources[index];
    let block = program
        .users_of(&source.entry)
        .next()
        .map_or(0, |k| k.launch.block);
    KernelSource {
        name: source.entry.clone(),
        source: source.text.clone(),
        entry: source.entry.clone(),
        arch_requirement: ArchRequirement::Sm80OrNewer,
        block_threads: block,
        dynamic_smem_bytes: 0,
        // The launcher takes the parameters from `CudaKernel::args`.
        params: Vec::new(),
    }
}

struct Compiled {
    name: String,
    resources: ResourceUsage,
    time: Duration,
}

/// Compiles every unique source of `program` for `arch` on two threads; returns the results
/// and every problem (errors, warnings, spills, a missing resource report).
fn compile_all(nvrtc: &Nvrtc, program: &CudaProgram, arch: &str) -> (Vec<Compiled>, Vec<String>) {
    let sources: Vec<KernelSource> = (0..program.sources.len())
        .map(|i| kernel_source(program, i))
        .collect();
    if let Some(dir) = std::env::var_os("FATHOM_KERNEL_DUMP_DIR").map(PathBuf::from) {
        std::fs::create_dir_all(&dir).expect("create the dump folder");
        for source in &sources {
            std::fs::write(dir.join(format!("{}.cu", source.name)), &source.source)
                .expect("write a source");
        }
    }
    let results: Vec<Result<Compiled, String>> = std::thread::scope(|scope| {
        let halves: Vec<_> = sources
            .chunks(sources.len().div_ceil(2).max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|source| {
                            let start = Instant::now();
                            let compiled = nvrtc
                                .compile(source, Some(arch))
                                .map_err(|e| format!("{}: {e}", source.name))?;
                            let time = start.elapsed();
                            if compiled.cubin.is_empty() {
                                return Err(format!("{}: empty CUBIN", source.name));
                            }
                            if compiled.log.contains("warning") {
                                return Err(format!(
                                    "{}: warnings:\n{}",
                                    source.name, compiled.log
                                ));
                            }
                            let resources = compiled.resources.ok_or_else(|| {
                                format!("{}: no ptxas report:\n{}", source.name, compiled.log)
                            })?;
                            if resources.spill_store_bytes + resources.spill_load_bytes > 0 {
                                return Err(format!("{}: spills {resources:?}", source.name));
                            }
                            Ok(Compiled {
                                name: source.name.clone(),
                                resources,
                                time,
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves
            .into_iter()
            .flat_map(|h| h.join().expect("compile thread"))
            .collect()
    });
    let mut compiled = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(c) => compiled.push(c),
            Err(e) => failures.push(e),
        }
    }
    (compiled, failures)
}

/// Compiles, prints the counts and the resource summary, and fails on any problem.
fn check(label: &str, program: &CudaProgram, arch: &str, nvrtc: &Nvrtc) {
    // Dedup is by content: distinct sources have distinct texts, hashes and entry points.
    let texts: HashSet<&str> = program.sources.iter().map(|s| s.text.as_str()).collect();
    let hashes: HashSet<u64> = program.sources.iter().map(|s| s.hash).collect();
    let entries: HashSet<&str> = program.sources.iter().map(|s| s.entry.as_str()).collect();
    let unique = program.sources.len();
    assert_eq!(
        (texts.len(), hashes.len(), entries.len()),
        (unique, unique, unique)
    );

    let started = Instant::now();
    let (compiled, failures) = compile_all(nvrtc, program, arch);
    let wall = started.elapsed();
    let cpu: Duration = compiled.iter().map(|c| c.time).sum();
    let max_regs = compiled.iter().max_by_key(|c| c.resources.registers);
    let smem = compiled
        .iter()
        .map(|c| c.resources.static_smem_bytes)
        .max()
        .unwrap_or(0);
    println!(
        "{label}: {} kernels ({} generated, {} template calls) -> {unique} unique sources; \
         NVRTC {arch}: {} compiled in {:.1} s ({:.1} s of compile time, {:.0} ms each); \
         registers max {} ({}), static smem max {smem} B, spills 0",
        program.launches.len(),
        program.kernels.len(),
        program.library_calls().count(),
        compiled.len(),
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e3 / compiled.len().max(1) as f64,
        max_regs.map_or(0, |c| c.resources.registers),
        max_regs.map_or("-", |c| c.name.as_str()),
    );
    assert!(
        failures.is_empty(),
        "{label}: {} of {unique} sources failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert_eq!(compiled.len(), unique);
}

#[test]
fn every_kernel_of_the_tiny_training_step_compiles_for_sm90a() {
    let Some(nvrtc) = nvrtc() else { return };
    let program = tiny_training_step();
    assert!(program.sources.len() < program.kernels.len());
    check("tiny training step", &program, "sm_90a", &nvrtc);
}

#[test]
fn every_kernel_of_the_671b_forward_pass_compiles_for_sm90a_and_sm80() {
    let Some(nvrtc) = nvrtc() else { return };
    let program = deepseek_v3_671b_forward();
    // The 61 layers share their sources (the 256 experts' weights are fed into their stacks
    // in place: no kernel copies them).
    assert!(program.kernels.len() > 1_000, "{}", program.kernels.len());
    assert!(
        program.sources.len() <= 64,
        "{} unique sources",
        program.sources.len()
    );
    check("DeepSeek-V3 671B forward", &program, "sm_90a", &nvrtc);
    check("DeepSeek-V3 671B forward", &program, "sm_80", &nvrtc);
}

#[test]
fn every_construct_of_the_generator_compiles_for_sm90a_and_sm80() {
    let Some(nvrtc) = nvrtc() else { return };
    let program = cuda_program(&coverage_program()).expect("CUDA is generated");
    check("coverage program", &program, "sm_90a", &nvrtc);
    check("coverage program", &program, "sm_80", &nvrtc);
}
