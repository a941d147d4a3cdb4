//! Loop nests compiled to native code with cranelift, once per program.
//!
//! Each loop kernel becomes one function `fn(buffers, row_begin, row_end)` over a range of its
//! flattened outer index, so the executor can hand disjoint row ranges to rayon threads. The
//! generated code computes exactly what the row evaluator in [`super::loops`] computes, bit for
//! bit: the same operations in the same order, sums and means accumulated sequentially in f64
//! (so a row's result does not depend on how rows are split across threads), `exp` and the
//! sigmoid on four lanes inline with the operations of the reference's own `exp`
//! ([`super::expf`]), the rounding to bf16 inline on the bits, and `log`, single lanes of
//! `exp`/sigmoid and the roundings to f16/fp8 done by calling the very Rust functions the
//! reference calls. Statements whose loads and store are contiguous or broadcast along the
//! innermost axis run four lanes at a time (F32X4) with a scalar tail; the others run one
//! element at a time.
//!
//! What is not compiled falls back to the row evaluator, kernel by kernel, with the reason in
//! [`JitReport`]: views that leave their buffer (the generated code has no bounds checks),
//! kernels reading a buffer they write other than element for element through the view that
//! stores it (the code streams where the reference stores a whole row at once), rows used
//! before their reduction, and anything cranelift rejects.

mod codegen;
mod emit;
mod intrinsics;
mod plan;
#[cfg(test)]
mod tests;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cranelift_codegen::ir::types;
use cranelift_codegen::ir::{AbiParam, Signature};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, ModuleError, default_libcall_names};
use fathom_compiler::kernel::{BufferId, KernelBody, LoopNest, Program};
use rayon::prelude::*;
use thiserror::Error;

use intrinsics::Intrinsic;
use plan::NestPlan;

use super::Storage;

/// The environment variable naming a directory where every compiled loop kernel's cranelift
/// IR and machine code are written, as `<dir>/<program>/k<index>.clif` and `.s`: what the JIT
/// made of each loop nest of the kernel IR (which `fathom inspect` writes).
pub const DUMP_ENV: &str = "FATHOM_JIT_DUMP";

