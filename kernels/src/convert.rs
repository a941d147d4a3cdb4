//! `convert` (`cuda/convert.cuh`): the element conversions a plan runs around the bf16
//! attention templates, over rows — `rows × width` elements read `x_stride` apart (a slice of
//! a wider last axis is read where it lies) and written `y_stride` apart, each row padded with
//! zeros to `padded_width` (the head widths the templates take): f32 to bf16 (round to nearest
//! even, as the CPU's casts round), bf16 to f32 (exact), f32 to f32 — and a zero fill of `n`
//! contiguous f32. `sm_80` or newer.

use crate::kernel::{
    COMMON, Elem, KernelError, KernelParam, KernelSource, ParamType, Template, portable_kernel,
};

pub(crate) const CONVERT: Template = Template {
    file: "convert.cuh",
    text: include_str!("../cuda/convert.cuh"),
};

const THREADS: u32 = 256;
/// Blocks at most: the loops stride over the rest.
const MAX_BLOCKS: u64 = 1 << 16;

/// Which conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvertKind {
    /// Rows of f32 to rows of bf16.
    F32ToBf16,
    /// Rows of bf16 to rows of f32.
    Bf16ToF32,
    /// Rows of f32 to rows of f32.
    F32ToF32,
    /// `y[i] = 0` for `n` f32.
    ZeroF32,
}

/// The arguments of a conversion over rows, after `x` and `y`, in the kernel's order.
pub const ROW_EXTENTS: [&str; 5] = ["rows", "width", "padded_width", "x_stride", "y_stride"];

/// Template parameters of `convert.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvertParams {
    pub kind: ConvertKind,
}

impl ConvertParams {
    pub fn new(kind: ConvertKind) -> Self {
        ConvertParams { kind }
    }

    /// `convert_rows_f32_bf16`, `convert_rows_bf16_f32`, `convert_rows_f32_f32`,
    /// `fill_zero_f32`.
    pub fn name(&self) -> String {
        match self.elements() {
            Some((from, to)) => format!("convert_rows_{}_{}", from.tag(), to.tag()),
            None => "fill_zero_f32".to_owned(),
        }
    }

    /// `(from, to)` of a conversion over rows (`None` for the fill).
    pub fn elements(&self) -> Option<(Elem, Elem)> {
        match self.kind {
            ConvertKind::F32ToBf16 => Some((Elem::F32, Elem::Bf16)),
            ConvertKind::Bf16ToF32 => Some((Elem::Bf16, Elem::F32)),
            ConvertKind::F32ToF32 => Some((Elem::F32, Elem::F32)),
            ConvertKind::ZeroF32 => None,
        }
    }

    pub fn block_threads(&self) -> u32 {
        THREADS
    }

    /// Grid for `n` rows, a warp each, or for the fill `n` elements (at least one block).
    pub fn grid(&self, n: u64) -> [u32; 3] {
        let per_block = match self.kind {
            ConvertKind::ZeroF32 => THREADS,
            _ => THREADS / 32,
        };
        let blocks = n.div_ceil(u64::from(per_block)).clamp(1, MAX_BLOCKS);
        [blocks as u32, 1, 1]
    }

