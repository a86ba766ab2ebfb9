// The public API contract (DESIGN §5): every bad input returns the right StatusCode with a
// message naming the field, empty shapes succeed, and the workspace size matches the carving.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace sparge::test {
namespace {

// A valid fused request on small host tensors, to be broken one field at a time.
class ApiContract : public testing::Test {
 protected:
  ApiContract()
      : x(make_structured(shape, DType::kFloat16, Layout::kHND, 7)),
        o(shape.batch, shape.heads_q, shape.len_q, shape.head_dim, DType::kFloat16),
        workspace(1 << 20) {}

  AttentionParams valid() {
    return {.device = Device::kCPU,
            .shape = shape,
            .in = inputs_of(x),
            .select = {.mode = SelectMode::kTopK},
            .o = o.data(),
            .o_strides = o.strides(),
            .workspace = workspace.data(),
            .workspace_bytes = workspace.size()};
  }

  // Breaks a valid request with `mutate` and expects `code` and a message "field: ...", from
  // check() and attention() alike.
  void expect_rejected(const std::function<void(AttentionParams&)>& mutate, StatusCode code, const std::string& field) {
    AttentionParams p = valid();
    mutate(p);
    const Status checked = check(p);
    const Status status = attention(p);
    EXPECT_EQ(status.code(), code) << "message: " << status.message();
    EXPECT_EQ(status.message().rfind(field + ": ", 0), 0u)
        << "message \"" << status.message() << "\" is not about " << field;
    EXPECT_EQ(checked.code(), status.code());
    EXPECT_EQ(checked.message(), status.message());
  }

