// CPU reference of docs/method.md §2: attention over the kept K blocks of each Q block, online
// softmax in the log2 domain, the per-16-row-group P·V skip, and the epilogue.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/numerics.h"
#include "cpu/cpu_backend.h"
#include "cpu/tensor_access.h"
#include "sparge/layout.h"

namespace sparge::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.6931471805599453f;

// The quantized buffers of one query head (b, h) and of its kv head.
struct HeadData {
  const int8_t* q;         // [Lq, D]
  const float* q_scale;    // [q_groups]
  const int8_t* k;         // [Lk, D]
  const float* k_scale;    // [k_groups]
  const void* v;           // [D, Lk_pad]  e4m3 or fp16
  const float* v_scale;    // [D]
  const float* lse_shift;  // [Lq]
  const int32_t* index;    // [nbq, nbk]
  const int32_t* count;    // [nbq]
};

// Per-thread scratch: the running state of every row of one Q block, and one block's data.
struct QBlockState {
  QBlockState(int64_t block_q, int64_t block_k, int64_t dim)
      : m(block_q),
        l(block_q),
        acc(block_q * dim),
        s(kPvGroupRows * block_k),
        m_blk(kPvGroupRows),
        k_scale(block_k),
        v(block_k * dim),
        p8(block_k),
        pv(dim),
        pv_step(dim),
        pv_chunk(dim) {}
  std::vector<float> m;        // [bq]      running max (log2 units)
  std::vector<float> l;        // [bq]      running sum of p · 448 (p8 in the fp8 modes)
  std::vector<float> acc;      // [bq, D]   running Σ fmt(p · 448) · v_q
  std::vector<float> s;        // [16, bk]  scores of one 16-row group for the current block
  std::vector<float> m_blk;    // [16]      their row maxima
  std::vector<float> k_scale;  // [bk]      k_scale of each key of the current block
  std::vector<float> v;        // [bk, D]   v_q of the current block as fp32, token-major
  std::vector<float> p8;       // [bk]      one row's fmt(p · 448) of the current block (0 where masked)
  std::vector<float> pv;       // [D]       one row's P·V of the current block
  std::vector<float> pv_step;  // [D]       kFp8Fp16Accum: the fp32 sum of one 32-key step
  std::vector<float> pv_chunk;  // [D]      kFp8Fp16Accum: the fp16 accumulator of one 64-key chunk
};

int32_t dot_int8(const int8_t* a, const int8_t* b, int64_t n) {
  int32_t sum = 0;
  for (int64_t d = 0; d < n; ++d) sum += static_cast<int32_t>(a[d]) * static_cast<int32_t>(b[d]);
  return sum;
}

// For x = s − m_new: P · 448 in the P·V format (p8) and what l adds for it (§2, step 3). The fp8 modes:
// the e4m3 code's value, both. kFp16: fp16(exp2(x) · 448), and the unrounded exp2(x) · 448.
struct ScaledP {
  float p8;
  float l_term;
};
ScaledP p_scaled(float x, PvPrecision pv) {
  if (pv_is_fp8(pv)) {
    const float p8 = num::p8_from_code(x);
    return {p8, p8};
  }
  const float p = std::exp2(x) * kPScale;
  return {num::round_fp16(p), p};
}

// Keys [c0, c0 + cols) of V^T [D, Lk_pad] (e4m3 or fp16, keys at v_key_slot) as fp32, token-major:
// out [cols, D].
void decode_v_block(const void* v, PvPrecision pv, int64_t dim, int64_t len_pad, int64_t c0, int64_t cols, float* out) {
  const std::array<float, 256>& e4m3 = num::e4m3_table();
  for (int64_t d = 0; d < dim; ++d) {
    const int64_t channel = d * len_pad;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t at = channel + v_key_slot(c0 + c, pv);
      out[c * dim + d] = pv_is_fp8(pv) ? e4m3[static_cast<const uint8_t*>(v)[at]]
                                       : num::fp16_to_float(static_cast<const uint16_t*>(v)[at]);
    }
  }
}

// The query rows [r0, r1) of one 16-row group and their running state (a slice of QBlockState).
struct Group {
  int64_t r0, r1;
  float* m;    // [r1 - r0]
  float* l;    // [r1 - r0]
  float* acc;  // [r1 - r0, D]
};

