//! `fathom inspect`: every artifact of compiling a model, as files; with `--target sm_90a` (or
//! `sm_80`) also the generated CUDA C++ of every kernel and the launches of the library calls
//! (which run as FP8 GEMMs, and why the others do not), and with `--compile` what NVRTC makes of
//! it (CUBIN, SASS, registers, shared memory, spills), without a GPU.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fathom_compiler::codegen::{CudaProgram, cuda_program};
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::kernel::{BufferRole, with_prefix};
use fathom_compiler::model::{ForwardOptions, LossWeights, forward_graph};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::spec::hf::spec_from_config_json;
use fathom_compiler::training::training_graph;
use fathom_kernels::KernelSource;
use fathom_kernels::nvrtc::{Nvrtc, NvrtcInstall, ResourceUsage, find_cuda_tool, project_pip_dirs};
use fathom_runtime::cuda::KernelOverrides;
use fathom_runtime::cuda::device_optimizer::OptimizerPlan;
use fathom_runtime::cuda::library::LibraryPlan;
use fathom_runtime::cuda::library_fp8::Fp8Target;
use fathom_runtime::cuda::modules::generated_source;
use fathom_runtime::optim::{AdamWConfig, MomentPrecision, UpdateScalars};
use rayon::prelude::*;

/// What the kernels are generated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The kernel IR only (the CPU backend JIT-compiles it at run time).
    Cpu,
    /// CUDA C++ compiled for Hopper (H100/H200/H800).
    #[value(name = "sm_90a")]
    Sm90a,
    /// CUDA C++ compiled for Ampere and newer.
    #[value(name = "sm_80")]
    Sm80,
}

