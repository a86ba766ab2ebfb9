// Sparse attention kernels (stage 2). Host-side launcher interface used by src/cuda/backend.cu.
#pragma once

#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge::cuda {

// Whether a kernel exists for this head dim / block size / P·V precision on a device of the
// given compute capability (major * 10 + minor). The message names what is missing.
Status attend_supports(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant, int compute_capability);

// Launches stage 2 on p.stream. p is validated, attend_supports() returned ok, all pointers are
// device pointers. Never allocates, never synchronizes. Writes o (and lse, and stats_out's
// kStatPvUnits / kStatPvSkipped slots when those pointers are set).
Status launch_attend(const AttendParams& p);

}  // namespace sparge::cuda
