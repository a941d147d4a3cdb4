//! `mla_attention_fwd` and `mla_attention_bwd`: causal MLA attention in BF16 with `mma.sync`
//! (`cuda/mla_attention_fwd.cuh`, `cuda/mla_attention_bwd.cuh`), flash-attention style with an
//! FP32 online softmax. Query/key heads are `nope + rope` wide (192 = 128 + 64 in DeepSeek-V3),
//! the rope key is one tensor shared by all heads, values are `v` wide (128). Portable to `sm_80`.

use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, KernelError, KernelParam, KernelSource, ParamType,
    Template, assemble, check_param,
};

const FWD: Template = Template {
    file: "mla_attention_fwd.cuh",
    text: include_str!("../cuda/mla_attention_fwd.cuh"),
};
const BWD: Template = Template {
    file: "mla_attention_bwd.cuh",
    text: include_str!("../cuda/mla_attention_bwd.cuh"),
};

/// Shared memory a block may opt into on the smallest supported GPU (A100: 163 KiB).
const SM80_MAX_SMEM_BYTES: u32 = 166_912;
/// Warps per block of the backward `delta` kernel.
const DELTA_WARPS: u32 = 8;
/// Every head width (`nope`, `rope`, `v`) is a multiple of this (the `mma.sync` k-step).
pub const HEAD_WIDTH_MULTIPLE: u32 = 16;
/// The value width is a multiple of this for the backward (the `delta` kernel's lanes).
pub const BACKWARD_V_MULTIPLE: u32 = 64;
/// The most query/key channels (`nope + rope`) and value channels the templates hold in
/// registers without spilling: DeepSeek-V3's 128 + 64 and 128, their design point. The
/// backward at 128 + 64 and 192 spills (NVRTC 12.9: 44 bytes stored, 48 loaded on sm_90a).
pub const MAX_QK_WIDTH: u32 = 192;
pub const MAX_V_WIDTH: u32 = 128;

/// Per-head widths of MLA's attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MlaHeadDims {
    /// `qk_nope_head_dim` (128 in DeepSeek-V3).
    pub nope: u32,
    /// `qk_rope_head_dim` (64): the shared RoPE key's width.
    pub rope: u32,
    /// `v_head_dim` (128).
    pub v: u32,
}

impl MlaHeadDims {
    /// DeepSeek-V3's 128 + 64 query/key and 128 value channels.
    pub const DEEPSEEK_V3: Self = Self {
        nope: 128,
        rope: 64,
        v: 128,
    };

    /// Query/key head width.
    pub fn qk(&self) -> u32 {
        self.nope + self.rope
    }

    fn tag(&self) -> String {
        format!("d{}r{}v{}", self.nope, self.rope, self.v)
    }

    fn validate(&self, template: &'static str) -> Result<(), KernelError> {
        for (field, value) in [("nope", self.nope), ("rope", self.rope), ("v", self.v)] {
            check_param(
                value > 0 && value.is_multiple_of(HEAD_WIDTH_MULTIPLE),
                template,
                field,
                value,
                "a positive multiple of 16",
            )?;
        }
        Ok(())
    }
}

fn attention_params(grads: bool) -> Vec<KernelParam> {
    let bf16_in = ParamType::ConstPtr(Elem::Bf16);
    let mut params = vec![
        KernelParam::new("q", bf16_in),
        KernelParam::new("k_nope", bf16_in),
        KernelParam::new("k_rope", bf16_in),
        KernelParam::new("v", bf16_in),
    ];
    if grads {
        params.extend([
            KernelParam::new("d_o", bf16_in),
            KernelParam::new("lse", ParamType::ConstPtr(Elem::F32)),
            KernelParam::new("delta", ParamType::ConstPtr(Elem::F32)),
            KernelParam::new("dq", ParamType::MutPtr(Elem::F32)),
            KernelParam::new("dk_nope", ParamType::MutPtr(Elem::F32)),
            KernelParam::new("dk_rope", ParamType::MutPtr(Elem::F32)),
            KernelParam::new("dv", ParamType::MutPtr(Elem::F32)),
        ]);
    } else {
        params.extend([
            KernelParam::new("o", ParamType::MutPtr(Elem::Bf16)),
            KernelParam::new("lse", ParamType::MutPtr(Elem::F32)),
        ]);
    }
    params.extend([
        KernelParam::new("seq_len", ParamType::I32),
        KernelParam::new("heads", ParamType::I32),
        KernelParam::new("softmax_scale", ParamType::F32),
    ]);
    params
}

