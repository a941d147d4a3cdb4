//! Check 4b: the MLA attention templates' TFLOPS at DeepSeek-V3's sizes (one sequence of 4096
//! tokens, its 128 heads of 128 + 64 query/key and 128 value channels, causal), the forward
//! and the backward (`delta` and the main pass) side by side with PyTorch's
//! `scaled_dot_product_attention` at the same sizes when `scripts/attention_bench.py` timed it.
//!
//! FLOPs count the products of the causal pairs only (`t (t + 1) / 2` per head): the forward's
//! two (`S = Q Kᵀ`, `O = P V`), the backward's five (`S` again, `dP = dO Vᵀ`, `dV = Pᵀ dO`,
//! `dQ = dS K`, `dK = dSᵀ Q`), the same count for both sides.

use std::path::Path;

use fathom_kernels::{KernelSource, MlaAttentionBwdParams, MlaAttentionFwdParams, MlaHeadDims};
use fathom_runtime::cuda::modules::{Arg, args_by_name, launch, load_kernel};
use fathom_runtime::cuda::{GpuDevice, KernelCache};
use fathom_runtime::fp8::f32_to_bf16;

use super::launch::{Buffers, noise, optional_json, time_launches};

/// Hopper's dense BF16 tensor-core peak (H100/H200 SXM), TFLOPS.
const BF16_PEAK_TFLOPS: f64 = 989.0;
/// One sequence of DeepSeek-V3's pre-training length, all its heads.
const SIZES: Sizes = Sizes {
    batch: 1,
    tokens: 4096,
    heads: 128,
};

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sizes {
    batch: usize,
    tokens: usize,
    heads: usize,
}

impl Sizes {
    /// Query-key pairs the causal mask keeps.
    fn causal_pairs(&self) -> f64 {
        let t = self.tokens as f64;
        (self.batch * self.heads) as f64 * t * (t + 1.0) / 2.0
    }

    /// `(forward, backward)` FLOPs (see the module docs).
    fn flops(&self, dims: MlaHeadDims) -> (f64, f64) {
        let (qk, v) = (f64::from(dims.qk()), f64::from(dims.v));
        let pairs = self.causal_pairs();
        (2.0 * pairs * (qk + v), 2.0 * pairs * (3.0 * qk + 2.0 * v))
    }
}

/// `scripts/attention_bench.py`'s timings.
#[derive(Debug, serde::Deserialize)]
struct TorchAttention {
    torch: String,
    /// Which variant ran: PyTorch's own choice of kernel, or with v padded to the query's
    /// width where its kernels refuse different widths.
    variant: String,
    b: usize,
    t: usize,
    h: usize,
    forward_ms: f64,
    backward_ms: f64,
}

/// The device addresses of the templates' operands.
#[derive(Clone, Copy)]
struct Pointers {
    q: u64,
    k_nope: u64,
    k_rope: u64,
    v: u64,
    o: u64,
    d_o: u64,
    lse: u64,
    delta: u64,
    dq: u64,
    dk_nope: u64,
    dk_rope: u64,
    dv: u64,
}

/// One launch: its source, grid and arguments in its parameters' order.
struct Launch {
    source: KernelSource,
    grid: [u32; 3],
    args: Vec<Arg>,
}

