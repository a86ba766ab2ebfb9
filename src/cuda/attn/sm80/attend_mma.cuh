// Stage 2 (docs/method.md §2) on warp-level mma.sync: INT8 Q·K^T (m16n8k32.s8), online softmax
// in the log2 domain, the per-warp P·V skip, and P·V in e4m3 (m16n8k32.e4m3, sm_89+; fp32
// accumulators, or f16 ones per 64-key chunk for kFp8Fp16Accum) or fp16 (m16n8k16.f16). Include
// only from the explicit instantiations under ../instantiations/.
//
// One CTA = 4 warps = 64 query rows of one (b, h), all inside one prediction Q block (block_q is a
// multiple of 64). Warp w owns rows [16w, 16w + 16) of the tile: exactly one 16-row P·V group of
// the method, so its skip decision is the reference's. The CTA walks the kept K blocks of its Q
// block; the K tile is the prediction K block (kBlockK keys), double-buffered with cp.async.
// Heads wider than a warp's accumulator budget run several passes over the kept blocks, each
// producing a slice of the output columns (mma_attend_pass_cols in attend_mma.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/status_macros.h"
#include "cuda/attn/lane_rows.cuh"
#include "cuda/attn/sm80/attend_mma.h"
#include "cuda/common/chained_launch.cuh"
#include "cuda/common/device_utils.cuh"
#include "cuda/common/ptx_convert.cuh"
#include "cuda/common/ptx_memory.cuh"
#include "cuda/common/ptx_mma.cuh"
#include "sparge/layout.h"

namespace sparge::cuda {
namespace mma_attend {

inline constexpr float kNegInf = -INFINITY;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr unsigned kFullWarp = 0xffffffffu;
inline constexpr int kMmaN = 8;        // n of every mma shape used here
inline constexpr int kMmaNPairs = 2;   // n8 tiles delivered by one ldmatrix.x4 of B fragments
inline constexpr int kQuadLanes = 4;   // lanes sharing one accumulator row (t = lane % 4)

// Key order: K rows are loaded in natural order, so column n of S n-tile j is key 8j + n of the
// block, and lane t holds columns 2t, 2t + 1 of every tile.
//
// fp16 P·V: the C fragment of S n-tiles 2s, 2s+1 is the A fragment of m16n8k16 k-step s (k 2t,
// 2t+1 and 2t+8, 2t+9), keys in natural order.
//
// fp8 P·V: the A fragment of m16n8k32 step s takes k bytes 4t..4t+3 and 16+4t..16+4t+3 from lane
// t, which packs its columns of S tiles 4s, 4s+1 and 4s+2, 4s+3 (keys 32s + {2t, 2t+1, 8+2t,
// 9+2t} and 16 more). V^T holds every 16-key group in that order (v_key_slot in layout.h), so the
// ldmatrix reads of V^T rows line up with P without moving values between lanes.

// Keys 2x and 2x + 1 have one K scale in every granularity of layout.h, so a lane reads one
// scale for its two columns of a tile.
constexpr bool key_pairs_share_scale() {
  constexpr int kKeysChecked = 4 * kVPadTokens;
  for (const QuantGranularity g : {QuantGranularity::kPerBlock, QuantGranularity::kPerWarp, QuantGranularity::kPerThread}) {
    for (int key = 0; key < kKeysChecked; key += 2) {
      if (k_scale_group(key, g) != k_scale_group(key + 1, g)) return false;
    }
  }
  return true;
}
static_assert(key_pairs_share_scale(), "K scale groups split a key pair; read one scale per column");

template <int kHeadDimPad_, int kBlockK_, PvPrecision kPv_>
struct Config {
  static constexpr int kHeadDimPad = kHeadDimPad_;
  static constexpr int kBlockK = kBlockK_;
  static constexpr PvPrecision kPv = kPv_;
  static constexpr bool kFp8 = pv_is_fp8(kPv);  // P and V in e4m3
  static constexpr bool kFp16Accum = kPv == PvPrecision::kFp8Fp16Accum;
  static constexpr int kVElemBytes = static_cast<int>(v_elem_bytes(kPv));
  static constexpr int kVKeysPerChunk = kCpAsyncBytes / kVElemBytes;

