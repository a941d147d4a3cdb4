//! Running a graph: through the reference interpreter, compiled for the CPU, or compiled for a
//! CUDA GPU (falling back to the CPU, with one line saying why, where there is none).

use std::collections::BTreeMap;

use fathom_compiler::Graph;
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::graph::QuantFormat;
use fathom_compiler::kernel::{KernelBody, Library};
use fathom_compiler::lower::LowerError;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cpu::{CpuError, CpuProgram};
use crate::cuda::{
    CudaError, GpuDevice, GpuExecutor, GpuOptions, KernelCache, NoGpu, SumOwner, fallback_line,
};
use crate::interp::{Feeds, InterpError, evaluate};
use crate::optim::{Grads, accumulate_owned};
use crate::tensor::{Data, HostTensor};

/// Where a graph runs. The two agree within rounding (the interpreter sums in f64, the
/// compiled path in f32), so a run must keep one backend to stay bit-reproducible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Lowered to kernels and run by the CPU backend (the fast path).
    #[default]
    Cpu,
    /// The reference interpreter (the oracle; slow).
    Interpreter,
    /// Lowered to kernels, generated as CUDA C++, compiled by NVRTC and run on the process's GPU
    /// ([`device_ordinal_from_vars`]: `LOCAL_RANK` under a launcher, else 0). Without a CUDA
    /// driver or that GPU, the CPU backend runs instead (said once, on stderr).
    Cuda,
}

#[derive(Debug, Error)]
pub enum ExecError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("summing outputs over runs: {0}")]
    Sum(String),
}

/// A graph prepared for one backend.
#[derive(Debug)]
pub enum Executable {
    Interpreter(Graph),
    Cpu(Box<CpuProgram>),
    Cuda(Box<GpuExecutor>),
}

impl Executable {
    /// Prepares `graph` for `backend` with the compile options of the environment
    /// (`FATHOM_DUMP_DIR`, `FATHOM_RECOMPUTE`).
    pub fn new(graph: Graph, backend: Backend) -> Result<Self, ExecError> {
        Self::with_options(graph, backend, &CompileOptions::from_env())
    }

    /// Prepares `graph` for `backend` with the given compile options.
    pub fn with_options(
        graph: Graph,
        backend: Backend,
        options: &CompileOptions,
    ) -> Result<Self, ExecError> {
        Ok(match backend {
            Backend::Interpreter => Executable::Interpreter(graph),
            // The full pipeline (passes, lowering, memory plan); `FATHOM_DUMP_DIR` dumps it.
            Backend::Cpu => {
                let options = CompileOptions {
                    lower: crate::cpu::lower_options(),
                    ..options.clone()
                };
                let compiled = compile(&graph, &options)?;
                Executable::Cpu(Box::new(CpuProgram::new(compiled.program)))
            }
            Backend::Cuda => {
                let ordinal = device_ordinal_from_vars(|name| std::env::var(name).ok())
                    .map_err(|e| CudaError::Launch(format!("choosing the GPU: {e}")))?;
                match GpuDevice::probe(ordinal) {
                    Ok(device) => {
                        let options = CompileOptions {
                            lower: crate::cuda::lower_options(),
                            ..options.clone()
                        };
                        let compiled = compile(&graph, &options)?;
                        let nvrtc =
                            fathom_kernels::nvrtc::Nvrtc::locate().map_err(CudaError::from)?;
                        let cache = KernelCache::from_env(nvrtc).map_err(CudaError::from)?;
                        let executor = GpuExecutor::new(
                            &device,
                            &cache,
                            compiled.program,
                            GpuOptions::default(),
                        )?;
                        announce_fp8_products(&executor);
                        Executable::Cuda(Box::new(executor))
                    }
                    Err(reason) => {
                        announce_cpu_fallback(&reason);
                        return Self::with_options(graph, Backend::Cpu, options);
                    }
                }
            }
        })
    }

    /// The backend that actually runs (`Cpu` for a `Cuda` request that fell back).
    pub fn backend(&self) -> Backend {
        match self {
            Executable::Interpreter(_) => Backend::Interpreter,
            Executable::Cpu(_) => Backend::Cpu,
            Executable::Cuda(_) => Backend::Cuda,
        }
    }

    /// Gives the storage of an output the caller is done with back to the backend, which
    /// reuses it for its temporaries (the CPU backend; the interpreter drops it).
    pub fn recycle(&self, storage: Vec<f32>) {
        if let Executable::Cpu(program) = self {
            program.recycle(storage);
        }
    }