impl Target {
    fn arch(self) -> Option<&'static str> {
        match self {
            Target::Cpu => None,
            Target::Sm90a => Some("sm_90a"),
            Target::Sm80 => Some("sm_80"),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory (its config.json).
    #[arg(long, conflicts_with_all = ["config", "architecture"])]
    model: Option<PathBuf>,
    /// A Hugging Face DeepSeek-V3 config.json.
    #[arg(long, conflicts_with = "architecture")]
    config: Option<PathBuf>,
    /// A built-in architecture (`tiny`).
    #[arg(long)]
    architecture: Option<String>,
    /// Compile the training step (forward, losses, backward) instead of the forward pass.
    #[arg(long)]
    train: bool,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    seq: usize,
    /// Directory for the artifacts: the graph after each pass, the fusion groups with their
    /// nodes' origins, the kernel IR, the memory plan and the phase timings.
    #[arg(long)]
    out: PathBuf,
    /// Which forward values a training step recomputes in backward: `deepseek_v3` (RMSNorms
    /// and the MLA up-projections) or `none`.
    #[arg(long, default_value = "deepseek_v3")]
    recompute: fathom_compiler::passes::RecomputePolicy,
    /// The Linear GEMMs' arithmetic (fp32, bf16 or fp8, as `fathom train --precision`): the
    /// graph and kernels as the precision pass leaves them.
    #[arg(long, default_value = "fp32")]
    precision: fathom_compiler::precision::Precision,
    /// How the FP8 GEMMs sum their products (as `fathom train --accumulation`): `exact` (the f32
    /// GEMM over the rounded operands on a GPU) or `hopper` (the FP8 tensor cores' own: on a
    /// GPU, the FP8 GEMM).
    #[arg(long, value_parser = fathom_compiler::precision::accumulation_named, default_value = "exact")]
    accumulation: fathom_compiler::graph::Accumulation,
    /// `sm_90a` or `sm_80`: also write the generated CUDA C++ of every unique kernel to
    /// `OUT/cuda/<entry>.cu`, with the launch table (`kernels.txt`), the template calls
    /// (`templates.txt`) and each library call's launches on that GPU (`library-plan.txt`).
    #[arg(long, value_enum, default_value = "cpu")]
    target: Target,
    /// With a CUDA target: compile every unique kernel with NVRTC (no GPU needed) and write its
    /// CUBIN, its SASS (when `cuobjdump` or `nvdisasm` is installed; about half a second per
    /// kernel) and `resources.txt` (registers, shared memory, spills). A kernel with a
    /// hand-edited `<entry>.cu` in `$FATHOM_KERNEL_OVERRIDE_DIR` is compiled from it, as a run
    /// would, and marked so in the table.
    #[arg(long)]
    compile: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.compile && args.target == Target::Cpu {
        bail!("--compile needs a CUDA target: add --target sm_90a (or sm_80)");
    }
    let spec = spec_of(&args)?;
    // The trained parameters with their gradients' outputs (what a GPU's optimizer updates).
    let mut gradients = Vec::new();
    let graph = if args.train {
        // As `fathom train` compiles it: no logits output.
        let train = training_graph(&spec, args.batch, args.seq, LossWeights::deepseek_v3())?
            .without_logits();
        gradients = train.gradient_outputs();
        train.graph
    } else {
        let options = ForwardOptions {
            batch: args.batch,
            seq: args.seq,
            with_mtp: false,
        };
        forward_graph(&spec, options)?
    };
    let policy = fathom_compiler::precision::PrecisionPolicy {
        accumulation: args.accumulation,
        ..fathom_compiler::precision::PrecisionPolicy::uniform(args.precision)
    };
    let tiling = spec.fp8.clone().unwrap_or_default();
    let graph = fathom_compiler::precision::apply_precision(&graph, &policy, &tiling)?;
    let options = CompileOptions {
        dump_dir: None,
        recompute: args.recompute,
        // The program of the target inspected: the CPU's reads the experts' weights in place
        // and, where its bf16 GEMM runs, rounds bf16 operands in the products.
        lower: match args.target {
            Target::Cpu => fathom_runtime::cpu::lower_options(),
            _ => fathom_runtime::cuda::lower_options(),
        },
    };
    let compiled = compile(&graph, &options)?;
    compiled
        .write_artifacts(&args.out)
        .with_context(|| format!("writing the artifacts to {}", args.out.display()))?;
    let loops = compiled
        .program
        .kernels
        .iter()
        .filter(|k| matches!(k.body, fathom_compiler::kernel::KernelBody::Loop(_)))
        .count();
    println!(
        "{} graph nodes -> {} after passes -> {} kernels ({} loop nests, {} library calls)",
        graph.nodes.len(),
        compiled.graphs.last().map_or(0, |(_, g)| g.nodes.len()),
        compiled.program.kernels.len(),
        loops,
        compiled.program.kernels.len() - loops
    );
    println!(
        "temporaries: {} bytes in {} slots ({} bytes without reuse)",
        compiled.plan.peak_bytes(),
        compiled.plan.slot_elements.len(),
        compiled.plan.unshared_bytes
    );
    println!(
        "loop nests: {} read and written per run (each view once)",
        with_prefix(compiled.program.loop_bytes(), "B")
    );
    let roles = compiled.program.buffers.iter().map(|b| &b.role);
    let (stacks, windows) = roles.fold((0, 0), |(s, w), role| match role {
        BufferRole::StackedParameters(_) => (s + 1, w),
        BufferRole::Window { .. } => (s, w + 1),
        _ => (s, w),
    });
    if stacks + windows > 0 {
        println!(
            "experts without copies: {stacks} stacks of weights fed in place, {windows} \
             gradients read as windows of stacked gradients"
        );
    }
    for (phase, time) in &compiled.timings {
        println!("  {phase:<24} {:>8.3} ms", time.as_secs_f64() * 1e3);
    }
    if let Some(arch) = args.target.arch() {
        let cuda = cuda_program(&compiled.program)?;
        let dir = args.out.join("cuda");
        write_cuda(&cuda, &dir)?;
        let mut templates = write_library_plan(&compiled.program, arch, &dir)?;
        if !gradients.is_empty() {
            templates.extend(describe_device_optimizer(
                &compiled.program,
                &gradients,
                &dir,
            )?);
        }
        println!(
            "CUDA: {} generated kernels -> {} unique sources, {} template calls ({} template \
             instantiations), in {}",
            cuda.kernels.len(),
            cuda.sources.len(),
            cuda.library_calls().count(),
            templates.len(),
            dir.display()
        );
        if args.compile {
            let mut units: Vec<Unit> = cuda
                .sources
                .iter()
                .map(|source| {
                    let users: Vec<_> = cuda.users_of(&source.entry).collect();
                    let block = users.first().map_or(0, |k| k.launch.block);
                    (generated_source(source, block), users.len())
                })
                .collect();
            units.extend(templates);
            compile_cuda(&units, arch, &dir)?;
        }
    }
    println!("artifacts written to {}", args.out.display());
    Ok(())
}

/// Every unique source as `<entry>.cu` (headed by the kernels that run it), the launch table
/// and the template calls.
fn write_cuda(cuda: &CudaProgram, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: String, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    for source in &cuda.sources {
        write(format!("{}.cu", source.entry), cuda.source_file(source))?;
    }
    write("kernels.txt".into(), cuda.launch_table())?;
    let mut templates = String::new();
    for call in cuda.library_calls() {
        let params: Vec<String> = call
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            templates,
            "{} -> {} ({})\n  {}",
            call.name,
            call.template,
            call.implemented_by.unwrap_or("no template yet"),
            params.join(", ")
        );
    }
    write("templates.txt".into(), templates)
}

