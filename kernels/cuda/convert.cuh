// Element conversions around the bf16 attention templates: f32 rows -> dense bf16 (round to
// nearest even, the rounding of the CPU's and the interpreter's casts; the rows may lie a
// stride apart, as a slice of a wider last axis does, so no f32 copy precedes the conversion),
// and over n contiguous elements in grid-stride loops bf16 -> f32 (exact) and a zero fill of
// f32 (the attention backward accumulates dq and dk_rope). Needs common.cuh.
#pragma once

namespace fathom {

__device__ __forceinline__ long long grid_first() {
  return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
  return static_cast<long long>(gridDim.x) * blockDim.x;
}

// Row r of x is the width floats from x + r * row_stride; y is rows x width, dense. One warp
// per row (grid-stride over rows), its lanes along the row: coalesced, and no division.
__device__ __forceinline__ void convert_f32_bf16_rows(const float* __restrict__ x, bf16* __restrict__ y,
                                                      long long rows, long long width, long long row_stride) {
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x % 32;
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const float* from = x + r * row_stride;
    bf16* to = y + r * width;
    for (long long c = lane; c < width; c += 32) to[c] = __float2bfloat16_rn(from[c]);
  }
}

__device__ __forceinline__ void convert_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y, long long n) {
  for (long long i = grid_first(); i < n; i += grid_stride()) y[i] = __bfloat162float(x[i]);
}

__device__ __forceinline__ void fill_zero_f32(float* __restrict__ y, long long n) {
  for (long long i = grid_first(); i < n; i += grid_stride()) y[i] = 0.0f;
}

}  // namespace fathom
