//! Running a graph: through the reference interpreter, or compiled for the CPU.

use std::collections::BTreeMap;

use fathom_compiler::Graph;
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::lower::LowerError;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cpu::{CpuError, CpuProgram};
use crate::interp::{Feeds, InterpError, evaluate};
use crate::tensor::HostTensor;

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
}

#[derive(Debug, Error)]
pub enum ExecError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
}

/// A graph prepared for one backend.
#[derive(Debug)]
pub enum Executable {
    Interpreter(Graph),
    Cpu(Box<CpuProgram>),
}

impl Executable {
    pub fn new(graph: Graph, backend: Backend) -> Result<Self, ExecError> {
        Ok(match backend {
            Backend::Interpreter => Executable::Interpreter(graph),
            // The full pipeline (passes, lowering, memory plan); `FATHOM_DUMP_DIR` dumps it.
            Backend::Cpu => {
                let compiled = compile(&graph, &CompileOptions::from_env())?;
                Executable::Cpu(Box::new(CpuProgram::new(compiled.program)))
            }
        })
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
        })
    }
}
