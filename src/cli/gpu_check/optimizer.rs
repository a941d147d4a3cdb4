//! Check 3e: the optimizer's device kernels (`fathom_kernels::optimizer`) against the host's
//! optimizer, bit for bit: the gradient's sums of squares per chunk (three chunks and a ragged
//! tail), its scaling by the clipping coefficient, and one AdamW step with f32 and bf16
//! moments, of a parameter that decays and of one that does not. They are what a device-resident
//! optimizer will run; the host's results are its contract.

use std::collections::BTreeMap;

use fathom_kernels::OptimizerKernel;
use fathom_runtime::cuda::modules::Arg;
use fathom_runtime::cuda::{GpuDevice, KernelCache};
use fathom_runtime::fp8::{bf16_to_f32, f32_to_bf16};
use fathom_runtime::optim::{
    AdamW, AdamWConfig, Grads, MomentPart, MomentPrecision, NORM_CHUNK, UpdateScalars,
    clip_coefficient, clip_to_norm, global_norm, square_sums,
};
use fathom_runtime::tensor::HostTensor;

use super::launch::{Buffers, launch_named, noise};

/// Gradient values over many magnitudes (a few exact zeros), deterministic.
fn gradient(n: usize, seed: u64) -> Vec<f32> {
    let mut seed = seed;
    (0..n)
        .map(|i| match i % 101 {
            0 => 0.0,
            r => noise(&mut seed) * 10f32.powi((r % 9) as i32 - 6),
        })
        .collect()
}

/// `what: k of n differ` (a failure when k > 0), printed; the failure returned.
fn report(what: &str, differ: usize, of: usize) -> Option<String> {
    let ok = differ == 0;
    println!(
        "{what:<44} {differ} of {of} differ {}",
        if ok { "ok" } else { "FAIL" }
    );
    (!ok).then(|| format!("{what}: {differ} of {of} values differ from the host's"))
}

fn differing<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Runs every comparison; returns the failures.
pub fn check_optimizer(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let stream = device.ctx.new_stream()?;
    let mut buffers = Buffers::new(device, &stream);
    let mut failures = Vec::new();
    let launch =
        |buffers: &Buffers<'_>, kernel: OptimizerKernel, n: usize, named: &[(&str, Arg)]| {
            launch_named(
                device,
                cache,
                buffers.stream(),
                &kernel.instantiate()?,
                kernel.grid(n as u64),
                named,
            )
        };

    // The norm's sums of squares, chunk by chunk.
    let n = 3 * NORM_CHUNK + 13;
    let g = gradient(n, 0x5eed);
    let mut grads: Grads = BTreeMap::from([("w".to_owned(), g.clone())]);
    let host_sums = square_sums(&grads)["w"].clone();
    let (g_ptr, sums_ptr) = (buffers.put(&g)?, buffers.put(&vec![0f64; host_sums.len()])?);
    let sums = OptimizerKernel::SquareSums {
        chunk: NORM_CHUNK as u32,
    };
    let len = Arg::I64(n as i64);
    launch(
        &buffers,
        sums,
        n,
        &[
            ("g", Arg::Ptr(g_ptr)),
            ("n", len),
            ("sums", Arg::Ptr(sums_ptr)),
        ],
    )?;
    let device_sums: Vec<f64> = buffers.get(sums_ptr, host_sums.len())?;
    let as_bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    failures.extend(report(
        &sums.name(),
        differing(&as_bits(&device_sums), &as_bits(&host_sums)),
        host_sums.len(),
    ));

    // Clipping to a third of the norm.
    let norm = global_norm(&grads);
    let max_norm = Some(norm / 3.0);
    let coef = clip_coefficient(norm, max_norm)?
        .ok_or_else(|| anyhow::anyhow!("a third of the norm {norm} clips nothing"))?;
    clip_to_norm(&mut grads, norm, max_norm)?;
    launch(
        &buffers,
        OptimizerKernel::Scale,
        n,
        &[("x", Arg::Ptr(g_ptr)), ("n", len), ("coef", Arg::F64(coef))],
    )?;
    let clipped: Vec<f32> = buffers.get(g_ptr, n)?;
    failures.extend(report(
        &OptimizerKernel::Scale.name(),
        differing(&bits(&clipped), &bits(&grads["w"])),
        n,
    ));

    // One AdamW step (the sixth) of a [257][131] weight, which decays, and of a vector.
    for bf16_moments in [false, true] {
        for decay in [true, false] {
            let kernel = OptimizerKernel::AdamW {
                bf16_moments,
                decay,
            };
            failures.extend(adamw_step(&mut buffers, kernel, &launch)?);
        }
    }
    buffers.free()?;
    Ok(failures)
}

