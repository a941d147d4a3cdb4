//! The CPU backend: runs a kernel [`Program`] — loop nests and library calls over buffers.
//!
//! Every buffer is held as f32 values: floats of narrower types hold their rounded values (as
//! in the interpreter), integers and bools their exact values (integer inputs must stay below
//! 2^24 in magnitude, which token and expert ids do by far), so one code path serves all
//! kernels. Matmuls run on the `gemm` crate; the grouped expert matmuls gather each expert's
//! rows and run one GEMM per expert. Loop nests are compiled once per program to native code
//! by the cranelift JIT in `jit` (rows split across rayon threads); the row evaluator in
//! `loops` is their reference and runs the kernels the JIT leaves (see [`JitReport`]).

mod bf16;
mod cross_entropy;
mod expf;
mod grouped;
mod head;
mod jit;
mod library;
mod loops;
mod pool;
mod product;
mod profile;
mod softmax;
mod swiglu;
#[cfg(test)]
mod tests;
mod triangular;

use fathom_compiler::kernel::{BufferRole, KernelBody, Program};
use fathom_compiler::{DType, TensorType};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use thiserror::Error;

pub use bf16::{BF16_GEMM_ENV, Bf16Gemm, MIN_FLOP_RATIO, bf16_gemm, compare_with_f32};

/// The kernel forms this backend runs on this CPU: `LowerOptions::cpu()`, products that round
/// their bf16 operands as they read them where the bf16 GEMM runs (its packing rounds anyway;
/// the f32 GEMM would need rounded copies, which the cast kernels make once), and the
/// cross-entropy, softmax and SwiGLU routines where the CPU has AVX-512 (`cross_entropy`,
/// `softmax`, `swiglu`), and the head with its loss as one routine where the bf16 GEMM runs
/// too (`head`).
pub fn lower_options() -> fathom_compiler::lower::LowerOptions {
    fathom_compiler::lower::LowerOptions {
        products_round_operands: bf16::enabled(),
        cross_entropy_routines: expf::vectorised(),
        softmax_routines: expf::vectorised(),
        swiglu_routines: expf::vectorised(),
        linear_cross_entropy_routines: bf16::enabled() && expf::vectorised(),
        ..fathom_compiler::lower::LowerOptions::cpu()
    }
}
pub use jit::{DUMP_ENV as JIT_DUMP_ENV, JitError, JitReport};
pub use profile::PROFILE_ENV;

use crate::interp::{Feeds, round_to_dtype};
use crate::tensor::{Data, HostTensor};
use pool::Pool;

#[derive(Debug, Error, PartialEq)]
pub enum CpuError {
    #[error("missing {kind} `{name}`")]
    Missing { kind: &'static str, name: String },
    #[error("{kind} `{name}` is {fed}, the program expects {expected}")]
    TypeMismatch {
        kind: &'static str,
        name: String,
        fed: TensorType,
        expected: TensorType,
    },
    #[error(
        "{kind} `{name}` holds {value}, beyond what the CPU backend holds exactly (|x| < 2^24)"
    )]
    IntegerRange {
        kind: &'static str,
        name: String,
        value: i64,
    },
    #[error("kernel {kernel}: index {index} is out of range 0..{bound}")]
    IndexOutOfRange {
        kernel: String,
        index: f32,
        bound: usize,
    },
    #[error("kernel {kernel}: expert-parallel exchange failed: {reason}")]
    Exchange { kernel: String, reason: String },
    #[error("kernel {kernel}: {reason}")]
    Unsupported { kernel: String, reason: String },
}

/// A program ready to run on the CPU.
#[derive(Debug)]
pub struct CpuProgram {
    program: Program,
    /// The compiled loop kernels; `None` when every loop runs on the row evaluator.
    jit: Option<Box<jit::JitProgram>>,
    /// Pooled storage for temporaries, kept between runs.
    scratch: std::sync::Mutex<Pool>,
    lifetimes: Lifetimes,
    /// The values of constant buffers, rounded to their types once (indexed like the buffers).
    constants: Vec<Option<Vec<f32>>>,
    /// Per-kernel timings, when `FATHOM_PROFILE` asks for them (printed on drop).
    profile: Option<profile::Profile>,
}

impl Drop for CpuProgram {
    fn drop(&mut self) {
        if let Some(table) = self.profile.as_ref().and_then(profile::Profile::table) {
            eprint!("{table}");
        }
    }
}

