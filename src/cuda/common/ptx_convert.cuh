// PTX wrappers for the number conversions of the attention kernels: fp32 → packed fp16 with the
// rounding of src/common/numerics.h (rne), exp2, and P · 448 as an e4m3 code (the fp8 P·V modes).
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "sparge/layout.h"

namespace sparge::cuda {

// 2^x with the hardware approximation (ex2.approx.ftz): 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two fp32 → two fp16 (rn), x0 in the low half.
__device__ __forceinline__ uint32_t pack_f16x2(float x0, float x1) {
  uint32_t packed;
  // cvt.f16x2 puts its first source in the upper half.
  asm("cvt.rn.f16x2.f32 %0, %2, %1;\n" : "=r"(packed) : "f"(x0), "f"(x1));
  return packed;
}

// Two fp32 → two e4m3 (rne, saturating to ±448, as src/common/numerics.h), x0 in the low byte.
__device__ __forceinline__ uint32_t pack_e4m3x2(float x0, float x1) {
  return __nv_cvt_float2_to_fp8x2(make_float2(x0, x1), __NV_SATFINITE, __NV_E4M3);
}

// P · 448 of the fp8 P·V modes as its e4m3 code (docs/method.md §2, step 3), as the mma.sync kernel
// forms it (the Hopper kernel: pack_p_codes below). With k = scale ·
// kPCodeSlope and c = 1 − kPCodeSlope · m_new, u = sat(s · k + c) is (8 · (s · scale − m_new) + 126) /
// 126 clamped to [0, 1] (−inf and NaN give 0); the returned float is 1.5 · 2^23 + rne(126 · u), whose
// low byte is the code (at most 126: 0x7e = 448).
inline constexpr float kPCodeSlope = static_cast<float>(kPCodesPerOctave) / static_cast<float>(kPCodeMax);
__device__ __forceinline__ float p_code(float s, float k, float c) {
  float u;
  asm("fma.rn.sat.f32 %0, %1, %2, %3;\n" : "=f"(u) : "f"(s), "f"(k), "f"(c));
  return fmaf(u, static_cast<float>(kPCodeMax), kRoundMagic);
}

// The same codes on the Hopper kernel, four at a time: x_i = 8 · (s − m_new) + 126 (one fma per
// score), each rounded to the nearest integer (ties to even) and saturated to [0, 255], two at a
// time into bytes: negatives, −inf and NaN become 0, so each byte is the code (at most 126, since
// s <= m_new), x0's in the lowest byte. ptxas fuses each cvt.rni.s32.f32 pair with its
// cvt.pack.sat.u8 into one F2IP.U8.F32: two instructions per four scores, where fp16 conversions
// with relu and a byte permute took three.
__device__ __forceinline__ uint32_t pack_p_codes(float x0, float x1, float x2, float x3) {
  int32_t i0, i1, i2, i3;
  asm("cvt.rni.s32.f32 %0, %1;\n" : "=r"(i0) : "f"(x0));
  asm("cvt.rni.s32.f32 %0, %1;\n" : "=r"(i1) : "f"(x1));
  asm("cvt.rni.s32.f32 %0, %1;\n" : "=r"(i2) : "f"(x2));
  asm("cvt.rni.s32.f32 %0, %1;\n" : "=r"(i3) : "f"(x3));
  uint32_t hi, packed;
  // cvt.pack puts its first source in byte 1, its second in byte 0 and the low half of its third above.
  asm("cvt.pack.sat.u8.s32.b32 %0, %1, %2, 0;\n" : "=r"(hi) : "r"(i3), "r"(i2));
  asm("cvt.pack.sat.u8.s32.b32 %0, %1, %2, %3;\n" : "=r"(packed) : "r"(i1), "r"(i0), "r"(hi));
  return packed;
}

// The low bytes of four floats' bit patterns (p_code's codes), x0's in the lowest byte.
__device__ __forceinline__ uint32_t pack_low_bytes(float x0, float x1, float x2, float x3) {
  return low_bytes(__float_as_uint(x0), __float_as_uint(x1), __float_as_uint(x2), __float_as_uint(x3));
}

// Four e4m3 ones (0x38 = 1.0) in one word: the B operand of the row sums P · ones.
inline constexpr uint32_t kE4m3OnesX4 = 0x38383838u;

}  // namespace sparge::cuda
