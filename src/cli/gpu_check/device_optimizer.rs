//! Check 2's last comparison: the GPU keeping the optimizer (`GpuExecutor::keep_optimizer`:
//! the norm's chunk sums, the clipping and AdamW on the device, the weights' FP8 codes remade
//! after each step) against the same GPU with the optimizer on the host. Both run the same
//! kernels on the same batches, and the device's optimizer kernels round as the host's (check
//! 3e), so every loss, gradient norm, weight and moment must agree bit for bit.

use fathom_compiler::graph::Accumulation;
use fathom_compiler::precision::{Precision, PrecisionPolicy};
use fathom_runtime::HostTensor;
use fathom_runtime::exec::Backend;
use fathom_runtime::parallel::PipelineSettings;
use fathom_runtime::train::Trainer;

use super::{tiny_spec, tiny_trainer};

/// `steps` steps of the tiny model in FP8 (so that the weights' codes must follow each
/// update), the optimizer on the device against on the host; the failures.
pub fn compare_device_optimizer(steps: u64) -> anyhow::Result<Vec<String>> {
    println!("FP8, the optimizer on the GPU against on the host (both on the GPU), bit for bit:");
    let fp8 = PrecisionPolicy {
        accumulation: Accumulation::HOPPER,
        ..PrecisionPolicy::uniform(Precision::Fp8)
    };
    let trainer = || {
        let spec = tiny_spec(false)?;
        tiny_trainer(
            spec,
            Backend::Cuda,
            steps,
            fp8.clone(),
            PipelineSettings::default(),
        )
    };
    let mut device = trainer()?;
    let mut host = trainer()?;
    host.keep_optimizer_on_host()?;
    if !device.optimizer_on_device() {
        println!("FAIL: the GPU did not keep the optimizer");
        return Ok(vec![
            "the GPU running the whole graph did not keep the optimizer".into(),
        ]);
    }
    let mut failures = Vec::new();
    for step in 1..=steps {
        let (d, h) = (device.step()?, host.step()?);
        let same =
            d.loss.to_bits() == h.loss.to_bits() && d.grad_norm.to_bits() == h.grad_norm.to_bits();
        println!(
            "step {step}: loss {:.6} / {:.6}, gradient norm {:.6} / {:.6} ({})",
            d.loss,
            h.loss,
            d.grad_norm,
            h.grad_norm,
            if same { "ok" } else { "FAIL" }
        );
        if !same {
            failures.push(format!(
                "step {step} with the optimizer on the GPU: loss {} and norm {}, on the host {} \
                 and {}",
                d.loss, d.grad_norm, h.loss, h.grad_norm
            ));
        }
    }
    let (differ, of) = differing_state(&mut device, &mut host)?;
    println!(
        "weights and moments after {steps} steps: {differ} of {of} values differ ({})",
        if differ == 0 { "ok" } else { "FAIL" }
    );
    if differ > 0 {
        failures.push(format!(
            "the optimizer on the GPU: {differ} of {of} weight and moment values differ from the \
             host's after {steps} steps"
        ));
    }
    Ok(failures)
}

/// Values of the two trainers' weights and optimizer states (as checkpointed) whose bits
/// differ, and how many were compared; a tensor only one of them has counts whole.
fn differing_state(a: &mut Trainer, b: &mut Trainer) -> anyhow::Result<(usize, usize)> {
    let state = |t: &mut Trainer| -> anyhow::Result<Vec<(String, HostTensor)>> {
        let (_, weights, optimizer) = (t.checkpoint_state()?)
            .ok_or_else(|| anyhow::anyhow!("one process holds the whole state"))?;
        let mut tensors: Vec<(String, HostTensor)> = (weights.iter())
            .map(|(n, t)| (n.to_owned(), t.clone()))
            .collect();
        tensors.extend(optimizer);
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(tensors)
    };
    let (a, b) = (state(a)?, state(b)?);
    let (mut differ, mut of) = (0, 0);
    for (name, x) in &a {
        let bits = |t: &HostTensor| t.as_f32().map(|v| v.iter().map(|x| x.to_bits()).collect());
        let x_bits: Option<Vec<u32>> = bits(x);
        let y = b.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        match (x_bits, y.and_then(bits)) {
            (Some(x), Some(y)) if x.len() == y.len() => {
                differ += x.iter().zip(&y).filter(|(p, q)| p != q).count();
                of += x.len();
            }
            (Some(x), _) => {
                differ += x.len();
                of += x.len();
            }
            // Not f32 (the step count, integer buffers): equal or one value differs.
            (None, _) => {
                differ += usize::from(y != Some(x));
                of += 1;
            }
        }
    }
    Ok((differ, of))
}
