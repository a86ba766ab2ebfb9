// Stage 2 (method.md §2) beyond accuracy: exact equalities between equivalent requests, the
// per-16-row-group P·V skip against a brute-force recomputation, per-head parameters, the cost
// counters, output strides, thread-count independence, and P·V with the fp16 accumulator.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "reference_attention.h"
#include "test_util.h"

namespace sparge::test {
namespace {

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Both runs succeeded with bit-identical o and lse and equal statistics.
void expect_same_result(const AttentionResult& a, const AttentionResult& b) {
  ASSERT_TRUE(a.status.ok()) << a.status.message();
  ASSERT_TRUE(b.status.ok()) << b.status.message();
  EXPECT_TRUE(same_bits(a.o, b.o));
  EXPECT_TRUE(same_bits(a.lse, b.lse));
  EXPECT_EQ(a.stats, b.stats);
}

// Rows [row_begin, row_end) of a [B·Hq·Lq, D] output.
std::vector<float> rows_of(const std::vector<float>& o, int64_t dim, int64_t row_begin, int64_t row_end) {
  return {o.begin() + row_begin * dim, o.begin() + row_end * dim};
}

TEST(Attend, AllAllowedBlockMaskEqualsDenseBitForBit) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Shape shape{.batch = 2, .heads_q = 2, .heads_kv = 1, .len_q = 150, .len_k = 230, .head_dim = 48};
  const BlockConfig blocks{.block_q = 64, .block_k = 32};
  const auto [nbq, nbk] = block_counts(shape, blocks);
  std::vector<uint8_t> all(static_cast<size_t>(2 * 2 * nbq * nbk));
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint8_t>(1 + i % 255);  // any nonzero value
  for (Causal causal : {Causal::kNone, Causal::kTopLeft, Causal::kBottomRight}) {
    SCOPED_TRACE(static_cast<int>(causal));
    Case dense{.shape = shape, .blocks = blocks, .causal = causal};
    Case masked = dense;
    masked.select = {.mode = SelectMode::kBlockMask, .block_mask = all.data()};
    const QKV x = make_structured(dense, seed);
    expect_same_result(run_attention(dense, x), run_attention(masked, x));
  }
}

TEST(Attend, BroadcastKvHeadsEqualMqaBitForBit) {
  // Four kv heads that are one head expanded with head stride 0 are MQA with Hkv = 1.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Case mqa{.shape = {.batch = 2, .heads_q = 4, .heads_kv = 1, .len_q = 100, .len_k = 140, .head_dim = 32},
                 .causal = Causal::kBottomRight,
                 .select = {.mode = SelectMode::kTopK, .topk = {0.5f}}};
  Case expanded = mqa;
  expanded.shape.heads_kv = 4;
  const QKV x = make_structured(mqa, seed);
  Inputs broadcast = inputs_of(x);
  broadcast.k_strides.head = 0;
  broadcast.v_strides.head = 0;
  expect_same_result(run_attention(mqa, x), run_attention(expanded, broadcast));
}

TEST(Attend, ResultsDoNotDependOnTheThreadCount) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Case c{.shape = {.batch = 2, .heads_q = 4, .heads_kv = 2, .len_q = 333, .len_k = 333, .head_dim = 64},
               .causal = Causal::kTopLeft,
               .select = {.mode = SelectMode::kCdf, .cdfthreshd = {0.9f}},
               .pvthreshd = {4.0f}};
  const QKV x = make_structured(c, seed);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const AttentionResult one = run_attention(c, x);
  omp_set_num_threads(3);
  const AttentionResult three = run_attention(c, x);
  omp_set_num_threads(saved);
  expect_same_result(one, three);
}

