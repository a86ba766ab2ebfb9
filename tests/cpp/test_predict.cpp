// Stage 1 (method.md §1) on synthetic block statistics: every selection rule, the causal
// allowed / partial geometry, per-head parameters, GQA, statistics and the optional mask.
//
// Most cases use head_dim 1, q_pool = 1 and sm_scale = 1, so the compressed score of K block j
// is simply k_pool[j].
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "test_util.h"

namespace sparge::test {
namespace {

// Block statistics of a problem, uniform by default (every sim 1), q_pool = 1, k_pool = 0.
struct Stats {
  Stats(const Shape& s, const BlockConfig& b)
      : shape(s),
        blocks(b),
        nbq(block_counts(s, b).nbq),
        nbk(block_counts(s, b).nbk),
        q_pool(static_cast<size_t>(s.batch * s.heads_q * nbq * s.head_dim), 1.0f),
        q_sim(static_cast<size_t>(s.batch * s.heads_q * nbq), 1.0f),
        k_pool(static_cast<size_t>(s.batch * s.heads_kv * nbk * s.head_dim), 0.0f),
        k_sim(static_cast<size_t>(s.batch * s.heads_kv * nbk), 1.0f),
        k_spikes(static_cast<size_t>(s.batch * s.heads_kv * nbk * kSpikeKeys * s.head_dim), 0.0f) {}

  // Compressed scores of the K blocks of kv head (b, hk) (head_dim 1).
  void set_scores(int64_t b, int64_t hk, const std::vector<float>& scores) {
    std::copy(scores.begin(), scores.end(), k_pool.begin() + (b * shape.heads_kv + hk) * nbk);
  }
  void set_scores(const std::vector<float>& scores) {
    for (int64_t b = 0; b < shape.batch; ++b)
      for (int64_t hk = 0; hk < shape.heads_kv; ++hk) set_scores(b, hk, scores);
  }

  QuantizedQKV view() {
    return {.q_pool = q_pool.data(), .q_sim = q_sim.data(), .k_pool = k_pool.data(), .k_sim = k_sim.data(),
            .k_spikes = k_spikes.data()};
  }

