// Host-side number formats: exact conversions between fp32 and fp16 / bf16 / e4m3.
// These define the rounding every backend must reproduce: round-to-nearest-even, e4m3
// saturating to ±448 (as cvt.rn.satfinite.e4m3x2.f32), fp16 overflowing to ±inf.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sparge/layout.h"

namespace sparge::num {

inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// ---- bf16 ----
inline float bf16_to_float(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float x) {
  const uint32_t u = bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

// ---- fp16 ----
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant · 2^-24
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return from_bits(bits(mag) | sign);
  }
  if (exp == 31) return from_bits(sign | 0x7f800000u | (mant << 13));
  return from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_fp16(float x) {
  const uint32_t u = bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;     // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;    // rounds to >= 65536: inf
  if (a < 0x38800000u) {                          // below 2^-14: subnormal, step 2^-24
    const float scaled = from_bits(a) * 16777216.0f;  // exact: power-of-two scale
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded >> 13) - (112u << 10));
}

// ---- e4m3 (OCP FP8 E4M3FN: bias 7, no inf, max 448, NaN = S.1111.111) ----
inline constexpr float kE4m3Max = 448.0f;

inline uint8_t float_to_e4m3(float x) {
  const uint32_t u = bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;         // NaN
  if (a >= 0x43e00000u) return sign | 0x7eu;        // >= 448 (inf included): saturate
  if (a < 0x3c800000u) {                            // below 2^-6: subnormal, step 2^-9
    const float scaled = from_bits(a) * 512.0f;     // exact
    return sign | static_cast<uint8_t>(std::nearbyint(scaled));
  }
  const uint32_t rounded = a + 0x7ffffu + ((a >> 20) & 1u);
  return sign | static_cast<uint8_t>((rounded >> 20) - (120u << 3));
}

inline float e4m3_to_float_slow(uint8_t c) {
  const float sign = (c & 0x80u) ? -1.0f : 1.0f;
  const int exp = (c >> 3) & 0xf;
  const int mant = c & 0x7;
  if (exp == 15 && mant == 7) return std::nanf("");
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -9);
  return sign * std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
}

inline const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = e4m3_to_float_slow(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}

inline float e4m3_to_float(uint8_t c) { return e4m3_table()[c]; }

// P · 448 of the fp8 P·V modes for x = s − m_new (log2 domain, x <= 0; −inf gives 0): the e4m3
// code clamp(rne(8 · x + 126), 0, 126), read as e4m3 (docs/method.md §2, step 3). Within each
// power of two the codes step linearly in x: 2^x · 448 to within −8.0 % / +6.5 % for x >= −14.75 (the
// linear steps alone −3.9 % / +2.0 %; rounding 2^x · 448 to e4m3 alone: ±6.25 %).
// A NaN x gives 0, as the mma.sync kernel's saturating fma and the Hopper kernel's saturating
// conversion do (docs/method.md §2, "Scores on the Hopper kernel").
inline float p8_from_code(float x) {
  const float t = static_cast<float>(kPCodesPerOctave) * x + static_cast<float>(kPCodeMax);
  const float code = std::nearbyint(std::fmin(std::fmax(t, 0.0f), static_cast<float>(kPCodeMax)));
  return e4m3_to_float(static_cast<uint8_t>(code));
}

// Round-trip helpers: the value a float takes after storage in the format.
inline float round_e4m3(float x) { return e4m3_to_float(float_to_e4m3(x)); }
inline float round_fp16(float x) { return fp16_to_float(float_to_fp16(x)); }
inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

// INT8 symmetric quantization: q = clamp(rne(x · inv), -127, 127) with inv = 127 / amax
// (inv = 0 when amax == 0).
inline int8_t quantize_int8(float x, float inv) {
  float r = std::nearbyint(x * inv);
  r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
  return static_cast<int8_t>(r);
}

}  // namespace sparge::num
