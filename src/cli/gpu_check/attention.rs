//! Check 3c: the MLA attention templates (forward, the backward's `delta`, the backward) at
//! DeepSeek-V3's head dims, against the exact attention of the same bf16 inputs
//! (`cuda::attention_samples`), on a ragged sequence length (not a multiple of the key or query
//! blocks) with several heads and sequences.

use fathom_kernels::{MlaAttentionBwdParams, MlaAttentionFwdParams, MlaHeadDims};
use fathom_runtime::cuda::attention_samples::{AttentionSample, error_of_max};
use fathom_runtime::cuda::modules::Arg;
use fathom_runtime::cuda::{GpuDevice, KernelCache};
use fathom_runtime::fp8::bf16_to_f32;

use super::launch::{Buffers, launch_named};

/// Bound on [`error_of_max`] for outputs summed from bf16-rounded P or dS (see its docs), and
/// for those summed in f32 from exact products (lse, delta).
const ROUNDED_P: f64 = 1e-2;
const F32_SUMS: f64 = 1e-4;

/// Runs the three templates; returns the failures.
pub fn check_attention(device: &GpuDevice, cache: &KernelCache) -> anyhow::Result<Vec<String>> {
    let dims = MlaHeadDims::DEEPSEEK_V3;
    let (batch, seq_len, heads) = (2usize, 100usize, 3usize);
    let sample = AttentionSample::new(dims, batch, seq_len, heads);
    let stream = device.ctx.new_stream()?;
    let mut buffers = Buffers::new(device, &stream);
    let int = |v: usize| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
    let sizes = [
        ("batch", int(batch)),
        ("seq_len", int(seq_len)),
        ("heads", int(heads)),
        ("softmax_scale", Arg::F32(sample.softmax_scale)),
    ];
    let inputs = [
        ("q", Arg::Ptr(buffers.put(&sample.q)?)),
        ("k_nope", Arg::Ptr(buffers.put(&sample.k_nope)?)),
        ("k_rope", Arg::Ptr(buffers.put(&sample.k_rope)?)),
        ("v", Arg::Ptr(buffers.put(&sample.v)?)),
        ("d_o", Arg::Ptr(buffers.put(&sample.d_o)?)),
    ];
    let (b, t, h) = (batch as u32, seq_len as u32, heads as u32);
    // Every launch takes the inputs and sizes it names, and its own outputs.
    let run = |source: fathom_kernels::KernelSource, grid, outputs: &[(&str, Arg)]| {
        let named: Vec<_> = inputs
            .iter()
            .chain(outputs)
            .chain(&sizes)
            .copied()
            .collect();
        launch_named(device, cache, &stream, &source, grid, &named)
    };
    let mut results: Vec<(&str, f64, f64)> = Vec::new();

    // Forward: o (bf16) and lse.
    let fwd = MlaAttentionFwdParams::new(dims);
    let o = buffers.put(&vec![0u16; sample.exact.o.len()])?;
    let lse = buffers.put(&vec![0f32; sample.exact.lse.len()])?;
    let outputs = [("o", Arg::Ptr(o)), ("lse", Arg::Ptr(lse))];
    run(fwd.instantiate()?, fwd.grid(b, t, h), &outputs)?;
    let got: Vec<f32> = buffers
        .get::<u16>(o, sample.exact.o.len())?
        .into_iter()
        .map(bf16_to_f32)
        .collect();
    results.push(("forward o", error_of_max(&got, &sample.exact.o), ROUNDED_P));
    let got = buffers.get(lse, sample.exact.lse.len())?;
    results.push((
        "forward lse",
        error_of_max(&got, &sample.exact.lse),
        F32_SUMS,
    ));

    // The backward's delta, from the exact output rounded to bf16 as the forward stores it.
    let bwd = MlaAttentionBwdParams::new(dims);
    let delta = buffers.put(&vec![0f32; sample.exact.delta.len()])?;
    let outputs = [
        ("o", Arg::Ptr(buffers.put(&sample.o_bf16())?)),
        ("delta", Arg::Ptr(delta)),
    ];
    run(bwd.instantiate_delta()?, bwd.delta_grid(b, t, h), &outputs)?;
    let got = buffers.get(delta, sample.exact.delta.len())?;
    let expected = sample.delta_of_bf16_o();
    results.push(("backward delta", error_of_max(&got, &expected), F32_SUMS));

    // The backward, given the exact lse and delta: dq and dk_rope accumulate (zeroed first).
    let grads = [
        ("dq", &sample.exact.dq),
        ("dk_nope", &sample.exact.dk_nope),
        ("dk_rope", &sample.exact.dk_rope),
        ("dv", &sample.exact.dv),
    ];
    let mut outputs = vec![
        ("lse", Arg::Ptr(buffers.put(&sample.exact.lse)?)),
        ("delta", Arg::Ptr(buffers.put(&sample.exact.delta)?)),
    ];
    let mut addresses = Vec::new();
    for (name, expected) in grads {
        let ptr = buffers.put(&vec![0f32; expected.len()])?;
        outputs.push((name, Arg::Ptr(ptr)));
        addresses.push(ptr);
    }
    run(bwd.instantiate()?, bwd.grid(b, t, h), &outputs)?;
    for ((name, expected), ptr) in grads.into_iter().zip(addresses) {
        let got = buffers.get(ptr, expected.len())?;
        results.push((name, error_of_max(&got, expected), ROUNDED_P));
    }
    buffers.free()?;

    let mut failures = Vec::new();
    for (what, error, bound) in results {
        let ok = error <= bound;
        println!(
            "mla attention {:<16} B={batch} T={seq_len} H={heads} {}: max error {error:.2e} of max|exact| (<= {bound:e}) {}",
            what,
            dims_tag(dims),
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!(
                "mla attention {what}: error {error:.3e} of max (bound {bound:e})"
            ));
        }
    }
    Ok(failures)
}

