//! The CPU backend: runs a kernel [`Program`] — loop nests and library calls over buffers.
//!
//! Every buffer is held as f32 values: floats of narrower types hold their rounded values (as
//! in the interpreter), integers and bools their exact values (integer inputs must stay below
//! 2^24 in magnitude, which token and expert ids do by far), so one code path serves all
//! kernels. Matmuls run on the `gemm` crate; the grouped expert matmuls gather each expert's
//! rows and run one GEMM per expert. Loop nests are compiled once per program to native code
//! by the cranelift JIT in [`jit`] (rows split across rayon threads); the row evaluator in
//! [`loops`] is their reference and runs the kernels the JIT leaves (see [`JitReport`]).

mod grouped;
mod jit;
mod library;
mod loops;

use fathom_compiler::kernel::{BufferRole, KernelBody, Program};
use fathom_compiler::{DType, TensorType};
use thiserror::Error;

pub use jit::{JitError, JitReport};

use crate::interp::{Feeds, round_to_dtype};
use crate::tensor::{Data, HostTensor};

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
}

/// A program ready to run on the CPU.
#[derive(Debug)]
pub struct CpuProgram {
    program: Program,
    /// The compiled loop kernels; `None` when every loop runs on the row evaluator.
    jit: Option<Box<jit::JitProgram>>,
    /// Pooled storage for temporaries, kept between runs (fresh allocations of large buffers
    /// cost a page fault per 4 KiB on first touch, which dominated small steps).
    scratch: std::sync::Mutex<Vec<Vec<f32>>>,
    lifetimes: Lifetimes,
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
        CpuProgram {
            program,
            jit: Some(jit),
            scratch: Default::default(),
            lifetimes,
        }
    }

    /// Runs every loop kernel on the row evaluator: the reference the JIT is checked against.
    pub fn without_jit(program: Program) -> Self {
        let lifetimes = Lifetimes::of(&program);
        CpuProgram {
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
        mut observe: Option<&mut KernelObserver<'_>>,
    ) -> Result<CpuOutputs, CpuError> {
        // Temporaries live from the kernel that first writes them to the last that reads them
        // (the memory plan's lifetimes): storage is taken from a pool when one starts and given
        // back when it dies, so a run holds about the plan's peak, not every temporary. The pool
        // survives between runs (another thread running the program at the same time starts
        // with an empty one).
        let mut pool = self
            .scratch
            .try_lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let mut buffers: Vec<Vec<f32>> = Vec::with_capacity(self.program.buffers.len());
        for buffer in &self.program.buffers {
            buffers.push(match &buffer.role {
                BufferRole::Temporary => Vec::new(),
                role => initial_contents(&buffer.ty, role, feeds)?,
            });
        }
        for (index, kernel) in self.program.kernels.iter().enumerate() {
            for &b in &self.lifetimes.starting[index] {
                buffers[b] = take_storage(&mut pool, self.program.buffers[b].ty.numel());
            }
            if let Some(observe) = observe.as_mut() {
                observe(index, KernelPhase::Before, &buffers);
            }
            let compiled = self.jit.as_ref().and_then(|jit| jit.kernel(index));
            match (&kernel.body, compiled) {
                (KernelBody::Loop(_), Some(compiled)) => compiled.run(&mut buffers),
                (KernelBody::Loop(nest), None) => loops::run(nest, &mut buffers),
                (KernelBody::Library(call), _) => library::run(
                    &kernel.name,
                    call,
                    &self.program,
                    &mut buffers,
                    feeds.experts,
                )?,
            }
            if let Some(observe) = observe.as_mut() {
                observe(index, KernelPhase::After, &buffers);
            }
            for &b in &self.lifetimes.ending[index] {
                pool.push(std::mem::take(&mut buffers[b]));
            }
        }
        let outputs = self
            .program
            .outputs
            .iter()
            .map(|(name, id)| {
                (
                    name.clone(),
                    to_host(&self.program.buffer(*id).ty, &buffers[id.index()]),
                )
            })
            .collect();
        for (buffer, storage) in self.program.buffers.iter().zip(buffers) {
            if matches!(buffer.role, BufferRole::Temporary) && storage.capacity() > 0 {
                pool.push(storage);
            }
        }
        if let Ok(mut scratch) = self.scratch.try_lock() {
            *scratch = pool;
        }
        Ok(CpuOutputs { outputs })
    }
}

/// What [`CpuProgram::run_observed`] calls: kernel index, phase, every buffer.
pub type KernelObserver<'a> = dyn FnMut(usize, KernelPhase, &[Vec<f32>]) + 'a;

/// When [`CpuProgram::run_observed`] shows the buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPhase {
    Before,
    After,
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

/// Storage for `len` values: the smallest pooled allocation that holds them, else a new one.
/// Contents are stale or zero; every temporary is completely written before it is read.
fn take_storage(pool: &mut Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i);
    let mut storage = match best {
        Some(i) => pool.swap_remove(i),
        None => Vec::new(),
    };
    storage.resize(len, 0.0);
    storage
}

pub(crate) fn initial_contents(
    ty: &TensorType,
    role: &BufferRole,
    feeds: &Feeds<'_>,
) -> Result<Vec<f32>, CpuError> {
    let fed = |kind: &'static str, name: &str, source: &dyn crate::interp::TensorSource| {
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
    };
    match role {
        BufferRole::Input(name) => fed("input", name, feeds.inputs),
        BufferRole::Parameter(name) => fed("parameter", name, feeds.parameters),
        BufferRole::Constant(data) => Ok(data
            .values
            .iter()
            .map(|&v| round_to_dtype(ty.dtype, v as f32))
            .collect()),
        BufferRole::Temporary => Ok(vec![0.0; ty.numel()]),
    }
}

fn from_host(kind: &'static str, name: &str, tensor: &HostTensor) -> Result<Vec<f32>, CpuError> {
    Ok(match &tensor.data {
        Data::Float(v) => v.clone(),
        Data::Int(v) => {
            if let Some(&bad) = v.iter().find(|x| x.unsigned_abs() >= 1 << 24) {
                return Err(CpuError::IntegerRange {
                    kind,
                    name: name.to_owned(),
                    value: bad,
                });
            }
            v.iter().map(|&x| x as f32).collect()
        }
        Data::Bool(v) => v.iter().map(|&b| f32::from(u8::from(b))).collect(),
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
