// sparge — public C++ API. Framework-free: raw pointers, strides, a stream, caller memory.
//
// Every entry point validates its params first and returns a Status naming the bad field; no
// entry point allocates device memory, synchronizes the device or launches on a stream other
// than `params.stream`. The CPU backend runs synchronously on host pointers (OpenMP).
#pragma once

#include <cstddef>

#include "sparge/layout.h"
#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge {

// "can_implement": checks a request without running it.
Status check(const QuantizeParams& p);
Status check(const PredictParams& p);
Status check(const AttendParams& p);
Status check(const AttentionParams& p);

// Stage entry points.
Status quantize(const QuantizeParams& p);
Status predict(const PredictParams& p);
Status attend(const AttendParams& p);

// Bytes of AttendParams::workspace that a CUDA request can use (0 on the CPU and where unused).
size_t attend_workspace_size(const AttendParams& p);

// quantize → predict → attend in one call. params.workspace must hold workspace_size(params) bytes.
Status attention(const AttentionParams& p);
size_t workspace_size(const AttentionParams& p);

// attention() in two calls, for a caller that creates the output only once the first kernels are
// queued (the torch layer does, so that the GPU starts while the host allocates it).
// attention_begin runs quantize and predict and reads neither o nor lse (they may be null; its check
// is check(p) without the output); attention_finish, on the same params with o (and lse) set, runs
// attend. In between, the workspace and stats_out belong to the call.
Status attention_begin(const AttentionParams& p);
Status attention_finish(const AttentionParams& p);

// Whether the CUDA backend was compiled in, and for which architectures (e.g. "90a;89;80").
bool cuda_backend_built();
const char* cuda_architectures();

// The stage 2 kernel that a request with this shape, block configuration and quantization would
// run on the current device: "cpu", "wgmma" (Hopper, sm_90a) or "mma" (mma.sync, sm_80 and newer).
// The environment variable SPARGE_CUDA_KERNEL=auto|mma|wgmma forces the CUDA choice (testing).
Status attend_kernel(Device device, const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant,
                     const char** name);

// Version string of the library, e.g. "0.1.0".
const char* version();

}  // namespace sparge
