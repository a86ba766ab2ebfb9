// The number formats of src/common/numerics.h against hand-computed values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/numerics.h"

namespace sparge::num {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(E4m3, ExactValues) {
  EXPECT_EQ(float_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(float_to_e4m3(1.0f), 0x38);       // exponent 7 (bias 7), mantissa 0
  EXPECT_EQ(float_to_e4m3(-1.5f), 0xbc);      // 1.100b
  EXPECT_EQ(float_to_e4m3(0.015625f), 0x08);  // 2^-6, the smallest normal
  EXPECT_EQ(float_to_e4m3(448.0f), 0x7e);     // 1.110b · 2^8, the largest finite
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x08), 0.015625f);
  EXPECT_EQ(e4m3_to_float(0xbc), -1.5f);
}

TEST(E4m3, SaturatesAt448) {
  EXPECT_EQ(float_to_e4m3(460.0f), 0x7e);
  EXPECT_EQ(float_to_e4m3(464.0f), 0x7e);  // the tie 448 | 480 would round up; satfinite keeps 448
  EXPECT_EQ(float_to_e4m3(1.0e9f), 0x7e);
  EXPECT_EQ(float_to_e4m3(kInf), 0x7e);
  EXPECT_EQ(float_to_e4m3(-kInf), 0xfe);
  EXPECT_EQ(float_to_e4m3(-500.0f), 0xfe);
}

TEST(E4m3, SubnormalsStepTwoToMinusNine) {
  const float step = std::ldexp(1.0f, -9);
  EXPECT_EQ(float_to_e4m3(step), 0x01);
  EXPECT_EQ(float_to_e4m3(7 * step), 0x07);     // the largest subnormal
  EXPECT_EQ(float_to_e4m3(0.5f * step), 0x00);  // tie 0 | 1: to even
  EXPECT_EQ(float_to_e4m3(1.5f * step), 0x02);  // tie 1 | 2: to even
  EXPECT_EQ(float_to_e4m3(2.5f * step), 0x02);  // tie 2 | 3: to even
  EXPECT_EQ(float_to_e4m3(0.51f * step), 0x01);
  EXPECT_EQ(float_to_e4m3(0.1f * step), 0x00);
  EXPECT_EQ(e4m3_to_float(0x03), 3 * step);
}

TEST(E4m3, NormalTiesToEven) {
  EXPECT_EQ(float_to_e4m3(1.0625f), 0x38);  // 1 + 1/16: tie 1 | 1.125 → 1
  EXPECT_EQ(float_to_e4m3(1.1875f), 0x3a);  // 1 + 3/16: tie 1.125 | 1.25 → 1.25
  EXPECT_EQ(float_to_e4m3(1.07f), 0x39);    // above the tie
  EXPECT_EQ(float_to_e4m3(232.0f), 0x76);   // tie 224 (1.110b · 2^7) | 240 → 224
  EXPECT_EQ(float_to_e4m3(248.0f), 0x78);   // tie 240 (1.111b · 2^7) | 256 → 256 (1.000b · 2^8)
  EXPECT_EQ(float_to_e4m3(149.3f), 0x71);   // 144 = 1.001b · 2^7 is nearer than 160
}

// P · 448 of the fp8 P·V modes: the e4m3 code 8 · x + 126, rounded and clamped (method.md §2).
TEST(PCode, HandComputedCodes) {
  EXPECT_EQ(p8_from_code(0.0f), 448.0f);      // code 126 = 0x7e
  EXPECT_EQ(p8_from_code(-1.0f), 224.0f);     // 118 = 0x76: one power of two lower
  EXPECT_EQ(p8_from_code(-0.5f), 320.0f);     // 122 = 0x7a = 1.010b · 2^8 (448 · 2^-0.5 = 316.8)
  EXPECT_EQ(p8_from_code(-0.0625f), 448.0f);  // 125.5: tie 125 | 126 → 126 (even)
  EXPECT_EQ(p8_from_code(-0.1875f), 384.0f);  // 124.5: tie 124 | 125 → 124 = 0x7c = 1.100b · 2^8
  EXPECT_EQ(p8_from_code(-14.75f), 0.015625f);       // 8 = 0x08: 2^-6, the smallest normal
  EXPECT_EQ(p8_from_code(-15.0f), 6 * std::ldexp(1.0f, -9));  // 6: a subnormal
  EXPECT_EQ(p8_from_code(-15.7f), 0.0f);      // 0.4 → 0
  EXPECT_EQ(p8_from_code(-100.0f), 0.0f);
  EXPECT_EQ(p8_from_code(-kInf), 0.0f);
  EXPECT_EQ(p8_from_code(0.01f), 448.0f);     // clamped at 126 (never 0x7f = NaN)
  EXPECT_EQ(p8_from_code(kNaN), 0.0f);       // as the GPU's fma.sat
}

