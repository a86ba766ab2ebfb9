// Sparse attention kernels (stage 2). Host-side launcher interface used by src/cuda/backend.cu.
#pragma once

#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge::cuda {

// Compute capabilities (major * 10 + minor) of the current device and of the kernel image the
// driver runs on it (the virtual architecture it was compiled from: 80 for a build for sm_80 or
// compute_80 PTX, which a 9.0 device runs by JIT).
struct Arch {
  int device = 0;
  int image = 0;
};

// Whether a kernel exists for this head dim / block size / P·V precision on this device and
// kernel image. The message names what is missing.
Status attend_supports(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant, const Arch& arch);

// The stage 2 kernel that launch_attend runs for the request on the current device: "wgmma"
// (sm_90a) or "mma" (mma.sync, sm_80 and newer). Honours SPARGE_CUDA_KERNEL.
Status attend_kernel_name(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant, const Arch& arch,
                          const char** name);

// Launches stage 2 on p.stream. p is validated, attend_supports() returned ok, all pointers are
// device pointers. Never allocates, never synchronizes. Writes o (and lse, and stats_out's
// kStatPvUnits / kStatPvSkipped slots when those pointers are set). counters_zeroed: see
// cuda::attend (cuda_backend.h).
Status launch_attend(const AttendParams& p, const Arch& arch, bool counters_zeroed = false);

}  // namespace sparge::cuda
