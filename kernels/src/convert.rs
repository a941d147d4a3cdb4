//! `convert` (`cuda/convert.cuh`): the element conversions a plan runs around the bf16
//! attention templates — f32 rows, a stride apart, to dense bf16 (round to nearest even, as
//! the CPU's casts round), and over `n` contiguous elements in grid-stride loops bf16 to f32
//! (exact) and a zero fill of f32. `sm_80` or newer.

use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, KernelError, KernelParam, KernelSource, ParamType,
    Template, assemble,
};

const CONVERT: Template = Template {
    file: "convert.cuh",
    text: include_str!("../cuda/convert.cuh"),
};

const THREADS: u32 = 256;
/// Blocks at most: the loops stride over the rest.
const MAX_BLOCKS: u64 = 1 << 16;

/// Which conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvertKind {
    /// `y[r][c] = bf16(x[r · row_stride + c])` for `rows × width` elements: `x` f32 (rows a
    /// stride apart: a slice of a wider last axis is read where it lies), `y` bf16, dense.
    F32RowsToBf16,
    /// `y = f32(x)`: `x` bf16, `y` f32.
    Bf16ToF32,
    /// `y = 0`: `y` f32.
    ZeroF32,
}

/// Template parameters of `convert.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvertParams {
    pub kind: ConvertKind,
}

impl ConvertParams {
    pub fn new(kind: ConvertKind) -> Self {
        ConvertParams { kind }
    }

    /// `convert_f32_bf16_rows`, `convert_bf16_f32`, `fill_zero_f32`.
    pub fn name(&self) -> String {
        self.function().to_owned()
    }

    fn function(&self) -> &'static str {
        match self.kind {
            ConvertKind::F32RowsToBf16 => "convert_f32_bf16_rows",
            ConvertKind::Bf16ToF32 => "convert_bf16_f32",
            ConvertKind::ZeroF32 => "fill_zero_f32",
        }
    }

    pub fn block_threads(&self) -> u32 {
        THREADS
    }

    /// Grid for `n` elements, or for `F32RowsToBf16` `n` rows, a warp each (at least one
    /// block).
    pub fn grid(&self, n: u64) -> [u32; 3] {
        let per_block = match self.kind {
            ConvertKind::F32RowsToBf16 => THREADS / 32,
            ConvertKind::Bf16ToF32 | ConvertKind::ZeroF32 => THREADS,
        };
        let blocks = n.div_ceil(u64::from(per_block)).clamp(1, MAX_BLOCKS);
        [blocks as u32, 1, 1]
    }

    /// `x`, `y`, `n` (`y`, `n` for the fill; `x`, `y`, `rows`, `width`, `row_stride` for rows).
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let (from, to) = match self.kind {
            ConvertKind::F32RowsToBf16 => (Some(Elem::F32), Elem::Bf16),
            ConvertKind::Bf16ToF32 => (Some(Elem::Bf16), Elem::F32),
            ConvertKind::ZeroF32 => (None, Elem::F32),
        };
        let mut params: Vec<KernelParam> = from
            .map(|elem| KernelParam::new("x", ParamType::ConstPtr(elem)))
            .into_iter()
            .collect();
        params.push(KernelParam::new("y", ParamType::MutPtr(to)));
        let extents: &[&'static str] = match self.kind {
            ConvertKind::F32RowsToBf16 => &["rows", "width", "row_stride"],
            ConvertKind::Bf16ToF32 | ConvertKind::ZeroF32 => &["n"],
        };
        params.extend(
            extents
                .iter()
                .map(|&name| KernelParam::new(name, ParamType::I64)),
        );
        params
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        let name = self.name();
        let params = self.kernel_params();
        let args = match self.kind {
            ConvertKind::F32RowsToBf16 => "x, y, rows, width, row_stride",
            ConvertKind::Bf16ToF32 => "x, y, n",
            ConvertKind::ZeroF32 => "y, n",
        };
        let description = vec![match self.kind {
            ConvertKind::F32RowsToBf16 => format!(
                "f32 rows (row_stride apart) to dense bf16, round to nearest even: {THREADS} \
                 threads per block, a warp per row, grid-stride over rows."
            ),
            ConvertKind::Bf16ToF32 => format!(
                "bf16 to f32, exact: {THREADS} threads per block, grid-stride over n elements."
            ),
            ConvertKind::ZeroF32 => format!(
                "zero fill of f32: {THREADS} threads per block, grid-stride over n elements."
            ),
        }];
        Ok(assemble(
            &description,
            &[COMMON, CONVERT],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: THREADS,
                cluster_x: 1,
                params: &params,
                body: vec![format!("fathom::{}({args});", self.function())],
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
    fn names_params_and_grids() {
        let to_bf16 = ConvertParams::new(ConvertKind::F32RowsToBf16);
        assert_eq!(to_bf16.name(), "convert_f32_bf16_rows");
        assert_eq!(to_bf16.grid(0), [1, 1, 1]);
        // A warp per row: 8 rows per block of 256 threads.
        assert_eq!(to_bf16.grid(9), [2, 1, 1]);
        assert_eq!(to_bf16.grid(1 << 40), [1 << 16, 1, 1]);
        let source = to_bf16.instantiate().unwrap();
        assert!(
            source
                .source
                .contains("fathom::convert_f32_bf16_rows(x, y, rows, width, row_stride);")
        );
        assert_eq!(to_bf16.kernel_params().len(), 5);
        let to_f32 = ConvertParams::new(ConvertKind::Bf16ToF32);
        assert_eq!(to_f32.grid(257), [2, 1, 1]);
        let zero = ConvertParams::new(ConvertKind::ZeroF32);
        assert_eq!(zero.kernel_params().len(), 2);
        assert!(
            zero.instantiate()
                .unwrap()
                .source
                .contains("fill_zero_f32(y, n)")
        );
    }
}
