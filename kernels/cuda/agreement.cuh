// How far two results of the same computation lie apart, summed on the device so that nothing
// large crosses to the host: sums[0] += sum of (x - y)^2, sums[1] += sum of (x^2 + y^2), and
// sums[2] += the number of elements where x or y is not finite, over n elements, in f64.
// sums[0] / sums[1] is DeepGEMM's `1 - 2 sum(xy) / sum(x^2 + y^2)`, computed without the
// cancellation of that form. The FP8 GEMM tuner compares each candidate's product with the
// default tile's so (`runtime::cuda::gemm_tuning_device`). Needs common.cuh and convert.cuh
// (`convert_to_f32`); sums must be zero before the launch. Any block size that is a multiple of
// 32, at most 1024.
#pragma once

namespace fathom {

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ void agreement_sums(const T* __restrict__ x, const T* __restrict__ y, long long n,
                                               double* __restrict__ sums) {
  double squared_difference = 0.0;
  double squares = 0.0;
  double not_finite = 0.0;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double a = convert_to_f32(x[i]);
    const double b = convert_to_f32(y[i]);
    if (isfinite(a) && isfinite(b)) {
      squared_difference += (a - b) * (a - b);
      squares += a * a + b * b;
    } else {
      not_finite += 1.0;
    }
  }
  // A warp's sums, then the block's (one partial per warp in shared memory), then one atomic
  // add per block and sum.
  __shared__ double partial[3][32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  squared_difference = warp_sum_f64(squared_difference);
  squares = warp_sum_f64(squares);
  not_finite = warp_sum_f64(not_finite);
  if (lane == 0) {
    partial[0][warp] = squared_difference;
    partial[1][warp] = squares;
    partial[2][warp] = not_finite;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      const double v = warp_sum_f64(lane < warps ? partial[s][lane] : 0.0);
      if (lane == 0) atomicAdd(sums + s, v);
    }
  }
}

}  // namespace fathom
