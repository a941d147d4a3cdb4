//! `fake_quantize`: the kernel IR's `QuantizeDequantize` (`cuda/fake_quantize.cuh`),
//! `dequant(quant(x))` to E4M3 with one scale per `tile_rows`×`tile_cols` tile of each matrix of
//! the last two axes, bit for bit the CPU's `fp8::fake_quantize` (same scale, same single
//! rounding of `x / scale`, same `code · scale`; non-finite tiles come back NaN). Unlike
//! [`QuantizeParams`](crate::QuantizeParams), which writes the codes and scales the FP8 GEMMs
//! read in fixed 1×128 / 128×128 layouts, this takes any tile (partial ones included) and
//! writes f32 values. Sizes are launch arguments. `sm_80` or newer.

use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, KernelError, KernelParam, KernelSource, ParamType,
    Template, assemble, cpp_bool,
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
        let name = self.name();
        let params = self.kernel_params();
        let description = vec![format!(
            "E4M3 fake quantisation, one scale per tile: max(amax, 1e-4) / 448{}; bit-exact with the CPU.",
            if self.pow2_scales {
                " rounded up to a power of two"
            } else {
                ""
            }
        )];
        Ok(assemble(
            &description,
            &[COMMON, FAKE_QUANTIZE],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: THREADS,
                cluster_x: 1,
                params: &params,
                body: vec![format!(
                    "fathom::fake_quantize_e4m3<{}, {THREADS}>(x, out, rows, cols, tile_rows, tile_cols);",
                    cpp_bool(self.pow2_scales)
                )],
            },
            ArchRequirement::Sm80OrNewer,
            0,
        ))
    }
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
}
