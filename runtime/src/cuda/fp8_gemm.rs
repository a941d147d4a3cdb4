//! Launching the Hopper FP8 GEMM template (`fathom_kernels::fp8_gemm`): TMA descriptors from the
//! template's [`TensorMapDesc`]s, the parameters in the template's order, and the host-side
//! operand layout the kernel reads (E4M3 codes, A's 1×128 scales transposed to
//! `[ceil(K/128)][round_up(M, 4)]`, B's 128×128 block scales `[ceil(N/128)][ceil(K/128)]`).
//!
//! The layout and the accuracy metric are plain CPU code, unit-tested here; the launch needs an
//! sm_90 device and is checked by `scripts/gpu-check.sh`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, sys};
use fathom_kernels::{
    BScaling, FallbackGemmParams, Fp8GemmParams, GemmGrouping, GemmProblem, TensorMapDesc,
    TensorMapDtype, TensorMapSwizzle, TileSchedule,
};

use super::CudaError;
use super::cache::KernelCache;
use super::modules::{Arg, LoadedKernel, args_by_name, launch, load_kernel};
use super::quantize_samples::k_block_major_scales;
use crate::fp8::{QuantizedTensor, ScaleRounding, quantize_activations, quantize_weights};

/// Encodes one TMA descriptor for the tensor at device address `base`.
pub fn encode_tensor_map(desc: &TensorMapDesc, base: u64) -> Result<sys::CUtensorMap, CudaError> {
    let dtype = match desc.dtype {
        TensorMapDtype::U8 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        TensorMapDtype::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    };
    let swizzle = match desc.swizzle {
        TensorMapSwizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
        TensorMapSwizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    };
    let strides = [desc.outer_stride_bytes];
    let element_strides = [1u32, 1];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the length the rank (2) requires (strides: rank - 1); `base` is a
    // device allocation the caller sized for `global_dims` with `outer_stride_bytes` rows; the
    // descriptor is written into `map`, which outlives the call.
    let code = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            2,
            base as *mut c_void,
            desc.global_dims.as_ptr(),
            strides.as_ptr(),
            desc.box_dims.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    code.result().map_err(|e| {
        CudaError::driver(
            format!(
                "encoding the tensor map {} for {} (dims {:?}, stride {} B, box {:?})",
                desc.param, desc.what, desc.global_dims, desc.outer_stride_bytes, desc.box_dims
            ),
            e,
        )
    })?;
    Ok(map)
}

/// Device addresses of one GEMM's operands.
#[derive(Clone, Copy, Debug)]
pub struct Fp8GemmOperands {
    /// E4M3 `[M][K]`.
    pub a: u64,
    /// E4M3 `[groups·N][K]`.
    pub b: u64,
    /// f32 `[ceil(K/128)][round_up(M, 4)]`.
    pub scale_a: u64,
    /// f32: `[ceil(N/128)][ceil(K/128)]` (128×128 blocks) or `[ceil(K/128)][round_up(N, 4)]`.
    pub scale_b: u64,
    /// `[M][N]` BF16 or f32, per the parameters' output.
    pub out: u64,
    /// i32 `[M/128]`, the expert of each row block (grouped GEMMs only).
    pub block_expert: Option<u64>,
    /// i32 `[M]`, the row of `out` each product row goes to (`GemmOutput::F32Scattered` only).
    pub out_rows: Option<u64>,
    /// i32 `[groups + 1]`, where each group's segment of K starts (K-grouped GEMMs only).
    pub k_offsets: Option<u64>,
}

/// An FP8 GEMM instantiation loaded on a device.
#[derive(Debug)]
pub struct Fp8Gemm {
    pub params: Fp8GemmParams,
    pub kernel: LoadedKernel,
}

impl Fp8Gemm {
    /// Instantiates the template and loads it (compiled for `sm_90a` through the cache).
    pub fn load(
        ctx: &Arc<CudaContext>,
        cache: &KernelCache,
        params: Fp8GemmParams,
    ) -> Result<Self, CudaError> {
        let source = params.instantiate()?;
        let kernel = load_kernel(ctx, cache, &source, source.arch_requirement.compile_arch())?;
        Ok(Fp8Gemm { params, kernel })
    }

