// CPU reference of docs/method.md §1: which K blocks each Q block keeps.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cpu/tensor_access.h"
#include "sparge/layout.h"

namespace sparge::cpu {
namespace {

// Causal geometry of Q block i: the allowed K blocks are [0, allowed); block j is partial when
// allowed and not fully visible to the block's first row.
struct QBlockGeometry {
  int64_t allowed = 0;
  int64_t first_row_visible_end = 0;  // visible_end of the block's first row
  int64_t block_k = 0;
  int64_t len_k = 0;

  bool partial(int64_t j) const { return std::min((j + 1) * block_k, len_k) > first_row_visible_end; }
};

QBlockGeometry geometry(const PredictParams& p, int64_t i) {
  const Shape& s = p.shape;
  const int64_t r0 = i * p.blocks.block_q;
  const int64_t r1 = std::min(r0 + p.blocks.block_q, s.len_q) - 1;
  const int64_t last_row_end = visible_end(r1, p.causal, s.len_q, s.len_k);
  // K block j is allowed when j · block_k < visible_end(r1).
  const int64_t allowed = last_row_end <= 0 ? 0 : ceil_div(last_row_end, p.blocks.block_k);
  return {allowed, visible_end(r0, p.causal, s.len_q, s.len_k), p.blocks.block_k, s.len_k};
}

// Compressed score of K block j for the pooled query q_pool (method.md §1, "Block scores"); each dot
// product one fused multiply-add per column (one rounding), as the CUDA backend computes it.
float block_score(const PredictParams& p, const float* q_pool, int64_t bhk, int64_t j) {
  const Shape& s = p.shape;
  const int64_t dim = s.head_dim;
  const int64_t nbk = block_counts(s, p.blocks).nbk;
  const float* k_pool = p.stats.k_pool + (bhk * nbk + j) * dim;
  float dot = 0.0f;
  for (int64_t d = 0; d < dim; ++d) dot = std::fma(q_pool[d], k_pool[d], dot);
  if (p.select.block_score == BlockScore::kMean) return dot * p.sm_scale;

  // kSpikes: log(Σ_t exp(s·q̄·k*_t) + (n − m)·exp(s·q̄·k̄')), k̄' the mean of the other n − m keys.
  const int64_t n = std::min(p.blocks.block_k, s.len_k - j * p.blocks.block_k);
  const int64_t m = std::min(kSpikeKeys, n);
  std::array<float, kSpikeKeys + 1> term{};
  float spike_sum = 0.0f;
  for (int64_t t = 0; t < m; ++t) {
    const float* spike = p.stats.k_spikes + ((bhk * nbk + j) * kSpikeKeys + t) * dim;
    float b = 0.0f;
    for (int64_t d = 0; d < dim; ++d) b = std::fma(q_pool[d], spike[d], b);
    spike_sum += b;
    term[t] = b * p.sm_scale;
  }
  int64_t terms = m;
  if (n > m) {
    const float rest = static_cast<float>(n - m);
    term[terms++] = (static_cast<float>(n) * dot - spike_sum) / rest * p.sm_scale + std::log(rest);
  }
  float max_term = term[0];
  for (int64_t t = 1; t < terms; ++t) max_term = std::max(max_term, term[t]);
  float sum = 0.0f;
  for (int64_t t = 0; t < terms; ++t) sum += std::exp(term[t] - max_term);
  return max_term + std::log(sum);
}

// kTopK / kCdf for Q block i of head (b, h): marks the kept blocks of [0, geo.allowed) in `keep`.
void select_by_scores(const PredictParams& p, int64_t b, int64_t h, int64_t i, const QBlockGeometry& geo,
                      std::vector<uint8_t>& keep) {
  const Shape& s = p.shape;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const int64_t dim = s.head_dim;
  const int64_t bhq = b * s.heads_q + h;
  const int64_t bhk = b * s.heads_kv + h / (s.heads_q / s.heads_kv);
  const float simthreshd = head_value(p.select.simthreshd1, h);
  const auto uniform = [simthreshd](float sim) { return sim > simthreshd; };

  if (!uniform(p.stats.q_sim[bhq * nbq + i])) {  // non-uniform Q block: keep every allowed block
    std::fill(keep.begin(), keep.begin() + geo.allowed, uint8_t{1});
    return;
  }

  // Candidates: the allowed uniform K blocks, with their compressed scores s̄_j. Non-uniform K
  // blocks are always kept.
  const float* q_pool = p.stats.q_pool + (bhq * nbq + i) * dim;
  std::vector<int64_t> cand;
  std::vector<float> score(geo.allowed, 0.0f);
  for (int64_t j = 0; j < geo.allowed; ++j) {
    if (!uniform(p.stats.k_sim[bhk * nbk + j])) {
      keep[j] = 1;
      continue;
    }
    score[j] = block_score(p, q_pool, bhk, j);
    cand.push_back(j);
  }

  // Rank by s̄ descending, ties by lower j (cand is ascending and the sort is stable).
  std::vector<int64_t> ranked = cand;
  std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t c) { return score[a] > score[c]; });
  const int64_t n_cand = static_cast<int64_t>(ranked.size());

