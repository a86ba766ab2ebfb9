// Test helpers: host tensors in the public dtypes and layouts, aligned workspaces, structured
// random inputs, accuracy metrics, and a one-call wrapper of sparge::attention that poisons
// every output first.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/numerics.h"
#include "sparge/api.h"

namespace sparge::test {

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
inline constexpr float kInf = std::numeric_limits<float>::infinity();

// A fresh seed per call (SPARGE_TEST_SEED pins it); tests print it with SCOPED_TRACE.
inline uint32_t fresh_seed() {
  if (const char* pinned = std::getenv("SPARGE_TEST_SEED"))
    return static_cast<uint32_t>(std::strtoul(pinned, nullptr, 10));
  return std::random_device{}();
}

inline size_t dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// HND = [B, H, L, D] contiguous; NHD = [B, L, H, D] contiguous, both addressed as (b, h, t, d).
enum class Layout { kHND, kNHD };

// A host [B, H, L, D] tensor stored in one of the public dtypes.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(int64_t b, int64_t h, int64_t l, int64_t d, DType type, Layout order = Layout::kHND)
      : batch(b),
        heads(h),
        len(l),
        dim(d),
        dtype(type),
        layout(order),
        bytes_(static_cast<size_t>(b * h * l * d) * dtype_bytes(type)) {}

  Strides strides() const {
    if (layout == Layout::kHND) return {.batch = heads * len * dim, .head = len * dim, .token = dim};
    return {.batch = len * heads * dim, .head = dim, .token = heads * dim};
  }
  int64_t offset(int64_t b, int64_t h, int64_t t, int64_t d) const {
    const Strides s = strides();
    return b * s.batch + h * s.head + t * s.token + d;
  }

  // Stores x rounded to the dtype (round-to-nearest-even).
  void set(int64_t b, int64_t h, int64_t t, int64_t d, float x) {
    const size_t at = static_cast<size_t>(offset(b, h, t, d)) * dtype_bytes(dtype);
    if (dtype == DType::kFloat32) {
      std::memcpy(&bytes_[at], &x, 4);
      return;
    }
    const uint16_t bits = dtype == DType::kFloat16 ? num::float_to_fp16(x) : num::float_to_bf16(x);
    std::memcpy(&bytes_[at], &bits, 2);
  }
  float get(int64_t b, int64_t h, int64_t t, int64_t d) const {
    const size_t at = static_cast<size_t>(offset(b, h, t, d)) * dtype_bytes(dtype);
    if (dtype == DType::kFloat32) {
      float x;
      std::memcpy(&x, &bytes_[at], 4);
      return x;
    }
    uint16_t bits;
    std::memcpy(&bits, &bytes_[at], 2);
    return dtype == DType::kFloat16 ? num::fp16_to_float(bits) : num::bf16_to_float(bits);
  }
  void fill(float x) {
    for (int64_t i = 0; i < batch * heads * len * dim; ++i)
      set(0, 0, 0, i, x);  // (0, 0, 0, i) is flat element i in both layouts
  }
  // All elements in (b, h, t, d) order.
  std::vector<float> values() const {
    std::vector<float> out;
    out.reserve(static_cast<size_t>(batch * heads * len * dim));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t t = 0; t < len; ++t)
          for (int64_t d = 0; d < dim; ++d) out.push_back(get(b, h, t, d));
    return out;
  }

  void* data() { return bytes_.empty() ? nullptr : bytes_.data(); }
  const void* data() const { return bytes_.empty() ? nullptr : bytes_.data(); }

  int64_t batch = 0, heads = 0, len = 0, dim = 0;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kHND;

 private:
  std::vector<unsigned char> bytes_;
};

// Host memory aligned to kWorkspaceAlign, filled with a poison byte.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t bytes, unsigned char poison = 0xA5)
      : size_(bytes),
        ptr_(static_cast<unsigned char*>(std::aligned_alloc(
            kWorkspaceAlign, static_cast<size_t>(round_up(static_cast<int64_t>(bytes) + 1, kWorkspaceAlign))))) {
    std::memset(ptr_.get(), poison, size_);
  }
  void* data() { return ptr_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  size_t size_;
  std::unique_ptr<unsigned char, Free> ptr_;
};

