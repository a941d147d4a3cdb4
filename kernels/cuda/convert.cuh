// Element conversions around the bf16 attention templates, over n contiguous elements in
// grid-stride loops: f32 -> bf16 (round to nearest even, the rounding of the CPU's and the
// interpreter's casts), bf16 -> f32 (exact), and a zero fill of f32 (the attention backward
// accumulates dq and dk_rope). Needs common.cuh.
#pragma once

namespace fathom {

__device__ __forceinline__ long long grid_first() {
  return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
  return static_cast<long long>(gridDim.x) * blockDim.x;
}

__device__ __forceinline__ void convert_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
  for (long long i = grid_first(); i < n; i += grid_stride()) y[i] = __float2bfloat16_rn(x[i]);
}

__device__ __forceinline__ void convert_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y, long long n) {
  for (long long i = grid_first(); i < n; i += grid_stride()) y[i] = __bfloat162float(x[i]);
}

__device__ __forceinline__ void fill_zero_f32(float* __restrict__ y, long long n) {
  for (long long i = grid_first(); i < n; i += grid_stride()) y[i] = 0.0f;
}

}  // namespace fathom
