//! Fathom: declare DeepSeek-V3-style models in Rust, compile and train them.
pub use fathom_compiler as compiler;
pub use fathom_runtime as runtime;
