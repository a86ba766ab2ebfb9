// CPU reference of docs/method.md §0: K smoothing, INT8 Q and K, V in the P·V format, LSE
// shift and the block statistics (pool, self-similarity) read by prediction.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/numerics.h"
#include "cpu/cpu_backend.h"
#include "cpu/tensor_access.h"
#include "sparge/layout.h"

namespace sparge::cpu {
namespace {

// Quantizes the rows x [n, D] to INT8 with one scale per group, group_of(r) in [0, groups):
// amax over the group, x8 = clamp(rne(x · 127 / amax)); scale[g] = amax / 127 · scale_factor
// (both 0 for an all-zero group).
template <typename GroupOf>
void quantize_int8_groups(const float* x, int64_t n, int64_t dim, int64_t groups, GroupOf group_of, float scale_factor,
                          int8_t* x8, float* scale) {
  std::vector<float> amax(groups, 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    float& a = amax[group_of(r)];
    for (int64_t d = 0; d < dim; ++d) a = std::max(a, std::fabs(x[r * dim + d]));
  }
  std::vector<float> inv(groups, 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const bool zero = amax[g] == 0.0f;
    inv[g] = zero ? 0.0f : kInt8Max / amax[g];
    scale[g] = zero ? 0.0f : amax[g] / kInt8Max * scale_factor;
  }
  for (int64_t r = 0; r < n; ++r) {
    const float row_inv = inv[group_of(r)];
    for (int64_t d = 0; d < dim; ++d) x8[r * dim + d] = num::quantize_int8(x[r * dim + d], row_inv);
  }
}

// Block statistics of the rows x [n, D], n >= 1: the mean row, and the mean pairwise cosine
// similarity (‖Σ x̂‖² − Σ ‖x̂‖²) / (n (n − 1)) with x̂ = x / ‖x‖ (0 for a zero row), 1 when n = 1.
void block_stats(const float* x, int64_t n, int64_t dim, float* pool, float* sim) {
  std::vector<float> sum(dim, 0.0f);
  std::vector<float> unit_sum(dim, 0.0f);
  float unit_norm2_sum = 0.0f;
  for (int64_t r = 0; r < n; ++r) {
    const float* row = x + r * dim;
    float norm2 = 0.0f;
    for (int64_t d = 0; d < dim; ++d) {
      sum[d] += row[d];
      norm2 += row[d] * row[d];
    }
    const float norm = std::sqrt(norm2);
    if (norm == 0.0f) continue;
    float unit_norm2 = 0.0f;
    for (int64_t d = 0; d < dim; ++d) {
      const float u = row[d] / norm;
      unit_sum[d] += u;
      unit_norm2 += u * u;
    }
    unit_norm2_sum += unit_norm2;
  }
  for (int64_t d = 0; d < dim; ++d) pool[d] = sum[d] / static_cast<float>(n);
  if (n == 1) {
    *sim = 1.0f;
    return;
  }
  float sum_norm2 = 0.0f;
  for (int64_t d = 0; d < dim; ++d) sum_norm2 += unit_sum[d] * unit_sum[d];
  *sim = (sum_norm2 - unit_norm2_sum) / (static_cast<float>(n) * static_cast<float>(n - 1));
}

// The kSpikeKeys rows of x [n, D] with the largest squared norm (fp32, summed over d in order;
// ties: the lower row first), by descending norm, copied to spikes [kSpikeKeys, D]; slots past
// n are zeros.
void block_spikes(const float* x, int64_t n, int64_t dim, float* spikes) {
  std::array<int64_t, kSpikeKeys> row;
  std::array<float, kSpikeKeys> norm2;
  row.fill(-1);
  norm2.fill(-1.0f);
  for (int64_t r = 0; r < n; ++r) {
    float nr = 0.0f;
    for (int64_t d = 0; d < dim; ++d) nr += x[r * dim + d] * x[r * dim + d];
    for (int64_t t = 0; t < kSpikeKeys; ++t) {
      if (nr > norm2[t]) {  // insert at t, shifting the rest down
        for (int64_t u = kSpikeKeys - 1; u > t; --u) {
          norm2[u] = norm2[u - 1];
          row[u] = row[u - 1];
        }
        norm2[t] = nr;
        row[t] = r;
        break;
      }
    }
  }
  for (int64_t t = 0; t < kSpikeKeys; ++t) {
    float* out = spikes + t * dim;
    if (row[t] < 0) {
      std::fill(out, out + dim, 0.0f);
    } else {
      std::copy(x + row[t] * dim, x + (row[t] + 1) * dim, out);
    }
  }
}

// Statistics of every block of `block` rows of x [len, D] (the last block holds the rest).
void all_block_stats(const float* x, int64_t len, int64_t dim, int64_t block, float* pool, float* sim) {
  for (int64_t i = 0; i * block < len; ++i) {
    const int64_t rows = std::min(block, len - i * block);
    block_stats(x + i * block * dim, rows, dim, pool + i * dim, sim + i);
  }
}

// Loads rows [0, len) of head (b, h) of a strided input as fp32 [len, D].
void load_head(const void* base, DType dtype, const Strides& strides, int64_t b, int64_t h, int64_t len, int64_t dim,
               float* out) {
  for (int64_t t = 0; t < len; ++t) load_row(base, dtype, row_offset(strides, b, h, t), dim, out + t * dim);
}

// K and V of one (b, hk): k_mean, INT8 k̃ with its scales, K block statistics, V in the P·V
// format transposed to [D, Lk_pad] with its per-channel scales.
void quantize_kv_head(const QuantizeParams& p, int64_t b, int64_t hk) {
  const Shape& s = p.shape;
  const int64_t dim = s.head_dim;
  const int64_t len = s.len_k;
  const int64_t bh = b * s.heads_kv + hk;
  const QuantGranularity g = p.quant.granularity;
  const QuantizedQKV& out = p.out;

  float* mean = out.k_mean + bh * dim;
  std::fill(mean, mean + dim, 0.0f);
  float* v_scale = out.v_scale + bh * dim;
  if (len == 0) {
    std::fill(v_scale, v_scale + dim, 0.0f);
    return;
  }

  std::vector<float> k(len * dim);  // [Lk, D], smoothed in place
  load_head(p.in.k, p.in.dtype, p.in.k_strides, b, hk, len, dim, k.data());
  if (p.quant.smooth_k) {
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t d = 0; d < dim; ++d) mean[d] += k[t * dim + d];
    }
    for (int64_t d = 0; d < dim; ++d) mean[d] /= static_cast<float>(len);
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t d = 0; d < dim; ++d) k[t * dim + d] -= mean[d];
    }
  }
  quantize_int8_groups(
      k.data(), len, dim, k_scale_groups(len, g), [g](int64_t c) { return k_scale_group(c, g); }, 1.0f,
      out.k + bh * len * dim, out.k_scale + bh * k_scale_groups(len, g));
  const int64_t nbk = ceil_div(len, p.blocks.block_k);
  all_block_stats(k.data(), len, dim, p.blocks.block_k, out.k_pool + bh * nbk * dim, out.k_sim + bh * nbk);
  if (out.k_spikes != nullptr) {
    const int64_t bk = p.blocks.block_k;
    for (int64_t j = 0; j < nbk; ++j) {
      block_spikes(k.data() + j * bk * dim, std::min(bk, len - j * bk), dim,
                   out.k_spikes + (bh * nbk + j) * kSpikeKeys * dim);
    }
  }

  std::vector<float> v(len * dim);  // [Lk, D]
  load_head(p.in.v, p.in.dtype, p.in.v_strides, b, hk, len, dim, v.data());
  const int64_t len_pad = padded_len_k(len);
  const float v_max = v_quant_max(p.quant.pv);
  for (int64_t d = 0; d < dim; ++d) {
    float amax = 0.0f;
    for (int64_t t = 0; t < len; ++t) amax = std::max(amax, std::fabs(v[t * dim + d]));
    const float inv = amax == 0.0f ? 0.0f : v_max / amax;
    v_scale[d] = amax / v_max;
    const int64_t row = (bh * dim + d) * len_pad;  // channel d of [B, Hkv, D, Lk_pad]
    if (pv_is_fp8(p.quant.pv)) {  // keys in v_key_slot order
      uint8_t* vq = static_cast<uint8_t*>(out.v) + row;
      std::fill(vq, vq + len_pad, uint8_t{0});
      for (int64_t t = 0; t < len; ++t) vq[v_key_slot(t, p.quant.pv)] = num::float_to_e4m3(v[t * dim + d] * inv);
    } else {
      uint16_t* vq = static_cast<uint16_t*>(out.v) + row;
      for (int64_t t = 0; t < len; ++t) vq[t] = num::float_to_fp16(v[t * dim + d] * inv);
      std::fill(vq + len, vq + len_pad, uint16_t{0});
    }
  }
}

