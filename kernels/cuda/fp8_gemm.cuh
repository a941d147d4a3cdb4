// FP8 E4M3 x E4M3 GEMM with DeepSeek-V3 fine-grained scaling for Hopper (sm_90a).
//
//   D[M, N] (+)= sum_k  A[M, K] * B[N, K]          ("NT": both operands K-major)
//
// A: activations, one f32 scale per 1x128 tile (per row, per 128 of K), stored [ceil(K/128)][M_pad]
//    with M_pad = round_up(M, 4) (M-major so that TMA can fetch a tile's scales as one box).
// B: weights, one f32 scale per 128x128 block, stored [ceil(N/128)][ceil(K/128)] (B_ROW_SCALES
//    false); or, for the weight-gradient GEMM whose B is an activation too, one scale per 1x128
//    tile stored [ceil(K/128)][N_pad] like A's (B_ROW_SCALES true).
//
// D is cut into BLOCK_M x BLOCK_N tiles, and each CTA computes tiles blockIdx.x, blockIdx.x +
// gridDim.x, ... (one tile when the grid has one CTA per tile; "persistent" when the grid has one
// per SM, so that the producer loads the next tile while the math warps write the last one out;
// with clusters, each cluster takes units of CLUSTER_M tiles so). Tiles are numbered in bands of
// `raster_band` row blocks, down the band's rows first, so that the CTAs running at once share
// their A rows and B columns in L2.
//
// In each CTA a producer warp group (the last one) streams K in blocks of 128 through a
// STAGES-deep ring of shared-memory buffers with TMA, signalling `full` mbarriers; BLOCK_M/64
// math warp groups each own 64 rows, issue four wgmma m64nNk32 per K block (K = 128 =
// DeepSeek's N_C), and after each K block promote the tensor-core partial sums into an FP32
// accumulator with the two scales applied (the FP8 tensor core keeps only ~14 bits), then release
// the buffer through its `empty` mbarrier. The ring runs on across tiles.
//
// CLUSTER_M = 2 (dense GEMMs): CTAs run in clusters of two that compute the tiles of two
// neighbouring row blocks and one column block together. They share B's tile: each CTA loads
// half of it and multicasts the half into both CTAs' shared memory, so each reads half the B
// bytes from L2. A stage is then refilled only when both CTAs' math warps have released it (they
// arrive on the `empty` barriers of both), and a CTA leaves only when its peer no longer
// arrives on its barriers. An odd last row block pairs with a tile past M, which computes on the
// last real rows and writes nothing.
//
// A tile wider than a weight scale block, or not aligned to one (BLOCK_N of 144, 160 or 192), meets
// at most two 128x128 scale blocks; its columns before the boundary take the first's scale.
//
// Grouping::Contiguous (MoE experts' forward and input gradient): A's rows are tokens sorted by
// expert, every expert's segment padded to a multiple of Grouped::M_ALIGN (128) rows;
// block_expert[row / 128] names the expert of each such block (-1: padding block, skipped). B is
// [num_experts * N, K], scales [num_experts][ceil(N/128)][...].
//
// Grouping::KGrouped (MoE experts' weight gradients, dW_e = dy_e^T x_e): `groups` products
//   D[g][M, N] = sum over k in [k_offsets[g], k_offsets[g + 1])  A[M, k] * B[N, k]
// written at out + g * M * N. A and B span every group's K (the experts' token-slots, each
// expert's segment padded to a multiple of 128, so each 128-wide K block and its scales belong
// to one group), both with 1x128 scales (B_ROW_SCALES). Tiles are numbered group by group; a tile
// sums its group's K blocks only, which producer and math warps read from k_offsets alike, so
// the ring stays in step. A group with no K gets zeros written: its tiles load nothing and
// wait on nothing, and run the epilogue on a zero result.
#pragma once

