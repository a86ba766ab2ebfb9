// CUDA backend: capability checks and the stage 2 entry (stages 0 and 1 live in quant/ and predict/).
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "cuda/attn/attend.h"
#include "cuda/common/chained_launch.cuh"
#include "cuda/common/device_utils.cuh"
#include "cuda/cuda_backend.h"
#include "sparge/api.h"
#include "sparge/layout.h"

namespace sparge::cuda {
namespace {

__global__ void probe_kernel() {}

// Largest number of K blocks one prediction CTA keeps in shared memory.
constexpr int64_t kMaxKBlocks = 16384;

constexpr int kCachedDevices = 64;

// griddepcontrol (programmatic dependent launch) needs a kernel image for sm_90 or newer.
constexpr int kChainedComputeCapability = 90;

// Compute capabilities of the current device and of the kernel image that runs on it, or
// kUnsupported when this build carries no kernel image for it. Cached per device (neither
// changes while the process runs): the queries cost several microseconds per call otherwise.
Status device_arch(Arch& arch) {
  static std::array<std::atomic<uint32_t>, kCachedDevices> cache{};  // device << 16 | image, 0 = unknown
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    cudaGetLastError();
    return {StatusCode::kCudaError, std::string("device: no usable CUDA device (") + cudaGetErrorString(err) + ")"};
  }
  if (device >= 0 && device < kCachedDevices) {
    if (const uint32_t known = cache[device].load(std::memory_order_relaxed); known != 0) {
      arch = {.device = static_cast<int>(known >> 16), .image = static_cast<int>(known & 0xffffu)};
      return Status::Ok();
    }
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
  if (device >= 0 && device < kCachedDevices) {
    cache[device].store(static_cast<uint32_t>(arch.device) << 16 | static_cast<uint32_t>(arch.image),
                        std::memory_order_relaxed);
  }
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
  Arch arch;
  SPARGE_RETURN_IF_ERROR(device_arch(arch));
  return attend_kernel_name(shape, blocks, quant, arch, name);
}

Status env_switch(const char* name, bool* on) {
  const char* value = std::getenv(name);
  const std::string_view v = value != nullptr ? value : "";
  if (v != "" && v != "0" && v != "1") {
    return {StatusCode::kInvalidArgument, std::string(name) + ": expected 0 or 1, got \"" + std::string(v) + "\""};
  }
  *on = v != "0";
  return Status::Ok();
}

Status chained_launches(bool* on) {
  Arch arch;
  SPARGE_RETURN_IF_ERROR(device_arch(arch));
  SPARGE_RETURN_IF_ERROR(env_switch("SPARGE_CHAINED_LAUNCH", on));
  *on = *on && arch.image >= kChainedComputeCapability;
  return Status::Ok();
}

Status attend(const AttendParams& p, bool counters_zeroed) {
  Arch arch;
  SPARGE_RETURN_IF_ERROR(device_arch(arch));
  return launch_attend(p, arch, counters_zeroed);
}

}  // namespace sparge::cuda
