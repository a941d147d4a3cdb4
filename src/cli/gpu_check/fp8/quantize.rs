//! Check 3b: the quantisation templates against the CPU's quantizers, bit for bit (codes and
//! scales, in the layouts the FP8 GEMMs read).

use fathom_kernels::quantize::PRODUCT_INTS;
use fathom_runtime::cuda::modules::Arg;
use fathom_runtime::cuda::quantize_samples::{QuantizeSample, quantize_samples};
use fathom_runtime::cuda::{GpuDevice, KernelCache};

use crate::cli::gpu_check::launch::{Buffers, launch_named};

/// Runs every sample; returns the failures.
pub fn check_quantize(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let stream = device.ctx.new_stream()?;
    let mut failures = Vec::new();
    for sample in quantize_samples()? {
        let name = sample.params.name();
        let mut buffers = Buffers::new(device, &stream);
        let (codes, scales) = run(device, cache, &mut buffers, &sample)?;
        buffers.free()?;
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
    Ok(failures)
}

/// The launch's arguments by parameter name, the buffers at `x`, `q`, `scales`, `sources`
/// (the gathered kind's source rows) and `second` (E4M3 tiles' scales, or a product's `y`).
fn named_args(
    sample: &QuantizeSample,
    [x, q, scales, sources, second]: [u64; 5],
) -> Vec<(&'static str, Arg)> {
    let int = |v: usize| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
    let mut named = vec![
        ("x", Arg::Ptr(x)),
        ("q", Arg::Ptr(q)),
        ("scales", Arg::Ptr(scales)),
        ("rows", int(sample.rows)),
        ("cols", int(sample.cols)),
    ];
    if sample.source_rows.is_some() {
        named.push(("source_rows", Arg::Ptr(sources)));
    }
    if let Some((_, x_rows)) = &sample.input_tiles {
        named.extend([("x_scales", Arg::Ptr(second)), ("x_rows", int(*x_rows))]);
    }
    if let Some((_, ints)) = &sample.input_product {
        named.push(("y", Arg::Ptr(second)));
        named.extend(
            PRODUCT_INTS
                .iter()
                .zip(ints)
                .map(|(name, v)| (*name, Arg::I32(*v))),
        );
    }
    named
}

/// The codes and scales the template writes for `sample` (scales start zeroed, as the padding
/// the template leaves).
fn run(
    device: &GpuDevice,
    cache: &KernelCache,
    buffers: &mut Buffers<'_>,
    sample: &QuantizeSample,
) -> anyhow::Result<(Vec<u8>, Vec<f32>)> {
    let params = sample.params;
    let x = buffers.put(&sample.input)?;
    let q = buffers.put(&vec![0u8; sample.codes.len()])?;
    let scales = buffers.put(&vec![0f32; sample.scales.len()])?;
    let sources = match &sample.source_rows {
        Some(sources) => buffers.put(sources)?,
        None => 0,
    };
    let second = match (&sample.input_tiles, &sample.input_product) {
        (Some((scales, _)), _) => buffers.put(scales)?,
        (_, Some((y, _))) => buffers.put(y)?,
        (None, None) => 0,
    };
    launch_named(
        device,
        cache,
        buffers.stream(),
        &params.instantiate()?,
        params.grid(sample.rows as u32, sample.cols as u32),
        &named_args(sample, [x, q, scales, sources, second]),
    )?;
    Ok((
        buffers.get(q, sample.codes.len())?,
        buffers.get(scales, sample.scales.len())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run` names every parameter of every quantisation template it launches.
    #[test]
    fn every_template_parameter_is_named() {
        use fathom_runtime::cuda::modules::args_by_name;
        for sample in quantize_samples().unwrap() {
            let params = sample.params;
            let named = named_args(&sample, [1, 2, 3, 4, 5]);
            let args = args_by_name(&params.name(), &params.kernel_params(), &named);
            assert!(args.is_ok(), "{}: {args:?}", params.name());
        }
    }
}
