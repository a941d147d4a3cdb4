//! What the template checks share: device buffers freed together, a template launched with its
//! arguments by parameter name, and a guard that names a launch that never finishes.

use fathom_kernels::KernelSource;
use fathom_runtime::cuda::alloc::Block;
use fathom_runtime::cuda::memory::{
    DriverMemory, HANG_LIMIT, download, finish_within, mean_launch_ms, stream_id, upload,
};
use fathom_runtime::cuda::modules::{Arg, args_by_name, launch, load_kernel};
use fathom_runtime::cuda::{CachingAllocator, CudaStream, GpuDevice, KernelCache};

/// Device buffers of one check, on one stream, freed together.
pub struct Buffers<'a> {
    allocator: CachingAllocator<DriverMemory>,
    stream: &'a CudaStream,
    blocks: Vec<Block>,
}

impl<'a> Buffers<'a> {
    pub fn new(device: &GpuDevice, stream: &'a CudaStream) -> Self {
        Buffers {
            allocator: CachingAllocator::new(DriverMemory::new(device.ctx.clone())),
            stream,
            blocks: Vec::new(),
        }
    }

    pub fn stream(&self) -> &'a CudaStream {
        self.stream
    }

    /// A buffer holding `values`; its device address.
    pub fn put<T: Copy>(&mut self, values: &[T]) -> anyhow::Result<u64> {
        let block = self
            .allocator
            .alloc(size_of_val(values).max(1), stream_id(self.stream))?;
        upload(self.stream, block.ptr, values)?;
        let ptr = block.ptr;
        self.blocks.push(block);
        Ok(ptr)
    }

    /// `len` values read back from `ptr`.
    pub fn get<T: Copy + Default>(&self, ptr: u64, len: usize) -> anyhow::Result<Vec<T>> {
        let mut values = vec![T::default(); len];
        download(self.stream, ptr, &mut values)?;
        Ok(values)
    }

    /// Frees every buffer (after the stream's work is done).
    pub fn free(mut self) -> anyhow::Result<()> {
        self.stream.synchronize()?;
        for block in std::mem::take(&mut self.blocks) {
            self.allocator.free(block)?;
        }
        self.allocator.streams_synchronized();
        self.allocator.empty_cache()?;
        Ok(())
    }
}

/// Compiles `source` for the device (through the cache), launches it with `named` arguments in
/// its parameters' order (every parameter must be named), and waits for it within
/// [`HANG_LIMIT`].
pub fn launch_named(
    device: &GpuDevice,
    cache: &KernelCache,
    stream: &CudaStream,
    source: &KernelSource,
    grid: [u32; 3],
    named: &[(&str, Arg)],
) -> anyhow::Result<()> {
    let kernel = load_kernel(&device.ctx, cache, source, &device.arch())?;
    let mut args = args_by_name(&source.name, &source.params, named)?;
    let [gx, gy, gz] = grid;
    launch(
        stream,
        &kernel.function,
        (gx, gy, gz),
        (source.block_threads, 1, 1),
        source.dynamic_smem_bytes,
        &mut args,
    )?;
    Ok(finish_within(stream, HANG_LIMIT, || source.name.clone())?)
}

/// Milliseconds per launch, averaged over `iters` launches after three unmeasured ones (which
/// must finish within [`HANG_LIMIT`]).
pub fn time_launches(
    stream: &CudaStream,
    launch: impl Fn() -> anyhow::Result<()>,
    iters: u32,
    what: impl FnOnce() -> String,
) -> anyhow::Result<f64> {
    mean_launch_ms(stream, (3, iters), launch, || {
        Ok(finish_within(stream, HANG_LIMIT, what)?)
    })
}

/// The JSON at `path` (timings a PyTorch script wrote), or `None` with a line saying what
/// `missing` is not compared when no path was given.
pub fn optional_json<T: serde::de::DeserializeOwned>(
    path: Option<&std::path::Path>,
    missing: &str,
) -> anyhow::Result<Option<T>> {
    use anyhow::Context;
    let Some(path) = path else {
        println!("({missing} is not compared)");
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| path.display().to_string())?,
    ))
}

/// A deterministic pseudo-random value in [-1, 1) (xorshift; no dependency for a check).
pub fn noise(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}
