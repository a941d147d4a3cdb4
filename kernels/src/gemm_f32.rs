//! `gemm_f32`: the f32 GEMMs on CUDA cores (`cuda/gemm_f32.cuh`) for programs whose operands stay
//! in f32: the kernel IR's batched strided `MatMul` (any strides, so transposed and broadcast
//! views need no copy) and the grouped expert GEMM with its weight gradient, with the CPU
//! backend's semantics. Problem sizes and strides are launch arguments: one instantiation per
//! kind and tile serves every shape. Compiled for `sm_80` (runs on any GPU of 8.0 or newer).

use crate::kernel::{
    ArchRequirement, COMMON, Elem, EntryPoint, KernelError, KernelParam, KernelSource, ParamType,
    Template, assemble, check_param,
};

const GEMM_F32: Template = Template {
    file: "gemm_f32.cuh",
    text: include_str!("../cuda/gemm_f32.cuh"),
};

const TEMPLATE: &str = "gemm_f32";

/// Which GEMM of the template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum F32GemmKind {
    /// `out[b] = a[b] · b[b]` over up to three batch axes, every operand a strided view.
    Batched,
    /// `out[t, s] = W[ids[t, s]] · x[t, s or 0]`, W stored `[experts, n, k]`, after `group_rows`.
    Grouped,
    /// `out[e] = Σ_{(t, s) routed to e} cotangent[t, s]ᵀ · x[t, s or 0]`, after `group_rows`.
    GroupedWeightGrad,
}

impl F32GemmKind {
    fn tag(self) -> &'static str {
        match self {
            F32GemmKind::Batched => "batched",
            F32GemmKind::Grouped => "grouped",
            F32GemmKind::GroupedWeightGrad => "grouped_wgrad",
        }
    }
}

/// The most batch axes a batched launch takes (the runtime merges contiguous ones first).
pub const MAX_BATCH_AXES: usize = 3;
/// The grid's z extent is capped here; blocks loop over the rest of the batch.
const MAX_GRID_Z: u32 = 65535;

/// Template parameters of `gemm_f32.cuh`: a `block_m`×`block_n` tile per block, `block_k`
/// columns of K staged at a time, `thread_m`×`thread_n` outputs per thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct F32GemmParams {
    pub kind: F32GemmKind,
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub thread_m: u32,
    pub thread_n: u32,
}

impl F32GemmParams {
    /// 64×64 tiles, 16 of K at a time, 4×4 outputs per thread (256 threads, 8.7 KB of shared
    /// memory): a plain CUDA-core tile that keeps every SM busy on small and odd shapes.
    pub fn new(kind: F32GemmKind) -> Self {
        Self {
            kind,
            block_m: 64,
            block_n: 64,
            block_k: 16,
            thread_m: 4,
            thread_n: 4,
        }
    }

    pub fn block_threads(&self) -> u32 {
        (self.block_m / self.thread_m) * (self.block_n / self.thread_n)
    }

    /// Static shared memory: both staged tiles with 4 floats of row padding.
    pub fn static_smem_bytes(&self) -> u32 {
        4 * self.block_k * (self.block_m + 4 + self.block_n + 4)
    }

    pub fn validate(&self) -> Result<(), KernelError> {
        for (field, value, thread) in [
            ("block_m", self.block_m, self.thread_m),
            ("block_n", self.block_n, self.thread_n),
        ] {
            check_param(
                thread > 0 && value.is_multiple_of(thread),
                TEMPLATE,
                field,
                value,
                "a multiple of the per-thread tile",
            )?;
        }
        check_param(
            (32..=1024).contains(&self.block_threads()) && self.block_threads().is_multiple_of(32),
            TEMPLATE,
            "threads",
            self.block_threads(),
            "whole warps, at most 1024",
        )?;
        check_param(
            self.block_k > 0 && self.static_smem_bytes() <= 48 * 1024,
            TEMPLATE,
            "block_k",
            self.block_k,
            "positive, with the tiles within 48 KiB of static shared memory",
        )
    }

    /// The deterministic kernel name, e.g. `gemm_f32_batched_m64n64k16_t4x4`.
    pub fn name(&self) -> String {
        format!(
            "gemm_f32_{}_m{}n{}k{}_t{}x{}",
            self.kind.tag(),
            self.block_m,
            self.block_n,
            self.block_k,
            self.thread_m,
            self.thread_n
        )
    }

    /// Grid of a batched GEMM: `(ceil(n / block_n), ceil(m / block_m), min(batches, 65535))`.
    pub fn batched_grid(&self, m: u32, n: u32, batches: u32) -> [u32; 3] {
        [
            n.div_ceil(self.block_n),
            m.div_ceil(self.block_m),
            batches.min(MAX_GRID_Z),
        ]
    }

    /// Grid of a grouped GEMM over `rows` token-slots and `experts` experts: enough block rows
    /// for any routing (each expert's last tile may be partial).
    pub fn grouped_grid(&self, rows: u32, experts: u32, n: u32) -> [u32; 3] {
        [
            n.div_ceil(self.block_n),
            rows.div_ceil(self.block_m) + experts,
            1,
        ]
    }