/// Template parameters of the forward kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MlaAttentionFwdParams {
    pub head_dims: MlaHeadDims,
    /// Queries per block (16 per warp).
    pub block_m: u32,
    /// Keys per inner iteration.
    pub block_n: u32,
}

impl MlaAttentionFwdParams {
    const TEMPLATE: &'static str = "mla_attention_fwd";

    /// 64 queries (4 warps) × 64 keys per step.
    pub fn new(head_dims: MlaHeadDims) -> Self {
        Self {
            head_dims,
            block_m: 64,
            block_n: 64,
        }
    }

    /// e.g. `mla_attention_fwd_d128r64v128_m64n64`.
    pub fn name(&self) -> String {
        format!(
            "{}_{}_m{}n{}",
            Self::TEMPLATE,
            self.head_dims.tag(),
            self.block_m,
            self.block_n
        )
    }

    pub fn block_threads(&self) -> u32 {
        self.block_m / 16 * 32
    }

    /// Q, K and V tiles in BF16 with 8 elements of row padding.
    pub fn dynamic_smem_bytes(&self) -> u32 {
        let qk = self.head_dims.qk() + 8;
        let v = self.head_dims.v + 8;
        (self.block_m * qk + self.block_n * qk + self.block_n * v) * 2
    }

    /// Grid for `batch` sequences of `seq_len` tokens and `heads` heads.
    pub fn grid(&self, batch: u32, seq_len: u32, heads: u32) -> [u32; 3] {
        [seq_len.div_ceil(self.block_m), heads, batch]
    }

    pub fn validate(&self) -> Result<(), KernelError> {
        let t = Self::TEMPLATE;
        self.head_dims.validate(t)?;
        check_param(
            matches!(self.block_m, 16 | 32 | 64 | 128),
            t,
            "block_m",
            self.block_m,
            "16, 32, 64 or 128",
        )?;
        check_param(
            matches!(self.block_n, 16 | 32 | 64 | 128),
            t,
            "block_n",
            self.block_n,
            "16, 32, 64 or 128",
        )?;
        check_param(
            self.dynamic_smem_bytes() <= SM80_MAX_SMEM_BYTES,
            t,
            "block_m/block_n",
            format!("{}/{}", self.block_m, self.block_n),
            "tiles that fit in 163 KiB of shared memory",
        )
    }

    /// The entry point's parameters, in order.
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        attention_params(false)
    }

    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        self.validate()?;
        let name = self.name();
        let params = self.kernel_params();
        let d = self.head_dims;
        let body = vec![
            format!(
                "fathom::mla_attention_fwd<{}, {}, {}, {}, {}>(",
                d.nope, d.rope, d.v, self.block_m, self.block_n
            ),
            "    q, k_nope, k_rope, v, o, lse, seq_len, heads, softmax_scale);".to_owned(),
        ];
        let description = vec![
            format!(
                "Causal MLA attention forward: q/k heads {} + {} wide, v {} wide; {}x{} tiles.",
                d.nope, d.rope, d.v, self.block_m, self.block_n
            ),
            format!(
                "{} threads, {} bytes of dynamic shared memory; grid (ceil(T/{}), H, B).",
                self.block_threads(),
                self.dynamic_smem_bytes(),
                self.block_m
            ),
        ];
        Ok(assemble(
            &description,
            &[COMMON, FWD],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: self.block_threads(),
                cluster_x: 1,
                params: &params,
                body,
            },
            ArchRequirement::Sm80OrNewer,
            self.dynamic_smem_bytes(),
        ))
    }
}

