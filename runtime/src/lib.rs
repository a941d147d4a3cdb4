//! Fathom's runtime: everything that touches data and hardware. For now, the host tensors, the
//! reference interpreter (the oracle every backend is checked against), weights in the Hugging
//! Face safetensors layout and random initialisation.

pub mod cpu;
pub mod cuda;
pub mod data;
pub mod exec;
mod fma;
pub mod fp8;
pub mod init;
pub mod interp;
pub mod optim;
pub mod parallel;
pub mod pretrained;
pub mod tensor;
pub mod train;
pub mod weights;

pub use tensor::{Data, HostTensor};