/// A compile unit and how many launches run it.
type Unit = (KernelSource, usize);

/// The library calls' launches on a GPU of `arch` (`library-plan.txt`), or why the program
/// cannot run there; says how many products run as FP8 GEMMs. Writes every template
/// instantiation the plan launches as `<entry>.cu` (where a hand edit starts from) and returns
/// them with their launch counts.
fn write_library_plan(
    program: &fathom_compiler::kernel::Program,
    arch: &str,
    dir: &Path,
) -> anyhow::Result<Vec<Unit>> {
    let path = dir.join("library-plan.txt");
    let mut templates = Vec::new();
    let text = match LibraryPlan::of(program, Fp8Target::for_arch(arch)) {
        Ok(plan) => {
            let (fp8, in_f32) = plan.fp8_summary();
            println!(
                "library calls on {arch}: {fp8} FP8 GEMMs, {in_f32} products marked FP8 in f32 \
                 (reasons in library-plan.txt)"
            );
            let codes = &plan.weight_codes;
            if !codes.quantizations.is_empty() {
                let hoisted = match codes.hoisted.len() {
                    0 => String::new(),
                    n => format!(" after {n} kernels computing from the weights alone"),
                };
                println!(
                    "weight codes: {} FP8 quantisations of weights ({:.1} MB){hoisted}, made \
                     once per weights version",
                    codes.quantizations.len(),
                    codes.bytes as f64 / 1e6,
                );
            }
            let roundings = plan.roundings(program);
            println!(
                "temporaries on {arch}: {} bytes; E4M3 roundings: {} launched over {} elements, \
                 {} kept as codes over {} elements (saved FP8 activations), {} skipped (their \
                 sources quantised where read)",
                plan.memory_plan(program).peak_bytes(),
                roundings.launched,
                with_prefix(roundings.elements, ""),
                roundings.kept_as_codes,
                with_prefix(roundings.kept_elements, ""),
                roundings.skipped
            );
            let (products, elements, bytes) = plan.products_not_stored(program);
            println!(
                "products never stored on {arch}: {products} loop nests ({} elements, {} of \
                 the loop nests' traffic), their factors multiplied by the FP8 quantisations \
                 reading them",
                with_prefix(elements, ""),
                with_prefix(bytes, "B")
            );
            let steps: Vec<_> = plan.steps().map(|(_, step)| step).collect();
            for kernel in plan.kernels() {
                let source = kernel.instantiate()?;
                let file = dir.join(format!("{}.cu", source.entry));
                std::fs::write(&file, &source.source)
                    .with_context(|| format!("writing {}", file.display()))?;
                let launches = steps.iter().filter(|s| s.kernel == kernel).count();
                templates.push((source, launches));
            }
            plan.table()
        }
        Err(refused) => {
            println!("the program cannot run on {arch}: {refused}");
            format!("{refused}\n")
        }
    };
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(templates)
}