/// The AdamW kernel's arguments: the buffers `[p, g, m, v]` of `n` elements and the scalars.
fn adamw_args(
    [p, g, m, v]: [u64; 4],
    n: usize,
    scalars: &UpdateScalars,
) -> Vec<(&'static str, Arg)> {
    let mut named = vec![
        ("p", Arg::Ptr(p)),
        ("g", Arg::Ptr(g)),
        ("m", Arg::Ptr(m)),
        ("v", Arg::Ptr(v)),
        ("n", Arg::I64(n as i64)),
    ];
    let names = fathom_kernels::optimizer::ADAMW_SCALARS;
    named.extend((names.iter().zip(scalars.in_kernel_order())).map(|(k, s)| (*k, Arg::F32(s))));
    named
}

/// One AdamW step on the host and with `kernel`; the failures.
fn adamw_step(
    buffers: &mut Buffers<'_>,
    kernel: OptimizerKernel,
    launch: &impl Fn(&Buffers<'_>, OptimizerKernel, usize, &[(&str, Arg)]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<String>> {
    let OptimizerKernel::AdamW {
        bf16_moments,
        decay,
    } = kernel
    else {
        anyhow::bail!("{} is not an AdamW step", kernel.name());
    };
    let dims = if decay {
        vec![257, 131]
    } else {
        vec![257 * 131]
    };
    let n = 257 * 131;
    let precision = if bf16_moments {
        MomentPrecision::Bf16
    } else {
        MomentPrecision::F32
    };
    let config = AdamWConfig {
        moments: precision,
        ..AdamWConfig::default()
    };
    // Moments as the host holds them (bf16 values when bf16), v not negative.
    let held = |x: f32| {
        if bf16_moments {
            bf16_to_f32(f32_to_bf16(x))
        } else {
            x
        }
    };
    let p0 = gradient(n, 11);
    let g = gradient(n, 12);
    let m0: Vec<f32> = gradient(n, 13).into_iter().map(held).collect();
    let v0: Vec<f32> = (gradient(n, 14).into_iter()).map(|x| held(x * x)).collect();
    let part = MomentPart {
        param: "w".to_owned(),
        dims: dims.clone(),
        range: 0..n,
        m: m0.clone(),
        v: v0.clone(),
    };
    let mut optimizer = AdamW::from_parts(config, 5, [part])?;
    let lr = 3e-4;
    let scalars = optimizer.update_scalars(lr);
    let mut params = BTreeMap::from([("w".to_owned(), HostTensor::f32(dims, p0.clone()))]);
    let grads: Grads = BTreeMap::from([("w".to_owned(), g.clone())]);
    optimizer.step(&mut params, &grads, lr)?;
    let host_p = (params["w"].as_f32())
        .ok_or_else(|| anyhow::anyhow!("the host's parameter is not f32"))?
        .to_vec();
    let [host] = <[MomentPart; 1]>::try_from(optimizer.parts())
        .map_err(|_| anyhow::anyhow!("one parameter's moments"))?;

    let p = buffers.put(&p0)?;
    let g = buffers.put(&g)?;
    let (m, v) = if bf16_moments {
        let bf16 = |x: &[f32]| x.iter().map(|&v| f32_to_bf16(v)).collect::<Vec<u16>>();
        (buffers.put(&bf16(&m0))?, buffers.put(&bf16(&v0))?)
    } else {
        (buffers.put(&m0)?, buffers.put(&v0)?)
    };
    let named = adamw_args([p, g, m, v], n, &scalars);
    launch(buffers, kernel, n, &named)?;
    let moments = |at: u64| -> anyhow::Result<Vec<f32>> {
        Ok(if bf16_moments {
            let raw: Vec<u16> = buffers.get(at, n)?;
            raw.into_iter().map(bf16_to_f32).collect()
        } else {
            buffers.get(at, n)?
        })
    };
    let (device_p, device_m, device_v) = (buffers.get::<f32>(p, n)?, moments(m)?, moments(v)?);
    let name = kernel.name();
    let mut failures = Vec::new();
    for (what, device, host) in [
        ("p", &device_p, &host_p),
        ("m", &device_m, &host.m),
        ("v", &device_v, &host.v),
    ] {
        failures.extend(report(
            &format!("{name} ({what})"),
            differing(&bits(device), &bits(host)),
            n,
        ));
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_runtime::cuda::modules::args_by_name;

    /// The AdamW launches name every parameter of both moment types' kernels, the scalars the
    /// host's.
    #[test]
    fn the_adamw_launch_names_every_parameter() {
        let optimizer = AdamW::new(AdamWConfig::default(), []).unwrap();
        let scalars = optimizer.update_scalars(1e-3);
        for bf16_moments in [false, true] {
            let kernel = OptimizerKernel::AdamW {
                bf16_moments,
                decay: true,
            };
            let named = adamw_args([1, 2, 3, 4], 10, &scalars);
            let args = args_by_name(&kernel.name(), &kernel.kernel_params(), &named).unwrap();
            assert_eq!(args.len(), kernel.kernel_params().len());
        }
        // Step 1 at lr 1e-3: decay 1 - 1e-4, step size -1e-3 / (1 - 0.9).
        assert_eq!(scalars.decay, (1.0 - 1e-3 * 0.1) as f32);
        assert_eq!(scalars.neg_step_size, (-(1e-3 / (1.0 - 0.9f64))) as f32);
    }
}