  Shape shape;
  BlockConfig blocks;
  int64_t nbq, nbk;
  std::vector<float> q_pool, q_sim, k_pool, k_sim, k_spikes;
};

struct Prediction {
  std::vector<std::vector<int32_t>> kept;  // [B · Hq · nbq] kept K blocks
  std::vector<uint8_t> mask;               // [B, Hq, nbq, nbk]
  std::array<int64_t, kStatCount> stats{};
  const std::vector<int32_t>& at(int64_t bh, int64_t i) const { return kept[bh * nbq + i]; }
  int64_t nbq = 0;
};

// Runs predict with poisoned outputs; checks that every index list is strictly ascending and
// in range, and that mask_out is its indicator.
Prediction run_predict(Stats& st, Causal causal, const Selection& select) {
  const int64_t lists = st.shape.batch * st.shape.heads_q * st.nbq;
  std::vector<int32_t> index(static_cast<size_t>(lists * st.nbk), -7), count(static_cast<size_t>(lists), -7);
  Prediction pred;
  pred.nbq = st.nbq;
  pred.mask.assign(static_cast<size_t>(lists * st.nbk), 0xEE);
  pred.stats.fill(-1);
  const Status status = predict(PredictParams{.device = Device::kCPU,
                                              .shape = st.shape,
                                              .blocks = st.blocks,
                                              .causal = causal,
                                              .sm_scale = 1.0f,
                                              .select = select,
                                              .stats = st.view(),
                                              .out = {.index = index.data(), .count = count.data()},
                                              .mask_out = pred.mask.data(),
                                              .stats_out = pred.stats.data()});
  EXPECT_TRUE(status.ok()) << status.message();
  for (int64_t l = 0; l < lists; ++l) {
    EXPECT_TRUE(count[l] >= 0 && count[l] <= st.nbk) << "count " << count[l] << " of list " << l;
    const int32_t n = std::clamp<int32_t>(count[l], 0, static_cast<int32_t>(st.nbk));
    pred.kept.emplace_back(index.begin() + l * st.nbk, index.begin() + l * st.nbk + n);
    const std::vector<int32_t>& kept = pred.kept.back();
    for (int32_t k = 0; k < n; ++k) {
      EXPECT_TRUE(kept[k] >= 0 && kept[k] < st.nbk) << "list " << l;
      if (k > 0) {
        EXPECT_LT(kept[k - 1], kept[k]) << "list " << l << " is not strictly ascending";
      }
    }
    for (int64_t j = 0; j < st.nbk; ++j) {
      const bool listed = std::find(kept.begin(), kept.end(), j) != kept.end();
      EXPECT_EQ(pred.mask[l * st.nbk + j], listed ? 1 : 0) << "mask_out of list " << l << " block " << j;
    }
  }
  return pred;
}

using Blocks = std::vector<int32_t>;

// One head, one Q block of 128 rows, nbk K blocks of 64 keys.
Shape one_row_of_blocks(int64_t nbk, int64_t heads_q = 1, int64_t heads_kv = 1) {
  return {.batch = 1, .heads_q = heads_q, .heads_kv = heads_kv, .len_q = 128, .len_k = 64 * nbk, .head_dim = 1};
}

Selection topk(float fraction) { return {.mode = SelectMode::kTopK, .topk = {fraction}, .simthreshd1 = {0.5f}}; }
Selection cdf(float threshold) { return {.mode = SelectMode::kCdf, .cdfthreshd = {threshold}, .simthreshd1 = {0.5f}}; }

TEST(Predict, DenseKeepsEveryAllowedBlock) {
  Stats st({.batch = 2, .heads_q = 2, .heads_kv = 1, .len_q = 300, .len_k = 200, .head_dim = 1}, {});
  const Prediction pred = run_predict(st, Causal::kNone, {.mode = SelectMode::kDense});
  for (const Blocks& kept : pred.kept) EXPECT_EQ(kept, (Blocks{0, 1, 2, 3}));
  EXPECT_EQ(pred.stats[kStatBlocksKept], 2 * 2 * 3 * 4);
  EXPECT_EQ(pred.stats[kStatBlocksAllowed], 2 * 2 * 3 * 4);
}

TEST(Predict, TopKCountRoundsInFp32) {
  // Ranking by score: 1, 6, 3, 8, 4, 9, 0, 7, 2, 5.
  Stats st(one_row_of_blocks(10), {});
  st.set_scores({3, 9, 1, 7, 5, 0, 8, 2, 6, 4});
  const std::vector<int32_t> ranking = {1, 6, 3, 8, 4, 9, 0, 7, 2, 5};
  // n = clamp(⌊topk · 10 + 0.5⌋, 1, 10). 0.35f · 10 rounds to 3.5 in fp32, so it keeps 4 (3 in
  // exact arithmetic); 0.15f · 10 rounds to 1.5.
  const std::vector<std::pair<float, int>> cases = {{0.0f, 1},   {0.04f, 1}, {0.05f, 1}, {0.15f, 2},  {0.25f, 3},
                                                    {0.349f, 3}, {0.35f, 4}, {0.5f, 5},  {0.96f, 10}, {1.0f, 10}};
  for (const auto& [fraction, n] : cases) {
    SCOPED_TRACE(fraction);
    Blocks expect(ranking.begin(), ranking.begin() + n);
    std::sort(expect.begin(), expect.end());
    const Prediction pred = run_predict(st, Causal::kNone, topk(fraction));
    EXPECT_EQ(pred.kept[0], expect);
    EXPECT_EQ(pred.stats[kStatBlocksKept], n);
    EXPECT_EQ(pred.stats[kStatBlocksAllowed], 10);
  }
}

TEST(Predict, TiesGoToTheLowerIndex) {
  Stats st(one_row_of_blocks(8), {});
  st.set_scores({1, 5, 5, 0, 5, 5, 2, 3});
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.25f)).kept[0], (Blocks{1, 2}));
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.375f)).kept[0], (Blocks{1, 2, 4}));
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.5f)).kept[0], (Blocks{1, 2, 4, 5}));
  // CDF: each tied block holds e^5 / (4 e^5 + e^3 + e^2 + e + 1) ≈ 0.24 of the mass.
  EXPECT_EQ(run_predict(st, Causal::kNone, cdf(0.2f)).kept[0], (Blocks{1}));
  EXPECT_EQ(run_predict(st, Causal::kNone, cdf(0.3f)).kept[0], (Blocks{1, 2}));
}

