// FP8 fake quantization, the kernel IR's QuantizeDequantize: out = dequant(quant(x)) with one
// E4M3 scale per tile_rows x tile_cols tile of each [rows][cols] matrix (the last tile along an
// axis may be partial), bit for bit what the CPU's `fp8::fake_quantize` computes:
//   scale = max(amax, 1e-4) / 448 (e4m3_scale, optionally rounded up to a power of two),
//   code  = the E4M3 value nearest to the exact x / scale, saturating (e4m3_quotient makes the
//           f32 quotient round like the CPU's single rounding of an f64 quotient),
//   out   = code * scale rounded once to f32 (the product of a 4-bit and a 24-bit significand is
//           exact in f64, so the f32 multiply rounds the same exact value the CPU rounds).
// A tile holding a NaN or an infinity comes back all NaN, as on the CPU. Needs common.cuh.
//
//   fake_quantize_e4m3:           any tile of each of a batch of matrices
//   fake_quantize_gathered_128x1: the K-grouped weight-gradient GEMM's operand tiles (128 padded
//                                 rows of one column, as quantize_128x1t_gathered makes them),
//                                 gathered and written back to token-slots, for the f32 path
#pragma once

namespace fathom {

// dequant(quant(v)) with the scale of v's (finite) tile.
__device__ __forceinline__ float fake_quantize_value(float v, float scale) {
  return e4m3_value(__nv_cvt_float_to_fp8(e4m3_quotient(v, scale), __NV_SATFINITE, __NV_E4M3), scale);
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

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
    dst[at] = poisoned ? quiet_nan() : fake_quantize_value(in[at], scale);
  }
}

// The tiles of a K-grouped weight-gradient operand, in f32: padded row r is x's row
// source_rows[r] (zeros where that is -1), one scale per 128 padded rows of each column, and
// padded row r is written to out's row out_rows[r] (nowhere where that is -1; both index maps
// come from index_ops.cuh's pad_groups). Zero rows add nothing to a tile's amax, so the values
// are those quantize_128x1t_gathered's codes and scales stand for.
//
// A CTA (WARPS warps) takes 128 padded rows x 32 columns: lane c of every warp owns column
// c0 + c, warp w rows w, w + WARPS, ..., so that each warp reads and writes 32 consecutive floats
// of one row at a time. Grid: (ceil(cols / 32), ceil(rows / 128)).
template <bool POW2, int WARPS>
__device__ __forceinline__ void fake_quantize_gathered_128x1(const float* __restrict__ x,
                                                             const int* __restrict__ source_rows,
                                                             const int* __restrict__ out_rows, float* __restrict__ out,
                                                             int rows, int cols) {
  static_assert(128 % WARPS == 0, "the warps share a tile's 128 rows evenly");
  constexpr int ROWS = 128 / WARPS;  // per thread
  __shared__ float column_amax[WARPS][32];
  __shared__ bool column_finite[WARPS][32];
  const int r0 = blockIdx.y * 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int col = blockIdx.x * 32 + lane;

  // This thread's rows of the column, kept for the second pass.
  float v[ROWS];
  float amax = 0.0f;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = r0 + warp + WARPS * i;
    const int source = row < rows ? source_rows[row] : -1;
    v[i] = source >= 0 && col < cols ? x[static_cast<long long>(source) * cols + col] : 0.0f;
    finite = finite && isfinite(v[i]);
    if (isfinite(v[i])) amax = fmaxf(amax, fabsf(v[i]));
  }
  column_amax[warp][lane] = amax;
  column_finite[warp][lane] = finite;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    amax = fmaxf(amax, column_amax[w][lane]);
    finite = finite && column_finite[w][lane];
  }
  const float scale = e4m3_scale<POW2>(amax);
  if (col >= cols) return;

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = r0 + warp + WARPS * i;
    const int dest = row < rows ? out_rows[row] : -1;
    if (dest < 0) continue;
    out[static_cast<long long>(dest) * cols + col] = finite ? fake_quantize_value(v[i], scale) : quiet_nan();
  }
}

}  // namespace fathom