/// Named results of a run.
#[derive(Debug, Default)]
pub struct CpuOutputs {
    outputs: Vec<(String, HostTensor)>,
}

impl CpuOutputs {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        let i = self.outputs.iter().position(|(n, _)| n == name)?;
        Some(self.outputs.swap_remove(i).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> + '_ {
        self.outputs.iter().map(|(n, t)| (n.as_str(), t))
    }
}

impl IntoIterator for CpuOutputs {
    type Item = (String, HostTensor);
    type IntoIter = std::vec::IntoIter<(String, HostTensor)>;

    fn into_iter(self) -> Self::IntoIter {
        self.outputs.into_iter()
    }
}

impl CpuProgram {
    /// Compiles the program's loop kernels (those the JIT cannot compile run on the row
    /// evaluator; [`CpuProgram::jit_report`] says which and why).
    pub fn new(program: Program) -> Self {
        let jit = Box::new(jit::JitProgram::compile(&program));
        let lifetimes = Lifetimes::of(&program);
        let constants = constants_of(&program);
        CpuProgram {
            constants,
            profile: profile::enabled_by_env()
                .then(|| profile::Profile::new(&program, |i| jit.kernel(i).is_some())),
            jit: Some(jit),
            scratch: Default::default(),
            lifetimes,
            program,
        }
    }

    /// Runs every loop kernel on the row evaluator: the reference the JIT is checked against.
    pub fn without_jit(program: Program) -> Self {
        let lifetimes = Lifetimes::of(&program);
        let constants = constants_of(&program);
        CpuProgram {
            constants,
            profile: profile::enabled_by_env().then(|| profile::Profile::new(&program, |_| false)),
            program,
            jit: None,
            scratch: Default::default(),
            lifetimes,
        }
    }