/// The forward's, `delta`'s and the backward's launches at `sizes`.
fn launches(dims: MlaHeadDims, sizes: Sizes, p: Pointers) -> anyhow::Result<[Launch; 3]> {
    let int = |v: usize| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
    let named = [
        ("q", Arg::Ptr(p.q)),
        ("k_nope", Arg::Ptr(p.k_nope)),
        ("k_rope", Arg::Ptr(p.k_rope)),
        ("v", Arg::Ptr(p.v)),
        ("o", Arg::Ptr(p.o)),
        ("d_o", Arg::Ptr(p.d_o)),
        ("lse", Arg::Ptr(p.lse)),
        ("delta", Arg::Ptr(p.delta)),
        ("dq", Arg::Ptr(p.dq)),
        ("dk_nope", Arg::Ptr(p.dk_nope)),
        ("dk_rope", Arg::Ptr(p.dk_rope)),
        ("dv", Arg::Ptr(p.dv)),
        ("batch", int(sizes.batch)),
        ("seq_len", int(sizes.tokens)),
        ("heads", int(sizes.heads)),
        (
            "softmax_scale",
            Arg::F32(1.0 / f64::from(dims.qk()).sqrt() as f32),
        ),
    ];
    let launch = |source: KernelSource, grid| -> anyhow::Result<Launch> {
        let args = args_by_name(&source.name, &source.params, &named)?;
        Ok(Launch { source, grid, args })
    };
    let (b, t, h) = (sizes.batch as u32, sizes.tokens as u32, sizes.heads as u32);
    let fwd = MlaAttentionFwdParams::new(dims);
    let bwd = MlaAttentionBwdParams::new(dims);
    Ok([
        launch(fwd.instantiate()?, fwd.grid(b, t, h))?,
        launch(bwd.instantiate_delta()?, bwd.delta_grid(b, t, h))?,
        launch(bwd.instantiate()?, bwd.grid(b, t, h))?,
    ])
}

/// `n` bf16 values in [-1, 1) (timing does not depend on them, but infinities would).
fn bf16_noise(n: usize, seed: &mut u64) -> Vec<u16> {
    (0..n).map(|_| f32_to_bf16(noise(seed))).collect()
}