/// Why a loop kernel runs on the row evaluator instead of compiled code.
#[derive(Debug, Error)]
pub enum JitError {
    #[error("cranelift cannot be set up for this machine: {0}")]
    Setup(String),
    #[error("cranelift: {0}")]
    Cranelift(#[source] Box<ModuleError>),
    #[error("linking the compiled kernels failed: {0}")]
    Link(String),
    #[error("row {row} is used before the reduction that defines it")]
    RowBeforeReduce { row: usize },
    #[error("the kernel reads buffer {} other than through the one view that writes it", .buffer.0)]
    ReadsItsOutput { buffer: BufferId },
    #[error("a view of buffer {} has {strides} strides, too few for a domain of rank {rank}", .buffer.0)]
    StrideRank {
        buffer: BufferId,
        strides: usize,
        rank: usize,
    },
    #[error("a view names buffer {}, which the program does not have", .buffer.0)]
    NoSuchBuffer { buffer: BufferId },
    #[error("a view of buffer {} reaches elements {low}..={high}, outside 0..{len}", .buffer.0)]
    OutOfBounds {
        buffer: BufferId,
        low: i64,
        high: i64,
        len: usize,
    },
}

impl From<ModuleError> for JitError {
    fn from(error: ModuleError) -> Self {
        JitError::Cranelift(Box::new(error))
    }
}

/// What the JIT did with a program.
#[derive(Debug, Default)]
pub struct JitReport {
    /// Loop kernels compiled to native code.
    pub compiled: usize,
    /// Loop kernels left to the row evaluator: kernel name and why.
    pub fallbacks: Vec<(String, JitError)>,
    /// Wall time of building, compiling and linking every function.
    pub compile_time: Duration,
}

/// `fn(buffer base pointers, first row, end row)`: runs rows `begin..end` of a loop nest.
type KernelFn = unsafe extern "C" fn(*const *mut f32, u64, u64);

/// Below this many element-statements, a kernel runs on the calling thread: rayon's hand-off
/// costs a few microseconds, about what a thread computes in that much work.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// One compiled loop nest.
#[derive(Debug)]
pub(super) struct CompiledNest {
    entry: KernelFn,
    slots: Vec<BufferId>,
    lens: Vec<usize>,
    written: Vec<bool>,
    rows: usize,
    /// Element-statements per row, to size thread chunks.
    row_work: usize,
    parallel: bool,
}

/// The buffer pointers of one kernel call, shared by the threads running its rows.
struct PointerTable(Vec<*mut f32>);

// SAFETY: the pointers are only dereferenced by the generated kernel, which reads a buffer it
// writes only at the elements the same point writes (checked by `plan`) and, when rows run on
// several threads, writes disjoint elements from different rows (`NestPlan::parallel`); the
// buffers outlive the call.
unsafe impl Sync for PointerTable {}

impl PointerTable {
    fn as_ptr(&self) -> *const *mut f32 {
        self.0.as_ptr()
    }
}

impl CompiledNest {
    /// Runs the kernel over all rows, on several threads when it is large enough.
    pub(super) fn run(&self, buffers: &mut [Storage<'_>]) {
        if self.rows == 0 {
            return;
        }
        let mut pointers = Vec::with_capacity(self.slots.len());
        for ((&buffer, &len), &written) in self.slots.iter().zip(&self.lens).zip(&self.written) {
            let data = &mut buffers[buffer.index()];
            // The bounds proof of `plan` assumed these lengths; a mismatch would make the
            // unchecked accesses of the generated code unsound.
            assert_eq!(
                data.len(),
                len,
                "buffer {} has an unexpected length",
                buffer.0
            );
            // Buffers the kernel only reads may be borrowed (parameters, inputs): the
            // generated code never writes through their pointers.
            pointers.push(if written {
                data.as_mut_ptr()
            } else {
                data.as_ptr().cast_mut()
            });
        }
        let table = PointerTable(pointers);
        let rows = self.rows as u64;
        let work = self.rows.saturating_mul(self.row_work);
        let threads = rayon::current_num_threads();
        if !self.parallel || self.rows < 2 || threads < 2 || work < PARALLEL_MIN_WORK {
            // SAFETY: every access of the function lies inside the buffers (`plan` proved it
            // for buffers of the lengths asserted above), and nothing else touches them now
            // (`buffers` is borrowed mutably).
            unsafe { (self.entry)(table.as_ptr(), 0, rows) };
            return;
        }
        // Chunks of at least PARALLEL_MIN_WORK / 4, a few per thread to balance the load.
        let min_rows = (PARALLEL_MIN_WORK / 4).div_ceil(self.row_work.max(1));
        let per_chunk = min_rows.max(self.rows.div_ceil(threads * 4)) as u64;
        let chunks = rows.div_ceil(per_chunk);
        (0..chunks).into_par_iter().for_each(|c| {
            let begin = c * per_chunk;
            let end = (begin + per_chunk).min(rows);
            // SAFETY: as above for the bounds; the chunks' row ranges are disjoint and rows
            // write disjoint elements (`parallel`), and a row reads of the written buffers only
            // the elements it writes itself, so the threads never race.
            unsafe { (self.entry)(table.as_ptr(), begin, end) };
        });
    }
}

/// The compiled loop kernels of a program, and the code memory they live in.
pub(super) struct JitProgram {
    /// Indexed like the program's kernels; `None` for library calls and fallbacks.
    kernels: Vec<Option<CompiledNest>>,
    report: JitReport,
    /// Owns the code the entries point into; freed on drop. Behind a mutex only to make the
    /// program `Sync`: it is never touched between compilation and drop.
    module: Mutex<Option<JITModule>>,
}

impl std::fmt::Debug for JitProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitProgram")
            .field("kernels", &self.kernels)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Drop for JitProgram {
    fn drop(&mut self) {
        let module = match self.module.get_mut() {
            Ok(module) => module.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(module) = module {
            self.kernels.clear();
            // SAFETY: the entries pointing into this memory were just dropped, and none is
            // running: running one borrows `self`, which `drop` has exclusively.
            unsafe { module.free_memory() };
        }
    }
}

impl JitProgram {
    /// Compiles every loop kernel of `program`; those that cannot be compiled are reported
    /// and left to the row evaluator.
    pub(super) fn compile(program: &Program) -> JitProgram {
        let dump = std::env::var_os(DUMP_ENV)
            .filter(|dir| !dir.is_empty())
            .map(|dir| std::path::PathBuf::from(dir).join(&program.name));
        Self::compile_dumping(program, dump)
    }

    /// [`JitProgram::compile`], writing each function's IR and machine code to `dump`.
    fn compile_dumping(program: &Program, dump: Option<std::path::PathBuf>) -> JitProgram {
        let start = Instant::now();
        let nests: Vec<(usize, &LoopNest)> = program
            .kernels
            .iter()
            .enumerate()
            .filter_map(|(i, k)| match &k.body {
                KernelBody::Loop(nest) => Some((i, nest)),
                KernelBody::Library(_) => None,
            })
            .collect();
        let mut kernels: Vec<Option<CompiledNest>> = program.kernels.iter().map(|_| None).collect();
        let mut report = JitReport::default();
        let mut fallback = |i: usize, error: JitError| {
            report
                .fallbacks
                .push((program.kernels[i].name.clone(), error));
        };
        let (mut module, imports) = match new_module() {
            Ok(setup) => setup,
            Err(error) => {
                let message = error.to_string();
                for &(i, _) in &nests {
                    fallback(i, JitError::Setup(message.clone()));
                }
                report.compile_time = start.elapsed();
                return JitProgram {
                    kernels,
                    report,
                    module: Mutex::new(None),
                };
            }
        };
        let mut defined: Vec<(usize, NestPlan, FuncId, usize)> = Vec::new();
        let mut builder = codegen::Builder::new(&mut module, imports, dump);
        for &(i, nest) in &nests {
            let compiled = plan::plan(nest, &program.buffers)
                .and_then(|plan| Ok((builder.define(&format!("k{i}"), nest, &plan)?, plan)));
            match compiled {
                Ok((id, plan)) => defined.push((i, plan, id, nest.body.len())),
                Err(error) => fallback(i, error),
            }
        }
        if let Err(error) = module.finalize_definitions() {
            let message = error.to_string();
            for (i, ..) in defined.drain(..) {
                fallback(i, JitError::Link(message.clone()));
            }
        }
        for (i, plan, id, statements) in defined {
            let code = module.get_finalized_function(id);
            // SAFETY: `code` is a finalized function that `codegen` built with exactly this
            // signature (three pointer-sized integers, no result) in the host calling
            // convention, which is `extern "C"`'s.
            let entry = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
            let row_work = plan.inner.max(1) * statements.max(1);
            kernels[i] = Some(CompiledNest {
                entry,
                slots: plan.slots,
                lens: plan.lens,
                written: plan.written,
                rows: plan.rows,
                row_work,
                parallel: plan.parallel,
            });
            report.compiled += 1;
        }
        report.compile_time = start.elapsed();
        JitProgram {
            kernels,
            report,
            module: Mutex::new(Some(module)),
        }
    }

    /// The compiled code of kernel `index`, if it was compiled.
    pub(super) fn kernel(&self, index: usize) -> Option<&CompiledNest> {
        self.kernels.get(index).and_then(Option::as_ref)
    }

    pub(super) fn report(&self) -> &JitReport {
        &self.report
    }
}

/// A JIT module for the host, optimising for speed, with the intrinsics declared.
fn new_module() -> Result<(JITModule, Vec<(Intrinsic, FuncId)>), JitError> {
    let mut flags = settings::builder();
    let set = |flags: &mut settings::Builder, name: &str, value: &str| {
        flags
            .set(name, value)
            .map_err(|e| JitError::Setup(format!("{name}={value}: {e}")))
    };
    set(&mut flags, "opt_level", "speed")?;
    // The IR verifier costs about 40% of compile time; tests (debug assertions) keep it.
    let verify = if cfg!(debug_assertions) {
        "true"
    } else {
        "false"
    };
    set(&mut flags, "enable_verifier", verify)?;
    // The JIT links by absolute address (what `JITBuilder::with_flags` sets too).
    set(&mut flags, "use_colocated_libcalls", "false")?;
    set(&mut flags, "is_pic", "false")?;
    let isa = cranelift_native::builder()
        .map_err(|e| JitError::Setup(e.to_owned()))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| JitError::Setup(e.to_string()))?;
    if isa.pointer_type() != types::I64 {
        return Err(JitError::Setup("pointers are not 64 bits wide".to_owned()));
    }
    let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
    for intrinsic in Intrinsic::ALL {
        builder.symbol(intrinsic.symbol(), intrinsic.address());
    }
    let mut module = JITModule::new(builder);
    let imports = declare_intrinsics(&mut module)?;
    Ok((module, imports))
}

/// Declares every intrinsic as an imported `f32 -> f32` function.
fn declare_intrinsics(module: &mut JITModule) -> Result<Vec<(Intrinsic, FuncId)>, JitError> {
    let mut signature: Signature = module.make_signature();
    signature.params.push(AbiParam::new(types::F32));
    signature.returns.push(AbiParam::new(types::F32));
    let mut imports = Vec::new();
    for intrinsic in Intrinsic::ALL {
        let id = module.declare_function(intrinsic.symbol(), Linkage::Import, &signature)?;
        imports.push((intrinsic, id));
    }
    Ok(imports)
}