namespace fathom {

template <int BLOCK_M, int BLOCK_N, int STAGES, bool B_ROW_SCALES>
struct Fp8GemmSmem {
  static constexpr int BLOCK_K = 128;
  static constexpr int A_BYTES = BLOCK_M * BLOCK_K;
  static constexpr int B_BYTES = BLOCK_N * BLOCK_K;
  static constexpr int SA_BYTES = BLOCK_M * 4;
  // TMA destinations need 128-byte alignment.
  static constexpr int SB_BYTES = B_ROW_SCALES ? (BLOCK_N * 4 + 127) / 128 * 128 : 0;
  static constexpr int A_OFFSET = 0;
  static constexpr int B_OFFSET = A_OFFSET + STAGES * A_BYTES;
  static constexpr int SA_OFFSET = B_OFFSET + STAGES * B_BYTES;
  static constexpr int SB_OFFSET = SA_OFFSET + STAGES * SA_BYTES;
  static constexpr int BAR_OFFSET = SB_OFFSET + STAGES * SB_BYTES;
  static constexpr int BYTES = BAR_OFFSET + 2 * STAGES * 8;
  // Bytes TMA delivers per stage (boxes count in full, out-of-bounds parts as zeros).
  static constexpr u32 TX_BYTES = A_BYTES + B_BYTES + SA_BYTES + (B_ROW_SCALES ? BLOCK_N * 4 : 0);
};

// A CTA's tile: its first row and column; its expert (Contiguous: -1 for a padding block, which
// is skipped) or K group (KGrouped), 0 when dense; and the K blocks it sums over.
struct Tile {
  int m0;
  int n0;
  int group;
  KBlocks k;
};

template <int BLOCK_M, int BLOCK_N, int STAGES, int CLUSTER_M, bool B_ROW_SCALES, Grouping GROUPING, bool OUT_BF16,
          bool ACCUMULATE, bool SCATTER, class Wgmma>
__device__ __forceinline__ void fp8_gemm_sm90(void* __restrict__ out, const int* __restrict__ out_rows,
                                              const float* __restrict__ scale_b,
                                              const int* __restrict__ block_expert,
                                              const int* __restrict__ k_offsets, int m, int n, int k, int groups,
                                              int raster_band, const TensorMap* tmap_a, const TensorMap* tmap_b,
                                              const TensorMap* tmap_scale_a, const TensorMap* tmap_scale_b) {
  static_assert(BLOCK_M == 64 || BLOCK_M == 128, "BLOCK_M is 64 or 128 (one or two math warp groups)");
  static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 192, "BLOCK_N is a multiple of 16, at most 192");
  // A tile's columns meet at most two 128-wide weight scale blocks: it starts at most
  // 128 - gcd(BLOCK_N, 128) into one, and gcd(BLOCK_N, 128) is BLOCK_N's lowest set bit.
  static_assert(BLOCK_N <= 128 + (BLOCK_N & -BLOCK_N), "a tile must meet at most two 128-column scale blocks");
  static_assert(Wgmma::N == BLOCK_N, "the wgmma wrapper must match BLOCK_N");
  static_assert(!(OUT_BF16 && ACCUMULATE), "accumulation into the output is FP32 only");
  static_assert(CLUSTER_M == 1 || (CLUSTER_M == 2 && GROUPING == Grouping::Dense),
                "clusters of two share B: dense GEMMs only (two row blocks may be two experts)");
  // One B spans every K group: its scales are per row (no per-expert weight blocks), and D's
  // rows are A's rows of one group (nothing to scatter).
  static_assert(GROUPING != Grouping::KGrouped || (B_ROW_SCALES && !SCATTER),
                "K-grouped GEMMs take 1x128 B scales and write D unscattered");
  constexpr bool CONTIGUOUS = GROUPING == Grouping::Contiguous;
  constexpr bool K_GROUPED = GROUPING == Grouping::KGrouped;
  using Smem = Fp8GemmSmem<BLOCK_M, BLOCK_N, STAGES, B_ROW_SCALES>;
  constexpr int BLOCK_K = Smem::BLOCK_K;
  constexpr int MATH_GROUPS = BLOCK_M / 64;
  constexpr int MATH_THREADS = MATH_GROUPS * 128;
  constexpr int ACC = BLOCK_N / 2;  // f32 accumulator registers per thread for m64 x BLOCK_N
  // Tiles that may meet two weight scale blocks pick a scale per 8 columns.
  constexpr bool TWO_SCALE_BLOCKS = !B_ROW_SCALES && 128 % BLOCK_N != 0;

