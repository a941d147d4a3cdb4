//! Fathom: declare DeepSeek-V3-style models in Rust, compile and train them.
//!
//! This crate is the facade: it re-exports the compiler, the runtime and the macros, and holds
//! the built-in architectures ([`zoo`]) and the `fathom` command line.

// Lets `fathom::model!` expand to `::fathom::…` paths inside this crate too.
extern crate self as fathom;

pub use fathom_compiler as compiler;
pub use fathom_kernels as kernels;
pub use fathom_macros::{Module, model};
pub use fathom_runtime as runtime;

pub mod zoo;
