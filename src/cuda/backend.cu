// CUDA backend: capability checks and the stage 2 entry (stages 0 and 1 live in quant/ and predict/).
#include <string>

#include "cuda/attn/attend.h"
#include "cuda/common/device_utils.cuh"
#include "cuda/cuda_backend.h"
#include "sparge/api.h"
#include "sparge/layout.h"

namespace sparge::cuda {
namespace {

__global__ void probe_kernel() {}

// Largest number of K blocks one prediction CTA keeps in shared memory.
constexpr int64_t kMaxKBlocks = 16384;

// Compute capabilities of the current device and of the kernel image that runs on it, or
// kUnsupported when this build carries no kernel image for it.
Status device_arch(Arch& arch) {
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    cudaGetLastError();
    return {StatusCode::kCudaError, std::string("device: no usable CUDA device (") + cudaGetErrorString(err) + ")"};
  }
  int major = 0, minor = 0;
  SPARGE_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
  SPARGE_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "compute capability");
  arch.device = major * 10 + minor;
  cudaFuncAttributes attrs{};
  if (cudaFuncGetAttributes(&attrs, probe_kernel) != cudaSuccess) {
    cudaGetLastError();
    return {StatusCode::kUnsupported, "device: this build of sparge has no kernels for compute capability " +
                                          std::to_string(major) + "." + std::to_string(minor) +
                                          " (built for SPARGE_CUDA_ARCHS=" + cuda_architectures() + ")"};
  }
  arch.image = attrs.ptxVersion;
  return Status::Ok();
}

Status check_blocks(const Shape& shape, const BlockConfig& blocks) {
  if (blocks.block_q % 64 != 0) {
    return {StatusCode::kUnsupported,
            "blocks.block_q: the CUDA backend needs a multiple of 64, got " + std::to_string(blocks.block_q)};
  }
  if (blocks.block_k % 64 != 0) {
    return {StatusCode::kUnsupported,
            "blocks.block_k: the CUDA backend needs a multiple of 64, got " + std::to_string(blocks.block_k)};
  }
  const int64_t nbk = ceil_div(shape.len_k, blocks.block_k);
  if (nbk > kMaxKBlocks) {
    return {StatusCode::kUnsupported, "shape.len_k: the CUDA backend supports at most " +
                                          std::to_string(kMaxKBlocks) + " K blocks, got " + std::to_string(nbk)};
  }
  return Status::Ok();
}

}  // namespace

Status supports(const Shape& shape, const BlockConfig& blocks) {
  Arch arch;
  SPARGE_RETURN_IF_ERROR(device_arch(arch));
  return check_blocks(shape, blocks);
}

Status supports_attend(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant) {
  Arch arch;
  SPARGE_RETURN_IF_ERROR(device_arch(arch));
  SPARGE_RETURN_IF_ERROR(check_blocks(shape, blocks));
  return attend_supports(shape, blocks, quant, arch);
}

Status attend_kernel(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant, const char** name) {
  SPARGE_RETURN_IF_ERROR(supports_attend(shape, blocks, quant));
  return attend_kernel_name(shape, blocks, quant, name);
}

Status attend(const AttendParams& p) { return launch_attend(p); }

}  // namespace sparge::cuda