TEST(Predict, CdfSharpeningScalesScoresByTheQueryBlockSimilarity) {
  // p = {0.10, 0.50, 0.15, 0.25} as scores log p; q_sim = 0.25 gives the gain 1 / sqrt(0.25) = 2,
  // so p̄ ∝ p² = {0.01, 0.25, 0.0225, 0.0625} / 0.345: ranked 1, 3, 2, 0 with running mass 0.7246,
  // 0.9058, 0.9710, 1 (unsharpened: 0.5, 0.75, 0.9, 1).
  Stats st(one_row_of_blocks(4), {});
  st.set_scores({std::log(0.10f), std::log(0.50f), std::log(0.15f), std::log(0.25f)});
  st.q_sim[0] = 0.25f;
  Selection sel = cdf(0.0f);
  sel.simthreshd1 = {0.1f};  // the Q block stays uniform
  Selection original = sel;
  original.cdf_sharpen = false;
  const std::vector<std::tuple<float, Blocks, Blocks>> cases = {
      {0.6f, {1}, {1, 3}}, {0.8f, {1, 3}, {1, 2, 3}}, {0.95f, {1, 2, 3}, {0, 1, 2, 3}}};
  for (const auto& [threshold, sharpened, unsharpened] : cases) {
    SCOPED_TRACE(threshold);
    sel.cdfthreshd = {threshold};
    original.cdfthreshd = {threshold};
    EXPECT_EQ(run_predict(st, Causal::kNone, sel).kept[0], sharpened);
    EXPECT_EQ(run_predict(st, Causal::kNone, original).kept[0], unsharpened);
  }
  // q_sim below the floor 0.01 counts as 0.01 (gain 10): block 1 alone holds 0.5^10 / Σ p^10 > 0.99.
  st.q_sim[0] = 1e-4f;
  sel.cdfthreshd = {0.99f};
  sel.simthreshd1 = {-1.0f};
  EXPECT_EQ(run_predict(st, Causal::kNone, sel).kept[0], (Blocks{1}));
  // TopK never changes: the gain is constant over the row.
  st.q_sim[0] = 0.25f;
  Selection top_half = topk(0.5f);
  top_half.simthreshd1 = {0.1f};
  EXPECT_EQ(run_predict(st, Causal::kNone, top_half).kept[0], (Blocks{1, 3}));
}

TEST(Predict, CdfKeepsTheShortestPrefixReachingTheThreshold) {
  // p̄ = softmax(log p) = p = {0.10, 0.50, 0.15, 0.25}: ranked 1, 3, 2, 0 with running mass
  // 0.5, 0.75, 0.9, 1.
  Stats st(one_row_of_blocks(4), {});
  st.set_scores({std::log(0.10f), std::log(0.50f), std::log(0.15f), std::log(0.25f)});
  const std::vector<std::pair<float, Blocks>> cases = {{0.0f, {1}},       {0.4f, {1}},           {0.6f, {1, 3}},
                                                       {0.8f, {1, 2, 3}}, {0.95f, {0, 1, 2, 3}}, {1.0f, {0, 1, 2, 3}}};
  for (const auto& [threshold, expect] : cases) {
    SCOPED_TRACE(threshold);
    EXPECT_EQ(run_predict(st, Causal::kNone, cdf(threshold)).kept[0], expect);
  }
}

// BlockScore::kSpikes (method.md §1, "Block scores") with head_dim 1, q_pool = 1, sm_scale = 1:
// block j of n keys with mean a and spike keys b0, b1 scores
// ln(e^b0 + e^b1 + (n − 2) e^((n·a − b0 − b1) / (n − 2))).
Selection with_spikes(Selection s) {
  s.block_score = BlockScore::kSpikes;
  return s;
}

