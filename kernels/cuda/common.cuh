// Fathom CUDA prelude shared by every template: fixed-width types, bf16 packing, warp reductions,
// cp.async and the sm_80 tensor-core primitives (ldmatrix, mma.sync m16n8k16 bf16).
// Portable to sm_80 and newer; nothing here needs Hopper.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;

namespace fathom {

// Grouped (MoE) GEMMs: every expert's segment of sorted tokens is padded to a multiple of
// M_ALIGN rows, and `block_expert` holds one expert index per such block (-1: all padding).
struct Grouped {
  static constexpr int M_ALIGN = 128;
};

// How the FP8 GEMMs split their work (fp8_gemm.cuh, fallback_gemm.cuh): one product; the MoE
// experts' "contiguous" layout (rows sorted by expert, B per expert); or K-grouped, one product
// per group over that group's range of K (the experts' weight gradients).
enum class Grouping { Dense, Contiguous, KGrouped };

// -inf without <math.h> (NVRTC has no INFINITY macro).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <int A, int B>
struct CeilDiv {
  static constexpr int value = (A + B - 1) / B;
};

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_u32(const void* ptr) {
  return static_cast<u32>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Reductions over the 4 lanes of a quad: the lanes that share a row of an mma.sync fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Two floats as one bf16x2 register, `lo` in the low half (round to nearest even).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }

// Two E4M3 bytes (low byte first) to a bf16x2 register; exact (every E4M3 value is a bf16), NaN
// stays NaN. Hardware conversion on sm_89+, a software path from cuda_fp8.h on sm_80.
__device__ __forceinline__ u32 e4m3x2_to_bf16x2(u16 bits) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(bits), __NV_E4M3);
  float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
  return pack_bf16x2(f.x, f.y);
}

// An E4M3 code times its scale, rounded once to f32: the product of a 4-bit and a 24-bit
// significand is exact in f64, so this is the value the CPU's dequantisation rounds (and what
// fake_quantize.cuh writes for a rounded element).
__device__ __forceinline__ float e4m3_value(u8 code, float scale) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3);
  return __half2float(__half(h)) * scale;
}

// x / scale, adjusted so that converting it to E4M3 (round to nearest even) gives the E4M3 value
// nearest to the exact quotient, as the CPU reference (a single rounding of an f64 quotient) does.
// The f32 quotient is already correctly rounded; a second rounding can only go wrong when that
// quotient sits exactly on an E4M3 midpoint while the exact one does not. Then the exact residual
// (one fma) says on which side the true quotient lies, and a one-ulp nudge toward it (the
// neighbouring f32 cannot be a midpoint too) makes the conversion round the right way.
__device__ __forceinline__ float e4m3_quotient(float x, float scale) {
  float q = x / scale;
  const float residual = fmaf(-q, scale, x);  // exactly x - q * scale
  const float a = fabsf(q);
  bool midpoint;
  if (a >= 0.015625f) {
    // Normal E4M3 (>= 2^-6): 3 mantissa bits, so a midpoint has f32 mantissa bits 19..0 = 1000...0.
    midpoint = (__float_as_uint(q) & 0x000fffffu) == 0x00080000u;
  } else {
    // Subnormal E4M3: spacing 2^-9, midpoints are odd multiples of 2^-10.
    const float t = a * 1024.0f;
    const u32 ti = static_cast<u32>(t);
    midpoint = t == static_cast<float>(ti) && (ti & 1u);
  }
  if (midpoint && residual != 0.0f) {
    // Away from zero when the exact quotient is, toward zero otherwise.
    q = __uint_as_float(__float_as_uint(q) + (((residual > 0.0f) == (q > 0.0f)) ? 1u : 0xffffffffu));
  }
  return q;
}

// Four floats to four saturated E4M3 bytes, first value in the lowest byte.
__device__ __forceinline__ u32 float4_to_e4m3x4(float a, float b, float c, float d) {
  u32 lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  u32 hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return (lo & 0xffffu) | (hi << 16);
}

// DeepSeek-V3's fine-grained scale, `max(amax, 1e-4) / 448`, optionally rounded up to a power of
// two (exactly: a scale with any mantissa bit set moves to the next binade).
template <bool POW2>
__device__ __forceinline__ float e4m3_scale(float amax) {
  float scale = fmaxf(amax, 1e-4f) / 448.0f;
  if (POW2) {
    u32 bits = __float_as_uint(scale);
    if (bits & 0x007fffffu) bits = (bits + 0x00800000u) & 0xff800000u;
    scale = __uint_as_float(bits);
  }
  return scale;
}

// ---- cp.async (sm_80): 16-byte global -> shared copies, zero-filled when `valid` is false ----

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies rows [row0, row0 + ROWS) of a [T][...] operand into shared memory, 16 bytes per cp.async;
// rows at or past `seq_len` are zero-filled. `src(row)` gives a row's first element.
template <int ROWS, int COLS, int THREADS, class RowPtr>
__device__ __forceinline__ void stage_rows(bf16* dst, int dst_stride, int row0, int seq_len, RowPtr src) {
  constexpr int CHUNKS = COLS / 8;
  for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
    const int r = idx / CHUNKS;
    const int c = (idx % CHUNKS) * 8;
    const bool valid = row0 + r < seq_len;
    cp_async_16(dst + r * dst_stride + c, src(valid ? row0 + r : 0) + c, valid);
  }
}

// ---- ldmatrix and mma.sync m16n8k16 (bf16 in, f32 accumulate) ----

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

// D += A * B for one 16x8 tile. Fragment layouts (g = lane / 4, t = lane % 4):
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Lane addresses for ldmatrix_x4 over a row-major bf16 tile with `stride` elements per row.
// A operand (16x16 at row0/col0): registers come back as a[0..3] of mma_bf16_16816.
__device__ __forceinline__ const bf16* ldsm_a_addr(const bf16* tile, int stride, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  return tile + (row0 + lane % 16) * stride + col0 + (lane / 16) * 8;
}

// B operand from a tile stored as [n][k] (B = tile^T): non-transposed ldmatrix_x4 gives
// {b0, b1} of n-tile n0..n0+7 in r[0], r[1] and of n0+8..n0+15 in r[2], r[3].
__device__ __forceinline__ const bf16* ldsm_bt_addr(const bf16* tile, int stride, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  const int m = lane / 8;
  return tile + (n0 + (m / 2) * 8 + lane % 8) * stride + k0 + (m % 2) * 8;
}

// B operand from a tile stored as [k][n] (B = tile): ldmatrix_x4_trans gives {b0, b1} of n-tile
// n0..n0+7 in r[0], r[1] and of n0+8..n0+15 in r[2], r[3].
__device__ __forceinline__ const bf16* ldsm_b_addr(const bf16* tile, int stride, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  const int m = lane / 8;
  return tile + (k0 + (m % 2) * 8 + lane % 8) * stride + n0 + (m / 2) * 8;
}

// The accumulator tiles s[2j], s[2j+1] (16 rows x 16 columns of f32) as the A fragment of the next
// mma over those 16 columns: the flash-attention register reuse of P.
__device__ __forceinline__ void acc_to_a_frag(u32 (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack_bf16x2(lo[0], lo[1]);
  a[1] = pack_bf16x2(lo[2], lo[3]);
  a[2] = pack_bf16x2(hi[0], hi[1]);
  a[3] = pack_bf16x2(hi[2], hi[3]);
}

}  // namespace fathom
