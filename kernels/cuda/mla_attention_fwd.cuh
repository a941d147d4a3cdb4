// Causal MLA attention forward (training form, not the absorbed inference form), flash-attention
// style in BF16 with mma.sync m16n8k16 and an FP32 online softmax.
//
//   q      [B][T][H][D_NOPE + D_ROPE]   (RoPE already applied to the last D_ROPE channels)
//   k_nope [B][T][H][D_NOPE]            per-head key part
//   k_rope [B][T][D_ROPE]               one RoPE'd key shared by every head
//   v      [B][T][H][D_V]
//   o      [B][T][H][D_V]               softmax(scale * q k^T, causal) v
//   lse    [B][H][T] f32                natural-log sum of exp(scale * q k^T) per query (backward)
//
// Grid (ceil(T / BLOCK_M), H, B), heaviest query blocks first; BLOCK_M / 16 warps, each owning 16
// query rows end to end (its Q fragments stay in registers); key/value tiles of BLOCK_N rows are
// staged with cp.async into padded shared memory and read with ldmatrix.
#pragma once

namespace fathom {

template <int D_NOPE, int D_ROPE, int D_V, int BLOCK_M, int BLOCK_N>
struct MlaFwdSmem {
  static constexpr int D_QK = D_NOPE + D_ROPE;
  static constexpr int QK_STRIDE = D_QK + 8;  // bf16 elements; +16 bytes per row: no ldmatrix conflicts
  static constexpr int V_STRIDE = D_V + 8;
  static constexpr int Q_ELEMS = BLOCK_M * QK_STRIDE;
  static constexpr int K_ELEMS = BLOCK_N * QK_STRIDE;
  static constexpr int V_ELEMS = BLOCK_N * V_STRIDE;
  static constexpr int BYTES = (Q_ELEMS + K_ELEMS + V_ELEMS) * 2;
};

template <int D_NOPE, int D_ROPE, int D_V, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ void mla_attention_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k_nope,
                                                  const bf16* __restrict__ k_rope, const bf16* __restrict__ v,
                                                  bf16* __restrict__ o, float* __restrict__ lse, int seq_len,
                                                  int heads, float softmax_scale) {
  using Smem = MlaFwdSmem<D_NOPE, D_ROPE, D_V, BLOCK_M, BLOCK_N>;
  constexpr int D_QK = Smem::D_QK;
  constexpr int THREADS = BLOCK_M / 16 * 32;
  static_assert(D_NOPE % 16 == 0 && D_ROPE % 16 == 0 && D_V % 16 == 0, "head dims are multiples of 16");
  static_assert(BLOCK_M % 16 == 0 && BLOCK_N % 16 == 0, "tiles are multiples of 16");

  extern __shared__ __align__(16) u8 smem_raw[];
  bf16* sq = reinterpret_cast<bf16*>(smem_raw);
  bf16* sk = sq + Smem::Q_ELEMS;
  bf16* sv = sk + Smem::K_ELEMS;

  const int q_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int q0 = q_block * BLOCK_M;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const long long bt = static_cast<long long>(b) * seq_len;  // first token of this sequence

  stage_rows<BLOCK_M, D_QK, THREADS>(sq, Smem::QK_STRIDE, q0, seq_len,
                                     [&](int t) { return q + ((bt + t) * heads + h) * D_QK; });
  cp_async_commit();

  const float scale_log2 = softmax_scale * 1.4426950408889634f;
  // Rows of this thread: ra = q0 + 16 warp + lane/4 and ra + 8.
  const int ra = q0 + warp * 16 + lane / 4;
  float row_max[2] = {neg_inf(), neg_inf()};
  float row_sum[2] = {0.0f, 0.0f};
  float acc_o[D_V / 8][4];
#pragma unroll
  for (int j = 0; j < D_V / 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_o[j][r] = 0.0f;
  u32 qf[D_QK / 16][4];

  // Causal: keys up to the block's last query.
  const int kv_end = min(seq_len, q0 + BLOCK_M);
  const int num_kv_blocks = ceil_div(kv_end, BLOCK_N);
  for (int kvb = 0; kvb < num_kv_blocks; ++kvb) {
    const int k0 = kvb * BLOCK_N;
    __syncthreads();  // the previous iteration has finished reading sk / sv
    stage_rows<BLOCK_N, D_NOPE, THREADS>(sk, Smem::QK_STRIDE, k0, seq_len,
                                         [&](int t) { return k_nope + ((bt + t) * heads + h) * D_NOPE; });
    stage_rows<BLOCK_N, D_ROPE, THREADS>(sk + D_NOPE, Smem::QK_STRIDE, k0, seq_len,
                                         [&](int t) { return k_rope + (bt + t) * D_ROPE; });
    cp_async_commit();
    stage_rows<BLOCK_N, D_V, THREADS>(sv, Smem::V_STRIDE, k0, seq_len,
                                      [&](int t) { return v + ((bt + t) * heads + h) * D_V; });
    cp_async_commit();
    cp_async_wait<1>();  // Q and K have landed; V may still be in flight
    __syncthreads();
    if (kvb == 0) {
#pragma unroll
      for (int kk = 0; kk < D_QK / 16; ++kk) ldmatrix_x4(qf[kk], ldsm_a_addr(sq, Smem::QK_STRIDE, warp * 16, 16 * kk));
    }

    // S = Q K^T for this warp's 16 rows.
    float s[BLOCK_N / 8][4];
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[j][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D_QK / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; j += 2) {
        u32 kf[4];
        ldmatrix_x4(kf, ldsm_bt_addr(sk, Smem::QK_STRIDE, 8 * j, 16 * kk));
        mma_bf16_16816(s[j], qf[kk], kf[0], kf[1]);
        mma_bf16_16816(s[j + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Causal / length mask and online softmax in the log2 domain.
    float block_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = ra + 8 * (r / 2);
        const int col = k0 + 8 * j + 2 * (lane % 4) + (r % 2);
        const bool keep = col <= row && col < seq_len;
        s[j][r] = keep ? s[j][r] * scale_log2 : neg_inf();
        block_max[r / 2] = fmaxf(block_max[r / 2], s[j][r]);
      }
    }
    float correction[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float new_max = fmaxf(row_max[i], quad_max(block_max[i]));
      // A row with nothing unmasked yet keeps max -inf: use 0 so that exp2 gives 0, not NaN.
      const float base = new_max == neg_inf() ? 0.0f : new_max;
      correction[i] = exp2f(row_max[i] - base);
      row_max[i] = new_max;
      row_sum[i] *= correction[i];
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
        s[j][2 * i] = exp2f(s[j][2 * i] - base);
        s[j][2 * i + 1] = exp2f(s[j][2 * i + 1] - base);
        row_sum[i] += s[j][2 * i] + s[j][2 * i + 1];
      }
    }
#pragma unroll
    for (int j = 0; j < D_V / 8; ++j) {
      acc_o[j][0] *= correction[0];
      acc_o[j][1] *= correction[0];
      acc_o[j][2] *= correction[1];
      acc_o[j][3] *= correction[1];
    }

    cp_async_wait<0>();
    __syncthreads();
    // O += P V, P (bf16) taken straight from the S registers.
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      u32 pf[4];
      acc_to_a_frag(pf, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < D_V / 8; j += 2) {
        u32 vf[4];
        ldmatrix_x4_trans(vf, ldsm_b_addr(sv, Smem::V_STRIDE, 16 * kk, 8 * j));
        mma_bf16_16816(acc_o[j], pf, vf[0], vf[1]);
        mma_bf16_16816(acc_o[j + 1], pf, vf[2], vf[3]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float total = quad_sum(row_sum[i]);
    const int row = ra + 8 * i;
    if (row >= seq_len) continue;
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    bf16* o_row = o + ((bt + row) * heads + h) * D_V;
#pragma unroll
    for (int j = 0; j < D_V / 8; ++j) {
      *reinterpret_cast<__nv_bfloat162*>(o_row + 8 * j + 2 * (lane % 4)) =
          __floats2bfloat162_rn(acc_o[j][2 * i] * inv, acc_o[j][2 * i + 1] * inv);
    }
    if (lane % 4 == 0) {
      lse[(static_cast<long long>(b) * heads + h) * seq_len + row] = (row_max[i] + log2f(total)) * 0.6931471805599453f;
    }
  }
}

}  // namespace fathom