    /// The graph's outputs by name.
    pub fn run(&self, feeds: &Feeds<'_>) -> Result<BTreeMap<String, HostTensor>, ExecError> {
        Ok(match self {
            Executable::Interpreter(graph) => evaluate(graph, feeds)?.into_iter().collect(),
            Executable::Cpu(program) => program.run(feeds)?.into_iter().collect(),
            Executable::Cuda(executor) => executor.run(feeds)?.outputs.into_iter().collect(),
        })
    }
}

impl Executable {
    /// Runs the graph on `feeds` as one micro-batch of several: the float outputs `summed`
    /// names are added, times `scale`, into `into` under their names (f32 arithmetic as
    /// [`accumulate_owned`]: `scale · x` for a name `into` lacks, else `sum + scale · x`), and
    /// the other outputs are returned. A CUDA executable keeps the sums in device memory, to the
    /// same bits, and adds them to `into` in [`Executable::finish_sums`] (one download per
    /// output instead of one per micro-batch); call it after the last micro-batch. Callers
    /// sharing the executable (the ranks running one pipeline stage) each sum as their own
    /// `owner`.
    pub fn run_summing(
        &self,
        feeds: &Feeds<'_>,
        summed: &[String],
        scale: f32,
        owner: SumOwner,
        into: &mut Grads,
    ) -> Result<BTreeMap<String, HostTensor>, ExecError> {
        if let Executable::Cuda(executor) = self {
            let run = executor.run_summing(feeds, summed, scale, owner)?;
            return Ok(run.outputs.into_iter().collect());
        }
        let mut outputs = self.run(feeds)?;
        let mut parts = Grads::new();
        for name in summed {
            match outputs.remove(name).map(|t| t.data) {
                Some(Data::Float(values)) => {
                    parts.insert(name.clone(), values);
                }
                _ => return Err(ExecError::Sum(format!("no float output `{name}`"))),
            }
        }
        accumulate_owned(into, parts, scale).map_err(|e| ExecError::Sum(e.to_string()))?;
        Ok(outputs)
    }

    /// Adds `owner`'s sums a CUDA executable kept in device memory since the last call into
    /// `into` (nothing on the other backends, whose sums are in `into` already).
    pub fn finish_sums(&self, owner: SumOwner, into: &mut Grads) -> Result<(), ExecError> {
        let Executable::Cuda(executor) = self else {
            return Ok(());
        };
        let sums: Grads = executor.take_sums(owner)?.into_iter().collect();
        accumulate_owned(into, sums, 1.0).map_err(|e| ExecError::Sum(e.to_string()))
    }
}

/// The GPU a process runs on: its rank on the node (`LOCAL_RANK`, or a launcher's equivalent,
/// as NCCL uses it), so that the ranks a launcher starts on one node each take their own; 0
/// without a launcher.
pub fn device_ordinal_from_vars(get: impl Fn(&str) -> Option<String>) -> Result<usize, String> {
    Ok(crate::parallel::local_rank_from_vars(get)?.unwrap_or(0))
}

/// Says, for a program with FP8 products, how many run as FP8 GEMMs and how many in f32 (the
/// plan that `fathom inspect --target` writes says why); and for a program that rounds operands
/// to E4M3 with exact accumulation, that its products run as f32 GEMMs and how to change that.
fn announce_fp8_products(executor: &GpuExecutor) {
    let (fp8, in_f32) = executor.library().fp8_summary();
    let name = &executor.program().name;
    if fp8 + in_f32 > 0 {
        eprintln!(
            "fathom: {name}: {fp8} products run as FP8 GEMMs on {}, {in_f32} as f32 GEMMs \
             (`fathom inspect --target` writes why, in library-plan.txt)",
            executor.kernels().arch
        );
    } else if rounds_to_e4m3(executor.program()) {
        eprintln!(
            "fathom: {name}: the FP8-rounded products run as f32 GEMMs (accumulation `exact`); \
             `accumulation = \"hopper\"` runs them as FP8 GEMMs"
        );
    }
}

/// Whether the program rounds values to E4M3 (the precision pass's FP8 operands).
fn rounds_to_e4m3(program: &fathom_compiler::kernel::Program) -> bool {
    program.kernels.iter().any(|k| {
        matches!(
            k.body,
            KernelBody::Library(Library::QuantizeDequantize {
                format: QuantFormat::E4M3,
                ..
            })
        )
    })
}