    /// A persistent schedule in bands of `raster_band` row blocks: one block per SM of
    /// `multiprocessors`, or for clusters as many whole clusters as the device can hold at once
    /// (a GPC whose SM count is odd leaves an SM out of clusters of two), so that no cluster waits
    /// for a second wave.
    pub fn persistent_schedule(
        &self,
        stream: &CudaStream,
        multiprocessors: u32,
        raster_band: u32,
    ) -> Result<TileSchedule, CudaError> {
        let cluster = self.params.cluster_m.max(1);
        let mut blocks = multiprocessors;
        if cluster > 1 {
            let config = LaunchConfig {
                grid_dim: (multiprocessors / cluster * cluster, 1, 1),
                block_dim: (self.params.block_threads(), 1, 1),
                shared_mem_bytes: self.params.dynamic_smem_bytes(),
            };
            let clusters = self
                .kernel
                .function
                .occupancy_max_active_clusters(config, stream)
                .map_err(|e| {
                    CudaError::driver(
                        format!(
                            "{}: asking how many clusters fit at once",
                            self.params.name()
                        ),
                        e,
                    )
                })?;
            blocks = blocks.min(clusters.max(1) * cluster);
        }
        Ok(TileSchedule::persistent(blocks, raster_band))
    }

    /// Queues one GEMM on `stream`, its tiles spread over thread blocks as `schedule` says.
    pub fn launch(
        &self,
        stream: &CudaStream,
        problem: &GemmProblem,
        operands: &Fp8GemmOperands,
        schedule: &TileSchedule,
    ) -> Result<(), CudaError> {
        check_grouping(self.params.grouping, operands)?;
        let int = |v: u32| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
        let mut named = vec![
            ("out", Arg::Ptr(operands.out)),
            ("scale_b", Arg::Ptr(operands.scale_b)),
            ("m", int(problem.m)),
            ("n", int(problem.n)),
            ("k", int(problem.k)),
            ("groups", int(problem.groups)),
            ("raster_band", int(schedule.raster_band)),
        ];
        if let Some(block_expert) = operands.block_expert {
            named.push(("block_expert", Arg::Ptr(block_expert)));
        }
        if let Some(k_offsets) = operands.k_offsets {
            named.push(("k_offsets", Arg::Ptr(k_offsets)));
        }
        if let Some(out_rows) = operands.out_rows {
            named.push(("out_rows", Arg::Ptr(out_rows)));
        }
        // Every tensor map the template declares, over its operand.
        for desc in self.params.tensor_maps(problem)? {
            let base = match desc.param {
                "tmap_a" => operands.a,
                "tmap_b" => operands.b,
                "tmap_scale_a" => operands.scale_a,
                _ => operands.scale_b,
            };
            named.push((desc.param, Arg::TensorMap(encode_tensor_map(&desc, base)?)));
        }
        let mut args = args_by_name(&self.params.name(), &self.params.kernel_params(), &named)?;
        let [gx, gy, gz] = self.params.grid(problem, schedule);
        launch(
            stream,
            &self.kernel.function,
            (gx, gy, gz),
            (self.params.block_threads(), 1, 1),
            self.params.dynamic_smem_bytes(),
            &mut args,
        )
        .map_err(|e| e.in_kernel(&self.params.name()))
    }
}

/// The portable FP8 GEMM (`fathom_kernels::FallbackGemmParams`: `mma.sync` on bf16-widened
/// codes) for GPUs without sm_90a, loaded. It takes the operands of [`Fp8Gemm`] as plain
/// pointers.
#[derive(Debug)]
pub struct Fp8GemmFallback {
    pub params: FallbackGemmParams,
    pub kernel: LoadedKernel,
}

impl Fp8GemmFallback {
    /// Instantiates the template and loads it, compiled for `arch` (the device's: a CUBIN runs
    /// only on its own major architecture).
    pub fn load(
        ctx: &Arc<CudaContext>,
        cache: &KernelCache,
        params: FallbackGemmParams,
        arch: &str,
    ) -> Result<Self, CudaError> {
        let source = params.instantiate()?;
        let kernel = load_kernel(ctx, cache, &source, arch)?;
        Ok(Fp8GemmFallback { params, kernel })
    }