TEST(Attend, PerHeadTopkAndPvThreshold) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Shape shape{.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 256, .len_k = 512, .head_dim = 64};
  const int64_t head_rows = shape.len_q * shape.head_dim;  // o elements of one head
  const QKV x = make_structured(shape, DType::kFloat16, Layout::kHND, seed);

  // topk {1, 0.3}: head 0 keeps every block, so it is the dense head 0 exactly.
  const float fractions[] = {1.0f, 0.3f};
  Case per_head{.shape = shape, .select = {.mode = SelectMode::kTopK, .topk = {0.0f, fractions}}};
  const AttentionResult sparse = run_attention(per_head, x);
  const AttentionResult dense = run_attention({.shape = shape}, x);
  ASSERT_TRUE(sparse.status.ok() && dense.status.ok());
  EXPECT_TRUE(same_bits(rows_of(sparse.o, 1, 0, head_rows), rows_of(dense.o, 1, 0, head_rows)));
  EXPECT_FALSE(
      same_bits(rows_of(sparse.o, 1, head_rows, 2 * head_rows), rows_of(dense.o, 1, head_rows, 2 * head_rows)));
  EXPECT_EQ(sparse.stats[kStatBlocksAllowed], dense.stats[kStatBlocksAllowed]);
  EXPECT_LT(sparse.stats[kStatBlocksKept], dense.stats[kStatBlocksKept]);

  // pvthreshd {+inf, 0}: each head is the head of the run with its value.
  const float thresholds[] = {kInf, 0.0f};
  Case by_head{.shape = shape, .pvthreshd = {15.0f, thresholds}};
  Case never{.shape = shape, .pvthreshd = {kInf}};
  Case eager{.shape = shape, .pvthreshd = {0.0f}};
  const AttentionResult mixed = run_attention(by_head, x);
  const AttentionResult a = run_attention(never, x);
  const AttentionResult b = run_attention(eager, x);
  EXPECT_TRUE(same_bits(rows_of(mixed.o, 1, 0, head_rows), rows_of(a.o, 1, 0, head_rows)));
  EXPECT_TRUE(same_bits(rows_of(mixed.o, 1, head_rows, 2 * head_rows), rows_of(b.o, 1, head_rows, 2 * head_rows)));
  EXPECT_EQ(a.stats[kStatPvSkipped], 0);
  EXPECT_GT(mixed.stats[kStatPvSkipped], 0);
  EXPECT_LT(mixed.stats[kStatPvSkipped], b.stats[kStatPvSkipped]);
}

TEST(Attend, PvThresholdInfinitySkipsNothingZeroSkipsSome) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  Case c{.shape = {.batch = 1, .heads_q = 2, .heads_kv = 2, .len_q = 512, .len_k = 512, .head_dim = 64}};
  const QKV x = make_structured(c, seed);
  const Reference ref = reference_attention(x, c.shape, Causal::kNone, default_sm_scale(64));
  c.pvthreshd = {kInf};
  const AttentionResult never = run_attention(c, x);
  c.pvthreshd = {0.0f};
  const AttentionResult eager = run_attention(c, x);
  ASSERT_TRUE(never.status.ok() && eager.status.ok());
  // 2 heads × 4 Q blocks × 8 K blocks, 8 groups of 16 rows per Q block.
  EXPECT_EQ(never.stats[kStatPvUnits], 2 * 4 * 8 * 8);
  EXPECT_EQ(never.stats[kStatPvSkipped], 0);
  EXPECT_EQ(eager.stats[kStatPvUnits], 2 * 4 * 8 * 8);
  EXPECT_GT(eager.stats[kStatPvSkipped], 0);
  // Skipping at 0 drops every block whose max is under the running max of all 16 rows; on these
  // concentrated maps that costs little (cosine ≈ 0.998 measured).
  const Errors e = compare(eager.o, ref.o);
  EXPECT_TRUE(e.finite) << e;
  EXPECT_GT(e.cos, 0.99) << e;
}

