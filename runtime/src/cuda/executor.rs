//! Running a compiled [`Program`] on a GPU.
//!
//! [`GpuKernels`] compiles (through the cache) and loads every distinct generated source of a
//! program; [`GpuKernels::run_isolated`] runs one kernel on given host buffers, which is how the
//! GPU check compares each kernel with the CPU. [`GpuExecutor`] runs the whole program: device
//! buffers per the memory plan (one allocation per slot of temporaries, one per input, parameter
//! and constant; all kept for the executor's life so a captured CUDA graph stays valid), inputs
//! uploaded, the launches queued in order on one stream (optionally captured once into a CUDA
//! graph and replayed), timed with events, the outputs downloaded. Parameters fed with a
//! version (`Feeds::parameters_version`, a trainer's micro-batches between two optimizer
//! steps) are uploaded once per version, and the weights' FP8 codes made once after each upload
//! (ahead of the program on its stream, outside the graph; `library_fp8_weight_codes`);
//! outputs summed over micro-batches (the gradients, [`GpuExecutor::run_summing`]) stay in
//! device memory until the step takes them, or until the optimizer the executor keeps
//! ([`GpuExecutor::keep_optimizer`], `super::device_optimizer`) steps from them where they lie:
//! then the trained parameters are the device's own, updated in place and never uploaded again.
//!
//! Buffers hold f32 values as on the CPU backend (integers and bools by value). Library calls
//! run as the templates [`super::library`] plans for them (products marked for Hopper's FP8
//! accumulation as FP8 GEMMs on their quantised operands, the rest as f32 GEMMs); a program
//! with a call that cannot be planned is refused up front, naming the call and why, rather than
//! run partly. An invalid index met by a library kernel fails the run, naming the call, as on
//! the CPU.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::{CudaFunction, CudaGraph, CudaStream, sys};
use fathom_compiler::codegen::{Access, CudaKernel, CudaLaunch, CudaProgram, cuda_program};
use fathom_compiler::kernel::{BufferId, BufferRole, Program};
use fathom_kernels::{AccumulateScaled, KernelSource};

use super::CudaError;
use super::alloc::{AllocStats, Block, CachingAllocator};
use super::cache::KernelCache;
use super::device::{GpuDevice, compile_target};
use super::device_optimizer::OptimizerPlan;
use super::fp8_gemm::encode_tensor_map;
use super::gemm_tuning::TuningPolicy;
use super::gemm_tuning_device::tuned_choices;
use super::library::{LibraryKernel, LibraryPlan, LibraryStep, Place, StepArg};
use super::library_fp8::Fp8Target;
use super::library_fp8_weight_codes::WeightLaunch;
use super::memory::{DriverMemory, download, stream_id, timing_event, upload};
use super::modules::{
    Arg, args_by_name, generated_source, launch, launch_generated, load_compiled,
};
use crate::cpu::{initial_contents, to_host};
use crate::interp::Feeds;
use crate::tensor::HostTensor;

#[path = "executor_optimizer.rs"]
mod optimizer;

