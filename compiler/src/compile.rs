//! The compilation pipeline: graph passes, lowering to kernels, the memory plan, and what a
//! person inspects of each step.
//!
//! Set `FATHOM_DUMP_DIR` (read by the runtime and the CLI, passed here as
//! [`CompileOptions::dump_dir`]) to get every artifact as a file, like Triton's dump dir: one
//! directory per compiled program, named after it (a training run compiles the step and may
//! compile a forward pass too; neither overwrites the other's).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::graph::Graph;
use crate::kernel::{MemoryPlan, Program};
use crate::lower::{AttentionCalls, LowerError, LowerOptions, lower_with};
use crate::passes::{
    RecomputePolicy, common_subexpressions, dead_code, expand_attention, fold_constants, recompute,
};

#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Write every artifact of the compilation into `<dir>/<program name>/`.
    pub dump_dir: Option<PathBuf>,
    /// Which forward values a training graph recomputes in backward (DeepSeek-V3's by
    /// default; no effect on a forward-only graph).
    pub recompute: RecomputePolicy,
    /// Kernel forms beyond those every backend runs (`LowerOptions::cpu()` for a program
    /// the CPU backend runs; the default for any backend, CUDA included).
    pub lower: LowerOptions,
}

impl CompileOptions {
    /// Options from the environment: `FATHOM_DUMP_DIR`, and `FATHOM_RECOMPUTE` (`none` or
    /// `deepseek_v3`; an unknown value is reported and the default kept).
    pub fn from_env() -> Self {
        let recompute = match std::env::var("FATHOM_RECOMPUTE") {
            Ok(value) => value.parse().unwrap_or_else(|e| {
                eprintln!("warning: FATHOM_RECOMPUTE: {e}");
                RecomputePolicy::default()
            }),
            Err(_) => RecomputePolicy::default(),
        };
        CompileOptions {
            dump_dir: std::env::var_os("FATHOM_DUMP_DIR").map(PathBuf::from),
            recompute,
            lower: LowerOptions::default(),
        }
    }

    /// These options for a program the CPU backend runs (the runtime's `cpu::lower_options`
    /// adds what depends on the CPU).
    pub fn for_cpu(self) -> Self {
        CompileOptions {
            lower: LowerOptions::cpu(),
            ..self
        }
    }
}

/// A compiled graph with everything that was learned on the way.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub program: Program,
    pub plan: MemoryPlan,
    /// The graph after each pass, in order (`input`, `expand_attention`, `dead_code`,
    /// `common_subexpressions`, `fold_constants`, `recompute`); the last is the one lowered.
    pub graphs: Vec<(&'static str, Graph)>,
    /// Time of each phase.
    pub timings: Vec<(&'static str, Duration)>,
}

pub fn compile(graph: &Graph, options: &CompileOptions) -> Result<Compiled, LowerError> {
    let mut timings = Vec::new();
    let mut graphs = vec![("input", graph.clone())];
    let mut timed = |name: &'static str, started: Instant| timings.push((name, started.elapsed()));

    let t = Instant::now();
    // Attention the target runs as one call stays whole (`LowerOptions::attention_calls`).
    let expanded = expand_attention(graph, |graph, node| {
        AttentionCalls::keep(&options.lower, graph, node)
    })?
    .into_owned();
    timed("expand_attention", t);
    let t = Instant::now();
    let live = dead_code(&expanded);
    timed("dead_code", t);
    graphs.push(("expand_attention", expanded));
    let t = Instant::now();
    let merged = common_subexpressions(&live);
    timed("common_subexpressions", t);
    graphs.push(("dead_code", live));
    let t = Instant::now();
    let folded = fold_constants(&merged);
    timed("fold_constants", t);
    graphs.push(("common_subexpressions", merged));
    let t = Instant::now();
    let recomputed = recompute(&folded, options.recompute);
    timed("recompute", t);
    graphs.push(("fold_constants", folded));
    let t = Instant::now();
    let program = lower_with(&recomputed, options.lower)?;
    timed("lower", t);
    graphs.push(("recompute", recomputed));
    let t = Instant::now();
    let plan = MemoryPlan::of(&program);
    timed("memory_plan", t);

    let compiled = Compiled {
        program,
        plan,
        graphs,
        timings,
    };
    if let Some(dir) = &options.dump_dir {
        let dir = dir.join(&compiled.program.name);
        // A dump is a diagnostic: failing to write one must not fail the compilation.
        if let Err(e) = compiled.write_artifacts(&dir) {
            eprintln!(
                "warning: FATHOM_DUMP_DIR: cannot write to {}: {e}",
                dir.display()
            );
        }
    }
    Ok(compiled)
}

impl Compiled {
    /// File name and text of every artifact: the graph after each pass, the fusion groups,
    /// the kernels, the memory plan, the timings and where the loop nests' traffic goes.
    pub fn artifacts(&self) -> Vec<(String, String)> {
        let mut files = Vec::new();
        for (i, (pass, graph)) in self.graphs.iter().enumerate() {
            files.push((format!("{i:02}-{pass}.graph.txt"), graph.to_string()));
        }
        files.push(("10-fusion-groups.txt".into(), self.fusion_groups()));
        files.push(("11-kernels.txt".into(), self.program.to_string()));
        files.push(("12-memory-plan.txt".into(), self.plan.to_string()));
        let mut timings = String::new();
        for (phase, time) in &self.timings {
            let _ = writeln!(timings, "{phase:<24} {:>10.3} ms", time.as_secs_f64() * 1e3);
        }
        files.push(("13-timings.txt".into(), timings));
        files.push(("14-traffic.txt".into(), self.program.traffic_table()));
        files
    }

    /// Each kernel with the graph nodes it computes and where each came from in the model.
    pub fn fusion_groups(&self) -> String {
        let graph = &self.graphs.last().expect("graphs are recorded").1;
        let mut text = String::new();
        for kernel in &self.program.kernels {
            let _ = writeln!(text, "{} ({} nodes)", kernel.name, kernel.nodes.len());
            for id in &kernel.nodes {
                let node = graph.node(*id);
                let origin = if node.origin.is_empty() {
                    "(top)"
                } else {
                    &node.origin
                };
                let _ = writeln!(text, "  {id} {} {}  [{origin}]", node.ty, node.op);
            }
        }
        text
    }

    pub fn write_artifacts(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, text) in self.artifacts() {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(())
    }
}