  static constexpr int kQkK = 32;                          // head-dim bytes per int8 mma
  static constexpr int kQkSteps = kHeadDimPad / kQkK;
  static constexpr int kSTiles = kBlockK / kMmaN;          // S per warp: (16, kBlockK) as n8 tiles
  static constexpr int kPvK = kFp8 ? 32 : 16;              // keys per P·V mma
  static constexpr int kPvSteps = kBlockK / kPvK;
  static constexpr int kPvStepBytes = kPvK * kVElemBytes;  // bytes of a V^T row per P·V step
  // kFp16Accum: keys (and P·V steps) summed in one f16 accumulator before the fp32 add.
  static constexpr int kPvAccumKeys = static_cast<int>(kFp16AccumChunkKeys);
  static constexpr int kPvAccumSteps = kPvAccumKeys / kPvK;
  static constexpr int kPvAccumChunks = kBlockK / kPvAccumKeys;
  static constexpr int kPassCols = mma_attend_pass_cols(kHeadDimPad, kBlockK);  // O columns per pass
  static constexpr int kPasses = kHeadDimPad / kPassCols;
  static constexpr int kOTiles = kPassCols / kMmaN;        // O per warp and pass: (16, kPassCols) as n8 tiles
  // O tiles whose block product is accumulated in fresh registers before the rescaled add.
  static constexpr int kPvChunkTiles = 4;
  static constexpr int kPvChunks = kOTiles / kPvChunkTiles;
  // One pass: keep the warp's Q fragments in registers; several: re-read them per block.
  static constexpr bool kQInRegisters = kPasses == 1;

  using QTile = PaddedTile<kMmaAttendRows, kHeadDimPad>;       // (64, D_PAD) int8
  using KTile = PaddedTile<kBlockK, kHeadDimPad>;              // (BLOCK_K, D_PAD) int8, keys in order
  using VTile = PaddedTile<kPassCols, kBlockK * kVElemBytes>;  // (PASS_COLS, BLOCK_K) V^T, keys at v_key_slot
  static constexpr int kScaleBytes = kBlockK * static_cast<int>(sizeof(float));  // (BLOCK_K) K scales, keys in order
  static constexpr int kStages = 2;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQOffset + QTile::kBytes;
  static constexpr int kVOffset = kKOffset + kStages * KTile::kBytes;
  static constexpr int kScaleOffset = kVOffset + kStages * VTile::kBytes;
  static constexpr int kSmemBytes = kScaleOffset + kStages * kScaleBytes;

