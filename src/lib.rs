//! Fathom: declare DeepSeek-V3-style models in Rust, compile and train them.
pub use fathom_compiler as compiler;
pub use fathom_macros::{model, Module};
pub use fathom_runtime as runtime;
pub use fathom_kernels as kernels;
