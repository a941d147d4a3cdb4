//! The FP8 GEMM template on the GPU (`gpu-check`'s third and fourth parts): every tile
//! configuration the timings try, under each tile schedule, against the exact product of its
//! quantized operands (`check`: the three layouts, 128×128 weight scales, 1×128 scales on B with
//! accumulation, grouped experts); then the timings at DeepSeek-V3's shapes, every configuration
//! side by side, beside `torch._scaled_mm` (`bench`).

mod bench;
mod check;
mod quantize;

use fathom_runtime::cuda::fp8_gemm::{Fp8GemmOperands, HostFp8Operands};
use fathom_runtime::cuda::memory::{DriverMemory, stream_id, upload};
use fathom_runtime::cuda::{CachingAllocator, CudaStream};

pub use bench::bench;
pub use check::check_correctness;
pub use quantize::check_quantize;

/// A deterministic pseudo-random value in [-1, 1) (xorshift; no dependency for a check).
fn noise(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Host operands in the kernel's layout (see `HostFp8Operands`).
struct HostOperands<'a> {
    a: &'a [u8],
    b: &'a [u8],
    scale_a: &'a [f32],
    scale_b: &'a [f32],
    block_expert: &'a [i32],
}

impl<'a> From<&'a HostFp8Operands> for HostOperands<'a> {
    fn from(ops: &'a HostFp8Operands) -> Self {
        HostOperands {
            a: &ops.a,
            b: &ops.b,
            scale_a: &ops.scale_a,
            scale_b: &ops.scale_b,
            block_expert: &ops.block_expert,
        }
    }
}

/// Device copies of one problem's operands (freed by [`Operands::free`]).
struct Operands {
    blocks: Vec<fathom_runtime::cuda::alloc::Block>,
    addresses: Fp8GemmOperands,
}

impl Operands {
    fn upload(
        allocator: &mut CachingAllocator<DriverMemory>,
        stream: &CudaStream,
        host: HostOperands<'_>,
        out_bytes: usize,
    ) -> anyhow::Result<Self> {
        let mut blocks = Vec::new();
        let mut put = |bytes: &[u8]| -> anyhow::Result<u64> {
            let block = allocator.alloc(bytes.len().max(1), stream_id(stream))?;
            let ptr = block.ptr;
            blocks.push(block);
            upload(stream, ptr, bytes)?;
            Ok(ptr)
        };
        let a = put(host.a)?;
        let b = put(host.b)?;
        let scale_a = put(&le_bytes(host.scale_a, f32::to_le_bytes))?;
        let scale_b = put(&le_bytes(host.scale_b, f32::to_le_bytes))?;
        let out = put(&vec![0u8; out_bytes])?;
        let block_expert = if host.block_expert.is_empty() {
            None
        } else {
            Some(put(&le_bytes(host.block_expert, i32::to_le_bytes))?)
        };
        Ok(Operands {
            blocks,
            addresses: Fp8GemmOperands {
                a,
                b,
                scale_a,
                scale_b,
                out,
                block_expert,
            },
        })
    }

    fn free(self, allocator: &mut CachingAllocator<DriverMemory>) -> anyhow::Result<()> {
        for block in self.blocks {
            allocator.free(block)?;
        }
        Ok(())
    }
}

fn le_bytes<T: Copy, const W: usize>(values: &[T], to_bytes: fn(T) -> [u8; W]) -> Vec<u8> {
    values.iter().flat_map(|&v| to_bytes(v)).collect()
}
