//! `fake_quantize`: the kernel IR's `QuantizeDequantize` (`cuda/fake_quantize.cuh`),
//! `dequant(quant(x))` to E4M3 with one scale per `tile_rows`×`tile_cols` tile of each matrix of
//! the last two axes, bit for bit the CPU's `fp8::fake_quantize` (same scale, same single
//! rounding of `x / scale`, same `code · scale`; non-finite tiles come back NaN). Unlike
//! [`QuantizeParams`](crate::QuantizeParams), which writes the codes and scales the FP8 GEMMs
//! read in fixed 1×128 / 128×128 layouts, this takes any tile (partial ones included) and
//! writes f32 values. Sizes are launch arguments. `sm_80` or newer.
//!
//! [`FakeQuantizeGatheredParams`] is the same rounding of the K-grouped weight-gradient GEMM's
//! operand tiles (`QuantizeKind::GatheredTile128x1Transposed`'s), for the f32 path: gathered
//! into the experts' padded layout, rounded per 128 padded rows of each column, and written back
//! to the token-slots.

use crate::kernel::{
    COMMON, Elem, KernelError, KernelParam, KernelSource, ParamType, Template, cpp_bool,
    portable_kernel,
};

const FAKE_QUANTIZE: Template = Template {
    file: "fake_quantize.cuh",
    text: include_str!("../cuda/fake_quantize.cuh"),
};

/// Threads per block (one block per tile): a 1×128 tile gives each thread one element.
const THREADS: u32 = 128;

/// Template parameters of `fake_quantize.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FakeQuantizeParams {
    /// Round every scale up to a power of two.
    pub pow2_scales: bool,
}

impl FakeQuantizeParams {
    /// The deterministic kernel name, e.g. `fake_quantize_e4m3_pow2`.
    pub fn name(&self) -> String {
        let pow2 = if self.pow2_scales { "_pow2" } else { "" };
        format!("fake_quantize_e4m3{pow2}")
    }

    pub fn block_threads(&self) -> u32 {
        THREADS
    }

    /// One block per tile of `matrices` `[rows][cols]` matrices; `None` when there are more
    /// tiles than a grid holds (2³¹ - 1).
    pub fn grid(
        &self,
        matrices: u64,
        (rows, cols): (u64, u64),
        (tile_rows, tile_cols): (u64, u64),
    ) -> Option<[u32; 3]> {
        let tiles = matrices * rows.div_ceil(tile_rows.max(1)) * cols.div_ceil(tile_cols.max(1));
        let blocks = u32::try_from(tiles)
            .ok()
            .filter(|b| *b <= i32::MAX as u32)?;
        Some([blocks, 1, 1])
    }

    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let int = |name| KernelParam::new(name, ParamType::I32);
        vec![
            KernelParam::new("x", ParamType::ConstPtr(Elem::F32)),
            KernelParam::new("out", ParamType::MutPtr(Elem::F32)),
            int("rows"),
            int("cols"),
            int("tile_rows"),
            int("tile_cols"),
        ]
    }

    /// Instantiates the template (portable: `sm_80` or newer).
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        instantiate(
            &self.name(),
            &self.kernel_params(),
            (self.pow2_scales, THREADS),
            ", one scale per tile",
            format!(
                "fathom::fake_quantize_e4m3<{}, {THREADS}>(x, out, rows, cols, tile_rows, tile_cols);",
                cpp_bool(self.pow2_scales)
            ),
        )
    }
}

/// Warps per block of the gathered kernel: a block takes 128 padded rows × 32 columns, each
/// thread 128 / 8 = 16 rows of one column.
const GATHERED_WARPS: u32 = 8;

/// `fake_quantize_gathered_128x1` (`cuda/fake_quantize.cuh`): for every 128 padded rows `r` and
/// column `c`, the tile of values `x[source_rows[r]][c]` (zero where `source_rows[r]` is -1),
/// scaled as [`FakeQuantizeParams`] scales (a tile holding a NaN or infinity comes back all NaN),
/// and `out[out_rows[r]][c] = dequant(quant(x[source_rows[r]][c]))` for every `r` whose
/// `out_rows[r]` is not -1. Both index maps are `index_pad_groups`'s (`rows` entries each);
/// `rows` is the padded row count (a multiple of 128 there; a partial last tile is allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FakeQuantizeGatheredParams {
    /// Round every scale up to a power of two.
    pub pow2_scales: bool,
}

