// sparge — exact layout of the quantized buffers: scale groups, block counts, buffer sizes.
// Usable from host and device code.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "sparge/params.h"

#if defined(__CUDACC__)
#define SPARGE_HD __host__ __device__ __forceinline__
#else
#define SPARGE_HD inline
#endif

namespace sparge {

inline constexpr int64_t kQuantBlockRows = 64;  // rows of one per-block scale group (Q and K)
inline constexpr int64_t kQuantWarpRows = 16;   // rows of one per-warp Q group
inline constexpr int64_t kPvGroupRows = 16;     // query rows deciding the P·V skip together
inline constexpr int64_t kVPadTokens = 64;      // the token dimension of quantized V is padded to this
inline constexpr float kPScale = 448.0f;        // P is quantized as P · kPScale (e4m3 max)
inline constexpr float kLog2PScale = 8.807354922057604f;  // log2(kPScale)
// The fp8 P·V modes form P · kPScale directly as an e4m3 code (docs/method.md §2, step 3):
// code = clamp(rne(kPCodesPerOctave · (s − m_new) + kPCodeMax), 0, kPCodeMax).
inline constexpr int kPCodeMax = 126;       // e4m3 0x7e = 448 = kPScale: the code of p = 1
inline constexpr int kPCodesPerOctave = 8;  // e4m3 codes per power of two (3 mantissa bits)
inline constexpr float kVQuantMax = 448.0f;     // V is scaled into [-448, 448] before conversion
inline constexpr float kVQuantMaxFp16Accum = 2.25f;   // kFp8Fp16Accum: V is scaled into [-2.25, 2.25]
inline constexpr int64_t kFp16AccumStepKeys = 32;     // kFp8Fp16Accum: keys of one step (one m16n8k32 mma)
inline constexpr int64_t kFp16AccumChunkKeys = 64;    // kFp8Fp16Accum: keys summed in one fp16 accumulator
inline constexpr float kFp16Max = 65504.0f;
inline constexpr float kInt8Max = 127.0f;
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr int64_t kMaxHeadDim = 256;
inline constexpr int64_t kSpikeKeys = 2;        // keys per K block kept by QuantizedQKV::k_spikes
inline constexpr float kCdfSimFloor = 0.01f;     // Selection::cdf_sharpen: smallest q_sim used
inline constexpr int64_t kMinBlock = 16;
inline constexpr int64_t kMaxBlock = 1024;
inline constexpr size_t kWorkspaceAlign = 256;

// kFp8Fp16Accum: |p8| <= kPScale and |v_q| <= kVQuantMaxFp16Accum, so every partial sum of a chunk
// is within ±64512 and its fp16 accumulator cannot overflow.
static_assert(kFp16AccumChunkKeys * kPScale * kVQuantMaxFp16Accum <= kFp16Max, "fp16 P·V accumulator overflows");
static_assert(kFp16AccumChunkKeys % kFp16AccumStepKeys == 0, "whole steps per fp16 accumulator chunk");

// Whether P and V are e4m3 (kFp8, kFp8Fp16Accum) rather than fp16.
SPARGE_HD constexpr bool pv_is_fp8(PvPrecision pv) { return pv != PvPrecision::kFp16; }

// Bytes of one element of quantized V.
SPARGE_HD constexpr int64_t v_elem_bytes(PvPrecision pv) { return pv_is_fp8(pv) ? 1 : 2; }

// Keys of one aligned group whose order e4m3 V^T rows permute (v_key_slot).
inline constexpr int64_t kVKeyGroup = 16;

// Position of key `key` in its V^T row. fp16 V: the key itself. e4m3 V (both fp8 modes): inside
// every aligned group of 16 keys, key 8a + 2t + b (a, b in {0, 1}, t in 0..3) sits at 4t + 2a + b.
// That is the order of the 8-bit P·V A fragment: lane t of a quad holds S columns 2t, 2t + 1 of
// every n8 tile, and a k32 step of m16n8k32 / wgmma takes its A bytes 4t .. 4t + 3 (and 16 + 4t ..)
// from lane t, so P goes from the Q·K^T accumulators into the P·V product without lane shuffles.
SPARGE_HD constexpr int64_t v_key_slot(int64_t key, PvPrecision pv) {
  if (!pv_is_fp8(pv)) return key;
  const int64_t r = key % kVKeyGroup;
  return key - r + ((r >> 1) & 3) * 4 + (r >> 3) * 2 + (r & 1);
}

// The key at position `slot` of a V^T row: the inverse of v_key_slot.
SPARGE_HD constexpr int64_t v_slot_key(int64_t slot, PvPrecision pv) {
  if (!pv_is_fp8(pv)) return slot;
  const int64_t r = slot % kVKeyGroup;
  return slot - r + ((r >> 1) & 1) * 8 + (r >> 2) * 2 + (r & 1);
}

// V is scaled into [-v_quant_max(pv), v_quant_max(pv)] before conversion: v_scale = amax / v_quant_max.
SPARGE_HD constexpr float v_quant_max(PvPrecision pv) {
  return pv == PvPrecision::kFp8Fp16Accum ? kVQuantMaxFp16Accum : kVQuantMax;
}

SPARGE_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SPARGE_HD constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// kCdf: factor of Q block i's compressed scores (Selection::cdf_sharpen); the same IEEE
// operations (max, sqrt, divide) on host and device.
SPARGE_HD float cdf_score_gain(float q_sim, bool sharpen) {
  return sharpen ? 1.0f / sqrtf(q_sim > kCdfSimFloor ? q_sim : kCdfSimFloor) : 1.0f;
}

// Row r of Q → index of its scale within its head.
SPARGE_HD constexpr int64_t q_scale_group(int64_t r, QuantGranularity g) {
  switch (g) {
    case QuantGranularity::kPerBlock: return r / kQuantBlockRows;
    case QuantGranularity::kPerWarp: return r / kQuantWarpRows;
    default: return (r / 16) * 8 + (r % 8);  // kPerThread: rows r and r+8 of a 16-row MMA tile
  }
}

// Row (token) c of K → index of its scale within its head.
SPARGE_HD constexpr int64_t k_scale_group(int64_t c, QuantGranularity g) {
  switch (g) {
    case QuantGranularity::kPerThread: return (c / 64) * 4 + (c % 8) / 2;  // MMA accumulator columns
    default: return c / kQuantBlockRows;
  }
}

SPARGE_HD constexpr int64_t q_scale_groups(int64_t len_q, QuantGranularity g) {
  switch (g) {
    case QuantGranularity::kPerBlock: return ceil_div(len_q, kQuantBlockRows);
    case QuantGranularity::kPerWarp: return ceil_div(len_q, kQuantWarpRows);
    default: return ceil_div(len_q, 16) * 8;
  }
}

SPARGE_HD constexpr int64_t k_scale_groups(int64_t len_k, QuantGranularity g) {
  return g == QuantGranularity::kPerThread ? ceil_div(len_k, 64) * 4 : ceil_div(len_k, kQuantBlockRows);
}

SPARGE_HD constexpr int64_t padded_len_k(int64_t len_k) { return round_up(len_k, kVPadTokens); }

// First key visible to nobody past query r: keys c < visible_end(r) are visible.
// Returns len_k when not causal. May be <= 0 (bottom-right with Lq > Lk: the row sees nothing).
SPARGE_HD constexpr int64_t visible_end(int64_t r, Causal causal, int64_t len_q, int64_t len_k) {
  if (causal == Causal::kNone) return len_k;
  const int64_t offset = causal == Causal::kBottomRight ? len_k - len_q : 0;
  const int64_t end = r + offset + 1;
  return end < len_k ? end : len_k;
}

struct BlockCounts {
  int64_t nbq = 0;
  int64_t nbk = 0;
};

SPARGE_HD constexpr BlockCounts block_counts(const Shape& s, const BlockConfig& b) {
  return {ceil_div(s.len_q, b.block_q), ceil_div(s.len_k, b.block_k)};
}

// Byte sizes of the stage buffers (QuantizedQKV and BlockIndex) and of the fused op's workspace.
struct StageBuffers {
  QuantizedQKV quantized;
  BlockIndex index;
};

// Bytes needed by carve_stage_buffers (each buffer aligned to kWorkspaceAlign).
size_t stage_buffers_size(const Shape& shape, const BlockConfig& blocks, QuantGranularity g, PvPrecision pv);

// Points every buffer of a StageBuffers into `base` (kWorkspaceAlign-aligned, at least
// stage_buffers_size bytes, on any device: nothing is dereferenced).
StageBuffers carve_stage_buffers(void* base, const Shape& shape, const BlockConfig& blocks, QuantGranularity g,
                                 PvPrecision pv);

// Scratch of the CUDA attention kernel (AttendParams::workspace) for splitting its last round of work
// tiles: when the work tiles (128 query rows of one head) do not fill the last round of the persistent
// grid, that round's tiles are cut along their index lists into pieces that all CTAs run, each piece
// leaving its partial (m, l, acc) in a slot, the last piece of a tile merging them (docs/method.md).
// Layout: kSplitMaxCtas · kSplitWarps int32 arrival counters (one per tail tile and consumer warp),
// then 2 slots per CTA of split_slot_bytes each. A grid of more than kSplitMaxCtas CTAs does not split
// (compute capability 9.0 GPUs have at most 132 SMs).
inline constexpr int64_t kSplitMaxCtas = 132;
inline constexpr int64_t kSplitTileRows = 128;  // query rows of a work tile
inline constexpr int64_t kSplitWarps = 8;       // consumer warps of a CTA, 16 rows each
// A consumer warp's part of a slot: per lane, its accumulators (head_dim_pad / 2 floats) and its rows'
// m and l (4 floats).
SPARGE_HD constexpr int64_t split_warp_floats(int64_t head_dim_pad) { return 32 * (head_dim_pad / 2 + 4); }
SPARGE_HD constexpr int64_t split_slot_bytes(int64_t head_dim_pad) {
  return kSplitWarps * split_warp_floats(head_dim_pad) * 4;
}
SPARGE_HD constexpr int64_t split_counter_bytes() { return round_up(kSplitMaxCtas * kSplitWarps * 4, kWorkspaceAlign); }

// Bytes of that scratch for a request the wgmma kernel may run (fp8 P·V, head_dim <= 128, block_q a
// multiple of 128, block_k 64 or 128) with more work tiles than kSplitMaxCtas (fewer never leave a
// partial last round on a full grid of a 132-SM GPU), else 0. A function of the request only (not of
// the device): about 18 MB at head_dim 128, 9.5 MB at 64.
size_t attend_scratch_bytes(const Shape& shape, const BlockConfig& blocks, PvPrecision pv);

}  // namespace sparge
