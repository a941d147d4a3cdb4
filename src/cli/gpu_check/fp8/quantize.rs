//! Check 3b: the quantisation templates against the CPU's quantizers, bit for bit (codes and
//! scales, in the layouts the FP8 GEMMs read).

use fathom_runtime::cuda::memory::{DriverMemory, download, stream_id, upload};
use fathom_runtime::cuda::modules::{Arg, launch, load_kernel};
use fathom_runtime::cuda::quantize_samples::{QuantizeSample, quantize_samples};
use fathom_runtime::cuda::{CachingAllocator, CudaStream, GpuDevice, KernelCache};

use super::{HANG_LIMIT, finish_within};

/// Runs every sample; returns the failures.
pub fn check_quantize(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let stream = device.ctx.new_stream()?;
    let mut allocator = CachingAllocator::new(DriverMemory::new(device.ctx.clone()));
    let mut failures = Vec::new();
    for sample in quantize_samples()? {
        let name = sample.params.name();
        let (codes, scales) = run(device, cache, &stream, &mut allocator, &sample)?;
        let wrong_codes = codes
            .iter()
            .zip(&sample.codes)
            .filter(|(a, b)| a != b)
            .count();
        let wrong_scales = scales
            .iter()
            .zip(&sample.scales)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let ok = wrong_codes == 0 && wrong_scales == 0;
        println!(
            "{:<44} [{}][{}]: {wrong_codes} of {} codes and {wrong_scales} of {} scales differ {}",
            name,
            sample.rows,
            sample.cols,
            codes.len(),
            scales.len(),
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!(
                "{name}: {wrong_codes} codes and {wrong_scales} scales differ from the CPU's"
            ));
        }
    }
    stream.synchronize()?;
    allocator.streams_synchronized();
    allocator.empty_cache()?;
    Ok(failures)
}

/// The codes and scales the template writes for `sample` (scales start zeroed, as the padding
/// the template leaves).
fn run(
    device: &GpuDevice,
    cache: &KernelCache,
    stream: &CudaStream,
    allocator: &mut CachingAllocator<DriverMemory>,
    sample: &QuantizeSample,
) -> anyhow::Result<(Vec<u8>, Vec<f32>)> {
    let params = sample.params;
    let source = params.instantiate()?;
    let kernel = load_kernel(&device.ctx, cache, &source, &device.arch())?;
    let mut alloc = |bytes: &[u8]| -> anyhow::Result<_> {
        let block = allocator.alloc(bytes.len(), stream_id(stream))?;
        upload(stream, block.ptr, bytes)?;
        Ok(block)
    };
    let x = alloc(&sample.input)?;
    let q = alloc(&vec![0u8; sample.codes.len()])?;
    let scales = alloc(&vec![0u8; 4 * sample.scales.len()])?;
    let int = |v: usize| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
    let mut args = Vec::new();
    for param in params.kernel_params() {
        args.push(match param.name {
            "x" => Arg::Ptr(x.ptr),
            "q" => Arg::Ptr(q.ptr),
            "scales" => Arg::Ptr(scales.ptr),
            "rows" => int(sample.rows),
            "cols" => int(sample.cols),
            other => anyhow::bail!("{}: unknown parameter `{other}`", params.name()),
        });
    }
    let [gx, gy, gz] = params.grid(sample.rows as u32, sample.cols as u32);
    launch(
        stream,
        &kernel.function,
        (gx, gy, gz),
        (params.block_threads(), 1, 1),
        source.dynamic_smem_bytes,
        &mut args,
    )?;
    finish_within(device, stream, HANG_LIMIT, || params.name())?;
    let mut codes = vec![0u8; sample.codes.len()];
    download(stream, q.ptr, &mut codes)?;
    let mut values = vec![0f32; sample.scales.len()];
    download(stream, scales.ptr, &mut values)?;
    for block in [x, q, scales] {
        allocator.free(block)?;
    }
    Ok((codes, values))
}
