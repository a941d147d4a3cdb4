//! The CUDA backend, through cudarc: NVRTC compilation with a disk cache ([`cache`]), finding a
//! device or saying why there is none ([`device`]), device memory through a caching allocator
//! ([`alloc`] is the policy, [`memory`] the driver calls), loading and launching kernels
//! ([`modules`]; the FP8 GEMM template in [`fp8_gemm`], the f32 library calls in [`library`],
//! with test programs for them in [`library_samples`]) and running a compiled program
//! ([`executor`]).
//!
//! Nothing here links against the driver: cudarc opens `libcuda.so` at run time, so this builds
//! everywhere, and the parts that need no GPU (the cache, the allocator policy, the fallback, the
//! FP8 operand layout) are tested on machines without one. What needs a GPU is checked by
//! `scripts/gpu-check.sh` (`fathom gpu-check`).

pub mod alloc;
pub mod attention_samples;
pub mod cache;
pub mod device;
pub mod device_optimizer;
pub mod executor;
pub mod fp8_gemm;
pub mod gemm_choice;
pub mod gemm_tuning;
pub mod gemm_tuning_device;
pub mod library;
pub mod library_expert_wgrad;
pub mod library_fp8;
pub mod library_fp8_grouped;
pub mod library_fp8_products;
pub mod library_fp8_saved;
pub mod library_fp8_sharing;
pub mod library_fp8_weight_codes;
pub mod library_samples;
pub mod memory;
pub mod modules;
pub mod overrides;
pub mod quantize_samples;

use cudarc::driver::DriverError;
use fathom_compiler::codegen::CodegenError;
use fathom_kernels::KernelError;
use fathom_kernels::nvrtc::NvrtcError;

/// The cudarc types this module's API takes, so that callers need no cudarc dependency.
pub use cudarc::driver::{CudaContext, CudaStream};

pub use alloc::{AllocError, AllocStats, CachingAllocator, RawDevice, StreamId};
pub use cache::{CacheError, CachedKernel, KernelCache, ModuleImage};
pub use device::{GpuDevice, NoGpu, compile_target, driver_present, fallback_line};
pub use executor::{GpuExecutor, GpuKernels, GpuOptions, GpuRun, SumOwner};
pub use library::LibraryPlan;
pub use overrides::{KernelOverrides, OVERRIDE_DIR_VAR};

use crate::cpu::CpuError;

/// The kernel forms the CUDA plan runs beyond those every backend runs: causal attention whose
/// products read bf16 values, with head widths the flash-attention templates take once padded
/// ([`attention_calls`]), as calls (`library_attention.rs`); any other attention is expanded
/// into matmuls and a softmax.
pub fn lower_options() -> fathom_compiler::lower::LowerOptions {
    fathom_compiler::lower::LowerOptions {
        attention_calls: Some(attention_calls()),
        ..fathom_compiler::lower::LowerOptions::default()
    }
}

/// The attention the flash-attention templates run: bf16 products, heads padded with zeros to
/// the widths they take (`nope` and `rope` to multiples of 16, `v` to 64) within the widths
/// they hold without spilling.
pub fn attention_calls() -> fathom_compiler::lower::AttentionCalls {
    use fathom_kernels::attention::{
        BACKWARD_V_MULTIPLE, HEAD_WIDTH_MULTIPLE, MAX_QK_WIDTH, MAX_V_WIDTH,
    };
    fathom_compiler::lower::AttentionCalls {
        products_in: fathom_compiler::DType::BF16,
        width_multiple: HEAD_WIDTH_MULTIPLE as usize,
        v_multiple: BACKWARD_V_MULTIPLE as usize,
        max_qk: MAX_QK_WIDTH as usize,
        max_v: MAX_V_WIDTH as usize,
    }
}

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA driver: {context}: {source}")]
    Driver {
        context: String,
        source: DriverError,
    },
    #[error("kernel {kernel}: {source}")]
    InKernel {
        kernel: String,
        source: Box<CudaError>,
    },
    #[error("{0}")]
    Launch(String),
    #[error(
        "{what} did not finish within {limit:?}: the kernel hangs (the GPU context cannot be \
         recovered; stopping here)"
    )]
    Hung {
        what: String,
        limit: std::time::Duration,
    },
    #[error(
        "program `{program}` cannot run on the GPU: {count} library call(s) have no GPU \
         implementation: {summary}"
    )]
    UnsupportedLibraryCalls {
        program: String,
        count: usize,
        summary: String,
    },
    #[error("kernel {kernel}: index {index} out of range 0..{bound} (found on the GPU)")]
    IndexOutOfRange {
        kernel: String,
        index: f32,
        bound: i32,
    },
    #[error(
        "NVRTC cannot compile for compute capability {major}.{minor} (it supports {supported:?})"
    )]
    NoCompileTarget {
        major: i32,
        minor: i32,
        supported: Vec<i32>,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Codegen(#[from] CodegenError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Input(#[from] CpuError),
}

impl CudaError {
    pub(crate) fn driver(context: String, source: DriverError) -> Self {
        CudaError::Driver { context, source }
    }

    /// This error, said to come from `kernel`.
    pub(crate) fn in_kernel(self, kernel: &str) -> Self {
        CudaError::InKernel {
            kernel: kernel.to_owned(),
            source: Box::new(self),
        }
    }
}