// Steps 1–2 for group g and keys [c0, c0 + cols): the scores s[r, c] (−∞ where invisible) and
// their row maxima into st.s / st.m_blk. Returns whether every row is negligible, i.e. whether
// the group skips the block.
bool score_group(const AttendParams& p, const HeadData& hd, const Group& g, int64_t c0, int64_t cols, float pvthreshd,
                 QBlockState& st) {
  const Shape& s = p.shape;
  const int64_t dim = s.head_dim;
  bool skip = true;
  for (int64_t row = g.r0; row < g.r1; ++row) {
    const int64_t r = row - g.r0;
    const int64_t visible = std::clamp(visible_end(row, p.causal, s.len_q, s.len_k) - c0, int64_t{0}, cols);
    const int8_t* q = hd.q + row * dim;
    const float q_scale = hd.q_scale[q_scale_group(row, p.quant.granularity)];
    float* sr = st.s.data() + r * p.blocks.block_k;
    float m_blk = kNegInf;
    for (int64_t c = 0; c < visible; ++c) {
      const int32_t dot = dot_int8(q, hd.k + (c0 + c) * dim, dim);
      sr[c] = static_cast<float>(dot) * (q_scale * st.k_scale[c]);
      m_blk = std::max(m_blk, sr[c]);
    }
    std::fill(sr + visible, sr + cols, kNegInf);
    st.m_blk[r] = m_blk;
    const bool negligible = m_blk == kNegInf || g.m[r] - m_blk > pvthreshd;
    skip = skip && negligible;
  }
  return skip;
}

// One row's P·V of a block, Σ_c p8[c] · v_q[c, :] into st.pv: summed over the keys in ascending
// order in fp32 (kFp8, kFp16).
void block_pv_fp32(int64_t cols, int64_t dim, QBlockState& st) {
  std::fill(st.pv.begin(), st.pv.end(), 0.0f);
  for (int64_t c = 0; c < cols; ++c) {
    const float p8 = st.p8[c];
    if (p8 == 0.0f) continue;  // a zero term changes no sum
    const float* v = st.v.data() + c * dim;
    for (int64_t d = 0; d < dim; ++d) st.pv[d] += p8 * v[d];
  }
}

// The same product with an fp16 accumulator (kFp8Fp16Accum): per chunk of kFp16AccumChunkKeys keys
// of the block an accumulator c = 0; per step of kFp16AccumStepKeys keys of the chunk
// c = fp16(c + step), the step's sum in fp32 in ascending key order (each e4m3 · e4m3 product is
// exact); then pv += c in fp32, chunk by chunk.
void block_pv_fp16_accum(int64_t cols, int64_t dim, QBlockState& st) {
  std::fill(st.pv.begin(), st.pv.end(), 0.0f);
  for (int64_t chunk = 0; chunk < cols; chunk += kFp16AccumChunkKeys) {
    const int64_t chunk_end = std::min(chunk + kFp16AccumChunkKeys, cols);
    std::fill(st.pv_chunk.begin(), st.pv_chunk.end(), 0.0f);
    for (int64_t step = chunk; step < chunk_end; step += kFp16AccumStepKeys) {
      std::fill(st.pv_step.begin(), st.pv_step.end(), 0.0f);
      for (int64_t c = step; c < std::min(step + kFp16AccumStepKeys, chunk_end); ++c) {
        const float p8 = st.p8[c];
        if (p8 == 0.0f) continue;  // a zero term changes no sum
        const float* v = st.v.data() + c * dim;
        for (int64_t d = 0; d < dim; ++d) st.pv_step[d] += p8 * v[d];
      }
      for (int64_t d = 0; d < dim; ++d) st.pv_chunk[d] = num::round_fp16(st.pv_chunk[d] + st.pv_step[d]);
    }
    for (int64_t d = 0; d < dim; ++d) st.pv[d] += st.pv_chunk[d];
  }
}

// Step 3 for group g over the block scored by score_group, with its V decoded in st.v.
void update_group(const AttendParams& p, const Group& g, int64_t cols, QBlockState& st) {
  const int64_t dim = p.shape.head_dim;
  for (int64_t r = 0; r < g.r1 - g.r0; ++r) {
    const float* sr = st.s.data() + r * p.blocks.block_k;
    const float m_new = std::max(g.m[r], st.m_blk[r]);
    const float alpha = m_new == kNegInf ? 1.0f : std::exp2(g.m[r] - m_new);
    float p_sum = 0.0f;  // l's units: p · 448 (§2, step 3)
    for (int64_t c = 0; c < cols; ++c) {
      st.p8[c] = 0.0f;
      if (sr[c] == kNegInf) continue;  // p = 0
      const ScaledP scaled = p_scaled(sr[c] - m_new, p.quant.pv);
      st.p8[c] = scaled.p8;
      p_sum += scaled.l_term;
    }
    if (p.quant.pv == PvPrecision::kFp8Fp16Accum) {
      block_pv_fp16_accum(cols, dim, st);
    } else {
      block_pv_fp32(cols, dim, st);
    }
    g.l[r] = g.l[r] * alpha + p_sum;
    float* acc = g.acc + r * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] = acc[d] * alpha + st.pv[d];
    g.m[r] = m_new;
  }
}

struct PvCount {
  int64_t units = 0;
  int64_t skipped = 0;
};

