// Causal MLA attention backward, flash-attention-2 style (BF16 operands, FP32 accumulation),
// with the tensor layouts of mla_attention_fwd.cuh. Two kernels:
//
// 1. mla_attention_bwd_delta: delta[b][h][t] = sum_d dO[b][t][h][d] * O[b][t][h][d]
//    (one warp per (token, head); grid ceil(B*T*H / WARPS)).
// 2. mla_attention_bwd: one CTA per (key block of BLOCK_N, head, batch). Its K/V tile stays in
//    shared memory while it walks the query blocks at or after it (causal); per query block it
//    recomputes P^T = exp(scale * K Q^T - lse), then
//      dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T * (dP^T - delta),
//      dK += scale * dS^T Q,  dQ += scale * dS K (atomically, FP32).
//    Warps: BLOCK_N / 16 key warps x COL_SPLIT; the COL_SPLIT warps of one key slice share its
//    S/dP work and split the dK/dV columns (fewer accumulator registers per thread).
//
// Outputs (FP32): dq [B][T][H][D_QK] and dk_rope [B][T][D_ROPE] are accumulated with atomics and
// must be zeroed first (dk_rope sums over heads: the rope key is shared); dk_nope [B][T][H][D_NOPE]
// and dv [B][T][H][D_V] are written.
#pragma once

namespace fathom {

template <int D_V, int WARPS>
__device__ __forceinline__ void mla_attention_bwd_delta(const bf16* __restrict__ o, const bf16* __restrict__ d_o,
                                                        float* __restrict__ delta, int batch, int seq_len,
                                                        int heads) {
  static_assert(D_V % 64 == 0, "two bf16 per lane per step");
  const long long row = static_cast<long long>(blockIdx.x) * WARPS + threadIdx.x / 32;  // (b*T + t)*H + h
  if (row >= static_cast<long long>(batch) * seq_len * heads) return;
  const int lane = threadIdx.x % 32;
  float sum = 0.0f;
#pragma unroll
  for (int c = 2 * lane; c < D_V; c += 64) {
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + row * D_V + c));
    const float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(d_o + row * D_V + c));
    sum += x.x * y.x + x.y * y.y;
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    const long long h = row % heads;
    const long long bt = row / heads;
    const long long b = bt / seq_len;
    const long long t = bt % seq_len;
    delta[(b * heads + h) * seq_len + t] = sum;
  }
}

template <int D_NOPE, int D_ROPE, int D_V, int BLOCK_M, int BLOCK_N>
struct MlaBwdSmem {
  static constexpr int D_QK = D_NOPE + D_ROPE;
  static constexpr int QK_STRIDE = D_QK + 8;
  static constexpr int V_STRIDE = D_V + 8;
  static constexpr int DS_STRIDE = BLOCK_N + 8;
  static constexpr int K_ELEMS = BLOCK_N * QK_STRIDE;
  static constexpr int V_ELEMS = BLOCK_N * V_STRIDE;
  static constexpr int Q_ELEMS = BLOCK_M * QK_STRIDE;
  static constexpr int DO_ELEMS = BLOCK_M * V_STRIDE;
  static constexpr int DS_ELEMS = BLOCK_M * DS_STRIDE;
  static constexpr int BF16_ELEMS = K_ELEMS + V_ELEMS + Q_ELEMS + DO_ELEMS + DS_ELEMS;
  static constexpr int BYTES = BF16_ELEMS * 2 + 2 * BLOCK_M * 4;
};