    /// What the JIT compiled, what it left to the row evaluator and how long it took.
    pub fn jit_report(&self) -> Option<&JitReport> {
        self.jit.as_deref().map(jit::JitProgram::report)
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Hands the storage of an output (e.g. a gradient the caller is done with) back to the
    /// pool of temporaries, so the next run reuses it instead of faulting in fresh pages.
    pub fn recycle(&self, storage: Vec<f32>) {
        if let Ok(mut scratch) = self.scratch.lock() {
            scratch.give_back(storage);
        }
    }

    /// Runs every kernel in order and returns the program's outputs.
    pub fn run(&self, feeds: &Feeds<'_>) -> Result<CpuOutputs, CpuError> {
        self.run_inner(feeds, None)
    }

    /// Runs like [`CpuProgram::run`], showing `observe` every buffer (f32 values, indexed by
    /// buffer) before and after each kernel: how the GPU check compares each kernel alone
    /// against the CPU. Temporaries not alive at that point are empty.
    pub fn run_observed(
        &self,
        feeds: &Feeds<'_>,
        observe: &mut KernelObserver<'_>,
    ) -> Result<CpuOutputs, CpuError> {
        self.run_inner(feeds, Some(observe))
    }

    fn run_inner(
        &self,
        feeds: &Feeds<'_>,
        observe: Option<&mut KernelObserver<'_>>,
    ) -> Result<CpuOutputs, CpuError> {
        let timing = self.profile.as_ref().map(|_| Instant::now());
        // Temporaries live from the kernel that first writes them to the last that reads them
        // (the memory plan's lifetimes): storage is taken from a pool when one starts (later
        // kernels writing other regions of it, the parts of a concatenation, find it as the
        // earlier ones left it) and given back when it dies, so a run holds about the plan's
        // peak, not every temporary. The pool survives between runs (another thread running the
        // program at the same time starts with an empty one).
        let mut pool = self
            .scratch
            .try_lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let mut buffers: Vec<Storage<'_>> = Vec::with_capacity(self.program.buffers.len());
        for (buffer, constant) in self.program.buffers.iter().zip(&self.constants) {
            buffers.push(match (&buffer.role, constant) {
                (BufferRole::Temporary, _) => Storage::default(),
                (_, Some(values)) => Storage::Borrowed(values),
                // Assembled in pooled storage: a fresh allocation would fault its pages in on
                // every run.
                (BufferRole::StackedParameters(names), None) => {
                    let len = buffer.ty.numel();
                    let mut values = pool.take(len);
                    stack_parameters(&buffer.ty, names, feeds, &mut values[..len])?;
                    Storage::Pooled { values, len }
                }
                (role, None) => initial_contents(&buffer.ty, role, feeds)?,
            });
        }
        let feeds_time = timing.map(|t| t.elapsed());
        let mut kernel_times = Vec::new();
        let mut sequence = KernelSequence {
            buffers: &mut buffers,
            pool: &mut pool,
            experts: feeds.experts,
            times: timing.map(|_| &mut kernel_times),
        };
        match observe {
            // An observer (not `Send`) keeps the kernels on the calling thread.
            Some(observe) => self.run_kernels(&mut sequence, Some(observe))?,
            // A kernel sequence run by a thread outside the rayon pool hands every parallel
            // kernel to the pool's workers and sleeps until they finish: two thread wake-ups
            // per kernel, about 1700 context switches per training step of the small model.
            // Run by one of the workers, it splits each kernel with the other workers by work
            // stealing (the small step 5-7% faster; its allocations then come from that
            // worker's malloc arena, see the CLI's `one_malloc_arena`), and the other workers
            // keep looking for work until the sequence ends (`keep_stealing`) instead of going
            // to sleep between kernels: the small step another 10% faster, context switches of
            // a 5-step `fathom bench` 5400 → 3700. Not under expert parallelism: a rank's
            // kernels wait for other ranks' exchanges, and ranks parked on every worker would
            // wait forever for a rank left queued behind them.
            None if feeds.experts.is_none() => {
                let done = AtomicBool::new(false);
                rayon::scope(|scope| {
                    for _ in 1..rayon::current_num_threads() {
                        scope.spawn(|_| keep_stealing(&done));
                    }
                    let result = self.run_kernels(&mut sequence, None);
                    done.store(true, Ordering::Release);
                    result
                })?
            }
            None => self.run_kernels(&mut sequence, None)?,
        }
        let outputs_start = timing.map(|_| Instant::now());
        // Float temporaries move out as they are (no copy); the caller may hand their storage
        // back with `recycle`. Anything else (integers, bools, fed buffers, a buffer named by
        // two outputs or holding an output's window) is copied, and so is an output held in
        // pooled storage over twice its size: moved out, a large allocation would leave the
        // pool with a small output the caller does not recycle, and every later run would
        // fault fresh pages in for the temporary it served (three 4 MB buffers of the small
        // config's attention backward). A window's elements are copied out of its temporary.
        let mut outputs = Vec::with_capacity(self.program.outputs.len());
        for (i, (name, id)) in self.program.outputs.iter().enumerate() {
            let buffer = self.program.buffer(*id);
            if let BufferRole::Window { of, offset } = buffer.role {
                let whole = &buffers[of.index()];
                let window = &whole[offset..offset + buffer.ty.numel()];
                outputs.push((name.clone(), to_host(&buffer.ty, window)));
                continue;
            }
            let named_again = self.program.outputs[i + 1..].iter().any(|(_, o)| o == id)
                || (self.program.outputs.iter())
                    .any(|(_, o)| self.program.holder(*o).0 == *id && o != id);
            let storage = &mut buffers[id.index()];
            let numel = buffer.ty.numel();
            let movable = matches!(buffer.role, BufferRole::Temporary)
                && buffer.ty.dtype.is_float()
                && !named_again
                && matches!(storage, Storage::Owned(v) | Storage::Pooled { values: v, .. }
                    if v.len() >= numel && v.capacity() <= 2 * numel);
            let tensor = if movable {
                HostTensor {
                    ty: buffer.ty.clone(),
                    data: Data::Float(storage.take_vec()),
                }
            } else {
                to_host(&buffer.ty, storage)
            };
            outputs.push((name.clone(), tensor));
        }
        for (buffer, mut storage) in self.program.buffers.iter().zip(buffers) {
            if let BufferRole::Temporary | BufferRole::StackedParameters(_) = buffer.role {
                pool.give_back(storage.take_allocation());
            }
        }
        if let Ok(mut scratch) = self.scratch.try_lock() {
            *scratch = pool;
        }
        if let (Some(profile), Some(t), Some(f), Some(o)) =
            (&self.profile, timing, feeds_time, outputs_start)
        {
            let phases = [
                (profile::Phase::Feeds, f),
                (profile::Phase::Outputs, o.elapsed()),
            ];
            profile.add_run(t.elapsed(), &kernel_times, &phases);
        }
        Ok(CpuOutputs { outputs })
    }

    /// Runs every kernel in order over `sequence`'s buffers: each temporary's storage taken
    /// from the pool when its first writer starts and given back after its last reader.
    fn run_kernels(
        &self,
        sequence: &mut KernelSequence<'_, '_>,
        mut observe: Option<&mut KernelObserver<'_>>,
    ) -> Result<(), CpuError> {
        for index in 0..self.program.kernels.len() {
            self.run_kernel(index, sequence, observe.as_deref_mut())?;
        }
        Ok(())
    }

    /// Runs kernel `index`.
    fn run_kernel(
        &self,
        index: usize,
        sequence: &mut KernelSequence<'_, '_>,
        mut observe: Option<&mut KernelObserver<'_>>,
    ) -> Result<(), CpuError> {
        let kernel_start = sequence.times.is_some().then(Instant::now);
        sequence.start_buffers(&self.program, &self.lifetimes.starting[index]);
        let buffers = &mut *sequence.buffers;
        if let Some(observe) = observe.as_mut() {
            let views: Vec<&[f32]> = buffers.iter().map(|b| &**b).collect();
            observe(index, KernelPhase::Before, &views);
        }
        let kernel = &self.program.kernels[index];
        let compiled = self.jit.as_ref().and_then(|jit| jit.kernel(index));
        match (&kernel.body, compiled) {
            (KernelBody::Loop(_), Some(compiled)) => compiled.run(buffers),
            (KernelBody::Loop(nest), None) => loops::run(nest, buffers),
            (KernelBody::Library(call), _) => {
                library::run(&kernel.name, call, &self.program, buffers, sequence.experts)?
            }
        }
        if let Some(observe) = observe.as_mut() {
            let views: Vec<&[f32]> = buffers.iter().map(|b| &**b).collect();
            observe(index, KernelPhase::After, &views);
        }
        sequence.end_buffers(&self.lifetimes.ending[index]);
        if let (Some(start), Some(times)) = (kernel_start, sequence.times.as_mut()) {
            times.push(start.elapsed());
        }
        Ok(())
    }
}

/// Keeps a rayon worker taking the pool's jobs until `done`, so that each parallel kernel's
/// jobs are stolen at once rather than after a sleeping thread wakes up (rayon's workers sleep
/// after a few microseconds without work, and a kernel sequence leaves them that long between
/// kernels). It returns after [`MAX_IDLE`] without a job: it may also run on a thread that
/// another job waits on (the sequence's own, waiting for a stolen half of a kernel, or another
/// program's), which it must not hold up for long.
fn keep_stealing(done: &AtomicBool) {
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() > MAX_IDLE {
            return;
        } else {
            std::hint::spin_loop();
        }
    }
}