/// Says what the optimizer kept on the GPU moves per step (`cuda::device_optimizer`, a
/// whole-graph run; BF16 moments, the recipe's) and writes its kernels as `<entry>.cu`,
/// returned with their launches per step (the clipping's when it clips).
fn describe_device_optimizer(
    program: &fathom_compiler::kernel::Program,
    gradients: &[(String, String)],
    dir: &Path,
) -> anyhow::Result<Vec<Unit>> {
    let pairs = gradients.iter().map(|(p, g)| (p.as_str(), g.as_str()));
    let plan = OptimizerPlan::of(program, pairs, MomentPrecision::Bf16)
        .map_err(|why| anyhow::anyhow!("the optimizer cannot stay on the GPU: {why}"))?;
    let values: usize = plan.params.iter().map(|p| p.elements()).sum();
    // f32 gradients, f32 parameters, and two bf16 moments: four bytes a value each.
    let bytes = with_prefix(4 * values as u64, "B");
    println!(
        "optimizer on the GPU: {} parameters ({} values) updated in place; per step {} of the \
         norm's chunk sums downloaded instead of {bytes} of gradients down and {bytes} of \
         parameters up; {bytes} of BF16 moments beside them",
        plan.params.len(),
        with_prefix(values as u64, ""),
        with_prefix(8 * plan.chunk_count() as u64, "B"),
    );
    let scalars = UpdateScalars::for_step(&AdamWConfig::default(), 1, 0.0);
    let per_step = [plan.square_sums(), plan.clip(1.0), plan.update(&scalars)];
    let launches: Vec<_> = per_step.iter().flatten().map(|l| l.kernel).collect();
    let mut units = Vec::new();
    for kernel in OptimizerPlan::kernels() {
        let count = launches.iter().filter(|k| **k == kernel).count();
        if count == 0 {
            continue;
        }
        let source = kernel.instantiate()?;
        let file = dir.join(format!("{}.cu", source.entry));
        std::fs::write(&file, &source.source)
            .with_context(|| format!("writing {}", file.display()))?;
        units.push((source, count));
    }
    Ok(units)
}

/// One unique source compiled by NVRTC.
struct Built {
    entry: String,
    /// Launches of it in the program.
    users: usize,
    /// Dynamic shared memory per block (the Hopper FP8 GEMM's pipeline ring).
    dynamic_smem: u32,
    resources: ResourceUsage,
    time: Duration,
}