TEST(Predict, SpikesScoreKeepsTheKeyTheMeanDilutes) {
  Stats st(one_row_of_blocks(4), {});
  // (a, b0, b1): a block of equal keys scores a + ln 64; block 2 holds one key at 8 among keys
  // near 0.08: ln(e^8 + e^0.1 + 62 e^((12.8 − 8.1) / 62)) ≈ 8.0226, the best, while its mean
  // 0.2 is the worst.
  const std::vector<std::array<float, 3>> blocks = {{0.5f, 0.5f, 0.5f}, {1.0f, 1.0f, 1.0f}, {0.2f, 8.0f, 0.1f},
                                                    {0.9f, 0.9f, 0.9f}};
  for (int j = 0; j < 4; ++j) {
    st.k_pool[j] = blocks[j][0];
    st.k_spikes[j * kSpikeKeys + 0] = blocks[j][1];
    st.k_spikes[j * kSpikeKeys + 1] = blocks[j][2];
  }
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.25f)).kept[0], (Blocks{1}));
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.5f)).kept[0], (Blocks{1, 3}));
  EXPECT_EQ(run_predict(st, Causal::kNone, with_spikes(topk(0.25f))).kept[0], (Blocks{2}));
  EXPECT_EQ(run_predict(st, Causal::kNone, with_spikes(topk(0.5f))).kept[0], (Blocks{1, 2}));
  // p̄ of block 2 = 3048.9 / (3048.9 + 64 (e^0.5 + e^1 + e^0.9)) ≈ 0.875, of block 1 ≈ 0.050.
  EXPECT_EQ(run_predict(st, Causal::kNone, with_spikes(cdf(0.85f))).kept[0], (Blocks{2}));
  EXPECT_EQ(run_predict(st, Causal::kNone, with_spikes(cdf(0.9f))).kept[0], (Blocks{1, 2}));
}

TEST(Predict, SpikesScoreCountsTheKeysOfShortBlocks) {
  // Lk = 129: blocks 0 and 1 of 64 equal keys at 1 score 1 + ln 64 ≈ 5.159; block 2 holds one
  // key, so m = 1 and it scores b0 alone (its second slot is unused).
  Stats st({.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 128, .len_k = 129, .head_dim = 1}, {});
  for (int j = 0; j < 2; ++j) {
    st.k_pool[j] = 1.0f;
    st.k_spikes[j * kSpikeKeys + 0] = st.k_spikes[j * kSpikeKeys + 1] = 1.0f;
  }
  st.k_pool[2] = 5.0f;
  st.k_spikes[2 * kSpikeKeys + 0] = 5.0f;
  st.k_spikes[2 * kSpikeKeys + 1] = 100.0f;
  EXPECT_EQ(run_predict(st, Causal::kNone, with_spikes(topk(0.3f))).kept[0], (Blocks{0}));
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.3f)).kept[0], (Blocks{2}));  // kMean: 5 > 1
  st.k_pool[2] = st.k_spikes[2 * kSpikeKeys + 0] = 5.5f;
  EXPECT_EQ(run_predict(st, Causal::kNone, with_spikes(topk(0.3f))).kept[0], (Blocks{2}));
}

TEST(Predict, SpikesScoreNeedsTheSpikeBuffer) {
  Stats st(one_row_of_blocks(4), {});
  QuantizedQKV stats = st.view();
  stats.k_spikes = nullptr;
  std::vector<int32_t> index(4), count(1);
  const Status status = predict(PredictParams{.device = Device::kCPU,
                                              .shape = st.shape,
                                              .blocks = st.blocks,
                                              .sm_scale = 1.0f,
                                              .select = with_spikes(topk(0.5f)),
                                              .stats = stats,
                                              .out = {.index = index.data(), .count = count.data()}});
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("stats.k_spikes"), std::string::npos) << status.message();
  Selection bad = topk(0.5f);
  bad.block_score = static_cast<BlockScore>(7);
  const Status bad_status = predict(PredictParams{.device = Device::kCPU,
                                                  .shape = st.shape,
                                                  .blocks = st.blocks,
                                                  .sm_scale = 1.0f,
                                                  .select = bad,
                                                  .stats = st.view(),
                                                  .out = {.index = index.data(), .count = count.data()}});
  EXPECT_EQ(bad_status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_status.message().find("select.block_score"), std::string::npos) << bad_status.message();
}