  static_assert(kHeadDimPad == 64 || kHeadDimPad == 128 || kHeadDimPad == 256, "padded head dim");
  static_assert(kBlockK == 64 || kBlockK == 128, "K block = prediction K block of 64 or 128 keys");
  static_assert(kBlockK <= kMmaAttendThreads, "one thread copies the K scale of one key");
  static_assert(kBlockK % kVPadTokens == 0, "V^T is padded per 64 tokens: a V chunk is all real or all padding");
  static_assert(kSTiles % kMmaNPairs == 0 && kPvChunkTiles % kMmaNPairs == 0, "B fragments come in tile pairs");
  static_assert(kHeadDimPad % kPassCols == 0 && kOTiles % kPvChunkTiles == 0, "whole passes and P·V chunks");
  static_assert(kBlockK % kPvK == 0 && kHeadDimPad % kQkK == 0, "whole mma k-steps");
  static_assert(!kFp16Accum || (kPvK == kFp16AccumStepKeys && kBlockK % kPvAccumKeys == 0),
                "kFp8Fp16Accum: one mma per 32-key step, whole 64-key accumulator chunks");
  static_assert(kQkK == 2 * kCpAsyncBytes && kPvStepBytes == 2 * kCpAsyncBytes,
                "an mma k-step spans two 16-byte ldmatrix columns");
  static_assert(kSmemBytes == mma_attend_smem_bytes(kHeadDimPad, kBlockK, kPv), "host/device smem size agree");
};

// Lane part of the ldmatrix.x4 address of an A fragment (16 rows × 32 bytes): matrices
// (rows 0-7 | 8-15) × (bytes 0-15 | 16-31) in the a[0..3] order of ptx_mma.cuh. Add
// Tile::offset(row0, chunk0) of the fragment's first row and 16-byte column.
template <class Tile>
__device__ __forceinline__ uint32_t a_fragment_lane_offset(int lane) {
  const int matrix = lane / kMmaN;
  return Tile::offset((matrix % 2) * kMmaN + lane % kMmaN, matrix / 2);
}

// Lane part of the ldmatrix.x4 address of the B fragments of two n8 tiles (16 rows n × 32 k-bytes):
// registers {b0, b1} of the first tile, then {b0, b1} of the second.
template <class Tile>
__device__ __forceinline__ uint32_t b_pair_lane_offset(int lane) {
  const int matrix = lane / kMmaN;
  return Tile::offset((matrix / 2) * kMmaN + lane % kMmaN, matrix % 2);
}

template <int kHeadDimPad, int kBlockK, PvPrecision kPv>
__global__ void __launch_bounds__(kMmaAttendThreads) mma_attend_kernel(const __grid_constant__ MmaAttendParams p) {
  using Cfg = Config<kHeadDimPad, kBlockK, kPv>;
  using QTile = typename Cfg::QTile;
  using KTile = typename Cfg::KTile;
  using VTile = typename Cfg::VTile;
  constexpr int kSTiles = Cfg::kSTiles;
  constexpr int kOTiles = Cfg::kOTiles;
  constexpr int kPvChunkTiles = Cfg::kPvChunkTiles;
  constexpr int kQFragSteps = Cfg::kQInRegisters ? Cfg::kQkSteps : 1;
  static_assert(kMmaAttendWarpRows == 16, "one m16 mma row tile per warp");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  if constexpr (Cfg::kFp8) {  // no e4m3 mma: attend_supports rejects these images; an empty body builds faster
    __trap();
    return;
  }
#endif

  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int skipped_per_warp[kMmaAttendWarps];
  wait_for_prior_grids();

  const int thread = threadIdx.x;
  const int warp = thread / kWarpSize;
  const int lane = thread % kWarpSize;
  const int g = lane / kQuadLanes;  // accumulator rows g and g + 8 of the warp's 16
  const int t = lane % kQuadLanes;  // accumulator columns 2t, 2t + 1 of each n8 tile

  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / p.heads_per_kv;
  const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h;
  const int64_t bhk = static_cast<int64_t>(b) * p.heads_kv + hk;
  const int row0 = blockIdx.x * kMmaAttendRows;  // first query row of the CTA
  const int q_block = row0 / p.block_q;
  const int64_t block_entry = bh * p.nbq + q_block;
  const int n_kept = p.len_k > 0 ? p.count[block_entry] : 0;
  const int32_t* kept = n_kept > 0 ? p.index + block_entry * p.nbk : nullptr;  // [n_kept] K block ids

  const int8_t* q_head = p.q + bh * p.len_q * p.head_dim;                     // [Lq, D]
  const int8_t* k_head = n_kept > 0 ? p.k + bhk * p.len_k * p.head_dim : p.k;  // [Lk, D]
  const uint8_t* v_head = n_kept > 0 ? static_cast<const uint8_t*>(p.v) + bhk * p.head_dim * p.len_k_pad * Cfg::kVElemBytes
                                     : static_cast<const uint8_t*>(p.v);  // [D, Lk_pad] bytes
  const float* k_scale_head = n_kept > 0 ? p.k_scale + bhk * p.k_groups : p.k_scale;  // [k_groups]

  const uint32_t smem_base = smem_address(smem);
  const uint32_t q_smem = smem_base + Cfg::kQOffset;
  auto k_smem = [&](int stage) { return smem_base + Cfg::kKOffset + stage * KTile::kBytes; };
  auto v_smem = [&](int stage) { return smem_base + Cfg::kVOffset + stage * VTile::kBytes; };
  auto scale_smem = [&](int stage) {  // (BLOCK_K) fp32
    return reinterpret_cast<const float*>(smem + Cfg::kScaleOffset + stage * Cfg::kScaleBytes);
  };
  const uint32_t q_warp = q_smem + QTile::offset(warp * kMmaAttendWarpRows, 0) + a_fragment_lane_offset<QTile>(lane);
  const uint32_t k_lane = b_pair_lane_offset<KTile>(lane);
  const uint32_t v_lane = b_pair_lane_offset<VTile>(lane);

  // ---- loads: Q once; per pass, K / V^T rows [col0, col0 + PASS_COLS) of kept block i into stage i % 2
  load_tile_async<QTile, kMmaAttendThreads>(q_smem, thread, [&](int row, int chunk, bool& valid) -> const void* {
    const int r = row0 + row;
    valid = r < p.len_q && chunk * kCpAsyncBytes < p.head_dim;
    return valid ? q_head + static_cast<int64_t>(r) * p.head_dim + chunk * kCpAsyncBytes : p.q;
  });
  cp_async_commit();

  auto load_kv = [&](int kept_i, int stage, int col0) {
    const int key0 = kept[kept_i] * kBlockK;
    const int copier = opaque(thread);  // keep the copy addresses out of the loop-carried registers
    load_tile_async<KTile, kMmaAttendThreads>(k_smem(stage), copier, [&](int row, int chunk, bool& valid) -> const void* {
      const int key = key0 + row;
      valid = key < p.len_k && chunk * kCpAsyncBytes < p.head_dim;  // keys >= Lk and d >= D: zeros
      return valid ? k_head + static_cast<int64_t>(key) * p.head_dim + chunk * kCpAsyncBytes : p.k;
    });
    load_tile_async<VTile, kMmaAttendThreads>(v_smem(stage), copier, [&](int row, int chunk, bool& valid) -> const void* {
      const int d = col0 + row;  // V^T row = head-dim channel
      const int key = key0 + chunk * Cfg::kVKeysPerChunk;
      valid = d < p.head_dim && key < p.len_k_pad;  // past Lk_pad (block_k 128): zeros, never garbage
      return valid ? v_head + (static_cast<int64_t>(d) * p.len_k_pad + key) * Cfg::kVElemBytes : p.v;
    });
    if (copier < kBlockK) {  // the K scale of key `copier`, through the granularity's group map
      const int key = key0 + copier;
      const bool valid = key < p.len_k;
      cp_async_4_zfill(smem_address(scale_smem(stage) + copier),
                       valid ? k_scale_head + k_scale_group(key, p.granularity) : p.k_scale, valid);
    }
  };

  // ---- per-thread row data: rows g and g + 8 of the warp's 16 ------------------------------------
  const int warp_row0 = row0 + warp * kMmaAttendWarpRows;
  const bool warp_active = warp_row0 < p.len_q;  // some row of this P·V group exists
  const LaneRows rows = lane_rows(p, bh, warp_row0 + g);
  const bool (&row_valid)[2] = rows.valid;
  const float (&q_scale_row)[2] = rows.q_scale;
  const int (&col_end)[2] = rows.col_end;  // keys c < col_end are visible (and < Lk)
  const float pvthreshd = head_pvthreshd(p, h);
  const float* v_scale_head = p.v_scale + bhk * p.head_dim;  // [D]
  int skipped = 0;  // P·V units this warp skipped (counted in pass 0)

#pragma unroll 1
  for (int pass = 0; pass < Cfg::kPasses; ++pass) {
    const int col0 = pass * Cfg::kPassCols;  // first O column of this pass
    if (pass > 0) __syncthreads();  // every warp is done with both stages of the previous pass
    if (n_kept > 0) load_kv(0, 0, col0);
    cp_async_commit();

    float m[2] = {kNegInf, kNegInf};  // running max (log2 units), per row
    float l[2] = {0.0f, 0.0f};  // running sum per row: fp8, the row's p8; fp16, p of this lane's columns
    float o_acc[kOTiles][4];          // (16, PASS_COLS): running Σ fmt(p · 448) · v_q
#pragma unroll
    for (int dt = 0; dt < kOTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[dt][e] = 0.0f;
    }

    // Q fragments, (16, 32) int8 per k-step, when they stay in registers.
    uint32_t q_frag[kQFragSteps][4];
    if constexpr (Cfg::kQInRegisters) {
      cp_async_wait<1>();  // the Q group
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < Cfg::kQkSteps; ++kk) ldmatrix_x4(q_frag[kk], q_warp + QTile::offset(0, 2 * kk));
    }

    for (int kept_i = 0; kept_i < n_kept; ++kept_i) {
      const int stage = kept_i % Cfg::kStages;
      cp_async_wait<0>();
      __syncthreads();  // block kept_i is visible to all; nobody still reads the other stage
      if (kept_i + 1 < n_kept) load_kv(kept_i + 1, stage ^ 1, col0);
      cp_async_commit();
      if (!warp_active) continue;

      const uint32_t k_stage = k_smem(stage) + k_lane;
      const uint32_t v_stage = v_smem(stage) + v_lane;
      // This lane's columns 2t + c of S tile j hold key lane_key + 8j + c of the block.
      const int lane_key = kept[kept_i] * kBlockK + 2 * t;

      // K scale of the two key columns this lane holds in each S tile (one group: key_pairs_share_scale).
      const float* lane_scales = scale_smem(stage) + 2 * t;
      float k_scale_col[kSTiles];
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) k_scale_col[j] = lane_scales[j * kMmaN];

      // ---- 1. S = Q K^T: (16, BLOCK_K) int32, column n of tile j = key 8j + n -----------------
      int32_t s_acc[kSTiles][4];
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s_acc[j][e] = 0;
      }
#pragma unroll
      for (int kk = 0; kk < Cfg::kQkSteps; ++kk) {
        uint32_t a[4];
        if constexpr (Cfg::kQInRegisters) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = q_frag[kk][e];
        } else {
          ldmatrix_x4(a, q_warp + QTile::offset(0, 2 * kk));
        }
#pragma unroll
        for (int jp = 0; jp < kSTiles; jp += kMmaNPairs) {
          uint32_t bk[4];
          ldmatrix_x4(bk, k_stage + KTile::offset(jp * kMmaN, 2 * kk));
          mma_m16n8k32_s8(s_acc[jp], a, bk[0], bk[1]);
          mma_m16n8k32_s8(s_acc[jp + 1], a, bk[2], bk[3]);
        }
      }

