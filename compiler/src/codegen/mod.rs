//! CUDA C++ from the kernel IR: every loop nest becomes one `extern "C" __global__` function in
//! a self-contained translation unit; library calls become calls into the hand-written
//! templates of `fathom-kernels` (described, not generated).
//!
//! The generated text depends only on a kernel's *structure* — its domain, statements, view
//! strides and offsets relative to each buffer's first element used — never on buffer ids,
//! graph nodes or names. Buffers are pointer parameters (`in0`, `out0`, in first-use order) and
//! the launcher adds each one's base offset to the pointer, so the same layer repeated 61 times,
//! or the same copy into 256 expert slots, shares one source, named by its content
//! (`fathom_row_mean_<hash>`). [`CudaProgram::sources`] holds each distinct source once;
//! [`CudaKernel`] says which source a kernel runs, with which buffers, launch, nodes and origin
//! ([`CudaKernel::annotated_source`] puts those in a comment above the shared text).
//!
//! Thread mapping (see `cuda.rs`): a grid-stride loop, one thread per point, for pure
//! elementwise nests; for nests with reductions or per-row stores, a team of threads per row
//! of the innermost axis — a power-of-two slice of a warp for rows of up to 32 elements (several
//! rows per block, shuffle reductions), a block of up to 256 threads otherwise (shuffles, then
//! shared memory). Sums accumulate in f32 in a fixed tree order (the CPU backend sums in f64);
//! max propagates NaN and sigmoid is the stable form, as on the CPU. Launch configurations are
//! computed here, for a 132-SM Hopper part, and cap the grid (the loops stride over the rest).

mod canon;
mod cuda;
mod expr;
mod helpers;
mod library;
pub mod sample;
mod writer;

use std::collections::HashMap;
use std::fmt::{self, Display, Formatter, Write as _};
use std::sync::Arc;

use crate::graph::NodeId;
use crate::kernel::{BufferId, KernelBody, Program};

use canon::Canonical;

/// How a kernel uses a pointer parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// How a generated kernel spreads its loop nest over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// One thread per point of the domain, grid-stride loop.
    Elementwise,
    /// `team` lanes of one warp per row (a power of two up to 32), several rows per block.
    RowsPerTeam { team: u32 },
    /// One block per row.
    RowPerBlock,
}

/// A 1-D launch: `grid` blocks of `block` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaunchConfig {
    pub grid: u32,
    /// Threads per block; the kernel is written for exactly this many (`__launch_bounds__`).
    pub block: u32,
    /// Shared memory the kernel declares (reduction scratch).
    pub static_smem_bytes: u32,
    /// Shared memory to request at launch.
    pub dynamic_smem_bytes: u32,
}

impl Display for LaunchConfig {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "grid {} x block {}, smem {} B",
            self.grid,
            self.block,
            self.static_smem_bytes + self.dynamic_smem_bytes
        )
    }
}

/// One distinct generated translation unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaSource {
    /// The `extern "C"` entry point, named by content: `fathom_<kind>_<hash>`.
    pub entry: String,
    /// The complete `.cu` text (only CUDA's own headers are included, and only when needed).
    pub text: String,
    /// FNV-1a (64-bit) of `text`: the key of a compiled-kernel cache.
    pub hash: u64,
    pub mapping: Mapping,
}

/// A pointer argument of a generated kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelArg {
    /// The parameter's name in the source.
    pub param: String,
    pub buffer: BufferId,
    /// Elements to add to the buffer's device address before passing it.
    pub offset: usize,
    pub access: Access,
}

/// A loop-nest kernel of the program, with the source it runs.
#[derive(Clone, Debug)]
pub struct CudaKernel {
    /// The kernel IR's name (`k12_mul_model_layers_0_input_layernorm`).
    pub name: String,
    /// The graph nodes it computes.
    pub nodes: Vec<NodeId>,
    /// The module path of its main node.
    pub origin: String,
    /// Shared with every structurally identical kernel.
    pub source: Arc<CudaSource>,
    /// One per parameter of the entry point, in order.
    pub args: Vec<KernelArg>,
    pub launch: LaunchConfig,
}

impl CudaKernel {
    pub fn entry(&self) -> &str {
        &self.source.entry
    }

    /// The source with a comment naming this kernel, its graph nodes, origin, arguments and
    /// launch (comments only: it compiles to the same code as [`CudaSource::text`]).
    pub fn annotated_source(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| format!("{} = {} + {}", a.param, a.buffer, a.offset))
            .collect();
        format!(
            "// kernel {} ({}; {})\n// arguments: {}\n// launch: {}\n{}",
            self.name,
            origin_or_top(&self.origin),
            node_summary(&self.nodes),
            args.join(", "),
            self.launch,
            self.source.text
        )
    }
}

/// A library call, run by a hand-written template (see `library.rs` for the mapping).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateCall {
    /// The kernel IR's name.
    pub name: String,
    pub nodes: Vec<NodeId>,
    pub origin: String,
    /// The routine: `gemm`, `grouped_gemm`, `gather`, …
    pub template: &'static str,
    /// The fathom-kernels template that implements it, where one exists.
    pub implemented_by: Option<&'static str>,
    /// Problem parameters and operands, as text (`("m", "4")`, `("a", "b46[0; 24,8,1] of f32[1,3,8]")`).
    pub params: Vec<(&'static str, String)>,
    pub reads: Vec<BufferId>,
    pub writes: Vec<BufferId>,
}

/// One step of the program, in execution order.
#[derive(Clone, Debug)]
pub enum CudaLaunch {
    /// A generated kernel: index into [`CudaProgram::kernels`].
    Generated(usize),
    Template(TemplateCall),
}

