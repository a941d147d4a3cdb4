//! Loading compiled kernels into a context and launching them.
//!
//! Launches go through `cuLaunchKernel` with a raw parameter array: the generated kernels take
//! device addresses (a buffer's base plus the element offset the code generator asks for), the
//! templates also take integers and 128-byte TMA descriptors, which cudarc's typed launcher does
//! not model.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, result, sys};
use cudarc::nvrtc::Ptx;
use fathom_compiler::codegen::{CudaKernel, CudaSource};
use fathom_compiler::kernel::BufferId;
use fathom_kernels::{ArchRequirement, KernelParam, KernelSource};

use super::CudaError;
use super::cache::{CachedKernel, KernelCache, ModuleImage};

/// A kernel loaded into a context.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub function: CudaFunction,
    pub cached: CachedKernel,
}

/// Compiles `kernel` for `arch` through `cache` and loads it into `ctx`. A kernel that uses more
/// than 48 KiB of dynamic shared memory gets the attribute that allows it.
pub fn load_kernel(
    ctx: &Arc<CudaContext>,
    cache: &KernelCache,
    kernel: &KernelSource,
    arch: &str,
) -> Result<LoadedKernel, CudaError> {
    let cached = cache.get_or_compile(kernel, arch, &[])?;
    load_compiled(ctx, kernel, cached)
}

/// Loads `kernel`, compiled as `cached` (by [`KernelCache::get_or_compile_many`], say), into
/// `ctx`, as [`load_kernel`] does.
pub fn load_compiled(
    ctx: &Arc<CudaContext>,
    kernel: &KernelSource,
    cached: CachedKernel,
) -> Result<LoadedKernel, CudaError> {
    let image = match &cached.image {
        ModuleImage::Cubin(bytes) => Ptx::from_binary(bytes.clone()),
        ModuleImage::Ptx(text) => Ptx::from_src(text.clone()),
    };
    let context = |what: &str| format!("{what} {} ({})", kernel.entry, cached.dir.display());
    let module = ctx
        .load_module(image)
        .map_err(|e| CudaError::driver(context("loading the module of"), e))?;
    let function = module
        .load_function(&kernel.entry)
        .map_err(|e| CudaError::driver(context("finding the entry point"), e))?;
    if kernel.dynamic_smem_bytes > 48 * 1024 {
        let bytes = i32::try_from(kernel.dynamic_smem_bytes).unwrap_or(i32::MAX);
        function
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
            .map_err(|e| CudaError::driver(context("raising the shared memory limit of"), e))?;
    }
    Ok(LoadedKernel { function, cached })
}

/// A generated source as a compile unit (its launch block size comes from a kernel using it).
pub fn generated_source(source: &CudaSource, block_threads: u32) -> KernelSource {
    KernelSource {
        name: source.entry.clone(),
        source: source.text.clone(),
        entry: source.entry.clone(),
        arch_requirement: ArchRequirement::Sm80OrNewer,
        block_threads,
        dynamic_smem_bytes: 0,
        // Generated kernels take `CudaKernel::args`, described by the code generator.
        params: Vec::new(),
    }
}

/// One kernel parameter's bytes, kept alive until the launch call returns.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    TensorMap(sys::CUtensorMap),
}

/// A template's arguments in its parameters' order, from `(parameter name, argument)` pairs
/// (extra pairs are ignored; a parameter without one is an error naming it and `kernel`). The
/// arguments are launch-ready [`Arg`]s, or a plan's steps that the executor resolves later.
pub fn args_by_name<T: Copy>(
    kernel: &str,
    params: &[KernelParam],
    named: &[(&str, T)],
) -> Result<Vec<T>, CudaError> {
    params
        .iter()
        .map(|param| {
            named
                .iter()
                .find(|(name, _)| *name == param.name)
                .map(|(_, arg)| *arg)
                .ok_or_else(|| {
                    CudaError::Launch(format!(
                        "{kernel}: no argument for parameter `{}`",
                        param.name
                    ))
                })
        })
        .collect()
}

/// Launches `function` on `stream` with `args` in order.
pub fn launch(
    stream: &CudaStream,
    function: &CudaFunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    dynamic_smem_bytes: u32,
    args: &mut [Arg],
) -> Result<(), CudaError> {
    let mut params: Vec<*mut c_void> = args
        .iter_mut()
        .map(|arg| match arg {
            Arg::Ptr(p) => (p as *mut u64).cast::<c_void>(),
            Arg::I32(v) => (v as *mut i32).cast::<c_void>(),
            Arg::I64(v) => (v as *mut i64).cast::<c_void>(),
            Arg::F32(v) => (v as *mut f32).cast::<c_void>(),
            Arg::F64(v) => (v as *mut f64).cast::<c_void>(),
            Arg::TensorMap(m) => (m as *mut sys::CUtensorMap).cast::<c_void>(),
        })
        .collect();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| CudaError::driver("binding the context".to_owned(), e))?;
    // SAFETY: `function` is a live kernel of this context; `params` has one pointer per
    // parameter of its entry point, in order, each to a value of the parameter's type and size
    // (device addresses as u64, int, long long, float, CUtensorMap), alive until this call returns (the
    // driver copies parameter values at launch). Pointers address live device allocations
    // sized from the buffers the kernel was generated for.
    unsafe {
        result::launch_kernel(
            function.cu_function(),
            grid,
            block,
            dynamic_smem_bytes,
            stream.cu_stream(),
            &mut params,
        )
    }
    .map_err(|e| CudaError::driver("launching a kernel".to_owned(), e))
}

/// Launches a generated kernel, with `base(buffer)` the device address of a buffer's first
/// element (buffers hold f32 values).
pub fn launch_generated(
    stream: &CudaStream,
    function: &CudaFunction,
    kernel: &CudaKernel,
    base: impl Fn(BufferId) -> u64,
) -> Result<(), CudaError> {
    let mut args: Vec<Arg> = kernel
        .args
        .iter()
        .map(|a| Arg::Ptr(base(a.buffer) + 4 * a.offset as u64))
        .collect();
    let l = kernel.launch;
    launch(
        stream,
        function,
        (l.grid, 1, 1),
        (l.block, 1, 1),
        l.dynamic_smem_bytes,
        &mut args,
    )
    .map_err(|e| e.in_kernel(&kernel.name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use fathom_kernels::FallbackGemmParams;

    use super::*;

    #[test]
    fn arguments_come_in_the_parameters_order_and_a_missing_one_is_named() {
        let params = FallbackGemmParams::new(64, 64).kernel_params();
        let names: Vec<&str> = params.iter().map(|p| p.name).collect();
        // Given backwards, with one the template does not take.
        let mut named: Vec<(&str, Arg)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, Arg::Ptr(i as u64)))
            .rev()
            .collect();
        named.push(("unused", Arg::I32(7)));
        let args = args_by_name("gemm", &params, &named).unwrap();
        let order: Vec<u64> = args
            .iter()
            .map(|a| match a {
                Arg::Ptr(p) => *p,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(order, (0..names.len() as u64).collect::<Vec<_>>());

        named.retain(|(name, _)| *name != "scale_b");
        let err = args_by_name("gemm", &params, &named).unwrap_err();
        assert_eq!(
            err.to_string(),
            CudaError::Launch("gemm: no argument for parameter `scale_b`".to_owned()).to_string()
        );
    }
}
