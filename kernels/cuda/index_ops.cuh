// The index-driven library calls of the kernel IR on f32 buffers (integers are stored by value, as
// on the CPU backend): Gather, TakeAlong, IndexAdd, OneHot, TopK, and `group_rows`, the stable
// grouping that IndexAdd and the grouped expert GEMMs build on. Every result is exactly the CPU
// backend's: no float atomics, sums in the CPU's order. Portable to sm_80 and newer.
//
// An index must be an integer in 0..bound, as on the CPU. A kernel meeting one that is not
// records it in `status` (status[0] = the launch's tag, status[1] = the value's bits,
// status[2] = the bound; the first report wins) and carries on with index 0 or without that
// element; the executor reads `status` when the program ends and fails naming the kernel.
#pragma once

namespace fathom {

// Grid-stride loop over `total` elements, with 64-bit indices.
#define FATHOM_FOR_EACH(idx, total)                                                   \
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; \
       idx < (total); idx += static_cast<long long>(gridDim.x) * blockDim.x)

// The integer value of `v` when it is one in 0..bound; otherwise reports it and gives 0.
__device__ __forceinline__ int checked_index(float v, int bound, int* status, int tag, bool* ok = nullptr) {
  const bool valid = v >= 0.0f && v < static_cast<float>(bound) && v == truncf(v);
  if (!valid && atomicCAS(status, 0, tag) == 0) {
    status[1] = __float_as_int(v);
    status[2] = bound;
  }
  if (ok) *ok = valid;
  return valid ? static_cast<int>(v) : 0;
}

// Groups the positions 0..count by their id (ids[i] in 0..groups): afterwards the positions of
// group g are members[offsets[g] .. offsets[g + 1]), in increasing order (a stable counting
// sort), so sums over a group can run in the CPU's order. One block: each thread counts the
// members of a contiguous range of groups, a prefix over the threads gives each range its
// start, and each thread lists its groups' members. O(groups / THREADS * count) reads per
// thread: fine for experts and small tables.
template <int THREADS>
__device__ __forceinline__ void group_rows(const float* __restrict__ ids, int count, int groups, int* __restrict__ offsets,
                                           int* __restrict__ members, int* status, int tag) {
  __shared__ int range_start[THREADS];
  for (int i = threadIdx.x; i < count; i += THREADS) checked_index(ids[i], groups, status, tag);
  const int per_thread = (groups + THREADS - 1) / THREADS;
  const int g0 = min(groups, static_cast<int>(threadIdx.x) * per_thread);
  const int g1 = min(groups, g0 + per_thread);
  int total = 0;
  for (int g = g0; g < g1; ++g) {
    const float id = static_cast<float>(g);
    int members_of_g = 0;
    for (int i = 0; i < count; ++i) members_of_g += ids[i] == id;
    offsets[g + 1] = members_of_g;  // a count until the prefix below
    total += members_of_g;
  }
  range_start[threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int t = 0; t < THREADS; ++t) {
      const int c = range_start[t];
      range_start[t] = run;
      run += c;
    }
    offsets[0] = 0;
  }
  __syncthreads();
  int next = range_start[threadIdx.x];
  for (int g = g0; g < g1; ++g) {
    const float id = static_cast<float>(g);
    for (int i = 0; i < count; ++i) {
      if (ids[i] == id) members[next++] = i;
    }
    offsets[g + 1] = next;
  }
}

// out[p][w] = table[indices[p]][w] for `count` indices into a [rows][width] table.
__device__ __forceinline__ void gather_rows(const float* __restrict__ table, const float* __restrict__ indices,
                                            float* __restrict__ out, long long count, int rows, int width, int* status,
                                            int tag) {
  FATHOM_FOR_EACH(idx, count * width) {
    const long long p = idx / width;
    const int row = checked_index(indices[p], rows, status, tag);
    out[idx] = table[static_cast<long long>(row) * width + idx % width];
  }
}

// NumPy's take_along_axis with x seen as [outer][x_len][inner] and indices/out as
// [outer][len][inner]: out[o][j][i] = x[o][indices[o][j][i]][i].
__device__ __forceinline__ void take_along(const float* __restrict__ x, const float* __restrict__ indices,
                                           float* __restrict__ out, int outer, int len, int inner, int x_len,
                                           int* status, int tag) {
  FATHOM_FOR_EACH(idx, static_cast<long long>(outer) * len * inner) {
    const long long o = idx / (static_cast<long long>(len) * inner);
    const long long i = idx % inner;
    const int chosen = checked_index(indices[idx], x_len, status, tag);
    out[idx] = x[(o * x_len + chosen) * inner + i];
  }
}

