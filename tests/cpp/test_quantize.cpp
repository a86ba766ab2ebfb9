// Stage 0 (method.md §0) on hand-computed cases: INT8 groups of every granularity, smoothing,
// zero groups, V in every P·V format with its padded transposed layout, the LSE shift and the
// block statistics.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "test_util.h"

namespace sparge::test {
namespace {

std::vector<int8_t> int8s(const int8_t* p, int64_t n) { return {p, p + n}; }
std::vector<float> floats(const float* p, int64_t n) { return {p, p + n}; }

// Keys 0 .. n-1 of one V^T row in key order (the row stores key t at v_key_slot(t, pv)).
template <typename T>
std::vector<T> v_row_keys(const T* row, int64_t n, PvPrecision pv) {
  std::vector<T> out(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) out[static_cast<size_t>(t)] = row[v_key_slot(t, pv)];
  return out;
}

// One head, D = 2, three tokens:
//   q = [[1, -2], [0.5, 4], [0, 0]]   k = [[1, 2], [3, 4], [5, 9]]   v = [[1, 3], [-2, 1], [0.5, 0]]
struct SmallProblem {
  Shape shape{.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 3, .len_k = 3, .head_dim = 2};
  QKV x{tensor_of(1, 1, 3, 2, {1, -2, 0.5f, 4, 0, 0}), tensor_of(1, 1, 3, 2, {1, 2, 3, 4, 5, 9}),
        tensor_of(1, 1, 3, 2, {1, 3, -2, 1, 0.5f, 0})};
};

TEST(Quantize, SmallProblemByHand) {
  SmallProblem pb;
  const QuantOptions quant{.sm_scale = 0.5f, .granularity = QuantGranularity::kPerBlock};
  StageWorkspace ws(pb.shape, {}, quant);
  const QuantizedQKV& out = ws.buffers.quantized;
  ASSERT_TRUE(run_quantize(pb.shape, {}, quant, pb.x, out).ok());

  // Q: one group, amax 4, inv = 31.75: 1 → 31.75 → 32, −2 → −63.5 → −64 (tie to even), 0.5 → 16.
  EXPECT_EQ(int8s(out.q, 6), (std::vector<int8_t>{32, -64, 16, 127, 0, 0}));
  EXPECT_EQ(out.q_scale[0], 4.0f / 127.0f * (0.5f * kLog2e));  // dequant · sm_scale · log2 e
  // K: mean [3, 5]; k̃ = [[−2, −3], [0, −1], [2, 4]], amax 4, inv = 31.75.
  EXPECT_EQ(floats(out.k_mean, 2), (std::vector<float>{3, 5}));
  EXPECT_EQ(int8s(out.k, 6), (std::vector<int8_t>{-64, -95, 0, -32, 64, 127}));
  EXPECT_EQ(out.k_scale[0], 4.0f / 127.0f);
  // LSE shift: sm_scale · (q · k_mean).
  EXPECT_EQ(floats(out.lse_shift, 3), (std::vector<float>{-3.5f, 10.75f, 0.0f}));
  // V, channel 0: amax 2, values · 224 = [224, −448, 112]; channel 1: amax 3, [448, 149.33 → 144, 0].
  EXPECT_EQ(floats(out.v_scale, 2), (std::vector<float>{2.0f / 448.0f, 3.0f / 448.0f}));
  const auto* v = static_cast<const uint8_t*>(out.v);  // [D, Lk_pad = 64], keys at v_key_slot
  EXPECT_EQ(v_row_keys(v, 3, PvPrecision::kFp8), (std::vector<uint8_t>{0x76, 0xfe, 0x6e}));
  EXPECT_EQ(v_row_keys(v + 64, 3, PvPrecision::kFp8), (std::vector<uint8_t>{0x7e, 0x71, 0x00}));
  EXPECT_EQ(v[4], 0x6e) << "key 2 sits at slot 4 of its 16-key group";
  // Block statistics (one Q block, one K block). q rows 0 and 1 have cosine −7.5 / √81.25, row 2 is
  // zero: sim = 2 · cos / (3 · 2). k̃ rows pairwise cosines 3/√13, −16/√260, −4/√20.
  EXPECT_FLOAT_EQ(out.q_pool[0], 0.5f);
  EXPECT_FLOAT_EQ(out.q_pool[1], 2.0f / 3.0f);
  EXPECT_NEAR(out.q_sim[0], 2.0 * (-7.5 / std::sqrt(81.25)) / 6.0, 1e-6);
  EXPECT_NEAR(out.k_pool[0], 0.0f, 1e-6);
  EXPECT_NEAR(out.k_pool[1], 0.0f, 1e-6);
  const double k_cos_sum = 3.0 / std::sqrt(13.0) - 16.0 / std::sqrt(260.0) - 4.0 / std::sqrt(20.0);
  EXPECT_NEAR(out.k_sim[0], 2.0 * k_cos_sum / 6.0, 1e-6);
}

TEST(Quantize, WithoutSmoothingKIsRaw) {
  SmallProblem pb;
  const QuantOptions quant{.sm_scale = 0.5f, .smooth_k = false, .granularity = QuantGranularity::kPerBlock};
  StageWorkspace ws(pb.shape, {}, quant);
  const QuantizedQKV& out = ws.buffers.quantized;
  ASSERT_TRUE(run_quantize(pb.shape, {}, quant, pb.x, out).ok());
  EXPECT_EQ(floats(out.k_mean, 2), (std::vector<float>{0, 0}));
  // amax 9, inv = 127/9: 1 → 14.11 → 14, 2 → 28.2 → 28, 3 → 42.3 → 42, 4 → 56.4 → 56, 5 → 70.6 → 71.
  EXPECT_EQ(int8s(out.k, 6), (std::vector<int8_t>{14, 28, 42, 56, 71, 127}));
  EXPECT_EQ(out.k_scale[0], 9.0f / 127.0f);
  EXPECT_EQ(floats(out.lse_shift, 3), (std::vector<float>{0, 0, 0}));
  EXPECT_FLOAT_EQ(out.k_pool[0], 3.0f);
  EXPECT_FLOAT_EQ(out.k_pool[1], 5.0f);
}

TEST(Quantize, VInFp16) {
  SmallProblem pb;
  const QuantOptions quant{.pv = PvPrecision::kFp16};
  StageWorkspace ws(pb.shape, {}, quant);
  const QuantizedQKV& out = ws.buffers.quantized;
  ASSERT_TRUE(run_quantize(pb.shape, {}, quant, pb.x, out).ok());
  const auto* v = static_cast<const uint16_t*>(out.v);  // [D, Lk_pad = 64] fp16 bits
  EXPECT_EQ(std::vector<uint16_t>(v, v + 3), (std::vector<uint16_t>{0x5b00, 0xdf00, 0x5700}));  // 224, −448, 112
  EXPECT_EQ(num::fp16_to_float(v[64]), 448.0f);
  EXPECT_EQ(num::fp16_to_float(v[65]), 149.375f);  // 448/3 = 149.33 to the 1/8 grid
  EXPECT_EQ(v[66], 0);
  for (int64_t t = 3; t < 64; ++t) ASSERT_EQ(v[t], 0) << "padding of channel 0 at token " << t;
}

TEST(Quantize, Fp8VKeySlotsAreTheAFragmentOrder) {
  // Lane t of a quad holds S columns 2t + b of n-tiles a = 0, 1 (keys 8a + 2t + b of a 16-key
  // group); the 8-bit A fragment of a k32 step takes bytes 4t .. 4t + 3 from lane t (PTX ISA,
  // m16n8k32 / wgmma .e4m3 register fragments).
  for (PvPrecision pv : {PvPrecision::kFp8, PvPrecision::kFp8Fp16Accum}) {
    for (int64_t group = 0; group < 4; ++group) {
      for (int64_t t = 0; t < 4; ++t) {
        for (int64_t a = 0; a < 2; ++a) {
          for (int64_t b = 0; b < 2; ++b) {
            const int64_t key = 16 * group + 8 * a + 2 * t + b;
            EXPECT_EQ(v_key_slot(key, pv), 16 * group + 4 * t + 2 * a + b) << "key " << key;
            EXPECT_EQ(v_slot_key(v_key_slot(key, pv), pv), key) << "key " << key;
          }
        }
      }
    }
  }
  for (int64_t key = 0; key < 64; ++key) {
    EXPECT_EQ(v_key_slot(key, PvPrecision::kFp16), key);
    EXPECT_EQ(v_slot_key(key, PvPrecision::kFp16), key);
  }
}

TEST(Quantize, VInFp8ForTheFp16Accumulator) {
  // kFp8Fp16Accum: v_scale = amax / 2.25; channel 0 (amax 2): v · 1.125 = [1.125, −2.25, 0.5625];
  // channel 1 (amax 3): v · 0.75 = [2.25, 0.75, 0], all exact in e4m3.
  SmallProblem pb;
  const QuantOptions quant{.pv = PvPrecision::kFp8Fp16Accum};
  StageWorkspace ws(pb.shape, {}, quant);
  const QuantizedQKV& out = ws.buffers.quantized;
  ASSERT_TRUE(run_quantize(pb.shape, {}, quant, pb.x, out).ok());
  EXPECT_EQ(floats(out.v_scale, 2), (std::vector<float>{2.0f / 2.25f, 3.0f / 2.25f}));
  const auto* v = static_cast<const uint8_t*>(out.v);  // [D, Lk_pad = 64] e4m3, keys at v_key_slot
  const std::vector<uint8_t> channel0 = v_row_keys(v, 64, PvPrecision::kFp8Fp16Accum);
  EXPECT_EQ(std::vector<uint8_t>(channel0.begin(), channel0.begin() + 3), (std::vector<uint8_t>{0x39, 0xc1, 0x31}));
  EXPECT_EQ(v_row_keys(v + 64, 3, PvPrecision::kFp8Fp16Accum), (std::vector<uint8_t>{0x41, 0x34, 0x00}));
  EXPECT_EQ(num::e4m3_to_float(channel0[1]), -2.25f);
  for (int64_t t = 3; t < 64; ++t) ASSERT_EQ(channel0[t], 0) << "padding of channel 0 at token " << t;
}

TEST(Quantize, VPaddingIsZero) {
  for (int64_t len_k : {1, 63, 64, 65, 130}) {
    SCOPED_TRACE(len_k);
    const uint32_t seed = fresh_seed();
    SCOPED_TRACE(seed);
    const Shape shape{.batch = 2, .heads_q = 2, .heads_kv = 2, .len_q = 5, .len_k = len_k, .head_dim = 3};
    for (PvPrecision pv : {PvPrecision::kFp8, PvPrecision::kFp16, PvPrecision::kFp8Fp16Accum}) {
      SCOPED_TRACE(static_cast<int>(pv));
      const QuantOptions quant{.pv = pv};
      StageWorkspace ws(shape, {}, quant, 0xFF);
      const QKV x = make_structured(shape, DType::kFloat32, Layout::kHND, seed);
      ASSERT_TRUE(run_quantize(shape, {}, quant, x, ws.buffers.quantized).ok());
      const int64_t pad = padded_len_k(len_k);
      const bool fp8 = pv != PvPrecision::kFp16;
      const int64_t bytes = fp8 ? 1 : 2;
      const float v_max = pv == PvPrecision::kFp8Fp16Accum ? 2.25f : 448.0f;
      const auto* v = static_cast<const unsigned char*>(ws.buffers.quantized.v);
      for (int64_t channel = 0; channel < 2 * 2 * 3; ++channel) {
        for (int64_t t = len_k; t < pad; ++t) {
          const unsigned char* at = v + (channel * pad + v_key_slot(t, pv)) * bytes;
          ASSERT_TRUE(std::all_of(at, at + bytes, [](unsigned char c) { return c == 0; }))
              << "channel " << channel << ", padding key " << t;
        }
      }
      // Every stored value is x · v_max / amax of its channel in the format, v_max = 448, or 2.25
      // for the fp16 accumulator (|v_q| <= 2.25).
      const float* scale = ws.buffers.quantized.v_scale;
      for (int64_t b = 0; b < 2; ++b) {
        for (int64_t h = 0; h < 2; ++h) {
          for (int64_t d = 0; d < 3; ++d) {
            const int64_t channel = (b * 2 + h) * 3 + d;
            float amax = 0.0f;
            for (int64_t t = 0; t < len_k; ++t) amax = std::max(amax, std::fabs(x.v.get(b, h, t, d)));
            ASSERT_EQ(scale[channel], amax / v_max);
            for (int64_t t = 0; t < len_k; ++t) {
              const float scaled = x.v.get(b, h, t, d) * (v_max / amax);
              if (fp8) {
                const unsigned char stored = v[channel * pad + v_key_slot(t, pv)];
                ASSERT_EQ(stored, num::float_to_e4m3(scaled));
                ASSERT_LE(std::fabs(num::e4m3_to_float(stored)), v_max);
              } else {
                uint16_t bits;
                std::memcpy(&bits, v + 2 * (channel * pad + t), 2);
                ASSERT_EQ(bits, num::float_to_fp16(scaled));
              }
            }
          }
        }
      }
    }
  }
}

// Row r of q (token r of k) holds the values ±(r + 1), so the amax of a group is 1 + its largest
// member row: the stored scales reveal the group membership.
QKV rows_with_distinct_amax(const Shape& s) {
  QKV x{HostTensor(1, 1, s.len_q, s.head_dim, DType::kFloat32), HostTensor(1, 1, s.len_k, s.head_dim, DType::kFloat32),
        HostTensor(1, 1, s.len_k, s.head_dim, DType::kFloat32)};
  for (int64_t d = 0; d < s.head_dim; ++d) {
    const float sign = d % 2 == 0 ? 1.0f : -1.0f;
    for (int64_t r = 0; r < s.len_q; ++r) x.q.set(0, 0, r, d, sign * static_cast<float>(r + 1) / (d + 1));
    for (int64_t c = 0; c < s.len_k; ++c) {
      x.k.set(0, 0, c, d, sign * static_cast<float>(c + 1) / (d + 1));
      x.v.set(0, 0, c, d, 1.0f);
    }
  }
  return x;
}

TEST(Quantize, ScaleGroupsOfEveryGranularity) {
  const Shape shape{.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 45, .len_k = 150, .head_dim = 4};
  const QKV x = rows_with_distinct_amax(shape);
  const float c = 0.5f * kLog2e;  // sm_scale = 0.5
  auto q_scale_of = [&](float amax) { return amax / 127.0f * c; };
  auto k_scale_of = [](float amax) { return amax / 127.0f; };

  struct Expect {
    QuantGranularity g;
    std::vector<std::pair<int64_t, float>> q;  // (group, amax)
    std::vector<std::pair<int64_t, float>> k;
  };
  const std::vector<Expect> cases = {
      // 64-row groups: Q rows 0..44 → 45; K tokens 0..63 → 64, 64..127 → 128, 128..149 → 150.
      {QuantGranularity::kPerBlock, {{0, 45}}, {{0, 64}, {1, 128}, {2, 150}}},
      // Q 16-row groups: 0..15 → 16, 16..31 → 32, 32..44 → 45; K as per-block.
      {QuantGranularity::kPerWarp, {{0, 16}, {1, 32}, {2, 45}}, {{0, 64}, {1, 128}, {2, 150}}},
      // Q rows {r, r+8} of each 16-row tile: group 3 = rows 3, 11; group 8 = rows 16, 24;
      // group 20 = rows 36, 44; group 21 = row 37 alone (45 is past Lq).
      // K tokens with equal (c % 8) / 2 in each 64: group 0 = {0, 1, 8, 9, ..., 56, 57};
      // group 3 = {.., 62, 63}; group 4 = {64, 65, ..., 120, 121}; group 10 = {.., 148, 149};
      // group 11 = {134, 135, 142, 143}.
      {QuantGranularity::kPerThread,
       {{3, 12}, {8, 25}, {20, 45}, {21, 38}},
       {{0, 58}, {3, 64}, {4, 122}, {10, 150}, {11, 144}}},
  };
  for (const Expect& e : cases) {
    SCOPED_TRACE(static_cast<int>(e.g));
    const QuantOptions quant{.sm_scale = 0.5f, .smooth_k = false, .granularity = e.g};
    StageWorkspace ws(shape, {}, quant);
    const QuantizedQKV& out = ws.buffers.quantized;
    ASSERT_TRUE(run_quantize(shape, {}, quant, x, out).ok());
    for (const auto& [g, amax] : e.q) EXPECT_EQ(out.q_scale[g], q_scale_of(amax)) << "q group " << g;
    for (const auto& [g, amax] : e.k) EXPECT_EQ(out.k_scale[g], k_scale_of(amax)) << "k group " << g;

    // Every group and every value, from the maps of layout.h.
    std::vector<float> q_amax(q_scale_groups(shape.len_q, e.g), 0.0f), k_amax(k_scale_groups(shape.len_k, e.g), 0.0f);
    for (int64_t r = 0; r < shape.len_q; ++r)
      q_amax[q_scale_group(r, e.g)] = std::max(q_amax[q_scale_group(r, e.g)], r + 1.0f);
    for (int64_t t = 0; t < shape.len_k; ++t)
      k_amax[k_scale_group(t, e.g)] = std::max(k_amax[k_scale_group(t, e.g)], t + 1.0f);
    for (size_t g = 0; g < q_amax.size(); ++g) ASSERT_EQ(out.q_scale[g], q_scale_of(q_amax[g])) << "q group " << g;
    for (size_t g = 0; g < k_amax.size(); ++g) ASSERT_EQ(out.k_scale[g], k_scale_of(k_amax[g])) << "k group " << g;
    for (int64_t r = 0; r < shape.len_q; ++r) {
      for (int64_t d = 0; d < shape.head_dim; ++d) {
        ASSERT_EQ(out.q[r * shape.head_dim + d],
                  num::quantize_int8(x.q.get(0, 0, r, d), 127.0f / q_amax[q_scale_group(r, e.g)]))
            << "q row " << r << " channel " << d;
      }
    }
    for (int64_t t = 0; t < shape.len_k; ++t) {
      for (int64_t d = 0; d < shape.head_dim; ++d) {
        ASSERT_EQ(out.k[t * shape.head_dim + d],
                  num::quantize_int8(x.k.get(0, 0, t, d), 127.0f / k_amax[k_scale_group(t, e.g)]))
            << "k token " << t << " channel " << d;
      }
    }
  }
}

TEST(Quantize, ZeroAndEmptyGroupsHaveScaleZero) {
  // Lq = 35, per-thread: the third tile holds rows 32..34 only, so groups 19..23 are empty.
  // Rows 16..31 are zero, so per-warp group 1 and per-thread groups 8..15 are all-zero.
  const Shape shape{.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 35, .len_k = 3, .head_dim = 4};
  QKV x = rows_with_distinct_amax(shape);
  for (int64_t r = 16; r < 32; ++r)
    for (int64_t d = 0; d < 4; ++d) x.q.set(0, 0, r, d, 0.0f);
  for (QuantGranularity g : {QuantGranularity::kPerWarp, QuantGranularity::kPerThread}) {
    const QuantOptions quant{.granularity = g};
    StageWorkspace ws(shape, {}, quant);
    const QuantizedQKV& out = ws.buffers.quantized;
    ASSERT_TRUE(run_quantize(shape, {}, quant, x, out).ok());
    for (int64_t r = 16; r < 32; ++r) {
      EXPECT_EQ(out.q_scale[q_scale_group(r, g)], 0.0f) << "row " << r;
      for (int64_t d = 0; d < 4; ++d) EXPECT_EQ(out.q[r * 4 + d], 0);
    }
    if (g == QuantGranularity::kPerThread) {
      for (int64_t group = 19; group < 24; ++group) EXPECT_EQ(out.q_scale[group], 0.0f) << "empty group " << group;
    }
    EXPECT_GT(out.q_scale[q_scale_group(0, g)], 0.0f);
  }
}

TEST(Quantize, DefaultSmScaleIsInverseSqrtHeadDim) {
  const Shape shape{.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 1, .len_k = 1, .head_dim = 4};
  const QKV x{tensor_of(1, 1, 1, 4, {1, 2, 3, -8}), tensor_of(1, 1, 1, 4, {1, 1, 1, 1}),
              tensor_of(1, 1, 1, 4, {1, 1, 1, 1})};
  const QuantOptions quant{};
  StageWorkspace ws(shape, {}, quant);
  ASSERT_TRUE(run_quantize(shape, {}, quant, x, ws.buffers.quantized).ok());
  EXPECT_EQ(ws.buffers.quantized.q_scale[0], 8.0f / 127.0f * (0.5f * kLog2e));  // 4^-0.5 = 0.5
}

TEST(Quantize, BlockStatistics) {
  // D = 16, block_q = block_k = 16. Q blocks: rows 0..15 identical; rows 16..31 the orthogonal
  // (d + 1) · e_d; rows 32..47 alternate x and −x; rows 48..63 alternate 5 · e_0 and zero rows;
  // row 64 alone.
  const int64_t dim = 16;
  const Shape shape{.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 65, .len_k = 33, .head_dim = dim};
  const BlockConfig blocks{.block_q = 16, .block_k = 16};
  HostTensor q(1, 1, 65, dim, DType::kFloat32);
  q.fill(0.0f);
  for (int64_t r = 0; r < 65; ++r) {
    const float sign = r % 2 == 0 ? 1.0f : -1.0f;
    if (r < 16) {
      q.set(0, 0, r, 0, 0.3f);
      q.set(0, 0, r, 1, -1.7f);
    } else if (r < 32) {
      q.set(0, 0, r, r - 16, static_cast<float>(r - 15));
    } else if (r < 48) {
      q.set(0, 0, r, 0, sign);
      q.set(0, 0, r, 1, 2.0f * sign);
    } else if (r < 64) {
      q.set(0, 0, r, 0, r % 2 == 0 ? 5.0f : 0.0f);
    } else {
      q.set(0, 0, r, 0, 7.0f);
      q.set(0, 0, r, 1, -1.0f);
    }
  }
  // K: 33 identical tokens. Smoothed, k̃ = 0: sim 0 for the 16-token blocks, 1 for the lone
  // token 32, pools 0. Without smoothing: sim 1 and pool = the token.
  HostTensor k(1, 1, 33, dim, DType::kFloat32), v(1, 1, 33, dim, DType::kFloat32);
  k.fill(0.0f);
  v.fill(1.0f);
  for (int64_t t = 0; t < 33; ++t) {
    k.set(0, 0, t, 0, 1.5f);
    k.set(0, 0, t, 1, 0.5f);
  }
  const QKV x{q, k, v};
  for (bool smooth : {true, false}) {
    SCOPED_TRACE(smooth);
    const QuantOptions quant{.smooth_k = smooth};
    StageWorkspace ws(shape, blocks, quant);
    const QuantizedQKV& out = ws.buffers.quantized;
    ASSERT_TRUE(run_quantize(shape, blocks, quant, x, out).ok());
    EXPECT_NEAR(out.q_sim[0], 1.0f, 1e-6);            // identical rows
    EXPECT_EQ(out.q_sim[1], 0.0f);                    // orthogonal rows: (16 − 16) / (16 · 15)
    EXPECT_NEAR(out.q_sim[2], -1.0f / 15.0f, 1e-6);   // Σ x̂ = 0: (0 − 16) / (16 · 15)
    EXPECT_NEAR(out.q_sim[3], 56.0f / 240.0f, 1e-6);  // 8 equal rows, 8 zero rows: (64 − 8) / (16 · 15)
    EXPECT_EQ(out.q_sim[4], 1.0f);                    // n = 1
    EXPECT_FLOAT_EQ(out.q_pool[0], 0.3f);
    EXPECT_FLOAT_EQ(out.q_pool[1], -1.7f);
    for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(out.q_pool[dim + d], (d + 1) / 16.0f) << d;
    EXPECT_EQ(out.q_pool[2 * dim], 0.0f);
    EXPECT_EQ(out.q_pool[3 * dim], 2.5f);
    EXPECT_EQ(out.q_pool[4 * dim], 7.0f);
    EXPECT_EQ(out.q_pool[4 * dim + 1], -1.0f);
    for (int64_t j = 0; j < 3; ++j) {
      if (smooth) {
        EXPECT_EQ(out.k_sim[j], j < 2 ? 0.0f : 1.0f) << "block " << j;
        EXPECT_EQ(out.k_pool[dim * j], 0.0f);
      } else {
        EXPECT_NEAR(out.k_sim[j], 1.0f, 1e-6) << "block " << j;
        EXPECT_FLOAT_EQ(out.k_pool[dim * j], 1.5f);
        EXPECT_FLOAT_EQ(out.k_pool[dim * j + 1], 0.5f);
      }
    }
  }
}

TEST(Quantize, GqaLseShiftUsesTheKvHeadMean) {
  // Hq = 4, Hkv = 2: K of kv head 0 is constantly [1, 0], of kv head 1 [0, 1]; q of head h is
  // [h + 1, 10 (h + 1)]. lse_shift = sm_scale · (q · k_mean).
  const Shape shape{.batch = 1, .heads_q = 4, .heads_kv = 2, .len_q = 1, .len_k = 2, .head_dim = 2};
  const QKV x{tensor_of(1, 4, 1, 2, {1, 10, 2, 20, 3, 30, 4, 40}), tensor_of(1, 2, 2, 2, {1, 0, 1, 0, 0, 1, 0, 1}),
              tensor_of(1, 2, 2, 2, {1, 1, 1, 1, 1, 1, 1, 1})};
  const QuantOptions quant{.sm_scale = 0.25f};
  StageWorkspace ws(shape, {}, quant);
  ASSERT_TRUE(run_quantize(shape, {}, quant, x, ws.buffers.quantized).ok());
  EXPECT_EQ(floats(ws.buffers.quantized.lse_shift, 4), (std::vector<float>{0.25f, 0.5f, 7.5f, 10.0f}));
}

TEST(Quantize, LayoutsStridesAndDtypesAgree) {
  // HND and NHD, and kv heads expanded with head stride 0, give byte-identical stage buffers.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  const Shape shape{.batch = 2, .heads_q = 4, .heads_kv = 2, .len_q = 37, .len_k = 70, .head_dim = 24};
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    SCOPED_TRACE(static_cast<int>(dtype));
    const QuantOptions quant{.granularity = QuantGranularity::kPerThread};
    const QKV hnd = make_structured(shape, dtype, Layout::kHND, seed);
    QKV nhd{HostTensor(2, 4, 37, 24, dtype, Layout::kNHD), HostTensor(2, 2, 70, 24, dtype, Layout::kNHD),
            HostTensor(2, 2, 70, 24, dtype, Layout::kNHD)};
    for (auto [from, to] : {std::pair{&hnd.q, &nhd.q}, std::pair{&hnd.k, &nhd.k}, std::pair{&hnd.v, &nhd.v}}) {
      for (int64_t b = 0; b < from->batch; ++b)
        for (int64_t h = 0; h < from->heads; ++h)
          for (int64_t t = 0; t < from->len; ++t)
            for (int64_t d = 0; d < from->dim; ++d) to->set(b, h, t, d, from->get(b, h, t, d));
    }
    StageWorkspace a(shape, {}, quant), b(shape, {}, quant);
    ASSERT_TRUE(run_quantize(shape, {}, quant, hnd, a.buffers.quantized).ok());
    ASSERT_TRUE(run_quantize(shape, {}, quant, nhd, b.buffers.quantized).ok());
    EXPECT_EQ(std::memcmp(a.memory.data(), b.memory.data(), a.memory.size()), 0);
  }

