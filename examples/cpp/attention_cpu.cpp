// sparge on the CPU: sparse + quantized attention through the C++ API, checked against exact
// double-precision attention.
//
//   build/.../sparge_example_cpu
//
// The inputs are fp32 [B, H, L, D] (layout HND) with a smooth positional signal shared by q and
// k, so attention concentrates near the diagonal and TopK prediction can drop far blocks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <random>
#include <vector>

#include "sparge/api.h"

namespace {

constexpr int64_t B = 1, H = 2, L = 1024, D = 64;

// q and k share the positional signal 2 sin(ω_d t + d) (plus noise); channel 3 of k carries a
// large offset, which K smoothing removes; v is noise.
void make_inputs(std::vector<float>& q, std::vector<float>& k, std::vector<float>& v) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  for (int64_t row = 0; row < B * H * L; ++row) {
    const int64_t t = row % L;
    for (int64_t d = 0; d < D; ++d) {
      const float signal = 2.0f * std::sin(0.01f * t * (1.0f + d % 8) + d);
      q[row * D + d] = signal + 0.3f * noise(rng);
      k[row * D + d] = signal + 0.3f * noise(rng) + (d == 3 ? 8.0f : 0.0f);  // a channel outlier in k
      v[row * D + d] = noise(rng);
    }
  }
}

// softmax(q kᵀ / sqrt(D)) v in double precision.
std::vector<double> exact_attention(const std::vector<float>& q, const std::vector<float>& k,
                                    const std::vector<float>& v) {
  std::vector<double> o(q.size(), 0.0), s(L);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t r = 0; r < L; ++r) {
      const float* qr = &q[(bh * L + r) * D];
      double m = -INFINITY, l = 0.0;
      for (int64_t c = 0; c < L; ++c) {
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d) dot += double(qr[d]) * k[(bh * L + c) * D + d];
        s[c] = dot / std::sqrt(double(D));
        m = std::max(m, s[c]);
      }
      for (int64_t c = 0; c < L; ++c) l += std::exp(s[c] - m);
      for (int64_t c = 0; c < L; ++c) {
        const double p = std::exp(s[c] - m) / l;
        for (int64_t d = 0; d < D; ++d) o[(bh * L + r) * D + d] += p * v[(bh * L + c) * D + d];
      }
    }
  }
  return o;
}

}  // namespace

int main() {
  std::vector<float> q(B * H * L * D), k(q.size()), v(q.size()), o(q.size());
  make_inputs(q, k, v);
  const sparge::Strides hnd{.batch = H * L * D, .head = L * D, .token = D};
  int64_t stats[sparge::kStatCount] = {};

  sparge::AttentionParams params{
      .device = sparge::Device::kCPU,
      .shape = {.batch = B, .heads_q = H, .heads_kv = H, .len_q = L, .len_k = L, .head_dim = D},
      .in = {.q = q.data(),
             .k = k.data(),
             .v = v.data(),
             .dtype = sparge::DType::kFloat32,
             .q_strides = hnd,
             .k_strides = hnd,
             .v_strides = hnd},
      .quant = {.granularity = sparge::QuantGranularity::kPerThread, .pv = sparge::PvPrecision::kFp8},
      .select = {.mode = sparge::SelectMode::kTopK, .topk = {0.5f}},
      .o = o.data(),
      .o_dtype = sparge::DType::kFloat32,
      .o_strides = hnd,
      .stats_out = stats,
  };
  params.workspace_bytes = sparge::workspace_size(params);
  std::unique_ptr<void, decltype(&std::free)> workspace(
      std::aligned_alloc(sparge::kWorkspaceAlign, sparge::round_up(params.workspace_bytes, sparge::kWorkspaceAlign)),
      &std::free);
  params.workspace = workspace.get();

  const sparge::Status status = sparge::attention(params);
  if (!status.ok()) {
    std::cerr << "sparge::attention failed (" << sparge::status_code_name(status.code()) << "): " << status.message()
              << "\n";
    return 1;
  }

  const std::vector<double> ref = exact_attention(q, k, v);
  double dot = 0.0, norm_o = 0.0, norm_ref = 0.0, abs_err = 0.0, abs_ref = 0.0;
  for (size_t i = 0; i < o.size(); ++i) {
    dot += o[i] * ref[i];
    norm_o += double(o[i]) * o[i];
    norm_ref += ref[i] * ref[i];
    abs_err += std::fabs(o[i] - ref[i]);
    abs_ref += std::fabs(ref[i]);
  }
  const int64_t kept = stats[sparge::kStatBlocksKept], allowed = stats[sparge::kStatBlocksAllowed];
  std::cout << "sparge " << sparge::version() << " on the CPU: B=" << B << " H=" << H << " L=" << L << " D=" << D
            << ", TopK 0.5, INT8 Q·K and FP8 P·V\n"
            << "cosine similarity  " << dot / std::sqrt(norm_o * norm_ref) << "\n"
            << "relative L1        " << abs_err / abs_ref << "\n"
            << "block sparsity     " << 1.0 - double(kept) / double(allowed) << " (" << kept << " of " << allowed
            << " blocks kept)\n"
            << "P·V units skipped  " << stats[sparge::kStatPvSkipped] << " of " << stats[sparge::kStatPvUnits] << "\n";
  return 0;
}