// The quantize → predict → attend stages run one by one on the buffers of a StageWorkspace.
struct Stages {
  Stages(const Case& problem, const QKV& x) : c(problem), ws(c.shape, c.blocks, c.quant) {
    run_quantize_predict(c, x, static_cast<float>(default_sm_scale(c.shape.head_dim)), ws);
  }

  // attend with the given P·V threshold over `index` (the predicted one by default); o as fp32
  // [B, Hq, Lq, D].
  AttentionResult attend_with(HeadParam pvthreshd, const BlockIndex* index = nullptr) const {
    const Shape& s = c.shape;
    AttentionResult run;
    run.o.assign(static_cast<size_t>(s.batch * s.heads_q * s.len_q * s.head_dim), kNaN);
    run.lse.assign(static_cast<size_t>(s.batch * s.heads_q * s.len_q), kNaN);
    run.stats.fill(-1);
    run.status = attend(AttendParams{
        .shape = s,
        .blocks = c.blocks,
        .causal = c.causal,
        .quant = c.quant,
        .quantized = ws.buffers.quantized,
        .index = index != nullptr ? *index : ws.buffers.index,
        .pvthreshd = pvthreshd,
        .o = run.o.data(),
        .o_dtype = DType::kFloat32,
        .o_strides = {.batch = s.heads_q * s.len_q * s.head_dim, .head = s.len_q * s.head_dim, .token = s.head_dim},
        .lse = run.lse.data(),
        .stats_out = run.stats.data()});
    return run;
  }

  Case c;
  StageWorkspace ws;
};

// The P·V skip decisions recomputed from the quantized buffers (batch 1): per (head, 16-row
// group) and kept block in ascending order, s = float(q8 · k8) · (q_scale · k_scale) (−∞ where
// invisible), the block's row maxima, and a skip when every row's is −∞ or more than the
// threshold under the running max of the blocks not skipped so far.
struct SkipDecisions {
  int64_t units = 0;
  int64_t skipped = 0;
  std::vector<std::vector<int32_t>> skipped_blocks;  // [Hq · groups]
};

SkipDecisions brute_force_skips(const Stages& st, float threshold) {
  const Case& c = st.c;
  const Shape& s = c.shape;
  const QuantizedQKV& qz = st.ws.buffers.quantized;
  const BlockIndex& index = st.ws.buffers.index;
  const auto [nbq, nbk] = block_counts(s, c.blocks);
  const int64_t dim = s.head_dim, groups = ceil_div(s.len_q, 16), bk = c.blocks.block_k;
  const int64_t heads_per_kv = s.heads_q / s.heads_kv;
  const QuantGranularity g = c.quant.granularity;
  EXPECT_EQ(s.batch, 1);
  SkipDecisions out;
  out.skipped_blocks.resize(static_cast<size_t>(s.heads_q * groups));
  for (int64_t h = 0; h < s.heads_q; ++h) {
    const int64_t hk = h / heads_per_kv;
    for (int64_t t = 0; t < groups; ++t) {
      const int64_t r0 = 16 * t, r1 = std::min(r0 + 16, s.len_q), qi = r0 / c.blocks.block_q;
      std::vector<float> m(16, -kInf), m_blk(16);
      for (int32_t n = 0; n < index.count[h * nbq + qi]; ++n) {
        const int32_t j = index.index[(h * nbq + qi) * nbk + n];
        ++out.units;
        bool all_negligible = true;
        for (int64_t r = r0; r < r1; ++r) {
          m_blk[r - r0] = -kInf;
          for (int64_t col = j * bk; col < std::min((j + 1) * bk, s.len_k); ++col) {
            if (col >= visible_end(r, c.causal, s.len_q, s.len_k)) continue;
            int32_t dot = 0;
            for (int64_t d = 0; d < dim; ++d)
              dot += qz.q[(h * s.len_q + r) * dim + d] * qz.k[(hk * s.len_k + col) * dim + d];
            const float scale = qz.q_scale[h * q_scale_groups(s.len_q, g) + q_scale_group(r, g)] *
                                qz.k_scale[hk * k_scale_groups(s.len_k, g) + k_scale_group(col, g)];
            m_blk[r - r0] = std::max(m_blk[r - r0], static_cast<float>(dot) * scale);
          }
          all_negligible &= m_blk[r - r0] == -kInf || m[r - r0] - m_blk[r - r0] > threshold;
        }
        if (all_negligible) {
          ++out.skipped;
          out.skipped_blocks[h * groups + t].push_back(j);
          continue;
        }
        for (int64_t r = r0; r < r1; ++r) m[r - r0] = std::max(m[r - r0], m_blk[r - r0]);
      }
    }
  }
  return out;
}