/// Template parameters of the backward kernels (`delta` preprocessing and the main pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MlaAttentionBwdParams {
    pub head_dims: MlaHeadDims,
    /// Queries per inner iteration.
    pub block_m: u32,
    /// Keys per block (16 per key warp).
    pub block_n: u32,
    /// Warps sharing a 16-key slice, each accumulating `1/col_split` of the dK/dV columns.
    pub col_split: u32,
}

impl MlaAttentionBwdParams {
    const TEMPLATE: &'static str = "mla_attention_bwd";

    /// 64 keys per block, 64 queries per step, dK/dV columns split over 2 warps (8 warps).
    pub fn new(head_dims: MlaHeadDims) -> Self {
        Self {
            head_dims,
            block_m: 64,
            block_n: 64,
            col_split: 2,
        }
    }

    /// e.g. `mla_attention_bwd_d128r64v128_m64n64c2`.
    pub fn name(&self) -> String {
        format!(
            "{}_{}_m{}n{}c{}",
            Self::TEMPLATE,
            self.head_dims.tag(),
            self.block_m,
            self.block_n,
            self.col_split
        )
    }

    /// e.g. `mla_attention_bwd_delta_v128`.
    pub fn delta_name(&self) -> String {
        format!("{}_delta_v{}", Self::TEMPLATE, self.head_dims.v)
    }

    pub fn block_threads(&self) -> u32 {
        self.block_n / 16 * self.col_split * 32
    }

    /// K, V, Q, dO and dS tiles in BF16 (padded rows), plus the query block's lse and delta.
    pub fn dynamic_smem_bytes(&self) -> u32 {
        let qk = self.head_dims.qk() + 8;
        let v = self.head_dims.v + 8;
        let bf16 =
            self.block_n * (qk + v) + self.block_m * (qk + v) + self.block_m * (self.block_n + 8);
        bf16 * 2 + 2 * self.block_m * 4
    }

    /// Grid of the main pass: `(ceil(T / block_n), H, B)`.
    pub fn grid(&self, batch: u32, seq_len: u32, heads: u32) -> [u32; 3] {
        [seq_len.div_ceil(self.block_n), heads, batch]
    }

    /// Threads per block of the `delta` kernel.
    pub fn delta_block_threads(&self) -> u32 {
        DELTA_WARPS * 32
    }

    /// Grid of the `delta` kernel (one warp per token and head).
    pub fn delta_grid(&self, batch: u32, seq_len: u32, heads: u32) -> [u32; 3] {
        let rows = u64::from(batch) * u64::from(seq_len) * u64::from(heads);
        [
            u32::try_from(rows.div_ceil(u64::from(DELTA_WARPS))).unwrap_or(u32::MAX),
            1,
            1,
        ]
    }

    pub fn validate(&self) -> Result<(), KernelError> {
        let t = Self::TEMPLATE;
        self.head_dims.validate(t)?;
        check_param(
            self.head_dims.v.is_multiple_of(BACKWARD_V_MULTIPLE),
            t,
            "v",
            self.head_dims.v,
            "a multiple of 64 (delta kernel)",
        )?;
        check_param(
            matches!(self.block_m, 16 | 32 | 64 | 128),
            t,
            "block_m",
            self.block_m,
            "16, 32, 64 or 128",
        )?;
        check_param(
            matches!(self.block_n, 16 | 32 | 64 | 128),
            t,
            "block_n",
            self.block_n,
            "16, 32, 64 or 128",
        )?;
        check_param(
            matches!(self.col_split, 1 | 2)
                && self.head_dims.qk().is_multiple_of(16 * self.col_split)
                && self.head_dims.v.is_multiple_of(16 * self.col_split),
            t,
            "col_split",
            self.col_split,
            "1 or 2, leaving dK/dV column ranges that are multiples of 16",
        )?;
        check_param(
            self.block_threads() <= 1024,
            t,
            "block_n",
            self.block_n,
            "at most 1024 threads",
        )?;
        check_param(
            self.dynamic_smem_bytes() <= SM80_MAX_SMEM_BYTES,
            t,
            "block_m/block_n",
            format!("{}/{}", self.block_m, self.block_n),
            "tiles that fit in 163 KiB of shared memory",
        )
    }

    /// The main backward pass's parameters, in order.
    pub fn kernel_params(&self) -> Vec<KernelParam> {
        attention_params(true)
    }

