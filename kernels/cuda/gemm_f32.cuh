// f32 GEMMs on CUDA cores for the programs that keep their operands in f32: the batched strided
// GEMM of the kernel IR's MatMul, and the grouped expert GEMM with its weight gradient.
//
// One core, `f32_gemm_tile`, computes a BM x BN tile of C = A B, reading A(i, kk) and B(kk, j)
// through operand functors so that strided views (transposes and broadcasts cost nothing) and
// the experts' gathered rows share it. Tiles of A and B are staged in shared memory BK columns of
// K at a time; each thread accumulates a TM x TN block of C in registers. Every output element is
// one fmaf chain over kk = 0, 1, ..., K-1 in order, so results do not depend on the launch.
// Portable to sm_80 and newer.
#pragma once

namespace fathom {

// Which elements of a matrix count (the kernel IR's triangular matmuls): all of them, those on
// and below the diagonal, or those on and above it; the others are read and written as zeros.
enum Keep : int { KEEP_ALL = 0, KEEP_LOWER = 1, KEEP_UPPER = 2 };

__device__ __forceinline__ bool kept(int keep, int r, int c) {
  return keep == KEEP_ALL || (keep == KEEP_LOWER ? c <= r : c >= r);
}

// A matrix operand: element (i, kk) at base[i * row + kk * col], zero outside `keep`.
struct StridedOperand {
  const float* base;
  long long row;
  long long col;
  int keep;
  __device__ __forceinline__ float operator()(int r, int c) const {
    return kept(keep, r, c) ? base[r * row + c * col] : 0.0f;
  }
  // Whether consecutive columns are adjacent in memory (then threads stage along columns).
  __device__ __forceinline__ bool cols_contiguous() const { return col == 1; }
};

// Stages a ROWS x COLS tile of `op` at (r0, c0) into shared memory, zero outside rows x cols.
// TRANSPOSE stores element (r, c) at dst[c][r] (A is kept k-major so the inner loop reads rows
// of both tiles). Threads walk the tile along whichever axis is contiguous in memory.
template <int ROWS, int COLS, int STRIDE, int THREADS, bool TRANSPOSE, class Op>
__device__ __forceinline__ void stage_tile(float* dst, const Op& op, int r0, int c0, int rows, int cols) {
  const bool along_cols = op.cols_contiguous();
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += THREADS) {
    const int r = along_cols ? idx / COLS : idx % ROWS;
    const int c = along_cols ? idx % COLS : idx / ROWS;
    const bool valid = r0 + r < rows && c0 + c < cols;
    const float v = valid ? op(r0 + r, c0 + c) : 0.0f;
    if (TRANSPOSE) {
      dst[c * STRIDE + r] = v;
    } else {
      dst[r * STRIDE + c] = v;
    }
  }
}

