// Stage 2 dispatch: from the runtime request to the instantiated kernels: the wgmma + TMA kernel
// (sm90/attend_wgmma.cuh) on sm_90 where it covers the request, else the mma.sync kernel
// (sm80/attend_mma.cuh). The environment variable SPARGE_CUDA_KERNEL (auto, mma, wgmma) forces
// the choice, so that the mma.sync kernel of Ampere / Ada is testable on a Hopper GPU. With
// block_k = 64 the wgmma kernel runs tiles made of several kept blocks: four (256 keys) at head dims
// padded to 64, two (128 keys) at 128; SPARGE_WGMMA_TILE_BLOCKS=1, 2 or 4 (4: head dims padded to 64
// only) picks the number instead (for comparison). The wgmma kernel is persistent, one CTA
// per SM; SPARGE_WGMMA_CTAS=n caps its grid at n CTAs (tests: many work tiles per CTA on small
// problems), and SPARGE_WGMMA_SPLIT=0 keeps it from splitting its last round of work tiles when the
// caller gave a workspace (for comparison).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>

#include "common/status_macros.h"
#include "cuda/attn/attend.h"
#include "cuda/attn/sm80/attend_mma.h"
#include "cuda/attn/sm90/attend_wgmma.h"
#include "cuda/common/chained_launch.cuh"
#include "cuda/common/device_utils.cuh"
#include "cuda/common/ptx_mma.cuh"
#include "sparge/layout.h"
#include "sparge_build_config.h"