      // s = float(dot) · (q_scale · k_scale), −inf where invisible; row maxima over the quad.
      const int visible[2] = {col_end[0] - lane_key, col_end[1] - lane_key};  // per row, in key offsets
      float s[kSTiles][4];
      float m_blk[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e / 2;
          const float scale = q_scale_row[i] * k_scale_col[j];
          s[j][e] = j * kMmaN + e % 2 < visible[i] ? static_cast<float>(s_acc[j][e]) * scale : kNegInf;
          m_blk[i] = fmaxf(m_blk[i], s[j][e]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int mask = 1; mask < kQuadLanes; mask *= 2) {
          m_blk[i] = fmaxf(m_blk[i], __shfl_xor_sync(kFullWarp, m_blk[i], mask));
        }
      }

      // ---- 2. the P·V filter: skip when every valid row of the warp is negligible --------------
      bool negligible = true;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        negligible = negligible && (!row_valid[i] || m_blk[i] == kNegInf || m[i] - m_blk[i] > pvthreshd);
      }
      if (__all_sync(kFullWarp, negligible)) {
        skipped += pass == 0;
        continue;
      }

      // ---- 3. online softmax update ----------------------------------------------------------
      float alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float m_new = fmaxf(m[i], m_blk[i]);
        alpha[i] = m_new == kNegInf ? 1.0f : fast_exp2(m[i] - m_new);
        m[i] = m_new;
      }
      if constexpr (Cfg::kFp8) {  // p8 as e4m3 codes (p_code): s becomes 1.5 · 2^23 + code
        float c[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) c[i] = fmaf(-(m[i] == kNegInf ? 0.0f : m[i]), kPCodeSlope, 1.0f);
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = p_code(s[j][e], kPCodeSlope, c[e / 2]);
        }
      } else {  // p = exp2(s − m_new); l sums this lane's columns of p (reduced over the quad at the end)
        float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = e / 2;
            s[j][e] = s[j][e] == kNegInf ? 0.0f : fast_exp2(s[j][e] - m[i]);  // now p
            row_sum[i] += s[j][e];
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + row_sum[i];
      }

      // P in the P·V format as A fragments, straight from the S accumulators (see "Key order").
      uint32_t p_frag[Cfg::kPvSteps][4];
