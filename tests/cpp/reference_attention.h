// Exact softmax attention in double precision: the ground truth of the accuracy tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "sparge/layout.h"
#include "test_util.h"

namespace sparge::test {

struct Reference {
  std::vector<double> o;              // [B, Hq, Lq, D]; 0 for a row that sees no key
  std::vector<double> lse;            // [B, Hq, Lq], natural log of Σ exp(scores); −∞ for a row that sees no key
  std::vector<double> max_abs_score;  // [B, Hq, Lq], max |score| over the visible keys (0 if none)
};

// An optional block mask restricting the keys further: key c is visible to query r only when
// mask[b, h, r / block_q, c / block_k] != 0 ([B, Hq, nbq, nbk], as Selection::block_mask).
struct ReferenceBlockMask {
  const uint8_t* mask = nullptr;
  BlockConfig blocks;
};

// softmax(sm_scale · q kᵀ) v over the visible keys (causal as in layout.h's visible_end), with
// query head h reading kv head h / (Hq / Hkv).
inline Reference reference_attention(const QKV& x, const Shape& s, Causal causal, double sm_scale,
                                     const ReferenceBlockMask& block_mask = {}) {
  const int64_t dim = s.head_dim;
  const auto [nbq, nbk] = block_counts(s, block_mask.blocks);
  Reference ref{
      std::vector<double>(static_cast<size_t>(s.batch * s.heads_q * s.len_q * dim), 0.0),
      std::vector<double>(static_cast<size_t>(s.batch * s.heads_q * s.len_q), -std::numeric_limits<double>::infinity()),
      std::vector<double>(static_cast<size_t>(s.batch * s.heads_q * s.len_q), 0.0)};
  const std::vector<float> q = x.q.values(), k = x.k.values(), v = x.v.values();  // (b, h, t, d) order
  std::vector<double> scores(s.len_k);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads_q; ++h) {
      const int64_t hk = h / (s.heads_q / s.heads_kv);
      for (int64_t r = 0; r < s.len_q; ++r) {
        const size_t row = static_cast<size_t>((b * s.heads_q + h) * s.len_q + r);
        const int64_t end = visible_end(r, causal, s.len_q, s.len_k);
        auto visible = [&](int64_t c) {
          if (c >= end) return false;
          if (block_mask.mask == nullptr) return true;
          const int64_t i = r / block_mask.blocks.block_q, j = c / block_mask.blocks.block_k;
          return block_mask.mask[((b * s.heads_q + h) * nbq + i) * nbk + j] != 0;
        };
        const float* qr = &q[row * dim];
        const float* kh = &k[static_cast<size_t>((b * s.heads_kv + hk) * s.len_k * dim)];
        const float* vh = &v[static_cast<size_t>((b * s.heads_kv + hk) * s.len_k * dim)];
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t c = 0; c < s.len_k; ++c) {
          if (!visible(c)) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < dim; ++d) dot += static_cast<double>(qr[d]) * kh[c * dim + d];
          scores[c] = sm_scale * dot;
          m = std::max(m, scores[c]);
          ref.max_abs_score[row] = std::max(ref.max_abs_score[row], std::fabs(scores[c]));
        }
        if (m == -std::numeric_limits<double>::infinity()) continue;
        double l = 0.0;
        double* o = &ref.o[row * dim];
        for (int64_t c = 0; c < s.len_k; ++c) {
          if (!visible(c)) continue;
          const double p = std::exp(scores[c] - m);
          l += p;
          for (int64_t d = 0; d < dim; ++d) o[d] += p * vh[c * dim + d];
        }
        for (int64_t d = 0; d < dim; ++d) o[d] /= l;
        ref.lse[row] = m + std::log(l);
      }
    }
  }
  return ref;
}

// The default softmax scale of the library, D^-0.5 (as the fp32 value the library uses).
inline double default_sm_scale(int64_t head_dim) { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

}  // namespace sparge::test