  // Two kv heads that are one head expanded (stride 0) equal two stored copies.
  const Shape expanded{.batch = 1, .heads_q = 2, .heads_kv = 2, .len_q = 20, .len_k = 20, .head_dim = 16};
  const Shape single{.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 20, .len_k = 20, .head_dim = 16};
  const QKV one = make_structured(single, DType::kFloat16, Layout::kHND, seed);
  QKV copies{one.q, HostTensor(1, 2, 20, 16, DType::kFloat16), HostTensor(1, 2, 20, 16, DType::kFloat16)};
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t t = 0; t < 20; ++t)
      for (int64_t d = 0; d < 16; ++d) {
        copies.k.set(0, h, t, d, one.k.get(0, 0, t, d));
        copies.v.set(0, h, t, d, one.v.get(0, 0, t, d));
      }
  Inputs broadcast = inputs_of(one);
  broadcast.k_strides.head = 0;
  broadcast.v_strides.head = 0;
  const QuantOptions quant{};
  StageWorkspace a(expanded, {}, quant), b(expanded, {}, quant);
  ASSERT_TRUE(run_quantize(expanded, {}, quant, copies, a.buffers.quantized).ok());
  ASSERT_TRUE(
      quantize(QuantizeParams{.shape = expanded, .in = broadcast, .quant = quant, .out = b.buffers.quantized}).ok());
  EXPECT_EQ(std::memcmp(a.memory.data(), b.memory.data(), a.memory.size()), 0);
}