template <int D_NOPE, int D_ROPE, int D_V, int BLOCK_M, int BLOCK_N, int COL_SPLIT>
__device__ __forceinline__ void mla_attention_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k_nope,
                                                  const bf16* __restrict__ k_rope, const bf16* __restrict__ v,
                                                  const bf16* __restrict__ d_o, const float* __restrict__ lse,
                                                  const float* __restrict__ delta, float* __restrict__ dq,
                                                  float* __restrict__ dk_nope, float* __restrict__ dk_rope,
                                                  float* __restrict__ dv, int seq_len, int heads,
                                                  float softmax_scale) {
  using Smem = MlaBwdSmem<D_NOPE, D_ROPE, D_V, BLOCK_M, BLOCK_N>;
  constexpr int D_QK = Smem::D_QK;
  constexpr int KEY_WARPS = BLOCK_N / 16;
  constexpr int WARPS = KEY_WARPS * COL_SPLIT;
  constexpr int THREADS = WARPS * 32;
  constexpr int DK_COLS = D_QK / COL_SPLIT;
  constexpr int DV_COLS = D_V / COL_SPLIT;
  constexpr int DQ_CHUNK = D_QK % 64 == 0 ? 64 : (D_QK % 32 == 0 ? 32 : 16);
  static_assert(D_NOPE % 16 == 0 && D_ROPE % 16 == 0 && D_V % 16 == 0, "head dims are multiples of 16");
  static_assert(BLOCK_M % 16 == 0 && BLOCK_N % 16 == 0, "tiles are multiples of 16");
  static_assert(DK_COLS % 16 == 0 && DV_COLS % 16 == 0, "COL_SPLIT leaves 16-column multiples");

  extern __shared__ __align__(16) u8 smem_raw[];
  bf16* sk = reinterpret_cast<bf16*>(smem_raw);
  bf16* sv = sk + Smem::K_ELEMS;
  bf16* sq = sv + Smem::V_ELEMS;
  bf16* sdo = sq + Smem::Q_ELEMS;
  bf16* sds = sdo + Smem::DO_ELEMS;
  float* s_lse = reinterpret_cast<float*>(sds + Smem::DS_ELEMS);  // log2 domain
  float* s_delta = s_lse + BLOCK_M;

  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int k0 = blockIdx.x * BLOCK_N;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int kw = warp % KEY_WARPS;  // key slice: rows k0 + 16 kw ..
  const int part = warp / KEY_WARPS;  // which dK/dV column range
  const long long bt = static_cast<long long>(b) * seq_len;
  const float scale_log2 = softmax_scale * 1.4426950408889634f;
  const int ka = k0 + kw * 16 + lane / 4;  // this thread's keys: ka, ka + 8

  stage_rows<BLOCK_N, D_NOPE, THREADS>(sk, Smem::QK_STRIDE, k0, seq_len,
                                       [&](int t) { return k_nope + ((bt + t) * heads + h) * D_NOPE; });
  stage_rows<BLOCK_N, D_ROPE, THREADS>(sk + D_NOPE, Smem::QK_STRIDE, k0, seq_len,
                                       [&](int t) { return k_rope + (bt + t) * D_ROPE; });
  stage_rows<BLOCK_N, D_V, THREADS>(sv, Smem::V_STRIDE, k0, seq_len,
                                    [&](int t) { return v + ((bt + t) * heads + h) * D_V; });
  cp_async_commit();

  float acc_dk[DK_COLS / 8][4];
  float acc_dv[DV_COLS / 8][4];
#pragma unroll
  for (int j = 0; j < DK_COLS / 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_dk[j][r] = 0.0f;
#pragma unroll
  for (int j = 0; j < DV_COLS / 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_dv[j][r] = 0.0f;

  const int num_q_blocks = ceil_div(seq_len, BLOCK_M);
  for (int qb = k0 / BLOCK_M; qb < num_q_blocks; ++qb) {
    const int q0 = qb * BLOCK_M;
    __syncthreads();  // the previous query block is done with sq, sdo, sds, s_lse, s_delta
    stage_rows<BLOCK_M, D_QK, THREADS>(sq, Smem::QK_STRIDE, q0, seq_len,
                                       [&](int t) { return q + ((bt + t) * heads + h) * D_QK; });
    stage_rows<BLOCK_M, D_V, THREADS>(sdo, Smem::V_STRIDE, q0, seq_len,
                                      [&](int t) { return d_o + ((bt + t) * heads + h) * D_V; });
    cp_async_commit();
    for (int i = threadIdx.x; i < BLOCK_M; i += THREADS) {
      const bool valid = q0 + i < seq_len;
      const long long idx = (static_cast<long long>(b) * heads + h) * seq_len + q0 + i;
      s_lse[i] = valid ? lse[idx] * 1.4426950408889634f : 0.0f;
      s_delta[i] = valid ? delta[idx] : 0.0f;
    }
    cp_async_wait<0>();
    __syncthreads();

    // S^T = K Q^T for this warp's 16 keys, then P^T (masked: causal, sequence end).
    float st[BLOCK_M / 8][4];
#pragma unroll
    for (int j = 0; j < BLOCK_M / 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) st[j][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D_QK / 16; ++kk) {
      u32 kf[4];
      ldmatrix_x4(kf, ldsm_a_addr(sk, Smem::QK_STRIDE, kw * 16, 16 * kk));
#pragma unroll
      for (int j = 0; j < BLOCK_M / 8; j += 2) {
        u32 qf[4];
        ldmatrix_x4(qf, ldsm_bt_addr(sq, Smem::QK_STRIDE, 8 * j, 16 * kk));
        mma_bf16_16816(st[j], kf, qf[0], qf[1]);
        mma_bf16_16816(st[j + 1], kf, qf[2], qf[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < BLOCK_M / 8; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int key = ka + 8 * (r / 2);
        const int ql = 8 * j + 2 * (lane % 4) + (r % 2);
        const int query = q0 + ql;
        const bool keep = query >= key && query < seq_len && key < seq_len;
        st[j][r] = keep ? exp2f(st[j][r] * scale_log2 - s_lse[ql]) : 0.0f;
      }
    }

    // dP^T = V dO^T.
    float dpt[BLOCK_M / 8][4];
#pragma unroll
    for (int j = 0; j < BLOCK_M / 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) dpt[j][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D_V / 16; ++kk) {
      u32 vf[4];
      ldmatrix_x4(vf, ldsm_a_addr(sv, Smem::V_STRIDE, kw * 16, 16 * kk));
#pragma unroll
      for (int j = 0; j < BLOCK_M / 8; j += 2) {
        u32 df[4];
        ldmatrix_x4(df, ldsm_bt_addr(sdo, Smem::V_STRIDE, 8 * j, 16 * kk));
        mma_bf16_16816(dpt[j], vf, df[0], df[1]);
        mma_bf16_16816(dpt[j + 1], vf, df[2], df[3]);
      }
    }

    // dV += P^T dO (this warp's column range).
#pragma unroll
    for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
      u32 pf[4];
      acc_to_a_frag(pf, st[2 * kk], st[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < DV_COLS / 8; j += 2) {
        u32 df[4];
        ldmatrix_x4_trans(df, ldsm_b_addr(sdo, Smem::V_STRIDE, 16 * kk, part * DV_COLS + 8 * j));
        mma_bf16_16816(acc_dv[j], pf, df[0], df[1]);
        mma_bf16_16816(acc_dv[j + 1], pf, df[2], df[3]);
      }
    }

    // dS^T = P^T * (dP^T - delta), in place.
#pragma unroll
    for (int j = 0; j < BLOCK_M / 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) st[j][r] *= dpt[j][r] - s_delta[8 * j + 2 * (lane % 4) + (r % 2)];

    // dK += dS^T Q (scaled at the end).
#pragma unroll
    for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
      u32 sf[4];
      acc_to_a_frag(sf, st[2 * kk], st[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < DK_COLS / 8; j += 2) {
        u32 qf[4];
        ldmatrix_x4_trans(qf, ldsm_b_addr(sq, Smem::QK_STRIDE, 16 * kk, part * DK_COLS + 8 * j));
        mma_bf16_16816(acc_dk[j], sf, qf[0], qf[1]);
        mma_bf16_16816(acc_dk[j + 1], sf, qf[2], qf[3]);
      }
    }

    // dS as [query][key] in shared memory for dQ (the COL_SPLIT copies are identical).
    if (part == 0) {
#pragma unroll
      for (int j = 0; j < BLOCK_M / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          sds[(8 * j + 2 * (lane % 4) + (r % 2)) * Smem::DS_STRIDE + kw * 16 + lane / 4 + 8 * (r / 2)] =
              __float2bfloat16_rn(st[j][r]);
    }
    __syncthreads();

    // dQ += scale * dS K, split over all warps in 16-row x DQ_CHUNK-column pieces.
    for (int task = warp; task < (BLOCK_M / 16) * (D_QK / DQ_CHUNK); task += WARPS) {
      const int rt = task % (BLOCK_M / 16);
      const int ct = task / (BLOCK_M / 16);
      float acc_dq[DQ_CHUNK / 8][4];
#pragma unroll
      for (int j = 0; j < DQ_CHUNK / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc_dq[j][r] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        u32 sf[4];
        ldmatrix_x4(sf, ldsm_a_addr(sds, Smem::DS_STRIDE, rt * 16, 16 * kk));
#pragma unroll
        for (int j = 0; j < DQ_CHUNK / 8; j += 2) {
          u32 kf[4];
          ldmatrix_x4_trans(kf, ldsm_b_addr(sk, Smem::QK_STRIDE, 16 * kk, ct * DQ_CHUNK + 8 * j));
          mma_bf16_16816(acc_dq[j], sf, kf[0], kf[1]);
          mma_bf16_16816(acc_dq[j + 1], sf, kf[2], kf[3]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int query = q0 + rt * 16 + lane / 4 + 8 * i;
        if (query >= seq_len) continue;
        float* dq_row = dq + ((bt + query) * heads + h) * D_QK + ct * DQ_CHUNK + 2 * (lane % 4);
#pragma unroll
        for (int j = 0; j < DQ_CHUNK / 8; ++j) {
          atomicAdd(dq_row + 8 * j, acc_dq[j][2 * i] * softmax_scale);
          atomicAdd(dq_row + 8 * j + 1, acc_dq[j][2 * i + 1] * softmax_scale);
        }
      }
    }
  }

  // dK (nope part per head, rope part summed over heads) and dV.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = ka + 8 * i;
    if (key >= seq_len) continue;
#pragma unroll
    for (int j = 0; j < DK_COLS / 8; ++j) {
      const int col = part * DK_COLS + 8 * j + 2 * (lane % 4);
      const float g0 = acc_dk[j][2 * i] * softmax_scale;
      const float g1 = acc_dk[j][2 * i + 1] * softmax_scale;
      if (col < D_NOPE) {
        *reinterpret_cast<float2*>(dk_nope + ((bt + key) * heads + h) * D_NOPE + col) = make_float2(g0, g1);
      } else {
        float* dst = dk_rope + (bt + key) * D_ROPE + col - D_NOPE;
        atomicAdd(dst, g0);
        atomicAdd(dst + 1, g1);
      }
    }
#pragma unroll
    for (int j = 0; j < DV_COLS / 8; ++j) {
      const int col = part * DV_COLS + 8 * j + 2 * (lane % 4);
      *reinterpret_cast<float2*>(dv + ((bt + key) * heads + h) * D_V + col) =
          make_float2(acc_dv[j][2 * i], acc_dv[j][2 * i + 1]);
    }
  }
}

}  // namespace fathom