/// Compiles every unit (the unique generated sources, the plan's template instantiations) for
/// `arch`, writes `<entry>.<arch>.cubin`, `.sass` when a disassembler is found, and
/// `resources.txt`; fails naming every source that did not compile.
fn compile_cuda(units: &[Unit], arch: &str, dir: &Path) -> anyhow::Result<()> {
    // The project's pip folders (`scripts/test.sh` installs NVRTC there), from the current
    // directory and from the source tree this binary was built in.
    let pip_dirs = project_pip_dirs();
    let nvrtc = Nvrtc::load(NvrtcInstall::find(&pip_dirs)?)?;
    let disassembler = find_cuda_tool("cuobjdump", &pip_dirs)
        .map(|tool| (tool, vec!["-sass"]))
        .or_else(|| find_cuda_tool("nvdisasm", &pip_dirs).map(|tool| (tool, Vec::new())));
    let overrides = KernelOverrides::from_env();
    let started = Instant::now();
    let results: Vec<anyhow::Result<Built>> = units
        .par_iter()
        .map(|(generated, users)| {
            let entry = &generated.entry;
            let edit = match &overrides {
                Some(overrides) => overrides.apply(generated)?,
                None => None,
            };
            if let Some(edit) = &edit {
                let path = edit.path.display();
                println!("{}: compiled from the hand-edited {path}", entry);
            }
            let hand_edited = edit.is_some();
            let kernel = edit.as_ref().map_or(generated, |edit| &edit.kernel);
            let t = Instant::now();
            let compiled = nvrtc.compile(kernel, Some(arch))?;
            let time = t.elapsed();
            let cubin = dir.join(format!("{}.{arch}.cubin", entry));
            std::fs::write(&cubin, &compiled.cubin)
                .with_context(|| format!("writing {}", cubin.display()))?;
            if let Some((tool, flags)) = &disassembler {
                let output = std::process::Command::new(tool)
                    .args(flags)
                    .arg(&cubin)
                    .output();
                match output {
                    Ok(out) if out.status.success() => {
                        let sass = dir.join(format!("{}.{arch}.sass", entry));
                        std::fs::write(&sass, &out.stdout)
                            .with_context(|| format!("writing {}", sass.display()))?;
                    }
                    Ok(out) => bail!(
                        "{} failed on {}: {}",
                        tool.display(),
                        cubin.display(),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                    Err(e) => bail!("cannot run {}: {e}", tool.display()),
                }
            }
            Ok(Built {
                entry: if hand_edited {
                    format!("{} (edited)", entry)
                } else {
                    entry.clone()
                },
                dynamic_smem: generated.dynamic_smem_bytes,
                users: *users,
                resources: compiled.resources.unwrap_or_default(),
                time,
            })
        })
        .collect();
    let wall = started.elapsed();
    let mut failures = Vec::new();
    let mut built = Vec::new();
    for result in results {
        match result {
            Ok(b) => built.push(b),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let mut table = format!(
        "{:<50} {:>8} {:>5} {:>6} {:>7} {:>6} {:>7} {:>7} {:>7}\n",
        "entry", "launches", "regs", "smem", "dynsmem", "stack", "spill_st", "spill_ld", "ms"
    );
    for b in &built {
        let r = b.resources;
        let _ = writeln!(
            table,
            "{:<50} {:>8} {:>5} {:>6} {:>7} {:>6} {:>7} {:>7} {:>7.0}",
            b.entry,
            b.users,
            r.registers,
            r.static_smem_bytes,
            b.dynamic_smem,
            r.stack_frame_bytes,
            r.spill_store_bytes,
            r.spill_load_bytes,
            b.time.as_secs_f64() * 1e3
        );
    }
    let path = dir.join("resources.txt");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    let spills: u32 = built
        .iter()
        .map(|b| b.resources.spill_store_bytes + b.resources.spill_load_bytes)
        .sum();
    println!(
        "NVRTC {:?}, {arch}: {} of {} sources compiled in {:.1} s; registers max {}, spills {spills} B; \
         CUBIN{} and resources.txt in {}",
        nvrtc.version(),
        built.len(),
        units.len(),
        wall.as_secs_f64(),
        built
            .iter()
            .map(|b| b.resources.registers)
            .max()
            .unwrap_or(0),
        if disassembler.is_some() { ", SASS" } else { "" },
        dir.display()
    );
    if !failures.is_empty() {
        bail!(
            "{} source(s) did not compile:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}

fn spec_of(args: &Args) -> anyhow::Result<ModelSpec> {
    let config = match (&args.model, &args.config, &args.architecture) {
        (Some(dir), None, None) => dir.join("config.json"),
        (None, Some(file), None) => file.clone(),
        (None, None, Some(name)) => {
            return fathom::zoo::architecture(name).with_context(|| {
                format!(
                    "unknown architecture `{name}`; built-in: {}",
                    fathom::zoo::NAMES.join(", ")
                )
            });
        }
        _ => bail!("give the model as --model DIR, --config FILE or --architecture NAME"),
    };
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    spec_from_config_json(&text).with_context(|| config.display().to_string())
}