  int64_t n_selected = 0;
  if (p.select.mode == SelectMode::kTopK) {
    const float topk = head_value(p.select.topk, h);
    const float wanted = std::floor(topk * static_cast<float>(geo.allowed) + 0.5f);
    const int64_t n = std::clamp(static_cast<int64_t>(wanted), int64_t{1}, std::max(geo.allowed, int64_t{1}));
    n_selected = std::min(n_cand, n);
  } else if (n_cand > 0) {  // kCdf: the shortest ranked prefix whose p̄ = softmax(s̄) mass reaches cdfthreshd
    const float cdfthreshd = head_value(p.select.cdfthreshd, h);
    const float max_score = score[ranked[0]];
    const float gain = cdf_score_gain(p.stats.q_sim[bhq * nbq + i], p.select.cdf_sharpen);
    std::vector<float> prob(geo.allowed, 0.0f);
    float total = 0.0f;
    for (int64_t j : cand) {
      prob[j] = std::exp(gain * (score[j] - max_score));
      total += prob[j];
    }
    float mass = 0.0f;
    n_selected = n_cand;
    for (int64_t n = 0; n < n_cand; ++n) {
      mass += prob[ranked[n]] / total;
      if (mass >= cdfthreshd) {
        n_selected = n + 1;
        break;
      }
    }
  }
  for (int64_t n = 0; n < n_selected; ++n) keep[ranked[n]] = 1;

  // Always kept: the sink block, every partial block, and the best candidate if nothing else is.
  if (p.select.attention_sink && geo.allowed > 0) keep[0] = 1;
  for (int64_t j = 0; j < geo.allowed; ++j) {
    if (geo.partial(j)) keep[j] = 1;
  }
  const bool none = std::none_of(keep.begin(), keep.begin() + geo.allowed, [](uint8_t k) { return k != 0; });
  if (none && n_cand > 0) keep[ranked[0]] = 1;
}

}  // namespace

void predict(const PredictParams& p) {
  const Shape& s = p.shape;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const int64_t q_blocks = s.batch * s.heads_q * nbq;
  int64_t kept_total = 0;
  int64_t allowed_total = 0;

#pragma omp parallel for schedule(dynamic) reduction(+ : kept_total, allowed_total)
  for (int64_t bhi = 0; bhi < q_blocks; ++bhi) {
    const int64_t i = bhi % nbq;
    const int64_t bh = bhi / nbq;
    const int64_t b = bh / s.heads_q;
    const int64_t h = bh % s.heads_q;
    const QBlockGeometry geo = geometry(p, i);

    std::vector<uint8_t> keep(nbk, 0);  // over every K block; only [0, allowed) can be set
    switch (p.select.mode) {
      case SelectMode::kDense: std::fill(keep.begin(), keep.begin() + geo.allowed, uint8_t{1}); break;
      case SelectMode::kBlockMask: {
        const uint8_t* mask = p.select.block_mask + bhi * nbk;
        for (int64_t j = 0; j < geo.allowed; ++j) keep[j] = mask[j] != 0 ? 1 : 0;
        break;
      }
      case SelectMode::kTopK:
      case SelectMode::kCdf: select_by_scores(p, b, h, i, geo, keep); break;
    }

    int32_t count = 0;
    for (int64_t j = 0; j < nbk; ++j) {
      if (keep[j] != 0) p.out.index[bhi * nbk + count++] = static_cast<int32_t>(j);
    }
    std::fill(p.out.index + bhi * nbk + count, p.out.index + (bhi + 1) * nbk, int32_t{-1});
    p.out.count[bhi] = count;
    if (p.mask_out != nullptr) std::copy(keep.begin(), keep.end(), p.mask_out + bhi * nbk);
    kept_total += count;
    allowed_total += geo.allowed;
  }

  if (p.stats_out != nullptr) {
    p.stats_out[kStatBlocksKept] = kept_total;
    p.stats_out[kStatBlocksAllowed] = allowed_total;
  }
}

}  // namespace sparge::cpu