  const Shape shape{.batch = 1, .heads_q = 4, .heads_kv = 2, .len_q = 40, .len_k = 50, .head_dim = 32};
  QKV x;
  HostTensor o;
  AlignedBuffer workspace;
};

constexpr StatusCode kInvalid = StatusCode::kInvalidArgument;
const float kNaNf = std::numeric_limits<float>::quiet_NaN();

TEST_F(ApiContract, ValidRequestSucceeds) {
  ASSERT_LE(workspace_size(valid()), workspace.size());
  const Status status = attention(valid());
  EXPECT_TRUE(status.ok()) << status.message();
}

// attention_begin + attention_finish compute what attention does, bit for bit; begin reads neither o nor
// lse (null there, and o's fields invalid), and finish checks the output like attention.
TEST_F(ApiContract, TwoCallsEqualOneCall) {
  for (const Causal causal : {Causal::kNone, Causal::kBottomRight}) {
    SCOPED_TRACE(static_cast<int>(causal));
    std::vector<float> lse_one(static_cast<size_t>(shape.batch * shape.heads_q * shape.len_q));
    std::vector<float> lse_two(lse_one.size(), -1.0f);
    int64_t stats_one[kStatCount] = {};
    int64_t stats_two[kStatCount] = {};
    AttentionParams p = valid();
    p.causal = causal;
    p.lse = lse_one.data();
    p.stats_out = stats_one;
    ASSERT_TRUE(attention(p).ok());
    const std::vector<float> one = o.values();

    o.fill(0.0f);
    AttentionParams begin = p;
    begin.o = nullptr;
    begin.o_dtype = static_cast<DType>(9);
    begin.lse = nullptr;
    begin.stats_out = stats_two;
    const Status begun = attention_begin(begin);
    ASSERT_TRUE(begun.ok()) << begun.message();
    AttentionParams finish = p;
    finish.lse = lse_two.data();
    finish.stats_out = stats_two;
    const Status finished = attention_finish(finish);
    ASSERT_TRUE(finished.ok()) << finished.message();
    EXPECT_EQ(o.values(), one);
    EXPECT_EQ(lse_two, lse_one);
    for (int i = 0; i < kStatCount; ++i) EXPECT_EQ(stats_two[i], stats_one[i]) << "stat " << i;
  }
  AttentionParams no_output = valid();
  no_output.o = nullptr;
  const Status status = attention_finish(no_output);
  EXPECT_EQ(status.code(), kInvalid);
  EXPECT_EQ(status.message().rfind("o: ", 0), 0u) << status.message();
  AttentionParams bad_input = valid();
  bad_input.in.k = nullptr;
  EXPECT_EQ(attention_begin(bad_input).message().rfind("in.k: ", 0), 0u);
}

TEST_F(ApiContract, NullPointers) {
  expect_rejected([](AttentionParams& p) { p.in.q = nullptr; }, kInvalid, "in.q");
  expect_rejected([](AttentionParams& p) { p.in.k = nullptr; }, kInvalid, "in.k");
  expect_rejected([](AttentionParams& p) { p.in.v = nullptr; }, kInvalid, "in.v");
  expect_rejected([](AttentionParams& p) { p.o = nullptr; }, kInvalid, "o");
  expect_rejected([](AttentionParams& p) { p.workspace = nullptr; }, kInvalid, "workspace");
}

TEST_F(ApiContract, Shapes) {
  expect_rejected([](AttentionParams& p) { p.shape.heads_q = 3; }, kInvalid, "shape.heads_q");
  expect_rejected([](AttentionParams& p) { p.shape.heads_kv = 0; }, kInvalid, "shape.heads_kv");
  expect_rejected([](AttentionParams& p) { p.shape.head_dim = 0; }, kInvalid, "shape.head_dim");
  expect_rejected([](AttentionParams& p) { p.shape.head_dim = 300; }, kInvalid, "shape.head_dim");
  expect_rejected([](AttentionParams& p) { p.shape.batch = -1; }, kInvalid, "shape.batch");
  expect_rejected([](AttentionParams& p) { p.shape.len_q = -5; }, kInvalid, "shape.len_q");
  expect_rejected([](AttentionParams& p) { p.shape.len_k = -5; }, kInvalid, "shape.len_k");
  expect_rejected([](AttentionParams& p) { p.in.k_strides.token = -1; }, kInvalid, "in.k_strides");
  expect_rejected([](AttentionParams& p) { p.o_strides.head = -1; }, kInvalid, "o_strides");
}

TEST_F(ApiContract, BlockSizes) {
  for (int64_t bad : {0, 8, 24, 1040, 2048}) {
    SCOPED_TRACE(bad);
    expect_rejected([bad](AttentionParams& p) { p.blocks.block_q = bad; }, kInvalid, "blocks.block_q");
    expect_rejected([bad](AttentionParams& p) { p.blocks.block_k = bad; }, kInvalid, "blocks.block_k");
  }
}

TEST_F(ApiContract, Thresholds) {
  expect_rejected([](AttentionParams& p) { p.select.topk.value = 1.5f; }, kInvalid, "select.topk");
  expect_rejected([](AttentionParams& p) { p.select.topk.value = -0.1f; }, kInvalid, "select.topk");
  expect_rejected([](AttentionParams& p) { p.select.topk.value = kNaNf; }, kInvalid, "select.topk");
  expect_rejected([](AttentionParams& p) { p.select.simthreshd1.value = -2.0f; }, kInvalid, "select.simthreshd1");
  expect_rejected(
      [](AttentionParams& p) {
        p.select.mode = SelectMode::kCdf;
        p.select.cdfthreshd.value = 2.0f;
      },
      kInvalid, "select.cdfthreshd");
  expect_rejected([](AttentionParams& p) { p.pvthreshd.value = -1.0f; }, kInvalid, "pvthreshd");
  expect_rejected([](AttentionParams& p) { p.pvthreshd.value = kNaNf; }, kInvalid, "pvthreshd");
  // Per-head values are host memory on the CPU backend and checked one by one.
  static const float topk[] = {0.5f, 1.2f, 0.5f, 0.5f};
  static const float pv[] = {1.0f, 2.0f, 3.0f, -4.0f};
  expect_rejected([](AttentionParams& p) { p.select.topk.per_head = topk; }, kInvalid, "select.topk.per_head[1]");
  expect_rejected([](AttentionParams& p) { p.pvthreshd.per_head = pv; }, kInvalid, "pvthreshd.per_head[3]");
  // +inf is a valid P·V threshold (never skip).
  AttentionParams p = valid();
  p.pvthreshd.value = kInf;
  EXPECT_TRUE(attention(p).ok());
}

TEST_F(ApiContract, SmScaleAndBlockMask) {
  expect_rejected([](AttentionParams& p) { p.quant.sm_scale = kNaNf; }, kInvalid, "quant.sm_scale");
  expect_rejected([](AttentionParams& p) { p.quant.sm_scale = kInf; }, kInvalid, "quant.sm_scale");
  expect_rejected([](AttentionParams& p) { p.select.mode = SelectMode::kBlockMask; }, kInvalid, "select.block_mask");
}

TEST_F(ApiContract, Workspace) {
  expect_rejected([](AttentionParams& p) { p.workspace_bytes = workspace_size(p) - 1; }, kInvalid, "workspace_bytes");
  expect_rejected(
      [](AttentionParams& p) {
        p.workspace = static_cast<char*>(p.workspace) + 64;
        p.workspace_bytes -= 64;
      },
      kInvalid, "workspace");
}

TEST_F(ApiContract, InvalidEnumValues) {
  expect_rejected([](AttentionParams& p) { p.device = static_cast<Device>(7); }, kInvalid, "device");
  expect_rejected([](AttentionParams& p) { p.in.dtype = static_cast<DType>(9); }, kInvalid, "in.dtype");
  expect_rejected([](AttentionParams& p) { p.o_dtype = static_cast<DType>(9); }, kInvalid, "o_dtype");
  expect_rejected([](AttentionParams& p) { p.quant.granularity = static_cast<QuantGranularity>(5); }, kInvalid,
                  "quant.granularity");
  expect_rejected([](AttentionParams& p) { p.quant.pv = static_cast<PvPrecision>(3); }, kInvalid, "quant.pv");
  expect_rejected([](AttentionParams& p) { p.causal = static_cast<Causal>(4); }, kInvalid, "causal");
  expect_rejected([](AttentionParams& p) { p.select.mode = static_cast<SelectMode>(9); }, kInvalid, "select.mode");
}

// This suite runs on machines without a GPU (CI): Device::kCUDA must fail cleanly, naming the
// device, whether or not the CUDA backend was compiled in.
TEST_F(ApiContract, CudaDeviceWithoutGpu) {
  const StatusCode expected = cuda_backend_built() ? StatusCode::kCudaError : StatusCode::kNotBuilt;
  expect_rejected([](AttentionParams& p) { p.device = Device::kCUDA; }, expected, "device");
}

TEST_F(ApiContract, StageEntryPointsValidateToo) {
  StageWorkspace ws(shape, {}, {});
  QuantizedQKV out = ws.buffers.quantized;
  out.k_scale = nullptr;
  Status status = quantize(QuantizeParams{.shape = shape, .in = inputs_of(x), .out = out});
  EXPECT_EQ(status.code(), kInvalid);
  EXPECT_NE(status.message().find("out.k_scale"), std::string::npos) << status.message();

  status = predict(PredictParams{.shape = shape,
                                 .select = {.mode = SelectMode::kTopK, .topk = {2.0f}},
                                 .stats = ws.buffers.quantized,
                                 .out = ws.buffers.index});
  EXPECT_EQ(status.code(), kInvalid);
  EXPECT_NE(status.message().find("select.topk"), std::string::npos) << status.message();

  BlockIndex no_count = ws.buffers.index;
  no_count.count = nullptr;
  status = attend(AttendParams{
      .shape = shape, .quantized = ws.buffers.quantized, .index = no_count, .o = o.data(), .o_strides = o.strides()});
  EXPECT_EQ(status.code(), kInvalid);
  EXPECT_NE(status.message().find("index.count"), std::string::npos) << status.message();

  status = attend(AttendParams{.shape = shape,
                               .quant = {.pv = static_cast<PvPrecision>(3)},
                               .quantized = ws.buffers.quantized,
                               .index = ws.buffers.index,
                               .o = o.data(),
                               .o_strides = o.strides()});
  EXPECT_EQ(status.code(), kInvalid);
  EXPECT_NE(status.message().find("quant.pv"), std::string::npos) << status.message();

  alignas(256) static char scratch[512];
  status = attend(AttendParams{.shape = shape,
                               .quantized = ws.buffers.quantized,
                               .index = ws.buffers.index,
                               .o = o.data(),
                               .o_strides = o.strides(),
                               .workspace = scratch + 1,
                               .workspace_bytes = 256});
  EXPECT_EQ(status.code(), kInvalid);
  EXPECT_NE(status.message().find("workspace"), std::string::npos) << status.message();
}

// The split-tail scratch of the CUDA attention kernel (layout.h): kSplitMaxCtas · 8 int32 counters
// rounded up to 256 bytes, then 2 slots per CTA, each 8 warps × 32 lanes × (head_dim_pad / 2 + 4) floats;
// only for requests the wgmma kernel may run with more work tiles than kSplitMaxCtas, never on the CPU.
TEST(Api, AttendScratchSizing) {
  const Shape big{.batch = 1, .heads_q = 16, .heads_kv = 16, .len_q = 32768, .len_k = 32768, .head_dim = 128};
  const size_t counters = 4352;  // 132 · 8 · 4 = 4224, rounded up to 256
  const size_t slot128 = 8 * 32 * (64 + 4) * 4;
  const size_t slot64 = 8 * 32 * (32 + 4) * 4;
  EXPECT_EQ(attend_workspace_size({.device = Device::kCUDA, .shape = big}), counters + 264 * slot128);
  Shape d64 = big;
  d64.head_dim = 64;
  EXPECT_EQ(attend_workspace_size({.device = Device::kCUDA, .shape = d64}), counters + 264 * slot64);
  EXPECT_EQ(attend_workspace_size({.device = Device::kCPU, .shape = big}), 0u);
  const size_t stages = stage_buffers_size(big, {}, QuantGranularity::kPerThread, PvPrecision::kFp8);
  EXPECT_EQ(workspace_size({.device = Device::kCUDA, .shape = big}), stages + counters + 264 * slot128);
  EXPECT_EQ(workspace_size({.device = Device::kCPU, .shape = big}), stages);
  Shape small = big;
  small.heads_q = small.heads_kv = 12;
  small.len_q = 11 * 128;  // 132 work tiles: never a partial last round on 132 SMs
  EXPECT_EQ(attend_workspace_size({.device = Device::kCUDA, .shape = small}), 0u);
  small.len_q += 1;
  EXPECT_GT(attend_workspace_size({.device = Device::kCUDA, .shape = small}), 0u);
  EXPECT_EQ(attend_workspace_size({.device = Device::kCUDA, .shape = big, .quant = {.pv = PvPrecision::kFp16}}), 0u);
  Shape d256 = big;
  d256.head_dim = 256;
  EXPECT_EQ(attend_workspace_size({.device = Device::kCUDA, .shape = d256}), 0u);
}

TEST(Api, EmptyShapesSucceed) {
  // q, o and the workspace may be null for an empty problem; k and v only when no key exists.
  std::vector<uint16_t> kv(10 * 16);
  for (const Shape& shape : {Shape{.batch = 0, .heads_q = 2, .heads_kv = 1, .len_q = 10, .len_k = 10, .head_dim = 16},
                             Shape{.batch = 1, .heads_q = 2, .heads_kv = 1, .len_q = 0, .len_k = 10, .head_dim = 16},
                             Shape{.batch = 0, .heads_q = 1, .heads_kv = 1, .len_q = 0, .len_k = 0, .head_dim = 1}}) {
    const bool has_keys = shape.batch * shape.len_k > 0;
    const AttentionParams p{.shape = shape,
                            .in = {.k = has_keys ? kv.data() : nullptr,
                                   .v = has_keys ? kv.data() : nullptr,
                                   .k_strides = {.head = 10 * 16, .token = 16},
                                   .v_strides = {.head = 10 * 16, .token = 16}}};
    EXPECT_EQ(workspace_size(p) == 0, shape.batch == 0);
    const Status status = attention(p);
    EXPECT_TRUE(status.ok()) << status.message();
  }
}

TEST(Api, WorkspaceSizeMatchesTheCarving) {
  const Shape base{.batch = 2, .heads_q = 4, .heads_kv = 2, .len_q = 300, .len_k = 500, .head_dim = 64};
  for (QuantGranularity g : {QuantGranularity::kPerBlock, QuantGranularity::kPerWarp, QuantGranularity::kPerThread}) {
    for (PvPrecision pv : {PvPrecision::kFp8, PvPrecision::kFp16, PvPrecision::kFp8Fp16Accum}) {
      const AttentionParams p{.shape = base, .quant = {.granularity = g, .pv = pv}};
      const size_t size = workspace_size(p);
      EXPECT_EQ(size, stage_buffers_size(base, p.blocks, g, pv));
      EXPECT_EQ(size % kWorkspaceAlign, 0u);
      // Every buffer lies inside [base, base + size), aligned, in order, without overlap.
      const uintptr_t start = 4096;
      const StageBuffers buf = carve_stage_buffers(reinterpret_cast<void*>(start), base, p.blocks, g, pv);
      const auto [nbq, nbk] = block_counts(base, p.blocks);
      const int64_t bhq = 2 * 4, bhk = 2 * 2;
      const std::vector<std::pair<const void*, int64_t>> buffers = {
          {buf.quantized.q, bhq * 300 * 64},
          {buf.quantized.q_scale, bhq * q_scale_groups(300, g) * 4},
          {buf.quantized.k, bhk * 500 * 64},
          {buf.quantized.k_scale, bhk * k_scale_groups(500, g) * 4},
          {buf.quantized.k_mean, bhk * 64 * 4},
          {buf.quantized.v, bhk * 64 * padded_len_k(500) * (pv == PvPrecision::kFp16 ? 2 : 1)},
          {buf.quantized.v_scale, bhk * 64 * 4},
          {buf.quantized.lse_shift, bhq * 300 * 4},
          {buf.quantized.q_pool, bhq * nbq * 64 * 4},
          {buf.quantized.q_sim, bhq * nbq * 4},
          {buf.quantized.k_pool, bhk * nbk * 64 * 4},
          {buf.quantized.k_sim, bhk * nbk * 4},
          {buf.index.index, bhq * nbq * nbk * 4},
          {buf.index.count, bhq * nbq * 4},
      };
      uintptr_t end = start;
      for (const auto& [ptr, bytes] : buffers) {
        const uintptr_t at = reinterpret_cast<uintptr_t>(ptr);
        EXPECT_EQ(at % kWorkspaceAlign, 0u);
        EXPECT_GE(at, end);
        end = at + static_cast<uintptr_t>(bytes);
      }
      EXPECT_LE(end, start + size);
    }
  }
  // Monotone in every dimension.
  const size_t size = workspace_size({.shape = base});
  for (auto grow : std::vector<std::function<void(Shape&)>>{
           [](Shape& s) { s.batch += 1; }, [](Shape& s) { s.heads_q *= 2; }, [](Shape& s) { s.heads_kv *= 2; },
           [](Shape& s) { s.len_q += 1000; }, [](Shape& s) { s.len_k += 1000; }, [](Shape& s) { s.head_dim += 64; }}) {
    Shape bigger = base;
    grow(bigger);
    EXPECT_GT(workspace_size({.shape = bigger}), size);
  }
  EXPECT_GE(workspace_size({.shape = base, .blocks = {.block_q = 16, .block_k = 16}}), size);
}

TEST(Api, VersionAndBackendQueries) {
  EXPECT_FALSE(std::string(version()).empty());
  EXPECT_EQ(cuda_backend_built(), std::string(cuda_architectures()).size() > 0);
  EXPECT_STREQ(status_code_name(StatusCode::kNotBuilt), "not built");
}

TEST(Api, AttendKernelQuery) {
  const Shape shape{.batch = 1, .heads_q = 2, .heads_kv = 2, .len_q = 256, .len_k = 256, .head_dim = 64};
  const char* name = nullptr;
  ASSERT_TRUE(attend_kernel(Device::kCPU, shape, BlockConfig{}, QuantOptions{}, &name).ok());
  EXPECT_STREQ(name, "cpu");
  const Status bad = attend_kernel(Device::kCPU, shape, BlockConfig{.block_q = 0, .block_k = 64}, QuantOptions{}, &name);
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("block_q"), std::string::npos) << bad.message();
  // Without a GPU (this suite's machine, as CudaDeviceWithoutGpu) the CUDA query fails cleanly.
  const StatusCode expected = cuda_backend_built() ? StatusCode::kCudaError : StatusCode::kNotBuilt;
  EXPECT_EQ(attend_kernel(Device::kCUDA, shape, BlockConfig{}, QuantOptions{}, &name).code(), expected);
}

}  // namespace
}  // namespace sparge::test