const float kThresholds[] = {0.0f, 0.5f, 2.0f, 5.0f, 15.0f, kInf};

TEST(Attend, PvSkipCountsMatchBruteForce) {
  // Two 16-row groups per 32-row Q block, decided independently; bottom-right causal with
  // Lq < Lk, so some (group, block) pairs see no key at all and always skip.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Case c{.shape = {.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 70, .len_k = 300, .head_dim = 32},
               .blocks = {.block_q = 32, .block_k = 32},
               .causal = Causal::kBottomRight,
               .quant = {.granularity = QuantGranularity::kPerThread},
               .select = {.mode = SelectMode::kTopK, .topk = {0.6f}}};
  const Stages stages(c, make_structured(c, seed));
  for (float threshold : kThresholds) {
    SCOPED_TRACE(threshold);
    const SkipDecisions expect = brute_force_skips(stages, threshold);
    const AttentionResult run = stages.attend_with({threshold});
    ASSERT_TRUE(run.status.ok());
    EXPECT_EQ(run.stats[kStatPvUnits], expect.units);
    EXPECT_EQ(run.stats[kStatPvSkipped], expect.skipped);
    if (threshold == 0.0f) {
      EXPECT_GT(expect.skipped, 0);
    }
  }
}

TEST(Attend, SkippedBlocksLeaveTheStateUnchanged) {
  // With 16-row Q blocks every group has its own index list: removing the blocks a group skips
  // from its list and never skipping gives bit-identical o and lse.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Case c{.shape = {.batch = 1, .heads_q = 4, .heads_kv = 2, .len_q = 90, .len_k = 250, .head_dim = 40},
               .blocks = {.block_q = 16, .block_k = 32},
               .quant = {.granularity = QuantGranularity::kPerWarp, .pv = PvPrecision::kFp16},
               .select = {.mode = SelectMode::kCdf, .cdfthreshd = {0.99f}}};
  const Stages stages(c, make_structured(c, seed));
  const auto [nbq, nbk] = block_counts(c.shape, c.blocks);
  const BlockIndex& predicted = stages.ws.buffers.index;
  for (float threshold : kThresholds) {
    SCOPED_TRACE(threshold);
    const SkipDecisions skips = brute_force_skips(stages, threshold);
    std::vector<int32_t> index(static_cast<size_t>(c.shape.heads_q * nbq * nbk), -1),
        count(static_cast<size_t>(c.shape.heads_q * nbq));
    for (int64_t list = 0; list < c.shape.heads_q * nbq; ++list) {
      const std::vector<int32_t>& drop = skips.skipped_blocks[list];  // one group per Q block
      count[list] = 0;
      for (int32_t n = 0; n < predicted.count[list]; ++n) {
        const int32_t j = predicted.index[list * nbk + n];
        if (std::find(drop.begin(), drop.end(), j) == drop.end()) index[list * nbk + count[list]++] = j;
      }
    }
    const BlockIndex pruned{.index = index.data(), .count = count.data()};
    const AttentionResult skipping = stages.attend_with({threshold});
    const AttentionResult pruned_run = stages.attend_with({kInf}, &pruned);
    ASSERT_TRUE(skipping.status.ok() && pruned_run.status.ok());
    EXPECT_TRUE(same_bits(skipping.o, pruned_run.o));
    EXPECT_TRUE(same_bits(skipping.lse, pruned_run.lse));
    EXPECT_EQ(skipping.stats[kStatPvSkipped], skips.skipped);
    if (threshold == 0.0f) {
      EXPECT_GT(skips.skipped, 0);
    }
  }
}

