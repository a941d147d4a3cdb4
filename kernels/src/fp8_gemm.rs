//! `fp8_gemm` and `grouped_fp8_gemm`: the Hopper FP8 GEMM with DeepSeek-V3 fine-grained scaling
//! (`cuda/fp8_gemm.cuh`), and the parameters that instantiate it.
//!
//! The kernel computes one layout, "NT": `D[M][N] = A[M][K] · B[N][K]ᵀ` with both operands
//! K-major, as DeepGEMM does. The three GEMMs of a training Linear `Y = X Wᵀ`
//! (X: `[T][in]`, W: `[out][in]`) are all expressed in it by quantising the operands in the
//! orientation the kernel wants ([`TrainingGemm`]):
//!
//! | GEMM | A (1×128 scales) | B | D |
//! |---|---|---|---|
//! | forward `Y = X Wᵀ` | X `[T][in]`, `quantize_1x128` | W `[out][in]`, `quantize_128x128` | Y `[T][out]` BF16 |
//! | input grad `dX = dY W` | dY `[T][out]`, `quantize_1x128` | Wᵀ `[in][out]`, `quantize_128x128` transposed | dX `[T][in]` BF16 |
//! | weight grad `dW = dYᵀ X` | dYᵀ `[out][T]`, `quantize_128x1t` | Xᵀ `[in][T]`, `quantize_128x1t` (1×128 scales on B) | dW `[out][in]` FP32, accumulated |
//!
//! Wᵀ's 128×128 blocks are W's blocks transposed with the same scales, so the transposed weight
//! is exact (no second rounding); the weight-gradient operands are re-quantised along T from the
//! BF16/FP32 tensors (DeepSeek-V3 caches them for that purpose).
//!
//! The MoE experts run the forward and input gradient as one grouped GEMM over tokens sorted by
//! expert ([`GemmGrouping::Contiguous`]), and the weight gradients as one K-grouped GEMM
//! ([`GemmGrouping::KGrouped`]): `dW_e = dY_eᵀ X_e` for every expert `e` at once, K being the
//! experts' token-slots laid out by expert and padded per expert to a multiple of 128, the
//! operands `quantize_128x1t_gathered` of dY and X.

use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, HOPPER, KernelError, KernelParam, KernelSource,
    ParamType, Template, assemble, check_param, check_problem, cpp_bool,
};
use crate::tensor_map::{TensorMapDesc, TensorMapDtype, TensorMapSwizzle};
use crate::wgmma::{wgmma_struct_name, write_wgmma_struct};

pub(crate) const TILES: Template = Template {
    file: "tiles.cuh",
    text: include_str!("../cuda/tiles.cuh"),
};

const FP8_GEMM: Template = Template {
    file: "fp8_gemm.cuh",
    text: include_str!("../cuda/fp8_gemm.cuh"),
};

/// K extent of one pipeline stage and of one scale group (DeepSeek-V3's N_C = 128).
pub const BLOCK_K: u32 = 128;
/// Rows per entry of the grouped GEMMs' `block_expert` array; every expert's segment of the
/// sorted tokens is padded to a multiple of it.
pub const GROUPED_M_ALIGN: u32 = 128;
/// Shared memory a Hopper block may opt into (227 KiB).
pub const SM90_MAX_SMEM_BYTES: u32 = 232_448;

/// The tile widths the template takes: a multiple of 16 whose tiles meet at most two 128-column
/// weight scale blocks (at most 128 + gcd(block_n, 128)), and at most 192 (the tensor-core
/// partial sums and the promoted sums take `block_n` registers per thread of the 232 a math warp
/// group has).
pub const BLOCK_N_CHOICES: [u32; 11] = [16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 192];

