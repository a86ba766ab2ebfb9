// Per-lane row data shared by the attention kernels (mma.sync and wgmma): the two accumulator rows
// a lane holds in its warp's 16-row P·V group. Include from the kernel templates only.
#pragma once

#include <cstdint>

#include "cuda/attn/sm80/attend_mma.h"
#include "sparge/layout.h"

namespace sparge::cuda {

// Rows `first` and `first + 8` of head row bh (first = the group's first row + lane / 4): whether
// each exists, its Q scale and the end of its visible keys (keys c < col_end are visible and < Lk;
// 0 for a missing row).
struct LaneRows {
  bool valid[2];
  float q_scale[2];
  int col_end[2];
};

__device__ __forceinline__ LaneRows lane_rows(const MmaAttendParams& p, int64_t bh, int first) {
  constexpr int kRowStride = 8;  // rows g and g + 8 of an accumulator fragment
  LaneRows rows;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = first + i * kRowStride;
    rows.valid[i] = r < p.len_q;
    rows.q_scale[i] = rows.valid[i] ? p.q_scale[bh * p.q_groups + q_scale_group(r, p.granularity)] : 0.0f;
    rows.col_end[i] = rows.valid[i] ? static_cast<int>(visible_end(r, p.causal, p.len_q, p.len_k)) : 0;
  }
  return rows;
}

// The P·V filter threshold of query head h.
__device__ __forceinline__ float head_pvthreshd(const MmaAttendParams& p, int h) {
  return p.pvthreshd_per_head != nullptr ? p.pvthreshd_per_head[h] : p.pvthreshd;
}

}  // namespace sparge::cuda