/// Check 4b: times the forward, then the backward on the forward's output and statistic, and
/// prints their TFLOPS beside PyTorch's when `torch` names its timings.
pub fn bench(
    device: &GpuDevice,
    cache: &KernelCache,
    iters: u32,
    torch: Option<&Path>,
) -> anyhow::Result<()> {
    let theirs: Option<TorchAttention> =
        optional_json(torch, "no --torch-attention JSON: PyTorch's attention")?;
    let dims = MlaHeadDims::DEEPSEEK_V3;
    let sizes = SIZES;
    let stream = device.ctx.new_stream()?;
    let mut buffers = Buffers::new(device, &stream);
    let per_head = sizes.batch * sizes.tokens * sizes.heads;
    let (nope, rope, v) = (dims.nope as usize, dims.rope as usize, dims.v as usize);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |n: usize| bf16_noise(n, &mut seed);
    let zeros = |n: usize| vec![0f32; n];
    let pointers = Pointers {
        q: buffers.put(&noise(per_head * (nope + rope)))?,
        k_nope: buffers.put(&noise(per_head * nope))?,
        k_rope: buffers.put(&noise(sizes.batch * sizes.tokens * rope))?,
        v: buffers.put(&noise(per_head * v))?,
        o: buffers.put(&vec![0u16; per_head * v])?,
        d_o: buffers.put(&noise(per_head * v))?,
        lse: buffers.put(&zeros(per_head))?,
        delta: buffers.put(&zeros(per_head))?,
        dq: buffers.put(&zeros(per_head * (nope + rope)))?,
        dk_nope: buffers.put(&zeros(per_head * nope))?,
        dk_rope: buffers.put(&zeros(sizes.batch * sizes.tokens * rope))?,
        dv: buffers.put(&zeros(per_head * v))?,
    };
    let [forward, delta, backward] = launches(dims, sizes, pointers)?;
    let run = |l: &Launch| -> anyhow::Result<()> {
        let kernel = load_kernel(&device.ctx, cache, &l.source, &device.arch())?;
        let [x, y, z] = l.grid;
        let mut args = l.args.clone();
        let block = (l.source.block_threads, 1, 1);
        launch(
            &stream,
            &kernel.function,
            (x, y, z),
            block,
            l.source.dynamic_smem_bytes,
            &mut args,
        )?;
        Ok(())
    };
    let what = |l: &Launch| l.source.name.clone();
    let forward_ms = time_launches(&stream, || run(&forward), iters, || what(&forward))?;
    // dq and dk_rope accumulate over the timed launches; timing does not depend on their values.
    let backward_ms = time_launches(
        &stream,
        || {
            run(&delta)?;
            run(&backward)
        },
        iters,
        || what(&backward),
    )?;
    buffers.free()?;

    let (forward_flops, backward_flops) = sizes.flops(dims);
    let tflops = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;
    println!(
        "B={} T={} H={} heads {}+{}, v {}, causal; TFLOPS of the causal pairs' products, % of \
         the {BF16_PEAK_TFLOPS} TFLOPS dense BF16 peak",
        sizes.batch, sizes.tokens, sizes.heads, dims.nope, dims.rope, dims.v
    );
    if let Some(t) = &theirs {
        println!(
            "PyTorch {} scaled_dot_product_attention ({}) at B={} T={} H={}",
            t.torch, t.variant, t.b, t.t, t.h
        );
        if (t.b, t.t, t.h) != (sizes.batch, sizes.tokens, sizes.heads) {
            println!("  (PyTorch timed other sizes: its column is not comparable)");
        }
    }
    println!(
        "{:<10} {:>9} {:>8} {:>7} | {:>9} {:>8} {:>6}  kernel",
        "pass", "ms", "TFLOPS", "% peak", "torch ms", "TFLOPS", "ratio"
    );
    for (pass, ms, flops, torch_ms, kernel) in [
        (
            "forward",
            forward_ms,
            forward_flops,
            theirs.as_ref().map(|t| t.forward_ms),
            forward.source.name.clone(),
        ),
        (
            "backward",
            backward_ms,
            backward_flops,
            theirs.as_ref().map(|t| t.backward_ms),
            format!("{} + {}", delta.source.name, backward.source.name),
        ),
    ] {
        let ours = tflops(flops, ms);
        let torch_column = match torch_ms {
            Some(theirs_ms) => format!(
                "{theirs_ms:>9.3} {:>8.1} {:>5.2}x",
                tflops(flops, theirs_ms),
                theirs_ms / ms
            ),
            None => format!("{:>9} {:>8} {:>6}", "-", "-", "-"),
        };
        println!(
            "{pass:<10} {ms:>9.3} {ours:>8.1} {:>6.1}% | {torch_column}  {kernel}",
            100.0 * ours / BF16_PEAK_TFLOPS
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every parameter of the three templates has its argument (checked here, not on a lent
    /// GPU), and the FLOP counts are the products' of the causal pairs.
    #[test]
    fn the_timed_launches_name_every_parameter() {
        let p = Pointers {
            q: 1,
            k_nope: 2,
            k_rope: 3,
            v: 4,
            o: 5,
            d_o: 6,
            lse: 7,
            delta: 8,
            dq: 9,
            dk_nope: 10,
            dk_rope: 11,
            dv: 12,
        };
        let [forward, delta, backward] = launches(MlaHeadDims::DEEPSEEK_V3, SIZES, p).unwrap();
        assert_eq!(forward.args.len(), forward.source.params.len());
        assert_eq!(delta.args.len(), delta.source.params.len());
        assert_eq!(backward.args.len(), backward.source.params.len());
        assert_eq!(forward.grid, [64, 128, 1]);
        let tiny = Sizes {
            batch: 1,
            tokens: 2,
            heads: 1,
        };
        // Pairs (0,0), (1,0), (1,1); 192 + 128 channels forward, 3·192 + 2·128 backward.
        assert_eq!(tiny.flops(MlaHeadDims::DEEPSEEK_V3), (1920.0, 4992.0));
    }

    #[test]
    fn pytorchs_timings_parse() {
        let text = r#"{"torch": "2.11.0", "device": "NVIDIA H200", "variant": "as given",
            "b": 1, "t": 4096, "h": 128, "qk": 192, "v": 128,
            "forward_ms": 1.5, "backward_ms": 4.0}"#;
        let t: TorchAttention = serde_json::from_str(text).unwrap();
        assert_eq!((t.b, t.t, t.h, t.forward_ms), (1, 4096, 128, 1.5));
    }
}