TEST(Attend, PvUnitsCountOnlyKeptBlocks) {
  // The work of attend is proportional to the kept blocks: every kept block is one P·V unit for
  // each of the 8 groups of 16 rows of its 128-row Q block, and nothing else is visited.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  for (Causal causal : {Causal::kNone, Causal::kTopLeft}) {
    SCOPED_TRACE(static_cast<int>(causal));
    Case c{.shape = {.batch = 1, .heads_q = 4, .heads_kv = 2, .len_q = 512, .len_k = 1024, .head_dim = 32},
           .causal = causal};
    const QKV x = make_structured(c, seed);
    const AttentionResult dense = run_attention(c, x);
    c.select = {.mode = SelectMode::kTopK, .topk = {0.25f}};
    const AttentionResult sparse = run_attention(c, x);
    ASSERT_TRUE(dense.status.ok() && sparse.status.ok());
    EXPECT_EQ(dense.stats[kStatBlocksKept], dense.stats[kStatBlocksAllowed]);
    EXPECT_EQ(dense.stats[kStatPvUnits], 8 * dense.stats[kStatBlocksKept]);
    EXPECT_EQ(sparse.stats[kStatPvUnits], 8 * sparse.stats[kStatBlocksKept]);
    EXPECT_LT(sparse.stats[kStatBlocksKept], 0.5 * dense.stats[kStatBlocksKept]);
  }
}

TEST(Attend, OutputStridesAreRespected) {
  // o written through padded strides ([B, L, H, D] with 8 spare elements per token and 3 per
  // batch) equals the contiguous output, and the gaps keep their poison.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Case c{.shape = {.batch = 2, .heads_q = 3, .heads_kv = 1, .len_q = 50, .len_k = 60, .head_dim = 24},
               .o_dtype = DType::kFloat16};
  const Shape& s = c.shape;
  const QKV x = make_structured(c, seed);
  const AttentionResult contiguous = run_attention(c, x);
  ASSERT_TRUE(contiguous.status.ok());

  const Strides strides{
      .batch = s.len_q * (s.heads_q * s.head_dim + 8) + 3, .head = s.head_dim, .token = s.heads_q * s.head_dim + 8};
  std::vector<uint16_t> o(static_cast<size_t>(s.batch * strides.batch), 0xDEAD);
  AttentionParams p{.shape = s,
                    .in = inputs_of(x),
                    .select = c.select,
                    .o = o.data(),
                    .o_dtype = DType::kFloat16,
                    .o_strides = strides};
  AlignedBuffer workspace(workspace_size(p));
  p.workspace = workspace.data();
  p.workspace_bytes = workspace.size();
  ASSERT_TRUE(attention(p).ok());
  std::vector<bool> written(o.size(), false);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads_q; ++h)
      for (int64_t r = 0; r < s.len_q; ++r)
        for (int64_t d = 0; d < s.head_dim; ++d) {
          const int64_t at = b * strides.batch + h * strides.head + r * strides.token + d;
          written[at] = true;
          ASSERT_EQ(num::fp16_to_float(o[at]), contiguous.o[((b * s.heads_q + h) * s.len_q + r) * s.head_dim + d]);
        }
  for (size_t i = 0; i < o.size(); ++i) {
    if (!written[i]) {
      ASSERT_EQ(o[i], 0xDEAD) << "element " << i << " is outside the output";
    }
  }
}