/// How long [`keep_stealing`] looks for work without finding any before it gives up: longer
/// than the gaps between a sequence's kernels (tens of microseconds), short next to a step.
const MAX_IDLE: std::time::Duration = std::time::Duration::from_millis(2);

/// The state a run's kernels work on: the buffers (indexed like the program's), the pool their
/// temporaries' storage comes from, the expert exchange of an expert-parallel rank, and each
/// kernel's time when profiling.
struct KernelSequence<'s, 'b> {
    buffers: &'s mut Vec<Storage<'b>>,
    pool: &'s mut Pool,
    experts: Option<&'b dyn crate::parallel::ExpertExchange>,
    times: Option<&'s mut Vec<std::time::Duration>>,
}

impl KernelSequence<'_, '_> {
    /// Storage from the pool for the temporaries `starting`.
    fn start_buffers(&mut self, program: &Program, starting: &[usize]) {
        for &b in starting {
            let len = program.buffers[b].ty.numel();
            self.buffers[b] = Storage::Pooled {
                values: self.pool.take(len),
                len,
            };
        }
    }

    /// The storage of the temporaries `ending` back to the pool.
    fn end_buffers(&mut self, ending: &[usize]) {
        for &b in ending {
            self.pool.give_back(self.buffers[b].take_allocation());
        }
    }
}

/// What [`CpuProgram::run_observed`] calls: kernel index, phase, every buffer.
pub type KernelObserver<'a> = dyn FnMut(usize, KernelPhase, &[&[f32]]) + 'a;

