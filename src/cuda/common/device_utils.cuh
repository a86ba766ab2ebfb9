// Small device helpers shared by the quantization and prediction kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "common/status_macros.h"
#include "sparge/params.h"
#include "sparge/status.h"

namespace sparge::cuda {

inline constexpr int kWarpSize = 32;
// 1.5 · 2^23: adding it to an fp32 of magnitude below 2^22 rounds to an integer (in the current
// rounding mode), which then sits in the low mantissa bits of the sum.
inline constexpr float kRoundMagic = 12582912.0f;

// The low bytes of four 32-bit words, x0's in the lowest byte (three byte permutes).
__device__ __forceinline__ uint32_t low_bytes(uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3) {
  constexpr uint32_t kLowBytesOfBoth = 0x0040;  // byte 0: x's byte 0, byte 1: y's byte 0
  constexpr uint32_t kLowHalvesOfBoth = 0x5410;
  return __byte_perm(__byte_perm(x0, x1, kLowBytesOfBoth), __byte_perm(x2, x3, kLowBytesOfBoth), kLowHalvesOfBoth);
}

// Reads one input element as fp32.
template <typename T>
__device__ __forceinline__ float load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(*p);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(*p);
  } else {
    return *p;
  }
}

template <typename T>
__device__ __forceinline__ T store_from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// Two output elements of a 2-byte type as one word (rn), x0 in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_output_pair(float x0, float x1) {
  uint32_t word;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(x0, x1);
    memcpy(&word, &pair, sizeof(word));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16");
    const __nv_bfloat162 pair = __floats2bfloat162_rn(x0, x1);
    memcpy(&word, &pair, sizeof(word));
  }
  return word;
}

// Two adjacent output elements, as one vector store when the address allows it.
template <typename T>
__device__ __forceinline__ void store_output_pair(T* dst, float x0, float x1) {
  if (reinterpret_cast<uintptr_t>(dst) % (2 * sizeof(T)) == 0) {
    if constexpr (std::is_same_v<T, __half>) {
      *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(x0, x1);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x0, x1);
    } else {
      *reinterpret_cast<float2*>(dst) = make_float2(x0, x1);
    }
  } else {
    dst[0] = store_from_float<T>(x0);
    dst[1] = store_from_float<T>(x1);
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_sum_any(T x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Non-negative floats order like their bit patterns: atomicMax on the bits is an exact,
// order-independent float max.
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float value) {
  atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(value));
}

// Block-wide sum of one value per thread; every thread gets the total. `scratch` holds one
// slot per warp. Ends with a barrier, so scratch can be reused right after.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  x = warp_sum_any(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Dispatch on the input dtype: calls f with a typed null pointer of the element type.
template <typename F>
Status dispatch_dtype(DType dtype, const char* field, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(static_cast<const __half*>(nullptr));
    case DType::kBFloat16: return f(static_cast<const __nv_bfloat16*>(nullptr));
    case DType::kFloat32: return f(static_cast<const float*>(nullptr));
  }
  return {StatusCode::kInvalidArgument, std::string(field) + ": unknown dtype " + std::to_string(static_cast<int>(dtype))};
}

// Status of the last launch, naming the kernel when it failed.
inline Status launch_status(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::Ok();
  return {StatusCode::kCudaError, std::string(kernel) + ": " + cudaGetErrorString(err)};
}

inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return {StatusCode::kCudaError, std::string(what) + ": " + cudaGetErrorString(err)};
}

#define SPARGE_CUDA_TRY(call, what) SPARGE_RETURN_IF_ERROR(::sparge::cuda::cuda_status((call), (what)))

inline constexpr int kMaxTrackedDevices = 64;
inline constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // usable without cudaFuncSetAttribute

// Lets kKernel launch with `bytes` of dynamic shared memory on the current device. The attribute
// call costs microseconds, so it is made only above the default limit and once per device and
// size raised to (devices past kMaxTrackedDevices: every time).
template <auto kKernel>
Status allow_dynamic_smem(size_t bytes, const char* what) {
  if (bytes <= kDefaultDynamicSmem) return Status::Ok();
  static std::atomic<size_t> raised[kMaxTrackedDevices] = {};
  int device = 0;
  SPARGE_CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
  const bool tracked = device < kMaxTrackedDevices;
  if (tracked && raised[device].load(std::memory_order_acquire) >= bytes) return Status::Ok();
  SPARGE_CUDA_TRY(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                  what);
  if (tracked) {
    size_t seen = raised[device].load(std::memory_order_relaxed);
    while (seen < bytes && !raised[device].compare_exchange_weak(seen, bytes, std::memory_order_acq_rel)) {
    }
  }
  return Status::Ok();
}

// Attribute kAttr of the current device, cached per device (devices past kMaxTrackedDevices: queried
// every time; a cached 0 reads as unknown). The query costs microseconds, more after an idle host.
template <cudaDeviceAttr kAttr>
Status device_attribute(int* out, const char* what) {
  static std::atomic<int> cached[kMaxTrackedDevices] = {};
  int device = 0;
  SPARGE_CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
  const bool tracked = device < kMaxTrackedDevices;
  if (tracked && (*out = cached[device].load(std::memory_order_relaxed)) > 0) return Status::Ok();
  SPARGE_CUDA_TRY(cudaDeviceGetAttribute(out, kAttr, device), what);
  if (tracked) cached[device].store(*out, std::memory_order_relaxed);
  return Status::Ok();
}

// The number of SMs of the current device.
inline Status sm_count(int* out) {
  return device_attribute<cudaDevAttrMultiProcessorCount>(out, "cudaDeviceGetAttribute(MultiProcessorCount)");
}

}  // namespace sparge::cuda
