//! Check 4c: the GPU plan's FP8 operand paths timed side by side at DeepSeek-V3's sizes, as
//! written before and as the plan now runs them (`library_fp8_saved`, `library_fp8_products`):
//!
//! - a saved activation `[4096][7168]` (the attention's down-projection input): the E4M3
//!   rounding in f32, then the forward GEMM's 1×128 and the weight gradient's 128×1
//!   quantisations of the rounded values; against one 1×128 quantisation into kept codes and
//!   the 128×1 re-tiling from them;
//! - the experts' combine gradient `dy[t][h] · w[t][k]` over `[4096 · 8][7168]` rows: both
//!   quantisations reading the stored product; against both multiplying `dy` by `w` as they
//!   read (the loop nest that stored the product, skipped now, is not timed: its write and
//!   two reads come on top of the first column).

use fathom_kernels::quantize::PRODUCT_INTS;
use fathom_kernels::{
    FakeQuantizeParams, KernelSource, QuantizeInput, QuantizeKind, QuantizeParams,
};
use fathom_runtime::cuda::modules::{Arg, args_by_name, launch, load_kernel};
use fathom_runtime::cuda::{GpuDevice, KernelCache};

use crate::cli::gpu_check::launch::{Buffers, noise, time_launches};

/// Tokens of one micro-batch, DeepSeek-V3's hidden size and its routed experts per token.
const TOKENS: usize = 4096;
const HIDDEN: usize = 7168;
const SLOTS: usize = 8;

/// One launch: its source, grid and arguments in its parameters' order.
struct Launch {
    source: KernelSource,
    grid: [u32; 3],
    args: Vec<Arg>,
}

fn quantize(kind: QuantizeKind, input: QuantizeInput) -> QuantizeParams {
    QuantizeParams {
        kind,
        input,
        pow2_scales: false,
    }
}

/// A `quantize` launch over a `[rows][cols]` input with `named` inputs (the rest named here).
fn quantize_launch(
    params: QuantizeParams,
    (rows, cols): (usize, usize),
    named: &[(&str, Arg)],
    (q, scales): (u64, u64),
) -> anyhow::Result<Launch> {
    let int = |v: usize| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
    let mut all = named.to_vec();
    all.extend([
        ("q", Arg::Ptr(q)),
        ("scales", Arg::Ptr(scales)),
        ("rows", int(rows)),
        ("cols", int(cols)),
    ]);
    let source = params.instantiate()?;
    let args = args_by_name(&source.name, &source.params, &all)?;
    Ok(Launch {
        source,
        grid: params.grid(rows as u32, cols as u32),
        args,
    })
}