// out[r][w] = sum over the positions p of row r (members[offsets[r] .. offsets[r + 1]), from
// group_rows, in increasing order) of values[p][w], starting from 0: one thread per output
// element adding in the CPU backend's order, so the result is the CPU's bit for bit.
__device__ __forceinline__ void index_add(const float* __restrict__ values, const int* __restrict__ offsets,
                                          const int* __restrict__ members, float* __restrict__ out, int rows,
                                          int width) {
  FATHOM_FOR_EACH(idx, static_cast<long long>(rows) * width) {
    const long long r = idx / width;
    const long long w = idx % width;
    float sum = 0.0f;
    for (int m = offsets[r]; m < offsets[r + 1]; ++m) sum += values[static_cast<long long>(members[m]) * width + w];
    out[idx] = sum;
  }
}

// out[p][d] = 1 where indices[p] == d, else 0, for `count` indices and `depth` classes.
__device__ __forceinline__ void one_hot(const float* __restrict__ indices, float* __restrict__ out, long long count,
                                        int depth, int* status, int tag) {
  FATHOM_FOR_EACH(idx, count * depth) {
    const long long p = idx / depth;
    bool valid;
    const int hot = checked_index(indices[p], depth, status, tag, &valid);
    out[idx] = valid && hot == idx % depth ? 1.0f : 0.0f;
  }
}

// Whether (a, ia) ranks before (b, ib) in top-k order: NaN above every number, larger numbers
// first, equal values (and NaNs) by lower position; a strict total order over positions.
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  const bool a_nan = isnan(a);
  const bool b_nan = isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

// The positions of the k highest-ranked elements of each row of `len` (as f32), best first.
// One warp per row and one pass per output: each lane finds its best element ranked after the
// previous output, then the warp keeps the best of the lanes (the same on every lane).
// Grid: ceil(rows / (THREADS / 32)).
template <int THREADS>
__device__ __forceinline__ void top_k(const float* __restrict__ x, float* __restrict__ out, int rows, int len, int k) {
  const int row = blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  const float* values = x + static_cast<long long>(row) * len;
  float prev = 0.0f;
  int prev_at = -1;
  for (int j = 0; j < k; ++j) {
    float best = 0.0f;
    int best_at = -1;
    for (int i = lane; i < len; i += 32) {
      const float v = values[i];
      const bool after_prev = prev_at < 0 || ranks_before(prev, prev_at, v, i);
      if (after_prev && (best_at < 0 || ranks_before(v, i, best, best_at))) {
        best = v;
        best_at = i;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_at = __shfl_xor_sync(0xffffffffu, best_at, offset);
      if (other_at >= 0 && (best_at < 0 || ranks_before(other, other_at, best, best_at))) {
        best = other;
        best_at = other_at;
      }
    }
    if (lane == 0) out[static_cast<long long>(row) * k + j] = static_cast<float>(best_at);
    prev = best;
    prev_at = best_at;
  }
}

// The contiguous layout of the grouped FP8 GEMMs (DeepGEMM's): the token-slots of each group
// (expert), in `group_rows` order, in a segment of their own, each segment padded to a multiple
// of ALIGN rows; `m_padded` rows in all (enough for any grouping: count + groups * (ALIGN - 1),
// rounded up). From `group_rows`' offsets and members, writes each segment's first row
// (`padded_offsets [groups + 1]`), the group of every ALIGN-row block (`block_group`, -1 past the
// last segment), the row of x each padded row reads (`source_rows`, -1 for padding; x is
// [tokens][x_slots][width], one row per token when x_slots is 1, as in the grouped GEMMs) and
// the token-slot each padded row's product belongs to (`out_rows`, -1 for padding). One block.
template <int ALIGN>
__device__ __forceinline__ void pad_groups(const int* __restrict__ offsets, const int* __restrict__ members,
                                           int groups, int slots, int x_slots, int m_padded,
                                           int* __restrict__ padded_offsets, int* __restrict__ block_group,
                                           int* __restrict__ source_rows, int* __restrict__ out_rows) {
  if (threadIdx.x == 0) {
    int run = 0;
    for (int g = 0; g < groups; ++g) {
      padded_offsets[g] = run;
      run += (offsets[g + 1] - offsets[g] + ALIGN - 1) / ALIGN * ALIGN;
    }
    padded_offsets[groups] = run;
  }
  __syncthreads();
  // The group whose segment holds padded row `row`: the last one starting at or before it (empty
  // segments start where the next one does), or -1 past the end.
  auto group_of = [&](int row) {
    if (row >= padded_offsets[groups]) return -1;
    int lo = 0, hi = groups - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (padded_offsets[mid] <= row) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  for (int b = threadIdx.x; b < m_padded / ALIGN; b += blockDim.x) block_group[b] = group_of(b * ALIGN);
  for (int p = threadIdx.x; p < m_padded; p += blockDim.x) {
    const int g = group_of(p);
    int token_slot = -1;
    if (g >= 0) {
      const int local = p - padded_offsets[g];
      if (local < offsets[g + 1] - offsets[g]) token_slot = members[offsets[g] + local];
    }
    out_rows[p] = token_slot;
    source_rows[p] = token_slot < 0 || x_slots != 1 ? token_slot : token_slot / slots;
  }
}

}  // namespace fathom