/// Says once per process that the CPU runs what was asked of the GPU, and why.
fn announce_cpu_fallback(reason: &NoGpu) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("{}", fallback_line(reason)));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::*;
    use crate::cuda::driver_present;

    #[test]
    fn a_program_that_rounds_to_e4m3_is_told_apart() {
        use fathom_compiler::{DType, GraphBuilder, TensorType};
        let program = |fp8: bool| {
            let mut b = GraphBuilder::new("p");
            let x = b
                .input("x", TensorType::new(DType::F32, vec![4, 8]))
                .unwrap();
            let y = if fp8 {
                b.quantize_dequantize(x, QuantFormat::E4M3, (1, 128), false)
                    .unwrap()
            } else {
                b.exp(x).unwrap()
            };
            b.output("y", y).unwrap();
            compile(&b.finish(), &CompileOptions::default())
                .unwrap()
                .program
        };
        assert!(rounds_to_e4m3(&program(true)));
        assert!(!rounds_to_e4m3(&program(false)));
    }

    #[test]
    fn each_rank_on_a_node_takes_its_own_gpu() {
        let vars = |pairs: &[(&str, &str)]| {
            let set: HashMap<String, String> = pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            move |name: &str| set.get(name).cloned()
        };
        assert_eq!(device_ordinal_from_vars(vars(&[])), Ok(0));
        assert_eq!(
            device_ordinal_from_vars(vars(&[("LOCAL_RANK", "3")])),
            Ok(3)
        );
        assert_eq!(
            device_ordinal_from_vars(vars(&[("SLURM_LOCALID", "1")])),
            Ok(1)
        );
        let error = device_ordinal_from_vars(vars(&[("LOCAL_RANK", "two")])).unwrap_err();
        assert!(error.contains("LOCAL_RANK"), "{error}");
    }

    #[test]
    fn the_cuda_backend_falls_back_to_the_cpu_without_a_driver() {
        if driver_present() {
            eprintln!("skipped: a CUDA driver is present, so there is no fallback to check");
            return;
        }
        let spec = fathom_compiler::spec::examples::micro();
        let options = fathom_compiler::model::ForwardOptions {
            batch: 1,
            seq: 3,
            with_mtp: false,
        };
        let graph = fathom_compiler::model::forward_graph(&spec, options).unwrap();
        let cuda = Executable::new(graph.clone(), Backend::Cuda).unwrap();
        assert_eq!(cuda.backend(), Backend::Cpu);
        let cpu = Executable::new(graph.clone(), Backend::Cpu).unwrap();
        let weights = crate::init::init_parameters(&graph, 0.02, 7);
        let ids = HostTensor::i64([1, 3], vec![1, 2, 3]);
        let inputs = HashMap::from([("input_ids", ids)]);
        let feeds = Feeds::new(&inputs, &weights);
        let (a, b) = (cuda.run(&feeds).unwrap(), cpu.run(&feeds).unwrap());
        assert!(!a.is_empty());
        assert_eq!(a, b, "the fallback is the CPU backend, bit for bit");
    }

    #[test]
    fn summing_runs_adds_the_named_outputs_as_the_optimizer_accumulates() {
        use fathom_compiler::{DType, GraphBuilder, TensorType};
        let mut b = GraphBuilder::new("p");
        let x = b.input("x", TensorType::new(DType::F32, vec![3])).unwrap();
        let y = b.exp(x).unwrap();
        b.output("y", y).unwrap();
        b.output("x_again", x).unwrap();
        let graph = b.finish();
        for backend in [Backend::Cpu, Backend::Interpreter] {
            let executable = Executable::new(graph.clone(), backend).unwrap();
            let mut sums = Grads::new();
            let mut expected = vec![0f32; 3];
            for (run, values) in [[0.1f32, -1.0, 2.0], [0.5, 0.25, -3.0]].iter().enumerate() {
                let inputs = HashMap::from([("x", HostTensor::f32([3], values.to_vec()))]);
                let feeds = Feeds::new(&inputs, &());
                let summed = ["y".to_owned()];
                let outputs = executable
                    .run_summing(&feeds, &summed, 0.5, 0, &mut sums)
                    .unwrap();
                assert!(
                    !outputs.contains_key("y"),
                    "a summed output is not returned"
                );
                assert!(outputs.contains_key("x_again"));
                let y = executable.run(&feeds).unwrap()["y"].clone();
                let Data::Float(y) = y.data else { panic!() };
                for (e, v) in expected.iter_mut().zip(y) {
                    *e = if run == 0 { 0.5 * v } else { *e + 0.5 * v };
                }
            }
            executable.finish_sums(0, &mut sums).unwrap();
            assert_eq!(sums["y"], expected, "{backend:?}");
            let inputs = HashMap::from([("x", HostTensor::f32([3], vec![0.0; 3]))]);
            let error = executable
                .run_summing(
                    &Feeds::new(&inputs, &()),
                    &["z".to_owned()],
                    1.0,
                    0,
                    &mut sums,
                )
                .unwrap_err();
            assert!(error.to_string().contains("no float output `z`"), "{error}");
        }
    }

    #[test]
    fn the_backend_setting_accepts_cuda() {
        let backend: Backend = serde_json::from_str("\"cuda\"").unwrap();
        assert_eq!(backend, Backend::Cuda);
    }
}