// Q block i of head (b, h): every 16-row group runs the online softmax over the kept blocks in
// ascending order (a group skips a block on its own), then the epilogue writes o and lse.
PvCount attend_q_block(const AttendParams& p, const HeadData& hd, int64_t b, int64_t h, int64_t i, QBlockState& st) {
  const Shape& s = p.shape;
  const int64_t dim = s.head_dim;
  const int64_t nbk = ceil_div(s.len_k, p.blocks.block_k);
  const int64_t row0 = i * p.blocks.block_q;
  const int64_t rows = std::min(p.blocks.block_q, s.len_q - row0);
  const float pvthreshd = head_value(p.pvthreshd, h);

  std::fill(st.m.begin(), st.m.begin() + rows, kNegInf);
  std::fill(st.l.begin(), st.l.begin() + rows, 0.0f);
  std::fill(st.acc.begin(), st.acc.begin() + rows * dim, 0.0f);
  PvCount n;

  const int32_t* kept = hd.index + i * nbk;
  for (int32_t kb = 0; kb < hd.count[i]; ++kb) {
    const int64_t c0 = kept[kb] * p.blocks.block_k;
    const int64_t cols = std::min(c0 + p.blocks.block_k, s.len_k) - c0;
    for (int64_t c = 0; c < cols; ++c) st.k_scale[c] = hd.k_scale[k_scale_group(c0 + c, p.quant.granularity)];
    bool v_decoded = false;
    for (int64_t first = 0; first < rows; first += kPvGroupRows) {
      const Group g{.r0 = row0 + first,
                    .r1 = row0 + std::min(first + kPvGroupRows, rows),
                    .m = st.m.data() + first,
                    .l = st.l.data() + first,
                    .acc = st.acc.data() + first * dim};
      ++n.units;
      if (score_group(p, hd, g, c0, cols, pvthreshd, st)) {
        ++n.skipped;
        continue;
      }
      if (!v_decoded) {
        decode_v_block(hd.v, p.quant.pv, dim, padded_len_k(s.len_k), c0, cols, st.v.data());
        v_decoded = true;
      }
      update_group(p, g, cols, st);
    }
  }

  // 4. Epilogue: o = acc · v_scale / l (l in units of p · 448; 0 when l = 0), lse in natural log,
  // un-smoothed.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    const float l = st.l[r];
    float* acc = st.acc.data() + r * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] = l == 0.0f ? 0.0f : acc[d] * hd.v_scale[d] / l;
    store_row(p.o, p.o_dtype, row_offset(p.o_strides, b, h, row), dim, acc);
    if (p.lse != nullptr) {
      p.lse[(b * s.heads_q + h) * s.len_q + row] =
          l == 0.0f ? kNegInf : kLn2 * (st.m[r] + (std::log2(l) - kLog2PScale)) + hd.lse_shift[row];
    }
  }
  return n;
}

}  // namespace

void attend(const AttendParams& p) {
  const Shape& s = p.shape;
  const int64_t dim = s.head_dim;
  const QuantGranularity g = p.quant.granularity;
  const QuantizedQKV& qz = p.quantized;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const int64_t heads_per_kv = s.heads_q / s.heads_kv;
  const int64_t v_bytes = v_elem_bytes(p.quant.pv);
  int64_t units = 0;
  int64_t skipped = 0;

  // One task per (b, h, Q block): the result does not depend on the thread count.
#pragma omp parallel reduction(+ : units, skipped)
  {
    QBlockState state(p.blocks.block_q, p.blocks.block_k, dim);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < s.batch * s.heads_q * nbq; ++task) {
      const int64_t bhq = task / nbq;
      const int64_t b = bhq / s.heads_q;
      const int64_t h = bhq % s.heads_q;
      const int64_t bhk = b * s.heads_kv + h / heads_per_kv;
      const HeadData hd{.q = qz.q + bhq * s.len_q * dim,
                        .q_scale = qz.q_scale + bhq * q_scale_groups(s.len_q, g),
                        .k = qz.k + bhk * s.len_k * dim,
                        .k_scale = qz.k_scale + bhk * k_scale_groups(s.len_k, g),
                        .v = static_cast<const char*>(qz.v) + bhk * dim * padded_len_k(s.len_k) * v_bytes,
                        .v_scale = qz.v_scale + bhk * dim,
                        .lse_shift = qz.lse_shift + bhq * s.len_q,
                        .index = p.index.index + bhq * nbq * nbk,
                        .count = p.index.count + bhq * nbq};
      const PvCount n = attend_q_block(p, hd, b, h, task % nbq, state);
      units += n.units;
      skipped += n.skipped;
    }
  }

  if (p.stats_out != nullptr) {
    p.stats_out[kStatPvUnits] = units;
    p.stats_out[kStatPvSkipped] = skipped;
  }
}

}  // namespace sparge::cpu
