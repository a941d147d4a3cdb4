//! Fathom's compiler: the tensor graph IR, the DeepSeek-V3 model library written with its
//! builder, reverse-mode autodiff, and (later) passes and code generation.
//!
//! This crate knows nothing of devices: it produces data (graphs, and later kernel sources and
//! schedules) that the runtime executes.

pub mod autodiff;
pub mod codegen;
pub mod compile;
pub mod dtype;
pub mod error;
pub mod graph;
pub mod kernel;
pub mod lower;
pub mod model;
pub mod module;
pub mod partition;
pub mod passes;
pub mod pipeline;
pub mod precision;
pub mod spec;
pub mod training;

pub use dtype::{DType, Shape, TensorType};
pub use error::GraphError;
pub use graph::{Graph, GraphBuilder, NodeId, Op, Tensor};
