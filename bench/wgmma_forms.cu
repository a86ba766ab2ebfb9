// Throughput and latency of the wgmma forms the Hopper attention kernel issues, measured on this
// GPU (METHOD.md: measure the ceilings, don't quote them). Each warpgroup repeats a chain of four
// k-steps (128 keys of S at D = 128, or 128 keys of P·V) followed by its wait, with one or two
// warpgroups per SM; operands are constants in shared memory and registers. Prints the rate in
// TOPS and the cycles one chain plus its wait takes on warpgroup 0 of CTA 0.
//   nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a -I src bench/wgmma_forms.cu -o wgmma_forms
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda/common/ptx_wgmma.cuh"

namespace {

using namespace sparge::cuda;

constexpr int kSteps = 4;  // k-steps of one chain
constexpr int kIters = 20000;
constexpr int kSmemBytes = 64 * 1024;
constexpr int kMaxWarpgroups = 2;

enum class Form { kS8SsN128, kS8SsN64, kE4m3RsN64, kE4m3RsN128 };

struct FormInfo {
  Form form;
  const char* name;
  int n;  // output columns
};

constexpr FormInfo kForms[] = {
    {Form::kS8SsN128, "int8 SS m64n128k32 (S, 128 keys)", 128},
    {Form::kS8SsN64, "int8 SS m64n64k32 (S, one 64-key block)", 64},
    {Form::kE4m3RsN64, "e4m3 RS m64n64k32 (P.V, 64-column chunk)", 64},
    {Form::kE4m3RsN128, "e4m3 RS m64n128k32 (P.V, 128 columns)", 128},
};

template <Form kForm>
__global__ void __launch_bounds__(kMaxWarpgroups * kWarpgroupThreads, 1) chain_kernel(long long* cycles, float* sink) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + kSwizzleAlign - 1) &
                        ~static_cast<uint32_t>(kSwizzleAlign - 1);
  const int usable_words = (kSmemBytes - kSwizzleAlign) / 4;
  for (int i = threadIdx.x; i < usable_words; i += blockDim.x) {
    reinterpret_cast<uint32_t*>(smem_raw)[i] = 0x3c3c3c3cu;  // 60 as int8, 1.5 as e4m3
  }
  __syncthreads();
  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const uint64_t a_desc = wgmma_desc(base + warpgroup * 8192, 128);  // 64 rows of 128 bytes
  const uint64_t b_desc = wgmma_desc(base + 16384, 128);             // up to 128 rows of 128 bytes
  int32_t s[64] = {};
  float o[64] = {};
  uint32_t a[kSteps][4];
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
#pragma unroll
    for (int e = 0; e < 4; ++e) a[k][e] = 0x38383838u;  // 1.0 as e4m3
  }
  auto& s64 = *reinterpret_cast<int32_t(*)[32]>(s);
  auto& o64 = *reinterpret_cast<float(*)[32]>(o);
  const long long start = clock64();
  for (int it = 0; it < kIters; ++it) {
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      const uint64_t ak = wgmma_desc_advance(a_desc, k * kWgmmaK8Bit);
      const uint64_t bk = wgmma_desc_advance(b_desc, k * kWgmmaK8Bit);
      if constexpr (kForm == Form::kS8SsN128) {
        wgmma_m64n128k32_s32_s8_ss(s, ak, bk, 1);
      } else if constexpr (kForm == Form::kS8SsN64) {
        wgmma_m64n64k32_s32_s8_ss(s64, ak, bk, 1);
      } else if constexpr (kForm == Form::kE4m3RsN64) {
        wgmma_m64n64k32_f32_e4m3_rs(o64, a[k], bk, 1);
      } else {
        wgmma_m64n128k32_f32_e4m3_rs(o, a[k], bk, 1);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
  }
  const long long stop = clock64();
  if (threadIdx.x % kWarpgroupThreads == 0) cycles[blockIdx.x * kMaxWarpgroups + warpgroup] = stop - start;
  float total = 0.0f;
#pragma unroll
  for (int e = 0; e < 64; ++e) total += static_cast<float>(s[e]) + o[e];
  if (total == 0.0f) sink[threadIdx.x] = total;  // keeps the products live; never true
}

bool check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "wgmma_forms: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

template <Form kForm>
bool run(const FormInfo& info, int sms, int warpgroups, long long* cycles, float* sink) {
  constexpr auto kernel = chain_kernel<kForm>;
  if (!check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes), "smem")) return false;
  const int threads = warpgroups * kWarpgroupThreads;
  kernel<<<sms, threads, kSmemBytes>>>(cycles, sink);  // warm-up (clocks, instruction cache)
  cudaEvent_t begin, end;
  if (!check(cudaEventCreate(&begin), "event") || !check(cudaEventCreate(&end), "event")) return false;
  cudaEventRecord(begin);
  kernel<<<sms, threads, kSmemBytes>>>(cycles, sink);
  cudaEventRecord(end);
  if (!check(cudaEventSynchronize(end), info.name)) return false;
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, begin, end);
  long long cta0 = 0;
  if (!check(cudaMemcpy(&cta0, cycles, sizeof(cta0), cudaMemcpyDeviceToHost), "copy")) return false;
  const double ops = 2.0 * 64 * info.n * kWgmmaK8Bit * kSteps * static_cast<double>(kIters) * warpgroups * sms;
  std::printf("| %-42s | %d | %7.1f | %6.1f |\n", info.name, warpgroups, ops / (ms * 1e-3) / 1e12,
              static_cast<double>(cta0) / kIters);
  cudaEventDestroy(begin);
  cudaEventDestroy(end);
  return true;
}

bool run_form(const FormInfo& info, int sms, int warpgroups, long long* cycles, float* sink) {
  switch (info.form) {
    case Form::kS8SsN128: return run<Form::kS8SsN128>(info, sms, warpgroups, cycles, sink);
    case Form::kS8SsN64: return run<Form::kS8SsN64>(info, sms, warpgroups, cycles, sink);
    case Form::kE4m3RsN64: return run<Form::kE4m3RsN64>(info, sms, warpgroups, cycles, sink);
    case Form::kE4m3RsN128: return run<Form::kE4m3RsN128>(info, sms, warpgroups, cycles, sink);
  }
  return false;
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  if (!check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties")) return 1;
  if (prop.major != 9) {
    std::printf("wgmma_forms: %s is sm_%d%d; wgmma needs sm_90a\n", prop.name, prop.major, prop.minor);
    return 1;
  }
  long long* cycles = nullptr;
  float* sink = nullptr;
  if (!check(cudaMalloc(&cycles, sizeof(long long) * prop.multiProcessorCount * kMaxWarpgroups), "cudaMalloc") ||
      !check(cudaMalloc(&sink, sizeof(float) * kMaxWarpgroups * kWarpgroupThreads), "cudaMalloc")) {
    return 1;
  }
  std::printf("%s, %d SMs: chains of %d k-steps + wait, one CTA per SM\n\n", prop.name, prop.multiProcessorCount, kSteps);
  std::printf("| form | warpgroups / SM | TOPS | cycles per chain + wait |\n|---|---|---|---|\n");
  bool ok = true;
  for (int warpgroups = 1; warpgroups <= kMaxWarpgroups; ++warpgroups) {
    for (const FormInfo& info : kForms) ok = ok && run_form(info, prop.multiProcessorCount, warpgroups, cycles, sink);
  }
  cudaFree(cycles);
  cudaFree(sink);
  return ok ? 0 : 1;
}
