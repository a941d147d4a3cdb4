//! The CUDA backend, through cudarc: NVRTC compilation with a disk cache ([`cache`]), finding a
//! device or saying why there is none ([`device`]), device memory through a caching allocator
//! ([`alloc`] is the policy, [`memory`] the driver calls), loading and launching the generated
//! kernels and templates ([`modules`], [`fp8_gemm`]) and running a compiled program
//! ([`executor`]).
//!
//! Nothing here links against the driver: cudarc opens `libcuda.so` at run time, so this builds
//! and the parts that need no GPU (the cache, the allocator policy, the fallback) are tested on
//! machines without one. What needs a GPU is checked by `scripts/gpu-check.sh`.

pub mod alloc;
pub mod cache;
pub mod device;

pub use alloc::{AllocError, AllocStats, CachingAllocator, RawDevice, StreamId};
pub use cache::{CacheError, CachedKernel, KernelCache, ModuleImage};
pub use device::{GpuDevice, NoGpu, compile_target, fallback_line};
