// Quantisation to FP8 E4M3 with DeepSeek-V3's fine-grained scales: `scale = max(amax, 1e-4) / 448`
// per group (optionally rounded up to a power of two), `q = saturate_e4m3(x / scale)` with the
// quotient rounded once (bit-identical to the CPU reference in runtime/src/fp8), so that
// x ~= q * scale. Inputs are f32 or bf16, row-major [rows][cols]; the 128x128 blocks read 4 values
// at a time, so there cols must be a multiple of 4. Scale layouts match what fp8_gemm.cuh reads,
// and so do the codes' rows, padded with zero codes to a multiple of 16 bytes (TMA's row stride;
// zero codes add nothing to a product):
//
//   quantize_1x128:           activation tiles; q [rows][round_up(cols, 16)],
//                             scales [ceil(cols/128)][rows_pad]
//   quantize_1x128_gathered:  the same of rows gathered from x: output row r is x's row
//                             source_rows[r], or zeros where that is -1 (the grouped FP8 GEMMs'
//                             padded layout, see index_ops.cuh's pad_groups)
//   quantize_128x128:         weight blocks; q [rows][round_up(cols, 16)],
//                             scales [ceil(rows/128)][ceil(cols/128)]
//   quantize_128x128 (T):     the same blocks written transposed: q [cols][round_up(rows, 16)],
//                             scales [ceil(cols/128)][ceil(rows/128)]; a 128x128 block's amax does
//                             not depend on orientation, so this equals transposing the output above
//   quantize_128x1t:          transposed re-tiling of an activation for the weight-gradient GEMM:
//                             q [cols][round_up(rows, 16)] with one scale per 128 input rows of
//                             each column, scales [ceil(rows/128)][cols_pad]
//   quantize_128x1t_gathered: the same of rows gathered from x as quantize_1x128_gathered does
//                             (the K-grouped weight-gradient GEMM's operands, whose K is the
//                             experts' padded token-slots); zero rows add nothing to an amax
//
// rows_pad / cols_pad = round_up(·, 4): TMA needs 16-byte strides for the scale tensors.
//
// The activation kinds read their input through a source: DenseRows (f32 or bf16 values);
// E4m3Tiles, an activation kept as what quantize_1x128 wrote for it (a saved FP8 activation),
// whose elements are code * scale, the very values fake_quantize_e4m3 rounds it to; or
// ProductRows, the element-wise product of two f32 tensors that no kernel stores.
#pragma once

