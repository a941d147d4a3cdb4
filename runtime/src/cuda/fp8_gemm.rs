//! Launching the Hopper FP8 GEMM template (`fathom_kernels::fp8_gemm`): TMA descriptors from the
//! template's [`TensorMapDesc`]s, the parameters in the template's order, and the host-side
//! operand layout the kernel reads (E4M3 codes, A's 1×128 scales transposed to
//! `[ceil(K/128)][round_up(M, 4)]`, B's 128×128 block scales `[ceil(N/128)][ceil(K/128)]`).
//!
//! The layout and the accuracy metric are plain CPU code, unit-tested here; the launch needs an
//! sm_90 device and is checked by `scripts/gpu-check.sh`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, sys};
use fathom_kernels::{
    BScaling, Fp8GemmParams, GemmGrouping, GemmProblem, TensorMapDesc, TensorMapDtype,
    TensorMapSwizzle,
};

use super::CudaError;
use super::cache::KernelCache;
use super::modules::{Arg, LoadedKernel, launch, load_kernel};
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

    /// Queues one GEMM on `stream`.
    pub fn launch(
        &self,
        stream: &CudaStream,
        problem: &GemmProblem,
        operands: &Fp8GemmOperands,
    ) -> Result<(), CudaError> {
        let maps = self.params.tensor_maps(problem)?;
        let map = |param: &str| -> Result<Arg, CudaError> {
            let desc = maps.iter().find(|d| d.param == param).ok_or_else(|| {
                CudaError::Launch(format!("the template declares no tensor map `{param}`"))
            })?;
            let base = match param {
                "tmap_a" => operands.a,
                "tmap_b" => operands.b,
                "tmap_scale_a" => operands.scale_a,
                _ => operands.scale_b,
            };
            Ok(Arg::TensorMap(encode_tensor_map(desc, base)?))
        };
        let int = |v: u32| Arg::I32(i32::try_from(v).unwrap_or(i32::MAX));
        let mut args = Vec::new();
        for param in self.params.kernel_params() {
            args.push(match param.name {
                "out" => Arg::Ptr(operands.out),
                "scale_b" => Arg::Ptr(operands.scale_b),
                "block_expert" => Arg::Ptr(operands.block_expert.ok_or_else(|| {
                    CudaError::Launch("a grouped GEMM needs `block_expert`".to_owned())
                })?),
                "m" => int(problem.m),
                "n" => int(problem.n),
                "k" => int(problem.k),
                name @ ("tmap_a" | "tmap_b" | "tmap_scale_a" | "tmap_scale_b") => map(name)?,
                other => {
                    return Err(CudaError::Launch(format!(
                        "{}: unknown parameter `{other}`",
                        self.params.name()
                    )));
                }
            });
        }
        let [gx, gy, gz] = self.params.grid(problem);
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

/// A dense forward GEMM's operands on the host, in the kernel's layout, with the exact product
/// of the quantized values as the reference.
#[derive(Clone, Debug)]
pub struct HostFp8Operands {
    pub problem: GemmProblem,
    pub a: Vec<u8>,
    pub b: Vec<u8>,
    pub scale_a: Vec<f32>,
    pub scale_b: Vec<f32>,
    quantized_a: QuantizedTensor,
    quantized_b: QuantizedTensor,
}

impl HostFp8Operands {
    /// Quantizes `a` (`[m][k]`, 1×128 tiles) and `b` (`[n][k]`, 128×128 blocks) as DeepSeek-V3
    /// does and lays the scales out for the kernel.
    pub fn quantize(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Self, CudaError> {
        let bad =
            |e: crate::fp8::Fp8Error| CudaError::Launch(format!("quantizing an operand: {e}"));
        let qa = quantize_activations(a, m, k, 128, ScaleRounding::Exact).map_err(bad)?;
        let qb = quantize_weights(b, n, k, 128, ScaleRounding::Exact).map_err(bad)?;
        let k_blocks = k.div_ceil(128);
        let m_padded = m.next_multiple_of(4);
        // A's scales are `[m][k_blocks]` row-major; the kernel reads them K-block-major so that a
        // TMA box of `block_m` consecutive rows is one contiguous run.
        let mut scale_a = vec![0f32; k_blocks * m_padded];
        for row in 0..m {
            for kb in 0..k_blocks {
                scale_a[kb * m_padded + row] = qa.scales()[row * k_blocks + kb];
            }
        }
        let to_u32 =
            |v: usize| u32::try_from(v).map_err(|_| CudaError::Launch(format!("{v} exceeds u32")));
        Ok(HostFp8Operands {
            problem: GemmProblem {
                m: to_u32(m)?,
                n: to_u32(n)?,
                k: to_u32(k)?,
                groups: 1,
            },
            a: qa.codes().to_vec(),
            b: qb.codes().to_vec(),
            scale_a,
            // 128×128 block scales are already `[ceil(n/128)][ceil(k/128)]` row-major.
            scale_b: qb.scales().to_vec(),
            quantized_a: qa,
            quantized_b: qb,
        })
    }

    /// `A·Bᵀ` of the quantized values, summed in f64 and rounded to f32: what the kernel
    /// computes up to accumulation rounding (compare with `fp8::calc_diff`).
    pub fn reference(&self) -> Vec<f32> {
        let (m, n, k) = (
            self.problem.m as usize,
            self.problem.n as usize,
            self.problem.k as usize,
        );
        let a = self.quantized_a.dequantize_f64();
        let b = self.quantized_b.dequantize_f64();
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            let row = &a[i * k..(i + 1) * k];
            for j in 0..n {
                let col = &b[j * k..(j + 1) * k];
                out[i * n + j] = row.iter().zip(col).map(|(x, y)| x * y).sum::<f64>() as f32;
            }
        }
        out
    }

    /// The parameters of the dense forward GEMM for this problem.
    pub fn params(&self) -> Fp8GemmParams {
        Fp8GemmParams::for_shape(
            self.problem.m,
            self.problem.n,
            BScaling::Block128x128,
            fathom_kernels::GemmOutput::F32,
            GemmGrouping::Dense,
        )
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
            .map(|p| ops.quantized_a.value(0, p) * ops.quantized_b.value(1, p))
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
}