    /// `x`, `y` and [`ROW_EXTENTS`] (`y`, `n` for the fill).
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let Some((from, to)) = self.elements() else {
            return vec![
                KernelParam::new("y", ParamType::MutPtr(Elem::F32)),
                KernelParam::new("n", ParamType::I64),
            ];
        };
        let mut params = vec![
            KernelParam::new("x", ParamType::ConstPtr(from)),
            KernelParam::new("y", ParamType::MutPtr(to)),
        ];
        params.extend(
            ROW_EXTENTS
                .iter()
                .map(|&name| KernelParam::new(name, ParamType::I64)),
        );
        params
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        let name = self.name();
        let params = self.kernel_params();
        let (description, body) = match self.elements() {
            Some((from, to)) => (
                format!(
                    "{} rows to {} rows (x_stride and y_stride apart, zero-padded to \
                     padded_width){}: {THREADS} threads per block, a warp per row, grid-stride \
                     over rows.",
                    from.tag(),
                    to.tag(),
                    if to == Elem::Bf16 {
                        ", round to nearest even"
                    } else {
                        ""
                    }
                ),
                format!(
                    "fathom::convert_rows<{}, {}>(x, y, {});",
                    from.c_type(),
                    to.c_type(),
                    ROW_EXTENTS.join(", ")
                ),
            ),
            None => (
                format!("zero fill of f32: {THREADS} threads per block, grid-stride over n."),
                "fathom::fill_zero_f32(y, n);".to_owned(),
            ),
        };
        Ok(portable_kernel(
            &name,
            description,
            &[COMMON, CONVERT],
            (THREADS, &params),
            body,
        ))
    }
}

/// `accumulate_scaled_f32(acc, x, scale, n, first)`: `acc = scale · x` when `first` is
/// non-zero, else `acc + scale · x`, over `n` f32, each product and sum rounded on its own (the
/// host's `acc += scale * x`, bit for bit): micro-batch gradients summed where they were
/// computed. `sm_80` or newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AccumulateScaled;

impl AccumulateScaled {
    pub fn name(&self) -> String {
        "accumulate_scaled_f32".to_owned()
    }

    pub fn block_threads(&self) -> u32 {
        THREADS
    }

    /// Grid for `n` elements, a thread each up to [`MAX_BLOCKS`] blocks (at least one).
    pub fn grid(&self, n: u64) -> [u32; 3] {
        [
            n.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ]
    }

    pub fn kernel_params(&self) -> Vec<KernelParam> {
        vec![
            KernelParam::new("acc", ParamType::MutPtr(Elem::F32)),
            KernelParam::new("x", ParamType::ConstPtr(Elem::F32)),
            KernelParam::new("scale", ParamType::F32),
            KernelParam::new("n", ParamType::I64),
            KernelParam::new("first", ParamType::I32),
        ]
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        let name = self.name();
        let params = self.kernel_params();
        Ok(portable_kernel(
            &name,
            format!(
                "acc = scale * x (first) or acc + scale * x over n f32, without FMA: \
                 {THREADS} threads per block, grid-stride over n."
            ),
            &[COMMON, CONVERT],
            (THREADS, &params),
            "fathom::accumulate_scaled_f32(acc, x, scale, n, first);".to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_params_and_grids() {
        let to_bf16 = ConvertParams::new(ConvertKind::F32ToBf16);
        assert_eq!(to_bf16.name(), "convert_rows_f32_bf16");
        assert_eq!(to_bf16.grid(0), [1, 1, 1]);
        // A warp per row: 8 rows per block of 256 threads.
        assert_eq!(to_bf16.grid(9), [2, 1, 1]);
        assert_eq!(to_bf16.grid(1 << 40), [1 << 16, 1, 1]);
        let source = to_bf16.instantiate().unwrap();
        assert!(source.source.contains(
            "fathom::convert_rows<float, bf16>(x, y, rows, width, padded_width, \
             x_stride, y_stride);"
        ));
        assert_eq!(to_bf16.kernel_params().len(), 7);
        assert_eq!(
            ConvertParams::new(ConvertKind::F32ToF32).name(),
            "convert_rows_f32_f32"
        );
        let zero = ConvertParams::new(ConvertKind::ZeroF32);
        assert_eq!(zero.grid(257), [2, 1, 1]);
        assert_eq!(zero.kernel_params().len(), 2);
        let sum = AccumulateScaled;
        assert_eq!(sum.grid(1 << 40), [1 << 16, 1, 1]);
        assert_eq!(sum.kernel_params(), sum.instantiate().unwrap().params);
        assert!(
            zero.instantiate()
                .unwrap()
                .source
                .contains("fathom::fill_zero_f32(y, n);")
        );
    }
}