TEST(Attend, LseIsOptional) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  Case c{.shape = {.batch = 1, .heads_q = 2, .heads_kv = 2, .len_q = 64, .len_k = 80, .head_dim = 32}};
  const QKV x = make_structured(c, seed);
  const AttentionResult with = run_attention(c, x);
  c.want_lse = false;
  const AttentionResult without = run_attention(c, x);
  ASSERT_TRUE(with.status.ok() && without.status.ok());
  EXPECT_TRUE(same_bits(with.o, without.o));
}

// ---- P·V with the fp16 accumulator (PvPrecision::kFp8Fp16Accum) -------------------------------

// o of kFp8Fp16Accum recomputed from the quantized buffers of `st` (batch 1, every block attended:
// no P·V skip) by the text of method.md §2: for each kept block in ascending order, p8 = the e4m3 value
// of code clamp(rne(8 · (s − m_new) + 126), 0, 126) and l = l · α + Σ p8;
// per 64-key chunk of the block c = 0 and, per 32-key step of the chunk, c = fp16(c + the step's
// fp32 sum in ascending key order); the block product sums the chunks' c in fp32; acc = acc · α +
// block product. With `fp16_steps` false c stays fp32 (what the fp16 rounding changes).
std::vector<float> fp16_accumulator_attention(const Stages& st, bool fp16_steps) {
  const Case& c = st.c;
  const Shape& s = c.shape;
  const QuantizedQKV& qz = st.ws.buffers.quantized;
  const BlockIndex& index = st.ws.buffers.index;
  const auto [nbq, nbk] = block_counts(s, c.blocks);
  const int64_t dim = s.head_dim, bk = c.blocks.block_k, len_pad = padded_len_k(s.len_k);
  const QuantGranularity g = c.quant.granularity;
  const auto* v8 = static_cast<const uint8_t*>(qz.v);
  EXPECT_EQ(s.batch, 1);
  std::vector<float> o(static_cast<size_t>(s.heads_q * s.len_q * dim));
  for (int64_t h = 0; h < s.heads_q; ++h) {
    const int64_t hk = h / (s.heads_q / s.heads_kv);
    for (int64_t r = 0; r < s.len_q; ++r) {
      const int64_t i = r / c.blocks.block_q;
      const float q_scale = qz.q_scale[h * q_scale_groups(s.len_q, g) + q_scale_group(r, g)];
      float m = -kInf, l = 0.0f;
      std::vector<float> acc(dim, 0.0f);
      for (int32_t n = 0; n < index.count[h * nbq + i]; ++n) {
        const int64_t c0 = index.index[(h * nbq + i) * nbk + n] * bk;
        const int64_t cols = std::min(bk, s.len_k - c0);
        std::vector<float> score(cols, -kInf);
        float m_blk = -kInf;
        for (int64_t col = 0; col < cols && c0 + col < visible_end(r, c.causal, s.len_q, s.len_k); ++col) {
          int32_t dot = 0;
          for (int64_t d = 0; d < dim; ++d)
            dot += qz.q[(h * s.len_q + r) * dim + d] * qz.k[(hk * s.len_k + c0 + col) * dim + d];
          score[col] = static_cast<float>(dot) *
                       (q_scale * qz.k_scale[hk * k_scale_groups(s.len_k, g) + k_scale_group(c0 + col, g)]);
          m_blk = std::max(m_blk, score[col]);
        }
        if (m_blk == -kInf) continue;  // no visible key: the state is unchanged
        const float m_new = std::max(m, m_blk);
        const float alpha = std::exp2(m - m_new);
        float p_sum = 0.0f;
        std::vector<float> p8(cols, 0.0f);
        for (int64_t col = 0; col < cols; ++col) {
          if (score[col] == -kInf) continue;
          const float code = std::nearbyint(std::clamp(8.0f * (score[col] - m_new) + 126.0f, 0.0f, 126.0f));
          p8[col] = num::e4m3_to_float(static_cast<uint8_t>(code));
          p_sum += p8[col];
        }
        std::vector<float> block(dim, 0.0f);
        for (int64_t chunk = 0; chunk < cols; chunk += 64) {
          std::vector<float> acc16(dim, 0.0f);
          for (int64_t step = chunk; step < std::min(chunk + 64, cols); step += 32) {
            for (int64_t d = 0; d < dim; ++d) {
              float sum = 0.0f;
              for (int64_t col = step; col < std::min({step + 32, chunk + 64, cols}); ++col)
                sum += p8[col] * num::e4m3_to_float(v8[(hk * dim + d) * len_pad + v_key_slot(c0 + col, c.quant.pv)]);
              acc16[d] = fp16_steps ? num::round_fp16(acc16[d] + sum) : acc16[d] + sum;
            }
          }
          for (int64_t d = 0; d < dim; ++d) block[d] += acc16[d];
        }
        l = l * alpha + p_sum;
        for (int64_t d = 0; d < dim; ++d) acc[d] = acc[d] * alpha + block[d];
        m = m_new;
      }
      for (int64_t d = 0; d < dim; ++d) {
        o[(h * s.len_q + r) * dim + d] = l == 0.0f ? 0.0f : acc[d] * qz.v_scale[hk * dim + d] / l;
      }
    }
  }
  return o;
}

