// Hopper (sm_90a) primitives: mbarriers, TMA bulk-tensor loads (multicast to a cluster too),
// cluster ranks, barriers and remote arrivals, wgmma fences and shared-memory matrix descriptors,
// register reallocation between warp groups. Inline PTX only, no CUTLASS.
#pragma once

namespace fathom {

// The driver's CUtensorMap: 128 opaque bytes, 64-byte aligned, built on the host with
// cuTensorMapEncodeTiled and passed by value as a `const __grid_constant__` kernel parameter.
struct alignas(64) TensorMap {
  u64 opaque[16];
};

__device__ __forceinline__ void tma_prefetch_descriptor(const TensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}

__device__ __forceinline__ void mbarrier_init(u64* bar, u32 arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
}

// Makes initialised barriers visible to the other threads and to the async (TMA) proxy.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// Arrives once and announces `bytes` of TMA transactions that complete the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

// Spins until the phase with the given parity has completed. A fresh barrier is in phase 0, so
// waiting for parity 1 returns at once: producers start with parity 1 on their `empty` barriers.
__device__ __forceinline__ void mbarrier_wait(u64* bar, u32 parity) {
  u32 done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// 2-D TMA load of one box into shared memory; completion is counted on `bar` in bytes.
// Coordinates are in elements, innermost dimension first; out-of-bounds elements read as zero.
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const TensorMap* map, u64* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
      "[%2];\n" ::"r"(smem_u32(smem_dst)),
      "l"(reinterpret_cast<u64>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// The same box delivered to the same shared-memory offset of every CTA of the cluster in
// `cta_mask`, completing `bytes` on each one's barrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* smem_dst, const TensorMap* map, u64* bar, int c0, int c1,
                                                      u16 cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(smem_u32(smem_dst)),
      "l"(reinterpret_cast<u64>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

// ---- thread block clusters ----

__device__ __forceinline__ u32 cluster_cta_rank() {
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

// Every thread of every CTA of the cluster (all of them must call it): shared memory written
// before is visible to the cluster after.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// Arrives on the barrier at `bar`'s offset in the shared memory of cluster CTA `cta`.
__device__ __forceinline__ void mbarrier_arrive_cluster(u64* bar, u32 cta) {
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_u32(bar)), "r"(cta));
  // Default (release at CTA scope) semantics, as CUTLASS's cluster pipelines: the reads this
  // releases have completed, and `.cluster` scope would add a GPU-wide fence to every arrival.
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmma.
__device__ __forceinline__ void fence_operand(float& reg) { asm volatile("" : "+f"(reg)::"memory"); }

// Shared-memory matrix descriptor for a K-major operand whose rows are exactly 128 bytes and were
// written by TMA with 128-byte swizzling: 8-row core groups are 1024 bytes apart (stride byte
// offset); the leading byte offset is unused in this mode. The tile base must be 1024-byte
// aligned; a K step inside the 128-byte row is a plain start-address offset.
__device__ __forceinline__ u64 wgmma_desc_k_major_sw128(const void* smem) {
  u64 desc = 0;
  desc |= static_cast<u64>((smem_u32(smem) & 0x3ffffu) >> 4);
  desc |= static_cast<u64>(1) << 16;
  desc |= static_cast<u64>(1024 >> 4) << 32;
  desc |= static_cast<u64>(1) << 62;
  return desc;
}

// Hands registers between warp groups (all warps of the group must execute it).
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

}  // namespace fathom