// Q of one (b, h): INT8 q with its scales (sm_scale · log2 e folded in), the LSE shift and the
// Q block statistics. Reads k_mean, so runs after every K head is done.
void quantize_q_head(const QuantizeParams& p, int64_t b, int64_t h) {
  const Shape& s = p.shape;
  const int64_t dim = s.head_dim;
  const int64_t len = s.len_q;
  const int64_t bh = b * s.heads_q + h;
  const int64_t hk = h / (s.heads_q / s.heads_kv);
  const QuantGranularity g = p.quant.granularity;
  const QuantizedQKV& out = p.out;
  const float sm_scale = p.quant.sm_scale;
  const float log2_scale = sm_scale * kLog2e;

  std::vector<float> q(len * dim);  // [Lq, D]
  load_head(p.in.q, p.in.dtype, p.in.q_strides, b, h, len, dim, q.data());
  quantize_int8_groups(
      q.data(), len, dim, q_scale_groups(len, g), [g](int64_t r) { return q_scale_group(r, g); }, log2_scale,
      out.q + bh * len * dim, out.q_scale + bh * q_scale_groups(len, g));

  const float* mean = out.k_mean + (b * s.heads_kv + hk) * dim;
  for (int64_t r = 0; r < len; ++r) {
    float dot = 0.0f;
    for (int64_t d = 0; d < dim; ++d) dot += q[r * dim + d] * mean[d];
    out.lse_shift[bh * len + r] = sm_scale * dot;
  }
  const int64_t nbq = ceil_div(len, p.blocks.block_q);
  all_block_stats(q.data(), len, dim, p.blocks.block_q, out.q_pool + bh * nbq * dim, out.q_sim + bh * nbq);
}

}  // namespace

void quantize(const QuantizeParams& p) {
  const Shape& s = p.shape;
  const int64_t kv_heads = s.batch * s.heads_kv;
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < kv_heads; ++bh) quantize_kv_head(p, bh / s.heads_kv, bh % s.heads_kv);

  if (s.len_q == 0) return;
  const int64_t q_heads = s.batch * s.heads_q;
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < q_heads; ++bh) quantize_q_head(p, bh / s.heads_q, bh % s.heads_q);
}

}  // namespace sparge::cpu
