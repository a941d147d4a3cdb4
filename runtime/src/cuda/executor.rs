//! Running a compiled [`Program`] on a GPU.
//!
//! [`GpuKernels`] compiles (through the cache) and loads every distinct generated source of a
//! program; [`GpuKernels::run_isolated`] runs one kernel on given host buffers, which is how the
//! GPU check compares each kernel with the CPU. [`GpuExecutor`] runs the whole program: device
//! buffers per the memory plan (one allocation per slot of temporaries, one per input, parameter
//! and constant; all kept for the executor's life so a captured CUDA graph stays valid), inputs
//! uploaded, the launches queued in order on one stream (optionally captured once into a CUDA
//! graph and replayed), timed with events, the outputs downloaded.
//!
//! Buffers hold f32 values as on the CPU backend (integers and bools by value). Library calls
//! run as the hand-written templates only where one exists for the operands the program has; the
//! programs of today keep every operand in f32 (the FP8 templates need E4M3 operands and
//! scales), so a program with library calls is refused up front with the list of calls, rather
//! than run partly or approximately.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaGraph, CudaStream, sys};
use fathom_compiler::codegen::{Access, CudaKernel, CudaLaunch, CudaProgram, cuda_program};
use fathom_compiler::kernel::{BufferId, BufferRole, MemoryPlan, Program};

use super::CudaError;
use super::alloc::{AllocStats, Block, CachingAllocator};
use super::cache::KernelCache;
use super::device::{GpuDevice, compile_target};
use super::memory::{DriverMemory, download, stream_id, timing_event, upload};
use super::modules::{generated_source, launch_generated, load_kernel};
use crate::cpu::{initial_contents, to_host};
use crate::interp::Feeds;
use crate::tensor::HostTensor;

/// The generated kernels of a program, loaded on a device.
#[derive(Debug)]
pub struct GpuKernels {
    /// The NVRTC target (`sm_90a` on Hopper).
    pub arch: String,
    functions: HashMap<String, CudaFunction>,
    /// Sources found in the cache (not compiled), of all.
    pub cache_hits: usize,
}

impl GpuKernels {
    /// Compiles and loads every distinct source of `cuda`.
    pub fn load(
        device: &GpuDevice,
        cache: &KernelCache,
        cuda: &CudaProgram,
    ) -> Result<Self, CudaError> {
        let supported = cache.nvrtc().supported_archs()?;
        let arch = compile_target(device.compute_capability, &supported).ok_or(
            CudaError::NoCompileTarget {
                major: device.compute_capability.0,
                minor: device.compute_capability.1,
                supported,
            },
        )?;
        let mut functions = HashMap::new();
        let mut cache_hits = 0;
        for source in &cuda.sources {
            let block = cuda
                .users_of(&source.entry)
                .next()
                .map_or(0, |k| k.launch.block);
            let loaded = load_kernel(&device.ctx, cache, &generated_source(source, block), &arch)?;
            cache_hits += usize::from(loaded.cached.hit);
            functions.insert(source.entry.clone(), loaded.function);
        }
        Ok(GpuKernels {
            arch,
            functions,
            cache_hits,
        })
    }

    pub fn function(&self, entry: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(entry)
            .ok_or_else(|| CudaError::Launch(format!("no loaded kernel `{entry}`")))
    }

    /// Runs `kernel` alone on `stream` with its buffers taken from `host` (indexed by buffer,
    /// f32 values), and returns the buffers it writes. Device memory comes from `allocator` and
    /// goes back to it.
    pub fn run_isolated(
        &self,
        stream: &CudaStream,
        allocator: &mut CachingAllocator<DriverMemory>,
        kernel: &CudaKernel,
        host: &[&[f32]],
    ) -> Result<Vec<(BufferId, Vec<f32>)>, CudaError> {
        let function = self.function(kernel.entry())?;
        let mut blocks: Vec<(BufferId, Block)> = Vec::new();
        let result = (|| {
            for arg in &kernel.args {
                if blocks.iter().any(|(b, _)| *b == arg.buffer) {
                    continue;
                }
                let values = host.get(arg.buffer.index()).ok_or_else(|| {
                    CudaError::Launch(format!("no host values for {}", arg.buffer))
                })?;
                let block = allocator.alloc(4 * values.len().max(1), stream_id(stream))?;
                let ptr = block.ptr;
                blocks.push((arg.buffer, block));
                upload(stream, ptr, values).map_err(|e| CudaError::driver("upload".into(), e))?;
            }
            let base = |b: BufferId| {
                blocks
                    .iter()
                    .find(|(id, _)| *id == b)
                    .map_or(0, |(_, block)| block.ptr)
            };
            launch_generated(stream, function, kernel, base)?;
            let mut written = Vec::new();
            for arg in kernel.args.iter().filter(|a| a.access != Access::Read) {
                if written.iter().any(|(b, _)| *b == arg.buffer) {
                    continue;
                }
                let mut values = vec![0f32; host[arg.buffer.index()].len()];
                download(stream, base(arg.buffer), &mut values)
                    .map_err(|e| CudaError::driver(format!("running {}", kernel.name), e))?;
                written.push((arg.buffer, values));
            }
            Ok(written)
        })();
        for (_, block) in blocks {
            allocator.free(block)?;
        }
        result
    }
}