    /// Queues one GEMM on `stream`.
    pub fn launch(
        &self,
        stream: &CudaStream,
        problem: &GemmProblem,
        operands: &Fp8GemmOperands,
    ) -> Result<(), CudaError> {
        check_grouping(self.params.grouping, operands)?;
        let int = |v: u32| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
        let named = [
            ("a", Arg::Ptr(operands.a)),
            ("b", Arg::Ptr(operands.b)),
            ("scale_a", Arg::Ptr(operands.scale_a)),
            ("scale_b", Arg::Ptr(operands.scale_b)),
            // Each read only by its grouping, or by the scattered output.
            ("block_expert", Arg::Ptr(operands.block_expert.unwrap_or(0))),
            ("k_offsets", Arg::Ptr(operands.k_offsets.unwrap_or(0))),
            ("out", Arg::Ptr(operands.out)),
            ("out_rows", Arg::Ptr(operands.out_rows.unwrap_or(0))),
            ("m", int(problem.m)),
            ("n", int(problem.n)),
            ("k", int(problem.k)),
            ("groups", int(problem.groups)),
        ];
        let mut args = args_by_name(&self.params.name(), &self.params.kernel_params(), &named)?;
        let [gx, gy, gz] = self.params.grid_for(problem);
        launch(
            stream,
            &self.kernel.function,
            (gx, gy, gz),
            (self.params.block_threads(), 1, 1),
            0,
            &mut args,
        )
        .map_err(|e| e.in_kernel(&self.params.name()))
    }
}

/// Refuses a grouped GEMM's launch without the array its grouping reads.
fn check_grouping(grouping: GemmGrouping, operands: &Fp8GemmOperands) -> Result<(), CudaError> {
    let missing = match grouping {
        GemmGrouping::Contiguous if operands.block_expert.is_none() => {
            "a grouped GEMM needs `block_expert`"
        }
        GemmGrouping::KGrouped if operands.k_offsets.is_none() => {
            "a K-grouped GEMM needs `k_offsets`"
        }
        _ => return Ok(()),
    };
    Err(CudaError::Launch(missing.to_owned()))
}

/// One GEMM's operands on the host, in the kernel's layout, with the exact product of the
/// quantized values as the reference: dense with 128×128 weight scales (the forward and
/// input-gradient GEMMs), dense with 1×128 scales on B (the weight gradient), or grouped over
/// experts.
#[derive(Clone, Debug)]
pub struct HostFp8Operands {
    pub problem: GemmProblem,
    pub b_scaling: BScaling,
    pub a: Vec<u8>,
    pub b: Vec<u8>,
    pub scale_a: Vec<f32>,
    pub scale_b: Vec<f32>,
    /// The expert of each 128-row block of A (-1: padding); empty for a dense GEMM.
    pub block_expert: Vec<i32>,
    /// Where each group's segment of K starts, and the end (K-grouped GEMMs); empty otherwise.
    pub k_offsets: Vec<i32>,
    quantized_a: QuantizedTensor,
    /// B's quantized rows, one tensor per expert (one for a dense GEMM).
    quantized_b: Vec<QuantizedTensor>,
}

fn quantizing(e: crate::fp8::Fp8Error) -> CudaError {
    CudaError::Launch(format!("quantizing an operand: {e}"))
}

fn to_u32(v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::Launch(format!("{v} exceeds u32")))
}