// A tensor holding `values` in (b, h, t, d) order.
inline HostTensor tensor_of(int64_t b, int64_t h, int64_t l, int64_t d, const std::vector<float>& values,
                            DType dtype = DType::kFloat32, Layout layout = Layout::kHND) {
  HostTensor t(b, h, l, d, dtype, layout);
  size_t i = 0;
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t hi = 0; hi < h; ++hi)
      for (int64_t ti = 0; ti < l; ++ti)
        for (int64_t di = 0; di < d; ++di) t.set(bi, hi, ti, di, values.at(i++));
  return t;
}

// q, k, v of one problem.
struct QKV {
  HostTensor q, k, v;
};

inline Inputs inputs_of(const QKV& x) {
  return {.q = x.q.data(),
          .k = x.k.data(),
          .v = x.v.data(),
          .dtype = x.q.dtype,
          .q_strides = x.q.strides(),
          .k_strides = x.k.strides(),
          .v_strides = x.v.strides()};
}

// The stage buffers (QuantizedQKV, BlockIndex) of one problem in a poisoned host allocation.
struct StageWorkspace {
  StageWorkspace(const Shape& s, const BlockConfig& b, const QuantOptions& q, unsigned char poison = 0xCD)
      : memory(stage_buffers_size(s, b, q.granularity, q.pv), poison),
        buffers(carve_stage_buffers(memory.data(), s, b, q.granularity, q.pv)) {}
  AlignedBuffer memory;
  StageBuffers buffers;
};

inline Status run_quantize(const Shape& s, const BlockConfig& b, const QuantOptions& q, const QKV& x,
                           const QuantizedQKV& out) {
  return quantize(
      QuantizeParams{.device = Device::kCPU, .shape = s, .blocks = b, .in = inputs_of(x), .quant = q, .out = out});
}

// Structured inputs (DESIGN §3): q and k share a positional signal (per channel a sinusoid of
// period 4 to 800 tokens, phases per (b, kv head)) plus 30 % noise, so q_r · k_c peaks at c = r
// (score ≈ 10) and attention concentrates near the diagonal; every 7th channel of k carries a
// large constant outlier (removed by smoothing); v mixes a smooth signal and noise.
inline QKV make_structured(const Shape& s, DType dtype, Layout layout, uint32_t seed) {
  QKV x{HostTensor(s.batch, s.heads_q, s.len_q, s.head_dim, dtype, layout),
        HostTensor(s.batch, s.heads_kv, s.len_k, s.head_dim, dtype, layout),
        HostTensor(s.batch, s.heads_kv, s.len_k, s.head_dim, dtype, layout)};
  std::mt19937 rng(seed);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  std::uniform_real_distribution<float> phase(0.0f, 6.2831853f);
  const int64_t dim = s.head_dim;
  // Peak score ≈ amp² · D/2 · D^-0.5 ≈ 10 for every D.
  const float amp = std::sqrt(20.0f / std::sqrt(static_cast<float>(dim)));
  std::vector<float> freq(dim);
  for (int64_t d = 0; d < dim; ++d)
    freq[d] = 6.2831853f / (4.0f * std::pow(200.0f, static_cast<float>(d % 16) / 15.0f));
  const int64_t group = s.heads_q / s.heads_kv;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t hk = 0; hk < s.heads_kv; ++hk) {
      std::vector<float> ph(dim), outlier(dim), v_ph(dim);
      for (int64_t d = 0; d < dim; ++d) {
        ph[d] = phase(rng);
        v_ph[d] = phase(rng);
        outlier[d] = d % 7 == 2 ? 20.0f * noise(rng) : 0.0f;
      }
      for (int64_t c = 0; c < s.len_k; ++c) {
        for (int64_t d = 0; d < dim; ++d) {
          x.k.set(b, hk, c, d, amp * std::sin(freq[d] * c + ph[d]) + 0.3f * amp * noise(rng) + outlier[d]);
          x.v.set(b, hk, c, d, std::sin(0.05f * c + v_ph[d]) + noise(rng));
        }
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t r = 0; r < s.len_q; ++r) {
          for (int64_t d = 0; d < dim; ++d) {
            x.q.set(b, h, r, d, amp * std::sin(freq[d] * r + ph[d]) + 0.3f * amp * noise(rng));
          }
        }
      }
    }
  }
  return x;
}

// Accuracy of an output against a reference: cosine similarity, relative L1 Σ|o − ref| / Σ|ref|,
// the worst element, and whether every element is finite.
struct Errors {
  double cos = 0.0;
  double rel_l1 = 0.0;
  double max_abs = 0.0;
  int64_t worst = -1;
  bool finite = true;
};

