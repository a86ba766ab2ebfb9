#include "sparge/layout.h"

namespace sparge {
namespace {

// Walks the stage buffers in their fixed order, either measuring or assigning them.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}

  template <typename T>
  T* take(int64_t elements, size_t element_bytes = sizeof(T)) {
    const size_t at = offset_;
    offset_ += static_cast<size_t>(round_up(elements * static_cast<int64_t>(element_bytes), kWorkspaceAlign));
    return base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + at);
  }

  size_t size() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

StageBuffers carve(Carver& c, const Shape& s, const BlockConfig& b, QuantGranularity g, PvPrecision pv) {
  const auto [nbq, nbk] = block_counts(s, b);
  const int64_t bhq = s.batch * s.heads_q;
  const int64_t bhk = s.batch * s.heads_kv;
  const int64_t d = s.head_dim;
  StageBuffers out;
  QuantizedQKV& q = out.quantized;
  q.q = c.take<int8_t>(bhq * s.len_q * d);
  q.q_scale = c.take<float>(bhq * q_scale_groups(s.len_q, g));
  q.k = c.take<int8_t>(bhk * s.len_k * d);
  q.k_scale = c.take<float>(bhk * k_scale_groups(s.len_k, g));
  q.k_mean = c.take<float>(bhk * d);
  q.v = c.take<char>(bhk * d * padded_len_k(s.len_k), v_elem_bytes(pv));
  q.v_scale = c.take<float>(bhk * d);
  q.lse_shift = c.take<float>(bhq * s.len_q);
  q.q_pool = c.take<float>(bhq * nbq * d);
  q.q_sim = c.take<float>(bhq * nbq);
  q.k_pool = c.take<float>(bhk * nbk * d);
  q.k_sim = c.take<float>(bhk * nbk);
  q.k_spikes = c.take<float>(bhk * nbk * kSpikeKeys * d);
  out.index.index = c.take<int32_t>(bhq * nbq * nbk);
  out.index.count = c.take<int32_t>(bhq * nbq);
  return out;
}

}  // namespace

size_t stage_buffers_size(const Shape& shape, const BlockConfig& blocks, QuantGranularity g, PvPrecision pv) {
  Carver c(nullptr);
  carve(c, shape, blocks, g, pv);
  return c.size();
}

size_t attend_scratch_bytes(const Shape& shape, const BlockConfig& blocks, PvPrecision pv) {
  const bool wgmma_shape = pv == PvPrecision::kFp8 && shape.head_dim <= 128 && blocks.block_q % kSplitTileRows == 0 &&
                           (blocks.block_k == 64 || blocks.block_k == 128);
  const int64_t tiles = shape.batch * shape.heads_q * ceil_div(shape.len_q, kSplitTileRows);
  if (!wgmma_shape || tiles <= kSplitMaxCtas || shape.len_k == 0) return 0;
  const int64_t head_dim_pad = shape.head_dim <= 64 ? 64 : 128;
  return static_cast<size_t>(split_counter_bytes() + 2 * kSplitMaxCtas * split_slot_bytes(head_dim_pad));
}

StageBuffers carve_stage_buffers(void* base, const Shape& shape, const BlockConfig& blocks, QuantGranularity g,
                                 PvPrecision pv) {
  Carver c(static_cast<char*>(base));
  return carve(c, shape, blocks, g, pv);
}

}  // namespace sparge