TEST(Predict, NonUniformQBlockKeepsEveryAllowedBlock) {
  Stats st(one_row_of_blocks(6), {});
  st.set_scores({6, 5, 4, 3, 2, 1});
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.1f)).kept[0], (Blocks{0}));
  st.q_sim[0] = 0.5f;  // uniform only when sim > simthreshd1 = 0.5
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.1f)).kept[0], (Blocks{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(run_predict(st, Causal::kNone, cdf(0.1f)).kept[0], (Blocks{0, 1, 2, 3, 4, 5}));
  st.q_sim[0] = -0.9f;
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.1f)).kept[0], (Blocks{0, 1, 2, 3, 4, 5}));
}

TEST(Predict, NonUniformKBlockIsKeptAndIsNoCandidate) {
  // Block 7 is non-uniform with the best score: kept on its own; the 2 = ⌊0.2 · 10 + 0.5⌋
  // selected candidates are the best uniform ones, 1 and 6. Block 9 (sim = threshold) is
  // non-uniform too.
  Stats st(one_row_of_blocks(10), {});
  st.set_scores({3, 9, 1, 7, 5, 0, 8, 100, 6, 4});
  st.k_sim[7] = -0.2f;
  st.k_sim[9] = 0.5f;
  EXPECT_EQ(run_predict(st, Causal::kNone, topk(0.2f)).kept[0], (Blocks{1, 6, 7, 9}));
  // CDF over the candidates only: block 1 alone holds e^9 / Σ ≈ 0.64 of their mass.
  EXPECT_EQ(run_predict(st, Causal::kNone, cdf(0.5f)).kept[0], (Blocks{1, 7, 9}));
}

TEST(Predict, AttentionSinkKeepsBlockZero) {
  Stats st(one_row_of_blocks(10), {});
  st.set_scores({-5, 9, 1, 7, 5, 0, 8, 2, 6, 4});
  Selection sel = topk(0.1f);
  EXPECT_EQ(run_predict(st, Causal::kNone, sel).kept[0], (Blocks{1}));
  sel.attention_sink = true;
  EXPECT_EQ(run_predict(st, Causal::kNone, sel).kept[0], (Blocks{0, 1}));
  Selection by_cdf = cdf(0.1f);
  by_cdf.attention_sink = true;
  EXPECT_EQ(run_predict(st, Causal::kNone, by_cdf).kept[0], (Blocks{0, 1}));
  Selection dense{.mode = SelectMode::kDense, .attention_sink = true};
  EXPECT_EQ(run_predict(st, Causal::kNone, dense).kept[0].size(), 10u);
}

TEST(Predict, CausalTopLeftKeepsTheDiagonal) {
  // Lq = Lk = 256, 128 × 64 blocks. Q block 0 (rows 0..127) may see K blocks 0, 1, both partial
  // (row 0 sees key 0 only). Q block 1 (rows 128..255) sees 0..3; row 128 sees keys 0..128, so
  // blocks 2 and 3 are partial. Block 0 has the best score.
  Stats st({.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 256, .len_k = 256, .head_dim = 1}, {});
  st.set_scores({9, 1, 0, 0});
  Prediction pred = run_predict(st, Causal::kTopLeft, topk(0.0f));
  EXPECT_EQ(pred.at(0, 0), (Blocks{0, 1}));
  EXPECT_EQ(pred.at(0, 1), (Blocks{0, 2, 3}));
  EXPECT_EQ(pred.stats[kStatBlocksKept], 5);
  EXPECT_EQ(pred.stats[kStatBlocksAllowed], 6);
  pred = run_predict(st, Causal::kTopLeft, {.mode = SelectMode::kDense});
  EXPECT_EQ(pred.at(0, 0), (Blocks{0, 1}));
  EXPECT_EQ(pred.at(0, 1), (Blocks{0, 1, 2, 3}));
}