/// How a GEMM's tiles are spread over thread blocks: a launch-time choice, the same kernel runs
/// either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileSchedule {
    /// At most this many thread blocks, each computing tiles `b, b + blocks, …` ("persistent":
    /// while the math warps write one tile out the producer already loads the next). `None`: one
    /// block per tile.
    pub max_blocks: Option<u32>,
    /// Row blocks per raster band: tiles are numbered down a band's rows, then across its
    /// column blocks, so that the blocks running at once share A rows and B columns in L2. 1:
    /// row by row, column blocks fastest.
    pub raster_band: u32,
}

impl TileSchedule {
    /// One thread block per tile, row by row (the schedule measured on the H200 in session 12).
    pub const ONE_TILE_PER_BLOCK: TileSchedule = TileSchedule {
        max_blocks: None,
        raster_band: 1,
    };

    /// One thread block per SM, each looping over tiles in bands of `raster_band` row blocks.
    pub fn persistent(sms: u32, raster_band: u32) -> Self {
        TileSchedule {
            max_blocks: Some(sms.max(1)),
            raster_band: raster_band.max(1),
        }
    }
}

impl std::fmt::Display for TileSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.max_blocks {
            None => write!(f, "tile per block")?,
            Some(blocks) => write!(f, "{blocks} blocks")?,
        }
        write!(f, ", band {}", self.raster_band)
    }
}

/// Granularity of B's scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BScaling {
    /// One scale per 128×128 block (weights), `[ceil(N/128)][ceil(K/128)]` (per expert when grouped).
    Block128x128,
    /// One scale per 1×128 tile (an activation as B: the weight-gradient GEMM),
    /// `[ceil(K/128)][round_up(N, 4)]`.
    Row1x128,
}

impl BScaling {
    pub(crate) fn tag(self) -> &'static str {
        match self {
            BScaling::Block128x128 => "128x128",
            BScaling::Row1x128 => "1x128",
        }
    }
}

/// What the GEMM writes into D (row-major `[M][N]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmOutput {
    Bf16,
    F32,
    /// `D += A·Bᵀ` in FP32 (weight-gradient accumulation).
    F32Accumulate,
    /// FP32, row `r` of the product written to row `out_rows[r]` of D, and nowhere where that is
    /// -1: the grouped GEMMs' padded rows straight back to their token-slots.
    F32Scattered,
}

impl GemmOutput {
    pub(crate) fn tag(self) -> &'static str {
        match self {
            GemmOutput::Bf16 => "bf16",
            GemmOutput::F32 => "f32",
            GemmOutput::F32Accumulate => "f32acc",
            GemmOutput::F32Scattered => "f32rows",
        }
    }

    pub(crate) fn elem(self) -> Elem {
        match self {
            GemmOutput::Bf16 => Elem::Bf16,
            GemmOutput::F32 | GemmOutput::F32Accumulate | GemmOutput::F32Scattered => Elem::F32,
        }
    }
}

/// Dense, or one of the MoE experts' grouped GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmGrouping {
    Dense,
    /// DeepGEMM's "contiguous" layout: A's rows sorted by expert, each expert's segment padded to
    /// a multiple of [`GROUPED_M_ALIGN`]; `block_expert[row / 128]` is the expert of each block
    /// (-1 for padding blocks, which are skipped and left unwritten); B is `[experts·N][K]`.
    Contiguous,
    /// One product per group over the group's range of K (the experts' weight gradients):
    /// `D[g][M][N] = Σ_{k ∈ [k_offsets[g], k_offsets[g+1])} A[M][k] · B[N][k]`, written at
    /// `out + g·M·N`. A `[M][K]` and B `[N][K]` span every group's K (K = `k_offsets[groups]`),
    /// both with 1×128 scales ([`BScaling::Row1x128`]); the offsets are multiples of
    /// [`BLOCK_K`], so every K block and its scales belong to one group. A group with an empty
    /// range gets zeros. Clusters and scattered output are not supported.
    KGrouped,
}