double max_abs(const std::vector<float>& x) {
  double m = 0.0;
  for (float v : x) m = std::max(m, static_cast<double>(std::fabs(v)));
  return m;
}

// Largest |a − b|; infinite where either is not finite.
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return kInf;
    m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
  }
  return m;
}

TEST(Attend, Fp16AccumulatorMatchesARecomputation) {
  // Block sizes with whole and partial 64-key chunks and 32-key steps (16, 48, 96: steps of 16
  // keys; 128: two chunks), odd lengths, causal and sparse selections.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  for (int64_t block_k : {16, 48, 64, 96, 128}) {
    for (Causal causal : {Causal::kNone, Causal::kTopLeft}) {
      SCOPED_TRACE(testing::Message() << "block_k " << block_k << " causal " << static_cast<int>(causal));
      const Case c{.shape = {.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 150, .len_k = 333, .head_dim = 40},
                   .blocks = {.block_q = 64, .block_k = block_k},
                   .causal = causal,
                   .quant = {.pv = PvPrecision::kFp8Fp16Accum},
                   .select = {.mode = SelectMode::kTopK, .topk = {0.6f}}};
      const Stages stages(c, make_structured(c, seed));
      const AttentionResult run = stages.attend_with({kInf});
      ASSERT_TRUE(run.status.ok()) << run.status.message();
      const std::vector<float> expect = fp16_accumulator_attention(stages, true);
      const double scale = max_abs(expect);
      // The same operations in the same order: equal up to contraction by the test's compiler.
      EXPECT_LE(max_abs_diff(run.o, expect), 1e-6 * scale);
      // Without the fp16 roundings the result moves by far more: the comparison sees them.
      EXPECT_GT(max_abs_diff(run.o, fp16_accumulator_attention(stages, false)), 1e-5 * scale);
    }
  }
}

