//! `convert` (`cuda/convert.cuh`): the element conversions a plan runs around the bf16
//! attention templates — f32 to bf16 (round to nearest even, as the CPU's casts round), bf16
//! to f32 (exact), and a zero fill of f32 — over `n` contiguous elements in grid-stride loops.
//! `sm_80` or newer.

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
    /// `y = bf16(x)`: `x` f32, `y` bf16.
    F32ToBf16,
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

    /// `convert_f32_bf16`, `convert_bf16_f32`, `fill_zero_f32`.
    pub fn name(&self) -> String {
        self.function().to_owned()
    }

    fn function(&self) -> &'static str {
        match self.kind {
            ConvertKind::F32ToBf16 => "convert_f32_bf16",
            ConvertKind::Bf16ToF32 => "convert_bf16_f32",
            ConvertKind::ZeroF32 => "fill_zero_f32",
        }
    }

    pub fn block_threads(&self) -> u32 {
        THREADS
    }

    /// Grid for `n` elements (at least one block).
    pub fn grid(&self, n: u64) -> [u32; 3] {
        let blocks = n.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS);
        [blocks as u32, 1, 1]
    }

    /// `x`, `y`, `n` (`y`, `n` for the fill).
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let (from, to) = match self.kind {
            ConvertKind::F32ToBf16 => (Some(Elem::F32), Elem::Bf16),
            ConvertKind::Bf16ToF32 => (Some(Elem::Bf16), Elem::F32),
            ConvertKind::ZeroF32 => (None, Elem::F32),
        };
        let mut params: Vec<KernelParam> = from
            .map(|elem| KernelParam::new("x", ParamType::ConstPtr(elem)))
            .into_iter()
            .collect();
        params.push(KernelParam::new("y", ParamType::MutPtr(to)));
        params.push(KernelParam::new("n", ParamType::I64));
        params
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        let name = self.name();
        let params = self.kernel_params();
        let args = match self.kind {
            ConvertKind::ZeroF32 => "y, n",
            _ => "x, y, n",
        };
        let description = vec![format!(
            "{}: {THREADS} threads per block, grid-stride over n elements.",
            match self.kind {
                ConvertKind::F32ToBf16 => "f32 to bf16, round to nearest even",
                ConvertKind::Bf16ToF32 => "bf16 to f32, exact",
                ConvertKind::ZeroF32 => "zero fill of f32",
            }
        )];
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
        let to_bf16 = ConvertParams::new(ConvertKind::F32ToBf16);
        assert_eq!(to_bf16.name(), "convert_f32_bf16");
        assert_eq!(to_bf16.grid(0), [1, 1, 1]);
        assert_eq!(to_bf16.grid(257), [2, 1, 1]);
        assert_eq!(to_bf16.grid(1 << 40), [1 << 16, 1, 1]);
        let source = to_bf16.instantiate().unwrap();
        assert!(source.source.contains("fathom::convert_f32_bf16(x, y, n);"));
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
