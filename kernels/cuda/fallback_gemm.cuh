// Portable FP8 GEMM for GPUs without wgmma/TMA (sm_80 and newer): the same contract as
// fp8_gemm.cuh (operands, scale layouts, grouped contiguous and K-grouped layouts, outputs), so
// the runtime can swap it in on non-Hopper GPUs. E4M3 bytes are widened to bf16 (exactly) while
// staging through shared memory, multiplied with mma.sync m16n8k16, and each 128-wide K block's
// partial sums are promoted into the FP32 result with the scales applied, as on Hopper. Needs
// tiles.cuh (the K groups' blocks).
//
// 4 warps in a 2x2 grid; each warp owns a (BLOCK_M/2) x (BLOCK_N/2) sub-tile. Grid:
// (ceil(N / BLOCK_N), ceil(M / BLOCK_M), groups when K-grouped else 1).
#pragma once

namespace fathom {

template <int BLOCK_M, int BLOCK_N, bool B_ROW_SCALES, Grouping GROUPING, bool OUT_BF16, bool ACCUMULATE,
          bool SCATTER>
__device__ __forceinline__ void fp8_gemm_fallback(const u8* __restrict__ a, const u8* __restrict__ b,
                                                  const float* __restrict__ scale_a,
                                                  const float* __restrict__ scale_b,
                                                  const int* __restrict__ block_expert,
                                                  const int* __restrict__ k_offsets, void* __restrict__ out,
                                                  const int* __restrict__ out_rows, int m, int n, int k, int groups) {
  static_assert(BLOCK_M % 32 == 0 && BLOCK_N % 32 == 0, "warp tiles are multiples of 16x16");
  static_assert(128 % BLOCK_N == 0, "BLOCK_N divides 128: one B scale block per tile");
  static_assert(!(OUT_BF16 && ACCUMULATE), "accumulation into the output is FP32 only");
  // One B spans every K group: its scales are per row, and D's rows are A's (nothing to scatter).
  static_assert(GROUPING != Grouping::KGrouped || (B_ROW_SCALES && !SCATTER),
                "K-grouped GEMMs take 1x128 B scales and write D unscattered");
  constexpr int BLOCK_K = 128;
  constexpr int STRIDE = BLOCK_K + 8;  // bf16 elements per staged row; padding avoids bank conflicts
  constexpr int WARP_M = BLOCK_M / 2;
  constexpr int WARP_N = BLOCK_N / 2;
  constexpr int MT = WARP_M / 16;
  constexpr int NT = WARP_N / 8;
  constexpr int THREADS = 128;

  __shared__ __align__(16) bf16 sa[BLOCK_M * STRIDE];
  __shared__ __align__(16) bf16 sb[BLOCK_N * STRIDE];

  const int m0 = blockIdx.y * BLOCK_M;
  const int n0 = blockIdx.x * BLOCK_N;
  int expert = 0;
  if (GROUPING == Grouping::Contiguous) {
    expert = block_expert[m0 / Grouped::M_ALIGN];
    if (expert < 0) return;
  }
  const int num_k_blocks = ceil_div(k, BLOCK_K);
  // The K blocks this tile sums: all of them, or its K group's (blockIdx.z); an empty group's
  // tile sums none and writes zeros. A group's D follows the previous group's.
  KBlocks k_blocks{0, num_k_blocks};
  long long d_offset = 0;
  if (GROUPING == Grouping::KGrouped) {
    if (static_cast<int>(blockIdx.z) >= groups) return;  // a grid taller than the groups
    k_blocks = group_k_blocks(__ldg(k_offsets + blockIdx.z), __ldg(k_offsets + blockIdx.z + 1));
    d_offset = static_cast<long long>(blockIdx.z) * m * n;
  }
  const int m_pad = (m + 3) / 4 * 4;
  const int n_pad = (n + 3) / 4 * 4;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wm = (warp / 2) * WARP_M;
  const int wn = (warp % 2) * WARP_N;
  const u8* b_expert = b + static_cast<long long>(expert) * n * k;

  float result[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) result[i][j][r] = 0.0f;

  for (int kb = k_blocks.first; kb < k_blocks.first + k_blocks.count; ++kb) {
    const int k0 = kb * BLOCK_K;
    // Stage: 16 E4M3 bytes per load, widened to 16 bf16; out-of-range rows and K read as zero.
    for (int idx = threadIdx.x; idx < (BLOCK_M + BLOCK_N) * (BLOCK_K / 16); idx += THREADS) {
      const bool is_a = idx < BLOCK_M * (BLOCK_K / 16);
      const int local = is_a ? idx : idx - BLOCK_M * (BLOCK_K / 16);
      const int row = local / (BLOCK_K / 16);
      const int col = (local % (BLOCK_K / 16)) * 16;
      const int grow = (is_a ? m0 : n0) + row;
      const bool valid = grow < (is_a ? m : n) && k0 + col < k;
      uint4 bytes = make_uint4(0, 0, 0, 0);
      if (valid) {
        const u8* src = (is_a ? a : b_expert) + static_cast<long long>(grow) * k + k0 + col;
        bytes = __ldg(reinterpret_cast<const uint4*>(src));
      }
      const u32 words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
      u32 wide[8];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        wide[2 * w] = e4m3x2_to_bf16x2(static_cast<u16>(words[w] & 0xffffu));
        wide[2 * w + 1] = e4m3x2_to_bf16x2(static_cast<u16>(words[w] >> 16));
      }
      bf16* dst = (is_a ? sa : sb) + row * STRIDE + col;
      reinterpret_cast<uint4*>(dst)[0] = make_uint4(wide[0], wide[1], wide[2], wide[3]);
      reinterpret_cast<uint4*>(dst)[1] = make_uint4(wide[4], wide[5], wide[6], wide[7]);
    }
    __syncthreads();

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

#pragma unroll
    for (int kk = 0; kk < BLOCK_K; kk += 16) {
      u32 af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) ldmatrix_x4(af[i], ldsm_a_addr(sa, STRIDE, wm + 16 * i, kk));
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        u32 bf[4];
        ldmatrix_x4(bf, ldsm_bt_addr(sb, STRIDE, wn + 8 * j, kk));
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_bf16_16816(acc[i][j], af[i], bf[0], bf[1]);
          mma_bf16_16816(acc[i][j + 1], af[i], bf[2], bf[3]);
        }
      }
    }

    // Promotion with the scales of this K block.
    const float sb_block =
        B_ROW_SCALES ? 1.0f
                     : __ldg(scale_b + (static_cast<long long>(expert) * ceil_div(n, 128) + n0 / 128) * num_k_blocks + kb);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int row = m0 + wm + 16 * i + lane / 4;
      const float sa0 = row < m ? __ldg(scale_a + static_cast<long long>(kb) * m_pad + row) : 0.0f;
      const float sa1 = row + 8 < m ? __ldg(scale_a + static_cast<long long>(kb) * m_pad + row + 8) : 0.0f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float sc0 = sb_block;
        float sc1 = sb_block;
        if (B_ROW_SCALES) {
          const int col = n0 + wn + 8 * j + 2 * (lane % 4);
          sc0 = col < n ? __ldg(scale_b + static_cast<long long>(kb) * n_pad + col) : 0.0f;
          sc1 = col + 1 < n ? __ldg(scale_b + static_cast<long long>(kb) * n_pad + col + 1) : 0.0f;
        }
        result[i][j][0] += acc[i][j][0] * (sa0 * sc0);
        result[i][j][1] += acc[i][j][1] * (sa0 * sc1);
        result[i][j][2] += acc[i][j][2] * (sa1 * sc0);
        result[i][j][3] += acc[i][j][3] * (sa1 * sc1);
      }
    }
    __syncthreads();  // the next K block overwrites the staged tiles
  }

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + wm + 16 * i + lane / 4 + 8 * half;
      if (row >= m) continue;
      // With SCATTER, row r of the product is out's row out_rows[r] (nowhere where it is -1).
      const int out_row = SCATTER ? out_rows[row] : row;
      if (out_row < 0) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int col = n0 + wn + 8 * j + 2 * (lane % 4);
        if (col >= n) continue;
        const float v0 = result[i][j][2 * half];
        const float v1 = result[i][j][2 * half + 1];
        const long long idx = d_offset + static_cast<long long>(out_row) * n + col;
        if (OUT_BF16) {
          *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(out) + idx) = __floats2bfloat162_rn(v0, v1);
        } else {
          float2* dst = reinterpret_cast<float2*>(static_cast<float*>(out) + idx);
          if (ACCUMULATE) {
            const float2 old = *dst;
            *dst = make_float2(old.x + v0, old.y + v1);
          } else {
            *dst = make_float2(v0, v1);
          }
        }
      }
    }
  }
}

}  // namespace fathom