#pragma unroll
      for (int ks = 0; ks < Cfg::kPvSteps; ++ks) {
        if constexpr (Cfg::kFp8) {
          const int j = 4 * ks;  // S tiles 4ks .. 4ks+3 → keys 32ks .. 32ks+31
          p_frag[ks][0] = pack_low_bytes(s[j][0], s[j][1], s[j + 1][0], s[j + 1][1]);
          p_frag[ks][1] = pack_low_bytes(s[j][2], s[j][3], s[j + 1][2], s[j + 1][3]);
          p_frag[ks][2] = pack_low_bytes(s[j + 2][0], s[j + 2][1], s[j + 3][0], s[j + 3][1]);
          p_frag[ks][3] = pack_low_bytes(s[j + 2][2], s[j + 2][3], s[j + 3][2], s[j + 3][3]);
        } else {
          const int j = 2 * ks;  // S tiles 2ks, 2ks+1 → keys 16ks .. 16ks+15
          p_frag[ks][0] = pack_f16x2(s[j][0] * kPScale, s[j][1] * kPScale);
          p_frag[ks][1] = pack_f16x2(s[j][2] * kPScale, s[j][3] * kPScale);
          p_frag[ks][2] = pack_f16x2(s[j + 1][0] * kPScale, s[j + 1][1] * kPScale);
          p_frag[ks][3] = pack_f16x2(s[j + 1][2] * kPScale, s[j + 1][3] * kPScale);
        }
      }

      if constexpr (Cfg::kFp8) {  // l = l · α + Σ p8, summed on the tensor core as P · ones (fp32)
        float lsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // every column: the sum of row g (0, 1) / g + 8 (2, 3)
#pragma unroll
        for (int ks = 0; ks < Cfg::kPvSteps; ++ks) mma_m16n8k32_e4m3(lsum, p_frag[ks], kE4m3OnesX4, kE4m3OnesX4);
#pragma unroll
        for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + lsum[2 * i];
      }

      // ---- P·V: per chunk of O tiles, the block's product in fresh registers, then
      // acc = acc · α + Σ_c fmt(p · 448) · v_q (the method's order) ---------------------------