// C[m0 .. m0+BM) x [n0 .. n0+BN) of C = A B (A: m x k, B: k x n), each element handed to
// store(i, j, value) when inside m x n. Thread t owns rows ty + p * (BM / TM) and columns
// tx + q * (BN / TN): interleaved, so a warp's shared-memory reads hit distinct banks.
template <int BM, int BN, int BK, int TM, int TN, class A, class B, class Store>
__device__ __forceinline__ void f32_gemm_tile(int m0, int n0, int m, int n, int k, const A& a, const B& b,
                                              const Store& store) {
  constexpr int COLS_T = BN / TN;  // threads along N
  constexpr int ROWS_T = BM / TM;  // threads along M
  constexpr int THREADS = COLS_T * ROWS_T;
  constexpr int A_STRIDE = BM + 4;  // padding against bank conflicts on the transposed stores
  constexpr int B_STRIDE = BN + 4;
  __shared__ float a_tile[BK * A_STRIDE];
  __shared__ float b_tile[BK * B_STRIDE];
  const int tx = threadIdx.x % COLS_T;
  const int ty = threadIdx.x / COLS_T;
  float acc[TM][TN];
#pragma unroll
  for (int p = 0; p < TM; ++p) {
#pragma unroll
    for (int q = 0; q < TN; ++q) acc[p][q] = 0.0f;
  }
  for (int k0 = 0; k0 < k; k0 += BK) {
    stage_tile<BM, BK, A_STRIDE, THREADS, true>(a_tile, a, m0, k0, m, k);
    stage_tile<BK, BN, B_STRIDE, THREADS, false>(b_tile, b, k0, n0, k, n);
    __syncthreads();
    // Past K both tiles hold zeros: the extra fmaf(0, 0, acc) leave acc unchanged.
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float av[TM];
      float bv[TN];
#pragma unroll
      for (int p = 0; p < TM; ++p) av[p] = a_tile[kk * A_STRIDE + ty + p * ROWS_T];
#pragma unroll
      for (int q = 0; q < TN; ++q) bv[q] = b_tile[kk * B_STRIDE + tx + q * COLS_T];
#pragma unroll
      for (int p = 0; p < TM; ++p) {
#pragma unroll
        for (int q = 0; q < TN; ++q) acc[p][q] = fmaf(av[p], bv[q], acc[p][q]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < TM; ++p) {
    const int i = m0 + ty + p * ROWS_T;
#pragma unroll
    for (int q = 0; q < TN; ++q) {
      const int j = n0 + tx + q * COLS_T;
      if (i < m && j < n) store(i, j, acc[p][q]);
    }
  }
}

// Up to three batch axes of a strided operand (unused axes have extent 1 and stride 0).
struct BatchStrides {
  long long s0, s1, s2;
  __device__ __forceinline__ long long offset(int b0, int b1, int b2) const { return b0 * s0 + b1 * s1 + b2 * s2; }
};

struct StridedStore {
  float* base;
  long long row;
  long long col;
  int keep;
  __device__ __forceinline__ void operator()(int i, int j, float v) const {
    base[i * row + j * col] = kept(keep, i, j) ? v : 0.0f;
  }
};

// out[b] = a[b] b[b] for every batch index b of the [d0][d1][d2] batch, views given by strides;
// each matrix's `keep` makes it triangular (a triangular operand reads zeros outside its
// triangle, a triangular result is written as zeros there; the tiles are computed all the same).
// Grid: (ceil(n / BN), ceil(m / BM), min(batches, 65535)); blocks loop over the rest of the batch.
template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void batched_gemm_f32(const float* a, const float* b, float* out, int m, int n, int k,
                                                 int d0, int d1, int d2, BatchStrides a_batch, long long a_row,
                                                 long long a_col, BatchStrides b_batch, long long b_row,
                                                 long long b_col, BatchStrides out_batch, long long out_row,
                                                 long long out_col, int a_keep, int b_keep, int out_keep) {
  const int batches = d0 * d1 * d2;
  for (int bi = blockIdx.z; bi < batches; bi += gridDim.z) {
    const int b2 = bi % d2;
    const int b1 = (bi / d2) % d1;
    const int b0 = bi / (d1 * d2);
    const StridedOperand lhs{a + a_batch.offset(b0, b1, b2), a_row, a_col, a_keep};
    const StridedOperand rhs{b + b_batch.offset(b0, b1, b2), b_row, b_col, b_keep};
    const StridedStore dst{out + out_batch.offset(b0, b1, b2), out_row, out_col, out_keep};
    f32_gemm_tile<BM, BN, BK, TM, TN>(blockIdx.y * BM, blockIdx.x * BN, m, n, k, lhs, rhs, dst);
  }
}

// ---- grouped (mixture-of-experts) GEMMs ----
//
// The token-slots routed to expert e are members[offsets[e] .. offsets[e + 1]) in increasing
// order (written by `group_rows`, index_ops.cuh). Token-slot ts = t * slots + s reads x row
// t * x_slots + (x_slots == 1 ? 0 : s): one x row may serve every slot of its token.

__device__ __forceinline__ long long x_row_of(int ts, int slots, int x_slots) {
  return x_slots == 1 ? ts / slots : ts;
}

// A of the forward: row i of the tile is the i-th member's x row (k contiguous).
struct GatheredRows {
  const float* x;
  const int* members;
  int k, slots, x_slots;
  __device__ __forceinline__ float operator()(int r, int c) const {
    return x[x_row_of(members[r], slots, x_slots) * k + c];
  }
  __device__ __forceinline__ bool cols_contiguous() const { return true; }
};

// out[ts, :] = W[e] x[ts] for the token-slots of each expert e, W stored as one n*k block per
// expert with W[e][j][kk] at e*n*k + j*w_sn + kk*w_sk ([n][k] blocks: w_sn = k, w_sk = 1; the
// transposed blocks the input gradient reads: w_sn = 1, w_sk = n): per expert a GEMM of its
// members' rows (m = count) with B = W[e]^T. Block rows are numbered across
// experts (expert 0's ceil(count_0 / BM) tiles, then expert 1's, ...); the grid has
// ceil(tokens * slots / BM) + experts rows of blocks, which covers any routing, and blocks past
// the last tile return at once. Grid: (ceil(n / BN), that bound).
template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void grouped_gemm_f32(const float* x, const float* w, const int* offsets,
                                                 const int* members, float* out, int experts, int slots,
                                                 int x_slots, int n, int k, int w_sn, int w_sk) {
  int e = 0;
  int tile = blockIdx.y;
  for (; e < experts; ++e) {
    const int tiles = (offsets[e + 1] - offsets[e] + BM - 1) / BM;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (e == experts) return;
  const int first = offsets[e];
  const int count = offsets[e + 1] - first;
  const GatheredRows lhs{x, members + first, k, slots, x_slots};
  // B(kk, j) = W[e][j][kk].
  const StridedOperand rhs{w + static_cast<long long>(e) * n * k, w_sk, w_sn, KEEP_ALL};
  const int* rows = members + first;
  auto store = [&](int i, int j, float v) { out[static_cast<long long>(rows[i]) * n + j] = v; };
  f32_gemm_tile<BM, BN, BK, TM, TN>(tile * BM, blockIdx.x * BN, count, n, k, lhs, rhs, store);
}

// A of the weight gradient: A(i, kk) = cotangent[members[kk]][i] (i along n, contiguous).
struct GatheredCotangentT {
  const float* g;
  const int* members;
  int n;
  __device__ __forceinline__ float operator()(int r, int c) const {
    return g[static_cast<long long>(members[c]) * n + r];
  }
  __device__ __forceinline__ bool cols_contiguous() const { return false; }
};

// out[e] = sum over the members ts of expert e of cotangent[ts]^T x[ts] ([n][k] per expert): a
// GEMM with m = n, n = k and the members as its K, summed in member order. Experts without
// members get zeros. Grid: (ceil(k / BN), ceil(n / BM), experts).
template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void grouped_gemm_weight_grad_f32(const float* g, const float* x, const int* offsets,
                                                             const int* members, float* out, int slots,
                                                             int x_slots, int n, int k) {
  const int e = blockIdx.z;
  const int first = offsets[e];
  const int count = offsets[e + 1] - first;
  const GatheredCotangentT lhs{g, members + first, n};
  // B(kk, j) = x row of member kk, column j: GatheredRows with the roles of rows and columns as
  // in the forward.
  const GatheredRows rhs{x, members + first, k, slots, x_slots};
  float* block = out + static_cast<long long>(e) * n * k;
  auto store = [&](int i, int j, float v) { block[static_cast<long long>(i) * k + j] = v; };
  f32_gemm_tile<BM, BN, BK, TM, TN>(blockIdx.y * BM, blockIdx.x * BN, n, k, count, lhs, rhs, store);
}

}  // namespace fathom