impl HostFp8Operands {
    /// Quantizes `a` (`[m][k]`, 1×128 tiles) and `b` (`[n][k]`, 128×128 blocks) as DeepSeek-V3
    /// does and lays the scales out for the kernel.
    pub fn quantize(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Self, CudaError> {
        Self::grouped(a, &[b], m, n, k, Vec::new())
    }

    /// As [`quantize`](Self::quantize) with B quantized in 1×128 tiles too (the weight-gradient
    /// GEMM, whose B is an activation), its scales `[ceil(K/128)][round_up(N, 4)]`.
    pub fn quantize_row_scaled_b(
        a: &[f32],
        b: &[f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<Self, CudaError> {
        let qb = quantize_activations(b, n, k, 128, ScaleRounding::Exact).map_err(quantizing)?;
        Self::assemble(a, vec![qb], BScaling::Row1x128, (m, n, k), Vec::new())
    }

    /// The K-grouped GEMM (the experts' weight gradient): `a` `[m][k]` and `b` `[n][k]` both
    /// quantized in 1×128 tiles, a product per group over its segment of K, `k_offsets` (each a
    /// multiple of 128, the last `k`).
    pub fn k_grouped(
        a: &[f32],
        b: &[f32],
        (m, n, k): (usize, usize, usize),
        k_offsets: Vec<i32>,
    ) -> Result<Self, CudaError> {
        let ascending = k_offsets.windows(2).all(|w| w[0] <= w[1]);
        if k_offsets.len() < 2
            || !ascending
            || k_offsets.first() != Some(&0)
            || k_offsets.last().map(|&end| end as usize) != Some(k)
            || k_offsets.iter().any(|&o| o % 128 != 0)
        {
            return Err(CudaError::Launch(format!(
                "a K-grouped GEMM over K = {k} needs ascending offsets from 0 to {k} in \
                 multiples of 128, got {k_offsets:?}"
            )));
        }
        let mut ops = Self::quantize_row_scaled_b(a, b, m, n, k)?;
        ops.problem.groups = to_u32(k_offsets.len() - 1)?;
        ops.k_offsets = k_offsets;
        Ok(ops)
    }

    /// The experts' grouped GEMM: `a`'s `m` rows (a multiple of 128) sorted by expert, every
    /// 128-row block belonging to expert `block_expert[block]` (-1: padding, left unwritten);
    /// `experts[e]` is expert e's `[n][k]` weight, quantized in 128×128 blocks and stacked.
    /// An empty `block_expert` with one expert is the dense GEMM.
    pub fn grouped(
        a: &[f32],
        experts: &[&[f32]],
        m: usize,
        n: usize,
        k: usize,
        block_expert: Vec<i32>,
    ) -> Result<Self, CudaError> {
        let quantized_b = experts
            .iter()
            .map(|b| quantize_weights(b, n, k, 128, ScaleRounding::Exact).map_err(quantizing))
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(
            a,
            quantized_b,
            BScaling::Block128x128,
            (m, n, k),
            block_expert,
        )
    }

    /// Quantizes A and lays every operand out for the kernel, B already quantized (one tensor
    /// per expert) with `b_scaling`'s tiles.
    fn assemble(
        a: &[f32],
        quantized_b: Vec<QuantizedTensor>,
        b_scaling: BScaling,
        (m, n, k): (usize, usize, usize),
        block_expert: Vec<i32>,
    ) -> Result<Self, CudaError> {
        let experts = quantized_b.len();
        if !block_expert.is_empty()
            && (m != block_expert.len() * 128
                || block_expert
                    .iter()
                    .any(|&e| usize::try_from(e).is_ok_and(|e| e >= experts)))
        {
            return Err(CudaError::Launch(format!(
                "a grouped GEMM of {m} rows and {experts} experts needs one expert (or -1) per \
                 128 rows, got {block_expert:?}"
            )));
        }
        let qa = quantize_activations(a, m, k, 128, ScaleRounding::Exact).map_err(quantizing)?;
        let scale_b = match b_scaling {
            // 128×128 block scales are `[ceil(n/128)][ceil(k/128)]` row-major, expert by expert.
            BScaling::Block128x128 => quantized_b
                .iter()
                .flat_map(|q| q.scales().to_vec())
                .collect(),
            BScaling::Row1x128 => quantized_b
                .iter()
                .flat_map(|q| k_block_major_scales(q, n, k))
                .collect(),
        };
        Ok(HostFp8Operands {
            problem: GemmProblem {
                m: to_u32(m)?,
                n: to_u32(n)?,
                k: to_u32(k)?,
                groups: to_u32(experts)?,
            },
            b_scaling,
            a: qa.codes().to_vec(),
            b: quantized_b
                .iter()
                .flat_map(|q| q.codes().to_vec())
                .collect(),
            scale_a: k_block_major_scales(&qa, m, k),
            scale_b,
            block_expert,
            k_offsets: Vec::new(),
            quantized_a: qa,
            quantized_b,
        })
    }

    /// `A·Bᵀ` of the quantized values (each row against its expert's B; K-grouped, a product
    /// per group of K, one after the other), summed in f64 and rounded to f32: what the kernel
    /// computes up to accumulation rounding (compare with `fp8::calc_diff`). Padding rows are
    /// 0, as the zeroed output the kernel leaves them in.
    pub fn reference(&self) -> Vec<f32> {
        let (m, n, k) = (
            self.problem.m as usize,
            self.problem.n as usize,
            self.problem.k as usize,
        );
        let a = self.quantized_a.dequantize_f64();
        let b: Vec<Vec<f64>> = self
            .quantized_b
            .iter()
            .map(|q| q.dequantize_f64())
            .collect();
        if !self.k_offsets.is_empty() {
            let mut out = Vec::with_capacity(self.output_rows() * n);
            for segment in self.k_offsets.windows(2) {
                let (start, end) = (segment[0] as usize, segment[1] as usize);
                for i in 0..m {
                    for j in 0..n {
                        let row = &a[i * k + start..i * k + end];
                        let col = &b[0][j * k + start..j * k + end];
                        out.push(row.iter().zip(col).map(|(x, y)| x * y).sum::<f64>() as f32);
                    }
                }
            }
            return out;
        }
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            let expert = match self.block_expert.get(i / 128) {
                None => 0,
                Some(&e) => match usize::try_from(e) {
                    Ok(e) => e,
                    Err(_) => continue,
                },
            };
            let row = &a[i * k..(i + 1) * k];
            for j in 0..n {
                let col = &b[expert][j * k..(j + 1) * k];
                out[i * n + j] = row.iter().zip(col).map(|(x, y)| x * y).sum::<f64>() as f32;
            }
        }
        out
    }

    /// The GEMM's parameters for this problem with f32 output (the shape heuristic's tiles).
    pub fn params(&self) -> Fp8GemmParams {
        Fp8GemmParams::for_shape(
            self.problem.m,
            self.problem.n,
            self.b_scaling,
            fathom_kernels::GemmOutput::F32,
            self.grouping(),
        )
    }

    pub fn grouping(&self) -> GemmGrouping {
        if !self.k_offsets.is_empty() {
            GemmGrouping::KGrouped
        } else if self.block_expert.is_empty() {
            GemmGrouping::Dense
        } else {
            GemmGrouping::Contiguous
        }
    }

    /// Rows of the output: M, or M per group when K-grouped.
    pub fn output_rows(&self) -> usize {
        let m = self.problem.m as usize;
        match self.grouping() {
            GemmGrouping::KGrouped => m * self.problem.groups as usize,
            _ => m,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn host_operands_use_the_kernel_layout_and_the_reference_is_the_quantized_product() {
        let (m, n, k) = (6, 8, 256);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 23) as f32 - 11.0).collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5) % 19) as f32 * 0.25 - 2.0)
            .collect();
        let ops = HostFp8Operands::quantize(&a, &b, m, n, k).unwrap();
        assert_eq!(ops.a.len(), m * k);
        assert_eq!(ops.b.len(), n * k);
        // Two K blocks; rows padded to 8.
        assert_eq!(ops.scale_a.len(), 2 * 8);
        assert_eq!(ops.scale_b.len(), 2);
        assert_eq!(ops.scale_a[8 + 5], ops.quantized_a.scale_at(5, 128));
        assert_eq!(ops.scale_a[6], 0.0, "padding");
        // Every value here is exact in E4M3 times its scale, so the reference is the product.
        let reference = ops.reference();
        // Element (0, 1) is the dot product of row 0 of A and row 1 of B, as quantized.
        let exact: f64 = (0..k)
            .map(|p| ops.quantized_a.value(0, p) * ops.quantized_b[0].value(1, p))
            .sum();
        assert_eq!(reference[1], exact as f32);
        // And near the unquantized product: E4M3 keeps 3 mantissa bits, so each factor is within
        // 1/16 (relative) and each product within 0.13.
        let products = (0..k).map(|p| f64::from(a[p]) * f64::from(b[k + p]));
        let unquantized: f64 = products.clone().sum();
        let magnitude: f64 = products.map(f64::abs).sum();
        assert!((exact - unquantized).abs() <= 0.13 * magnitude);
        assert_eq!(ops.params().check_problem(&ops.problem), Ok(()));
        assert!(ops.params().validate().is_ok());
    }

    #[test]
    fn row_scaled_b_has_a_scale_per_row_and_k_block_laid_out_like_a() {
        let (m, n, k) = (4, 6, 256);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        // Row j of B has magnitude j + 1: 128x128 blocks would share one scale, 1x128 tiles not.
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i % 5) as f32 - 2.0) * (1 + i / k) as f32)
            .collect();
        let ops = HostFp8Operands::quantize_row_scaled_b(&a, &b, m, n, k).unwrap();
        assert_eq!(ops.b_scaling, BScaling::Row1x128);
        assert_eq!(ops.scale_b.len(), 2 * 8, "[k blocks][n rounded up to 4]");
        assert_eq!(ops.scale_b[8 + 5], ops.quantized_b[0].scale_at(5, 128));
        assert_eq!(
            ops.scale_b[5] / ops.scale_b[0],
            6.0,
            "row 5 is 6 times row 0"
        );
        assert_eq!(ops.scale_b[6], 0.0, "padding");
        let reference = ops.reference();
        let dot: f64 = (0..k)
            .map(|p| ops.quantized_a.value(3, p) * ops.quantized_b[0].value(4, p))
            .sum();
        assert_eq!(reference[3 * n + 4], dot as f32);
        // Finer scales lose less than one 128x128 block's: summed over the output, the error
        // against the unquantized product is smaller.
        let unquantized = |i: usize, j: usize| -> f64 {
            (0..k)
                .map(|p| f64::from(a[i * k + p]) * f64::from(b[j * k + p]))
                .sum()
        };
        let error = |r: &[f32]| -> f64 {
            (0..m * n)
                .map(|e| (f64::from(r[e]) - unquantized(e / n, e % n)).abs())
                .sum()
        };
        let blockwise = HostFp8Operands::quantize(&a, &b, m, n, k).unwrap();
        assert!(error(&reference) < error(&blockwise.reference()));
        assert_eq!(ops.params().b_scaling, BScaling::Row1x128);
    }

    #[test]
    fn grouped_reference_uses_each_blocks_expert_and_leaves_padding_zero() {
        let (n, k) = (8, 128);
        let m = 3 * 128;
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 3) % 11) as f32 - 5.0).collect();
        let experts: Vec<Vec<f32>> = (0..2)
            .map(|e| {
                (0..n * k)
                    .map(|i| ((i + e) % 4) as f32 * (e + 1) as f32)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
        let ops = HostFp8Operands::grouped(&a, &refs, m, n, k, vec![1, -1, 0]).unwrap();
        assert_eq!(ops.grouping(), GemmGrouping::Contiguous);
        assert_eq!(ops.problem.groups, 2);
        assert_eq!(ops.b.len(), 2 * n * k);
        assert_eq!(ops.scale_b.len(), 2, "one block per expert");
        let reference = ops.reference();
        let dot = |row: usize, e: usize, col: usize| -> f32 {
            (0..k)
                .map(|p| ops.quantized_a.value(row, p) * ops.quantized_b[e].value(col, p))
                .sum::<f64>() as f32
        };
        assert_eq!(reference[3 * n + 2], dot(3, 1, 2), "block 0 is expert 1");
        assert!(
            reference[128 * n..256 * n].iter().all(|&v| v == 0.0),
            "padding"
        );
        assert_eq!(
            reference[300 * n + 7],
            dot(300, 0, 7),
            "block 2 is expert 0"
        );
        assert!(ops.params().check_problem(&ops.problem).is_ok());
        let err = HostFp8Operands::grouped(&a, &refs, m, n, k, vec![0, 2, 0]).unwrap_err();
        assert!(
            err.to_string().contains("one expert (or -1) per 128 rows"),
            "{err}"
        );
    }

    /// The K-grouped operands (the experts' weight gradient): both quantized in 1×128 tiles
    /// over all of K, a product per group over its own segment, an empty group's zero, and
    /// offsets that are not ascending multiples of 128 ending at K refused.
    #[test]
    fn k_grouped_operands_give_a_product_per_group_of_k() {
        let (m, n, k) = (5, 8, 384);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 23) as f32 - 11.0).collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5) % 19) as f32 * 0.25 - 2.0)
            .collect();
        let ops = HostFp8Operands::k_grouped(&a, &b, (m, n, k), vec![0, 256, 256, 384]).unwrap();
        assert_eq!(ops.grouping(), GemmGrouping::KGrouped);
        assert_eq!(ops.problem.groups, 3);
        assert_eq!(ops.output_rows(), 3 * m);
        assert_eq!(ops.b.len(), n * k, "one B over every group");
        let reference = ops.reference();
        assert_eq!(reference.len(), 3 * m * n);
        let dot = |row: usize, col: usize, range: std::ops::Range<usize>| -> f32 {
            range
                .map(|p| ops.quantized_a.value(row, p) * ops.quantized_b[0].value(col, p))
                .sum::<f64>() as f32
        };
        assert_eq!(reference[2 * n + 3], dot(2, 3, 0..256), "group 0");
        assert!(
            reference[m * n..2 * m * n].iter().all(|&v| v == 0.0),
            "the empty group"
        );
        assert_eq!(
            reference[2 * m * n + 4 * n + 7],
            dot(4, 7, 256..384),
            "group 2"
        );
        assert!(ops.params().check_problem(&ops.problem).is_ok());
        for bad in [
            vec![0, 200, 384],
            vec![0, 256, 128, 384],
            vec![0, 256],
            vec![128, 384],
        ] {
            let err = HostFp8Operands::k_grouped(&a, &b, (m, n, k), bad.clone()).unwrap_err();
            assert!(
                err.to_string().contains("multiples of 128"),
                "{bad:?}: {err}"
            );
        }
    }
}
