// Validation of every public request and the choice of backend.
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "common/status_macros.h"
#include "cpu/cpu_backend.h"
#include "sparge/api.h"
#include "sparge_build_config.h"

#if defined(SPARGE_WITH_CUDA)
#include "cuda/cuda_backend.h"
#endif

#ifndef SPARGE_VERSION
#define SPARGE_VERSION "0.0.0"
#endif

namespace sparge {
namespace {

// Builds "field: expected X, got Y".
template <typename T>
Status invalid(const std::string& field, const std::string& expected, const T& got) {
  std::ostringstream os;
  os << field << ": expected " << expected << ", got " << got;
  return {StatusCode::kInvalidArgument, os.str()};
}

bool is_empty(const Shape& s) { return s.batch == 0 || s.heads_q == 0 || s.len_q == 0; }

Status check_device(Device device) {
  switch (device) {
    case Device::kCPU: return Status::Ok();
    case Device::kCUDA:
      if (!cuda_backend_built()) {
        return {StatusCode::kNotBuilt,
                "device: the CUDA backend is not built into this library (configure with SPARGE_CUDA=ON)"};
      }
      return Status::Ok();
  }
  return invalid("device", "kCPU (0) or kCUDA (1)", static_cast<int>(device));
}

Status check_shape(const Shape& s) {
  if (s.batch < 0) return invalid("shape.batch", ">= 0", s.batch);
  if (s.heads_q < 1) return invalid("shape.heads_q", ">= 1", s.heads_q);
  if (s.heads_kv < 1) return invalid("shape.heads_kv", ">= 1", s.heads_kv);
  if (s.heads_q % s.heads_kv != 0) {
    return invalid("shape.heads_q", "a multiple of heads_kv = " + std::to_string(s.heads_kv), s.heads_q);
  }
  if (s.len_q < 0) return invalid("shape.len_q", ">= 0", s.len_q);
  if (s.len_k < 0) return invalid("shape.len_k", ">= 0", s.len_k);
  if (s.head_dim < 1 || s.head_dim > kMaxHeadDim) {
    return invalid("shape.head_dim", "1.." + std::to_string(kMaxHeadDim), s.head_dim);
  }
  return Status::Ok();
}

Status check_blocks(const BlockConfig& b) {
  for (const auto& [name, value] : {std::pair{"blocks.block_q", b.block_q}, std::pair{"blocks.block_k", b.block_k}}) {
    if (value < kMinBlock || value > kMaxBlock || value % 16 != 0) {
      return invalid(name, "a multiple of 16 in [16, 1024]", value);
    }
  }
  return Status::Ok();
}

Status check_strides(const char* name, const Strides& s) {
  if (s.batch < 0 || s.head < 0 || s.token < 0) {
    std::ostringstream os;
    os << "(" << s.batch << ", " << s.head << ", " << s.token << ")";
    return invalid(std::string(name), "non-negative strides (batch, head, token)", os.str());
  }
  return Status::Ok();
}

Status check_dtype(const char* name, DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat32: return Status::Ok();
  }
  return invalid(name, "kFloat16, kBFloat16 or kFloat32", static_cast<int>(t));
}

Status check_pointer(const char* name, const void* ptr, bool needed) {
  if (needed && ptr == nullptr) return invalid(name, "a non-null pointer", "nullptr");
  return Status::Ok();
}

// A caller workspace: `need` bytes (or none at all where not `needed`), kWorkspaceAlign-aligned.
Status check_workspace(const void* workspace, size_t bytes, size_t need, bool needed) {
  if (workspace == nullptr && !needed) return Status::Ok();
  SPARGE_RETURN_IF_ERROR(check_pointer("workspace", workspace, true));
  if (reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlign != 0) {
    return invalid("workspace", "a 256-byte aligned pointer", workspace);
  }
  if (bytes < need) return invalid("workspace_bytes", ">= " + std::to_string(need), bytes);
  return Status::Ok();
}

// check_pointer for the field `prefix.field` (the name is built only on failure).
Status check_member_pointer(const char* prefix, const char* field, const void* ptr, bool needed) {
  if (!needed || ptr != nullptr) return Status::Ok();
  return check_pointer((std::string(prefix) + "." + field).c_str(), ptr, needed);
}

Status check_quant(const QuantOptions& q) {
  if (!std::isfinite(q.sm_scale)) return invalid("quant.sm_scale", "a finite value (0 for D^-0.5)", q.sm_scale);
  switch (q.granularity) {
    case QuantGranularity::kPerBlock:
    case QuantGranularity::kPerWarp:
    case QuantGranularity::kPerThread: break;
    default:
      return invalid("quant.granularity", "kPerBlock, kPerWarp or kPerThread", static_cast<int>(q.granularity));
  }
  switch (q.pv) {
    case PvPrecision::kFp8:
    case PvPrecision::kFp16:
    case PvPrecision::kFp8Fp16Accum: break;
    default: return invalid("quant.pv", "kFp8, kFp16 or kFp8Fp16Accum", static_cast<int>(q.pv));
  }
  return Status::Ok();
}

Status check_causal(Causal c) {
  if (c != Causal::kNone && c != Causal::kTopLeft && c != Causal::kBottomRight) {
    return invalid("causal", "kNone, kTopLeft or kBottomRight", static_cast<int>(c));
  }
  return Status::Ok();
}

// Range check of a scalar hyperparameter, and of its per-head values when they are host memory.
Status check_head_param(const char* name, const HeadParam& hp, Device device, int64_t heads, float lo, float hi,
                        bool allow_inf_hi = false) {
  auto in_range = [&](float x) { return (x >= lo && x <= hi) || (allow_inf_hi && std::isinf(x) && x > 0); };
  auto out_of_range = [&](const std::string& field, float x) {
    std::ostringstream range;
    range << "a value in [" << lo << ", " << hi << "]" << (allow_inf_hi ? " or +inf" : "");
    return invalid(field, range.str(), x);
  };
  if (hp.per_head == nullptr) return in_range(hp.value) ? Status::Ok() : out_of_range(name, hp.value);
  if (device == Device::kCPU) {
    for (int64_t h = 0; h < heads; ++h) {
      if (!in_range(hp.per_head[h])) {
        return out_of_range(std::string(name) + ".per_head[" + std::to_string(h) + "]", hp.per_head[h]);
      }
    }
  }
  return Status::Ok();
}

Status check_selection(const Selection& s, Device device, int64_t heads_q) {
  switch (s.mode) {
    case SelectMode::kDense:
    case SelectMode::kTopK:
    case SelectMode::kCdf: break;
    case SelectMode::kBlockMask:
      if (s.block_mask == nullptr) return invalid("select.block_mask", "a mask for mode kBlockMask", "nullptr");
      break;
    default: return invalid("select.mode", "kDense, kTopK, kCdf or kBlockMask", static_cast<int>(s.mode));
  }
  if (s.mode == SelectMode::kTopK) {
    SPARGE_RETURN_IF_ERROR(check_head_param("select.topk", s.topk, device, heads_q, 0.0f, 1.0f));
  }
  if (s.mode == SelectMode::kCdf) {
    SPARGE_RETURN_IF_ERROR(check_head_param("select.cdfthreshd", s.cdfthreshd, device, heads_q, 0.0f, 1.0f));
  }
  if (s.mode == SelectMode::kTopK || s.mode == SelectMode::kCdf) {
    SPARGE_RETURN_IF_ERROR(check_head_param("select.simthreshd1", s.simthreshd1, device, heads_q, -1.0f, 1.0f));
    if (s.block_score != BlockScore::kMean && s.block_score != BlockScore::kSpikes) {
      return invalid("select.block_score", "kMean or kSpikes", static_cast<int>(s.block_score));
    }
  }
  return Status::Ok();
}

Status check_pvthreshd(const HeadParam& hp, Device device, int64_t heads_q) {
  return check_head_param("pvthreshd", hp, device, heads_q, 0.0f, 1e30f, /*allow_inf_hi=*/true);
}

Status check_inputs(const Inputs& in, const Shape& s) {
  const bool has_q = s.batch * s.heads_q * s.len_q > 0;
  const bool has_kv = s.batch * s.heads_kv * s.len_k > 0;
  SPARGE_RETURN_IF_ERROR(check_dtype("in.dtype", in.dtype));
  SPARGE_RETURN_IF_ERROR(check_pointer("in.q", in.q, has_q));
  SPARGE_RETURN_IF_ERROR(check_pointer("in.k", in.k, has_kv));
  SPARGE_RETURN_IF_ERROR(check_pointer("in.v", in.v, has_kv));
  SPARGE_RETURN_IF_ERROR(check_strides("in.q_strides", in.q_strides));
  SPARGE_RETURN_IF_ERROR(check_strides("in.k_strides", in.k_strides));
  return check_strides("in.v_strides", in.v_strides);
}

Status check_quantized(const char* name, const QuantizedQKV& q, const Shape& s, bool stats_only) {
  const bool has_q = s.batch * s.heads_q * s.len_q > 0;
  const bool has_kv = s.batch * s.heads_kv * s.len_k > 0;
  auto need = [&](const char* field, const void* ptr, bool needed) {
    return check_member_pointer(name, field, ptr, needed);
  };
  SPARGE_RETURN_IF_ERROR(need("q_pool", q.q_pool, has_q));
  SPARGE_RETURN_IF_ERROR(need("q_sim", q.q_sim, has_q));
  SPARGE_RETURN_IF_ERROR(need("k_pool", q.k_pool, has_kv));
  SPARGE_RETURN_IF_ERROR(need("k_sim", q.k_sim, has_kv));
  if (stats_only) return Status::Ok();
  SPARGE_RETURN_IF_ERROR(need("q", q.q, has_q));
  SPARGE_RETURN_IF_ERROR(need("q_scale", q.q_scale, has_q));
  SPARGE_RETURN_IF_ERROR(need("lse_shift", q.lse_shift, has_q));
  SPARGE_RETURN_IF_ERROR(need("k", q.k, has_kv));
  SPARGE_RETURN_IF_ERROR(need("k_scale", q.k_scale, has_kv));
  SPARGE_RETURN_IF_ERROR(need("k_mean", q.k_mean, s.batch * s.heads_kv > 0));
  SPARGE_RETURN_IF_ERROR(need("v", q.v, has_kv));
  return need("v_scale", q.v_scale, s.batch * s.heads_kv > 0);
}

Status check_index(const char* name, const BlockIndex& idx, const Shape& s) {
  const bool has_q = s.batch * s.heads_q * s.len_q > 0;
  SPARGE_RETURN_IF_ERROR(check_member_pointer(name, "count", idx.count, has_q));
  return check_member_pointer(name, "index", idx.index, has_q && s.len_k > 0);
}

Status check_output(void* o, DType dtype, const Strides& strides, const Shape& s) {
  SPARGE_RETURN_IF_ERROR(check_dtype("o_dtype", dtype));
  SPARGE_RETURN_IF_ERROR(check_pointer("o", o, !is_empty(s)));
  SPARGE_RETURN_IF_ERROR(check_strides("o_strides", strides));
  // Overlapping output rows would race and silently lose results.
  if (!is_empty(s) && ((s.batch > 1 && strides.batch == 0) || (s.heads_q > 1 && strides.head == 0) ||
                        (s.len_q > 1 && strides.token == 0))) {
    std::ostringstream os;
    os << "(" << strides.batch << ", " << strides.head << ", " << strides.token << ")";
    return invalid("o_strides", "non-zero strides for dimensions of size > 1", os.str());
  }
  return Status::Ok();
}

float resolved_sm_scale(float sm_scale, int64_t head_dim) {
  return sm_scale != 0.0f ? sm_scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

// Whether the CUDA device can run the request: stages 0-1 only, or stage 2 as well (quant given).
#if defined(SPARGE_WITH_CUDA)
Status check_cuda_support(Device device, const Shape& s, const BlockConfig& b, const QuantOptions* attend_quant) {
  if (device != Device::kCUDA) return Status::Ok();
  return attend_quant != nullptr ? cuda::supports_attend(s, b, *attend_quant) : cuda::supports(s, b);
}
#else
Status check_cuda_support(Device, const Shape&, const BlockConfig&, const QuantOptions*) { return Status::Ok(); }
#endif

}  // namespace

Status check(const QuantizeParams& p) {
  SPARGE_RETURN_IF_ERROR(check_device(p.device));
  SPARGE_RETURN_IF_ERROR(check_shape(p.shape));
  SPARGE_RETURN_IF_ERROR(check_blocks(p.blocks));
  SPARGE_RETURN_IF_ERROR(check_inputs(p.in, p.shape));
  SPARGE_RETURN_IF_ERROR(check_quant(p.quant));
  SPARGE_RETURN_IF_ERROR(check_quantized("out", p.out, p.shape, /*stats_only=*/false));
  return check_cuda_support(p.device, p.shape, p.blocks, nullptr);
}

Status check(const PredictParams& p) {
  SPARGE_RETURN_IF_ERROR(check_device(p.device));
  SPARGE_RETURN_IF_ERROR(check_shape(p.shape));
  SPARGE_RETURN_IF_ERROR(check_blocks(p.blocks));
  SPARGE_RETURN_IF_ERROR(check_causal(p.causal));
  if (!std::isfinite(p.sm_scale)) return invalid("sm_scale", "a finite value (0 for D^-0.5)", p.sm_scale);
  SPARGE_RETURN_IF_ERROR(check_selection(p.select, p.device, p.shape.heads_q));
  if (p.select.mode == SelectMode::kTopK || p.select.mode == SelectMode::kCdf) {
    SPARGE_RETURN_IF_ERROR(check_quantized("stats", p.stats, p.shape, /*stats_only=*/true));
    if (p.select.block_score == BlockScore::kSpikes) {
      const bool has_kv = p.shape.batch * p.shape.heads_kv * p.shape.len_k > 0;
      SPARGE_RETURN_IF_ERROR(check_pointer("stats.k_spikes", p.stats.k_spikes, has_kv));
    }
  }
  SPARGE_RETURN_IF_ERROR(check_index("out", p.out, p.shape));
  return check_cuda_support(p.device, p.shape, p.blocks, nullptr);
}

Status check(const AttendParams& p) {
  SPARGE_RETURN_IF_ERROR(check_device(p.device));
  SPARGE_RETURN_IF_ERROR(check_shape(p.shape));
  SPARGE_RETURN_IF_ERROR(check_blocks(p.blocks));
  SPARGE_RETURN_IF_ERROR(check_causal(p.causal));
  SPARGE_RETURN_IF_ERROR(check_quant(p.quant));
  SPARGE_RETURN_IF_ERROR(check_quantized("quantized", p.quantized, p.shape, /*stats_only=*/false));
  SPARGE_RETURN_IF_ERROR(check_index("index", p.index, p.shape));
  SPARGE_RETURN_IF_ERROR(check_pvthreshd(p.pvthreshd, p.device, p.shape.heads_q));
  SPARGE_RETURN_IF_ERROR(check_output(p.o, p.o_dtype, p.o_strides, p.shape));
  SPARGE_RETURN_IF_ERROR(check_workspace(p.workspace, p.workspace_bytes, attend_workspace_size(p), false));
  return check_cuda_support(p.device, p.shape, p.blocks, &p.quant);
}

namespace {

// The attention kernel's scratch on `device` (AttendParams::workspace; part of the fused op's workspace).
size_t scratch_bytes(Device device, const Shape& shape, const BlockConfig& blocks, PvPrecision pv) {
  return device == Device::kCUDA ? attend_scratch_bytes(shape, blocks, pv) : 0;
}

}  // namespace

size_t attend_workspace_size(const AttendParams& p) { return scratch_bytes(p.device, p.shape, p.blocks, p.quant.pv); }

size_t workspace_size(const AttentionParams& p) {
  return stage_buffers_size(p.shape, p.blocks, p.quant.granularity, p.quant.pv) +
         scratch_bytes(p.device, p.shape, p.blocks, p.quant.pv);
}

namespace {

// check(AttentionParams) without the output (o, o_dtype, o_strides): what attention_begin reads.
Status check_begin(const AttentionParams& p) {
  SPARGE_RETURN_IF_ERROR(check_device(p.device));
  SPARGE_RETURN_IF_ERROR(check_shape(p.shape));
  SPARGE_RETURN_IF_ERROR(check_blocks(p.blocks));
  SPARGE_RETURN_IF_ERROR(check_causal(p.causal));
  SPARGE_RETURN_IF_ERROR(check_inputs(p.in, p.shape));
  SPARGE_RETURN_IF_ERROR(check_quant(p.quant));
  SPARGE_RETURN_IF_ERROR(check_selection(p.select, p.device, p.shape.heads_q));
  SPARGE_RETURN_IF_ERROR(check_pvthreshd(p.pvthreshd, p.device, p.shape.heads_q));
  if (!is_empty(p.shape)) {
    SPARGE_RETURN_IF_ERROR(check_workspace(p.workspace, p.workspace_bytes, workspace_size(p), true));
  }
  return check_cuda_support(p.device, p.shape, p.blocks, &p.quant);
}

}  // namespace

Status check(const AttentionParams& p) {
  SPARGE_RETURN_IF_ERROR(check_begin(p));
  return check_output(p.o, p.o_dtype, p.o_strides, p.shape);
}

namespace {

// The stages on params that passed their check (or the check of the fused call that carries them).
// block_stats: see cuda::quantize (the CPU backend always writes the statistics).
Status run_quantize(QuantizeParams p, bool block_stats = true) {
  p.quant.sm_scale = resolved_sm_scale(p.quant.sm_scale, p.shape.head_dim);
#if defined(SPARGE_WITH_CUDA)
  if (p.device == Device::kCUDA) return cuda::quantize(p, block_stats);
#endif
  cpu::quantize(p);
  return Status::Ok();
}

// split_counters: the CUDA attention kernel's split counters (the start of its scratch, layout.h) in the
// fused op's workspace, cleared by predict's last kernel and not again by attend (cuda::predict's
// ZeroRange); null where the call has no scratch.
Status run_predict(PredictParams p, void* split_counters = nullptr) {
  p.sm_scale = resolved_sm_scale(p.sm_scale, p.shape.head_dim);
#if defined(SPARGE_WITH_CUDA)
  if (p.device == Device::kCUDA) {
    const size_t bytes = split_counters != nullptr ? static_cast<size_t>(split_counter_bytes()) : 0;
    return cuda::predict(p, {.at = split_counters, .bytes = bytes});
  }
#endif
  cpu::predict(p);
  return Status::Ok();
}

Status run_attend(AttendParams p, bool split_counters_zeroed = false) {
  p.quant.sm_scale = resolved_sm_scale(p.quant.sm_scale, p.shape.head_dim);
#if defined(SPARGE_WITH_CUDA)
  if (p.device == Device::kCUDA) return cuda::attend(p, split_counters_zeroed);
#endif
  cpu::attend(p);
  return Status::Ok();
}

}  // namespace

Status quantize(const QuantizeParams& params) {
  SPARGE_RETURN_IF_ERROR(check(params));
  return run_quantize(params);
}

Status predict(const PredictParams& params) {
  SPARGE_RETURN_IF_ERROR(check(params));
  return run_predict(params);
}

Status attend(const AttendParams& params) {
  SPARGE_RETURN_IF_ERROR(check(params));
  return run_attend(params);
}

namespace {

// The fused op's stage buffers, carved from the checked workspace.
struct FusedBuffers {
  StageBuffers stage;
  void* attend_scratch;  // the CUDA attention kernel's scratch (null where it has none)
  size_t scratch_bytes;
};

FusedBuffers fused_buffers(const AttentionParams& p) {
  const size_t stage_bytes = stage_buffers_size(p.shape, p.blocks, p.quant.granularity, p.quant.pv);
  const size_t scratch = scratch_bytes(p.device, p.shape, p.blocks, p.quant.pv);
  return {.stage = carve_stage_buffers(p.workspace, p.shape, p.blocks, p.quant.granularity, p.quant.pv),
          .attend_scratch = scratch > 0 ? static_cast<char*>(p.workspace) + stage_bytes : nullptr,
          .scratch_bytes = scratch};
}

// Stages 0 and 1 of the fused op on checked params.
Status run_begin(const AttentionParams& p, const FusedBuffers& buf) {
  // Only TopK and CDF selection read the block statistics, and only the spike score the spike keys.
  const bool scored = p.select.mode == SelectMode::kTopK || p.select.mode == SelectMode::kCdf;
  QuantizedQKV quantize_out = buf.stage.quantized;
  if (!scored || p.select.block_score != BlockScore::kSpikes) quantize_out.k_spikes = nullptr;
  SPARGE_RETURN_IF_ERROR(run_quantize(QuantizeParams{.device = p.device,
                                                     .stream = p.stream,
                                                     .shape = p.shape,
                                                     .blocks = p.blocks,
                                                     .in = p.in,
                                                     .quant = p.quant,
                                                     .out = quantize_out},
                                      scored));
  return run_predict(PredictParams{.device = p.device,
                                   .stream = p.stream,
                                   .shape = p.shape,
                                   .blocks = p.blocks,
                                   .causal = p.causal,
                                   .sm_scale = p.quant.sm_scale,
                                   .select = p.select,
                                   .stats = buf.stage.quantized,
                                   .out = buf.stage.index,
                                   .stats_out = p.stats_out},
                     buf.attend_scratch);
}

// Stage 2 of the fused op on checked params, after run_begin.
Status run_finish(const AttentionParams& p, const FusedBuffers& buf) {
  return run_attend(AttendParams{.device = p.device,
                                 .stream = p.stream,
                                 .shape = p.shape,
                                 .blocks = p.blocks,
                                 .causal = p.causal,
                                 .quant = p.quant,
                                 .quantized = buf.stage.quantized,
                                 .index = buf.stage.index,
                                 .pvthreshd = p.pvthreshd,
                                 .o = p.o,
                                 .o_dtype = p.o_dtype,
                                 .o_strides = p.o_strides,
                                 .lse = p.lse,
                                 .stats_out = p.stats_out,
                                 .workspace = buf.attend_scratch,
                                 .workspace_bytes = buf.scratch_bytes},
                    buf.attend_scratch != nullptr);
}

}  // namespace

// One check covers the three stages: it validates everything their checks would, the stage
// buffers being carved from the checked workspace (the checks cost microseconds per call).
Status attention(const AttentionParams& p) {
  SPARGE_RETURN_IF_ERROR(check(p));
  if (is_empty(p.shape)) return Status::Ok();
  const FusedBuffers buf = fused_buffers(p);
  SPARGE_RETURN_IF_ERROR(run_begin(p, buf));
  return run_finish(p, buf);
}

Status attention_begin(const AttentionParams& p) {
  SPARGE_RETURN_IF_ERROR(check_begin(p));
  if (is_empty(p.shape)) return Status::Ok();
  return run_begin(p, fused_buffers(p));
}

Status attention_finish(const AttentionParams& p) {
  SPARGE_RETURN_IF_ERROR(check(p));
  if (is_empty(p.shape)) return Status::Ok();
  return run_finish(p, fused_buffers(p));
}

bool cuda_backend_built() {
#if defined(SPARGE_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

const char* cuda_architectures() { return SPARGE_CUDA_ARCHS; }

Status attend_kernel(Device device, const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant,
                     const char** name) {
  SPARGE_RETURN_IF_ERROR(check_device(device));
  SPARGE_RETURN_IF_ERROR(check_shape(shape));
  SPARGE_RETURN_IF_ERROR(check_blocks(blocks));
  if (device == Device::kCPU) {
    *name = "cpu";
    return Status::Ok();
  }
#if defined(SPARGE_WITH_CUDA)
  return cuda::attend_kernel(shape, blocks, quant, name);
#else
  return {StatusCode::kNotBuilt, "device: the CUDA backend is not built"};
#endif
}

const char* version() { return SPARGE_VERSION; }

}  // namespace sparge