TEST(Predict, CausalBottomRightWithLqBelowLk) {
  // Lq = 100, Lk = 300, 64 × 64 blocks (nbq 2, nbk 5), offset Lk − Lq = 200.
  Stats st({.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 100, .len_k = 300, .head_dim = 1},
           {.block_q = 64, .block_k = 64});
  st.set_scores({9, 1, 0, 0, 0});
  // Bottom-right: Q block 0 (rows 0..63) sees keys < 264: blocks 0..4 allowed; row 0 sees keys
  // < 201: blocks 3 (192..255) and 4 partial. Q block 1 (rows 64..99): row 64 sees keys < 265:
  // block 4 partial.
  Prediction pred = run_predict(st, Causal::kBottomRight, topk(0.0f));
  EXPECT_EQ(pred.at(0, 0), (Blocks{0, 3, 4}));
  EXPECT_EQ(pred.at(0, 1), (Blocks{0, 4}));
  EXPECT_EQ(pred.stats[kStatBlocksAllowed], 10);
  // Top-left: Q block 0 sees keys < 64 (block 0, partial); Q block 1 sees keys < 100 (blocks 0,
  // 1); row 64 sees keys < 65: block 1 partial, block 0 fully visible.
  pred = run_predict(st, Causal::kTopLeft, topk(0.0f));
  EXPECT_EQ(pred.at(0, 0), (Blocks{0}));
  EXPECT_EQ(pred.at(0, 1), (Blocks{0, 1}));
  EXPECT_EQ(pred.stats[kStatBlocksAllowed], 3);
  st.set_scores({0, 9, 0, 0, 0});  // block 1 best: Q block 1 keeps it (partial) and nothing else
  pred = run_predict(st, Causal::kTopLeft, topk(0.0f));
  EXPECT_EQ(pred.at(0, 1), (Blocks{1}));
}

TEST(Predict, CausalBottomRightRowsSeeingNothing) {
  // Lq = 300 > Lk = 100, bottom-right: row r sees keys < r − 199, so rows 0..199 see nothing.
  // Q blocks 0..2 (rows 0..191) have no allowed block; Q block 3 (192..255) may see block 0
  // (partial); Q block 4 (256..299) sees keys < 101 → blocks 0, 1, both partial (row 256 sees
  // keys < 57).
  Stats st({.batch = 1, .heads_q = 1, .heads_kv = 1, .len_q = 300, .len_k = 100, .head_dim = 1},
           {.block_q = 64, .block_k = 64});
  Selection sink = topk(0.0f);
  sink.attention_sink = true;  // block 0 is kept only where it is allowed
  for (const Selection& sel : {Selection{.mode = SelectMode::kDense}, topk(1.0f), topk(0.0f), cdf(0.5f), sink}) {
    SCOPED_TRACE(static_cast<int>(sel.mode));
    const Prediction pred = run_predict(st, Causal::kBottomRight, sel);
    EXPECT_EQ(pred.at(0, 0), Blocks{});
    EXPECT_EQ(pred.at(0, 1), Blocks{});
    EXPECT_EQ(pred.at(0, 2), Blocks{});
    EXPECT_EQ(pred.at(0, 3), (Blocks{0}));
    EXPECT_EQ(pred.at(0, 4), (Blocks{0, 1}));
    EXPECT_EQ(pred.stats[kStatBlocksAllowed], 3);
    EXPECT_EQ(pred.stats[kStatBlocksKept], 3);
  }
}