    /// The main backward pass (run after [`instantiate_delta`](Self::instantiate_delta)'s kernel).
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        self.validate()?;
        let name = self.name();
        let params = self.kernel_params();
        let d = self.head_dims;
        let body = vec![
            format!(
                "fathom::mla_attention_bwd<{}, {}, {}, {}, {}, {}>(",
                d.nope, d.rope, d.v, self.block_m, self.block_n, self.col_split
            ),
            "    q, k_nope, k_rope, v, d_o, lse, delta, dq, dk_nope, dk_rope, dv, seq_len, heads, softmax_scale);"
                .to_owned(),
        ];
        let description = vec![
            format!(
                "Causal MLA attention backward: q/k heads {} + {} wide, v {} wide; {} keys per block, {} queries per step.",
                d.nope, d.rope, d.v, self.block_n, self.block_m
            ),
            format!(
                "{} threads, {} bytes of dynamic shared memory; dq and dk_rope are accumulated (zero them first).",
                self.block_threads(),
                self.dynamic_smem_bytes()
            ),
        ];
        Ok(assemble(
            &description,
            &[COMMON, BWD],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: self.block_threads(),
                cluster_x: 1,
                params: &params,
                body,
            },
            ArchRequirement::Sm80OrNewer,
            self.dynamic_smem_bytes(),
        ))
    }

    /// The preprocessing kernel's parameters, in order.
    pub fn delta_kernel_params(&self) -> Vec<KernelParam> {
        vec![
            KernelParam::new("o", ParamType::ConstPtr(Elem::Bf16)),
            KernelParam::new("d_o", ParamType::ConstPtr(Elem::Bf16)),
            KernelParam::new("delta", ParamType::MutPtr(Elem::F32)),
            KernelParam::new("batch", ParamType::I32),
            KernelParam::new("seq_len", ParamType::I32),
            KernelParam::new("heads", ParamType::I32),
        ]
    }

    /// The preprocessing kernel `delta[b][h][t] = Σ dO·O`.
    pub fn instantiate_delta(&self) -> Result<KernelSource, KernelError> {
        self.validate()?;
        let name = self.delta_name();
        let params = self.delta_kernel_params();
        let body = vec![
            format!(
                "fathom::mla_attention_bwd_delta<{}, {DELTA_WARPS}>(",
                self.head_dims.v
            ),
            "    o, d_o, delta, batch, seq_len, heads);".to_owned(),
        ];
        let description = vec![format!(
            "MLA attention backward preprocessing: delta = rowsum(dO * O) over {} value channels.",
            self.head_dims.v
        )];
        Ok(assemble(
            &description,
            &[COMMON, BWD],
            |_| {},
            EntryPoint {
                name: &name,
                block_threads: self.delta_block_threads(),
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
    fn attention_names_sizes_and_grids() {
        let fwd = MlaAttentionFwdParams::new(MlaHeadDims::DEEPSEEK_V3);
        assert_eq!(fwd.name(), "mla_attention_fwd_d128r64v128_m64n64");
        assert_eq!(fwd.block_threads(), 128);
        assert_eq!(fwd.dynamic_smem_bytes(), (64 * 200 * 2 + 64 * 136) * 2);
        assert_eq!(fwd.grid(2, 4096, 128), [64, 128, 2]);
        let bwd = MlaAttentionBwdParams::new(MlaHeadDims::DEEPSEEK_V3);
        assert_eq!(bwd.name(), "mla_attention_bwd_d128r64v128_m64n64c2");
        assert_eq!(bwd.delta_name(), "mla_attention_bwd_delta_v128");
        assert_eq!(bwd.block_threads(), 256);
        assert_eq!(bwd.delta_grid(1, 10, 4), [5, 1, 1]);
        let bad = MlaAttentionFwdParams { block_m: 48, ..fwd };
        assert!(bad.instantiate().is_err());
        let odd = MlaHeadDims {
            nope: 120,
            ..MlaHeadDims::DEEPSEEK_V3
        };
        assert!(MlaAttentionBwdParams::new(odd).validate().is_err());
    }
}