impl GemmGrouping {
    /// The template argument (`fathom::Grouping` in `common.cuh`).
    pub(crate) fn cpp(self) -> &'static str {
        match self {
            GemmGrouping::Dense => "fathom::Grouping::Dense",
            GemmGrouping::Contiguous => "fathom::Grouping::Contiguous",
            GemmGrouping::KGrouped => "fathom::Grouping::KGrouped",
        }
    }

    /// The kernel name's family prefix (`grouped_` or `kgrouped_`; empty when dense).
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            GemmGrouping::Dense => "",
            GemmGrouping::Contiguous => "grouped_",
            GemmGrouping::KGrouped => "kgrouped_",
        }
    }

    /// Checks what a grouping needs of the other parameters: K-grouped GEMMs have one B for every
    /// group, scaled per row, and write D's rows in place.
    pub(crate) fn check_params(
        self,
        template: &'static str,
        b_scaling: BScaling,
        output: GemmOutput,
    ) -> Result<(), KernelError> {
        if self != GemmGrouping::KGrouped {
            return Ok(());
        }
        check_param(
            b_scaling == BScaling::Row1x128,
            template,
            "b_scaling",
            b_scaling.tag(),
            "1x128 for a K-grouped GEMM (one B spans every group)",
        )?;
        check_param(
            output != GemmOutput::F32Scattered,
            template,
            "output",
            output.tag(),
            "an unscattered output for a K-grouped GEMM",
        )
    }
}

/// One of the three GEMMs of a training Linear, in the NT form (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrainingGemm {
    Forward,
    InputGrad,
    WeightGrad,
}

impl TrainingGemm {
    /// Parameters for this GEMM with the given tiles (BF16 output for the forward and input
    /// gradient; FP32 accumulation and 1×128 B scales for the weight gradient, FP32 written
    /// whole for the experts' K-grouped weight gradients).
    pub fn params(
        self,
        block_m: u32,
        block_n: u32,
        stages: u32,
        grouping: GemmGrouping,
    ) -> Fp8GemmParams {
        let (b_scaling, output) = match self {
            TrainingGemm::Forward | TrainingGemm::InputGrad => {
                (BScaling::Block128x128, GemmOutput::Bf16)
            }
            TrainingGemm::WeightGrad if grouping == GemmGrouping::KGrouped => {
                (BScaling::Row1x128, GemmOutput::F32)
            }
            TrainingGemm::WeightGrad => (BScaling::Row1x128, GemmOutput::F32Accumulate),
        };
        Fp8GemmParams {
            block_m,
            block_n,
            stages,
            cluster_m: 1,
            b_scaling,
            output,
            grouping,
        }
    }
}

/// Template parameters of `fp8_gemm.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fp8GemmParams {
    /// Rows per block: 64 (one math warp group) or 128 (two).
    pub block_m: u32,
    /// Columns per block: a multiple of 16 up to 160, or 192 ([`BLOCK_N_CHOICES`]). Wider than
    /// 128 or not dividing it, a tile meets two weight scale blocks and picks a scale per 8
    /// columns.
    pub block_n: u32,
    /// Depth of the TMA → wgmma shared-memory ring.
    pub stages: u32,
    /// Thread blocks per cluster along M: 1, or 2 for dense GEMMs (the pair computes two
    /// neighbouring row blocks' tiles of one column block, each loading half of B's tile and
    /// multicasting it to both, which halves B's reads from L2).
    pub cluster_m: u32,
    pub b_scaling: BScaling,
    pub output: GemmOutput,
    pub grouping: GemmGrouping,
}

/// Sizes of one GEMM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmProblem {
    /// Rows of A and D (for contiguous grouped GEMMs, all experts' padded segments together).
    pub m: u32,
    /// Columns of D (per expert).
    pub n: u32,
    /// Columns of A and B (for K-grouped GEMMs, every group's padded range together:
    /// `k_offsets[groups]`).
    pub k: u32,
    /// Experts, or K groups (1 for dense GEMMs).
    pub groups: u32,
}