TEST(Predict, BlockMaskIsIntersectedWithCausalAndNothingIsAdded) {
  // Lq = Lk = 256, 128 × 64 blocks, two heads. Top-left allows Q block 0 blocks {0, 1} and Q
  // block 1 blocks {0..3} (2 and 3 partial, but kBlockMask adds no always-kept block).
  Stats st({.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 256, .len_k = 256, .head_dim = 1}, {});
  std::vector<uint8_t> mask = {
      0, 1, 0, 1, /**/ 1, 0, 0, 3,  // head 0: Q block 0, Q block 1
      0, 0, 0, 1, /**/ 0, 0, 0, 0,  // head 1
  };
  const Selection sel{.mode = SelectMode::kBlockMask, .block_mask = mask.data()};
  Prediction pred = run_predict(st, Causal::kTopLeft, sel);
  EXPECT_EQ(pred.at(0, 0), (Blocks{1}));
  EXPECT_EQ(pred.at(0, 1), (Blocks{0, 3}));
  EXPECT_EQ(pred.at(1, 0), Blocks{});  // block 3 is not allowed
  EXPECT_EQ(pred.at(1, 1), Blocks{});
  EXPECT_EQ(pred.stats[kStatBlocksKept], 3);
  EXPECT_EQ(pred.stats[kStatBlocksAllowed], 12);
  pred = run_predict(st, Causal::kNone, sel);
  EXPECT_EQ(pred.at(0, 0), (Blocks{1, 3}));
  EXPECT_EQ(pred.at(0, 1), (Blocks{0, 3}));
  EXPECT_EQ(pred.at(1, 0), (Blocks{3}));
  EXPECT_EQ(pred.at(1, 1), Blocks{});
}

TEST(Predict, PerHeadParametersOverrideTheValue) {
  Stats st(one_row_of_blocks(10, 3, 1), {});
  st.set_scores({3, 9, 1, 7, 5, 0, 8, 2, 6, 4});
  const float fractions[] = {0.2f, 1.0f, 0.5f};
  Selection sel = topk(0.0f);
  sel.topk.per_head = fractions;
  Prediction pred = run_predict(st, Causal::kNone, sel);
  EXPECT_EQ(pred.at(0, 0), (Blocks{1, 6}));
  EXPECT_EQ(pred.at(1, 0).size(), 10u);
  EXPECT_EQ(pred.at(2, 0), (Blocks{1, 3, 4, 6, 8}));

  // simthreshd1 per head: with every sim 0.9, head 2 (threshold 0.95) sees a non-uniform Q block.
  std::fill(st.q_sim.begin(), st.q_sim.end(), 0.9f);
  std::fill(st.k_sim.begin(), st.k_sim.end(), 0.9f);
  const float sims[] = {0.5f, 0.5f, 0.95f};
  sel = topk(0.2f);
  sel.simthreshd1.per_head = sims;
  pred = run_predict(st, Causal::kNone, sel);
  EXPECT_EQ(pred.at(0, 0), (Blocks{1, 6}));
  EXPECT_EQ(pred.at(2, 0).size(), 10u);

  const float masses[] = {0.0f, 1.0f, 0.0f};
  sel = cdf(0.5f);
  sel.cdfthreshd.per_head = masses;
  pred = run_predict(st, Causal::kNone, sel);
  EXPECT_EQ(pred.at(0, 0), (Blocks{1}));
  EXPECT_EQ(pred.at(1, 0).size(), 10u);
  EXPECT_EQ(pred.at(2, 0), (Blocks{1}));
}

TEST(Predict, GqaReadsTheStatsOfItsKvHead) {
  // Hq = 4, Hkv = 2, two batches: the best block is 2 for kv head 0 and 5 for kv head 1 in
  // batch 0, 7 and 8 in batch 1.
  Shape shape = one_row_of_blocks(10, 4, 2);
  shape.batch = 2;
  Stats st(shape, {});
  std::vector<float> scores(10, 0.0f);
  const std::tuple<int64_t, int64_t, int64_t> best_of_kv_head[] = {{0, 0, 2}, {0, 1, 5}, {1, 0, 7}, {1, 1, 8}};
  for (const auto& [b, hk, best] : best_of_kv_head) {
    std::fill(scores.begin(), scores.end(), 0.0f);
    scores[best] = 1.0f;
    st.set_scores(b, hk, scores);
  }
  const Prediction pred = run_predict(st, Causal::kNone, topk(0.1f));
  const std::vector<int32_t> best = {2, 2, 5, 5, 7, 7, 8, 8};  // per (b, h)
  for (int64_t bh = 0; bh < 8; ++bh) EXPECT_EQ(pred.at(bh, 0), (Blocks{best[bh]})) << "b·Hq + h = " << bh;
}