TEST(PCode, MonotoneAndWithinItsBoundOfExp2) {
  float previous = 0.0f;
  for (int i = -14750; i <= 0; ++i) {  // e4m3(2^x · 448) normal
    const float x = static_cast<float>(i) / 1000.0f;
    const float p8 = p8_from_code(x);
    EXPECT_GE(p8, previous) << x;
    previous = p8;
    const double ratio = p8 / (448.0 * std::exp2(static_cast<double>(x)));
    EXPECT_GE(ratio, 0.92) << x;
    EXPECT_LE(ratio, 1.065) << x;
  }
}

TEST(E4m3, NaN) {
  EXPECT_EQ(float_to_e4m3(kNaN) & 0x7f, 0x7f);
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xff)));
}

TEST(E4m3, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN
    EXPECT_EQ(float_to_e4m3(e4m3_to_float(static_cast<uint8_t>(c))), c) << "code " << c;
  }
}

TEST(Fp16, ExactValuesAndOverflow) {
  EXPECT_EQ(float_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_fp16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_fp16(65504.0f), 0x7bff);  // the largest finite
  EXPECT_EQ(float_to_fp16(65519.0f), 0x7bff);  // under the tie
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);  // tie 65504 | 65536 → even → overflows to inf
  EXPECT_EQ(float_to_fp16(kInf), 0x7c00);
  EXPECT_EQ(float_to_fp16(-kInf), 0xfc00);
  EXPECT_EQ((float_to_fp16(kNaN) & 0x7e00), 0x7e00);
  EXPECT_TRUE(std::isnan(fp16_to_float(0x7e00)));
  EXPECT_EQ(fp16_to_float(0x7bff), 65504.0f);
}

TEST(Fp16, SubnormalsAndTies) {
  const float step = std::ldexp(1.0f, -24);
  EXPECT_EQ(float_to_fp16(step), 0x0001);
  EXPECT_EQ(float_to_fp16(0.5f * step), 0x0000);                       // tie 0 | 1 → even
  EXPECT_EQ(float_to_fp16(1.5f * step), 0x0002);                       // tie 1 | 2 → even
  EXPECT_EQ(fp16_to_float(0x03ff), 1023 * step);                       // the largest subnormal
  EXPECT_EQ(float_to_fp16(std::ldexp(1.0f, -14)), 0x0400);             // the smallest normal
  EXPECT_EQ(float_to_fp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie → even
  EXPECT_EQ(float_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie → even
}

TEST(Fp16, EveryCodeRoundTrips) {
  for (uint32_t c = 0; c < 65536; ++c) {
    if ((c & 0x7c00) == 0x7c00 && (c & 0x03ff) != 0) continue;  // NaN
    ASSERT_EQ(float_to_fp16(fp16_to_float(static_cast<uint16_t>(c))), c) << "code " << c;
  }
}

TEST(Bf16, RoundingAndSpecials) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie → even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie → even
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -7)), 0x3f81);
  EXPECT_EQ(float_to_bf16(-kInf), 0xff80);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(kNaN))));
  EXPECT_EQ(bf16_to_float(0x4049), 3.140625f);
  for (uint32_t c = 0; c < 65536; ++c) {
    if ((c & 0x7f80) == 0x7f80 && (c & 0x007f) != 0) continue;  // NaN
    ASSERT_EQ(float_to_bf16(bf16_to_float(static_cast<uint16_t>(c))), c) << "code " << c;
  }
}

TEST(Int8, RoundsToNearestEvenAndClamps) {
  EXPECT_EQ(quantize_int8(0.5f, 1.0f), 0);
  EXPECT_EQ(quantize_int8(1.5f, 1.0f), 2);
  EXPECT_EQ(quantize_int8(2.5f, 1.0f), 2);
  EXPECT_EQ(quantize_int8(-2.5f, 1.0f), -2);
  EXPECT_EQ(quantize_int8(-63.5f, 1.0f), -64);
  EXPECT_EQ(quantize_int8(1.0f, 31.75f), 32);  // 1 · 127 / 4
  EXPECT_EQ(quantize_int8(4.0f, 31.75f), 127);
  EXPECT_EQ(quantize_int8(200.0f, 1.0f), 127);
  EXPECT_EQ(quantize_int8(-200.0f, 1.0f), -127);  // symmetric: never −128
  EXPECT_EQ(quantize_int8(5.0f, 0.0f), 0);        // inv = 0 for an all-zero group
}

}  // namespace
}  // namespace sparge::num