pub use optimizer::KeptState;

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
        Self::load_for(device, cache, cuda, compile_arch(device, cache)?)
    }

    /// [`GpuKernels::load`] for `arch`, the device's compile target already found.
    fn load_for(
        device: &GpuDevice,
        cache: &KernelCache,
        cuda: &CudaProgram,
        arch: String,
    ) -> Result<Self, CudaError> {
        let units: Vec<KernelSource> = cuda
            .sources
            .iter()
            .map(|source| {
                let block = cuda
                    .users_of(&source.entry)
                    .next()
                    .map_or(0, |k| k.launch.block);
                generated_source(source, block)
            })
            .collect();
        let mut kernels = GpuKernels {
            arch,
            functions: HashMap::new(),
            cache_hits: 0,
        };
        kernels.compile_and_load(device, cache, &units)?;
        Ok(kernels)
    }

    /// Compiles `units` (in parallel, through the cache) and loads them into the device.
    fn compile_and_load(
        &mut self,
        device: &GpuDevice,
        cache: &KernelCache,
        units: &[KernelSource],
    ) -> Result<(), CudaError> {
        let compiled = cache.get_or_compile_many(units, &self.arch);
        for (unit, cached) in units.iter().zip(compiled) {
            let loaded = load_compiled(&device.ctx, unit, cached?)?;
            self.cache_hits += usize::from(loaded.cached.hit);
            self.functions.insert(unit.entry.clone(), loaded.function);
        }
        Ok(())
    }

    /// Compiles and loads, in one parallel batch, the library templates `plan` launches, the
    /// executor's own micro-batch sum (`GpuExecutor::run_summing`) and the device optimizer's
    /// kernels (`GpuExecutor::keep_optimizer`; loaded whether used or not: six small ones).
    pub fn load_library(
        &mut self,
        device: &GpuDevice,
        cache: &KernelCache,
        plan: &LibraryPlan,
    ) -> Result<(), CudaError> {
        let mut units = plan
            .kernels()
            .iter()
            .map(LibraryKernel::instantiate)
            .collect::<Result<Vec<_>, _>>()?;
        units.push(AccumulateScaled.instantiate()?);
        for kernel in OptimizerPlan::kernels() {
            units.push(kernel.instantiate()?);
        }
        self.compile_and_load(device, cache, &units)
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

/// What NVRTC compiles for on `device` (`sm_90a` on Hopper).
fn compile_arch(device: &GpuDevice, cache: &KernelCache) -> Result<String, CudaError> {
    let supported = cache.nvrtc().supported_archs()?;
    compile_target(device.compute_capability, &supported).ok_or(CudaError::NoCompileTarget {
        major: device.compute_capability.0,
        minor: device.compute_capability.1,
        supported,
    })
}

/// Options of a [`GpuExecutor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// Capture the launches into a CUDA graph on the first run and replay it afterwards.
    pub cuda_graph: bool,
    /// Which FP8 GEMMs get their tile and schedule timed on the device (`gemm_tuning`);
    /// `None`: as `FATHOM_GEMM_TUNING` says.
    pub gemm_tuning: Option<TuningPolicy>,
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
    library: LibraryPlan,
    kernels: GpuKernels,
    stream: Arc<CudaStream>,
    allocator: Mutex<CachingAllocator<DriverMemory>>,
    /// Device blocks: one per slot of temporaries, one per other buffer the program uses.
    blocks: Vec<Block>,
    /// Device address of every buffer's first element (0 for unused buffers).
    address: Vec<u64>,
    /// The library calls' scratch ints, scratch bytes and status words (see `super::library`).
    scratch: u64,
    scratch_bytes: u64,
    status: u64,
    options: GpuOptions,
    graph: Mutex<Option<CapturedGraph>>,
    /// Whether no kernel writes a parameter buffer, so that uploaded parameters stay as fed.
    parameters_read_only: bool,
    /// The version of the parameters in device memory (`None`: none known).
    parameters_on_device: Mutex<Option<u64>>,
    /// Outputs summed over runs in device memory (`run_summing`), by owner and output name.
    /// Held for the whole of every run: threads sharing the executor (the pipeline's ranks
    /// that run one stage) take turns on its buffers.
    sums: Mutex<Sums>,
    /// The optimizer kept on the device, when a trainer gave it one (`keep_optimizer`).
    optimizer: Option<optimizer::DeviceOptimizer>,
    /// Set when the kept optimizer changed the parameters: the next run makes their FP8 codes.
    weight_codes_stale: AtomicBool,
}

/// Who a sum belongs to: every rank that runs a pipeline stage sums its own micro-batches with
/// the stage's executables (0 where one caller sums).
pub type SumOwner = usize;

/// The device sums of an executor, by owner and output name.
type Sums = BTreeMap<(SumOwner, String), DeviceSum>;

