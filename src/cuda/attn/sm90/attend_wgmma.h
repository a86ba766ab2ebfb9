// Stage 2 on Hopper wgmma + TMA (sm_90a): declarations shared by the dispatcher (attend.cu), the
// kernel template (attend_wgmma.cuh) and its instantiations (instantiations/attend_wgmma_*.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/attn/sm80/attend_mma.h"
#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge::cuda {

// One CTA: a producer warpgroup (one thread issues the TMA loads) and two consumer warpgroups of
// 64 query rows each; warp w of a consumer warpgroup owns one 16-row P·V group of docs/method.md §2.
inline constexpr int kWgmmaAttendConsumerGroups = 2;
inline constexpr int kWgmmaAttendThreads = (1 + kWgmmaAttendConsumerGroups) * 128;
inline constexpr int kWgmmaAttendRows = kWgmmaAttendConsumerGroups * 64;  // query rows per CTA
inline constexpr int kWgmmaAttendStages = 3;                              // K / V^T pipeline depth
inline constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;             // per CTA on sm_90

// Whether the wgmma kernel covers this request (head dim padded to 64 or 128, block_q a multiple
// of 128, block_k 64 or 128, kFp8 P·V (not kFp8Fp16Accum), non-empty keys); the rest runs on the
// mma.sync kernel.
constexpr bool wgmma_attend_covers(int64_t head_dim, int64_t block_q, int64_t block_k, PvPrecision pv, int64_t len_k) {
  return head_dim >= 16 && head_dim <= 128 && head_dim % 16 == 0 && block_q % kWgmmaAttendRows == 0 &&
         (block_k == 64 || block_k == 128) && pv == PvPrecision::kFp8 && len_k > 0;
}

inline constexpr int kWgmmaAttendQBuffers = 2;  // Q tiles: the next work tile's loads while this one runs

// Whether the kernel for (padded head dim, tile of block_k keys) stores 2-byte output rows by TMA
// (Config::kTmaStores says why only there); the others store them in 16-byte stores.
constexpr bool wgmma_attend_tma_stores(int head_dim_pad, int block_k) { return head_dim_pad == 128 && block_k == 128; }

// Dynamic shared memory of one CTA: kWgmmaAttendQBuffers Q tiles and kWgmmaAttendStages (K tile,
// V^T tiles), each 1024-byte aligned for the swizzle, the V^T tiles (blocks_per_tile per stage) each
// followed by 8 rows of e4m3 ones, the mbarriers, the output rows of 2-byte types on their way to
// global memory (TMA boxes of 16 rows by 128 bytes, or rows padded by 16 bytes), each consumer warp's
// copy of the V scales, and 1024 bytes to align the base.
constexpr size_t wgmma_attend_smem_bytes(int head_dim_pad, int block_k, int blocks_per_tile) {
  constexpr size_t kAlignSlack = 1024;
  constexpr size_t kTileAlign = 1024;
  constexpr size_t kBarrierBytes = 1024;
  constexpr size_t kSumRows = 8;
  constexpr size_t kRowPad = 16;
  const size_t q_tile = static_cast<size_t>(kWgmmaAttendQBuffers) * kWgmmaAttendRows * head_dim_pad;
  const size_t k_tile = static_cast<size_t>(block_k) * head_dim_pad;
  const size_t v_row = static_cast<size_t>(block_k / blocks_per_tile);
  const size_t v_tile = (v_row * (head_dim_pad + kSumRows) + kTileAlign - 1) / kTileAlign * kTileAlign;
  const size_t kv_tiles = static_cast<size_t>(kWgmmaAttendStages) * (k_tile + blocks_per_tile * v_tile);
  constexpr size_t kConsumerWarps = kWgmmaAttendRows / 16;
  const size_t o_row_pad = wgmma_attend_tma_stores(head_dim_pad, block_k) ? 0 : kRowPad;
  const size_t o_rows = static_cast<size_t>(kWgmmaAttendRows) * (2 * head_dim_pad + o_row_pad);
  const size_t v_scales = kConsumerWarps * head_dim_pad * sizeof(float);
  return kAlignSlack + q_tile + kv_tiles + kBarrierBytes + o_rows + v_scales;
}

// How the wgmma kernel is launched, beyond its parameters.
struct WgmmaLaunch {
  int batch = 0;
  int max_ctas = 0;          // > 0: at most this many CTAs (SPARGE_WGMMA_CTAS)
  void* scratch = nullptr;   // AttendParams::workspace (layout.h): the last round of work tiles may split
  size_t scratch_bytes = 0;  // its bytes; nullptr / too small: no split
  cudaStream_t stream = nullptr;
  bool chained = false;      // chained to the stream's previous kernel (cuda/common/chained_launch.cuh)
  bool counters_zeroed = false;  // scratch's split counters are zero already (cuda::attend)
};

// Builds the tensor maps of Q, K and V^T and launches the kernel for one (padded head dim, tile
// of kBlockK keys) on launch.stream for launch.batch sequences: a persistent grid of one CTA per SM
// of the current device (at most max_ctas where max_ctas > 0), each CTA looping over work tiles of
// 128 query rows of one (b, h); with scratch and no causal mask, a last round that the work tiles
// do not fill is split into pieces over the CTAs. kMultiBlock: the tile of kBlockK = 128 or 256 keys
// holds two or four kept 64-key blocks (block_k = 64), else one kept block of kBlockK keys. Defined in attend_wgmma.cuh,
// instantiated under instantiations/attend_wgmma_*.cu. P·V is e4m3.
template <int kHeadDimPad, int kBlockK, bool kMultiBlock>
Status launch_wgmma_attend(const MmaAttendParams& params, const WgmmaLaunch& launch);

}  // namespace sparge::cuda
