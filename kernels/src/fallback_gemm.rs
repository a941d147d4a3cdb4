//! `fp8_gemm_fallback`: the portable FP8 GEMM (`cuda/fallback_gemm.cuh`) for GPUs without
//! Hopper's wgmma/TMA. Same operands, scale layouts, grouping and outputs as
//! [`Fp8GemmParams`](crate::Fp8GemmParams), but plain pointers instead of tensor maps; E4M3 is
//! widened to BF16 in shared memory and multiplied with `mma.sync`. Compiled for `sm_80`.

use crate::fp8_gemm::{BLOCK_K, BScaling, GemmGrouping, GemmOutput, GemmProblem, TILES};
use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, KernelError, KernelParam, KernelSource, ParamType,
    Template, assemble, check_param, cpp_bool,
};

const FALLBACK_GEMM: Template = Template {
    file: "fallback_gemm.cuh",
    text: include_str!("../cuda/fallback_gemm.cuh"),
};

const TEMPLATE: &str = "fp8_gemm_fallback";
/// Static shared memory a block may use without opting in.
const STATIC_SMEM_LIMIT: u32 = 48 * 1024;

/// Template parameters of `fallback_gemm.cuh` (4 warps in a 2×2 grid).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FallbackGemmParams {
    /// Rows per block: a multiple of 32.
    pub block_m: u32,
    /// Columns per block: 32, 64 or 128 (a divisor of 128).
    pub block_n: u32,
    pub b_scaling: BScaling,
    pub output: GemmOutput,
    pub grouping: GemmGrouping,
}

impl FallbackGemmParams {
    /// 64×64 tiles, forward scaling (1×128 × 128×128), BF16 out, dense.
    pub fn new(block_m: u32, block_n: u32) -> Self {
        Self {
            block_m,
            block_n,
            b_scaling: BScaling::Block128x128,
            output: GemmOutput::Bf16,
            grouping: GemmGrouping::Dense,
        }
    }

    /// Threads per block.
    pub fn block_threads(&self) -> u32 {
        128
    }

    /// Static shared memory: both operand tiles staged as BF16 with 8 elements of row padding.
    pub fn static_smem_bytes(&self) -> u32 {
        (self.block_m + self.block_n) * (BLOCK_K + 8) * 2
    }

    pub fn validate(&self) -> Result<(), KernelError> {
        check_param(
            self.block_m >= 32 && self.block_m.is_multiple_of(32),
            TEMPLATE,
            "block_m",
            self.block_m,
            "a multiple of 32",
        )?;
        check_param(
            matches!(self.block_n, 32 | 64 | 128),
            TEMPLATE,
            "block_n",
            self.block_n,
            "32, 64 or 128",
        )?;
        check_param(
            self.grouping != GemmGrouping::Contiguous
                || crate::fp8_gemm::GROUPED_M_ALIGN.is_multiple_of(self.block_m),
            TEMPLATE,
            "block_m",
            self.block_m,
            "a divisor of 128 for grouped GEMMs",
        )?;
        self.grouping
            .check_params(TEMPLATE, self.b_scaling, self.output)?;
        check_param(
            self.static_smem_bytes() <= STATIC_SMEM_LIMIT,
            TEMPLATE,
            "block_m + block_n",
            self.block_m + self.block_n,
            "at most 180 (48 KiB of static shared memory)",
        )
    }

    /// The deterministic kernel name, e.g. `fp8_gemm_fallback_1x128_128x128_m64n64k128_bf16`
    /// (`grouped_…`, `kgrouped_…` when grouped).
    pub fn name(&self) -> String {
        format!(
            "{}fp8_gemm_fallback_1x128_{}_m{}n{}k{BLOCK_K}_{}",
            self.grouping.prefix(),
            self.b_scaling.tag(),
            self.block_m,
            self.block_n,
            self.output.tag()
        )
    }

    /// Launch grid of one product: `(ceil(N / block_n), ceil(M / block_m), 1)`. A K-grouped
    /// GEMM needs a product per group: [`grid_for`](Self::grid_for).
    pub fn grid(&self, m: u32, n: u32) -> [u32; 3] {
        [n.div_ceil(self.block_n), m.div_ceil(self.block_m), 1]
    }

    /// Launch grid for a problem: [`grid`](Self::grid)'s, with a z block per group when
    /// K-grouped: `(ceil(N / block_n), ceil(M / block_m), groups)`.
    pub fn grid_for(&self, problem: &GemmProblem) -> [u32; 3] {
        let [x, y, _] = self.grid(problem.m, problem.n);
        let z = match self.grouping {
            GemmGrouping::KGrouped => problem.groups.max(1),
            GemmGrouping::Dense | GemmGrouping::Contiguous => 1,
        };
        [x, y, z]
    }