/// The two paths of each operand: (what, before, now).
type Paths = Vec<(&'static str, Vec<Launch>, Vec<Launch>)>;

/// The device buffers both paths use.
#[derive(Clone, Copy)]
struct Pointers {
    /// Codes and scales, large enough for either orientation of either operand.
    codes: u64,
    codes_t: u64,
    scales: u64,
    scales_t: u64,
    /// The saved activation `[TOKENS][HIDDEN]`, and its rounding.
    x: u64,
    rounded: u64,
    /// The combine gradient's factors, and the product as stored before.
    dy: u64,
    weights: u64,
    product: u64,
}

impl Pointers {
    fn new(buffers: &mut Buffers<'_>) -> anyhow::Result<Self> {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| noise(&mut seed) * 8.0).collect() };
        let (m, k, rows) = (TOKENS, HIDDEN, TOKENS * SLOTS);
        let scale_count = rows * k.div_ceil(128) + k * rows.div_ceil(128);
        Ok(Pointers {
            codes: buffers.put(&vec![0u8; rows * k])?,
            codes_t: buffers.put(&vec![0u8; rows * k])?,
            scales: buffers.put(&vec![0f32; scale_count])?,
            scales_t: buffers.put(&vec![0f32; scale_count])?,
            x: buffers.put(&values(m * k))?,
            rounded: buffers.put(&vec![0f32; m * k])?,
            dy: buffers.put(&values(m * k))?,
            weights: buffers.put(&values(rows))?,
            product: buffers.put(&values(rows * k))?,
        })
    }
}

/// The launches of both paths of both operands.
fn paths(p: Pointers) -> anyhow::Result<Paths> {
    let int = |v: usize| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
    let (m, k) = (TOKENS, HIDDEN);
    let rows = TOKENS * SLOTS;
    let Pointers {
        codes,
        codes_t,
        scales,
        scales_t,
        x,
        rounded,
        dy,
        weights,
        product,
    } = p;
    let fake = FakeQuantizeParams { pow2_scales: false };
    let fake_source = fake.instantiate()?;
    let fake_args = args_by_name(
        &fake_source.name,
        &fake_source.params,
        &[
            ("x", Arg::Ptr(x)),
            ("out", Arg::Ptr(rounded)),
            ("rows", int(m)),
            ("cols", int(k)),
            ("tile_rows", int(1)),
            ("tile_cols", int(128)),
        ],
    )?;
    let rounding = Launch {
        grid: fake
            .grid(1, (m as u64, k as u64), (1, 128))
            .ok_or_else(|| anyhow::anyhow!("the rounding's grid does not fit"))?,
        source: fake_source,
        args: fake_args,
    };
    let f32_in = |buffer: u64| [("x", Arg::Ptr(buffer))];
    let tiles = quantize(QuantizeKind::Tile1x128, QuantizeInput::F32);
    let retile = quantize(QuantizeKind::Tile128x1Transposed, QuantizeInput::F32);
    let saved_before = vec![
        rounding,
        quantize_launch(tiles, (m, k), &f32_in(rounded), (codes, scales))?,
        quantize_launch(retile, (m, k), &f32_in(rounded), (codes_t, scales_t))?,
    ];
    let from_codes = [
        ("x", Arg::Ptr(codes)),
        ("x_scales", Arg::Ptr(scales)),
        ("x_rows", int(m)),
    ];
    let saved_now = vec![
        quantize_launch(tiles, (m, k), &f32_in(x), (codes, scales))?,
        quantize_launch(
            quantize(QuantizeKind::Tile128x1Transposed, QuantizeInput::E4m3Tiles),
            (m, k),
            &from_codes,
            (codes_t, scales_t),
        )?,
    ];

    let product_before = vec![
        quantize_launch(tiles, (rows, k), &f32_in(product), (codes, scales))?,
        quantize_launch(retile, (rows, k), &f32_in(product), (codes_t, scales_t))?,
    ];
    let mut factors = vec![("x", Arg::Ptr(dy)), ("y", Arg::Ptr(weights))];
    let index = [SLOTS, k, 1, 1, 1, 0];
    factors.extend(
        PRODUCT_INTS
            .iter()
            .zip(index)
            .map(|(name, v)| (*name, int(v))),
    );
    let product_now = vec![
        quantize_launch(
            quantize(QuantizeKind::Tile1x128, QuantizeInput::F32Product),
            (rows, k),
            &factors,
            (codes, scales),
        )?,
        quantize_launch(
            quantize(QuantizeKind::Tile128x1Transposed, QuantizeInput::F32Product),
            (rows, k),
            &factors,
            (codes_t, scales_t),
        )?,
    ];
    Ok(vec![
        ("saved activation [4096][7168]", saved_before, saved_now),
        (
            "combine gradient [32768][7168]",
            product_before,
            product_now,
        ),
    ])
}

/// Check 4c: times both paths of each operand and prints them side by side.
pub fn bench(device: &GpuDevice, cache: &KernelCache, iters: u32) -> anyhow::Result<()> {
    let stream = device.ctx.new_stream()?;
    let mut buffers = Buffers::new(device, &stream);
    let paths = paths(Pointers::new(&mut buffers)?)?;
    let run = |launches: &[Launch]| -> anyhow::Result<()> {
        for l in launches {
            let kernel = load_kernel(&device.ctx, cache, &l.source, &device.arch())?;
            let [x, y, z] = l.grid;
            let mut args = l.args.clone();
            let block = (l.source.block_threads, 1, 1);
            launch(&stream, &kernel.function, (x, y, z), block, 0, &mut args)?;
        }
        Ok(())
    };
    let names = |launches: &[Launch]| {
        let names: Vec<String> = launches.iter().map(|l| l.source.name.clone()).collect();
        names.join(" + ")
    };
    println!(
        "{:<32} {:>10} {:>10} {:>7}  launches (before | now)",
        "operand", "before ms", "now ms", "ratio"
    );
    for (what, before, now) in &paths {
        let before_ms = time_launches(&stream, || run(before), iters, || names(before))?;
        let now_ms = time_launches(&stream, || run(now), iters, || names(now))?;
        println!(
            "{what:<32} {before_ms:>10.3} {now_ms:>10.3} {:>6.2}x  {} | {}",
            before_ms / now_ms,
            names(before),
            names(now)
        );
    }
    buffers.free()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every parameter of every timed launch has its argument (checked here, not on a lent
    /// GPU); both paths make the same orientations of codes.
    #[test]
    fn the_timed_paths_name_every_parameter() {
        let p = Pointers {
            codes: 1,
            codes_t: 2,
            scales: 3,
            scales_t: 4,
            x: 5,
            rounded: 6,
            dy: 7,
            weights: 8,
            product: 9,
        };
        let paths = paths(p).unwrap();
        assert_eq!(paths.len(), 2);
        for (what, before, now) in &paths {
            for l in before.iter().chain(now) {
                assert_eq!(
                    l.args.len(),
                    l.source.params.len(),
                    "{what}: {}",
                    l.source.name
                );
            }
            let last = |ls: &[Launch]| ls.last().map(|l| l.grid);
            assert_eq!(last(before), last(now), "{what}");
        }
    }
}