inline std::ostream& operator<<(std::ostream& os, const Errors& e) {
  return os << "cos " << e.cos << ", rel_l1 " << e.rel_l1 << ", max_abs " << e.max_abs << " at flat index " << e.worst
            << (e.finite ? "" : ", NON-FINITE values");
}

inline Errors compare(const std::vector<float>& out, const std::vector<double>& ref) {
  Errors e;
  double dot = 0.0, n_out = 0.0, n_ref = 0.0, abs_err = 0.0, abs_ref = 0.0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) {
      e.finite = false;
      e.worst = static_cast<int64_t>(i);
      continue;
    }
    const double err = std::fabs(out[i] - ref[i]);
    if (err > e.max_abs) {
      e.max_abs = err;
      e.worst = static_cast<int64_t>(i);
    }
    dot += out[i] * ref[i];
    n_out += static_cast<double>(out[i]) * out[i];
    n_ref += ref[i] * ref[i];
    abs_err += err;
    abs_ref += std::fabs(ref[i]);
  }
  e.cos = n_out == 0.0 && n_ref == 0.0 ? 1.0 : dot / std::sqrt(n_out * n_ref);
  e.rel_l1 = abs_ref == 0.0 ? abs_err : abs_err / abs_ref;
  return e;
}

// Everything but the tensors of a fused attention call.
struct Case {
  Shape shape;
  DType dtype = DType::kFloat16;  // of the inputs make_structured(Case, seed) makes
  Layout layout = Layout::kHND;
  DType o_dtype = DType::kFloat32;
  Layout o_layout = Layout::kHND;
  BlockConfig blocks;
  Causal causal = Causal::kNone;
  QuantOptions quant;
  Selection select{.mode = SelectMode::kDense};
  HeadParam pvthreshd{15.0f};
  bool want_lse = true;
};

struct AttentionResult {
  Status status;
  std::vector<float> o;    // [B, Hq, Lq, D]
  std::vector<float> lse;  // [B, Hq, Lq] when asked
  std::array<int64_t, kStatCount> stats{};
};

// sparge::attention on the CPU with every output (o, lse, stats, workspace) poisoned first.
inline AttentionResult run_attention(const Case& c, const Inputs& in) {
  const Shape& s = c.shape;
  HostTensor o(s.batch, s.heads_q, s.len_q, s.head_dim, c.o_dtype, c.o_layout);
  o.fill(kNaN);
  AttentionResult run;
  run.lse.assign(static_cast<size_t>(s.batch * s.heads_q * s.len_q), kNaN);
  run.stats.fill(-1);
  AttentionParams p{.device = Device::kCPU,
                    .shape = s,
                    .blocks = c.blocks,
                    .causal = c.causal,
                    .in = in,
                    .quant = c.quant,
                    .select = c.select,
                    .pvthreshd = c.pvthreshd,
                    .o = o.data(),
                    .o_dtype = c.o_dtype,
                    .o_strides = o.strides(),
                    .lse = c.want_lse ? run.lse.data() : nullptr,
                    .stats_out = run.stats.data()};
  AlignedBuffer workspace(workspace_size(p), 0xFF);
  p.workspace = workspace.data();
  p.workspace_bytes = workspace.size();
  run.status = attention(p);
  run.o = o.values();
  if (!c.want_lse) run.lse.clear();
  return run;
}

inline AttentionResult run_attention(const Case& c, const QKV& x) { return run_attention(c, inputs_of(x)); }

inline QKV make_structured(const Case& c, uint32_t seed) { return make_structured(c.shape, c.dtype, c.layout, seed); }

// The quantize and predict stages of `c` on the CPU into ws's buffers; mask_out ([B, Hq, nbq, nbk])
// receives the kept-block mask when not null.
inline void run_quantize_predict(const Case& c, const QKV& x, float sm_scale, const StageWorkspace& ws,
                                 uint8_t* mask_out = nullptr) {
  EXPECT_TRUE(run_quantize(c.shape, c.blocks, c.quant, x, ws.buffers.quantized).ok());
  EXPECT_TRUE(predict(PredictParams{.shape = c.shape,
                                    .blocks = c.blocks,
                                    .causal = c.causal,
                                    .sm_scale = sm_scale,
                                    .select = c.select,
                                    .stats = ws.buffers.quantized,
                                    .out = ws.buffers.index,
                                    .mask_out = mask_out})
                  .ok());
}

}  // namespace sparge::test