const TEMPLATE: &str = "fp8_gemm";

impl Fp8GemmParams {
    /// The forward/input-gradient configuration: 1×128 × 128×128 scaling, BF16 out, dense.
    pub fn new(block_m: u32, block_n: u32, stages: u32) -> Self {
        TrainingGemm::Forward.params(block_m, block_n, stages, GemmGrouping::Dense)
    }

    /// A tile configuration for a problem of `m` rows and `n` columns: 64-row blocks for small
    /// M (unless A's rows are experts' 128-row blocks), the widest `block_n` (≤ 128) dividing N,
    /// and as many stages as fit (at most 6) — a starting point, not a tuned choice.
    pub fn for_shape(
        m: u32,
        n: u32,
        b_scaling: BScaling,
        output: GemmOutput,
        grouping: GemmGrouping,
    ) -> Self {
        let block_m = if m <= 64 && grouping != GemmGrouping::Contiguous {
            64
        } else {
            128
        };
        let block_n = [128, 64, 32, 16]
            .into_iter()
            .find(|bn| n.is_multiple_of(*bn))
            .unwrap_or(128);
        Self {
            block_m,
            block_n,
            stages: 1,
            cluster_m: 1,
            b_scaling,
            output,
            grouping,
        }
        .with_most_stages()
    }

    /// The tile configurations worth timing for a problem of `m` rows and `n` columns: the
    /// [`for_shape`](Self::for_shape) choice, and 128-row tiles of 64 to 192 columns (at most
    /// `n` rounded up to 16), each with as many stages as fit; for dense GEMMs of more than one
    /// row block, the tiles of 128 columns and more in clusters of two as well.
    pub fn candidates(
        m: u32,
        n: u32,
        b_scaling: BScaling,
        output: GemmOutput,
        grouping: GemmGrouping,
    ) -> Vec<Self> {
        let first = Self::for_shape(m, n, b_scaling, output, grouping);
        let mut out = vec![first];
        for block_n in [64, 128, 144, 160, 192] {
            let params = Self { block_n, ..first }.with_most_stages();
            if block_n <= n.next_multiple_of(16) && !out.contains(&params) {
                out.push(params);
            }
        }
        if grouping == GemmGrouping::Dense && m > first.block_m {
            let pairs: Vec<Self> = out
                .iter()
                .filter(|p| p.block_n >= 128)
                .map(|p| Self { cluster_m: 2, ..*p })
                .collect();
            out.extend(pairs);
        }
        out
    }

    /// These parameters with the deepest ring that fits in shared memory, at most 6 stages.
    fn with_most_stages(self) -> Self {
        (1..=6)
            .rev()
            .map(|stages| Self { stages, ..self })
            .find(|p| p.dynamic_smem_bytes() <= SM90_MAX_SMEM_BYTES)
            .unwrap_or(Self { stages: 1, ..self })
    }

    /// Checks the parameters against what the template supports.
    pub fn validate(&self) -> Result<(), KernelError> {
        check_param(
            matches!(self.block_m, 64 | 128),
            TEMPLATE,
            "block_m",
            self.block_m,
            "64 or 128",
        )?;
        check_param(
            BLOCK_N_CHOICES.contains(&self.block_n),
            TEMPLATE,
            "block_n",
            self.block_n,
            "a multiple of 16 up to 160, or 192 (a tile meets at most two 128-column scale blocks)",
        )?;
        check_param(
            self.cluster_m == 1 || (self.cluster_m == 2 && self.grouping == GemmGrouping::Dense),
            TEMPLATE,
            "cluster_m",
            self.cluster_m,
            "1, or 2 for a dense GEMM (a pair of row blocks may belong to two experts)",
        )?;
        self.grouping
            .check_params(TEMPLATE, self.b_scaling, self.output)?;
        check_param(
            (1..=16).contains(&self.stages),
            TEMPLATE,
            "stages",
            self.stages,
            "1 to 16",
        )?;
        check_param(
            self.dynamic_smem_bytes() <= SM90_MAX_SMEM_BYTES,
            TEMPLATE,
            "stages",
            self.stages,
            &format!("few enough stages for {SM90_MAX_SMEM_BYTES} bytes of shared memory"),
        )
    }