/// An output's sum over runs, in device memory.
struct DeviceSum {
    block: Block,
    /// The output's buffer (f32 elements).
    buffer: BufferId,
    elements: usize,
    /// Runs added since the sum was last taken (0: the next run starts it).
    runs: usize,
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
            .field("memory", &self.memory())
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
        let arch = compile_arch(device, cache)?;
        let target = Fp8Target::for_arch(&arch);
        let mut library = LibraryPlan::of(&program, target)?;
        if target == Some(Fp8Target::Hopper) {
            // The FP8 GEMMs' tiles and schedules timed on this device (`gemm_tuning`).
            let policy = match options.gemm_tuning {
                Some(policy) => policy,
                None => TuningPolicy::from_env().map_err(CudaError::Launch)?,
            };
            let choices = tuned_choices(device, cache, (&arch, policy), &library)?;
            library
                .apply_gemm_choices(&choices)
                .map_err(CudaError::Launch)?;
        }
        let mut kernels = GpuKernels::load_for(device, cache, &cuda, arch)?;
        kernels.load_library(device, cache, &library)?;
        let stream = device
            .ctx
            .new_stream()
            .map_err(|e| CudaError::driver("creating a stream".into(), e))?;
        // Lifetimes as the plan's launches touch the buffers (an FP8 GEMM may quantise a
        // rounding's source, which then lives until it does).
        let plan = library.memory_plan(&program);
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
                // Where its temporary holds it: set below, once every temporary has a place.
                (BufferRole::Window { .. }, _) => 0,
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
        place_windows(&program, &mut address);
        let mut block = |bytes: usize| -> Result<u64, CudaError> {
            let block = allocator.alloc(bytes.max(4), stream_id(&stream))?;
            let ptr = block.ptr;
            blocks.push(block);
            Ok(ptr)
        };
        let scratch = block(4 * library.scratch_ints())?;
        let scratch_bytes = block(library.scratch_bytes())?;
        let status = block(4 * STATUS_WORDS)?;
        Ok(GpuExecutor {
            cuda,
            library,
            kernels,
            stream,
            allocator: Mutex::new(allocator),
            blocks,
            address,
            scratch,
            scratch_bytes,
            status,
            options,
            graph: Mutex::new(None),
            parameters_read_only: no_kernel_writes_parameters(&program),
            parameters_on_device: Mutex::new(None),
            sums: Mutex::new(BTreeMap::new()),
            optimizer: None,
            weight_codes_stale: AtomicBool::new(false),
            program,
        })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn kernels(&self) -> &GpuKernels {
        &self.kernels
    }

    /// The launches of the program's library calls.
    pub fn library(&self) -> &LibraryPlan {
        &self.library
    }

    pub fn memory(&self) -> AllocStats {
        self.lock_allocator().stats()
    }