namespace fathom {

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

__device__ __forceinline__ float4 load4(const bf16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// An f32 or bf16 row-major [rows][cols] input.
template <class In>
struct DenseRows {
  const In* x;
  int cols;

  __device__ __forceinline__ float at(long long row, int col) const { return to_float(x[row * cols + col]); }

  // Elements col..col + 3 of a row (col a multiple of 4, below cols); those past cols read as zero.
  __device__ __forceinline__ float4 four(long long row, int col) const {
    const In* p = x + row * cols + col;
    if (cols % 4 == 0) return load4(p);  // rows start 16-byte aligned, and col + 3 < cols
    float4 v = make_float4(to_float(p[0]), 0.0f, 0.0f, 0.0f);
    if (col + 1 < cols) v.y = to_float(p[1]);
    if (col + 2 < cols) v.z = to_float(p[2]);
    if (col + 3 < cols) v.w = to_float(p[3]);
    return v;
  }
};

// A [rows][cols] activation as quantize_1x128 wrote it: codes [rows][round_up(cols, 16)], scales
// [ceil(cols/128)][round_up(rows, 4)]. Element (r, c) is e4m3_value(code, scale), bit for bit the
// value fake_quantize_e4m3 gives it in 1x128 tiles; `rows` is the tensor's own (a gathered kind's
// output rows are others).
struct E4m3Tiles {
  const u8* q;
  const float* scales;
  int rows;
  int cols;

  __device__ __forceinline__ long long code_at(long long row, int col) const {
    return row * ((cols + 15) / 16 * 16) + col;
  }
  __device__ __forceinline__ float scale(long long row, int col) const {
    return scales[static_cast<long long>(col / 128) * ((rows + 3) / 4 * 4) + row];
  }

  __device__ __forceinline__ float at(long long row, int col) const {
    return e4m3_value(q[code_at(row, col)], scale(row, col));
  }

  // Four codes in one word (rows are 16-byte aligned, col a multiple of 4); the padding's zero
  // codes past cols read as zero, and the four share a 128-wide tile's scale.
  __device__ __forceinline__ float4 four(long long row, int col) const {
    const u32 codes = *reinterpret_cast<const u32*>(q + code_at(row, col));
    const float s = scale(row, col);
    return make_float4(e4m3_value(codes & 0xffu, s), e4m3_value((codes >> 8) & 0xffu, s),
                       e4m3_value((codes >> 16) & 0xffu, s), e4m3_value(codes >> 24, s));
  }
};

// A [rows][cols] tensor no kernel stores: element (r, c) is x[(r / x_div) * x_row + c * x_col]
// times y[(r / y_div) * y_row + c * y_col], the one f32 multiply the loop nest that would have
// stored it does (the experts' combine gradient: dy broadcast to each of a token's slots times
// the slot's weight).
struct ProductRows {
  const float* x;
  const float* y;
  int cols;
  int x_div, x_row, x_col;
  int y_div, y_row, y_col;

  __device__ __forceinline__ float at(long long row, int col) const {
    const float a = x[(row / x_div) * x_row + static_cast<long long>(col) * x_col];
    const float b = y[(row / y_div) * y_row + static_cast<long long>(col) * y_col];
    return a * b;
  }

  // Elements col..col + 3 of a row (col a multiple of 4, below cols); those past cols are zero.
  __device__ __forceinline__ float4 four(long long row, int col) const {
    float4 v = make_float4(at(row, col), 0.0f, 0.0f, 0.0f);
    if (col + 1 < cols) v.y = at(row, col + 1);
    if (col + 2 < cols) v.z = at(row, col + 2);
    if (col + 3 < cols) v.w = at(row, col + 3);
    return v;
  }
};

__device__ __forceinline__ float amax4(float4 v) {
  return fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
}

__device__ __forceinline__ u32 quantize4(float4 v, float scale) {
  return float4_to_e4m3x4(e4m3_quotient(v.x, scale), e4m3_quotient(v.y, scale), e4m3_quotient(v.z, scale),
                          e4m3_quotient(v.w, scale));
}

// One warp per 1x128 tile (each lane 4 consecutive values); WARPS tiles (rows) per CTA. Output
// row r reads the source's row source_rows[r] when GATHER (zeros where it is -1), row r otherwise.
// Grid: (ceil(cols / 128), ceil(rows / WARPS)).
template <bool POW2, int WARPS, bool GATHER, class Source>
__device__ __forceinline__ void quantize_1x128_rows(const Source& x, const int* __restrict__ source_rows,
                                                    u8* __restrict__ q, float* __restrict__ scales, int rows,
                                                    int cols) {
  const int row = blockIdx.y * WARPS + threadIdx.x / 32;
  const int col = blockIdx.x * 128 + (threadIdx.x % 32) * 4;
  if (row >= rows) return;  // whole warps leave together
  const long long source = GATHER ? source_rows[row] : row;
  float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (col < cols && source >= 0) v = x.four(source, col);
  const float scale = e4m3_scale<POW2>(warp_max(amax4(v)));
  // q's rows are padded to 16 bytes; the lanes past cols write the padding's zero codes.
  const int q_stride = (cols + 15) / 16 * 16;
  if (col < q_stride) *reinterpret_cast<u32*>(q + static_cast<long long>(row) * q_stride + col) = quantize4(v, scale);
  if (threadIdx.x % 32 == 0) {
    const int rows_pad = (rows + 3) / 4 * 4;
    scales[static_cast<long long>(blockIdx.x) * rows_pad + row] = scale;
  }
}

template <bool POW2, int WARPS, class Source>
__device__ __forceinline__ void quantize_1x128(const Source& x, u8* __restrict__ q, float* __restrict__ scales,
                                               int rows, int cols) {
  quantize_1x128_rows<POW2, WARPS, false>(x, nullptr, q, scales, rows, cols);
}

template <bool POW2, int WARPS, class Source>
__device__ __forceinline__ void quantize_1x128_gathered(const Source& x, const int* __restrict__ source_rows,
                                                        u8* __restrict__ q, float* __restrict__ scales, int rows,
                                                        int cols) {
  quantize_1x128_rows<POW2, WARPS, true>(x, source_rows, q, scales, rows, cols);
}

// One CTA (256 threads) per 128x128 block: amax over the block, then quantise (re-reading the
// input, which is in L2 by then). TRANSPOSE stages the bytes in shared memory and writes q^T.
// Grid: (ceil(cols / 128), ceil(rows / 128), matrices): blockIdx.z picks one of a stack of
// [rows][cols] matrices (the experts' weights, one launch for all), whose codes and scales are
// stacked likewise, each matrix's as one matrix's would be.
template <class In, bool POW2, bool TRANSPOSE>
__device__ __forceinline__ void quantize_128x128(const In* __restrict__ x, u8* __restrict__ q,
                                                 float* __restrict__ scales, int rows, int cols) {
  constexpr int THREADS = 256;
  constexpr int T_STRIDE = 144;  // bytes per staged q^T row (128 + 16 keeps 16-byte alignment)
  __shared__ float warp_amax[THREADS / 32];
  __shared__ __align__(16) u8 staged[TRANSPOSE ? 128 * T_STRIDE : 16];
  {
    const long long matrix = blockIdx.z;
    const long long code_rows = TRANSPOSE ? cols : rows;
    const long long code_cols = TRANSPOSE ? (rows + 15) / 16 * 16 : (cols + 15) / 16 * 16;
    x += matrix * rows * cols;
    q += matrix * code_rows * code_cols;
    scales += matrix * gridDim.x * gridDim.y;
  }
  const int r0 = blockIdx.y * 128;
  const int c0 = blockIdx.x * 128;
  const int lc = (threadIdx.x % 32) * 4;  // 4 columns per thread
  const int col = c0 + lc;

  float amax = 0.0f;
#pragma unroll 4
  for (int lr = threadIdx.x / 32; lr < 128; lr += THREADS / 32) {
    const int row = r0 + lr;
    if (row < rows && col < cols) amax = fmaxf(amax, amax4(load4(x + static_cast<long long>(row) * cols + col)));
  }
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_amax[0];
#pragma unroll
  for (int w = 1; w < THREADS / 32; ++w) amax = fmaxf(amax, warp_amax[w]);
  const float scale = e4m3_scale<POW2>(amax);
  if (threadIdx.x == 0) {
    if (TRANSPOSE) {
      scales[static_cast<long long>(blockIdx.x) * gridDim.y + blockIdx.y] = scale;
    } else {
      scales[static_cast<long long>(blockIdx.y) * gridDim.x + blockIdx.x] = scale;
    }
  }

  // q's rows, padded to 16 bytes: input rows, or input columns when transposed.
  const long long q_stride = TRANSPOSE ? (rows + 15) / 16 * 16 : (cols + 15) / 16 * 16;
#pragma unroll 4
  for (int lr = threadIdx.x / 32; lr < 128; lr += THREADS / 32) {
    const int row = r0 + lr;
    if (col >= cols) {
      // The padding of q's rows (cols is a multiple of 4, so a lane is all in or all out).
      if (!TRANSPOSE && row < rows && col < q_stride) *reinterpret_cast<u32*>(q + row * q_stride + col) = 0u;
      continue;
    }
    // Rows past the end stage zero codes: the transposed rows' padding.
    const u32 packed = row < rows ? quantize4(load4(x + static_cast<long long>(row) * cols + col), scale) : 0u;
    if (TRANSPOSE) {
#pragma unroll
      for (int e = 0; e < 4; ++e) staged[(lc + e) * T_STRIDE + lr] = static_cast<u8>(packed >> (8 * e));
    } else if (row < rows) {
      *reinterpret_cast<u32*>(q + row * q_stride + col) = packed;
    }
  }
  if (TRANSPOSE) {
    __syncthreads();
    // q^T rows are input columns; 8 chunks of 16 bytes each (one reaching past `rows` carries the
    // padding's zero codes).
    for (int chunk = threadIdx.x; chunk < 128 * 8; chunk += THREADS) {
      const int tr = chunk / 8;
      const int tc = (chunk % 8) * 16;
      if (c0 + tr < cols && r0 + tc < rows) {
        *reinterpret_cast<uint4*>(q + (c0 + tr) * q_stride + r0 + tc) =
            *reinterpret_cast<const uint4*>(staged + tr * T_STRIDE + tc);
      }
    }
  }
}

// Transposed re-tiling: a CTA (256 threads) takes 128 input rows x 32 input columns; 8 lanes per
// column each quantise 16 rows, so every output row of q^T gets its 128-wide tile and one scale.
// Row r of what is quantised is the source's row source_rows[r] when GATHER (zeros where it is -1), row r
// otherwise. Grid: (ceil(cols / 32), ceil(rows / 128)).
template <bool POW2, bool GATHER, class Source>
__device__ __forceinline__ void quantize_128x1t_rows(const Source& x, const int* __restrict__ source_rows,
                                                     u8* __restrict__ q, float* __restrict__ scales, int rows,
                                                     int cols) {
  constexpr int THREADS = 256;
  __shared__ float tile[128][33];
  const int r0 = blockIdx.y * 128;
  const int c0 = blockIdx.x * 32;
  for (int idx = threadIdx.x; idx < 128 * 32; idx += THREADS) {
    const int lr = idx / 32;
    const int lc = idx % 32;
    // A warp reads one row: one (broadcast) source index, 32 consecutive values. -1: zeros (past
    // the rows, or a padding row).
    long long source = -1;
    if (r0 + lr < rows) source = GATHER ? source_rows[r0 + lr] : r0 + lr;
    const bool valid = source >= 0 && c0 + lc < cols;
    tile[lr][lc] = valid ? x.at(source, c0 + lc) : 0.0f;
  }
  __syncthreads();

  const int lc = threadIdx.x / 8;
  const int part = threadIdx.x % 8;
  float v[16];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    v[i] = tile[part * 16 + i][lc];
    amax = fmaxf(amax, fabsf(v[i]));
  }
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
  const float scale = e4m3_scale<POW2>(amax);
  const int col = c0 + lc;
  if (col >= cols) return;
  // q's rows are padded to 16 bytes: a chunk reaching past `rows` carries the padding's zero
  // codes (the tile holds zeros there).
  const long long q_stride = (rows + 15) / 16 * 16;
  if (r0 + part * 16 < rows) {
    u32 words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      words[w] = float4_to_e4m3x4(e4m3_quotient(v[4 * w], scale), e4m3_quotient(v[4 * w + 1], scale),
                                  e4m3_quotient(v[4 * w + 2], scale), e4m3_quotient(v[4 * w + 3], scale));
    }
    const uint4 packed = make_uint4(words[0], words[1], words[2], words[3]);
    *reinterpret_cast<uint4*>(q + col * q_stride + r0 + part * 16) = packed;
  }
  if (part == 0) {
    const int cols_pad = (cols + 3) / 4 * 4;
    scales[static_cast<long long>(blockIdx.y) * cols_pad + col] = scale;
  }
}

template <bool POW2, class Source>
__device__ __forceinline__ void quantize_128x1t(const Source& x, u8* __restrict__ q, float* __restrict__ scales,
                                                int rows, int cols) {
  quantize_128x1t_rows<POW2, false>(x, nullptr, q, scales, rows, cols);
}

template <bool POW2, class Source>
__device__ __forceinline__ void quantize_128x1t_gathered(const Source& x, const int* __restrict__ source_rows,
                                                         u8* __restrict__ q, float* __restrict__ scales, int rows,
                                                         int cols) {
  quantize_128x1t_rows<POW2, true>(x, source_rows, q, scales, rows, cols);
}

}  // namespace fathom