    /// Math warp groups (each owns 64 rows).
    pub fn math_warpgroups(&self) -> u32 {
        self.block_m / 64
    }

    /// Threads per block: the math warp groups plus one producer warp group.
    pub fn block_threads(&self) -> u32 {
        128 * (self.math_warpgroups() + 1)
    }

    /// Dynamic shared memory (mirrors `Fp8GemmSmem` in the template, plus 1 KiB of alignment slack).
    pub fn dynamic_smem_bytes(&self) -> u32 {
        let a = self.block_m * BLOCK_K;
        let b = self.block_n * BLOCK_K;
        let scale_a = self.block_m * 4;
        let scale_b = match self.b_scaling {
            BScaling::Block128x128 => 0,
            BScaling::Row1x128 => (self.block_n * 4).div_ceil(128) * 128,
        };
        self.stages * (a + b + scale_a + scale_b) + 2 * self.stages * 8 + 1024
    }

    /// The deterministic kernel name, e.g. `fp8_gemm_1x128_128x128_m128n128k128_s4_bf16`,
    /// `grouped_fp8_gemm_…`, `kgrouped_fp8_gemm_1x128_1x128_m128n128k128_s6_f32`.
    pub fn name(&self) -> String {
        let family = format!("{}fp8_gemm", self.grouping.prefix());
        let cluster = if self.cluster_m > 1 {
            format!("_c{}", self.cluster_m)
        } else {
            String::new()
        };
        format!(
            "{family}_1x128_{}_m{}n{}k{BLOCK_K}_s{}{cluster}_{}",
            self.b_scaling.tag(),
            self.block_m,
            self.block_n,
            self.stages,
            self.output.tag()
        )
    }

    /// Launch grid for a problem: one-dimensional, a block per tile or at most the schedule's
    /// blocks; with clusters, a whole number of clusters (a cluster's tiles are `cluster_m`
    /// neighbouring row blocks, the last pair's second tile past M when the row blocks are odd).
    /// A K-grouped GEMM has `groups` times a dense one's tiles.
    pub fn grid(&self, problem: &GemmProblem, schedule: &TileSchedule) -> [u32; 3] {
        let cluster = self.cluster_m.max(1);
        let products = match self.grouping {
            GemmGrouping::KGrouped => problem.groups,
            GemmGrouping::Dense | GemmGrouping::Contiguous => 1,
        };
        let units = (products
            * problem.m.div_ceil(self.block_m).div_ceil(cluster)
            * problem.n.div_ceil(self.block_n))
        .max(1);
        let clusters = schedule
            .max_blocks
            .map_or(units, |b| (b / cluster).clamp(1, units));
        [clusters * cluster, 1, 1]
    }

    /// Checks that the kernel can run a problem (TMA needs 16-byte row strides; the epilogue
    /// stores column pairs; grouped rows, and K groups, come in whole blocks).
    pub fn check_problem(&self, problem: &GemmProblem) -> Result<(), KernelError> {
        check_problem(problem.m > 0, TEMPLATE, "m", problem.m, "at least 1")?;
        check_problem(
            problem.n > 0 && problem.n.is_multiple_of(8),
            TEMPLATE,
            "n",
            problem.n,
            "a positive multiple of 8",
        )?;
        check_problem(
            problem.k > 0 && problem.k.is_multiple_of(16),
            TEMPLATE,
            "k",
            problem.k,
            "a positive multiple of 16",
        )?;
        // Dense: one group; grouped: whole 128-row blocks of A per expert; K-grouped: whole
        // 128-wide K blocks per group.
        let (grouped_axis, value, align, what) = match self.grouping {
            GemmGrouping::Dense => {
                return check_problem(problem.groups == 1, TEMPLATE, "groups", problem.groups, "1");
            }
            GemmGrouping::Contiguous => (
                "m",
                problem.m,
                GROUPED_M_ALIGN,
                "a multiple of 128 (padded expert segments)",
            ),
            GemmGrouping::KGrouped => (
                "k",
                problem.k,
                BLOCK_K,
                "a multiple of 128 (padded K groups)",
            ),
        };
        check_problem(
            problem.groups >= 1,
            TEMPLATE,
            "groups",
            problem.groups,
            "at least 1",
        )?;
        check_problem(
            value.is_multiple_of(align),
            TEMPLATE,
            grouped_axis,
            value,
            what,
        )
    }

