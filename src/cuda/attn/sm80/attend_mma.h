// Stage 2 on warp-level mma.sync (sm_80 for the fp16 P·V path, sm_89+ for both fp8 ones): declarations
// shared by the dispatcher (attend.cu), the kernel template (attend_mma.cuh) and its
// instantiations (instantiations/attend_mma_*.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "sparge/layout.h"
#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge::cuda {

// Tile shape of one CTA: 4 warps, each owning one 16-row P·V group of docs/method.md §2.
inline constexpr int kMmaAttendWarps = 4;
inline constexpr int kMmaAttendThreads = kMmaAttendWarps * 32;
inline constexpr int kMmaAttendWarpRows = 16;
inline constexpr int kMmaAttendRows = kMmaAttendWarps * kMmaAttendWarpRows;  // query rows per CTA

// What the kernel reads, converted once on the host from AttendParams.
struct MmaAttendParams {
  const int8_t* q = nullptr;          // [B, Hq, Lq, D]
  const float* q_scale = nullptr;     // [B, Hq, q_groups]
  const int8_t* k = nullptr;          // [B, Hkv, Lk, D]
  const float* k_scale = nullptr;     // [B, Hkv, k_groups]
  const void* v = nullptr;            // [B, Hkv, D, Lk_pad]  e4m3 (both fp8 modes) or fp16, transposed, zero padded
  const float* v_scale = nullptr;     // [B, Hkv, D]
  const float* lse_shift = nullptr;   // [B, Hq, Lq]
  const int32_t* index = nullptr;     // [B, Hq, nbq, nbk]    kept K blocks, ascending
  const int32_t* count = nullptr;     // [B, Hq, nbq]
  void* o = nullptr;                  // [B, Hq, Lq, D] with o_stride_* (elements), dtype o_dtype
  float* lse = nullptr;               // [B, Hq, Lq] or null
  int64_t* stats = nullptr;           // [kStatCount] or null
  const float* pvthreshd_per_head = nullptr;  // [Hq] or null
  float pvthreshd = 0.0f;
  int64_t o_stride_batch = 0;
  int64_t o_stride_head = 0;
  int64_t o_stride_token = 0;
  DType o_dtype = DType::kFloat16;
  Causal causal = Causal::kNone;
  QuantGranularity granularity = QuantGranularity::kPerThread;
  int32_t heads_q = 0;
  int32_t heads_per_kv = 0;  // Hq / Hkv
  int32_t heads_kv = 0;
  int32_t len_q = 0;
  int32_t len_k = 0;
  int32_t len_k_pad = 0;  // padded_len_k(len_k): the token stride of V
  int32_t head_dim = 0;
  int32_t block_q = 0;
  int32_t nbq = 0;
  int32_t nbk = 0;
  int32_t q_groups = 0;  // q_scale_groups(len_q, granularity)
  int32_t k_groups = 0;  // k_scale_groups(len_k, granularity)
};

// Output columns (head-dim channels) one pass over the kept blocks accumulates. A warp holds
// 16 × pass_cols fp32 accumulators next to its 16 × block_k scores; wider heads take several
// passes, each recomputing S (Q·K^T over the full head dim) and the softmax statistics, which are
// identical in every pass, so the result is the one-pass result.
constexpr int mma_attend_pass_cols(int head_dim_pad, int block_k) {
  constexpr int kMaxPassColsBlock64 = 128;  // 64 + 32 accumulators per lane
  constexpr int kMaxPassColsBlock128 = 64;  // 32 + 64 accumulators per lane
  const int max_cols = block_k <= 64 ? kMaxPassColsBlock64 : kMaxPassColsBlock128;
  return head_dim_pad < max_cols ? head_dim_pad : max_cols;
}

// Dynamic shared memory of one CTA: the Q tile and two stages of (K tile, V^T tile of one pass,
// K scale of every key), tile rows padded by 16 bytes (PaddedTile).
constexpr size_t mma_attend_smem_bytes(int head_dim_pad, int block_k, PvPrecision pv) {
  constexpr size_t kRowPad = 16;
  const size_t v_bytes = static_cast<size_t>(v_elem_bytes(pv));
  const size_t q_tile = static_cast<size_t>(kMmaAttendRows) * (head_dim_pad + kRowPad);
  const size_t k_tile = static_cast<size_t>(block_k) * (head_dim_pad + kRowPad);
  const size_t v_tile =
      static_cast<size_t>(mma_attend_pass_cols(head_dim_pad, block_k)) * (block_k * v_bytes + kRowPad);
  const size_t k_scales = static_cast<size_t>(block_k) * sizeof(float);
  constexpr size_t kStages = 2;
  return q_tile + kStages * (k_tile + v_tile + k_scales);
}

// The enumerator's name, for messages.
constexpr const char* pv_name(PvPrecision pv) {
  switch (pv) {
    case PvPrecision::kFp8: return "kFp8";
    case PvPrecision::kFp16: return "kFp16";
    case PvPrecision::kFp8Fp16Accum: return "kFp8Fp16Accum";
  }
  return "unknown";
}

// Launches the kernel for one (padded head dim, K block, P·V format) on `stream`, chained to the
// stream's previous kernel when `chained` (cuda/common/chained_launch.cuh); grid is (ceil(Lq / 64),
// Hq, B), non-empty. Defined in attend_mma.cuh, instantiated under instantiations/.
template <int kHeadDimPad, int kBlockK, PvPrecision kPv>
Status launch_mma_attend(const MmaAttendParams& params, dim3 grid, cudaStream_t stream, bool chained);

}  // namespace sparge::cuda
