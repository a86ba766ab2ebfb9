// PTX wrappers for shared-memory traffic of the attention and quantize kernels (sm_80+, stmatrix
// sm_90): cp.async copies, ldmatrix / stmatrix fragment loads and stores, and a padded row-major
// shared tile free of their bank conflicts.
#pragma once

#include <cstdint>

namespace sparge::cuda {

inline constexpr int kCpAsyncBytes = 16;  // one cp.async.cg copy; also one ldmatrix row

// 32-bit shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global → shared when `valid`, else writes 16 zero bytes and reads nothing
// (src-size 0). `src` must still be a valid global address (pass the tensor base when !valid).
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? kCpAsyncBytes : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(kCpAsyncBytes),
               "r"(src_bytes)
               : "memory");
}

// Copies 4 bytes global → shared when `valid`, else writes 4 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_4_zfill(uint32_t dst, const void* src, bool valid) {
  constexpr int kBytes = 4;
  const int src_bytes = valid ? kBytes : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(kBytes), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// An arrival on the mbarrier once every cp.async this thread issued before has landed, without
// raising the barrier's expected count (init the barrier with one arrival more for it).
__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Four 8x8 b16 matrices (8 rows of 16 bytes each). Lanes 8m .. 8m+7 give the row addresses of
// matrix m; lane l receives, in r[m], bytes 4·(l%4) .. 4·(l%4)+3 of row l/4 of matrix m.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ldmatrix_x4 with each 8x8 matrix transposed: lane l receives, in r[m], the elements of column
// l/4 in rows 2·(l%4) (low half) and 2·(l%4) + 1 (high half) of matrix m.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The inverse of ldmatrix_x4 (sm_90): lanes 8m .. 8m+7 give the row addresses of matrix m; lane l
// gives, in r[m], bytes 4·(l%4) .. 4·(l%4)+3 of row l/4 of matrix m (an mma accumulator fragment's
// layout).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
}

// 8 bytes (two floats) from shared memory.
__device__ __forceinline__ float2 ld_shared_8(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}

// 16 bytes from shared memory.
__device__ __forceinline__ uint4 ld_shared_16(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// A row-major shared tile of kRows rows × kRowBytes bytes whose rows are padded by one 16-byte
// chunk, so the 8 row addresses of one ldmatrix matrix (8 consecutive rows, same column) fall
// into 8 distinct 16-byte bank groups: the row stride is kRowBytes + 16 with kRowBytes a multiple
// of 64, so 8 consecutive rows start at 8 distinct multiples of 16 modulo 128. Unlike an XOR
// swizzle, the offset of (row0 + lane row, chunk0 + lane chunk) is a lane base plus a
// compile-time constant, which ldmatrix takes as an immediate.
template <int kRows, int kRowBytes>
struct PaddedTile {
  static constexpr int kRowChunks = kRowBytes / kCpAsyncBytes;
  static constexpr int kRowStride = kRowBytes + kCpAsyncBytes;
  static constexpr int kBytes = kRows * kRowStride;
  static constexpr int kChunks = kRows * kRowChunks;
  static_assert(kRowBytes % 64 == 0, "rows of whole 64-byte lines keep the padded rows conflict-free");

  // Byte offset of chunk `chunk` (16 bytes) of row `row`.
  __device__ __forceinline__ static constexpr uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>(row * kRowStride + chunk * kCpAsyncBytes);
  }
};

// Returns x unchanged while hiding that from the optimizer: address math derived from it is
// recomputed where it is used instead of being hoisted out of a loop into registers that stay
// live across the loop body (per-chunk copy addresses would otherwise cost two registers each).
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Zero from an instruction the compiler keeps where it is written: a plain `= 0` in a rarely taken
// branch was moved onto the common path (a skipping warp's P fragments in the wgmma kernel: 16 CS2R in
// every step of the D64 four-block kernel, bench/RESULTS.md session 29).
__device__ __forceinline__ uint32_t opaque_zero() {
  uint32_t z;
  asm volatile("mov.b32 %0, 0;\n" : "=r"(z));
  return z;
}

// Asynchronously fills a PaddedTile at shared address `base` with kThreads threads:
// source(row, chunk, valid) returns the global address of the chunk and sets valid = false for
// chunks to zero-fill (then the returned address must still be dereferenceable memory).
template <class Tile, int kThreads, class Source>
__device__ __forceinline__ void load_tile_async(uint32_t base, int thread, Source&& source) {
  static_assert(Tile::kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < Tile::kChunks / kThreads; ++i) {
    const int id = i * kThreads + thread;
    const int row = id / Tile::kRowChunks;
    const int chunk = id % Tile::kRowChunks;
    bool valid = false;
    const void* src = source(row, chunk, valid);
    cp_async_16_zfill(base + Tile::offset(row, chunk), src, valid);
  }
}

}  // namespace sparge::cuda