#pragma unroll
      for (int chunk = 0; chunk < Cfg::kPvChunks; ++chunk) {
        float pv[kPvChunkTiles][4];  // (16, 8 · kPvChunkTiles) fp32
#pragma unroll
        for (int dt = 0; dt < kPvChunkTiles; ++dt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) pv[dt][e] = 0.0f;
        }
        // B fragments of O tiles dp, dp + 1 of this chunk at P·V step ks.
        auto load_v = [&](uint32_t (&bv)[4], int ks, int dp) {
          ldmatrix_x4(bv, v_stage + VTile::offset((chunk * kPvChunkTiles + dp) * kMmaN, 2 * ks));
        };
        if constexpr (Cfg::kFp16Accum) {
          // Per 64-key chunk and pair of O tiles fresh f16 accumulators, one mma per 32-key step
          // (rounded to f16 by the mma), then pv += their fp32 value; |partial sums| <= 64 · 448 ·
          // 2.25 < 65504. A pair at a time keeps 4 accumulator registers live, not 8.
#pragma unroll
          for (int kc = 0; kc < Cfg::kPvAccumChunks; ++kc) {
#pragma unroll
            for (int dp = 0; dp < kPvChunkTiles; dp += kMmaNPairs) {
              uint32_t pv16[kMmaNPairs][2] = {};  // O tiles dp, dp + 1: f16x2 of rows g | g + 8
#pragma unroll
              for (int step = 0; step < Cfg::kPvAccumSteps; ++step) {
                const int ks = kc * Cfg::kPvAccumSteps + step;
                uint32_t bv[4];
                load_v(bv, ks, dp);
                mma_m16n8k32_e4m3_f16(pv16[0], p_frag[ks], bv[0], bv[1]);
                mma_m16n8k32_e4m3_f16(pv16[1], p_frag[ks], bv[2], bv[3]);
              }
#pragma unroll
              for (int j = 0; j < kMmaNPairs; ++j) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                  const float2 c = __half22float2(*reinterpret_cast<const __half2*>(&pv16[j][i]));
                  pv[dp + j][2 * i] += c.x;
                  pv[dp + j][2 * i + 1] += c.y;
                }
              }
            }
          }
        } else {
#pragma unroll
          for (int ks = 0; ks < Cfg::kPvSteps; ++ks) {
#pragma unroll
            for (int dp = 0; dp < kPvChunkTiles; dp += kMmaNPairs) {
              uint32_t bv[4];
              load_v(bv, ks, dp);
              if constexpr (Cfg::kFp8) {
                mma_m16n8k32_e4m3(pv[dp], p_frag[ks], bv[0], bv[1]);
                mma_m16n8k32_e4m3(pv[dp + 1], p_frag[ks], bv[2], bv[3]);
              } else {
                mma_m16n8k16_f16(pv[dp], p_frag[ks], bv[0], bv[1]);
                mma_m16n8k16_f16(pv[dp + 1], p_frag[ks], bv[2], bv[3]);
              }
            }
          }
        }
