// sparge._C — the nanobind module between the torch layer (python/sparge) and the C++ API.
//
// No torch here: every function takes device addresses as integers, shapes and element strides
// as int64 tuples, enums as their integer codes (params.h) and the CUDA stream as an integer
// handle (0 is the legacy stream). The one exception, attention_eager (eager.cpp), reads torch
// tensors through their Python attributes. Arguments are passed by keyword or, where the call is hot
// (_ops.launch_attention), by position in the order of the names below: matching ~35 keywords
// costs close to a microsecond per call. Tuple arguments:
//
//   shape      (B, Hq, Hkv, Lq, Lk, D)
//   blocks     (block_q, block_k)
//   *_strides  (batch, head, token) element strides of a [B, H, L, D] view; D has stride 1
//   quantized  the 13 addresses of QuantizedQKV in declaration order:
//              (q, q_scale, k, k_scale, k_mean, v, v_scale, lse_shift, q_pool, q_sim, k_pool, k_sim, k_spikes)
//
// A per-head hyperparameter is a float `x` plus an address `x_per_head` ([Hq] fp32 on the
// backend's device, 0 for none). A non-ok Status is raised as ValueError (kInvalidArgument),
// NotImplementedError (kUnsupported, kNotBuilt; a subclass of RuntimeError) or RuntimeError
// (anything else), with the Status message. The GIL is released while the backend runs.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>

#include <array>
#include <cstdint>
#include <string>

#include "core_call.h"
#include "sparge/api.h"

namespace nb = nanobind;