    /// The tensor maps the kernel takes, in parameter order.
    pub fn tensor_maps(&self, problem: &GemmProblem) -> Result<Vec<TensorMapDesc>, KernelError> {
        self.check_problem(problem)?;
        let (m, n, k) = (
            u64::from(problem.m),
            u64::from(problem.n),
            u64::from(problem.k),
        );
        let k_blocks = k.div_ceil(u64::from(BLOCK_K));
        // Contiguous grouped GEMMs stack the experts' B; a K-grouped GEMM's one B spans all groups.
        let (b_rows, b_what) = match self.grouping {
            GemmGrouping::Contiguous => {
                (n * u64::from(problem.groups), "B (E4M3, [groups * N][K])")
            }
            GemmGrouping::Dense | GemmGrouping::KGrouped => (n, "B (E4M3, [N][K])"),
        };
        let mut maps = vec![
            TensorMapDesc {
                param: "tmap_a",
                what: "A (E4M3, [M][K])",
                dtype: TensorMapDtype::U8,
                global_dims: [k, m],
                outer_stride_bytes: k,
                box_dims: [BLOCK_K, self.block_m],
                swizzle: TensorMapSwizzle::B128,
            },
            TensorMapDesc {
                param: "tmap_b",
                what: b_what,
                dtype: TensorMapDtype::U8,
                global_dims: [k, b_rows],
                outer_stride_bytes: k,
                // In a cluster each block loads its share of the tile's rows.
                box_dims: [BLOCK_K, self.block_n / self.cluster_m.max(1)],
                swizzle: TensorMapSwizzle::B128,
            },
            TensorMapDesc {
                param: "tmap_scale_a",
                what: "A scales (f32, [ceil(K/128)][round_up(M, 4)])",
                dtype: TensorMapDtype::F32,
                global_dims: [m, k_blocks],
                outer_stride_bytes: m.next_multiple_of(4) * 4,
                box_dims: [self.block_m, 1],
                swizzle: TensorMapSwizzle::None,
            },
        ];
        if self.b_scaling == BScaling::Row1x128 {
            maps.push(TensorMapDesc {
                param: "tmap_scale_b",
                what: "B scales (f32, [ceil(K/128)][round_up(N, 4)])",
                dtype: TensorMapDtype::F32,
                global_dims: [n, k_blocks],
                outer_stride_bytes: n.next_multiple_of(4) * 4,
                box_dims: [self.block_n, 1],
                swizzle: TensorMapSwizzle::None,
            });
        }
        Ok(maps)
    }