    /// The allocator (still usable after a panic elsewhere: it holds no invariant a panic
    /// could break half-way).
    fn lock_allocator(&self) -> MutexGuard<'_, CachingAllocator<DriverMemory>> {
        (self.allocator.lock()).unwrap_or_else(PoisonError::into_inner)
    }

    /// The sums, held for a run (see the field).
    fn lock_sums(&self) -> Result<MutexGuard<'_, Sums>, CudaError> {
        (self.sums.lock()).map_err(|_| CudaError::Launch("the executor's lock is poisoned".into()))
    }

    /// Runs the program on `feeds` and returns its outputs.
    pub fn run(&self, feeds: &Feeds<'_>) -> Result<GpuRun, CudaError> {
        let _turn = self.lock_sums()?;
        self.run_then(feeds, |_| true, || Ok(()))
    }

    /// Runs the program on `feeds` as one micro-batch of several: the outputs `summed` names
    /// are not downloaded but added, times `scale`, into `owner`'s sums kept in device memory
    /// (f32, as the host's `optim::accumulate`: `scale · x` on the first run after
    /// [`take_sums`], then `sum + scale · x`, to the bit); the other outputs are returned. On an
    /// error every sum of `owner` is dropped, so that a failed micro-batch never leaves half a
    /// sum behind.
    ///
    /// [`take_sums`]: GpuExecutor::take_sums
    pub fn run_summing(
        &self,
        feeds: &Feeds<'_>,
        summed: &[String],
        scale: f32,
        owner: SumOwner,
    ) -> Result<GpuRun, CudaError> {
        let mut sums = self.lock_sums()?;
        let run = self.prepare_sums(&mut sums, owner, summed).and_then(|()| {
            self.run_then(
                feeds,
                |name| !summed.iter().any(|s| s == name),
                || self.queue_sums(&sums, owner, summed, scale),
            )
        });
        let owned = sums.iter_mut().filter(|((o, _), _)| *o == owner);
        match run {
            Ok(run) => {
                for ((_, name), sum) in owned {
                    if summed.contains(name) {
                        sum.runs += 1;
                    }
                }
                Ok(run)
            }
            Err(e) => {
                owned.for_each(|(_, sum)| sum.runs = 0);
                Err(e)
            }
        }
    }

    /// `owner`'s sums of the runs since the last call, by output name (outputs summed at least
    /// once), downloaded; its next `run_summing` starts them again.
    pub fn take_sums(&self, owner: SumOwner) -> Result<Vec<(String, Vec<f32>)>, CudaError> {
        let mut sums = self.lock_sums()?;
        let mut taken = Vec::new();
        for ((_, name), sum) in sums.iter_mut().filter(|((o, _), _)| *o == owner) {
            if sum.runs == 0 {
                continue;
            }
            sum.runs = 0;
            let mut values = vec![0f32; sum.elements];
            download(&self.stream, sum.block.ptr, &mut values)
                .map_err(|e| CudaError::driver(format!("downloading the sum of `{name}`"), e))?;
            taken.push((name.clone(), values));
        }
        Ok(taken)
    }

    /// Forgets `owner`'s sums of the runs since the last step (a step not taken): its next
    /// `run_summing` starts them again.
    pub fn discard_sums(&self, owner: SumOwner) -> Result<(), CudaError> {
        let mut sums = self.lock_sums()?;
        (sums.iter_mut())
            .filter(|((o, _), _)| *o == owner)
            .for_each(|(_, sum)| sum.runs = 0);
        Ok(())
    }

    /// A device sum of `owner` for each output of `summed` (allocated at its first use).
    fn prepare_sums(
        &self,
        sums: &mut Sums,
        owner: SumOwner,
        summed: &[String],
    ) -> Result<(), CudaError> {
        for name in summed {
            let key = (owner, name.clone());
            if sums.contains_key(&key) {
                continue;
            }
            let buffer = self
                .program
                .outputs
                .iter()
                .find(|(output, _)| output == name)
                .map(|(_, id)| *id)
                .ok_or_else(|| {
                    CudaError::Launch(format!(
                        "`{name}` is not an output of `{}`: nothing to sum",
                        self.program.name
                    ))
                })?;
            let elements = self.program.buffer(buffer).ty.numel();
            let block = self
                .lock_allocator()
                .alloc(4 * elements.max(1), stream_id(&self.stream))?;
            let sum = DeviceSum {
                block,
                buffer,
                elements,
                runs: 0,
            };
            sums.insert(key, sum);
        }
        Ok(())
    }

    /// Queues the additions of the outputs `summed` names into `owner`'s sums.
    fn queue_sums(
        &self,
        sums: &Sums,
        owner: SumOwner,
        summed: &[String],
        scale: f32,
    ) -> Result<(), CudaError> {
        let kernel = AccumulateScaled;
        let function = self.kernels.function(&kernel.name())?;
        for name in summed {
            let Some(sum) = sums.get(&(owner, name.clone())) else {
                continue;
            };
            let named = [
                ("acc", Arg::Ptr(sum.block.ptr)),
                ("x", Arg::Ptr(self.address[sum.buffer.index()])),
                ("scale", Arg::F32(scale)),
                ("n", Arg::I64(sum.elements as i64)),
                ("first", Arg::I32(i32::from(sum.runs == 0))),
            ];
            let mut args = args_by_name(&kernel.name(), &kernel.kernel_params(), &named)?;
            let [x, y, z] = kernel.grid(sum.elements as u64);
            launch(
                &self.stream,
                function,
                (x, y, z),
                (kernel.block_threads(), 1, 1),
                0,
                &mut args,
            )
            .map_err(|e| e.in_kernel(&format!("the sum of `{name}`")))?;
        }
        Ok(())
    }

    /// Runs the program on `feeds`, queues `after` behind its launches, and downloads the
    /// outputs `download` accepts.
    fn run_then(
        &self,
        feeds: &Feeds<'_>,
        download_output: impl Fn(&str) -> bool,
        after: impl FnOnce() -> Result<(), CudaError>,
    ) -> Result<GpuRun, CudaError> {
        upload(&self.stream, self.status, &[0i32; STATUS_WORDS])
            .map_err(|e| CudaError::driver("clearing the status words".into(), e))?;
        let mut on_device = self
            .parameters_on_device
            .lock()
            .map_err(|_| CudaError::Launch("the parameters' lock is poisoned".into()))?;
        let fed = feeds.parameters_version;
        let upload_parameters = parameters_stale(*on_device, fed, self.parameters_read_only);
        if upload_parameters {
            // Until every parameter is in, no version is.
            *on_device = None;
        }
        let mut codes_stale = self.weight_codes_stale.swap(false, Ordering::AcqRel);
        for (index, buffer) in self.program.buffers.iter().enumerate() {
            let id = BufferId(index as u32);
            let fed_now = match &buffer.role {
                BufferRole::Input(_) => true,
                // The parameters a kept optimizer updates are the device's own.
                role => role.is_fed_weight() && upload_parameters && !self.optimizer_owns(id),
            };
            if fed_now {
                let values = initial_contents(&buffer.ty, &buffer.role, feeds)?;
                upload(&self.stream, self.address[index], &values)
                    .map_err(|e| CudaError::driver("uploading an input".into(), e))?;
                codes_stale |= self.library.weight_codes.made_from(&self.program, id);
            }
        }
        if codes_stale {
            // The weights' FP8 codes follow the weights (`library_fp8_weight_codes`): made
            // here, on the stream ahead of the program, outside any captured graph.
            self.launch_weight_codes()?;
        }
        if upload_parameters {
            *on_device = fed;
        }
        drop(on_device);
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
        after()?;
        self.stream
            .synchronize()
            .map_err(driver("running the program (a kernel failed)"))?;
        let kernels_ms = start
            .elapsed_ms(&end)
            .map_err(driver("reading the timer"))?;
        self.check_status()?;
        let mut outputs = Vec::with_capacity(self.program.outputs.len());
        for (name, id) in &self.program.outputs {
            if !download_output(name) {
                continue;
            }
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
        let positions = 0..self.cuda.launches.len();
        let mut in_program = positions.filter(|&p| !self.library.weight_codes.is_hoisted(p));
        in_program.try_for_each(|position| self.launch_at(position))
    }

    /// Queues the weights' FP8 codes: the hoisted kernels and the `quantize` launches, in
    /// program order (`library_fp8_weight_codes`).
    fn launch_weight_codes(&self) -> Result<(), CudaError> {
        let codes = &self.library.weight_codes;
        codes
            .launches()
            .into_iter()
            .try_for_each(|launch| match launch {
                WeightLaunch::Kernel(position) => self.launch_at(position),
                WeightLaunch::Quantization(q) => {
                    self.launch_steps("the weight codes", std::iter::once(&q.step))
                }
            })
    }

    /// Queues the program's launch at `position` (nothing for a loop nest the plan computes
    /// where its output is read, `library_fp8_products`).
    fn launch_at(&self, position: usize) -> Result<(), CudaError> {
        match &self.cuda.launches[position] {
            CudaLaunch::Generated(_) if self.library.skips(position) => Ok(()),
            CudaLaunch::Generated(index) => {
                let kernel = &self.cuda.kernels[*index];
                let function = self.kernels.function(kernel.entry())?;
                launch_generated(&self.stream, function, kernel, |b| self.address[b.index()])
            }
            CudaLaunch::Template(call) => {
                let planned = self.library.calls.get(position).and_then(Option::as_ref);
                let planned = planned.ok_or_else(|| {
                    CudaError::Launch(format!("{}: library call without a plan", call.name))
                })?;
                self.launch_steps(&planned.name, &planned.steps)
            }
        }
    }

    /// Queues `steps` (a library call's, or the weight codes'), named `name` in errors.
    fn launch_steps<'a>(
        &self,
        name: &str,
        steps: impl IntoIterator<Item = &'a LibraryStep>,
    ) -> Result<(), CudaError> {
        for step in steps {
            let function = self.kernels.function(&step.kernel.name())?;
            let mut args = step
                .args
                .iter()
                .map(|arg| {
                    Ok(match *arg {
                        StepArg::Buffer(b, offset) => {
                            Arg::Ptr(self.address[b.index()] + 4 * offset as u64)
                        }
                        StepArg::Scratch(offset) => Arg::Ptr(self.scratch + 4 * offset as u64),
                        StepArg::Bytes(offset) => Arg::Ptr(self.scratch_bytes + offset as u64),
                        StepArg::BufferBytes(b, offset) => {
                            Arg::Ptr(self.address[b.index()] + offset as u64)
                        }
                        StepArg::TensorMap(desc, place) => {
                            let at = match place {
                                Place::Scratch(offset) => self.scratch_bytes + offset as u64,
                                Place::Buffer(b, offset) => self.address[b.index()] + offset as u64,
                            };
                            Arg::TensorMap(encode_tensor_map(&desc, at)?)
                        }
                        StepArg::Null => Arg::Ptr(0),
                        StepArg::Status => Arg::Ptr(self.status),
                        StepArg::I32(v) => Arg::I32(v),
                        StepArg::I64(v) => Arg::I64(v),
                        StepArg::F32(v) => Arg::F32(v),
                    })
                })
                .collect::<Result<Vec<Arg>, CudaError>>()
                .map_err(|e| e.in_kernel(name))?;
            let [x, y, z] = step.grid;
            let block = (step.kernel.block_threads(), 1, 1);
            let smem = step.kernel.dynamic_smem_bytes();
            launch(&self.stream, function, (x, y, z), block, smem, &mut args)
                .map_err(|e| e.in_kernel(name))?;
        }
        Ok(())
    }

    /// Fails when a library kernel of the last run met an invalid index.
    fn check_status(&self) -> Result<(), CudaError> {
        let mut words = [0i32; STATUS_WORDS];
        download(&self.stream, self.status, &mut words)
            .map_err(|e| CudaError::driver("reading the status words".into(), e))?;
        if words[0] == 0 {
            return Ok(());
        }
        Err(CudaError::IndexOutOfRange {
            kernel: self
                .library
                .name_of_tag(words[0])
                .unwrap_or("an unknown library call")
                .to_owned(),
            index: f32::from_bits(words[1] as u32),
            bound: words[2],
        })
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
        let allocator = self
            .allocator
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for block in self.blocks.drain(..) {
            let _ = allocator.free(block);
        }
        let sums = self.sums.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (_, sum) in std::mem::take(sums) {
            let _ = allocator.free(sum.block);
        }
        for block in self.optimizer.take().into_iter().flat_map(|o| o.blocks()) {
            let _ = allocator.free(block);
        }
        allocator.streams_synchronized();
        let _ = allocator.empty_cache();
    }
}

