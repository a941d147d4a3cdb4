// FP8 fake quantization, the kernel IR's QuantizeDequantize: out = dequant(quant(x)) with one
// E4M3 scale per tile_rows x tile_cols tile of each [rows][cols] matrix (the last tile along an
// axis may be partial), bit for bit what the CPU's `fp8::fake_quantize` computes:
//   scale = max(amax, 1e-4) / 448 (e4m3_scale, optionally rounded up to a power of two),
//   code  = the E4M3 value nearest to the exact x / scale, saturating (e4m3_quotient makes the
//           f32 quotient round like the CPU's single rounding of an f64 quotient),
//   out   = code * scale rounded once to f32 (the product of a 4-bit and a 24-bit significand is
//           exact in f64, so the f32 multiply rounds the same exact value the CPU rounds).
// A tile holding a NaN or an infinity comes back all NaN, as on the CPU. Needs common.cuh.
#pragma once

namespace fathom {

// One block per tile; tiles are numbered matrix by matrix, row of tiles by row of tiles.
// Grid: (matrices * ceil(rows / tile_rows) * ceil(cols / tile_cols)).
template <bool POW2, int THREADS>
__device__ __forceinline__ void fake_quantize_e4m3(const float* __restrict__ x, float* __restrict__ out, int rows,
                                                   int cols, int tile_rows, int tile_cols) {
  __shared__ float warp_amax[THREADS / 32];
  __shared__ int non_finite;
  const int tiles_across = (cols + tile_cols - 1) / tile_cols;
  const int tiles_down = (rows + tile_rows - 1) / tile_rows;
  const long long matrix = blockIdx.x / (static_cast<long long>(tiles_across) * tiles_down);
  const int tile = blockIdx.x % (tiles_across * tiles_down);
  const int r0 = (tile / tiles_across) * tile_rows;
  const int c0 = (tile % tiles_across) * tile_cols;
  const int height = min(tile_rows, rows - r0);
  const int width = min(tile_cols, cols - c0);
  const float* in = x + (matrix * rows + r0) * cols + c0;
  float* dst = out + (matrix * rows + r0) * cols + c0;
  if (threadIdx.x == 0) non_finite = 0;
  __syncthreads();

  float amax = 0.0f;
  bool finite = true;
  for (int e = threadIdx.x; e < height * width; e += THREADS) {
    const float v = in[static_cast<long long>(e / width) * cols + e % width];
    finite = finite && isfinite(v);
    if (isfinite(v)) amax = fmaxf(amax, fabsf(v));
  }
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  if (!finite) non_finite = 1;
  __syncthreads();
  amax = warp_amax[0];
#pragma unroll
  for (int w = 1; w < THREADS / 32; ++w) amax = fmaxf(amax, warp_amax[w]);
  const float scale = e4m3_scale<POW2>(amax);
  const bool poisoned = non_finite != 0;

  for (int e = threadIdx.x; e < height * width; e += THREADS) {
    const long long at = static_cast<long long>(e / width) * cols + e % width;
    if (poisoned) {
      dst[at] = __int_as_float(0x7fc00000);  // NaN
      continue;
    }
    const __nv_fp8_storage_t code = __nv_cvt_float_to_fp8(e4m3_quotient(in[at], scale), __NV_SATFINITE, __NV_E4M3);
    const __half_raw h = __nv_cvt_fp8_to_halfraw(code, __NV_E4M3);
    dst[at] = __half2float(__half(h)) * scale;
  }
}

}  // namespace fathom