    /// The entry point's parameters in order.
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let mut params = vec![KernelParam::new(
            "out",
            ParamType::MutPtr(self.output.elem()),
        )];
        if self.output == GemmOutput::F32Scattered {
            params.push(KernelParam::new("out_rows", ParamType::ConstPtr(Elem::I32)));
        }
        if self.b_scaling == BScaling::Block128x128 {
            params.push(KernelParam::new("scale_b", ParamType::ConstPtr(Elem::F32)));
        }
        let k_grouped = self.grouping == GemmGrouping::KGrouped;
        if self.grouping == GemmGrouping::Contiguous {
            params.push(KernelParam::new(
                "block_expert",
                ParamType::ConstPtr(Elem::I32),
            ));
        }
        if k_grouped {
            params.push(KernelParam::new(
                "k_offsets",
                ParamType::ConstPtr(Elem::I32),
            ));
        }
        for name in ["m", "n", "k"] {
            params.push(KernelParam::new(name, ParamType::I32));
        }
        if k_grouped {
            params.push(KernelParam::new("groups", ParamType::I32));
        }
        params.push(KernelParam::new("raster_band", ParamType::I32));
        for name in ["tmap_a", "tmap_b", "tmap_scale_a"] {
            params.push(KernelParam::new(name, ParamType::TensorMap));
        }
        if self.b_scaling == BScaling::Row1x128 {
            params.push(KernelParam::new("tmap_scale_b", ParamType::TensorMap));
        }
        params
    }

    /// Instantiates the template: the complete `.cu` source for NVRTC (`sm_90a`).
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        self.validate()?;
        let name = self.name();
        let params = self.kernel_params();
        let wgmma = wgmma_struct_name(self.block_n);
        let block_rows = self.b_scaling == BScaling::Row1x128;
        let grouped = self.grouping == GemmGrouping::Contiguous;
        let k_grouped = self.grouping == GemmGrouping::KGrouped;
        let scattered = self.output == GemmOutput::F32Scattered;
        let call = format!(
            "fathom::fp8_gemm_sm90<{}, {}, {}, {}, {}, {}, {}, {}, {}, {wgmma}>(",
            self.block_m,
            self.block_n,
            self.stages,
            self.cluster_m,
            cpp_bool(block_rows),
            self.grouping.cpp(),
            cpp_bool(self.output == GemmOutput::Bf16),
            cpp_bool(self.output == GemmOutput::F32Accumulate),
            cpp_bool(scattered),
        );
        let args = format!(
            "    out, {}, {}, {}, {}, m, n, k, {}, raster_band, &tmap_a, &tmap_b, &tmap_scale_a, {});",
            if scattered { "out_rows" } else { "nullptr" },
            if block_rows { "nullptr" } else { "scale_b" },
            if grouped { "block_expert" } else { "nullptr" },
            if k_grouped { "k_offsets" } else { "nullptr" },
            if k_grouped { "groups" } else { "1" },
            if block_rows {
                "&tmap_scale_b"
            } else {
                "nullptr"
            },
        );
        let description = vec![
            format!(
                "FP8 E4M3 GEMM D[M][N] = A[M][K] * B[N][K]^T, A scales 1x128, B scales {}, {} output{}.",
                self.b_scaling.tag(),
                self.output.tag(),
                match self.grouping {
                    GemmGrouping::Dense => "",
                    GemmGrouping::Contiguous => ", grouped (contiguous experts)",
                    GemmGrouping::KGrouped => ", K-grouped (a product per group of K)",
                }
            ),
            format!(
                "Tile {}x{}x{BLOCK_K}, {} stages, {} threads, {} bytes of dynamic shared memory{}.",
                self.block_m,
                self.block_n,
                self.stages,
                self.block_threads(),
                self.dynamic_smem_bytes(),
                if self.cluster_m > 1 {
                    format!(
                        ", clusters of {} along M sharing B (multicast)",
                        self.cluster_m
                    )
                } else {
                    String::new()
                }
            ),
        ];
        Ok(assemble(
            &description,
            &[COMMON, HOPPER, TILES, FP8_GEMM],
            |w| write_wgmma_struct(w, self.block_n),
            EntryPoint {
                name: &name,
                block_threads: self.block_threads(),
                cluster_x: self.cluster_m,
                params: &params,
                body: vec![call, args],
            },
            ArchRequirement::Sm90a,
            self.dynamic_smem_bytes(),
        ))
    }
}

#[cfg(test)]
#[path = "fp8_gemm_tests.rs"]
mod tests;