/// Check 3d: attention as a program runs it — the two library calls the CUDA backend makes of
/// an attention with bf16 products and its gradients (`cuda::lower_options`), through the
/// executor (conversions to bf16, `k_nope` and `v` read where they lie in one `kv` input as
/// MLA's projection lays them out, the templates, the zeroing of what the backward
/// accumulates), for DeepSeek-V3's heads and the tiny model's (padded), against the
/// interpreter's attention of the same f32 inputs; the bound is [`ROUNDED_P`]'s (the same
/// bf16 operands; the template also stores the output in bf16).
pub fn check_attention_calls(
    device: &GpuDevice,
    cache: &KernelCache,
) -> anyhow::Result<Vec<String>> {
    use fathom_compiler::compile::{CompileOptions, compile};
    use fathom_runtime::cuda::attention_samples::{attention_call_feeds, attention_call_graph};
    use fathom_runtime::cuda::{GpuExecutor, GpuOptions};
    use fathom_runtime::interp::{Feeds, evaluate};

    // DeepSeek-V3's heads, as the templates take them, and the tiny model's, padded.
    let tiny = MlaHeadDims {
        nope: 16,
        rope: 8,
        v: 16,
    };
    let mut failures = Vec::new();
    for dims in [MlaHeadDims::DEEPSEEK_V3, tiny] {
        let sizes = (2usize, 100usize, 3usize);
        let graph = attention_call_graph(dims, sizes, 1.0 / f64::from(dims.qk()).sqrt())?;
        let feeds = attention_call_feeds(&graph);
        let options = CompileOptions {
            lower: fathom_runtime::cuda::lower_options(),
            ..CompileOptions::default()
        };
        let program = compile(&graph, &options)?.program;
        let executor = GpuExecutor::new(device, cache, program, GpuOptions::default())?;
        let gpu = executor.run(&Feeds::new(&feeds, &()))?.outputs;
        let exact: std::collections::HashMap<String, _> =
            evaluate(&graph, &Feeds::new(&feeds, &()))?
                .into_iter()
                .collect();
        for (name, tensor) in &gpu {
            let got = tensor.as_f32().unwrap_or_default();
            let want = exact[name].as_f32().unwrap_or_default();
            let error = error_of_max(got, want);
            let ok = error <= ROUNDED_P;
            println!(
                "attention call {name:<12} B={} T={} H={} {}: max error {error:.2e} of max|interpreter| (<= {ROUNDED_P:e}) {}",
                sizes.0,
                sizes.1,
                sizes.2,
                dims_tag(dims),
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failures.push(format!(
                    "attention call {name} ({}): error {error:.3e} of max",
                    dims_tag(dims)
                ));
            }
        }
    }
    Ok(failures)
}

fn dims_tag(dims: MlaHeadDims) -> String {
    format!("d{}+{} v{}", dims.nope, dims.rope, dims.v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names `check_attention` passes cover every parameter of the three templates (a
    /// renamed parameter would otherwise surface only on a GPU).
    #[test]
    fn every_template_parameter_is_named() {
        let named = [
            "q",
            "k_nope",
            "k_rope",
            "v",
            "d_o",
            "o",
            "lse",
            "delta",
            "dq",
            "dk_nope",
            "dk_rope",
            "dv",
            "batch",
            "seq_len",
            "heads",
            "softmax_scale",
        ];
        let dims = MlaHeadDims::DEEPSEEK_V3;
        let bwd = MlaAttentionBwdParams::new(dims);
        for source in [
            MlaAttentionFwdParams::new(dims).instantiate().unwrap(),
            bwd.instantiate_delta().unwrap(),
            bwd.instantiate().unwrap(),
        ] {
            for param in &source.params {
                assert!(
                    named.contains(&param.name),
                    "{}: `{}`",
                    source.name,
                    param.name
                );
            }
        }
    }
}
