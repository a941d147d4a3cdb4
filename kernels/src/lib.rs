//! Hand-written CUDA C++ templates for Fathom's code generator, embedded as text, each with a Rust
//! description of its template parameters that instantiates it into a complete `.cu` source
//! ([`KernelSource`]) with one `extern "C" __global__` entry point and a deterministic name.
//!
//! | family | parameters | architecture |
//! |---|---|---|
//! | `fp8_gemm`, `grouped_fp8_gemm`, `kgrouped_fp8_gemm` | [`Fp8GemmParams`], launched per [`TileSchedule`] | `sm_90a`: TMA + mbarrier pipeline, FP8 `wgmma`, warp-specialised, persistent, optionally in clusters sharing B by multicast |
//! | `fp8_gemm_fallback` (+ grouped, K-grouped) | [`FallbackGemmParams`] | `sm_80`+: `mma.sync` on BF16-widened FP8 |
//! | `quantize` | [`QuantizeParams`] | `sm_80`+ |
//! | `mla_attention_fwd` / `_bwd` | [`MlaAttentionFwdParams`], [`MlaAttentionBwdParams`] | `sm_80`+: `mma.sync` BF16, FP32 online softmax |
//! | `gemm_f32` (batched strided, grouped, grouped weight-grad) | [`F32GemmParams`] | `sm_80`+: CUDA cores, for f32 programs |
//! | `index_*` (gather, take-along, index-add, one-hot, top-k, group-rows) | [`IndexOpParams`] | `sm_80`+ |
//! | `convert_rows_*`, `fill_zero_f32`, `accumulate_scaled_f32` | [`ConvertParams`], [`AccumulateScaled`] | `sm_80`+: conversions around the attention templates, micro-batch gradient sums |
//! | `product_agreement` | [`AgreementParams`] | `sm_80`+: two results' distance, summed on the device |
//! | `fake_quantize_e4m3`, `fake_quantize_gathered_128x1_e4m3` | [`FakeQuantizeParams`], [`FakeQuantizeGatheredParams`] | `sm_80`+ |
//!
//! FP8 follows DeepSeek-V3 (SPEC §2): E4M3 operands, activations scaled per 1×128 tile, weights
//! per 128×128 block, `scale = max(amax, 1e-4) / 448`, and tensor-core partial sums promoted to
//! FP32 every 128 of K with the scales applied. How the three training GEMMs map onto the one NT
//! kernel is in [`fp8_gemm`].
//!
//! The templates live in `kernels/cuda/*.cuh`; the Rust side adds only what depends on the
//! parameters (template arguments, the entry point's signature, and the `wgmma` wrapper whose
//! register list depends on the tile width), written with [`SourceWriter`]. [`nvrtc`] compiles a
//! source to a CUBIN without a GPU; `tests/nvrtc.rs` compiles every instantiation in CI and checks
//! the FP8 GEMMs' machine code for Hopper's FP8 tensor-core instruction (`QGMMA`);
//! `tests/host_tiles.rs` compiles the FP8 GEMM's index arithmetic (`cuda/tiles.cuh`) for the host
//! and checks it exhaustively, and `tests/pipeline_model.rs` explores its barrier protocol.
//!
//! Nothing here launches a kernel: the runtime owns devices, tensor-map encoding
//! ([`TensorMapDesc`] says what each map must be) and the compiled-kernel cache.

pub mod agreement;
pub mod attention;
pub mod convert;
pub mod fake_quantize;
pub mod fallback_gemm;
pub mod fp8_gemm;
pub mod gemm_f32;
pub mod index_ops;
pub mod kernel;
pub mod nvrtc;
pub mod optimizer;
pub mod quantize;
pub mod tensor_map;
mod wgmma;
pub mod writer;

pub use agreement::{Agreement, AgreementParams};
pub use attention::{MlaAttentionBwdParams, MlaAttentionFwdParams, MlaHeadDims};
pub use convert::{AccumulateScaled, ConvertKind, ConvertParams};
pub use fake_quantize::{FakeQuantizeGatheredParams, FakeQuantizeParams};
pub use fallback_gemm::FallbackGemmParams;
pub use fp8_gemm::{
    BLOCK_N_CHOICES, BScaling, Fp8GemmParams, GemmGrouping, GemmOutput, GemmProblem, TileSchedule,
    TrainingGemm,
};
pub use gemm_f32::{F32GemmKind, F32GemmParams};
pub use index_ops::{IndexOp, IndexOpParams};
pub use kernel::{ArchRequirement, Elem, KernelError, KernelParam, KernelSource, ParamType};
pub use optimizer::OptimizerKernel;
pub use quantize::{QuantizeInput, QuantizeKind, QuantizeParams};
pub use tensor_map::{TensorMapDesc, TensorMapDtype, TensorMapSwizzle};
pub use writer::SourceWriter;
