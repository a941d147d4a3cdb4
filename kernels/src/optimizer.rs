//! The optimizer's element-wise kernels (`cuda/optimizer.cuh`), bit for bit the host's
//! (`fathom_runtime::optim`): the gradients' sums of squares per chunk for the global norm,
//! their scaling by the clipping coefficient, and AdamW's update of the master weights and
//! moments. `sm_80` or newer.

use crate::kernel::{
    COMMON, Elem, KernelError, KernelParam, KernelSource, ParamType, Template, portable_kernel,
};

const OPTIMIZER: Template = Template {
    file: "optimizer.cuh",
    text: include_str!("../cuda/optimizer.cuh"),
};

const THREADS: u32 = 256;
/// Blocks at most for the element-wise kernels: they stride over the rest.
const MAX_BLOCKS: u64 = 1 << 16;

/// AdamW's per-step scalars after the moments and `n`, in the kernel's order (f32 each).
pub const ADAMW_SCALARS: [&str; 7] = [
    "decay",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "bc2_sqrt",
    "eps",
    "neg_step_size",
];

/// Which kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptimizerKernel {
    /// `sums[c]` = the sum of squares of chunk `c` (`chunk` values) of `g`, in f64.
    SquareSums { chunk: u32 },
    /// `x = (float)((double)x * coef)`.
    Scale,
    /// One AdamW step; moments in bf16 (else f32); `decay`: the parameter decays.
    AdamW { bf16_moments: bool, decay: bool },
}

impl OptimizerKernel {
    /// `square_sums_f64_16384`, `scale_f64`, `adamw_update_bf16_decay`, ….
    pub fn name(&self) -> String {
        match *self {
            OptimizerKernel::SquareSums { chunk } => format!("square_sums_f64_{chunk}"),
            OptimizerKernel::Scale => "scale_f64".to_owned(),
            OptimizerKernel::AdamW {
                bf16_moments,
                decay,
            } => format!(
                "adamw_update_{}{}",
                if bf16_moments { "bf16" } else { "f32" },
                if decay { "_decay" } else { "" }
            ),
        }
    }

    pub fn block_threads(&self) -> u32 {
        THREADS
    }

    /// Grid for `n` elements: a warp per chunk for the sums, else a thread per element up to
    /// [`MAX_BLOCKS`] blocks (at least one).
    pub fn grid(&self, n: u64) -> [u32; 3] {
        let blocks = match *self {
            OptimizerKernel::SquareSums { chunk } => n
                .div_ceil(u64::from(chunk))
                .div_ceil(u64::from(THREADS / 32)),
            _ => n.div_ceil(u64::from(THREADS)).min(MAX_BLOCKS),
        };
        [blocks.max(1) as u32, 1, 1]
    }

    pub fn kernel_params(&self) -> Vec<KernelParam> {
        match *self {
            OptimizerKernel::SquareSums { .. } => vec![
                KernelParam::new("g", ParamType::ConstPtr(Elem::F32)),
                KernelParam::new("n", ParamType::I64),
                KernelParam::new("sums", ParamType::MutPtr(Elem::F64)),
            ],
            OptimizerKernel::Scale => vec![
                KernelParam::new("x", ParamType::MutPtr(Elem::F32)),
                KernelParam::new("n", ParamType::I64),
                KernelParam::new("coef", ParamType::F64),
            ],
            OptimizerKernel::AdamW { bf16_moments, .. } => {
                let moment = if bf16_moments { Elem::Bf16 } else { Elem::F32 };
                let mut params = vec![
                    KernelParam::new("p", ParamType::MutPtr(Elem::F32)),
                    KernelParam::new("g", ParamType::ConstPtr(Elem::F32)),
                    KernelParam::new("m", ParamType::MutPtr(moment)),
                    KernelParam::new("v", ParamType::MutPtr(moment)),
                    KernelParam::new("n", ParamType::I64),
                ];
                params.extend(ADAMW_SCALARS.map(|name| KernelParam::new(name, ParamType::F32)));
                params
            }
        }
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        let params = self.kernel_params();
        let (description, body) = match *self {
            OptimizerKernel::SquareSums { chunk } => (
                format!(
                    "sums of squares of {chunk}-value chunks in f64, in the host's order (8 \
                     lanes, then the rest): a warp per chunk."
                ),
                format!("fathom::square_sums_f64<{chunk}>(g, n, sums);"),
            ),
            OptimizerKernel::Scale => (
                "x = (float)((double)x * coef): the gradient clipping.".to_owned(),
                "fathom::scale_f64(x, n, coef);".to_owned(),
            ),
            OptimizerKernel::AdamW {
                bf16_moments,
                decay,
            } => (
                format!(
                    "one AdamW step, {} moments{}, each operation rounded as the host's.",
                    if bf16_moments { "bf16" } else { "f32" },
                    if decay {
                        ", decaying the parameter"
                    } else {
                        ""
                    }
                ),
                format!(
                    "fathom::adamw_update<{}, {}>(p, g, m, v, n, {});",
                    if bf16_moments { "bf16" } else { "float" },
                    decay,
                    ADAMW_SCALARS.join(", ")
                ),
            ),
        };
        Ok(portable_kernel(
            &self.name(),
            description,
            &[COMMON, OPTIMIZER],
            (THREADS, &params),
            body,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_params_and_grids() {
        let sums = OptimizerKernel::SquareSums { chunk: 1 << 14 };
        assert_eq!(sums.name(), "square_sums_f64_16384");
        // 8 chunks (warps) per block: 3 chunks and a partial one fit one block.
        assert_eq!(sums.grid(3 * 16384 + 13), [1, 1, 1]);
        assert_eq!(sums.grid(9 * 16384), [2, 1, 1]);
        let adamw = OptimizerKernel::AdamW {
            bf16_moments: true,
            decay: true,
        };
        assert_eq!(adamw.name(), "adamw_update_bf16_decay");
        let params = adamw.kernel_params();
        assert_eq!(params.len(), 5 + ADAMW_SCALARS.len());
        assert_eq!(params[2].ty, ParamType::MutPtr(Elem::Bf16));
        assert_eq!(OptimizerKernel::Scale.grid(0), [1, 1, 1]);
        assert_eq!(OptimizerKernel::Scale.grid(1 << 40), [1 << 16, 1, 1]);
        let source = adamw.instantiate().unwrap().source;
        assert!(source.contains("fathom::adamw_update<bf16, true>(p, g, m, v, n, decay,"));
        let scale = OptimizerKernel::Scale.instantiate().unwrap().source;
        assert!(scale.contains("double coef"), "{scale}");
    }
}