  extern __shared__ u8 smem_raw[];
  // 128-byte swizzled TMA tiles need 1024-byte alignment; the launch adds 1 KiB of slack.
  u8* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  u64* full = reinterpret_cast<u64*>(smem + Smem::BAR_OFFSET);
  u64* empty = full + STAGES;

  // The cluster computes CLUSTER_M vertically adjacent tiles together: a "unit". Units are what
  // the schedule numbers; this CTA's tile is row `rank` of its unit.
  const int rank = CLUSTER_M > 1 ? static_cast<int>(cluster_cta_rank()) : 0;
  const int m_blocks = ceil_div(m, BLOCK_M);
  const int n_blocks = ceil_div(n, BLOCK_N);
  const int num_units = (K_GROUPED ? groups : 1) * ceil_div(m_blocks, CLUSTER_M) * n_blocks;
  const UnitWalk walk = unit_walk(blockIdx.x, gridDim.x, CLUSTER_M);
  const int num_k_blocks = ceil_div(k, BLOCK_K);
  // This CTA's tile of a unit; producer and math warps walk the same units, skip the same padding
  // blocks and sum the same K blocks.
  auto tile_of = [&](int unit) {
    if (K_GROUPED) {
      const GroupTilePosition at = group_unit_tile(unit, m_blocks, n_blocks, raster_band);
      const KBlocks k_blocks = group_k_blocks(__ldg(k_offsets + at.group), __ldg(k_offsets + at.group + 1));
      return Tile{at.tile.m_block * BLOCK_M, at.tile.n_block * BLOCK_N, at.group, k_blocks};
    }
    const TilePosition at = unit_tile(unit, rank, m_blocks, n_blocks, raster_band, CLUSTER_M);
    const int m0 = at.m_block * BLOCK_M;
    return Tile{m0, at.n_block * BLOCK_N, CONTIGUOUS ? block_expert[m0 / Grouped::M_ALIGN] : 0,
                KBlocks{0, num_k_blocks}};
  };