/// Points every window of `program` at its elements in its temporary (`address`: by buffer,
/// every other buffer's already).
fn place_windows(program: &Program, address: &mut [u64]) {
    for (index, buffer) in program.buffers.iter().enumerate() {
        if let BufferRole::Window { of, offset } = buffer.role {
            address[index] = address[of.index()] + 4 * offset as u64;
        }
    }
}

/// Whether a run fed parameters of version `fed` must upload them, the device holding version
/// `on_device`: unless both are the same known version and no kernel writes a parameter.
fn parameters_stale(on_device: Option<u64>, fed: Option<u64>, read_only: bool) -> bool {
    !(read_only && fed.is_some() && fed == on_device)
}

/// Whether no kernel of `program` (loop nest or library call) writes a parameter buffer.
fn no_kernel_writes_parameters(program: &Program) -> bool {
    program.kernels.iter().all(|kernel| {
        kernel
            .reads_and_writes()
            .1
            .iter()
            .all(|b| !program.buffer(*b).role.is_fed_weight())
    })
}

/// Status words of the library kernels: the tag of the call that met an invalid index (0: none),
/// the index's f32 bits, and the bound it had to be below.
const STATUS_WORDS: usize = 3;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_compiler::model::LossWeights;
    use fathom_compiler::training::training_graph;

    #[test]
    fn parameters_are_uploaded_once_per_known_version() {
        // A version the device holds, fed again: nothing to upload.
        assert!(!parameters_stale(Some(3), Some(3), true));
        // A new version, or none known on either side: upload.
        assert!(parameters_stale(Some(3), Some(4), true));
        assert!(parameters_stale(None, Some(3), true));
        assert!(parameters_stale(Some(3), None, true));
        assert!(parameters_stale(None, None, true));
        // A program that writes a parameter buffer uploads every run.
        assert!(parameters_stale(Some(3), Some(3), false));
    }

    #[test]
    fn training_programs_leave_their_parameters_as_fed() {
        let program = micro_training_program();
        assert!(no_kernel_writes_parameters(&program));
        // Marking a buffer some kernel writes as a parameter, or stacked parameters, is seen.
        let written = program.kernels[0].reads_and_writes().1[0];
        for role in [
            BufferRole::Parameter("w".into()),
            BufferRole::StackedParameters(vec!["w".into()]),
        ] {
            let mut marked = program.clone();
            marked.buffers[written.index()].role = role;
            assert!(!no_kernel_writes_parameters(&marked));
        }
    }

    /// The experts' gradients are read from the stacked gradient: each window's address is
    /// its expert's block, 4 bytes an element past its temporary's.
    #[test]
    fn windows_point_into_their_temporaries() {
        let program = micro_training_program();
        let mut address: Vec<u64> = (0..program.buffers.len() as u64)
            .map(|b| (b + 1) << 32)
            .collect();
        place_windows(&program, &mut address);
        let mut windows = 0;
        for (index, buffer) in program.buffers.iter().enumerate() {
            if let BufferRole::Window { of, offset } = buffer.role {
                let expert = (offset / buffer.ty.numel()) as u64;
                let block = 4 * buffer.ty.numel() as u64;
                assert_eq!(address[index], address[of.index()] + expert * block);
                windows += 1;
            }
        }
        // The micro model's experts' three matrices each.
        let spec = fathom_compiler::spec::examples::micro();
        assert!(
            windows >= 3 * spec.moe.as_ref().unwrap().routed_experts,
            "{windows}"
        );
    }

    /// The micro model's training step, lowered for CUDA.
    fn micro_training_program() -> Program {
        let spec = fathom_compiler::spec::examples::micro();
        let graph = training_graph(&spec, 1, 4, LossWeights::deepseek_v3())
            .unwrap()
            .graph;
        let options = CompileOptions {
            lower: crate::cuda::lower_options(),
            ..CompileOptions::default()
        };
        compile(&graph, &options).unwrap().program
    }
}