TEST(Predict, RandomStatisticsAgainstBruteForceGeometry) {
  // Random sims and scores; for every mode and causal kind the stats equal the index lists and a
  // brute-force count of allowed blocks over (query, key) pairs; no block without a visible
  // pair is kept; TopK / CDF keep every block with both visible and invisible pairs.
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const Shape shape{.batch = 2, .heads_q = 4, .heads_kv = 2, .len_q = 333, .len_k = 517, .head_dim = 3};
  const BlockConfig blocks{.block_q = 64, .block_k = 32};
  Stats st(shape, blocks);
  for (auto* v : {&st.q_pool, &st.q_sim, &st.k_pool, &st.k_sim})
    for (float& x : *v) x = uni(rng);
  std::vector<uint8_t> mask(static_cast<size_t>(2 * 4 * st.nbq * st.nbk));
  for (uint8_t& m : mask) m = rng() % 3 == 0 ? 1 : 0;

  for (Causal causal : {Causal::kNone, Causal::kTopLeft, Causal::kBottomRight}) {
    for (SelectMode mode : {SelectMode::kDense, SelectMode::kTopK, SelectMode::kCdf, SelectMode::kBlockMask}) {
      SCOPED_TRACE(testing::Message() << "causal " << static_cast<int>(causal) << " mode " << static_cast<int>(mode));
      const Selection sel{
          .mode = mode, .topk = {0.3f}, .cdfthreshd = {0.7f}, .simthreshd1 = {0.0f}, .block_mask = mask.data()};
      const Prediction pred = run_predict(st, causal, sel);
      int64_t kept = 0, allowed = 0;
      for (int64_t bh = 0; bh < 8; ++bh) {
        for (int64_t i = 0; i < st.nbq; ++i) {
          const Blocks& list = pred.at(bh, i);
          kept += static_cast<int64_t>(list.size());
          for (int64_t j = 0; j < st.nbk; ++j) {
            bool any_visible = false, any_hidden = false;
            for (int64_t r = i * 64; r < std::min((i + 1) * 64, shape.len_q); ++r) {
              for (int64_t c = j * 32; c < std::min((j + 1) * 32, shape.len_k); ++c) {
                const bool visible = c < visible_end(r, causal, shape.len_q, shape.len_k);
                any_visible |= visible;
                any_hidden |= !visible;
              }
            }
            allowed += any_visible;
            const bool is_kept = std::find(list.begin(), list.end(), j) != list.end();
            if (!any_visible) {
              EXPECT_FALSE(is_kept) << "bh " << bh << " i " << i << " j " << j;
            }
            if (any_visible && any_hidden && (mode == SelectMode::kTopK || mode == SelectMode::kCdf)) {
              EXPECT_TRUE(is_kept) << "partial block bh " << bh << " i " << i << " j " << j;
            }
            if (mode == SelectMode::kDense) {
              EXPECT_EQ(is_kept, any_visible);
            }
            if (mode == SelectMode::kBlockMask) {
              EXPECT_EQ(is_kept, any_visible && mask[(bh * st.nbq + i) * st.nbk + j]);
            }
          }
        }
      }
      EXPECT_EQ(pred.stats[kStatBlocksKept], kept);
      EXPECT_EQ(pred.stats[kStatBlocksAllowed], allowed);
    }
  }
}

TEST(Predict, NoKeysKeepsNothing) {
  Stats st({.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 200, .len_k = 0, .head_dim = 4}, {});
  std::vector<int32_t> count(4, -7);
  int64_t stats[kStatCount] = {-1, -1, -1, -1};
  const Status status = predict(PredictParams{.shape = st.shape,
                                              .sm_scale = 1.0f,
                                              .select = topk(0.5f),
                                              .stats = st.view(),
                                              .out = {.index = nullptr, .count = count.data()},
                                              .stats_out = stats});
  ASSERT_TRUE(status.ok()) << status.message();
  EXPECT_EQ(count, (std::vector<int32_t>(4, 0)));
  EXPECT_EQ(stats[kStatBlocksKept], 0);
  EXPECT_EQ(stats[kStatBlocksAllowed], 0);
  EXPECT_EQ(stats[kStatPvUnits], -1);  // predict writes only its two entries
}

}  // namespace
}  // namespace sparge::test