/// Options of a [`GpuExecutor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// Capture the launches into a CUDA graph on the first run and replay it afterwards.
    pub cuda_graph: bool,
}

/// A program's results on the GPU.
#[derive(Debug)]
pub struct GpuRun {
    pub outputs: Vec<(String, HostTensor)>,
    /// Time of the launches (or the graph replay) between two events, in milliseconds.
    pub kernels_ms: f32,
}

/// A program ready to run on one GPU.
pub struct GpuExecutor {
    program: Program,
    cuda: CudaProgram,
    kernels: GpuKernels,
    stream: Arc<CudaStream>,
    allocator: CachingAllocator<DriverMemory>,
    /// Device blocks: one per slot of temporaries, one per other buffer the program uses.
    blocks: Vec<Block>,
    /// Device address of every buffer's first element (0 for unused buffers).
    address: Vec<u64>,
    options: GpuOptions,
    graph: Mutex<Option<CapturedGraph>>,
}

/// A captured CUDA graph that may move between threads with its executor.
struct CapturedGraph(CudaGraph);

// SAFETY: a CUDA graph and its executable instance are driver objects, usable from any thread
// while their context is current; cudarc binds the stream's context before a launch, and the
// executor's Mutex lets one thread at a time launch or drop it. (cudarc leaves CudaGraph !Send
// only because it holds raw handles.)
unsafe impl Send for CapturedGraph {}

impl std::fmt::Debug for GpuExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuExecutor")
            .field("program", &self.program.name)
            .field("arch", &self.kernels.arch)
            .field("options", &self.options)
            .field("memory", &self.allocator.stats())
            .finish_non_exhaustive()
    }
}