namespace sparge::cuda {
namespace {

constexpr int kMinComputeCapability = 80;      // ldmatrix, cp.async, mma.sync int8 / fp16
constexpr int kMinFp8ComputeCapability = 89;   // mma.sync with e4m3 operands (kFp8, kFp8Fp16Accum)
constexpr int kWgmmaComputeCapability = 90;    // wgmma / TMA, built for sm_90a only
constexpr bool kBuiltSm90a = std::string_view(SPARGE_CUDA_ARCHS).find("90a") != std::string_view::npos;
constexpr int64_t kHeadDimStep = 16;           // head dims are whole 16-byte rows of int8 chunks
constexpr int64_t kMinHeadDim = 16;
constexpr int64_t kMaxGridYZ = 65535;          // gridDim.y (heads) and gridDim.z (batch)
constexpr int64_t kMaxLength = std::numeric_limits<int32_t>::max() / 2;  // int32 row / key arithmetic
constexpr size_t kStaticSmemAllowance = 1024;  // the kernel's static __shared__ data, rounded up

// Head dims are padded to the next instantiated width; padded columns are zero in shared memory.
int head_dim_pad(int64_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

std::string cc_name(int cc) { return std::to_string(cc / 10) + "." + std::to_string(cc % 10); }

Status unsupported(const std::string& message) { return {StatusCode::kUnsupported, message}; }

template <int kHeadDimPad, int kBlockK>
Status dispatch_pv(const AttendParams& p, const MmaAttendParams& kp, dim3 grid) {
  bool chained = false;
  SPARGE_RETURN_IF_ERROR(chained_launches(&chained));
  switch (p.quant.pv) {
    case PvPrecision::kFp8:
      return launch_mma_attend<kHeadDimPad, kBlockK, PvPrecision::kFp8>(kp, grid, p.stream, chained);
    case PvPrecision::kFp16:
      return launch_mma_attend<kHeadDimPad, kBlockK, PvPrecision::kFp16>(kp, grid, p.stream, chained);
    case PvPrecision::kFp8Fp16Accum:
      return launch_mma_attend<kHeadDimPad, kBlockK, PvPrecision::kFp8Fp16Accum>(kp, grid, p.stream, chained);
  }
  return unsupported("quant.pv: no attention kernel for value " + std::to_string(static_cast<int>(p.quant.pv)));
}

template <int kHeadDimPad>
Status dispatch_block_k(const AttendParams& p, const MmaAttendParams& kp, dim3 grid) {
  switch (p.blocks.block_k) {
    case 64: return dispatch_pv<kHeadDimPad, 64>(p, kp, grid);
    case 128: return dispatch_pv<kHeadDimPad, 128>(p, kp, grid);
  }
  return unsupported("blocks.block_k: the CUDA attention kernel supports 64 or 128, got " +
                     std::to_string(p.blocks.block_k));
}

// SPARGE_WGMMA_TILE_BLOCKS: kept 64-key blocks per tile of the wgmma kernel at block_k = 64.
constexpr const char* kTileBlocksEnv = "SPARGE_WGMMA_TILE_BLOCKS";
// SPARGE_WGMMA_SPLIT: whether the wgmma kernel may split its last round of work tiles.
constexpr const char* kSplitEnv = "SPARGE_WGMMA_SPLIT";

constexpr const char* kCtasEnv = "SPARGE_WGMMA_CTAS";

// The most CTAs the persistent wgmma kernel launches (SPARGE_WGMMA_CTAS: a positive integer, or unset
// for one per SM: 0).
Status wgmma_max_ctas(int* max_ctas) {
  const char* value = std::getenv(kCtasEnv);
  *max_ctas = 0;
  if (value == nullptr || *value == '\0') return Status::Ok();
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  if (*end != '\0' || n < 1 || n > std::numeric_limits<int>::max()) {
    return {StatusCode::kInvalidArgument,
            std::string(kCtasEnv) + ": expected a positive integer, got \"" + std::string(value) + "\""};
  }
  *max_ctas = static_cast<int>(n);
  return Status::Ok();
}

// Blocks per tile at block_k = 64 (see kTileBlocksEnv): 4 at head dims padded to 64, else 2, unless set.
Status wgmma_tile_blocks(int head_dim_pad, int* blocks) {
  const char* value = std::getenv(kTileBlocksEnv);
  const std::string_view v = value != nullptr ? value : "";
  *blocks = head_dim_pad == 64 ? 4 : 2;
  if (v.empty()) return Status::Ok();
  if (v != "1" && v != "2" && !(v == "4" && head_dim_pad == 64)) {
    return {StatusCode::kInvalidArgument, std::string(kTileBlocksEnv) + ": expected 1, 2" +
                                              (head_dim_pad == 64 ? " or 4" : " (4 only at head dims up to 64)") +
                                              ", got \"" + std::string(v) + "\""};
  }
  *blocks = v[0] - '0';
  return Status::Ok();
}

template <int kHeadDimPad>
Status dispatch_wgmma_block_k(const AttendParams& p, const MmaAttendParams& kp, bool counters_zeroed) {
  WgmmaLaunch launch{.batch = static_cast<int>(p.shape.batch), .stream = p.stream, .counters_zeroed = counters_zeroed};
  SPARGE_RETURN_IF_ERROR(wgmma_max_ctas(&launch.max_ctas));
  SPARGE_RETURN_IF_ERROR(chained_launches(&launch.chained));
  bool split = false;
  SPARGE_RETURN_IF_ERROR(env_switch(kSplitEnv, &split));
  if (split) {
    launch.scratch = p.workspace;
    launch.scratch_bytes = p.workspace_bytes;
  }
  switch (p.blocks.block_k) {
    case 64: {
      int blocks = 0;
      SPARGE_RETURN_IF_ERROR(wgmma_tile_blocks(kHeadDimPad, &blocks));
      if constexpr (kHeadDimPad == 64) {
        if (blocks == 4) return launch_wgmma_attend<kHeadDimPad, 256, true>(kp, launch);
      }
      if (blocks == 2) return launch_wgmma_attend<kHeadDimPad, 128, true>(kp, launch);
      return launch_wgmma_attend<kHeadDimPad, 64, false>(kp, launch);
    }
    case 128: return launch_wgmma_attend<kHeadDimPad, 128, false>(kp, launch);
  }
  return unsupported("blocks.block_k: the wgmma attention kernel supports 64 or 128, got " +
                     std::to_string(p.blocks.block_k));
}

Status dispatch_wgmma_head_dim(const AttendParams& p, const MmaAttendParams& kp, bool counters_zeroed) {
  switch (head_dim_pad(p.shape.head_dim)) {
    case 64: return dispatch_wgmma_block_k<64>(p, kp, counters_zeroed);
    case 128: return dispatch_wgmma_block_k<128>(p, kp, counters_zeroed);
  }
  return unsupported("shape.head_dim: no wgmma attention kernel for " + std::to_string(p.shape.head_dim));
}

constexpr const char* kKernelEnv = "SPARGE_CUDA_KERNEL";

enum class KernelChoice { kAuto, kMma, kWgmma };

Status kernel_choice(KernelChoice* choice) {
  const char* value = std::getenv(kKernelEnv);
  const std::string_view v = value != nullptr ? value : "";
  if (v.empty() || v == "auto") {
    *choice = KernelChoice::kAuto;
  } else if (v == "mma") {
    *choice = KernelChoice::kMma;
  } else if (v == "wgmma") {
    *choice = KernelChoice::kWgmma;
  } else {
    return {StatusCode::kInvalidArgument,
            std::string(kKernelEnv) + ": expected auto, mma or wgmma, got \"" + std::string(v) + "\""};
  }
  return Status::Ok();
}

// Whether stage 2 runs on the wgmma kernel: built for sm_90a, a compute capability 9.0 device (the
// sm_90a cubin runs on no other), a request it covers (kFp8 P·V only: kFp8Fp16Accum runs on
// mma.sync on every GPU), and not forced to mma.sync. Forcing wgmma where it cannot run is
// kUnsupported.
Status use_wgmma(const Shape& s, const BlockConfig& blocks, PvPrecision pv, const Arch& arch, bool* wgmma) {
  KernelChoice choice = KernelChoice::kAuto;
  SPARGE_RETURN_IF_ERROR(kernel_choice(&choice));
  const bool device_ok = arch.device == kWgmmaComputeCapability;
  const bool can = kBuiltSm90a && device_ok && wgmma_attend_covers(s.head_dim, blocks.block_q, blocks.block_k, pv, s.len_k);
  if (choice == KernelChoice::kWgmma && !can) {
    return unsupported(std::string(kKernelEnv) +
                       "=wgmma: the wgmma kernel needs a build with sm_90a, a compute capability 9.0 device, kFp8 "
                       "P·V (got " + pv_name(pv) + "), head_dim <= 128, block_q a multiple of " +
                       std::to_string(kWgmmaAttendRows) + " and block_k 64 or 128");
  }
  *wgmma = can && choice != KernelChoice::kMma;
  return Status::Ok();
}

Status dispatch_head_dim(const AttendParams& p, const MmaAttendParams& kp, dim3 grid) {
  switch (head_dim_pad(p.shape.head_dim)) {
    case 64: return dispatch_block_k<64>(p, kp, grid);
    case 128: return dispatch_block_k<128>(p, kp, grid);
    case 256: return dispatch_block_k<256>(p, kp, grid);
  }
  return unsupported("shape.head_dim: no attention kernel for " + std::to_string(p.shape.head_dim));
}

}  // namespace

Status attend_kernel_name(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant, const Arch& arch,
                          const char** name) {
  bool wgmma = false;
  SPARGE_RETURN_IF_ERROR(use_wgmma(shape, blocks, quant.pv, arch, &wgmma));
  *name = wgmma ? "wgmma" : "mma";
  return Status::Ok();
}

Status attend_supports(const Shape& shape, const BlockConfig& blocks, const QuantOptions& quant, const Arch& arch) {
  if (arch.device < kMinComputeCapability) {
    return unsupported("device: the CUDA attention kernel needs compute capability " + cc_name(kMinComputeCapability) +
                       " or newer, got " + cc_name(arch.device));
  }
  const bool fp8 = pv_is_fp8(quant.pv);
  if (fp8 && arch.device < kMinFp8ComputeCapability) {
    return unsupported(std::string("quant.pv: ") + pv_name(quant.pv) + " needs compute capability " +
                       cc_name(kMinFp8ComputeCapability) + " or newer (e4m3 mma), got " + cc_name(arch.device) +
                       "; use kFp16");
  }
  if (fp8 && arch.image < kMinFp8ComputeCapability) {
    return unsupported(std::string("quant.pv: ") + pv_name(quant.pv) +
                       " needs e4m3 mma, but the kernels that run on this device (compute capability " +
                       cc_name(arch.device) + ") were compiled for " + cc_name(arch.image) + " (SPARGE_CUDA_ARCHS=" +
                       SPARGE_CUDA_ARCHS + "); use kFp16 or build for " + cc_name(kMinFp8ComputeCapability) +
                       " or newer");
  }
  if (quant.pv == PvPrecision::kFp8Fp16Accum && !kHasMmaE4m3F16Accum) {
    return unsupported("quant.pv: kFp8Fp16Accum needs mma.sync with an f16 accumulator (PTX ISA 8.7), which this "
                       "build's nvcc " + std::to_string(__CUDACC_VER_MAJOR__) + "." +
                       std::to_string(__CUDACC_VER_MINOR__) +
                       " cannot emit; use kFp8 or build with CUDA 12.8 or newer");
  }
  bool wgmma = false;
  SPARGE_RETURN_IF_ERROR(use_wgmma(shape, blocks, quant.pv, arch, &wgmma));
  if (shape.head_dim % kHeadDimStep != 0 || shape.head_dim < kMinHeadDim || shape.head_dim > kMaxHeadDim) {
    return unsupported("shape.head_dim: the CUDA attention kernel needs a multiple of 16 in [16, 256], got " +
                       std::to_string(shape.head_dim));
  }
  if (blocks.block_q % kMmaAttendRows != 0) {
    return unsupported("blocks.block_q: the CUDA attention kernel needs a multiple of " +
                       std::to_string(kMmaAttendRows) + ", got " + std::to_string(blocks.block_q));
  }
  if (blocks.block_k != 64 && blocks.block_k != 128) {
    return unsupported("blocks.block_k: the CUDA attention kernel supports 64 or 128, got " +
                       std::to_string(blocks.block_k));
  }
  if (shape.len_q > kMaxLength || shape.len_k > kMaxLength) {
    return unsupported("shape.len_q / shape.len_k: the CUDA attention kernel supports at most " +
                       std::to_string(kMaxLength) + " tokens, got " + std::to_string(shape.len_q) + " / " +
                       std::to_string(shape.len_k));
  }
  if (shape.heads_q > kMaxGridYZ || shape.batch > kMaxGridYZ) {
    return unsupported("shape.heads_q / shape.batch: the CUDA attention kernel supports at most " +
                       std::to_string(kMaxGridYZ) + ", got " + std::to_string(shape.heads_q) + " / " +
                       std::to_string(shape.batch));
  }

  const int pad = head_dim_pad(shape.head_dim);
  const size_t need = mma_attend_smem_bytes(pad, static_cast<int>(blocks.block_k), quant.pv);
  int optin = 0;
  SPARGE_RETURN_IF_ERROR((device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(
      &optin, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)")));
  if (need + kStaticSmemAllowance > static_cast<size_t>(optin)) {
    return unsupported("blocks.block_k: head_dim " + std::to_string(shape.head_dim) + " (padded to " +
                       std::to_string(pad) + ") with block_k " + std::to_string(blocks.block_k) + " and pv " +
                       pv_name(quant.pv) + " needs " + std::to_string(need) +
                       " bytes of shared memory per CTA, the device allows " + std::to_string(optin) +
                       "; use block_k 64");
  }
  return Status::Ok();
}

Status launch_attend(const AttendParams& p, const Arch& arch, bool counters_zeroed) {
  static_assert(kStatPvSkipped == kStatPvUnits + 1, "the two P·V counters are cleared with one memset");
  if (p.stats_out != nullptr) {
    SPARGE_CUDA_TRY(cudaMemsetAsync(p.stats_out + kStatPvUnits, 0, 2 * sizeof(int64_t), p.stream),
                    "cudaMemsetAsync(stats_out)");
  }
  const Shape& s = p.shape;
  if (s.batch == 0 || s.heads_q == 0 || s.len_q == 0) return Status::Ok();

  const QuantGranularity g = p.quant.granularity;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const MmaAttendParams kp{.q = p.quantized.q,
                           .q_scale = p.quantized.q_scale,
                           .k = p.quantized.k,
                           .k_scale = p.quantized.k_scale,
                           .v = p.quantized.v,
                           .v_scale = p.quantized.v_scale,
                           .lse_shift = p.quantized.lse_shift,
                           .index = p.index.index,
                           .count = p.index.count,
                           .o = p.o,
                           .lse = p.lse,
                           .stats = p.stats_out,
                           .pvthreshd_per_head = p.pvthreshd.per_head,
                           .pvthreshd = p.pvthreshd.value,
                           .o_stride_batch = p.o_strides.batch,
                           .o_stride_head = p.o_strides.head,
                           .o_stride_token = p.o_strides.token,
                           .o_dtype = p.o_dtype,
                           .causal = p.causal,
                           .granularity = g,
                           .heads_q = static_cast<int32_t>(s.heads_q),
                           .heads_per_kv = static_cast<int32_t>(s.heads_q / s.heads_kv),
                           .heads_kv = static_cast<int32_t>(s.heads_kv),
                           .len_q = static_cast<int32_t>(s.len_q),
                           .len_k = static_cast<int32_t>(s.len_k),
                           .len_k_pad = static_cast<int32_t>(padded_len_k(s.len_k)),
                           .head_dim = static_cast<int32_t>(s.head_dim),
                           .block_q = static_cast<int32_t>(p.blocks.block_q),
                           .nbq = static_cast<int32_t>(nbq),
                           .nbk = static_cast<int32_t>(nbk),
                           .q_groups = static_cast<int32_t>(q_scale_groups(s.len_q, g)),
                           .k_groups = static_cast<int32_t>(k_scale_groups(s.len_k, g))};
  bool wgmma = false;
  SPARGE_RETURN_IF_ERROR(use_wgmma(s, p.blocks, p.quant.pv, arch, &wgmma));
  if (wgmma) return dispatch_wgmma_head_dim(p, kp, counters_zeroed);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.len_q, kMmaAttendRows)), static_cast<unsigned>(s.heads_q),
                  static_cast<unsigned>(s.batch));
  return dispatch_head_dim(p, kp, grid);
}

}  // namespace sparge::cuda