/// A program as CUDA: generated kernels, template calls, and the distinct sources.
#[derive(Clone, Debug)]
pub struct CudaProgram {
    pub name: String,
    /// Every kernel of the IR program, in order.
    pub launches: Vec<CudaLaunch>,
    /// The loop-nest kernels, in order.
    pub kernels: Vec<CudaKernel>,
    /// Each distinct source once, in order of first use: what gets compiled.
    pub sources: Vec<Arc<CudaSource>>,
}

/// What cannot be generated (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodegenError {
    /// Threads of the generated kernel would race: the nest reads a buffer it writes through a
    /// different view (the CPU backend runs rows in order; the GPU runs them concurrently).
    #[error("kernel {kernel}: {detail}; such a kernel cannot run its rows in parallel")]
    UnsupportedDependency { kernel: String, detail: String },
}

/// CUDA C++ for every loop nest of `program`, and template calls for its library calls.
pub fn cuda_program(program: &Program) -> Result<CudaProgram, CodegenError> {
    let mut memo: HashMap<String, Arc<CudaSource>> = HashMap::new();
    let mut out = CudaProgram {
        name: program.name.clone(),
        launches: Vec::new(),
        kernels: Vec::new(),
        sources: Vec::new(),
    };
    for kernel in &program.kernels {
        let nest = match &kernel.body {
            KernelBody::Library(call) => {
                let call = library::template_call(program, kernel, call);
                out.launches.push(CudaLaunch::Template(call));
                continue;
            }
            KernelBody::Loop(nest) => nest,
        };
        let canon = Canonical::of(nest);
        let key = canon.key();
        let source = match memo.get(&key) {
            Some(source) => Arc::clone(source),
            None => {
                let barriers = canon.check_dependencies(&kernel.name)?;
                let generated = cuda::generate(&canon, &barriers);
                let source = Arc::new(CudaSource {
                    hash: fnv1a64(generated.text.as_bytes()),
                    entry: generated.entry,
                    text: generated.text,
                    mapping: generated.mapping,
                });
                memo.insert(key, Arc::clone(&source));
                out.sources.push(Arc::clone(&source));
                source
            }
        };
        let launch = cuda::launch_of(&canon);
        let args = canon
            .params
            .iter()
            .map(|p| KernelArg {
                param: p.name.clone(),
                buffer: p.buffer,
                offset: p.base,
                access: p.access,
            })
            .collect();
        out.launches.push(CudaLaunch::Generated(out.kernels.len()));
        out.kernels.push(CudaKernel {
            name: kernel.name.clone(),
            nodes: kernel.nodes.clone(),
            origin: kernel.origin.clone(),
            source,
            args,
            launch,
        });
    }
    Ok(out)
}

impl CudaProgram {
    pub fn library_calls(&self) -> impl Iterator<Item = &TemplateCall> {
        self.launches.iter().filter_map(|l| match l {
            CudaLaunch::Template(call) => Some(call),
            CudaLaunch::Generated(_) => None,
        })
    }

    /// The kernels that run the source with entry point `entry`.
    pub fn users_of<'a>(&'a self, entry: &'a str) -> impl Iterator<Item = &'a CudaKernel> {
        self.kernels.iter().filter(move |k| k.entry() == entry)
    }

    /// A source as a file: a comment listing the kernels that run it (the first 8, then a
    /// count), then the text.
    pub fn source_file(&self, source: &CudaSource) -> String {
        const SHOWN: usize = 8;
        let users: Vec<&CudaKernel> = self.users_of(&source.entry).collect();
        let mut head = format!("// {} runs {} kernel(s):\n", source.entry, users.len());
        for kernel in users.iter().take(SHOWN) {
            let _ = writeln!(
                head,
                "//   {} ({}; {})",
                kernel.name,
                origin_or_top(&kernel.origin),
                node_summary(&kernel.nodes)
            );
        }
        if users.len() > SHOWN {
            let _ = writeln!(head, "//   … and {} more", users.len() - SHOWN);
        }
        format!("{head}{}", source.text)
    }

    /// Every step in order: kernel name, entry point or template, launch, origin and nodes.
    pub fn launch_table(&self) -> String {
        let mut table = format!(
            "{:<5} {:<56} {:<34} {:>6} {:>6} {:>6}  {}\n",
            "#", "kernel", "entry / template", "grid", "block", "smem", "origin; nodes"
        );
        for (i, launch) in self.launches.iter().enumerate() {
            let (name, what, grid, block, smem, origin, nodes) = match launch {
                CudaLaunch::Generated(k) => {
                    let k = &self.kernels[*k];
                    let l = k.launch;
                    (
                        &k.name,
                        k.entry().to_owned(),
                        l.grid.to_string(),
                        l.block.to_string(),
                        (l.static_smem_bytes + l.dynamic_smem_bytes).to_string(),
                        &k.origin,
                        &k.nodes,
                    )
                }
                CudaLaunch::Template(call) => (
                    &call.name,
                    format!("template {}", call.template),
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    &call.origin,
                    &call.nodes,
                ),
            };
            let _ = writeln!(
                table,
                "{i:<5} {name:<56} {what:<34} {grid:>6} {block:>6} {smem:>6}  {}; {}",
                origin_or_top(origin),
                node_summary(nodes)
            );
        }
        table
    }
}

fn origin_or_top(origin: &str) -> &str {
    if origin.is_empty() { "(top)" } else { origin }
}

/// `%76..%82, 6 nodes`, or `%75` for one.
fn node_summary(nodes: &[NodeId]) -> String {
    match (nodes.first(), nodes.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}..{b}, {} nodes", nodes.len()),
        (Some(a), _) => a.to_string(),
        _ => String::new(),
    }
}

/// FNV-1a, 64-bit: a stable content hash (std's hasher may change between Rust releases).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
