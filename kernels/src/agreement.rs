//! `product_agreement` (`cuda/agreement.cuh`): how far two results of one computation lie apart,
//! reduced on the device to three f64 sums — `Σ (x − y)²`, `Σ (x² + y²)` and the count of
//! non-finite elements — so that comparing two products of hundreds of megabytes reads back
//! 24 bytes. [`Agreement`] turns them into DeepGEMM's measure. The FP8 GEMM tuner checks every
//! candidate's product against the default tile's with it before trusting its timing.
//! `sm_80` or newer.

// `convert_to_f32` for bf16 and f32 comes from the conversions' template.
use crate::convert::CONVERT;
use crate::kernel::{
    COMMON, Elem, KernelError, KernelParam, KernelSource, ParamType, Template, check_param,
    portable_kernel,
};

const AGREEMENT: Template = Template {
    file: "agreement.cuh",
    text: include_str!("../cuda/agreement.cuh"),
};

const THREADS: u32 = 256;
/// Blocks at most: the loop strides over the rest, and each block adds to the sums once.
const MAX_BLOCKS: u64 = 1024;

/// Template parameters of `agreement.cuh`: the element type of the two inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AgreementParams {
    /// [`Elem::F32`] or [`Elem::Bf16`].
    pub elem: Elem,
}

impl AgreementParams {
    /// `product_agreement_f32`, `product_agreement_bf16`.
    pub fn name(&self) -> String {
        format!("product_agreement_{}", self.elem.tag())
    }

    pub fn block_threads(&self) -> u32 {
        THREADS
    }

    /// Grid for `n` elements: a thread per element up to [`MAX_BLOCKS`] blocks (at least one).
    pub fn grid(&self, n: u64) -> [u32; 3] {
        let blocks = n.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS);
        [blocks as u32, 1, 1]
    }

    /// `x`, `y`, `n`, and `sums` (three f64, zero before the launch).
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        vec![
            KernelParam::new("x", ParamType::ConstPtr(self.elem)),
            KernelParam::new("y", ParamType::ConstPtr(self.elem)),
            KernelParam::new("n", ParamType::I64),
            KernelParam::new("sums", ParamType::MutPtr(Elem::F64)),
        ]
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        check_param(
            matches!(self.elem, Elem::F32 | Elem::Bf16),
            "agreement",
            "elem",
            self.elem.tag(),
            "f32 or bf16",
        )?;
        let name = self.name();
        let params = self.kernel_params();
        Ok(portable_kernel(
            &name,
            format!(
                "Σ(x − y)², Σ(x² + y²) and the non-finite count of two {} arrays, in f64: \
                 {THREADS} threads per block, grid-stride, one atomic add per block and sum.",
                self.elem.tag()
            ),
            &[COMMON, CONVERT, AGREEMENT],
            (THREADS, &params),
            format!(
                "fathom::agreement_sums<{}>(x, y, n, sums);",
                self.elem.c_type()
            ),
        ))
    }
}

/// What the three sums say.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// `Σ (x − y)² / Σ (x² + y²)` over the finite pairs, DeepGEMM's
    /// `1 − 2 Σxy / Σ(x² + y²)`: 0 for equal arrays (two all-zero arrays included), 1 for
    /// uncorrelated ones, and about `f / 2` when a fraction `f` of the elements is wrong.
    pub diff: f64,
    /// Elements where either array is not finite.
    pub not_finite: u64,
}

impl Agreement {
    /// From the kernel's `sums`.
    pub fn from_sums([squared_difference, squares, not_finite]: [f64; 3]) -> Self {
        let diff = if squares > 0.0 {
            squared_difference / squares
        } else {
            0.0
        };
        Agreement {
            diff,
            not_finite: not_finite as u64,
        }
    }

    /// Whether the arrays agree within `bound` with every element finite.
    pub fn within(&self, bound: f64) -> bool {
        self.not_finite == 0 && self.diff <= bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_params_grids_and_refusals() {
        let bf16 = AgreementParams { elem: Elem::Bf16 };
        assert_eq!(bf16.name(), "product_agreement_bf16");
        assert_eq!(bf16.grid(0), [1, 1, 1]);
        assert_eq!(bf16.grid(257), [2, 1, 1]);
        assert_eq!(bf16.grid(1 << 40), [1024, 1, 1]);
        let source = bf16.instantiate().unwrap();
        assert!(
            source
                .source
                .contains("fathom::agreement_sums<bf16>(x, y, n, sums);")
        );
        assert!(source.source.contains("double* __restrict__ sums"));
        let e4m3 = AgreementParams { elem: Elem::E4m3 };
        let error = e4m3.instantiate().unwrap_err().to_string();
        assert!(error.contains("`elem` = e4m3"), "{error}");
    }

    #[test]
    fn the_sums_read_as_deepgemms_measure() {
        // x = (1, 2), y = (1, 3): Σ(x−y)² = 1, Σ(x²+y²) = 15.
        let one_off = Agreement::from_sums([1.0, 15.0, 0.0]);
        assert!((one_off.diff - 1.0 / 15.0).abs() < 1e-15);
        assert!(!one_off.within(1e-3));
        assert!(one_off.within(0.1));
        let zeros = Agreement::from_sums([0.0, 0.0, 0.0]);
        assert_eq!(zeros.diff, 0.0);
        assert!(zeros.within(0.0));
        let nan = Agreement::from_sums([0.0, 2.0, 1.0]);
        assert_eq!(nan.not_finite, 1);
        assert!(!nan.within(1.0), "a non-finite element never agrees");
    }
}