namespace {

using sparge::python::raise_if_error;
using sparge::python::run;

using Addr = std::uintptr_t;
using ShapeArg = std::array<int64_t, 6>;
using BlocksArg = std::array<int64_t, 2>;
using StridesArg = std::array<int64_t, 3>;
using QuantizedArg = std::array<Addr, 13>;

template <typename T>
T* ptr(Addr a) {
  return reinterpret_cast<T*>(a);
}

sparge::Shape to_shape(const ShapeArg& s) {
  return {.batch = s[0], .heads_q = s[1], .heads_kv = s[2], .len_q = s[3], .len_k = s[4], .head_dim = s[5]};
}

sparge::BlockConfig to_blocks(const BlocksArg& b) { return {.block_q = b[0], .block_k = b[1]}; }

sparge::Strides to_strides(const StridesArg& s) { return {.batch = s[0], .head = s[1], .token = s[2]}; }

sparge::Stream to_stream(Addr s) { return reinterpret_cast<sparge::Stream>(s); }

sparge::HeadParam head_param(double value, Addr per_head) {
  return {.value = static_cast<float>(value), .per_head = ptr<const float>(per_head)};
}

sparge::QuantizedQKV to_quantized(const QuantizedArg& a) {
  return {.q = ptr<int8_t>(a[0]),
          .q_scale = ptr<float>(a[1]),
          .k = ptr<int8_t>(a[2]),
          .k_scale = ptr<float>(a[3]),
          .k_mean = ptr<float>(a[4]),
          .v = ptr<void>(a[5]),
          .v_scale = ptr<float>(a[6]),
          .lse_shift = ptr<float>(a[7]),
          .q_pool = ptr<float>(a[8]),
          .q_sim = ptr<float>(a[9]),
          .k_pool = ptr<float>(a[10]),
          .k_sim = ptr<float>(a[11]),
          .k_spikes = ptr<float>(a[12])};
}

sparge::Inputs to_inputs(Addr q, Addr k, Addr v, int dtype, const StridesArg& q_strides, const StridesArg& k_strides,
                         const StridesArg& v_strides) {
  return {.q = ptr<const void>(q),
          .k = ptr<const void>(k),
          .v = ptr<const void>(v),
          .dtype = static_cast<sparge::DType>(dtype),
          .q_strides = to_strides(q_strides),
          .k_strides = to_strides(k_strides),
          .v_strides = to_strides(v_strides)};
}

sparge::QuantOptions to_quant(double sm_scale, bool smooth_k, int granularity, int pv) {
  return {.sm_scale = static_cast<float>(sm_scale),
          .smooth_k = smooth_k,
          .granularity = static_cast<sparge::QuantGranularity>(granularity),
          .pv = static_cast<sparge::PvPrecision>(pv)};
}

const char* attend_kernel(int device, const ShapeArg& shape, const BlocksArg& blocks, int pv) {
  const char* name = nullptr;
  raise_if_error(sparge::attend_kernel(static_cast<sparge::Device>(device), to_shape(shape), to_blocks(blocks),
                                       to_quant(0.0, true, 0, pv), &name));
  return name;
}

void quantize(int device, Addr stream, const ShapeArg& shape, const BlocksArg& blocks, Addr q, Addr k, Addr v,
              int dtype, const StridesArg& q_strides, const StridesArg& k_strides, const StridesArg& v_strides,
              double sm_scale, bool smooth_k, int granularity, int pv, const QuantizedArg& out) {
  run(&sparge::quantize, sparge::QuantizeParams{.device = static_cast<sparge::Device>(device),
                                                .stream = to_stream(stream),
                                                .shape = to_shape(shape),
                                                .blocks = to_blocks(blocks),
                                                .in = to_inputs(q, k, v, dtype, q_strides, k_strides, v_strides),
                                                .quant = to_quant(sm_scale, smooth_k, granularity, pv),
                                                .out = to_quantized(out)});
}

// Selection booleans packed into one int by the torch layer (python/sparge/_ops.py).
constexpr int kSelectSink = 1;        // Selection::attention_sink
constexpr int kSelectCdfSharpen = 2;  // Selection::cdf_sharpen

sparge::Selection to_selection(int mode, int block_score, double topk, Addr topk_per_head, double cdfthreshd,
                               Addr cdfthreshd_per_head, double simthreshd1, Addr simthreshd1_per_head,
                               int select_flags, Addr block_mask) {
  return {.mode = static_cast<sparge::SelectMode>(mode),
          .block_score = static_cast<sparge::BlockScore>(block_score),
          .topk = head_param(topk, topk_per_head),
          .cdfthreshd = head_param(cdfthreshd, cdfthreshd_per_head),
          .simthreshd1 = head_param(simthreshd1, simthreshd1_per_head),
          .attention_sink = (select_flags & kSelectSink) != 0,
          .cdf_sharpen = (select_flags & kSelectCdfSharpen) != 0,
          .block_mask = ptr<const uint8_t>(block_mask)};
}

void predict(int device, Addr stream, const ShapeArg& shape, const BlocksArg& blocks, int causal, double sm_scale,
             int mode, int block_score, double topk, Addr topk_per_head, double cdfthreshd, Addr cdfthreshd_per_head,
             double simthreshd1, Addr simthreshd1_per_head, int select_flags, Addr block_mask,
             const QuantizedArg& quantized, Addr index, Addr count, Addr mask_out, Addr stats_out) {
  run(&sparge::predict,
      sparge::PredictParams{.device = static_cast<sparge::Device>(device),
                            .stream = to_stream(stream),
                            .shape = to_shape(shape),
                            .blocks = to_blocks(blocks),
                            .causal = static_cast<sparge::Causal>(causal),
                            .sm_scale = static_cast<float>(sm_scale),
                            .select = to_selection(mode, block_score, topk, topk_per_head, cdfthreshd,
                                                   cdfthreshd_per_head, simthreshd1, simthreshd1_per_head,
                                                   select_flags, block_mask),
                            .stats = to_quantized(quantized),
                            .out = {.index = ptr<int32_t>(index), .count = ptr<int32_t>(count)},
                            .mask_out = ptr<uint8_t>(mask_out),
                            .stats_out = ptr<int64_t>(stats_out)});
}

void attend(int device, Addr stream, const ShapeArg& shape, const BlocksArg& blocks, int causal, double sm_scale,
            int granularity, int pv, const QuantizedArg& quantized, Addr index, Addr count, double pvthreshd,
            Addr pvthreshd_per_head, Addr o, int o_dtype, const StridesArg& o_strides, Addr lse, Addr stats_out,
            Addr workspace, size_t workspace_bytes) {
  run(&sparge::attend, sparge::AttendParams{.device = static_cast<sparge::Device>(device),
                                            .stream = to_stream(stream),
                                            .shape = to_shape(shape),
                                            .blocks = to_blocks(blocks),
                                            .causal = static_cast<sparge::Causal>(causal),
                                            .quant = to_quant(sm_scale, true, granularity, pv),
                                            .quantized = to_quantized(quantized),
                                            .index = {.index = ptr<int32_t>(index), .count = ptr<int32_t>(count)},
                                            .pvthreshd = head_param(pvthreshd, pvthreshd_per_head),
                                            .o = ptr<void>(o),
                                            .o_dtype = static_cast<sparge::DType>(o_dtype),
                                            .o_strides = to_strides(o_strides),
                                            .lse = ptr<float>(lse),
                                            .stats_out = ptr<int64_t>(stats_out),
                                            .workspace = ptr<void>(workspace),
                                            .workspace_bytes = workspace_bytes});
}

void attention(int device, Addr stream, const ShapeArg& shape, const BlocksArg& blocks, int causal, Addr q, Addr k,
               Addr v, int dtype, const StridesArg& q_strides, const StridesArg& k_strides,
               const StridesArg& v_strides, double sm_scale, bool smooth_k, int granularity, int pv, int mode,
               int block_score, double topk, Addr topk_per_head, double cdfthreshd, Addr cdfthreshd_per_head,
               double simthreshd1, Addr simthreshd1_per_head, int select_flags, Addr block_mask, double pvthreshd,
               Addr pvthreshd_per_head, Addr o, int o_dtype, const StridesArg& o_strides, Addr lse, Addr stats_out,
               Addr workspace, size_t workspace_bytes, int part) {
  constexpr sparge::Status (*kParts[])(const sparge::AttentionParams&) = {
      &sparge::attention, &sparge::attention_begin, &sparge::attention_finish};
  if (part < 0 || part > 2) throw nb::value_error(("part: expected 0, 1 or 2, got " + std::to_string(part)).c_str());
  run(kParts[part],
      sparge::AttentionParams{.device = static_cast<sparge::Device>(device),
                              .stream = to_stream(stream),
                              .shape = to_shape(shape),
                              .blocks = to_blocks(blocks),
                              .causal = static_cast<sparge::Causal>(causal),
                              .in = to_inputs(q, k, v, dtype, q_strides, k_strides, v_strides),
                              .quant = to_quant(sm_scale, smooth_k, granularity, pv),
                              .select = to_selection(mode, block_score, topk, topk_per_head, cdfthreshd,
                                                     cdfthreshd_per_head, simthreshd1, simthreshd1_per_head,
                                                     select_flags, block_mask),
                              .pvthreshd = head_param(pvthreshd, pvthreshd_per_head),
                              .o = ptr<void>(o),
                              .o_dtype = static_cast<sparge::DType>(o_dtype),
                              .o_strides = to_strides(o_strides),
                              .lse = ptr<float>(lse),
                              .stats_out = ptr<int64_t>(stats_out),
                              .workspace = ptr<void>(workspace),
                              .workspace_bytes = workspace_bytes});
}

size_t workspace_size(const ShapeArg& shape, const BlocksArg& blocks, int granularity, int pv, int device) {
  sparge::AttentionParams params;
  params.device = static_cast<sparge::Device>(device);
  params.shape = to_shape(shape);
  params.blocks = to_blocks(blocks);
  params.quant = to_quant(0.0, true, granularity, pv);
  return sparge::workspace_size(params);
}

size_t attend_workspace_size(const ShapeArg& shape, const BlocksArg& blocks, int pv, int device) {
  sparge::AttendParams params;
  params.device = static_cast<sparge::Device>(device);
  params.shape = to_shape(shape);
  params.blocks = to_blocks(blocks);
  params.quant = to_quant(0.0, true, 0, pv);
  return sparge::attend_workspace_size(params);
}

size_t stage_buffers_size(const ShapeArg& shape, const BlocksArg& blocks, int granularity, int pv) {
  return sparge::stage_buffers_size(to_shape(shape), to_blocks(blocks),
                                    static_cast<sparge::QuantGranularity>(granularity),
                                    static_cast<sparge::PvPrecision>(pv));
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "sparge C++ core: raw-address bindings used by the torch layer (see python/sparge/_ops.py)";

  m.def("version", &sparge::version, "Version string of the C++ library.");
  m.def("cuda_backend_built", &sparge::cuda_backend_built, "Whether the CUDA backend was compiled in.");
  m.def("cuda_architectures", &sparge::cuda_architectures,
        "CUDA architectures the backend was compiled for, e.g. \"90a;89;80\" (empty without CUDA).");

  m.def("attend_kernel", &attend_kernel, nb::arg("device"), nb::arg("shape"), nb::arg("blocks"), nb::arg("pv"),
        "Stage 2 kernel the request runs on the current device: \"cpu\", \"wgmma\" or \"mma\".");
  m.def("workspace_size", &workspace_size, nb::arg("shape"), nb::arg("blocks"), nb::arg("granularity"), nb::arg("pv"),
        nb::arg("device") = 0, "Bytes of workspace `attention` needs on the device (0 CPU, 1 CUDA).");
  m.def("attend_workspace_size", &attend_workspace_size, nb::arg("shape"), nb::arg("blocks"), nb::arg("pv"),
        nb::arg("device"), "Bytes of the optional workspace of `attend` on the device (0 CPU, 1 CUDA): 0 where unused.");
  m.def("stage_buffers_size", &stage_buffers_size, nb::arg("shape"), nb::arg("blocks"), nb::arg("granularity"),
        nb::arg("pv"), "Bytes of QuantizedQKV + BlockIndex when carved from one buffer.");

  m.def("quantize", &quantize, nb::arg("device"), nb::arg("stream"), nb::arg("shape"), nb::arg("blocks"), nb::arg("q"),
        nb::arg("k"), nb::arg("v"), nb::arg("dtype"), nb::arg("q_strides"), nb::arg("k_strides"), nb::arg("v_strides"),
        nb::arg("sm_scale"), nb::arg("smooth_k"), nb::arg("granularity"), nb::arg("pv"), nb::arg("out"),
        "Stage 0: smoothing, INT8 Q/K, V in the P·V format, block statistics.");

  m.def("predict", &predict, nb::arg("device"), nb::arg("stream"), nb::arg("shape"), nb::arg("blocks"),
        nb::arg("causal"), nb::arg("sm_scale"), nb::arg("mode"), nb::arg("block_score"), nb::arg("topk"),
        nb::arg("topk_per_head"), nb::arg("cdfthreshd"), nb::arg("cdfthreshd_per_head"), nb::arg("simthreshd1"),
        nb::arg("simthreshd1_per_head"), nb::arg("select_flags"), nb::arg("block_mask"), nb::arg("quantized"),
        nb::arg("index"), nb::arg("count"), nb::arg("mask_out"), nb::arg("stats_out"),
        "Stage 1: block prediction from the block statistics of quantized.");

  m.def("attend", &attend, nb::arg("device"), nb::arg("stream"), nb::arg("shape"), nb::arg("blocks"), nb::arg("causal"),
        nb::arg("sm_scale"), nb::arg("granularity"), nb::arg("pv"), nb::arg("quantized"), nb::arg("index"),
        nb::arg("count"), nb::arg("pvthreshd"), nb::arg("pvthreshd_per_head"), nb::arg("o"), nb::arg("o_dtype"),
        nb::arg("o_strides"), nb::arg("lse"), nb::arg("stats_out"), nb::arg("workspace"), nb::arg("workspace_bytes"),
        "Stage 2: sparse attention over the kept blocks with the online P·V filter (workspace optional: 0, 0).");

  m.def("attention", &attention, nb::arg("device"), nb::arg("stream"), nb::arg("shape"), nb::arg("blocks"),
        nb::arg("causal"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("dtype"), nb::arg("q_strides"),
        nb::arg("k_strides"), nb::arg("v_strides"), nb::arg("sm_scale"), nb::arg("smooth_k"), nb::arg("granularity"),
        nb::arg("pv"), nb::arg("mode"), nb::arg("block_score"), nb::arg("topk"), nb::arg("topk_per_head"),
        nb::arg("cdfthreshd"), nb::arg("cdfthreshd_per_head"), nb::arg("simthreshd1"), nb::arg("simthreshd1_per_head"),
        nb::arg("select_flags"), nb::arg("block_mask"), nb::arg("pvthreshd"), nb::arg("pvthreshd_per_head"),
        nb::arg("o"), nb::arg("o_dtype"), nb::arg("o_strides"), nb::arg("lse"), nb::arg("stats_out"),
        nb::arg("workspace"), nb::arg("workspace_bytes"), nb::arg("part") = 0,
        "quantize → predict → attend in one call (part 0), with a caller-provided workspace; part 1 runs "
        "sparge::attention_begin (o and lse unread), part 2 sparge::attention_finish.");

  sparge::python::bind_eager(m);

  m.attr("STAT_BLOCKS_KEPT") = static_cast<int>(sparge::kStatBlocksKept);
  m.attr("STAT_BLOCKS_ALLOWED") = static_cast<int>(sparge::kStatBlocksAllowed);
  m.attr("STAT_PV_UNITS") = static_cast<int>(sparge::kStatPvUnits);
  m.attr("STAT_PV_SKIPPED") = static_cast<int>(sparge::kStatPvSkipped);
  m.attr("STAT_COUNT") = static_cast<int>(sparge::kStatCount);
  m.attr("WORKSPACE_ALIGN") = sparge::kWorkspaceAlign;
  m.attr("MAX_HEAD_DIM") = sparge::kMaxHeadDim;
  m.attr("V_PAD_TOKENS") = sparge::kVPadTokens;
  m.attr("SPIKE_KEYS") = sparge::kSpikeKeys;
}