TEST(Attend, Fp16AccumulatorAccuracyMatchesFp8) {
  // Against fp64 attention: the bounds of FP8 P·V (test_attention.cpp), and within 0.3 % relative
  // L1 of the fp32-accumulator result on the same inputs.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  for (int64_t block_k : {64, 128}) {
    for (Causal causal : {Causal::kNone, Causal::kBottomRight}) {
      SCOPED_TRACE(testing::Message() << "block_k " << block_k << " causal " << static_cast<int>(causal));
      Case c{.shape = {.batch = 2, .heads_q = 4, .heads_kv = 2, .len_q = 300, .len_k = 420, .head_dim = 64},
             .blocks = {.block_q = 128, .block_k = block_k},
             .causal = causal,
             .quant = {.pv = PvPrecision::kFp8Fp16Accum}};
      const QKV x = make_structured(c, seed);
      const Reference ref = reference_attention(x, c.shape, causal, default_sm_scale(64));
      const AttentionResult fp16_accum = run_attention(c, x);
      c.quant.pv = PvPrecision::kFp8;
      const AttentionResult fp32_accum = run_attention(c, x);
      ASSERT_TRUE(fp16_accum.status.ok() && fp32_accum.status.ok());
      const Errors e = compare(fp16_accum.o, ref.o);
      const Errors e8 = compare(fp32_accum.o, ref.o);
      EXPECT_TRUE(e.finite) << e;
      EXPECT_GE(e.cos, 0.999) << e;
      EXPECT_LE(e.rel_l1, 0.035) << e;
      EXPECT_LE(e.rel_l1, e8.rel_l1 + 0.003) << e << " vs fp32 accumulator " << e8;
      EXPECT_FALSE(same_bits(fp16_accum.o, fp32_accum.o));
      for (size_t row = 0; row < ref.lse.size(); ++row) {  // P·V does not touch the LSE
        ASSERT_EQ(fp16_accum.lse[row], fp32_accum.lse[row]) << "row " << row;
      }
    }
  }
}

TEST(Attend, Fp16AccumulatorWorstCaseDoesNotOverflow) {
  // Every score 0 (each K row is one constant vector, which smoothing removes), so every p8 is
  // 448, and every V channel at ±amax: a 64-key chunk sums 64 · 448 · 2.25 = 64512, next to the
  // fp16 maximum 65504. Channels: all +a, all −a, and ±a alternating per key (cancelling).
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const Shape shape{.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 100, .len_k = 1024, .head_dim = 32};
  const Case c{.shape = shape,
               .dtype = DType::kFloat32,
               .blocks = {.block_q = 128, .block_k = 128},
               .quant = {.pv = PvPrecision::kFp8Fp16Accum}};
  QKV x = make_structured(c, seed);
  for (int64_t t = 0; t < shape.len_k; ++t) {
    for (int64_t d = 0; d < shape.head_dim; ++d) {
      const float a = 0.5f + 0.37f * static_cast<float>(d);
      const float sign = d % 3 == 0 ? 1.0f : d % 3 == 1 ? -1.0f : (t % 2 == 0 ? 1.0f : -1.0f);
      x.k.set(0, 0, t, d, 1.0f + 0.1f * static_cast<float>(d));
      x.v.set(0, 0, t, d, sign * a);
    }
  }
  const AttentionResult run = run_attention(c, x);
  ASSERT_TRUE(run.status.ok()) << run.status.message();
  const Reference ref = reference_attention(x, shape, Causal::kNone, default_sm_scale(shape.head_dim));
  const Errors e = compare(run.o, ref.o);
  EXPECT_TRUE(e.finite) << e;
  EXPECT_LE(e.max_abs, 1e-5 * max_abs(run.o)) << e;  // exact up to the epilogue's rounding
  EXPECT_GT(max_abs(run.o), 10.0);
}

TEST(Attend, NoKeysGiveZeroOutputAndMinusInfinityLse) {
  const Case c{.shape = {.batch = 2, .heads_q = 2, .heads_kv = 1, .len_q = 20, .len_k = 0, .head_dim = 16},
               .select = {.mode = SelectMode::kTopK}};
  const QKV x{HostTensor(2, 2, 20, 16, DType::kFloat16), HostTensor(), HostTensor()};
  const AttentionResult run = run_attention(c, x);
  ASSERT_TRUE(run.status.ok()) << run.status.message();
  for (float v : run.o) ASSERT_EQ(v, 0.0f);
  for (float v : run.lse) ASSERT_EQ(v, -kInf);
  EXPECT_EQ(run.stats, (std::array<int64_t, kStatCount>{0, 0, 0, 0}));
}

}  // namespace
}  // namespace sparge::test