/// When [`CpuProgram::run_observed`] shows the buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPhase {
    Before,
    After,
}

/// A buffer's storage during a run: owned for temporaries, borrowed for what kernels only read
/// (f32 parameters and inputs as fed, constants as prepared), which saves copying the weights
/// on every run.
#[derive(Debug)]
pub(super) enum Storage<'a> {
    Owned(Vec<f32>),
    /// The first `len` values of an allocation from the pool, which may be longer (and goes
    /// back to the pool whole).
    Pooled {
        values: Vec<f32>,
        len: usize,
    },
    Borrowed(&'a [f32]),
}

impl Default for Storage<'_> {
    fn default() -> Self {
        Storage::Owned(Vec::new())
    }
}

impl std::ops::Deref for Storage<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Storage::Owned(v) => v,
            Storage::Pooled { values, len } => &values[..*len],
            Storage::Borrowed(s) => s,
        }
    }
}

impl std::ops::DerefMut for Storage<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Storage::Pooled { values, len } => &mut values[..*len],
            other => other.vec_mut(),
        }
    }
}

impl Storage<'_> {
    /// The owned values, to write. Kernels write only temporaries, which are always owned
    /// (the lowering gives every result a temporary of its own, or a region of a
    /// concatenation's), so a borrowed one here is a bug.
    /// A pooled allocation is cut to the buffer's length first.
    pub(super) fn vec_mut(&mut self) -> &mut Vec<f32> {
        if let Storage::Pooled { values, len } = self {
            values.truncate(*len);
            *self = Storage::Owned(std::mem::take(values));
        }
        match self {
            Storage::Owned(v) => v,
            Storage::Pooled { .. } => unreachable!("made owned above"),
            Storage::Borrowed(_) => panic!("a kernel writes a parameter, input or constant"),
        }
    }

    /// Takes the owned values out (the buffer's length of them), leaving an empty buffer.
    pub(super) fn take_vec(&mut self) -> Vec<f32> {
        std::mem::take(self.vec_mut())
    }

    /// Takes a temporary's storage out to be written while other buffers are read, whole:
    /// [`Storage::take_vec`] would cut a pooled allocation to the buffer's length, and the pool
    /// would then fill the cut part with zeros again when it next lends the allocation for a
    /// longer buffer (`memset` took 2.2% of a small training bench's samples with the matmuls'
    /// outputs cut, 1.5% without).
    pub(super) fn lend(&mut self) -> Lent {
        match std::mem::take(self) {
            Storage::Owned(values) => Lent {
                len: values.len(),
                values,
            },
            Storage::Pooled { values, len } => Lent { values, len },
            Storage::Borrowed(_) => panic!("a kernel writes a parameter, input or constant"),
        }
    }

    /// Takes the whole owned allocation out, for the pool; nothing for borrowed values.
    fn take_allocation(&mut self) -> Vec<f32> {
        match std::mem::take(self) {
            Storage::Owned(values) | Storage::Pooled { values, .. } => values,
            Storage::Borrowed(_) => Vec::new(),
        }
    }
}

/// A temporary's storage while a kernel writes it ([`Storage::lend`]): its first `len` values
/// are the buffer; the rest of the allocation keeps its stale values for the pool.
#[derive(Debug)]
pub(super) struct Lent {
    values: Vec<f32>,
    len: usize,
}

impl Lent {
    /// The storage to put back in the buffer's place.
    pub(super) fn restore(self) -> Storage<'static> {
        Storage::Pooled {
            values: self.values,
            len: self.len,
        }
    }
}

impl std::ops::Deref for Lent {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.values[..self.len]
    }
}

impl std::ops::DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.values[..self.len]
    }
}