    /// Grid of a grouped weight gradient: `(ceil(k / block_n), ceil(n / block_m), experts)`.
    pub fn weight_grad_grid(&self, experts: u32, n: u32, k: u32) -> [u32; 3] {
        [k.div_ceil(self.block_n), n.div_ceil(self.block_m), experts]
    }

    pub fn kernel_params(&self) -> Vec<KernelParam> {
        let f32_in = |name| KernelParam::new(name, ParamType::ConstPtr(Elem::F32));
        let i32_in = |name| KernelParam::new(name, ParamType::ConstPtr(Elem::I32));
        let int = |name| KernelParam::new(name, ParamType::I32);
        let out = KernelParam::new("out", ParamType::MutPtr(Elem::F32));
        match self.kind {
            F32GemmKind::Batched => {
                let mut params = vec![f32_in("a"), f32_in("b"), out];
                params.extend(["m", "n", "k", "d0", "d1", "d2"].map(int));
                // Per operand: three batch strides, then the row and column strides.
                for name in [
                    "a_s0", "a_s1", "a_s2", "a_row", "a_col", "b_s0", "b_s1", "b_s2", "b_row",
                    "b_col", "out_s0", "out_s1", "out_s2", "out_row", "out_col",
                ] {
                    params.push(KernelParam::new(name, ParamType::I64));
                }
                // Per matrix, the triangle it keeps: 0 all, 1 lower, 2 upper (`Keep`).
                params.extend(["a_keep", "b_keep", "out_keep"].map(int));
                params
            }
            F32GemmKind::Grouped => {
                let mut params = vec![
                    f32_in("x"),
                    f32_in("w"),
                    i32_in("offsets"),
                    i32_in("members"),
                    out,
                ];
                params.extend(["experts", "slots", "x_slots", "n", "k", "w_sn", "w_sk"].map(int));
                params
            }
            F32GemmKind::GroupedWeightGrad => {
                let mut params = vec![
                    f32_in("g"),
                    f32_in("x"),
                    i32_in("offsets"),
                    i32_in("members"),
                    out,
                ];
                params.extend(["slots", "x_slots", "n", "k"].map(int));
                params
            }
        }
    }

    /// Instantiates the template (portable: `sm_80` or newer).
    pub fn instantiate(&self) -> Result<KernelSource, KernelError> {
        self.validate()?;
        let name = self.name();
        let params = self.kernel_params();
        let tile = format!(
            "{}, {}, {}, {}, {}",
            self.block_m, self.block_n, self.block_k, self.thread_m, self.thread_n
        );
        let body = match self.kind {
            F32GemmKind::Batched => vec![
                format!("fathom::batched_gemm_f32<{tile}>(a, b, out, m, n, k, d0, d1, d2,"),
                "    {a_s0, a_s1, a_s2}, a_row, a_col, {b_s0, b_s1, b_s2}, b_row, b_col,"
                    .to_owned(),
                "    {out_s0, out_s1, out_s2}, out_row, out_col, a_keep, b_keep, out_keep);"
                    .to_owned(),
            ],
            F32GemmKind::Grouped => vec![
                format!("fathom::grouped_gemm_f32<{tile}>("),
                "    x, w, offsets, members, out, experts, slots, x_slots, n, k, w_sn, w_sk);"
                    .to_owned(),
            ],
            F32GemmKind::GroupedWeightGrad => vec![
                format!("fathom::grouped_gemm_weight_grad_f32<{tile}>("),
                "    g, x, offsets, members, out, slots, x_slots, n, k);".to_owned(),
            ],
        };
        let description = vec![
            format!(
                "f32 GEMM on CUDA cores ({:?}): each output one fmaf chain over K in order.",
                self.kind
            ),
            format!(
                "Tile {}x{}x{}, {}x{} outputs per thread, {} threads, {} bytes of static shared memory.",
                self.block_m,
                self.block_n,
                self.block_k,
                self.thread_m,
                self.thread_n,
                self.block_threads(),
                self.static_smem_bytes()
            ),
        ];
        Ok(assemble(
            &description,
            &[COMMON, GEMM_F32],
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
    fn names_grids_and_limits() {
        let p = F32GemmParams::new(F32GemmKind::Batched);
        assert_eq!(p.name(), "gemm_f32_batched_m64n64k16_t4x4");
        assert_eq!(p.block_threads(), 256);
        assert_eq!(p.batched_grid(65, 1, 70000), [1, 2, 65535]);
        let grouped = F32GemmParams::new(F32GemmKind::Grouped);
        // 10 token-slots over 4 experts: at most 1 + 4 tiles of rows.
        assert_eq!(grouped.grouped_grid(10, 4, 130), [3, 5, 1]);
        let wgrad = F32GemmParams::new(F32GemmKind::GroupedWeightGrad);
        assert_eq!(wgrad.weight_grad_grid(4, 130, 10), [1, 3, 4]);
        let source = p.instantiate().expect("valid");
        assert!(source.source.contains("long long a_s0"));
        assert_eq!(source.params.len(), 3 + 6 + 15 + 3);
        let bad = F32GemmParams {
            thread_m: 3,
            ..F32GemmParams::new(F32GemmKind::Batched)
        };
        assert!(bad.validate().is_err());
        let huge = F32GemmParams {
            block_k: 128,
            ..F32GemmParams::new(F32GemmKind::Batched)
        };
        assert!(huge.validate().is_err());
    }
}
