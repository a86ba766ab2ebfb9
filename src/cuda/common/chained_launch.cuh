// Chained launches (programmatic dependent launch, sm_90 and newer): the kernels of one op follow
// each other on the caller's stream; a chained kernel is launched when its predecessor's CTAs have
// all exited, before the predecessor's completion has travelled through the stream, and waits for
// that completion on the GPU. This takes the 1-2 us between two kernels of the op off (H100, B2 H16
// L8k topk: 11 us of 882 over eight launches, bench/RESULTS.md session 18).
//
// The contract: every kernel launched chained calls wait_for_prior_grids() before it touches
// global memory (it returns once every earlier grid on the stream has completed and its writes are
// visible), on every path, early returns included. No kernel releases its dependents early
// (griddepcontrol.launch_dependents): the next kernel's CTAs would then wait on the SMs while this
// one runs, and the prediction's score kernel ran 2.7x longer beside them (22 -> 61 us). Launched
// without the attribute (an older device, a PTX image for an older architecture,
// SPARGE_CHAINED_LAUNCH=0), the wait is a no-op.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda/common/device_utils.cuh"
#include "sparge/status.h"

namespace sparge::cuda {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A switch of the environment: 1 or unset (true), 0 (false); anything else is an error naming it.
Status env_switch(const char* name, bool* on);

// Whether this backend's kernels launch chained on the current device: it runs a kernel image for
// compute capability 9.0 or newer (whose kernels carry the griddepcontrol instructions), and
// SPARGE_CHAINED_LAUNCH is not 0.
Status chained_launches(bool* on);

// Launches kernel(args...) on `stream`, chained when `chained` (see above); the status names `what`.
template <typename... Params, typename... Args>
Status launch_kernel(const char* what, bool chained, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                     cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = chained ? &attribute : nullptr;
  config.numAttrs = chained ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) cudaGetLastError();  // the launch failed: do not leave it for the next check
  return cuda_status(err, what);
}

}  // namespace sparge::cuda
