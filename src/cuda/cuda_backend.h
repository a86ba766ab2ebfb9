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
Status predict(const PredictParams& p);
Status attend(const AttendParams& p);

}  // namespace sparge::cuda