impl FakeQuantizeGatheredParams {
    /// The deterministic kernel name, e.g. `fake_quantize_gathered_128x1_e4m3_pow2`.
    pub fn name(&self) -> String {
        let pow2 = if self.pow2_scales { "_pow2" } else { "" };
        format!("fake_quantize_gathered_128x1_e4m3{pow2}")
    }

    pub fn block_threads(&self) -> u32 {
        32 * GATHERED_WARPS
    }

    /// Launch grid for `rows` padded rows of `cols` columns:
    /// `(ceil(cols / 32), ceil(rows / 128), 1)`.
    pub fn grid(&self, rows: u32, cols: u32) -> [u32; 3] {
        [cols.div_ceil(32), rows.div_ceil(128), 1]
    }

    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let rows = |name| KernelParam::new(name, ParamType::ConstPtr(Elem::I32));
        vec![
            KernelParam::new("x", ParamType::ConstPtr(Elem::F32)),
            rows("source_rows"),
            rows("out_rows"),
            KernelParam::new("out", ParamType::MutPtr(Elem::F32)),
            KernelParam::new("rows", ParamType::I32),
            KernelParam::new("cols", ParamType::I32),
        ]
    }

    /// Instantiates the template (portable: `sm_80` or newer).
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        instantiate(
            &self.name(),
            &self.kernel_params(),
            (self.pow2_scales, self.block_threads()),
            " of gathered 128x1 tiles (padded rows, written back to token-slots)",
            format!(
                "fathom::fake_quantize_gathered_128x1<{}, {GATHERED_WARPS}>(x, source_rows, out_rows, out, rows, cols);",
                cpp_bool(self.pow2_scales)
            ),
        )
    }
}

/// One of the fake quantisations' entry points: `call` (the template's function applied to the
/// parameters) in a kernel of `threads` threads, described by `what`.
fn instantiate(
    name: &str,
    params: &[KernelParam],
    (pow2_scales, threads): (bool, u32),
    what: &str,
    call: String,
) -> Result<KernelSource, KernelError> {
    let description = format!(
        "E4M3 fake quantisation{what}: max(amax, 1e-4) / 448{}; bit-exact with the CPU.",
        if pow2_scales {
            " rounded up to a power of two"
        } else {
            ""
        }
    );
    Ok(portable_kernel(
        name,
        description,
        &[COMMON, FAKE_QUANTIZE],
        (threads, params),
        call,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_grids() {
        let p = FakeQuantizeParams { pow2_scales: true };
        assert_eq!(p.name(), "fake_quantize_e4m3_pow2");
        // 2 matrices of 3×200 in 1×128 tiles: 2 · 3 · 2 blocks.
        assert_eq!(p.grid(2, (3, 200), (1, 128)), Some([12, 1, 1]));
        assert_eq!(p.grid(1 << 20, (1 << 12, 1 << 12), (1, 1)), None);
        let source = p.instantiate().expect("valid");
        assert!(source.source.contains("fake_quantize_e4m3<true, 128>"));
    }

    #[test]
    fn gathered_names_params_and_grids() {
        let p = FakeQuantizeGatheredParams { pow2_scales: false };
        assert_eq!(p.name(), "fake_quantize_gathered_128x1_e4m3");
        assert_eq!(
            FakeQuantizeGatheredParams { pow2_scales: true }.name(),
            "fake_quantize_gathered_128x1_e4m3_pow2"
        );
        assert_eq!(p.block_threads(), 256);
        // 640 padded rows of 72 columns: 5 row tiles, 3 blocks of 32 columns.
        assert_eq!(p.grid(640, 72), [3, 5, 1]);
        let params: Vec<_> = p.kernel_params().iter().map(|k| (k.name, k.ty)).collect();
        assert_eq!(
            params,
            [
                ("x", ParamType::ConstPtr(Elem::F32)),
                ("source_rows", ParamType::ConstPtr(Elem::I32)),
                ("out_rows", ParamType::ConstPtr(Elem::I32)),
                ("out", ParamType::MutPtr(Elem::F32)),
                ("rows", ParamType::I32),
                ("cols", ParamType::I32),
            ]
        );
        let kernel = p.instantiate().expect("valid");
        assert_eq!(kernel.block_threads, 256);
        assert_eq!(kernel.arch_requirement, crate::ArchRequirement::Sm80OrNewer);
        insta::assert_snapshot!(kernel.generated_wrapper());
    }
}