impl GpuExecutor {
    /// Prepares `program`: checks that every step can run on the GPU, compiles and loads the
    /// kernels, allocates the buffers and uploads the constants.
    pub fn new(
        device: &GpuDevice,
        cache: &KernelCache,
        program: Program,
        options: GpuOptions,
    ) -> Result<Self, CudaError> {
        let cuda = cuda_program(&program)?;
        check_library_calls(&cuda)?;
        let kernels = GpuKernels::load(device, cache, &cuda)?;
        let stream = device
            .ctx
            .new_stream()
            .map_err(|e| CudaError::driver("creating a stream".into(), e))?;
        let plan = MemoryPlan::of(&program);
        let mut allocator = CachingAllocator::new(DriverMemory::new(Arc::clone(&device.ctx)));
        let mut blocks = Vec::new();
        let mut slot_address = Vec::new();
        for &elements in &plan.slot_elements {
            let block = allocator.alloc(4 * elements.max(1), stream_id(&stream))?;
            slot_address.push(block.ptr);
            blocks.push(block);
        }
        let mut address = vec![0u64; program.buffers.len()];
        for (index, buffer) in program.buffers.iter().enumerate() {
            address[index] = match (&buffer.role, plan.slot_of[index]) {
                (BufferRole::Temporary, Some(slot)) => slot_address[slot],
                // A temporary no kernel touches: nothing to hold.
                (BufferRole::Temporary, None) => 0,
                (role, _) => {
                    let block =
                        allocator.alloc(4 * buffer.ty.numel().max(1), stream_id(&stream))?;
                    let ptr = block.ptr;
                    blocks.push(block);
                    if let BufferRole::Constant(_) = role {
                        let values = initial_contents(&buffer.ty, role, &Feeds::new(&(), &()))?;
                        upload(&stream, ptr, &values)
                            .map_err(|e| CudaError::driver("uploading a constant".into(), e))?;
                    }
                    ptr
                }
            };
        }
        Ok(GpuExecutor {
            program,
            cuda,
            kernels,
            stream,
            allocator,
            blocks,
            address,
            options,
            graph: Mutex::new(None),
        })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn kernels(&self) -> &GpuKernels {
        &self.kernels
    }

    pub fn memory(&self) -> AllocStats {
        self.allocator.stats()
    }

    /// Runs the program on `feeds` and returns its outputs.
    pub fn run(&self, feeds: &Feeds<'_>) -> Result<GpuRun, CudaError> {
        for (index, buffer) in self.program.buffers.iter().enumerate() {
            if matches!(buffer.role, BufferRole::Input(_) | BufferRole::Parameter(_)) {
                let values = initial_contents(&buffer.ty, &buffer.role, feeds)?;
                upload(&self.stream, self.address[index], &values)
                    .map_err(|e| CudaError::driver("uploading an input".into(), e))?;
            }
        }
        let ctx = self.stream.context();
        let driver = |what: &str| {
            let what = what.to_owned();
            move |e| CudaError::driver(what, e)
        };
        let start = timing_event(ctx).map_err(driver("creating an event"))?;
        let end = timing_event(ctx).map_err(driver("creating an event"))?;
        start
            .record(&self.stream)
            .map_err(driver("recording an event"))?;
        if self.options.cuda_graph {
            let mut graph = self
                .graph
                .lock()
                .map_err(|_| CudaError::Launch("the CUDA graph lock is poisoned".into()))?;
            if graph.is_none() {
                *graph = Some(CapturedGraph(self.capture()?));
            }
            if let Some(graph) = graph.as_ref() {
                graph
                    .0
                    .launch()
                    .map_err(driver("launching the CUDA graph"))?;
            }
        } else {
            self.launch_all()?;
        }
        end.record(&self.stream)
            .map_err(driver("recording an event"))?;
        self.stream
            .synchronize()
            .map_err(driver("running the program (a kernel failed)"))?;
        let kernels_ms = start
            .elapsed_ms(&end)
            .map_err(driver("reading the timer"))?;
        let mut outputs = Vec::with_capacity(self.program.outputs.len());
        for (name, id) in &self.program.outputs {
            let ty = &self.program.buffer(*id).ty;
            let mut values = vec![0f32; ty.numel()];
            download(&self.stream, self.address[id.index()], &mut values)
                .map_err(driver("downloading an output"))?;
            outputs.push((name.clone(), to_host(ty, &values)));
        }
        Ok(GpuRun {
            outputs,
            kernels_ms,
        })
    }

    /// Queues every launch of the program, in order.
    fn launch_all(&self) -> Result<(), CudaError> {
        for launch in &self.cuda.launches {
            match launch {
                CudaLaunch::Generated(index) => {
                    let kernel = &self.cuda.kernels[*index];
                    let function = self.kernels.function(kernel.entry())?;
                    launch_generated(&self.stream, function, kernel, |b| self.address[b.index()])?;
                }
                // `new` refused programs with library calls; keep the refusal if that changes.
                CudaLaunch::Template(call) => {
                    return Err(CudaError::Launch(format!(
                        "{}: library call `{}` has no GPU implementation",
                        call.name, call.template
                    )));
                }
            }
        }
        Ok(())
    }

    /// Records the launches into a CUDA graph (buffers never move, so it can be replayed).
    fn capture(&self) -> Result<CudaGraph, CudaError> {
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream
            .begin_capture(mode)
            .map_err(|e| CudaError::driver("starting graph capture".into(), e))?;
        let launched = self.launch_all();
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        launched?;
        graph
            .map_err(|e| CudaError::driver("instantiating the CUDA graph".into(), e))?
            .ok_or_else(|| CudaError::Launch("graph capture recorded nothing".into()))
    }
}

impl Drop for GpuExecutor {
    fn drop(&mut self) {
        // Queued work may still use the buffers: wait, then give everything back.
        let _ = self.stream.synchronize();
        if let Ok(mut graph) = self.graph.lock() {
            graph.take();
        }
        for block in self.blocks.drain(..) {
            let _ = self.allocator.free(block);
        }
        self.allocator.streams_synchronized();
        let _ = self.allocator.empty_cache();
    }
}

/// Refuses a program whose library calls have no GPU implementation, listing them by routine.
pub fn check_library_calls(cuda: &CudaProgram) -> Result<(), CudaError> {
    let mut by_template: Vec<(&str, Option<&str>, usize)> = Vec::new();
    for call in cuda.library_calls() {
        match by_template.iter_mut().find(|(t, _, _)| *t == call.template) {
            Some(entry) => entry.2 += 1,
            None => by_template.push((call.template, call.implemented_by, 1)),
        }
    }
    if by_template.is_empty() {
        return Ok(());
    }
    let count = by_template.iter().map(|(_, _, n)| n).sum();
    let summary = by_template
        .iter()
        .map(|(template, by, n)| match by {
            Some(by) => {
                format!("{template} ×{n} (the template is {by}; this program's operands are f32)")
            }
            None => format!("{template} ×{n} (no GPU template yet)"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(CudaError::UnsupportedLibraryCalls {
        program: cuda.name.clone(),
        count,
        summary,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use fathom_compiler::codegen::sample::coverage_program;
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::training::training_graph;

    use super::*;

    #[test]
    fn loop_nest_programs_are_accepted() {
        let cuda = cuda_program(&coverage_program()).unwrap();
        assert!(!cuda.kernels.is_empty());
        check_library_calls(&cuda).unwrap();
    }

    #[test]
    fn library_calls_without_a_gpu_implementation_are_refused_by_name() {
        let spec = fathom_compiler::spec::examples::micro();
        let graph = training_graph(&spec, 1, 3, LossWeights::deepseek_v3())
            .unwrap()
            .graph;
        let program = compile(&graph, &CompileOptions::default()).unwrap().program;
        let cuda = cuda_program(&program).unwrap();
        let error = check_library_calls(&cuda).unwrap_err();
        let text = error.to_string();
        let CudaError::UnsupportedLibraryCalls { count, .. } = error else {
            panic!("{text}")
        };
        assert_eq!(count, cuda.library_calls().count());
        assert!(text.contains("gemm ×"), "{text}");
        assert!(text.contains("operands are f32"), "{text}");
        assert!(text.contains("(no GPU template yet)"), "{text}");
    }
}
