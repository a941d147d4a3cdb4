// The optimizer's element-wise work on the device, bit for bit what the host computes
// (runtime/src/optim): every operation rounded on its own with the _rn intrinsics, so that no
// multiply-add is contracted where the host rounds twice, and one fused where the host fuses.
//
//   square_sums_f64: per chunk of CHUNK gradient values, the sum of their squares in f64 in the
//                    host's order (grads.rs, square_sum): element j < 8 * floor(n / 8) of a chunk
//                    into lane j % 8, each lane in element order, the lanes added in order, then
//                    the rest one after another. The host adds the chunk sums into the norm.
//   scale_f64:       x = (float)((double)x * coef), the gradient clipping (clip_to_norm).
//   adamw_update:    one AdamW step over n elements (adamw.rs, update_elements): p *= decay
//                    (DECAY), m = fma(1 - b1, g - m, m), v = v * b2 + (1 - b2) * g * g,
//                    p += (-lr / (1 - b1^t) * m) / (sqrt(v) / sqrt(1 - b2^t) + eps), the moments
//                    stored as M (float, or bf16 rounded to nearest even) after p used them in f32.
// Needs common.cuh.
#pragma once

namespace fathom {

template <int CHUNK>
__device__ __forceinline__ void square_sums_f64(const float* __restrict__ g, long long n, double* __restrict__ sums) {
  constexpr int LANES = 8;
  // One warp per chunk: lanes 0..7 sum their strided elements, lane 0 adds them in order.
  const long long chunk = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const long long first = chunk * CHUNK;
  if (first >= n) return;  // whole warps leave together
  const long long len = min(static_cast<long long>(CHUNK), n - first);
  const long long split = len / LANES * LANES;
  double sum = 0.0;
  if (lane < LANES) {
    for (long long j = lane; j < split; j += LANES) {
      const double x = static_cast<double>(g[first + j]);
      sum = __dadd_rn(sum, __dmul_rn(x, x));
    }
  }
  double lanes[LANES];
#pragma unroll
  for (int l = 0; l < LANES; ++l) lanes[l] = __shfl_sync(0xffffffffu, sum, l);
  if (lane == 0) {
    double total = lanes[0];
#pragma unroll
    for (int l = 1; l < LANES; ++l) total = __dadd_rn(total, lanes[l]);
    for (long long j = split; j < len; ++j) {
      const double x = static_cast<double>(g[first + j]);
      total = __dadd_rn(total, __dmul_rn(x, x));
    }
    sums[chunk] = total;
  }
}

__device__ __forceinline__ void scale_f64(float* __restrict__ x, long long n, double coef) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    x[i] = __double2float_rn(__dmul_rn(static_cast<double>(x[i]), coef));
  }
}

__device__ __forceinline__ float load_moment(float m) { return m; }
__device__ __forceinline__ float load_moment(bf16 m) { return __bfloat162float(m); }
__device__ __forceinline__ void store_moment(float* at, float m) { *at = m; }
__device__ __forceinline__ void store_moment(bf16* at, float m) { *at = __float2bfloat16_rn(m); }

template <class M, bool DECAY>
__device__ __forceinline__ void adamw_update(float* __restrict__ p, const float* __restrict__ g, M* __restrict__ m,
                                             M* __restrict__ v, long long n, float decay, float one_minus_beta1,
                                             float beta2, float one_minus_beta2, float bc2_sqrt, float eps,
                                             float neg_step_size) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float param = p[i];
    if (DECAY) param = __fmul_rn(param, decay);
    const float grad = g[i];
    const float m0 = load_moment(m[i]);
    const float m1 = __fmaf_rn(one_minus_beta1, __fsub_rn(grad, m0), m0);
    const float v1 = __fadd_rn(__fmul_rn(load_moment(v[i]), beta2), __fmul_rn(__fmul_rn(one_minus_beta2, grad), grad));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v1), bc2_sqrt), eps);
    p[i] = __fadd_rn(param, __fdiv_rn(__fmul_rn(neg_step_size, m1), denom));
    store_moment(m + i, m1);
    store_moment(v + i, v1);
  }
}

}  // namespace fathom