  if (threadIdx.x == 0) {
    tma_prefetch_descriptor(tmap_a);
    tma_prefetch_descriptor(tmap_b);
    tma_prefetch_descriptor(tmap_scale_a);
    if (B_ROW_SCALES) tma_prefetch_descriptor(tmap_scale_b);
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], CLUSTER_M * MATH_THREADS / 32);  // one arrival per math warp of the cluster
    }
    mbarrier_init_fence();
  }
  // The peer multicasts into this CTA's buffers and arrives on its barriers: both must exist first.
  if (CLUSTER_M > 1) {
    cluster_sync();
  } else {
    __syncthreads();
  }

  if (threadIdx.x >= MATH_THREADS) {
    // ---- producer warp group: one thread issues every TMA load ----
    if (MATH_GROUPS == 2) setmaxnreg_dec<40>();
    if (threadIdx.x == MATH_THREADS) {
      RingCursor<STAGES> ring;
      for (int unit = walk.first; unit < num_units; unit += walk.stride) {
        const Tile tile = tile_of(unit);
        if (tile.group < 0) continue;
        const int m0 = tile.m0;
        const int n0 = tile.n0;
        // Contiguous: each expert's B is N rows of [experts * N]; K-grouped: one B for all groups.
        const int b_row0 = (CONTIGUOUS ? tile.group * n : 0) + n0;
        // A cluster's tile past M (an odd last row block) reads the last real rows instead; its
        // epilogue writes nothing.
        const int a_row0 = min(m0, (m_blocks - 1) * BLOCK_M);
        for (int kb = 0; kb < tile.k.count; ++kb, ring.advance()) {
          const int s = ring.stage;
          const int k_block = tile.k.first + kb;
          // A fresh barrier is in phase 0: the first wait on each `empty` (parity 1) returns at once.
          mbarrier_wait(&empty[s], ring.phase ^ 1);
          mbarrier_arrive_expect_tx(&full[s], Smem::TX_BYTES);
          tma_load_2d(smem + Smem::A_OFFSET + s * Smem::A_BYTES, tmap_a, &full[s], k_block * BLOCK_K, a_row0);
          u8* b_stage = smem + Smem::B_OFFSET + s * Smem::B_BYTES;
          if (CLUSTER_M == 1) {
            tma_load_2d(b_stage, tmap_b, &full[s], k_block * BLOCK_K, b_row0);
          } else {
            // This CTA's half of the B tile (the tensor map's box is half as tall), into both CTAs.
            // A half wholly past N (the last column block's) reads the last real row's box
            // instead, as A past M does: its columns are never stored.
            constexpr int HALF_ROWS = BLOCK_N / 2;
            const int half_row0 = min(b_row0 + rank * HALF_ROWS, n - 1);
            tma_load_2d_multicast(b_stage + rank * HALF_ROWS * BLOCK_K, tmap_b, &full[s], k_block * BLOCK_K,
                                  half_row0, 0b11);
          }
          tma_load_2d(smem + Smem::SA_OFFSET + s * Smem::SA_BYTES, tmap_scale_a, &full[s], a_row0, k_block);
          if (B_ROW_SCALES) {
            tma_load_2d(smem + Smem::SB_OFFSET + s * Smem::SB_BYTES, tmap_scale_b, &full[s], n0, k_block);
          }
        }
      }
      if (CLUSTER_M > 1) {
        // The peer's math warps arrive on this CTA's `empty` barriers until their last stage:
        // wait for every arrival of the last STAGES uses before the CTA (and its barriers) may go.
        for (int i = 0; i < STAGES; ++i, ring.advance()) mbarrier_wait(&empty[ring.stage], ring.phase ^ 1);
      }
    }
    return;
  }

  // ---- math warp groups ----
  if (MATH_GROUPS == 2) setmaxnreg_inc<232>();
  const int group = threadIdx.x / 128;
  const int warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x % 32;
  // Accumulator fragment of wgmma m64nN (as mma.sync's, per 8 columns): register 4j+{0,1} holds
  // row r0, columns 8j+2t+{0,1}; 4j+{2,3} row r0+8.
  const int r0 = group * 64 + warp * 16 + lane / 4;
  const int c0 = 2 * (lane % 4);
  const int num_scale_n = ceil_div(n, 128);

  RingCursor<STAGES> ring;
  for (int unit = walk.first; unit < num_units; unit += walk.stride) {
    const Tile tile = tile_of(unit);
    if (tile.group < 0) continue;
    const int m0 = tile.m0;
    const int n0 = tile.n0;
    // The weight scale blocks the tile's columns meet: the first, and (if any) the next (never
    // K-grouped, whose B scales are per row).
    const int scale_n0 = n0 / 128;
    const float* scale_b_first =
        B_ROW_SCALES ? nullptr
                     : scale_b + (static_cast<long long>(tile.group) * num_scale_n + scale_n0) * num_k_blocks;
    const float* scale_b_second =
        TWO_SCALE_BLOCKS && scale_n0 + 1 < num_scale_n ? scale_b_first + num_k_blocks : scale_b_first;

    float acc[ACC];
    float result[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) result[i] = 0.0f;

    // A K-grouped tile of an empty group runs no K block: its result stays zero.
    for (int kb = 0; kb < tile.k.count; ++kb, ring.advance()) {
      const int s = ring.stage;
      // The weight blocks' scales do not depend on TMA: fetch them before waiting.
      const float sb = B_ROW_SCALES ? 1.0f : __ldg(scale_b_first + kb);
      const float sb_next = TWO_SCALE_BLOCKS ? __ldg(scale_b_second + kb) : sb;
      mbarrier_wait(&full[s], ring.phase);

      const u8* a_tile = smem + Smem::A_OFFSET + s * Smem::A_BYTES + group * 64 * BLOCK_K;
      const u8* b_tile = smem + Smem::B_OFFSET + s * Smem::B_BYTES;
#pragma unroll
      for (int i = 0; i < ACC; ++i) fence_operand(acc[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BLOCK_K / 32; ++kk) {
        Wgmma::mma(acc, wgmma_desc_k_major_sw128(a_tile + kk * 32), wgmma_desc_k_major_sw128(b_tile + kk * 32),
                   kk > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int i = 0; i < ACC; ++i) fence_operand(acc[i]);
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < ACC; ++i) fence_operand(acc[i]);

      const float* sa_tile = reinterpret_cast<const float*>(smem + Smem::SA_OFFSET + s * Smem::SA_BYTES);
      const float sa0 = sa_tile[r0];
      const float sa1 = sa_tile[r0 + 8];
      if (B_ROW_SCALES) {
        const float* sb_tile = reinterpret_cast<const float*>(smem + Smem::SB_OFFSET + s * Smem::SB_BYTES);
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
          const float2 sbc = *reinterpret_cast<const float2*>(sb_tile + 8 * j + c0);
          result[4 * j + 0] += acc[4 * j + 0] * (sa0 * sbc.x);
          result[4 * j + 1] += acc[4 * j + 1] * (sa0 * sbc.y);
          result[4 * j + 2] += acc[4 * j + 2] * (sa1 * sbc.x);
          result[4 * j + 3] += acc[4 * j + 3] * (sa1 * sbc.y);
        }
      } else {
        const float s0 = sa0 * sb;
        const float s1 = sa1 * sb;
        const float s0_next = sa0 * sb_next;
        const float s1_next = sa1 * sb_next;
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
          // Scale blocks start at multiples of 128 and tiles at multiples of 16: no 8 columns
          // straddle a boundary.
          const bool first = !TWO_SCALE_BLOCKS || in_first_scale_block(n0, 8 * j);
          const float row0_scale = first ? s0 : s0_next;
          const float row1_scale = first ? s1 : s1_next;
          result[4 * j + 0] += acc[4 * j + 0] * row0_scale;
          result[4 * j + 1] += acc[4 * j + 1] * row0_scale;
          result[4 * j + 2] += acc[4 * j + 2] * row1_scale;
          result[4 * j + 3] += acc[4 * j + 3] * row1_scale;
        }
      }
      // Every read of this stage (wgmma operands, scales) is done: hand the buffer back (to both
      // CTAs of a cluster: either's producer refills it in both).
      __syncwarp();
      if (lane == 0) {
        if (CLUSTER_M == 1) {
          mbarrier_arrive(&empty[s]);
        } else {
#pragma unroll
          for (int cta = 0; cta < CLUSTER_M; ++cta) mbarrier_arrive_cluster(&empty[s], cta);
        }
      }
    }

    // ---- epilogue: registers straight to global memory (row-major D, leading dimension n; with
    // SCATTER, row r of the product is D's row out_rows[r], and nowhere where that is -1; a K
    // group's D follows the previous group's) ----
    const long long d_offset = K_GROUPED ? static_cast<long long>(tile.group) * m * n : 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + r0 + 8 * half;
      if (row >= m) continue;
      const int out_row = SCATTER ? out_rows[row] : row;
      if (out_row < 0) continue;
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
        const int col = n0 + 8 * j + c0;
        if (col >= n) continue;
        const float v0 = result[4 * j + 2 * half];
        const float v1 = result[4 * j + 2 * half + 1];
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
