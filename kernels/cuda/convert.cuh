// Element conversions around the bf16 attention templates, over rows: row r of x is the width
// elements from x + r * x_stride, row r of y the padded_width elements from y + r * y_stride,
// its first width converted from x's row and the rest zero. The rows may lie a stride apart
// (a slice of a wider last axis is read where it lies, with no copy first), and the zeros pad
// a head to the widths the templates take: f32 -> bf16 (round to nearest even, the rounding of
// the CPU's and the interpreter's casts), bf16 -> f32 (exact), f32 -> f32 (the padded
// gradients back to the program's widths). Also a zero fill of n contiguous f32 (the attention
// backward accumulates dq and dk_rope), and the scaled sums of micro-batch gradients. Needs
// common.cuh.
#pragma once

namespace fathom {

__device__ __forceinline__ float convert_to_f32(float x) { return x; }
__device__ __forceinline__ float convert_to_f32(bf16 x) { return __bfloat162float(x); }

template <typename To>
__device__ __forceinline__ To convert_from_f32(float x);
template <>
__device__ __forceinline__ float convert_from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 convert_from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// One warp per row (grid-stride over rows), its lanes along the row: coalesced, and no
// division.
template <typename From, typename To>
__device__ __forceinline__ void convert_rows(const From* __restrict__ x, To* __restrict__ y, long long rows,
                                             long long width, long long padded_width, long long x_stride,
                                             long long y_stride) {
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x % 32;
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const From* from = x + r * x_stride;
    To* to = y + r * y_stride;
    for (long long c = lane; c < padded_width; c += 32)
      to[c] = convert_from_f32<To>(c < width ? convert_to_f32(from[c]) : 0.0f);
  }
}

__device__ __forceinline__ void fill_zero_f32(float* __restrict__ y, long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = 0.0f;
}

// Micro-batch gradient sums kept on the device: acc = scale * x on the first micro-batch, else
// acc + scale * x, each product and sum rounded on its own (no FMA), so that the sums are the
// host's `acc += scale * x` to the bit.
__device__ __forceinline__ void accumulate_scaled_f32(float* __restrict__ acc, const float* __restrict__ x,
                                                      float scale, long long n, int first) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float term = __fmul_rn(scale, x[i]);
    acc[i] = first ? term : __fadd_rn(acc[i], term);
  }
}

}  // namespace fathom
