// CUDA backend entry points, called by dispatch.cpp with validated params (sm_scale resolved).
// Each launches on params.stream, never allocates and never synchronizes.
#pragma once

#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge::cuda {

// Whether the current device has kernels for the given request; the message names the compute
// capability when it has none.
Status supports(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant);

Status quantize(const QuantizeParams& p);
Status predict(const PredictParams& p);
Status attend(const AttendParams& p);

}  // namespace sparge::cuda
