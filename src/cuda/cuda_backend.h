// CUDA backend entry points, called by dispatch.cpp with validated params (sm_scale resolved).
// Each launches on params.stream, never allocates and never synchronizes.
#pragma once

#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge::cuda {

// Whether the current device can run stages 0 and 1 (supports) or all three stages
// (supports_attend) for the request; the message names the compute capability or the value
// that has no kernel.
Status supports(const Shape& shape, const BlockConfig& blocks);
Status supports_attend(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant);

// The stage 2 kernel the request runs on: "wgmma" or "mma" (after supports_attend's checks).
Status attend_kernel(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant, const char** name);

// block_stats false: the caller predicts nothing from this output (dense or block-mask selection),
// so q_pool, q_sim, k_pool, k_sim and k_spikes may be left unwritten or hold scratch.
Status quantize(const QuantizeParams& p, bool block_stats = true);

// Device bytes that a predict call sets to zero on its stream after the stream's earlier work, by its
// last kernel (by a memset where it launches none): the fused op clears the attention kernel's split
// counters there instead of by a memset between predict and attend, which would end the chain of
// launches (cuda/common/chained_launch.cuh). at: 4-byte aligned, bytes a multiple of 4.
struct ZeroRange {
  void* at = nullptr;
  size_t bytes = 0;
};
Status predict(const PredictParams& p, ZeroRange zero = {});

// counters_zeroed: the split counters at the start of p.workspace (layout.h) are zero on the stream
// already (a predict ZeroRange), so the launch does not clear them.
Status attend(const AttendParams& p, bool counters_zeroed = false);

}  // namespace sparge::cuda