/// Constant buffers' values rounded to their types, by buffer index.
fn constants_of(program: &Program) -> Vec<Option<Vec<f32>>> {
    program
        .buffers
        .iter()
        .map(|buffer| match &buffer.role {
            BufferRole::Constant(data) => Some(
                data.values
                    .iter()
                    .map(|&v| round_to_dtype(buffer.ty.dtype, v as f32))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// When each temporary starts and dies, by kernel index.
#[derive(Debug, Default)]
struct Lifetimes {
    starting: Vec<Vec<usize>>,
    ending: Vec<Vec<usize>>,
}

impl Lifetimes {
    fn of(program: &Program) -> Self {
        let plan = fathom_compiler::kernel::MemoryPlan::of(program);
        let kernels = program.kernels.len();
        let mut lifetimes = Lifetimes {
            starting: vec![Vec::new(); kernels],
            ending: vec![Vec::new(); kernels],
        };
        for (b, life) in plan.lifetimes.iter().enumerate() {
            if let Some((first, last)) = *life {
                lifetimes.starting[first].push(b);
                // Outputs live to the end (`last == kernels`): returned to the pool after.
                if last < kernels {
                    lifetimes.ending[last].push(b);
                }
            }
        }
        lifetimes
    }
}

pub(crate) fn initial_contents<'a>(
    ty: &TensorType,
    role: &BufferRole,
    feeds: &Feeds<'a>,
) -> Result<Storage<'a>, CpuError> {
    match role {
        BufferRole::Input(name) => fed("input", name, feeds.inputs, ty),
        BufferRole::Parameter(name) => fed("parameter", name, feeds.parameters, ty),
        BufferRole::StackedParameters(names) => {
            let mut values = vec![0.0; ty.numel()];
            stack_parameters(ty, names, feeds, &mut values)?;
            Ok(Storage::Owned(values))
        }
        // Read where its temporary holds it.
        BufferRole::Window { .. } => Ok(Storage::default()),
        BufferRole::Constant(data) => Ok(Storage::Owned(
            data.values
                .iter()
                .map(|&v| round_to_dtype(ty.dtype, v as f32))
                .collect(),
        )),
        BufferRole::Temporary => Ok(Storage::Owned(vec![0.0; ty.numel()])),
    }
}

/// The fed tensor `name` (an input or a parameter, `kind`), which must be of type `ty`.
fn fed<'a>(
    kind: &'static str,
    name: &str,
    source: &'a dyn crate::interp::TensorSource,
    ty: &TensorType,
) -> Result<Storage<'a>, CpuError> {
    let tensor = source.tensor(name).ok_or_else(|| CpuError::Missing {
        kind,
        name: name.to_owned(),
    })?;
    if tensor.ty != *ty {
        return Err(CpuError::TypeMismatch {
            kind,
            name: name.to_owned(),
            fed: tensor.ty.clone(),
            expected: ty.clone(),
        });
    }
    from_host(kind, name, tensor)
}

/// Writes the parameters `names`, each of the type `ty` less its leading axis, end to end
/// into `into` (a `BufferRole::StackedParameters` buffer of type `ty`).
fn stack_parameters(
    ty: &TensorType,
    names: &[String],
    feeds: &Feeds<'_>,
    into: &mut [f32],
) -> Result<(), CpuError> {
    let part = TensorType::new(ty.dtype, &ty.dims()[1..]);
    for (name, place) in names.iter().zip(into.chunks_exact_mut(part.numel())) {
        place.copy_from_slice(&fed("parameter", name, feeds.parameters, &part)?);
    }
    Ok(())
}

/// A fed tensor as the kernels see it: float values borrowed as they are, integers and bools
/// converted to f32.
fn from_host<'a>(
    kind: &'static str,
    name: &str,
    tensor: &'a HostTensor,
) -> Result<Storage<'a>, CpuError> {
    Ok(match &tensor.data {
        Data::Float(v) => Storage::Borrowed(v),
        Data::Int(v) => {
            if let Some(&bad) = v.iter().find(|x| x.unsigned_abs() >= 1 << 24) {
                return Err(CpuError::IntegerRange {
                    kind,
                    name: name.to_owned(),
                    value: bad,
                });
            }
            Storage::Owned(v.iter().map(|&x| x as f32).collect())
        }
        Data::Bool(v) => Storage::Owned(v.iter().map(|&b| f32::from(u8::from(b))).collect()),
    })
}

pub(crate) fn to_host(ty: &TensorType, values: &[f32]) -> HostTensor {
    let data = match ty.dtype {
        DType::I32 | DType::I64 => Data::Int(values.iter().map(|&v| v as i64).collect()),
        DType::Bool => Data::Bool(values.iter().map(|&v| v != 0.0).collect()),
        _ => Data::Float(values.to_vec()),
    };
    HostTensor {
        ty: ty.clone(),
        data,
    }
}