TEST(Quantize, EmptySequences) {
  // Lk = 0: k_mean and v_scale are 0, lse_shift is 0, Q is still quantized; K/V pointers may be null.
  const Shape no_keys{.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 3, .len_k = 0, .head_dim = 2};
  const QKV x{tensor_of(1, 2, 3, 2, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}), HostTensor(), HostTensor()};
  const QuantOptions quant{};
  StageWorkspace ws(no_keys, {}, quant);
  const QuantizedQKV& out = ws.buffers.quantized;
  Inputs in = inputs_of(x);
  in.k = in.v = nullptr;
  ASSERT_TRUE(quantize(QuantizeParams{.shape = no_keys, .in = in, .quant = quant, .out = out}).ok());
  EXPECT_EQ(floats(out.k_mean, 2), (std::vector<float>{0, 0}));
  EXPECT_EQ(floats(out.v_scale, 2), (std::vector<float>{0, 0}));
  EXPECT_EQ(floats(out.lse_shift, 6), (std::vector<float>(6, 0.0f)));
  EXPECT_EQ(out.q[11], 127);

  // Lq = 0: K and V are quantized; Q pointers may be null.
  const Shape no_queries{.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 0, .len_k = 3, .head_dim = 2};
  SmallProblem pb;
  StageWorkspace ws2(no_queries, {}, quant);
  QuantizedQKV out2 = ws2.buffers.quantized;
  out2.q = nullptr;
  out2.q_scale = out2.lse_shift = out2.q_pool = out2.q_sim = nullptr;
  in = inputs_of(pb.x);
  in.q = nullptr;
  ASSERT_TRUE(quantize(QuantizeParams{.shape = no_queries, .in = in, .quant = quant, .out = out2}).ok());
  EXPECT_EQ(floats(out2.k_mean, 2), (std::vector<float>{3, 5}));
}

}  // namespace
}  // namespace sparge::test