    /// The entry point's parameters in order: the same for every configuration, plus
    /// `k_offsets` (after `block_expert`) and `groups` (last) when K-grouped.
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let k_grouped = self.grouping == GemmGrouping::KGrouped;
        let mut params = vec![
            KernelParam::new("a", ParamType::ConstPtr(Elem::E4m3)),
            KernelParam::new("b", ParamType::ConstPtr(Elem::E4m3)),
            KernelParam::new("scale_a", ParamType::ConstPtr(Elem::F32)),
            KernelParam::new("scale_b", ParamType::ConstPtr(Elem::F32)),
            KernelParam::new("block_expert", ParamType::ConstPtr(Elem::I32)),
        ];
        if k_grouped {
            params.push(KernelParam::new(
                "k_offsets",
                ParamType::ConstPtr(Elem::I32),
            ));
        }
        params.extend([
            KernelParam::new("out", ParamType::MutPtr(self.output.elem())),
            KernelParam::new("out_rows", ParamType::ConstPtr(Elem::I32)),
            KernelParam::new("m", ParamType::I32),
            KernelParam::new("n", ParamType::I32),
            KernelParam::new("k", ParamType::I32),
        ]);
        if k_grouped {
            params.push(KernelParam::new("groups", ParamType::I32));
        }
        params
    }

    /// Instantiates the template for `sm_80`.
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        self.validate()?;
        let name = self.name();
        let params = self.kernel_params();
        let k_grouped = self.grouping == GemmGrouping::KGrouped;
        let body = vec![
            format!(
                "fathom::fp8_gemm_fallback<{}, {}, {}, {}, {}, {}, {}>(",
                self.block_m,
                self.block_n,
                cpp_bool(self.b_scaling == BScaling::Row1x128),
                self.grouping.cpp(),
                cpp_bool(self.output == GemmOutput::Bf16),
                cpp_bool(self.output == GemmOutput::F32Accumulate),
                cpp_bool(self.output == GemmOutput::F32Scattered),
            ),
            format!(
                "    a, b, scale_a, scale_b, block_expert, {}, out, out_rows, m, n, k, {});",
                if k_grouped { "k_offsets" } else { "nullptr" },
                if k_grouped { "groups" } else { "1" },
            ),
        ];
        let description = vec![
            "Portable FP8 GEMM (E4M3 widened to BF16, mma.sync), same contract as fp8_gemm."
                .to_owned(),
            format!(
                "Tile {}x{}x{BLOCK_K}, {} threads, {} bytes of static shared memory; block_expert is only read when grouped{}.",
                self.block_m,
                self.block_n,
                self.block_threads(),
                self.static_smem_bytes(),
                if k_grouped {
                    ", K-grouped: a product per group of K, blockIdx.z the group"
                } else {
                    ""
                }
            ),
        ];
        Ok(assemble(
            &description,
            &[COMMON, TILES, FALLBACK_GEMM],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: self.block_threads(),
                cluster_x: 1,
                params: &params,
                body,
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
    fn fallback_names_and_limits() {
        let p = FallbackGemmParams::new(64, 64);
        assert_eq!(p.name(), "fp8_gemm_fallback_1x128_128x128_m64n64k128_bf16");
        let source = p.instantiate().expect("valid");
        assert_eq!(source.arch_requirement, ArchRequirement::Sm80OrNewer);
        assert!(
            !source.source.contains("wgmma.mma_async") && !source.source.contains("cp.async.bulk")
        );
        assert!(FallbackGemmParams::new(128, 128).validate().is_err());
        let grouped = FallbackGemmParams {
            grouping: GemmGrouping::Contiguous,
            ..FallbackGemmParams::new(96, 64)
        };
        assert!(grouped.validate().is_err());
    }

    #[test]
    fn k_grouped_fallback_takes_offsets_and_a_z_block_per_group() {
        let p = FallbackGemmParams {
            b_scaling: BScaling::Row1x128,
            output: GemmOutput::F32,
            grouping: GemmGrouping::KGrouped,
            ..FallbackGemmParams::new(64, 64)
        };
        assert_eq!(
            p.name(),
            "kgrouped_fp8_gemm_fallback_1x128_1x128_m64n64k128_f32"
        );
        let names: Vec<_> = p.kernel_params().iter().map(|k| k.name).collect();
        assert_eq!(
            names,
            [
                "a",
                "b",
                "scale_a",
                "scale_b",
                "block_expert",
                "k_offsets",
                "out",
                "out_rows",
                "m",
                "n",
                "k",
                "groups"
            ]
        );
        // The other groupings' parameters are unchanged.
        assert_eq!(FallbackGemmParams::new(64, 64).kernel_params().len(), 10);
        let problem = GemmProblem {
            m: 7168,
            n: 2048,
            k: 640,
            groups: 4,
        };
        assert_eq!(p.grid_for(&problem), [32, 112, 4]);
        assert_eq!(p.grid(problem.m, problem.n), [32, 112, 1]);
        assert_eq!(
            FallbackGemmParams::new(64, 64).grid_for(&problem),
            [32, 112, 1]
        );
        // Rows are not experts' blocks here: any multiple of 32 will do.
        assert!(FallbackGemmParams { block_m: 96, ..p }.validate().is_ok());
        for bad in [
            FallbackGemmParams {
                b_scaling: BScaling::Block128x128,
                ..p
            },
            FallbackGemmParams {
                output: GemmOutput::F32Scattered,
                ..p
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let kernel = p.instantiate().expect("valid");
        assert!(kernel.source.contains(
            "fathom::fp8_gemm_fallback<64, 64, true, fathom::Grouping::KGrouped, false, false, false>("
        ));
        insta::assert_snapshot!(kernel.generated_wrapper());
    }
}