#pragma unroll
        for (int dt = 0; dt < kPvChunkTiles; ++dt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float& acc = o_acc[chunk * kPvChunkTiles + dt][e];
            acc = acc * alpha[e / 2] + pv[dt][e];
          }
        }
      }
    }
    cp_async_wait<0>();  // nothing of this pass may still be in flight

    // ---- 4. epilogue of the pass: o = acc · v_scale / l (l in units of p · 448), 0 when l = 0; rows
    // >= Lq never stored. The division is one correctly rounded reciprocal per row times the product
    // (≤ 1 ulp from the reference's quotient).
    float inv_denom[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if constexpr (!Cfg::kFp8) {
#pragma unroll
        for (int mask = 1; mask < kQuadLanes; mask *= 2) l[i] += __shfl_xor_sync(kFullWarp, l[i], mask);
        l[i] *= kPScale;  // now in units of p · 448, as the fp8 modes' sum of p8
      }
      inv_denom[i] = l[i] == 0.0f ? 0.0f : 1.0f / l[i];
    }
#pragma unroll
    for (int dt = 0; dt < kOTiles; ++dt) {  // o_acc becomes o
      const int d = col0 + dt * kMmaN + 2 * t;
      const float2 vs = d < p.head_dim ? *reinterpret_cast<const float2*>(v_scale_head + d) : make_float2(0.0f, 0.0f);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        o_acc[dt][2 * i] = l[i] == 0.0f ? 0.0f : o_acc[dt][2 * i] * vs.x * inv_denom[i];
        o_acc[dt][2 * i + 1] = l[i] == 0.0f ? 0.0f : o_acc[dt][2 * i + 1] * vs.y * inv_denom[i];
      }
    }
    auto store_rows = [&](auto* o_base) {
      using T = std::remove_pointer_t<decltype(o_base)>;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (!row_valid[i]) continue;
        T* o_row = o_base + b * p.o_stride_batch + h * p.o_stride_head + (warp_row0 + g + i * kMmaN) * p.o_stride_token;
#pragma unroll
        for (int dt = 0; dt < kOTiles; ++dt) {
          const int d = col0 + dt * kMmaN + 2 * t;
          if (d < p.head_dim) store_output_pair(o_row + d, o_acc[dt][2 * i], o_acc[dt][2 * i + 1]);  // D even
        }
      }
    };
    switch (p.o_dtype) {
      case DType::kFloat16: store_rows(static_cast<__half*>(p.o)); break;
      case DType::kBFloat16: store_rows(static_cast<__nv_bfloat16*>(p.o)); break;
      case DType::kFloat32: store_rows(static_cast<float*>(p.o)); break;
    }
    if (pass == 0 && p.lse != nullptr && t == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (!row_valid[i]) continue;
        const int64_t at = bh * p.len_q + warp_row0 + g + i * kMmaN;
        p.lse[at] = l[i] == 0.0f ? kNegInf
                                 : __fadd_rn(__fmul_rn(kLn2, m[i] + (log2f(l[i]) - kLog2PScale)), p.lse_shift[at]);
      }
    }
  }

  // ---- P·V statistics: one atomic per counter and CTA ---------------------------------------------
  if (p.stats != nullptr) {
    if (lane == 0) skipped_per_warp[warp] = skipped;
    __syncthreads();
    if (thread == 0) {
      const int active_warps = min(kMmaAttendWarps, (p.len_q - row0 + kMmaAttendWarpRows - 1) / kMmaAttendWarpRows);
      const long long units = static_cast<long long>(n_kept) * active_warps;
      long long skipped_total = 0;
      for (int w = 0; w < kMmaAttendWarps; ++w) skipped_total += skipped_per_warp[w];
      auto* stats = reinterpret_cast<unsigned long long*>(p.stats);
      if (units > 0) atomicAdd(stats + kStatPvUnits, static_cast<unsigned long long>(units));
      if (skipped_total > 0) atomicAdd(stats + kStatPvSkipped, static_cast<unsigned long long>(skipped_total));
    }
  }
}

}  // namespace mma_attend

template <int kHeadDimPad, int kBlockK, PvPrecision kPv>
Status launch_mma_attend(const MmaAttendParams& params, dim3 grid, cudaStream_t stream, bool chained) {
  using Cfg = mma_attend::Config<kHeadDimPad, kBlockK, kPv>;
  constexpr auto kernel = &mma_attend::mma_attend_kernel<kHeadDimPad, kBlockK, kPv>;
  static const std::string name = "mma_attend_kernel<D_PAD=" + std::to_string(kHeadDimPad) +
                                  ", BLOCK_K=" + std::to_string(kBlockK) + ", " + pv_name(kPv) + ">";
  static const std::string smem_what = name + ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize)";
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<kernel>(Cfg::kSmemBytes, smem_what.c_str()));
  return launch_kernel(name.c_str(), chained, kernel, grid, kMmaAttendThreads, Cfg::kSmemBytes, stream, params);
}

}  // namespace sparge::cuda
