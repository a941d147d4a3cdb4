//! The FP8 GEMM template on the GPU (`gpu-check`'s third and fourth parts): every tile
//! configuration the timings try, under each tile schedule, against the exact product of its
//! quantized operands (`check`: the three layouts, 128×128 weight scales, 1×128 scales on B with
//! accumulation, grouped experts); then the timings at DeepSeek-V3's shapes, every configuration
//! side by side, beside `torch._scaled_mm` (`bench`).

mod bench;
mod check;
mod quantize;
mod saved_bench;

use fathom_runtime::cuda::fp8_gemm::{Fp8GemmOperands, HostFp8Operands};
use fathom_runtime::cuda::gemm_tuning::TimingOperands;

use super::launch::Buffers;
use super::launch::noise;

pub use bench::bench;
pub use check::check_correctness;
pub use quantize::check_quantize;
pub use saved_bench::bench as bench_saved_operands;

/// Host operands in the kernel's layout (see `HostFp8Operands`).
struct HostOperands<'a> {
    a: &'a [u8],
    b: &'a [u8],
    scale_a: &'a [f32],
    scale_b: &'a [f32],
    block_expert: &'a [i32],
    k_offsets: &'a [i32],
    out_rows: &'a [i32],
}

impl<'a> From<&'a HostFp8Operands> for HostOperands<'a> {
    fn from(ops: &'a HostFp8Operands) -> Self {
        HostOperands {
            a: &ops.a,
            b: &ops.b,
            scale_a: &ops.scale_a,
            scale_b: &ops.scale_b,
            block_expert: &ops.block_expert,
            k_offsets: &ops.k_offsets,
            out_rows: &[],
        }
    }
}

impl<'a> From<&'a TimingOperands> for HostOperands<'a> {
    fn from(ops: &'a TimingOperands) -> Self {
        HostOperands {
            a: &ops.a,
            b: &ops.b,
            scale_a: &ops.scale_a,
            scale_b: &ops.scale_b,
            block_expert: &ops.block_expert,
            k_offsets: &ops.k_offsets,
            out_rows: &ops.out_rows,
        }
    }
}

/// Device copies of one problem's operands in `buffers` (freed with them), with a zeroed
/// output of `out_bytes`.
fn upload_operands(
    buffers: &mut Buffers<'_>,
    host: HostOperands<'_>,
    out_bytes: usize,
) -> anyhow::Result<Fp8GemmOperands> {
    let mut optional = |values: &[i32]| -> anyhow::Result<Option<u64>> {
        Ok(if values.is_empty() {
            None
        } else {
            Some(buffers.put(values)?)
        })
    };
    let block_expert = optional(host.block_expert)?;
    let k_offsets = optional(host.k_offsets)?;
    let out_rows = optional(host.out_rows)?;
    Ok(Fp8GemmOperands {
        a: buffers.put(host.a)?,
        b: buffers.put(host.b)?,
        scale_a: buffers.put(host.scale_a)?,
        scale_b: buffers.put(host.scale_b)?,
        out: buffers.put(&vec![0u8; out_bytes])?,
        block_expert,
        k_offsets,
        out_rows,
    })
}
