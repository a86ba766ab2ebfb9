// PTX wrappers for the number conversions of the attention kernels: fp32 → packed e4m3 / fp16
// with the rounding of src/common/numerics.h (rne; e4m3 saturating to ±448), and exp2.
#pragma once

#include <cstdint>

namespace sparge::cuda {

// 2^x with the hardware approximation (ex2.approx.ftz): 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Four fp32 → four e4m3 bytes, x0 in the lowest byte (rn, satfinite). sm_89+.
__device__ __forceinline__ uint32_t pack_e4m3x4(float x0, float x1, float x2, float x3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  __trap();  // no e4m3 conversion before sm_89; attend_supports rejects these devices
  return 0;
#else
  uint32_t packed;
  // cvt.e4m3x2 puts its first source in the upper byte of the 16-bit result.
  asm("{\n"
      "  .reg .b16 lo, hi;\n"
      "  cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
      "  cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
      "  mov.b32 %0, {lo, hi};\n"
      "}\n"
      : "=r"(packed)
      : "f"(x0), "f"(x1), "f"(x2), "f"(x3));
  return packed;
#endif
}

// Two fp32 → two fp16 (rn), x0 in the low half.
__device__ __forceinline__ uint32_t pack_f16x2(float x0, float x1) {
  uint32_t packed;
  // cvt.f16x2 puts its first source in the upper half.
  asm("cvt.rn.f16x2.f32 %0, %2, %1;\n" : "=r"(packed) : "f"(x0), "f"(x1));
  return packed;
}

}  // namespace sparge::cuda
