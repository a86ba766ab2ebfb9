// Stage 2 (docs/method.md §2) on Hopper: TMA loads of Q, K and V^T tiles through an mbarrier
// pipeline, INT8 Q·K^T on wgmma (m64nBLOCK_Kk32.s32.s8.s8, both operands from shared memory),
// online softmax in the log2 domain with the per-16-row-group P·V skip, and P·V on wgmma
// (m64nDk32.f32.e4m3.e4m3, P from registers). Include only from instantiations/attend_wgmma_*.cu.
//
// Persistent: one CTA per SM loops over work tiles, a work tile = 128 query rows of one (b, h),
// inside one prediction Q block (block_q % 128 == 0). Warpgroup 0 produces: per work tile, one
// thread loads Q into one of two buffers, then the K and V^T tiles of the kept blocks in order into
// kWgmmaAttendStages stages (with kMultiBlock, two or four kept 64-key blocks per 128- or 256-key
// tile), each stage with its tile keys (first keys and K scales, Config::kTileKeysOffset); the stage
// ring runs on across work tiles, so the next work tile's Q, K and V^T land while this one finishes.
// Warpgroups 1 and 2 consume 64 rows each; warp w of a consumer warpgroup owns rows
// [16w, 16w + 16) of them, exactly one P·V group of the method.
//
// Schedule: the consumer warpgroups take turns issuing their wgmma (ping-pong, named barriers 1
// and 2), so one's softmax overlaps the other's products. With kOverlap (one kept block per tile,
// all but D_PAD = BLOCK_K = 128) a turn issues S of block i + 1 and P·V of block i, and the softmax of block i + 1 runs
// while P·V of block i is in flight; otherwise a turn runs P·V of block i to completion, then
// issues S of block i + 1 (with kPvBesideS it issues both and waits for P·V only). ptxas
// serializes every wgmma of the kernel when one stays in flight across a divergent branch, or when
// a wgmma.fence is not in the wgmma's basic block: keep it so (check the C75xx infos of
// -Xptxas=-v).
//
// P·V skip: a warp decides for its group like the reference; a skipping warp feeds P = 0 and
// α = 1, which leaves its m, l and acc unchanged. The P·V wgmma is always issued, so a skip saves
// the softmax work but not the tensor work: on the overlap schedules a branch around it would
// serialize the pipeline, and on the ping-pong one a named-barrier vote that skipped it when all
// 4 warps skipped cost more than it saved (removing it: D128 pairs +5.9 % dense, +6.7 % topk 0.5,
// kernel alone, same run, session 6, with 9 % of the groups skipping in the dense case).
//
// Softmax: P · 448 is formed directly as its e4m3 code (docs/method.md §2, step 3): one fma per
// score, 8 · (s − m_new) + 126, then per pair of scores one F2IP (rounded to an integer, saturated to
// a byte, packed) into an A fragment (pack_p_codes); no MUFU per score. Same run, kernel alone,
// session 22: +4.6-5.5 % at D128, +7.3-7.8 % at D64 for one fma, a conversion to fp16 with relu per
// two and a byte permute per four against the former two fmas and three permutes per four; session 30:
// the F2IPs instead of the fp16 conversions and the permute (bit-identical), D64 +2.7 % dense, +3.2 %
// topk 0.5, D128 L32k dense +1.7 %. l sums the e4m3 values on
// the tensor core: the last P·V chain has 8 more B rows, e4m3 ones stored after each V^T tile, so
// its last n-tile is P · ones (no separate wgmma).
// On a fully visible block the row maximum is max(dot) · scale (bit-identical to max(float(dot) ·
// scale)) and each dot becomes a float by one integer add (biased_dot, no I2FP); the ping-pong
// schedule reduces row maxima as trees. Slower: the code in fixed point straight from the dot,
// max(⌊(dot · rn(8 · scale · 2^32) + (126.5 − 8 · m_new) · 2^32) / 2^32⌋, 0), one IMAD.HI with a 64-bit
// addend and one max per score instead of the add and the former two fmas (as accurate; kernel alone
// 24-29 % slower in every case, D64 and D128, session 22: IMAD.HI occupies the FMA pipe several cycles).
//
// Key order: K is loaded in natural order, so S column n is key n of the block; lane t holds
// columns 8j + 2t + {0, 1} of n-tile j. V^T comes from quantize with the keys of every 16-key
// group in v_key_slot order (layout.h), which is exactly where the 8-bit A fragment of a P·V
// k-step wants them: lane t packs its own P values (p_fragments), with no lane exchange.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "common/status_macros.h"
#include "cuda/attn/lane_rows.cuh"
#include "cuda/attn/sm90/attend_wgmma.h"
#include "cuda/attn/work_order.h"
#include "cuda/common/chained_launch.cuh"
#include "cuda/common/device_utils.cuh"
#include "cuda/common/ptx_convert.cuh"
#include "cuda/common/ptx_memory.cuh"
#include "cuda/common/ptx_tma.cuh"
#include "cuda/common/ptx_wgmma.cuh"
#include "sparge/layout.h"

namespace sparge::cuda {

// What the kernel reads: the tensor maps (built on the host per launch) and the mma.sync
// kernel's parameters (the same fields mean the same things).
struct WgmmaAttendParams {
  CUtensorMap tmap_q;  // Q [B·Hq, Lq, D] int8, box (D_PAD, 128, 1), swizzle D_PAD bytes
  CUtensorMap tmap_k;  // K [B·Hkv, Lk, D] int8, box (D_PAD, BLOCK_K, 1), swizzle D_PAD bytes
  CUtensorMap tmap_v;  // V^T [B·Hkv, D, Lk_pad] e4m3, box (BLOCK_K, D_PAD, 1), swizzle BLOCK_K bytes
  CUtensorMap tmap_o;  // with kTmaStores: O [B, Hq, Lq, D] 2-byte, box (64, 16, 1, 1), swizzle 128 bytes
  MmaAttendParams a;
  int32_t q_tiles = 0;  // ceil(Lq / 128): work tiles per (b, h)
  int32_t tiles = 0;    // q_tiles · Hq · B
  // o is fp16 / bf16 with every row on a 16-byte boundary (and, with Config::kTmaStores, described by
  // tmap_o): a warp's 16 rows leave through shared memory, by TMA stores or in 16-byte stores (else
  // pairs of elements are stored from the accumulator fragments).
  bool o_rows_16b = false;
  // Split tail (no causal mask): the work tiles [split_first, tiles), fewer than the grid, are cut
  // into pieces: each work tile is split_ctas units, CTA c < split_ctas runs units
  // [c · rem, (c + 1) · rem) of the tail (rem = tiles − split_first < split_ctas, so at most two pieces,
  // j = 0, 1, in partial-result slot 2c + j). split_first = tiles: no split.
  int32_t split_first = 0;
  int32_t split_ctas = 0;
  int32_t* split_arrivals = nullptr;  // [rem][kSplitWarps]: pieces done per tail tile and consumer warp, zeroed
  float* split_partial = nullptr;     // [2 · split_ctas] slots (layout.h): a piece's m, l and acc per warp
  CausalOrder causal;                 // with a causal mask: the order of the work tiles (work_order.h)
};
static_assert(sizeof(WgmmaAttendParams) <= 4096, "the parameters stay within 4 KB (every launch copies them)");

namespace wgmma_attend {

inline constexpr float kNegInf = -INFINITY;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr unsigned kFullWarp = 0xffffffffu;
inline constexpr int kQuadLanes = 4;
inline constexpr int kNTile = 8;  // columns of one accumulator n-tile
// Registers per thread after setmaxnreg; the pool is the launch's 168 · 384. The producer warpgroup's
// 24 hold thread 0's loop only: one instruction more on its other threads' path made ptxas spill,
// in the consumers' code too (bench/RESULTS.md, session 35); 40 / 232 compiles that spill-free, but
// the D128 kernels ran 0.6-1.2 % slower on 232.
inline constexpr int kProducerRegs = 24;
inline constexpr int kConsumerRegs = 240;
inline constexpr int kPingPongBarrier0 = 1;  // named barriers 1, 2 (0: __syncthreads)

template <int kHeadDimPad_, int kBlockK_, bool kMultiBlock_>
struct Config {
  static constexpr int kHeadDimPad = kHeadDimPad_;
  static constexpr int kBlockK = kBlockK_;  // keys of one tile (one step of the main loop)
  // kMultiBlock: a tile of kBlockK = 128 (256) keys holds two (four) kept 64-key blocks, not necessarily
  // adjacent (block_k = 64). Four at D_PAD = 64, where the kernel is issue-bound and a step's fixed
  // work (index list and K scales, filter votes, turn, acc update) is then spread over 256 keys: same
  // run, kernel alone (session 24, 11 rounds): dense L32k +7.3 % / +7.0 % (two cases), topk 0.5 +7.1 %,
  // topk 0.25 +5.6 %, causal +5.5 %, B2 L8k dense +6.8 %, topk 0.5 +5.7 %, B4 L2k dense +1.2 %,
  // causal +0.0 % (three blocks: +3.1 to +6.4 % at L32k, -0.8 / +3.7 % at B2 L8k, -0.7 / -1.8 % at B4
  // L2k). At D_PAD = 128 three blocks were 13-15 % slower in every case (ptxas spills ~170 bytes, in
  // the turn, where S (96 registers) is issued beside acc).
  static constexpr bool kMultiBlock = kMultiBlock_;
  static constexpr int kBlockKeys = kMultiBlock ? static_cast<int>(kQuantBlockRows) : kBlockK;  // keys of one index-list entry
  static constexpr int kBlocksPerStep = kBlockK / kBlockKeys;        // index-list entries per tile
  // V^T tiles as TMA writes them: (D_PAD, kVRowBytes), one per kept block.
  static constexpr int kVRowBytes = kBlockKeys;
  static constexpr int kStages = kWgmmaAttendStages;
  static constexpr int kConsumerWarps = kWgmmaAttendConsumerGroups * 4;
  static constexpr int kQkSteps = kHeadDimPad / kWgmmaK8Bit;  // k-steps of Q·K^T over the head dim
  static constexpr int kPvSteps = kBlockK / kWgmmaK8Bit;      // k-steps of P·V over the keys
  static constexpr int kSRegs = kBlockK / 2;                  // S per thread: (64, BLOCK_K) / 128
  static constexpr int kORegs = kHeadDimPad / 2;              // O per thread: (64, D_PAD) / 128
  static constexpr int kSTiles = kBlockK / kNTile;
  static constexpr int kHalves = kBlockK / kQuantBlockRows;  // 64-key halves of a tile (K scale groups)
  // P·V output columns per wgmma chain: D_PAD, halved when (64, 128) scores and (64, 128) fresh
  // products would not fit the register budget next to the accumulators.
  static constexpr int kPvChunkCols = kHeadDimPad == 128 && kBlockK >= 128 ? 64 : kHeadDimPad;
  static constexpr int kPvChunks = kHeadDimPad / kPvChunkCols;
  // Softmax of block i + 1 overlapping P·V of block i: needs (64, D_PAD) fresh products, two P
  // fragments and S next to the accumulators; not within budget for D_PAD = BLOCK_K = 128. Pairs
  // run on the ping-pong schedule only (its per-block skip logic is written there).
  static constexpr bool kOverlap = kPvChunks == 1 && !kMultiBlock;
  static constexpr int kPvChunkRegs = kPvChunkCols / 2;
  // The last chunk's chain also writes P's row sums: kSumRows more columns (one n-tile), from the
  // kSumRows rows of ones after each V^T tile.
  static constexpr int kSumRows = kNTile;
  static constexpr int kPvRegs = kPvChunkRegs + kSumRows / 2;
  // Ping-pong turn that issues P·V and S of the next tile back to back and adds the products after
  // the turn (P·V always issued, as on every schedule).
  // Same run, kernel alone (session 5): D64 pairs +3.6 % dense, +1.9 % topk 0.5. D128 pairs (two
  // 64-column chunks, both in flight with S) lost 0.6 % dense and 3 % at B2 L8k, so they keep
  // waiting for each chunk inside the turn.
  // Not with 256-key tiles: S (128 registers) in flight beside P·V spills 212 bytes.
  static constexpr bool kPvBesideS = kMultiBlock && kPvChunks == 1 && kBlockK != 256;
  // Row maxima as pairwise trees (on the int32 dots where the block is fully visible): +2% on the
  // ping-pong-only D128/bk128, −1% to −4% on the overlap path (same run), so there only.
  static constexpr bool kTreeMax = !kOverlap;
  // Steps of those trees on the int32 dots: 3-input (one VIMNMX3 each) on pairs, bit-identical (D128
  // pairs, kernel alone, same run, four runs of session 11: dense L32k +1.4 %, topk 0.5 +1.8 %, causal
  // +1.3 %, B2 L8k +0.7 % on average, against a noise of about 1 %); 2-input on the one-block
  // kernel, where the 3-input form made ptxas spill 8 bytes in <128, 128>.
  static constexpr int kDotMaxArity = kMultiBlock ? 3 : 2;
  // A warp that skips a pair tile forms its codes too, instead of branching around them, and zeroes them
  // with the skipped blocks' fragments (outputs bit-identical). Without the branch
  // ptxas interleaves the code fmas with the filter's votes. Same runs, kernel alone (session 23, two
  // runs): D128 pairs +0.3 to +2.7 % in all nine cases; D64 pairs -1.3 to +0.2 % (issue-bound, where
  // the skipping warps' codes cost issue slots), so D128 only.
  static constexpr bool kCodesAlways = kMultiBlock && kHeadDimPad == 128;
  static constexpr int kOTiles = kHeadDimPad / kNTile;

  static constexpr int kQBuffers = kWgmmaAttendQBuffers;
  static constexpr int kQBytes = kWgmmaAttendRows * kHeadDimPad;  // (128, D_PAD) int8, rows of D_PAD bytes
  static constexpr int kKBytes = kBlockK * kHeadDimPad;           // (BLOCK_K, D_PAD) int8
  // A stage's V^T: kBlocksPerStep tiles (D_PAD, kVRowBytes) e4m3 as TMA writes them, each followed by
  // kSumRows rows of e4m3 ones (the B rows of P·V's row-sum columns, see pv_chain), on the swizzle
  // atom grid.
  static constexpr int kVTileBytes = kHeadDimPad * kVRowBytes;
  static constexpr int kVTileStride =
      (kVTileBytes + kSumRows * kVRowBytes + kSwizzleAlign - 1) / kSwizzleAlign * kSwizzleAlign;
  static constexpr int kVLoadBytes = kBlocksPerStep * kVTileBytes;  // TMA bytes per stage
  static constexpr int kVBytes = kBlocksPerStep * kVTileStride;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQOffset + kQBuffers * kQBytes;
  static constexpr int kVOffset = kKOffset + kStages * kKBytes;
  static constexpr int kBarOffset = kVOffset + kStages * kVBytes;
  // mbarriers: q_full[kQBuffers], q_empty[kQBuffers], k_full[kStages], v_full[kStages], empty[kStages]
  static constexpr int kBarBytes = 8;
  // After the mbarriers in their slot, per stage, written by the producer before the stage's K barrier
  // completes: the first key of each 64-key part of the tile (int32 [4], kAbsentKey for a missing
  // block of a multi-block tile) and the part's K scales ([part][lane group] fp32: group t is lane
  // t's columns 8j + 2t, 8j + 2t + 1; one group per part where the granularity has no lane groups).
  // The consumers read a tile's keys and scales from here instead of the index list and k_scale:
  // D64 four-block main loop 82 instructions per step shorter, D128 pairs 36 (session 30).
  static constexpr int kKeyGroups = 4;
  static constexpr int kTileKeysOffset = kBarOffset + 128;
  static constexpr int kTileKeysScaleOffset = 16;
  static constexpr int kTileKeysBytes = kTileKeysScaleOffset + kHalves * kKeyGroups * 4;
  // After the mbarriers in their slot: per consumer warp, whether it merges the split work tile of its
  // CTA's first / second piece (set by the piece, read after the tile loop).
  static constexpr int kMergeFlagsOffset = kBarOffset + 512;
  // 2-byte output rows on 16-byte boundaries (o_rows_16b) leave through shared memory: a consumer warp's
  // 16 rows, written by stmatrix, then stored by TMA (kTmaStores) or read back in 16-byte chunks and
  // stored in 16-byte stores. TMA stores where ptxas leaves the main loop's registers as they were:
  // D_PAD = BLOCK_K = 128 (pairs and one 128-key block), kernel alone +0.3 to +1.6 % at L32k and B2 L8k,
  // +3.4 % at B4 L2k (session 25). In the four-block D64 kernel they cost the split form's main loop nine
  // spill loads / stores per step (kernel alone −2 %, same session); the D64 and <128, 64> kernels keep the
  // 16-byte stores.
  static constexpr bool kTmaStores = wgmma_attend_tma_stores(kHeadDimPad, kBlockK);
  static constexpr int kORowsOffset = kBarOffset + 1024;
  // TMA stores: boxes of 64 columns, rows of 128 bytes, chunk j of row r at chunk j ^ (r % 8) (the
  // 128-byte swizzle), each box on the swizzle atom grid.
  static constexpr int kOBoxCols = 64;
  static constexpr int kOBoxRowBytes = 2 * kOBoxCols;
  static constexpr int kOBoxes = kHeadDimPad / kOBoxCols;
  static constexpr int kOBoxBytes = 16 * kOBoxRowBytes;
  // 16-byte stores: rows padded by 16 bytes (conflict-free 16-byte reads).
  using ORows = PaddedTile<16, 2 * kHeadDimPad>;
  static constexpr int kOStageBytes = kTmaStores ? kOBoxes * kOBoxBytes : ORows::kBytes;
  // A consumer warp's copy of its work tile's V scales (fp32 [D_PAD], zero past D), copied at the tile's
  // start and read by the epilogue.
  static constexpr int kVScaleOffset = kORowsOffset + kConsumerWarps * kOStageBytes;
  static constexpr int kVScaleBytes = kHeadDimPad * 4;
  static constexpr int kSmemBytes = 1024 + kVScaleOffset + kConsumerWarps * kVScaleBytes;

  static_assert(kHeadDimPad == 64 || kHeadDimPad == 128, "rows of one 64- or 128-byte swizzle span");
  static_assert(kVRowBytes == 64 || kVRowBytes == 128, "V^T rows of one 64- or 128-byte swizzle span");
  static_assert(kBlockK == 64 || kBlockK == 128 || (kMultiBlock && kBlockK == 256), "tiles of 64, 128 or 256 keys");
  static_assert(kQBytes % kSwizzleAlign == 0 && kKBytes % kSwizzleAlign == 0 && kVBytes % kSwizzleAlign == 0,
                "every tile starts on the swizzle atom grid");
  static_assert((2 * kQBuffers + 3 * kStages) * kBarBytes <= kTileKeysOffset - kBarOffset &&
                    kTileKeysOffset + kStages * kTileKeysBytes <= kMergeFlagsOffset &&
                    kMergeFlagsOffset + 2 * kConsumerWarps * 4 <= kBarOffset + 1024,
                "barriers, tile keys and merge flags fit their slot");
  static_assert(kHalves <= kTileKeysScaleOffset / 4 && k_scale_group(kQuantBlockRows, QuantGranularity::kPerThread) ==
                                                             kKeyGroups,
                "a tile's first keys fit before its scales; four K lane groups per 64 keys");
  static_assert(kSmemBytes == wgmma_attend_smem_bytes(kHeadDimPad, kBlockK, kBlocksPerStep),
                "host/device smem size agree");
  static_assert(kPvChunkCols * kVRowBytes % kSwizzleAlign == 0, "P·V chunks start on the swizzle atom grid");
  static_assert(!kMultiBlock || (kBlockK >= 128 && !kOverlap), "multi-block tiles on the ping-pong schedule");
  static_assert(kVRowBytes % kVPadTokens == 0, "a V^T tile never straddles the zero padding partially");
  static_assert(kSmemBytes <= kMaxDynamicSmemBytes, "within the dynamic shared memory of an sm_90 CTA");
  static_assert(!kTmaStores ||
                    (kORowsOffset % kSwizzleAlign == 0 && kOBoxBytes % kSwizzleAlign == 0 && kHeadDimPad % kOBoxCols == 0),
                "output boxes on the swizzle atom grid");
  static_assert(kSplitWarps == kConsumerWarps && kSplitTileRows == kWgmmaAttendRows,
                "the split scratch of layout.h holds this kernel's work tiles");
};

// A Q·K^T dot of a fully visible tile as the float 1.5 · 2^23 + dot (|dot| <= 128 · 128 · 128 < 2^22,
// so the bits are 0x4B400000 + dot): one integer add instead of an I2FP conversion (a slow pipe).
// The softmax takes the 1.5 · 2^23 · k back out in its fma's addend, rounded once to fp32: at most
// about 0.75 · scale off in the log2 domain, under one unit of the integer dot (INT8 rounding moves a
// dot by far more).
__device__ __forceinline__ float biased_dot(int32_t dot) { return __int_as_float(dot + 0x4B400000); }

// One P·V chain into fresh registers pv[0, kCols / 2) (64 × kCols fp32): k-step ks multiplies P
// fragment pf[ks] (registers) by the V^T tile of descriptor desc_of(ks). kCols = 72 or 136: the
// last 8 rows of the B tile are e4m3 ones, so n-tile kCols / 8 − 1 holds the row sums of P beside
// P·V (pv[kCols / 2 − 4]: row g, pv[kCols / 2 − 2]: row g + 8). The caller fences and commits.
template <int kCols, int kSteps, int kRegs, typename DescOf>
__device__ __forceinline__ void pv_chain(float (&pv)[kRegs], const uint32_t (&pf)[kSteps][4], DescOf desc_of) {
  static_assert(kCols / 2 <= kRegs, "the chain's accumulators fit pv");
  auto& d = *reinterpret_cast<float(*)[kCols / 2]>(&pv);
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) {
    const uint64_t desc = desc_of(ks);
    if constexpr (kCols == 64) {
      if (ks == 0) {
        wgmma_m64n64k32_f32_e4m3_rs_first(d, pf[ks], desc);
      } else {
        wgmma_m64n64k32_f32_e4m3_rs(d, pf[ks], desc, 1);
      }
    } else if constexpr (kCols == 72) {
      if (ks == 0) {
        wgmma_m64n72k32_f32_e4m3_rs_first(d, pf[ks], desc);
      } else {
        wgmma_m64n72k32_f32_e4m3_rs(d, pf[ks], desc, 1);
      }
    } else if constexpr (kCols == 128) {
      if (ks == 0) {
        wgmma_m64n128k32_f32_e4m3_rs_first(d, pf[ks], desc);
      } else {
        wgmma_m64n128k32_f32_e4m3_rs(d, pf[ks], desc, 1);
      }
    } else {
      static_assert(kCols == 136, "P·V chains of 64 or 128 columns, with or without the row sums");
      if (ks == 0) {
        wgmma_m64n136k32_f32_e4m3_rs_first(d, pf[ks], desc);
      } else {
        wgmma_m64n136k32_f32_e4m3_rs(d, pf[ks], desc, 1);
      }
    }
  }
}

// The maximum of a[0, kN) as a tree of 3-input steps (one VIMNMX3 each), in place.
template <int kN>
__device__ __forceinline__ int32_t tree_max3(int32_t (&a)[kN]) {
  int n = kN;  // values left; every trip count is known at compile time
#pragma unroll
  for (int level = 0; level < kN; ++level) {
    if (n > 1) {
      int kept = 0;
#pragma unroll
      for (int i = 0; i < kN; i += 3) {
        if (i < n) {
          const int32_t x = i + 2 < n ? __vimax3_s32(a[i], a[i + 1], a[i + 2]) : i + 1 < n ? max(a[i], a[i + 1]) : a[i];
          a[kept++] = x;
        }
      }
      n = kept;
    }
  }
  return a[0];
}

// out[row][hh] = max of v over the thread's columns of row g (row 0) / g + 8 (row 1) in 64-key half hh,
// as a tree of kArity-input steps (chains of logarithmic length instead of one chain per row and half;
// kArity = 3: int32 only).
template <int kArity, int kSRegs, int kHalves, typename T>
__device__ __forceinline__ void row_half_max(const T (&v)[kSRegs], T (&out)[2][kHalves]) {
  constexpr int kTiles = kSRegs / 4;
  constexpr int kTilesPerHalf = kTiles / kHalves;
  if constexpr (kArity == 3) {
    static_assert(std::is_same_v<T, int32_t>, "3-input steps on int32 only");
#pragma unroll
    for (int row = 0; row < 2; ++row) {
#pragma unroll
      for (int hh = 0; hh < kHalves; ++hh) {
        int32_t a[2 * kTilesPerHalf];
#pragma unroll
        for (int j = 0; j < 2 * kTilesPerHalf; ++j) a[j] = v[4 * (hh * kTilesPerHalf + j / 2) + 2 * row + j % 2];
        out[row][hh] = tree_max3(a);
      }
    }
  } else {
    static_assert(kArity == 2, "trees of 2- or 3-input steps");
    auto max2 = [](T a, T b) {
      if constexpr (std::is_same_v<T, float>) {
        return fmaxf(a, b);
      } else {
        return max(a, b);
      }
    };
    T a[2][kTiles];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
#pragma unroll
      for (int row = 0; row < 2; ++row) a[row][j] = max2(v[4 * j + 2 * row], v[4 * j + 2 * row + 1]);
    }
#pragma unroll
    for (int w = 1; w < kTilesPerHalf; w *= 2) {
#pragma unroll
      for (int j = 0; j < kTiles; j += 2 * w) {
#pragma unroll
        for (int row = 0; row < 2; ++row) a[row][j] = max2(a[row][j], a[row][j + w]);
      }
    }
#pragma unroll
    for (int row = 0; row < 2; ++row) {
#pragma unroll
      for (int hh = 0; hh < kHalves; ++hh) out[row][hh] = a[row][hh * kTilesPerHalf];
    }
  }
}

// First key of a missing second block of a pair: beyond every length (kMaxLength < 2^30), so all
// its columns are masked.
inline constexpr int kAbsentKey = 1 << 30;

// A work tile: query tile q_tile (128 rows) of head bh = b · Hq + h, and its prediction Q block's
// index list.
struct WorkTile {
  int row0;             // first query row
  int h;
  int b;
  int64_t bh;           // b · Hq + h
  int64_t bhk;          // its kv head, b · Hkv + h / (Hq / Hkv)
  const int32_t* kept;  // the kept K blocks, ascending [n_kept]
  int n_kept;
};

__device__ __forceinline__ WorkTile work_tile(const MmaAttendParams& p, int bh, int q_tile) {
  WorkTile wt;
  wt.row0 = q_tile * kWgmmaAttendRows;
  wt.h = bh % p.heads_q;
  wt.b = bh / p.heads_q;
  wt.bh = bh;
  wt.bhk = static_cast<int64_t>(wt.b) * p.heads_kv + wt.h / p.heads_per_kv;
  const int64_t q_block = wt.bh * p.nbq + wt.row0 / p.block_q;
  wt.kept = p.index + q_block * p.nbk;
  wt.n_kept = p.count[q_block];
  return wt;
}

// A piece of a split work tile runs steps [⌊unit_lo · S / U⌋, ⌊unit_hi · S / U⌋) of the tile's S steps
// (U = split_ctas units per tile), so the pieces of a tile cover its index list once, in order.
__device__ __forceinline__ void restrict_to_piece(WorkTile& wt, const WgmmaAttendParams& params, int unit_lo,
                                                  int unit_hi, int blocks_per_step) {
  const int64_t steps = (wt.n_kept + blocks_per_step - 1) / blocks_per_step;
  const int lo = blocks_per_step * static_cast<int>(unit_lo * steps / params.split_ctas);
  const int hi = min(wt.n_kept, blocks_per_step * static_cast<int>(unit_hi * steps / params.split_ctas));
  wt.kept += lo;
  wt.n_kept = max(hi - lo, 0);
}

// A piece of a split tail work tile (WgmmaAttendParams::split_first): tail tile `tile` (its index
// from split_first), units [unit_lo, unit_hi) of its split_ctas, partial-result slot `slot`.
struct Piece {
  int tile;
  int slot;
  int unit_lo;
  int unit_hi;
};

// The CTAs whose units cover tail tile u: [first, last].
__device__ __forceinline__ void piece_ctas(const WgmmaAttendParams& params, int u, int* first, int* last) {
  const int rem = params.tiles - params.split_first;
  *first = u * params.split_ctas / rem;
  *last = ((u + 1) * params.split_ctas - 1) / rem;
}

// Slot n of this CTA's sequence of work tiles (bh, q_tile); kEmpty slots are skipped, kEnd ends it.
// Without a causal mask every work tile costs about the same: CTA c takes tiles c, c + G, c + 2G, ...
// (G = gridDim.x, tile t = query tile t % q_tiles of head t / q_tiles); the tiles of a split tail come
// as kPiece slots (with *piece). With one, causal_slot (work_order.h) orders them by cost.
template <bool kSplit>
__device__ __forceinline__ Slot cta_slot(const WgmmaAttendParams& params, int n, int* bh, int* q_tile, Piece* piece) {
  const int c = static_cast<int>(blockIdx.x);
  const int grid = static_cast<int>(gridDim.x);
  const int q_tiles = params.q_tiles;
  if (params.a.causal == Causal::kNone) {
    int t = c + n * grid;
    if (t < (kSplit ? params.split_first : params.tiles)) {
      *bh = t / q_tiles;
      *q_tile = t % q_tiles;
      return Slot::kTile;
    }
    if (!kSplit || c >= params.split_ctas) return Slot::kEnd;
    const int rem = params.tiles - params.split_first;
    const int units = params.split_ctas;
    const int j = n - params.split_first / grid;  // 0, 1: this CTA's first or second piece
    const int begin = c * rem;                    // this CTA's units of the tail: [begin, begin + rem)
    const int u = begin / units + j;
    if (j > 1 || u * units >= begin + rem) return Slot::kEnd;
    t = params.split_first + u;
    *bh = t / q_tiles;
    *q_tile = t % q_tiles;
    if (piece != nullptr) {
      piece->tile = u;
      piece->slot = 2 * c + j;
      piece->unit_lo = max(begin - u * units, 0);
      piece->unit_hi = min(begin + rem - u * units, units);
    }
    return Slot::kPiece;
  }
  return causal_slot(params.causal, grid, c, n, bh, q_tile);
}

// A consumer warp's part of partial-result slot `slot`: chunk i of lane l (4 floats) at [i][l], chunks
// [0, kORegs / 4) the accumulators, the last one (m[0], m[1], l[0], l[1]).
template <int kHeadDimPad>
__device__ __forceinline__ float4* piece_part(const WgmmaAttendParams& params, int slot, int consumer_warp, int lane) {
  constexpr int64_t kWarpFloats = split_warp_floats(kHeadDimPad);
  return reinterpret_cast<float4*>(params.split_partial + (slot * kSplitWarps + consumer_warp) * kWarpFloats) + lane;
}

// A piece of a split work tile, this warp's part: stores its running max m, sum l and accumulators acc
// in its slot and counts itself done. Returns whether it was the tile's last piece to finish (that warp
// then merges the tile: merge_pieces).
template <int kHeadDimPad, int kORegs>
__device__ __forceinline__ bool publish_piece(const WgmmaAttendParams& params, const Piece& piece, int consumer_warp,
                                              int lane, const float (&m)[2], const float (&l)[2],
                                              const float (&acc)[kORegs]) {
  constexpr int kAccChunks = kORegs / 4;
  static_assert(kORegs % 4 == 0 && split_warp_floats(kHeadDimPad) == kWarpSize * 4 * (kAccChunks + 1),
                "a slot holds a warp's accumulators, m and l");
  float4* mine = piece_part<kHeadDimPad>(params, piece.slot, consumer_warp, lane);
#pragma unroll
  for (int i = 0; i < kAccChunks; ++i) {
    mine[i * kWarpSize] = make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
  }
  mine[kAccChunks * kWarpSize] = make_float4(m[0], m[1], l[0], l[1]);
  __threadfence();  // the slot is visible before the count
  __syncwarp();
  int before = 0;
  if (lane == 0) before = atomicAdd(params.split_arrivals + piece.tile * kSplitWarps + consumer_warp, 1);
  before = __shfl_sync(kFullWarp, before, 0);
  int first = 0;
  int last = 0;
  piece_ctas(params, piece.tile, &first, &last);
  return before == last - first;
}

// Merges this warp's part of the pieces of split tail tile u (all published): m = the largest of their
// running maxima m_i, l and acc each Σ x_i · 2^(m_i − m). A piece that saw nothing (m_i = −inf, l_i = 0)
// adds nothing.
template <int kHeadDimPad, int kORegs>
__device__ __forceinline__ void merge_pieces(const WgmmaAttendParams& params, int u, int consumer_warp, int lane,
                                             float (&m)[2], float (&l)[2], float (&acc)[kORegs]) {
  constexpr int kAccChunks = kORegs / 4;
  m[0] = m[1] = kNegInf;
  l[0] = l[1] = 0.0f;
#pragma unroll
  for (int e = 0; e < kORegs; ++e) acc[e] = 0.0f;
  __threadfence();  // the pieces' slots are read after their counts
  int first = 0;
  int last = 0;
  piece_ctas(params, u, &first, &last);
  const int rem = params.tiles - params.split_first;
  for (int c = first; c <= last; ++c) {
    const int slot = 2 * c + (u == c * rem / params.split_ctas ? 0 : 1);
    const float4* part = piece_part<kHeadDimPad>(params, slot, consumer_warp, lane);
    const float4 ml = __ldcg(part + kAccChunks * kWarpSize);
    const float m_part[2] = {ml.x, ml.y};
    const float l_part[2] = {ml.z, ml.w};
    float f_acc[2];
    float f_part[2];
#pragma unroll
    for (int i_row = 0; i_row < 2; ++i_row) {
      const float m_max = fmaxf(m[i_row], m_part[i_row]);
      const bool seen = m_max != kNegInf;
      f_acc[i_row] = seen ? fast_exp2(m[i_row] - m_max) : 1.0f;
      f_part[i_row] = seen ? fast_exp2(m_part[i_row] - m_max) : 0.0f;
      m[i_row] = m_max;
      l[i_row] = l[i_row] * f_acc[i_row] + l_part[i_row] * f_part[i_row];
    }
#pragma unroll
    for (int i = 0; i < kAccChunks; ++i) {
      const float4 x = __ldcg(part + i * kWarpSize);
      const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i_row = e / 2;  // accumulator 4i + e belongs to row g (e < 2) or g + 8
        acc[4 * i + e] = acc[4 * i + e] * f_acc[i_row] + xs[e] * f_part[i_row];
      }
    }
  }
}

// kSplit: the launch splits its last round of work tiles (WgmmaAttendParams::split_first); compiled
// apart, so that the kernel of every other launch carries none of that code.
template <int kHeadDimPad, int kBlockK, bool kMultiBlock, bool kSplit>
__global__ void __launch_bounds__(kWgmmaAttendThreads, 1)
    wgmma_attend_kernel(const __grid_constant__ WgmmaAttendParams params) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // wgmma / setmaxnreg exist on sm_90a only; attend.cu dispatches here only on such builds
#else
  using Cfg = Config<kHeadDimPad, kBlockK, kMultiBlock>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kHalves = Cfg::kHalves;
  const MmaAttendParams& p = params.a;

  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem = (smem_address(smem_raw) + kSwizzleAlign - 1) & ~static_cast<uint32_t>(kSwizzleAlign - 1);
  constexpr int kQBuffers = Cfg::kQBuffers;
  auto q_smem = [&](int buf) { return smem + Cfg::kQOffset + buf * Cfg::kQBytes; };
  auto k_smem = [&](int stage) { return smem + Cfg::kKOffset + stage * Cfg::kKBytes; };
  auto v_smem = [&](int stage) { return smem + Cfg::kVOffset + stage * Cfg::kVBytes; };
  const uint32_t bars = smem + Cfg::kBarOffset;
  auto q_full = [&](int buf) { return bars + buf * Cfg::kBarBytes; };
  auto q_empty = [&](int buf) { return bars + (kQBuffers + buf) * Cfg::kBarBytes; };
  auto k_full = [&](int stage) { return bars + (2 * kQBuffers + stage) * Cfg::kBarBytes; };
  auto v_full = [&](int stage) { return bars + (2 * kQBuffers + kStages + stage) * Cfg::kBarBytes; };
  auto empty = [&](int stage) { return bars + (2 * kQBuffers + 2 * kStages + stage) * Cfg::kBarBytes; };
  auto tile_keys_smem = [&](int stage) { return smem + Cfg::kTileKeysOffset + stage * Cfg::kTileKeysBytes; };
  auto smem_ptr = [&](uint32_t addr) { return smem_raw + (addr - smem_address(smem_raw)); };  // generic pointer
  auto tile_keys_ptr = [&](int stage) { return smem_ptr(tile_keys_smem(stage)); };
  // Tiles of the main loop (kept blocks, or pairs of them) of a work tile with n kept blocks.
  auto steps_of = [](int n) { return (n + Cfg::kBlocksPerStep - 1) / Cfg::kBlocksPerStep; };

  const int thread = threadIdx.x;
  const int warp = thread / kWarpSize;
  const int lane = thread % kWarpSize;
  const int warpgroup = thread / kWarpgroupThreads;

  if (thread == 0) {
    for (int buf = 0; buf < kQBuffers; ++buf) {
      mbarrier_init(q_full(buf), 1);
      mbarrier_init(q_empty(buf), Cfg::kConsumerWarps);
    }
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(k_full(s), 2);  // the TMA's expect_tx and the tile keys' cp.async
      mbarrier_init(v_full(s), 1);
      // Every consumer thread releases the stage (its own reads of the tile keys; racecheck counts an
      // arrival as releasing the arriving thread's accesses only).
      mbarrier_init(empty(s), Cfg::kConsumerWarps * kWarpSize);
    }
    fence_barrier_init();
  }
  // The e4m3 ones after every V^T tile of every stage (TMA never writes them).
  constexpr int kSumWords = Cfg::kSumRows * Cfg::kVRowBytes / 4;
  for (int i = thread; i < kStages * Cfg::kBlocksPerStep * kSumWords; i += kWgmmaAttendThreads) {
    const uint32_t at = v_smem(0) + (i / kSumWords) * Cfg::kVTileStride + Cfg::kVTileBytes + (i % kSumWords) * 4;
    reinterpret_cast<uint32_t*>(smem_ptr(at))[0] = kE4m3OnesX4;
  }
  // Flag j of consumer warp w (merge_flags(w)[j]), found from the shared base where used (not kept in a register).
  auto merge_flags = [&](int w) {
    return reinterpret_cast<uint32_t*>(smem_ptr(smem + Cfg::kMergeFlagsOffset)) + 2 * w;
  };
  if (kSplit && thread < 2 * Cfg::kConsumerWarps) merge_flags(0)[thread] = 0;
  fence_proxy_async_shared();  // the ones are read by wgmma (async proxy)
  wait_for_prior_grids();      // the set-up above touches shared memory only
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer: per work tile r of the CTA, Q into buffer r % kQBuffers, then K / V^T of tile i
    // (kept block i, or kept blocks 2i and 2i + 1) and its tile keys into stage (step0 + i) % kStages,
    // step0 counting the steps of the CTA's earlier work tiles -----------------------------------------
    setmaxnreg_dec<kProducerRegs>();
    if (thread == 0) {
      // The tile keys of tile i (Config: kTileKeysOffset) into stage, from the index-list entries kb of its
      // TMA boxes (kBlocksPerStep of them; entry kb[part] = kept[min(kBlocksPerStep · i + part, n_kept − 1)]):
      // each part's first key by a store, its K scales by cp.async (16 bytes where a part's four lane groups
      // are contiguous and aligned; zeros for a part past Lk, e.g. the second half of a 128-key block), then
      // an arrival on the stage's K barrier once they landed. Few instructions: the producer warp shares its
      // SMSP with two consumer warps.
      const bool lane_groups = p.granularity == QuantGranularity::kPerThread;
      const bool scales_16b = lane_groups && (reinterpret_cast<uintptr_t>(p.k_scale) % kCpAsyncBytes) == 0;
      const int k_blocks = static_cast<int>(ceil_div(p.len_k, kQuantBlockRows));
      auto write_tile_keys = [&](int stage, int i, int n_kept, const int (&kb)[Cfg::kBlocksPerStep],
                                 const float* k_scale_head) {
        int keys[4] = {};
#pragma unroll
        for (int hh = 0; hh < kHalves; ++hh) {
          int block64;
          if constexpr (kMultiBlock) {
            block64 = kb[hh];  // a missing block reads its tile's last (finite) one
            keys[hh] = kHalves * i + hh < n_kept ? block64 * Cfg::kBlockKeys : kAbsentKey;
          } else {
            block64 = kb[0] * kHalves + hh;
            keys[hh] = block64 * static_cast<int>(kQuantBlockRows);
          }
          const bool valid = block64 < k_blocks;
          const float* src = k_scale_head + (valid ? block64 * (lane_groups ? Cfg::kKeyGroups : 1) : 0);
          const uint32_t dst = tile_keys_smem(stage) + Cfg::kTileKeysScaleOffset + hh * Cfg::kKeyGroups * 4;
          if (scales_16b) {
            cp_async_16_zfill(dst, src, valid);
          } else {
            cp_async_4_zfill(dst, src, valid);
            if (lane_groups) {
#pragma unroll
              for (int grp = 1; grp < Cfg::kKeyGroups; ++grp) cp_async_4_zfill(dst + 4 * grp, src + grp, valid);
            }
          }
        }
        *reinterpret_cast<int4*>(tile_keys_ptr(stage)) = make_int4(keys[0], keys[1], keys[2], keys[3]);
        cp_async_mbarrier_arrive_noinc(k_full(stage));
      };

      tma_prefetch_descriptor(&params.tmap_q);
      tma_prefetch_descriptor(&params.tmap_k);
      tma_prefetch_descriptor(&params.tmap_v);
      int step0 = 0;
      int r = 0;  // work tiles so far
      for (int n = 0;; ++n) {
        int bh = 0;
        int q_tile = 0;
        Piece piece;
        const Slot slot = cta_slot<kSplit>(params, n, &bh, &q_tile, &piece);
        if (slot == Slot::kEnd) break;
        if (slot == Slot::kEmpty) continue;
        WorkTile wt = work_tile(p, bh, q_tile);
        if (kSplit && slot == Slot::kPiece) {
          restrict_to_piece(wt, params, piece.unit_lo, piece.unit_hi, Cfg::kBlocksPerStep);
        }
        const int buf = r % kQBuffers;
        if (r >= kQBuffers) mbarrier_wait(q_empty(buf), (r / kQBuffers - 1) & 1);
        mbarrier_arrive_expect_tx(q_full(buf), Cfg::kQBytes);
        tma_load_3d(q_smem(buf), &params.tmap_q, q_full(buf), 0, wt.row0, static_cast<int>(wt.bh));
        const int n_steps = steps_of(wt.n_kept);
        const float* k_scale_head = p.k_scale + wt.bhk * p.k_groups;  // [k_groups]
        for (int i = 0; i < n_steps; ++i) {
          const int stage = (step0 + i) % kStages;
          const int round = (step0 + i) / kStages;
          if (round > 0) mbarrier_wait(empty(stage), (round - 1) & 1);
          constexpr int kParts = Cfg::kBlocksPerStep;
          int kb[kParts];  // a lone last block of a pair also fills the second half (finite data; it is masked)
#pragma unroll
          for (int part = 0; part < kParts; ++part) kb[part] = wt.kept[min(kParts * i + part, wt.n_kept - 1)];
          // Before the expect_tx arrival (a release), which orders the keys' plain stores before the phase.
          write_tile_keys(stage, i, wt.n_kept, kb, k_scale_head);
          mbarrier_arrive_expect_tx(k_full(stage), Cfg::kKBytes);
          mbarrier_arrive_expect_tx(v_full(stage), Cfg::kVLoadBytes);
#pragma unroll
          for (int part = 0; part < kParts; ++part) {
            const int key0 = kb[part] * Cfg::kBlockKeys;
            tma_load_3d(k_smem(stage) + part * Cfg::kKBytes / kParts, &params.tmap_k, k_full(stage), 0, key0,
                        static_cast<int>(wt.bhk));
            tma_load_3d(v_smem(stage) + part * Cfg::kVTileStride, &params.tmap_v, v_full(stage), key0, 0,
                        static_cast<int>(wt.bhk));
          }
        }
        step0 += n_steps;
        ++r;
      }
    }
    return;
  }

  // ---- consumers -----------------------------------------------------------------------------------
  setmaxnreg_inc<kConsumerRegs>();
  const int consumer_group = warpgroup - 1;  // 0, 1: rows [64c, 64c + 64) of the CTA
  const int group_warp = warp % 4;           // rows [16w, 16w + 16) of those
  const int consumer_warp = 4 * consumer_group + group_warp;  // its slots of the per-warp shared buffers
  const int g = lane / kQuadLanes;
  const int t = lane % kQuadLanes;

  // Ping-pong: the two consumer warpgroups take turns issuing their wgmma (named barriers 1, 2), so
  // one's softmax runs while the other's products occupy the tensor cores. Both take the same number
  // of turns per work tile, so the turns alternate on across work tiles.
  const int my_turn = kPingPongBarrier0 + consumer_group;
  const int other_turn = kPingPongBarrier0 + (1 - consumer_group);
  if (consumer_group == 1) named_barrier_arrive(kPingPongBarrier0, 2 * kWarpgroupThreads);  // group 0 starts

  // The epilogue of a work tile (or of a merged split one): o = acc · v_scale / l (l sums p · 448), 0 when
  // l = 0, rows >= Lq never stored; the LSE where asked for. The tile's V scales are in this warp's
  // v_scale_smem slot.
  const uint32_t v_scale_smem = smem + Cfg::kVScaleOffset + consumer_warp * Cfg::kVScaleBytes;
  // Copies the V scales of kv head bhk into v_scale_smem (cp.async, 4 bytes each: any alignment; zero past D).
  auto copy_v_scales = [&](int64_t bhk) {
    const float* v_scale_head = p.v_scale + bhk * p.head_dim;  // [D]
#pragma unroll
    for (int d = lane; d < kHeadDimPad; d += kWarpSize) {
      const bool valid = d < p.head_dim;
      cp_async_4_zfill(v_scale_smem + 4 * d, valid ? v_scale_head + d : v_scale_head, valid);
    }
    cp_async_commit();
  };
  auto finish_tile = [&](float (&acc)[Cfg::kORegs], const float (&m)[2], const float (&l)[2], int b, int h, int64_t bh,
                         int warp_row0, const bool (&row_valid)[2]) {
      float inv_denom[2];
#pragma unroll
      for (int i_row = 0; i_row < 2; ++i_row) inv_denom[i_row] = l[i_row] == 0.0f ? 0.0f : 1.0f / l[i_row];
#pragma unroll
      for (int dt = 0; dt < Cfg::kOTiles; ++dt) {
        const int d = dt * kNTile + 2 * t;
        const float2 vs = ld_shared_8(v_scale_smem + 4 * d);
#pragma unroll
        for (int i_row = 0; i_row < 2; ++i_row) {
          float& x0 = acc[4 * dt + 2 * i_row];
          float& x1 = acc[4 * dt + 2 * i_row + 1];
          x0 = l[i_row] == 0.0f ? 0.0f : x0 * vs.x * inv_denom[i_row];
          x1 = l[i_row] == 0.0f ? 0.0f : x1 * vs.y * inv_denom[i_row];
        }
      }
      // Register m of the stmatrix.x4 step at n-tile dt (even): rows g + 8 · (m % 2), n-tile dt + m / 2.
      auto stmatrix_word = [&](auto* o_base, int dt, int m) {
        using T = std::remove_pointer_t<decltype(o_base)>;
        return pack_output_pair<T>(acc[4 * dt + 2 * m], acc[4 * dt + 2 * m + 1]);
      };
      // TMA stores: the warp's 16 rows go to its staging boxes by stmatrix (matrix m of a step: rows
      // 8 · (m % 2) + [0, 8), n-tile dt + m / 2, swizzled), and one lane stores the boxes with TMA; rows
      // >= Lq and columns >= D lie outside the tensor map and are not written. The previous tile's store
      // must have read the boxes before they are written again.
      auto store_rows_tma = [&](auto* o_base) {
        using T = std::remove_pointer_t<decltype(o_base)>;
        const uint32_t boxes = smem + Cfg::kORowsOffset + opaque(consumer_warp) * Cfg::kOStageBytes;
        const int lane_here = opaque(lane);  // lane- and warp-derived offsets computed here, not kept across the tile loop
        const int matrix = lane_here / 8;
        const uint32_t lane_row = boxes + (lane_here % 8 + 8 * (matrix % 2)) * Cfg::kOBoxRowBytes;
        // Chunk dt % 8 + m / 2 of the box (dt even) lands at (dt % 8) ^ (m / 2) ^ (row % 8).
        const int chunk_xor = (matrix / 2) ^ (lane_here % 8);
        if (lane_here == 0) bulk_wait_group_read_all();
        __syncwarp();
#pragma unroll
        for (int dt = 0; dt < Cfg::kOTiles; dt += 2) {
          const uint32_t r[4] = {stmatrix_word(o_base, dt, 0), stmatrix_word(o_base, dt, 1),
                                 stmatrix_word(o_base, dt, 2), stmatrix_word(o_base, dt, 3)};
          constexpr int kChunksPerBox = Cfg::kOBoxRowBytes / kCpAsyncBytes;  // 16-byte chunks of a box row
          stmatrix_x4(lane_row + (dt / kChunksPerBox) * Cfg::kOBoxBytes + ((dt % kChunksPerBox) ^ chunk_xor) * kCpAsyncBytes, r);
        }
        fence_proxy_async_shared();
        __syncwarp();
        if (lane_here == 0) {
#pragma unroll
          for (int box = 0; box < Cfg::kOBoxes; ++box) {
            tma_store_4d(&params.tmap_o, boxes + box * Cfg::kOBoxBytes, box * Cfg::kOBoxCols, warp_row0, h, b);
          }
          bulk_commit_group();
        }
      };
      // 2-byte outputs on 16-byte rows: the warp's 16 rows go to shared memory by stmatrix (matrix m of
      // a step: rows 8 · (m % 2) + [0, 8), n-tile dt + m / 2), come back in 16-byte chunks and leave in
      // 16-byte stores, whole 32-byte sectors (a fragment pair store writes 4 bytes of each of 8 rows).
      auto store_rows_16b = [&](auto* o_base) {
        using T = std::remove_pointer_t<decltype(o_base)>;
        using ORows = typename Cfg::ORows;
        const uint32_t rows_smem = smem + Cfg::kORowsOffset + consumer_warp * Cfg::kOStageBytes;
        const int lane_here = opaque(lane);  // lane-derived offsets computed here, not kept across the tile loop
        const int matrix = lane_here / 8;
        const uint32_t lane_row = rows_smem + ORows::offset(lane_here % 8 + 8 * (matrix % 2), matrix / 2);
#pragma unroll
        for (int dt = 0; dt < Cfg::kOTiles; dt += 2) {
          const uint32_t r[4] = {stmatrix_word(o_base, dt, 0), stmatrix_word(o_base, dt, 1),
                                 stmatrix_word(o_base, dt, 2), stmatrix_word(o_base, dt, 3)};
          stmatrix_x4(lane_row + ORows::offset(0, dt), r);
        }
        __syncwarp();
        constexpr int kElemsPerChunk = kCpAsyncBytes / sizeof(T);
#pragma unroll
        for (int i = 0; i < ORows::kChunks / kWarpSize; ++i) {
          const int id = i * kWarpSize + lane_here;
          const int warp_row = id / ORows::kRowChunks;
          const int chunk = id % ORows::kRowChunks;
          const int row = warp_row0 + warp_row;
          const int d = chunk * kElemsPerChunk;
          if (row < p.len_q && d < p.head_dim) {
            const int64_t at =
                b * p.o_stride_batch + h * p.o_stride_head + static_cast<int64_t>(row) * p.o_stride_token + d;
            *reinterpret_cast<uint4*>(o_base + at) = ld_shared_16(rows_smem + ORows::offset(warp_row, chunk));
          }
        }
        __syncwarp();  // the rows are read before the next work tile writes them
      };
      auto store_rows_staged = [&](auto* o_base) {
        if constexpr (Cfg::kTmaStores) {
          store_rows_tma(o_base);
        } else {
          store_rows_16b(o_base);
        }
      };
      auto store_rows = [&](auto* o_base) {
        using T = std::remove_pointer_t<decltype(o_base)>;
#pragma unroll
        for (int i_row = 0; i_row < 2; ++i_row) {
          if (!row_valid[i_row]) continue;
          T* o_row = o_base + b * p.o_stride_batch + h * p.o_stride_head +
                     static_cast<int64_t>(warp_row0 + g + i_row * kNTile) * p.o_stride_token;
#pragma unroll
          for (int dt = 0; dt < Cfg::kOTiles; ++dt) {
            const int d = dt * kNTile + 2 * t;
            if (d < p.head_dim) store_output_pair(o_row + d, acc[4 * dt + 2 * i_row], acc[4 * dt + 2 * i_row + 1]);
          }
        }
      };
      switch (p.o_dtype) {
        case DType::kFloat16:
          params.o_rows_16b ? store_rows_staged(static_cast<__half*>(p.o)) : store_rows(static_cast<__half*>(p.o));
          break;
        case DType::kBFloat16:
          params.o_rows_16b ? store_rows_staged(static_cast<__nv_bfloat16*>(p.o))
                            : store_rows(static_cast<__nv_bfloat16*>(p.o));
          break;
        case DType::kFloat32: store_rows(static_cast<float*>(p.o)); break;
      }
      if (p.lse != nullptr && t == 0) {
#pragma unroll
        for (int i_row = 0; i_row < 2; ++i_row) {
          if (!row_valid[i_row]) continue;
          const int64_t at = bh * p.len_q + warp_row0 + g + i_row * kNTile;
          p.lse[at] = l[i_row] == 0.0f
                          ? kNegInf
                          : __fadd_rn(__fmul_rn(kLn2, m[i_row] + (log2f(l[i_row]) - kLog2PScale)), p.lse_shift[at]);
        }
      }

  };

  unsigned long long pv_units = 0;    // P·V units of this warp's active work tiles (statistics)
  unsigned long long pv_skipped = 0;  // of those, skipped
  int step0 = 0;                      // steps of this CTA's earlier work tiles (the stage ring's position)
  int r = 0;                          // work tiles so far
  for (int n = 0;; ++n) {
    int bh_index = 0;
    int q_tile = 0;
    Piece piece;
    const Slot slot = cta_slot<kSplit>(params, n, &bh_index, &q_tile, &piece);
    if (slot == Slot::kEnd) break;
    if (slot == Slot::kEmpty) continue;
    WorkTile wt = work_tile(p, bh_index, q_tile);
    if (kSplit && slot == Slot::kPiece) {
      restrict_to_piece(wt, params, piece.unit_lo, piece.unit_hi, Cfg::kBlocksPerStep);
    }
    const int buf = r % kQBuffers;  // Q buffer of this work tile
    const int h = wt.h;
    const int b = wt.b;
    const int64_t bh = wt.bh;
    const int64_t bhk = wt.bhk;
    const int n_kept = wt.n_kept;
    const int n_steps = steps_of(n_kept);
    auto stage_of = [&](int i) { return (step0 + i) % kStages; };
    auto parity_of = [&](int i) { return static_cast<uint32_t>((step0 + i) / kStages) & 1; };
    const int warp_row0 = wt.row0 + consumer_group * kWgmmaM + group_warp * 16;
    const bool warp_active = warp_row0 < p.len_q;  // some row of this P·V group exists

    copy_v_scales(bhk);  // on their way while the tile runs

    const LaneRows rows = lane_rows(p, bh, warp_row0 + g);
    const bool (&row_valid)[2] = rows.valid;
    const float (&q_scale_row)[2] = rows.q_scale;
    const int (&col_end)[2] = rows.col_end;  // keys c < col_end are visible (and < Lk)
    const int col_end_min = min(col_end[0], col_end[1]);
    const float pvthreshd = head_pvthreshd(p, h);

    // First key (kAbsentKey for a missing block of a multi-block tile) and this lane's K scale of each
    // 64-key part of tile i, from the stage's tile keys (after its K barrier completed). A part starts on
    // a multiple of 64, so lane t's columns 8j + 2t, 8j + 2t + 1 share one group in every granularity.
    const int k_lane_group = p.granularity == QuantGranularity::kPerThread ? t : 0;
    auto read_tile_keys = [&](int i, int (&k0)[kHalves], float (&ks)[kHalves]) {
      const uint8_t* at = tile_keys_ptr(stage_of(i));
      const int32_t* keys = reinterpret_cast<const int32_t*>(at);
      const float* scales = reinterpret_cast<const float*>(at + Cfg::kTileKeysScaleOffset) + k_lane_group;
#pragma unroll
      for (int hh = 0; hh < kHalves; ++hh) {
        k0[hh] = keys[hh];
        ks[hh] = scales[hh * Cfg::kKeyGroups];
      }
    };

    const uint64_t q_desc = wgmma_desc(q_smem(buf) + consumer_group * kWgmmaM * kHeadDimPad, kHeadDimPad);
    int32_t s_acc[Cfg::kSRegs];  // S = Q K^T of the block in flight, (64, BLOCK_K) int32 per warpgroup
    auto wait_k = [&](int i) { mbarrier_wait(k_full(stage_of(i)), parity_of(i)); };
    auto test_k = [&](int i) { return mbarrier_test_wait(k_full(stage_of(i)), parity_of(i)); };
    // Issues S = Q K^T of kept block i (its K tile landed: wait_k); completes with the next wait.
    auto issue_qk = [&](int i) {
      const int stage = stage_of(i);
      const uint64_t k_desc = wgmma_desc(k_smem(stage), kHeadDimPad);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Cfg::kQkSteps; ++kk) {
        const uint32_t step = kk * kWgmmaK8Bit;
        wgmma_s32_s8_ss<kBlockK>(s_acc, wgmma_desc_advance(q_desc, step), wgmma_desc_advance(k_desc, step), kk == 0);
      }
      wgmma_commit();
    };

    float m[2] = {kNegInf, kNegInf};  // running max (log2 units), rows g and g + 8
    float l[2] = {0.0f, 0.0f};        // running sum of p8 (= p · 448), rows g and g + 8 (same in the quad)
    float acc[Cfg::kORegs];           // (64, D_PAD) of the warpgroup: running Σ fmt(p · 448) · v_q
#pragma unroll
    for (int e = 0; e < Cfg::kORegs; ++e) acc[e] = 0.0f;
    int skipped = 0;

    // Row maxima of the scores over the whole tile, from the per-half maxima mx of this lane's columns
    // (times sc where mx holds unscaled dots), reduced over the quad.
    auto tile_row_max = [](const float (&mx)[2][kHalves], const float (&sc)[2][kHalves], float (&m_blk)[2]) {
#pragma unroll
      for (int i_row = 0; i_row < 2; ++i_row) {
        m_blk[i_row] = mx[i_row][0] * sc[i_row][0];
#pragma unroll
        for (int hh = 1; hh < kHalves; ++hh) m_blk[i_row] = fmaxf(m_blk[i_row], mx[i_row][hh] * sc[i_row][hh]);
#pragma unroll
        for (int mask = 1; mask < kQuadLanes; mask *= 2) {
          m_blk[i_row] = fmaxf(m_blk[i_row], __shfl_xor_sync(kFullWarp, m_blk[i_row], mask));
        }
      }
    };

    // Scores of the tile in s_acc (complete) in this lane's columns: s[] and the factors sc[row][half]
    // that turn s[] into log2-domain scores, the per-half maxima mx of s[] (unscaled), and the return
    // value mag: 1.5 · 2^23 where s[] holds biased dots (a fully visible tile), else 0 (s[] holds scores,
    // −inf where invisible, and sc = 1). The softmax forms fma(s, sc, −fma(mag, sc, m_sub)).
    auto tile_scores = [&](const int (&key0)[kHalves], const float (&k_scale_half)[kHalves], float (&s)[Cfg::kSRegs],
                           float (&sc)[2][kHalves], float (&mx)[2][kHalves]) {
#pragma unroll
      for (int i_row = 0; i_row < 2; ++i_row) {
#pragma unroll
        for (int hh = 0; hh < kHalves; ++hh) mx[i_row][hh] = kNegInf;
      }
      // Halves are contiguous (or the second is absent, kAbsentKey): the last one ends the tile.
      if (key0[kHalves - 1] + static_cast<int>(kQuantBlockRows) <= col_end_min) {
#pragma unroll
        for (int i_row = 0; i_row < 2; ++i_row) {
#pragma unroll
          for (int hh = 0; hh < kHalves; ++hh) sc[i_row][hh] = q_scale_row[i_row] * k_scale_half[hh];
        }
#pragma unroll
        for (int e = 0; e < Cfg::kSRegs; ++e) {
          s[e] = biased_dot(s_acc[e]);
          if constexpr (!Cfg::kTreeMax) {
            float& x = mx[(e % 4) / 2][(e / 4) * kNTile / kQuantBlockRows];
            x = fmaxf(x, s[e]);
          }
        }
        if constexpr (Cfg::kTreeMax) {  // on the dots: starts before the integer adds
          int32_t mi[2][kHalves];
          row_half_max<Cfg::kDotMaxArity>(s_acc, mi);
#pragma unroll
          for (int i_row = 0; i_row < 2; ++i_row) {
#pragma unroll
            for (int hh = 0; hh < kHalves; ++hh) mx[i_row][hh] = static_cast<float>(mi[i_row][hh]);
          }
        } else {
#pragma unroll
          for (int i_row = 0; i_row < 2; ++i_row) {
#pragma unroll
            for (int hh = 0; hh < kHalves; ++hh) mx[i_row][hh] -= kRoundMagic;  // exact
          }
        }
        return kRoundMagic;
      }
      int visible[2][kHalves];  // in column offsets from the half's first key
#pragma unroll
      for (int i_row = 0; i_row < 2; ++i_row) {
#pragma unroll
        for (int hh = 0; hh < kHalves; ++hh) {
          sc[i_row][hh] = 1.0f;
          visible[i_row][hh] = col_end[i_row] - key0[hh] - 2 * t;
        }
      }
#pragma unroll
      for (int j = 0; j < Cfg::kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i_row = e / 2;
          const int hh = j * kNTile / kQuantBlockRows;
          const float scale = q_scale_row[i_row] * k_scale_half[hh];
          const int col = j * kNTile + e % 2 - hh * static_cast<int>(kQuantBlockRows);
          s[4 * j + e] = col < visible[i_row][hh] ? static_cast<float>(s_acc[4 * j + e]) * scale : kNegInf;
          if constexpr (!Cfg::kTreeMax) mx[i_row][hh] = fmaxf(mx[i_row][hh], s[4 * j + e]);
        }
      }
      if constexpr (Cfg::kTreeMax) row_half_max<2>(s, mx);
      return 0.0f;
    };

    // The P·V filter of one warp (a 16-row group) and kept block: true when every row is negligible
    // (invalid, sees no key of the block, or its block maximum m_blk is more than pvthreshd below the
    // running maximum m_run). Bitwise, so no branch per row (D64 pairs +2.5 %, same run, session 6).
    auto warp_negligible = [&](const float (&m_run)[2], const float (&m_blk)[2]) {
      int all = 1;
#pragma unroll
      for (int i_row = 0; i_row < 2; ++i_row) {
        all &= static_cast<int>(!row_valid[i_row]) | static_cast<int>(m_blk[i_row] == kNegInf) |
               static_cast<int>(m_run[i_row] - m_blk[i_row] > pvthreshd);
      }
      return __all_sync(kFullWarp, all != 0);
    };

    // The codes of the tile (s[] scaled as pack_p_codes takes them) as the A fragments of the P·V k-steps: register
    // 2 · half + row of k-step ks holds columns 2t, 2t + 1 of n-tiles 4ks + 2 · half and 4ks + 2 · half + 1
    // of row g (row 0) or g + 8 (row 1). V^T holds the keys of every 16-key group in v_key_slot order,
    // so these are exactly the A bytes lane t needs: no lane exchange.
    auto p_fragments = [](const float (&s)[Cfg::kSRegs], uint32_t (&pf)[Cfg::kPvSteps][4]) {
#pragma unroll
      for (int ks = 0; ks < Cfg::kPvSteps; ++ks) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int row = 0; row < 2; ++row) {
            const float* x0 = s + 4 * (4 * ks + 2 * half) + 2 * row;
            const float* x1 = s + 4 * (4 * ks + 2 * half + 1) + 2 * row;
            pf[ks][2 * half + row] = pack_p_codes(x0[0], x0[1], x1[0], x1[1]);
          }
        }
      }
    };

    // Keeps P fragments read by an in-flight wgmma in their registers until its wait.
    auto fence_p = [](uint32_t (&pf)[Cfg::kPvSteps][4]) {
#pragma unroll
      for (int ks = 0; ks < Cfg::kPvSteps; ++ks) {
#pragma unroll
        for (int e = 0; e < 4; ++e) wgmma_fence_operand(pf[ks][e]);
      }
    };

    // Step 3 of the method for one tile, from its scores (tile_scores: s[], sc, mag) and the running
    // maxima after it (m_new): α, m and the P fragments (l is updated with acc, from P · ones). A
    // skipping warp feeds P = 0 and α = 1 and leaves m unchanged (its m_new is m); the fragments of a
    // skipped block of a multi-block tile are zeroed after the codes, so that the filter's votes are not
    // on the codes' path (kernel alone, same runs, two runs of session 49: L32k dense −0.3 / +0.5 %,
    // causal +1.5 / +1.7 %, B2 L8k dense +1.2 / +2.5 %, topk 0.5 +1.4 / +1.8 %, D64 dense +2.1 / +4.1 %;
    // the idle whole op L32k dense +1.0 / +1.4 %). A branch on any skip keeps the zeroing off the common
    // path (predicated on each block instead: −0.9 to +1.9 %).
    // The log2 score minus m_new is s · sc − (mag · sc + m_new), so s becomes
    // fma(s, k, c) with k = 8 · sc and c = 126 − 8 · m_new − mag · 8 · sc for pack_p_codes
    // (the mag · 8 · sc of c cancels the one in s · k up to the rounding of c, see "Scores on the Hopper
    // kernel"); masked s = −∞ gives 0 (m_new = −∞ only when every s is).
    auto any_of_halves = [](const bool (&flags)[kHalves]) {
      bool any = false;
#pragma unroll
      for (int hh = 0; hh < kHalves; ++hh) any = any || flags[hh];
      return any;
    };
    auto softmax_update = [&](bool warp_skips, const float (&m_new)[2], const bool (&skip_half)[kHalves], float mag,
                              const float (&sc)[2][kHalves], float (&s)[Cfg::kSRegs], float (&alpha_out)[2],
                              uint32_t (&p_out)[Cfg::kPvSteps][4]) {
      alpha_out[0] = 1.0f;
      alpha_out[1] = 1.0f;
      if (Cfg::kCodesAlways || !warp_skips) {
        float k[2][kHalves];
        float c[2][kHalves];
#pragma unroll
        for (int i_row = 0; i_row < 2; ++i_row) {
          alpha_out[i_row] = m_new[i_row] == kNegInf ? 1.0f : fast_exp2(m[i_row] - m_new[i_row]);
          m[i_row] = m_new[i_row];
#pragma unroll
          for (int hh = 0; hh < kHalves; ++hh) {
            const float m_sub = m_new[i_row] == kNegInf ? 0.0f : m_new[i_row];
            k[i_row][hh] = sc[i_row][hh] * static_cast<float>(kPCodesPerOctave);
            c[i_row][hh] = fmaf(-mag, k[i_row][hh], fmaf(-m_sub, kPCodesPerOctave, kPCodeMax));
          }
        }
#pragma unroll
        for (int e = 0; e < Cfg::kSRegs; ++e) {
          const int i_row = (e % 4) / 2;
          const int hh = (e / 4) * kNTile / kQuantBlockRows;
          s[e] = fmaf(s[e], k[i_row][hh], c[i_row][hh]);
        }
        p_fragments(s, p_out);
        if constexpr (kMultiBlock) {
          if (any_of_halves(skip_half)) {
            constexpr int kStepsPerHalf = Cfg::kPvSteps / kHalves;
#pragma unroll
            for (int hh = 0; hh < kHalves; ++hh) {
              if (!skip_half[hh]) continue;
#pragma unroll
              for (int ks = hh * kStepsPerHalf; ks < (hh + 1) * kStepsPerHalf; ++ks) {
#pragma unroll
                for (int e = 0; e < 4; ++e) p_out[ks][e] = 0u;
              }
            }
          }
        }
      } else {  // opaque_zero keeps the zeros in this branch (a plain 0 ran on every step: D64 dense -1.2 %)
#pragma unroll
        for (int ks = 0; ks < Cfg::kPvSteps; ++ks) {
#pragma unroll
          for (int e = 0; e < 4; ++e) p_out[ks][e] = opaque_zero();
        }
      }
    };

    // l = l · α + the tile's row sums, from the sum n-tile that ends the last P·V chain (pv_chain:
    // its first register row g, its third row g + 8), after its wait.
    auto add_row_sums = [&](float (&pv)[Cfg::kPvRegs], const float (&alpha_t)[2]) {
      constexpr int kSums = Cfg::kPvChunkRegs;  // the sum n-tile's first register
#pragma unroll
      for (int e = kSums; e < Cfg::kPvRegs; ++e) wgmma_fence_operand(pv[e]);
      l[0] = l[0] * alpha_t[0] + pv[kSums];
      l[1] = l[1] * alpha_t[1] + pv[kSums + 2];
    };

    // This warpgroup's first turn of the tile: S of its first step (K landed), issued in turn.
    auto first_turn = [&] {
      wait_k(0);
      named_barrier_sync(my_turn, 2 * kWarpgroupThreads);
      issue_qk(0);
      named_barrier_arrive(other_turn, 2 * kWarpgroupThreads);
    };

    // Steps 1-3 of the method for a tile whose S is complete in s_acc (waited for, operands fenced):
    // scores, the P·V filter per warp (and per kept block of a multi-block tile) and the online softmax
    // update, into the tile's α and P fragments; updates m and the skip count. With probe_i >= 0 the barriers
    // of tile probe_i's V^T and (with probe_next) tile probe_i + 1's K are probed after the filter, before the
    // codes, into v_ready and k_ready (the ping-pong schedule's turn waits only on a failed probe).
    auto tile_softmax = [&](const int (&key0)[kHalves], const float (&k_scale_half)[kHalves], float (&alpha)[2],
                            uint32_t (&p_frag)[Cfg::kPvSteps][4], int probe_i, bool probe_next, bool& v_ready,
                            bool& k_ready) {
      // A fully visible tile keeps the dots and their scale apart: the row maximum of the scores is
      // max(dot) · scale exactly (the scale is >= 0 and rounding is monotonic), and p is one fma below.
      float s[Cfg::kSRegs];
      float sc[2][kHalves];
      float mx[2][kHalves];
      const float mag = tile_scores(key0, k_scale_half, s, sc, mx);

      // ---- 2. the P·V filter, per warp (= 16-row group) and kept block ----------------------------
      // m_new: the running max after the tile; skip_half: the warp skips that 64-key part (on
      // multi-block tiles each part is a block, decided in order like the reference; otherwise all
      // parts share one). A block is skipped only when its maximum is below the running one in every
      // valid row, so the running max over the blocks in order is the reference's whether or not the
      // block before was skipped: the votes do not depend on each other.
      float m_new[2];
      bool skip_half[kHalves];
      bool warp_skips = true;
      if constexpr (kMultiBlock) {
        float m_half[kHalves][2];
#pragma unroll
        for (int i_row = 0; i_row < 2; ++i_row) {
#pragma unroll
          for (int hh = 0; hh < kHalves; ++hh) {
            m_half[hh][i_row] = mx[i_row][hh] * sc[i_row][hh];
#pragma unroll
            for (int mask = 1; mask < kQuadLanes; mask *= 2) {
              m_half[hh][i_row] = fmaxf(m_half[hh][i_row], __shfl_xor_sync(kFullWarp, m_half[hh][i_row], mask));
            }
          }
          m_new[i_row] = m[i_row];
        }
#pragma unroll
        for (int hh = 0; hh < kHalves; ++hh) {
          skip_half[hh] = warp_negligible(m_new, m_half[hh]);
#pragma unroll
          for (int i_row = 0; i_row < 2; ++i_row) m_new[i_row] = fmaxf(m_new[i_row], m_half[hh][i_row]);
          warp_skips = warp_skips && skip_half[hh];
          skipped += warp_active && skip_half[hh] && key0[hh] != kAbsentKey;
        }
      } else {
        float m_blk[2];
        tile_row_max(mx, sc, m_blk);
#pragma unroll
        for (int i_row = 0; i_row < 2; ++i_row) m_new[i_row] = fmaxf(m[i_row], m_blk[i_row]);
        warp_skips = warp_negligible(m, m_blk);
#pragma unroll
        for (int hh = 0; hh < kHalves; ++hh) skip_half[hh] = warp_skips;
        skipped += warp_active && warp_skips;
      }

      // The turn needs V^T of this tile and K of the next: their barriers are probed now, so the probes'
      // latency passes during the exponentials, and the turn blocks only on a failed probe (kernel
      // alone, same run, session 8: +0.5 % dense L32k, +1.3 % topk 0.5, +1.5 % causal, +0.4 % D64; the
      // two blocking waits took ~160 cycles of a ~2700-cycle tile when both tiles had long landed).
      if (probe_i >= 0) {
        v_ready = mbarrier_test_wait(v_full(stage_of(probe_i)), parity_of(probe_i));
        k_ready = !probe_next || test_k(probe_i + 1);
      }

      // ---- 3. online softmax update (a skipping warp: P = 0, α = 1) --------------------------------
      // Both blocks of a pair use the max after the pair, so p of the first is rounded to e4m3
      // relative to that max (the reference rounds it relative to the max after the first block,
      // then scales by α of the second).
      softmax_update(warp_skips, m_new, skip_half, mag, sc, s, alpha, p_frag);
    };

    if constexpr (Cfg::kOverlap) {
      // ---- overlapped schedule: this warpgroup's turn issues S of block i + 1 and P·V of block i;
      // the softmax of block i + 1 runs while P·V of block i is in flight. No divergent branch may
      // be crossed by an in-flight wgmma (ptxas would serialize), so P·V is always issued: a
      // warpgroup whose 4 warps all skip multiplies P = 0 (acc · 1 + 0 leaves acc unchanged).
      // Softmax of the block in s_acc (complete): P fragments and α of the block (no barrier probes).
      auto softmax = [&](const int (&k0)[kHalves], const float (&k_scale_half)[kHalves],
                         uint32_t (&p_out)[Cfg::kPvSteps][4], float (&alpha_out)[2]) {
        bool unused_ready[2];
        tile_softmax(k0, k_scale_half, alpha_out, p_out, -1, false, unused_ready[0], unused_ready[1]);
      };

      static_assert(Cfg::kPvChunkRegs == Cfg::kORegs, "one P·V chain");
      float pv[Cfg::kPvRegs];  // P·V of the block in flight, (64, D_PAD) fp32, and its row sums
      auto issue_pv = [&](int stage, const uint32_t (&pf)[Cfg::kPvSteps][4]) {
        const uint64_t v_desc = wgmma_desc(v_smem(stage), kBlockK);
        wgmma_fence();
        pv_chain<kHeadDimPad + Cfg::kSumRows>(pv, pf, [&](int ks) { return wgmma_desc_advance(v_desc, ks * kWgmmaK8Bit); });
        wgmma_commit();
      };
      auto add_pv = [&](const float (&alpha_t)[2]) {  // acc = acc · α + pv (the method's order), l likewise
#pragma unroll
        for (int e = 0; e < Cfg::kORegs; ++e) {
          wgmma_fence_operand(pv[e]);
          acc[e] = acc[e] * alpha_t[(e % 4) / 2] + pv[e];
        }
        add_row_sums(pv, alpha_t);
      };

      // P and α of the block whose P·V is issued next, in two buffers that alternate between steps
      // (no register copies that ptxas could place inside a wgmma pipeline).
      uint32_t p_a[Cfg::kPvSteps][4], p_b[Cfg::kPvSteps][4];
      float alpha_a[2], alpha_b[2];
      auto step = [&](int i, auto has_next_c, uint32_t (&p_cur)[Cfg::kPvSteps][4], float (&alpha_cur)[2],
                      uint32_t (&p_nxt)[Cfg::kPvSteps][4], float (&alpha_nxt)[2]) {
        constexpr bool has_next = decltype(has_next_c)::value;
        const int stage = stage_of(i);
        mbarrier_wait(v_full(stage), parity_of(i));
        if constexpr (has_next) wait_k(i + 1);
        named_barrier_sync(my_turn, 2 * kWarpgroupThreads);
        if constexpr (has_next) issue_qk(i + 1);
        issue_pv(stage, p_cur);
        named_barrier_arrive(other_turn, 2 * kWarpgroupThreads);
        if constexpr (has_next) {
          wgmma_wait<1>();  // S of block i + 1
#pragma unroll
          for (int e = 0; e < Cfg::kSRegs; ++e) wgmma_fence_operand(s_acc[e]);
          int key0_b[kHalves];  // block i + 1, whose softmax comes next
          float k_scale_b[kHalves];
          read_tile_keys(i + 1, key0_b, k_scale_b);
          softmax(key0_b, k_scale_b, p_nxt, alpha_nxt);
        }
        wgmma_wait<0>();  // P·V of block i
        fence_p(p_cur);
        add_pv(alpha_cur);
        mbarrier_arrive(empty(stage));  // this thread no longer reads the stage
      };

      mbarrier_wait(q_full(buf), (r / kQBuffers) & 1);
      if (n_kept > 0) {
        first_turn();
        int key0_first[kHalves];
        float k_scale_first[kHalves];
        read_tile_keys(0, key0_first, k_scale_first);
        wgmma_wait<0>();
#pragma unroll
        for (int e = 0; e < Cfg::kSRegs; ++e) wgmma_fence_operand(s_acc[e]);
        softmax(key0_first, k_scale_first, p_a, alpha_a);
        int i = 0;
        for (; i + 2 < n_kept; i += 2) {
          step(i, std::true_type{}, p_a, alpha_a, p_b, alpha_b);
          step(i + 1, std::true_type{}, p_b, alpha_b, p_a, alpha_a);
        }
        if (i + 1 < n_kept) {
          step(i, std::true_type{}, p_a, alpha_a, p_b, alpha_b);
          step(i + 1, std::false_type{}, p_b, alpha_b, p_a, alpha_a);
        } else {
          step(i, std::false_type{}, p_a, alpha_a, p_b, alpha_b);
        }
      }
    } else {
      // One tile (a kept block, or a pair of them): its softmax, then this warpgroup's turn (P·V of
      // the tile, S of the next).
      auto block = [&](int i, auto has_next_c) {
        constexpr bool has_next = decltype(has_next_c)::value;
        const int stage = stage_of(i);
        const uint32_t parity = parity_of(i);
        int key0[kHalves];  // K of this tile landed before its S was issued
        float k_scale_half[kHalves];
        read_tile_keys(i, key0, k_scale_half);

        // ---- 1. S of this block (issued in the previous turn) --------------------------------------
        wgmma_wait<0>();
#pragma unroll
        for (int e = 0; e < Cfg::kSRegs; ++e) wgmma_fence_operand(s_acc[e]);

        bool v_ready = false;
        bool k_ready = false;
        float alpha[2];
        uint32_t p_frag[Cfg::kPvSteps][4];
        tile_softmax(key0, k_scale_half, alpha, p_frag, i, has_next, v_ready, k_ready);

        // ---- 4. this warpgroup's turn: P·V of the block (fresh registers, then acc = acc · α + pv, the
        // method's order, per chunk of output columns) and S of the next block -------------------------
        // Every consumer waits for V^T, used or not, so the stage's phases stay in step.
        if (!v_ready) mbarrier_wait(v_full(stage), parity);
        if (!k_ready) wait_k(i + 1);
        named_barrier_sync(my_turn, 2 * kWarpgroupThreads);
        float pv[Cfg::kPvRegs];  // (64, PV_CHUNK_COLS) fp32, and the tile's row sums after the last chunk
        // Chunk c (a std::integral_constant) of P·V; the last chunk's chain also sums the rows of P.
        auto issue_pv = [&](auto chunk_c) {
          constexpr int chunk = decltype(chunk_c)::value;
          constexpr int kCols = Cfg::kPvChunkCols + (chunk == Cfg::kPvChunks - 1 ? Cfg::kSumRows : 0);
          // V^T tiles of kVRowBytes keys (two per tile for pairs); chunk rows start every kVRowBytes bytes.
          constexpr int kStepsPerVTile = Cfg::kVRowBytes / kWgmmaK8Bit;
          const uint32_t v_chunk = v_smem(stage) + chunk * Cfg::kPvChunkCols * Cfg::kVRowBytes;
          wgmma_fence();  // in the wgmma's own basic block (else ptxas adds one and serializes)
          pv_chain<kCols>(pv, p_frag, [&](int ks) {
            return wgmma_desc_advance(wgmma_desc(v_chunk + (ks / kStepsPerVTile) * Cfg::kVTileStride, Cfg::kVRowBytes),
                                      (ks % kStepsPerVTile) * kWgmmaK8Bit);
          });
          wgmma_commit();
        };
        auto add_pv = [&](int chunk) {  // acc = acc · α + pv, the method's order
#pragma unroll
          for (int e = 0; e < Cfg::kPvChunkRegs; ++e) {
            wgmma_fence_operand(pv[e]);
            float& o = acc[chunk * Cfg::kPvChunkRegs + e];
            o = o * alpha[(e % 4) / 2] + pv[e];
          }
          if (chunk == Cfg::kPvChunks - 1) add_row_sums(pv, alpha);
        };
        // P·V, then S of the next block: no wgmma stays in flight across a divergent branch (ptxas
        // would serialize them); the other warpgroup's turn starts once S is issued.
        static_assert(Cfg::kPvChunks == 1 || (Cfg::kPvChunks == 2 && !Cfg::kPvBesideS), "one or two chunks");
        if constexpr (Cfg::kPvBesideS) {
          issue_pv(std::integral_constant<int, 0>{});
          if constexpr (has_next) issue_qk(i + 1);
          named_barrier_arrive(other_turn, 2 * kWarpgroupThreads);
          wgmma_wait<has_next ? 1 : 0>();  // P·V (S of the next tile may still be in flight)
          fence_p(p_frag);
          add_pv(0);
        } else {
          issue_pv(std::integral_constant<int, 0>{});
          wgmma_wait<0>();
          add_pv(0);
          if constexpr (Cfg::kPvChunks == 2) {
            issue_pv(std::integral_constant<int, 1>{});
            wgmma_wait<0>();
            add_pv(1);
          }
          if constexpr (has_next) issue_qk(i + 1);
          named_barrier_arrive(other_turn, 2 * kWarpgroupThreads);
        }
        mbarrier_arrive(empty(stage));  // this thread no longer reads the stage
      };

      mbarrier_wait(q_full(buf), (r / kQBuffers) & 1);
      if (n_kept > 0) {
        first_turn();
        for (int i = 0; i + 1 < n_steps; ++i) block(i, std::true_type{});
        block(n_steps - 1, std::false_type{});
      }
    }
    __syncwarp();
    if (lane == 0) mbarrier_arrive(q_empty(buf));  // every wgmma reading this Q buffer has completed
    cp_async_wait<0>();
    __syncwarp();
    if (warp_active) {
      pv_units += n_kept;
      pv_skipped += skipped;
    }
    step0 += n_steps;
    ++r;

    // ---- 5. a piece of a split work tile leaves its m, l and acc in its slot; the tile's last piece
    // (per warp) merges them after the tile loop (a CTA's pieces are its last slots). Found again from
    // n, so that nothing of it is kept across the main loop.
    if (kSplit && static_cast<int>(blockIdx.x) + opaque(n) * static_cast<int>(gridDim.x) >= params.split_first) {
      int unused_bh = 0;
      int unused_q_tile = 0;
      Piece here;
      if (cta_slot<kSplit>(params, opaque(n), &unused_bh, &unused_q_tile, &here) == Slot::kPiece) {
        const bool merges = publish_piece<kHeadDimPad>(params, here, consumer_warp, lane, m, l, acc);
        if (lane == 0) merge_flags(consumer_warp)[here.slot % 2] = merges ? 1u : 0u;
        continue;
      }
    }

    // ---- 6. epilogue
    finish_tile(acc, m, l, b, h, bh, warp_row0, row_valid);
  }
  // Balances the arrival group 1 made before its first turn (or after its last).
  if (consumer_group == 0) named_barrier_sync(my_turn, 2 * kWarpgroupThreads);

  // ---- the split work tiles whose last piece this warp ran: merged from every piece's slot --------
  if constexpr (kSplit) {
    __syncwarp();
#pragma unroll 1
    for (int j = 0; j < 2; ++j) {
      if (merge_flags(consumer_warp)[j] == 0) continue;
      int bh_index = 0;
      int q_tile = 0;
      Piece here;
      cta_slot<kSplit>(params, params.split_first / static_cast<int>(gridDim.x) + j, &bh_index, &q_tile, &here);
      const WorkTile wt = work_tile(p, bh_index, q_tile);
      const int warp_row0 = wt.row0 + consumer_group * kWgmmaM + group_warp * 16;
      copy_v_scales(wt.bhk);
      float m[2];
      float l[2];
      float acc[Cfg::kORegs];
      merge_pieces<kHeadDimPad>(params, here.tile, consumer_warp, lane, m, l, acc);
      const LaneRows rows = lane_rows(p, wt.bh, warp_row0 + g);
      cp_async_wait<0>();
      __syncwarp();
      finish_tile(acc, m, l, wt.b, wt.h, wt.bh, warp_row0, rows.valid);
    }
  }

  if (Cfg::kTmaStores && params.o_rows_16b && lane == 0) bulk_wait_group_all();  // the stores read the boxes, wrote o

  // ---- P·V statistics: one atomic per counter and warp ---------------------------------------------
  if (p.stats != nullptr && lane == 0) {
    auto* stats = reinterpret_cast<unsigned long long*>(p.stats);
    if (pv_units > 0) atomicAdd(stats + kStatPvUnits, pv_units);
    if (pv_skipped > 0) atomicAdd(stats + kStatPvSkipped, pv_skipped);
  }
#endif
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no libcuda link).
inline Status tensor_map_encoder(PFN_cuTensorMapEncodeTiled_v12000* out) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    constexpr unsigned kDriverVersion = 12000;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, kDriverVersion, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return {StatusCode::kCudaError, "cuTensorMapEncodeTiled: driver entry point not found"};
  *out = encode;
  return Status::Ok();
}

// A tiled map of kRank dims (innermost first, dim 0 contiguous) over a tensor of 1- or 2-byte elements.
template <int kRank>
Status encode_map(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap* map, int element_bytes, const void* base,
                  const uint64_t (&dims)[kRank], const uint64_t (&strides_bytes)[kRank - 1],
                  const uint32_t (&box)[kRank], int swizzle_bytes, const char* what) {
  cuuint64_t global_dim[kRank];
  cuuint64_t global_stride[kRank - 1];
  cuuint32_t box_dim[kRank];
  cuuint32_t element_stride[kRank];
  for (int i = 0; i < kRank; ++i) {
    global_dim[i] = dims[i];
    if (i + 1 < kRank) global_stride[i] = strides_bytes[i];
    box_dim[i] = box[i];
    element_stride[i] = 1;
  }
  const CUtensorMapSwizzle swizzle = swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  const CUtensorMapDataType type = element_bytes == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT16;
  const CUresult r = encode(map, type, kRank, const_cast<void*>(base), global_dim, global_stride, box_dim,
                            element_stride, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return {StatusCode::kCudaError, std::string("cuTensorMapEncodeTiled(") + what + ") failed with " + std::to_string(r)};
  }
  return Status::Ok();
}

// A split tail piece runs at least this many steps of a full index list (shorter ones cost more in
// stores and merges than they save), and a work tile splits into at most kMaxPieces pieces (the last
// one reads the others' partial results one after another).
inline constexpr int64_t kMinPieceSteps = 8;
inline constexpr int64_t kMaxPieces = 16;

// Decides whether the last round of `grid` CTAs splits (WgmmaAttendParams::split_first), for index
// lists of at most max_steps steps; if so, points the params into the scratch and clears its counters
// on the stream (unless launch.counters_zeroed). Where the last round leaves at least half of the CTAs
// idle, and at D_PAD = 128 at least a quarter: kernel alone, same run (session 25), B2 H16 L8k D128 (68
// tiles left for 132 CTAs) dense +1.5 % / +2.5 %, topk 0.5 +0.2 %, B4 L2k (100 left) +1.2 %, H24 L8k (84
// left) +1.2 %, but D64 B2 L8k -0.4 % (bench/RESULTS.md; session 17 had seen no gain at B2 L8k with the
// costlier D128 epilogue).
inline Status plan_split(WgmmaAttendParams* params, int64_t grid, int64_t max_steps, int head_dim_pad,
                         const WgmmaLaunch& launch) {
  params->split_first = params->tiles;
  const int64_t rem = params->tiles % grid;
  const int64_t rem_max = head_dim_pad == 128 ? grid * 3 / 4 : grid / 2;
  if (launch.scratch == nullptr || params->a.causal != Causal::kNone || rem == 0 || rem > rem_max ||
      grid > kSplitMaxCtas) {
    return Status::Ok();
  }
  const int64_t ctas = std::min({grid, rem * kMaxPieces, rem * max_steps / kMinPieceSteps});
  const int64_t need = split_counter_bytes() + 2 * ctas * split_slot_bytes(head_dim_pad);
  if (ctas <= rem || static_cast<int64_t>(launch.scratch_bytes) < need) return Status::Ok();
  params->split_first = static_cast<int32_t>(params->tiles - rem);
  params->split_ctas = static_cast<int32_t>(ctas);
  params->split_arrivals = static_cast<int32_t*>(launch.scratch);
  params->split_partial = reinterpret_cast<float*>(static_cast<char*>(launch.scratch) + split_counter_bytes());
  if (!launch.counters_zeroed) {
    SPARGE_CUDA_TRY(cudaMemsetAsync(launch.scratch, 0, static_cast<size_t>(rem * kSplitWarps) * sizeof(int32_t),
                                    launch.stream),
                    "wgmma attention: cudaMemsetAsync(split counters)");
  }
  return Status::Ok();
}

}  // namespace wgmma_attend

template <int kHeadDimPad, int kBlockK, bool kMultiBlock>
Status launch_wgmma_attend(const MmaAttendParams& a, const WgmmaLaunch& launch) {
  const int batch = launch.batch;
  using Cfg = wgmma_attend::Config<kHeadDimPad, kBlockK, kMultiBlock>;
  constexpr auto kernel = &wgmma_attend::wgmma_attend_kernel<kHeadDimPad, kBlockK, kMultiBlock, false>;
  constexpr auto split_kernel = &wgmma_attend::wgmma_attend_kernel<kHeadDimPad, kBlockK, kMultiBlock, true>;
  static const std::string name = "wgmma_attend_kernel<D_PAD=" + std::to_string(kHeadDimPad) + ", TILE_K=" +
                                  std::to_string(kBlockK) + (kMultiBlock ? ", kept 64-key blocks" : "") + ", kFp8>";

  PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  SPARGE_RETURN_IF_ERROR(wgmma_attend::tensor_map_encoder(&encode));
  WgmmaAttendParams params{};
  params.a = a;
  const uint64_t dim = static_cast<uint64_t>(a.head_dim);
  const uint64_t len_q = static_cast<uint64_t>(a.len_q);
  const uint64_t len_k = static_cast<uint64_t>(a.len_k);
  const uint64_t len_k_pad = static_cast<uint64_t>(a.len_k_pad);
  const uint64_t bhq = static_cast<uint64_t>(batch) * a.heads_q;
  const uint64_t bhk = static_cast<uint64_t>(batch) * a.heads_kv;
  constexpr uint32_t kD = kHeadDimPad;
  constexpr uint32_t kK = Cfg::kBlockKeys;  // one TMA box per kept block
  constexpr uint32_t kRows = kWgmmaAttendRows;
  SPARGE_RETURN_IF_ERROR(wgmma_attend::encode_map<3>(encode, &params.tmap_q, 1, a.q, {dim, len_q, bhq},
                                                     {dim, dim * len_q}, {kD, kRows, 1}, kHeadDimPad, "Q"));
  SPARGE_RETURN_IF_ERROR(wgmma_attend::encode_map<3>(encode, &params.tmap_k, 1, a.k, {dim, len_k, bhk},
                                                     {dim, dim * len_k}, {kD, kK, 1}, kHeadDimPad, "K"));
  SPARGE_RETURN_IF_ERROR(wgmma_attend::encode_map<3>(encode, &params.tmap_v, 1, a.v, {len_k_pad, dim, bhk},
                                                     {len_k_pad, len_k_pad * dim}, {kK, kD, 1}, Cfg::kVRowBytes, "V^T"));

  static const std::string smem_what = name + ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize)";
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<kernel>(Cfg::kSmemBytes, smem_what.c_str()));
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<split_kernel>(Cfg::kSmemBytes, smem_what.c_str()));
  // One CTA per SM (the consumers' registers allow no second); the kernel counts work tiles in int.
  int sms = 0;
  SPARGE_RETURN_IF_ERROR(sm_count(&sms));
  if (launch.max_ctas > 0) sms = std::min(sms, launch.max_ctas);
  const int64_t q_tiles = ceil_div(a.len_q, kWgmmaAttendRows);
  const int64_t tiles = q_tiles * a.heads_q * batch;
  if (tiles > std::numeric_limits<int32_t>::max() - sms) {
    return {StatusCode::kUnsupported, name + ": " + std::to_string(tiles) + " work tiles of 128 query rows, at most " +
                                          std::to_string(std::numeric_limits<int32_t>::max() - sms)};
  }
  params.q_tiles = static_cast<int32_t>(q_tiles);
  params.tiles = static_cast<int32_t>(tiles);
  constexpr int64_t kElems16b = 8;  // 2-byte elements per 16 bytes
  const bool o_rows_16b = a.o_dtype != DType::kFloat32 && reinterpret_cast<uintptr_t>(a.o) % 16 == 0 &&
                          a.o_stride_batch % kElems16b == 0 && a.o_stride_head % kElems16b == 0 &&
                          a.o_stride_token % kElems16b == 0;
  params.o_rows_16b = o_rows_16b;
  if (Cfg::kTmaStores && o_rows_16b) {
    // 2-byte O as [B, Hq, Lq, D] in its strides (a dimension of size 1 may have stride 0: it takes the
    // row-major one). The map fails to encode only for strides beyond what TMA addresses; the pair
    // stores take those rows.
    constexpr uint64_t kOBytes = 2;
    const uint64_t heads_q = static_cast<uint64_t>(a.heads_q);
    const uint64_t token_bytes = len_q > 1 ? kOBytes * a.o_stride_token : kOBytes * dim;
    const uint64_t head_bytes = heads_q > 1 ? kOBytes * a.o_stride_head : token_bytes * len_q;
    const uint64_t batch_bytes = batch > 1 ? kOBytes * a.o_stride_batch : head_bytes * heads_q;
    params.o_rows_16b = wgmma_attend::encode_map<4>(encode, &params.tmap_o, kOBytes, a.o,
                                               {dim, len_q, heads_q, static_cast<uint64_t>(batch)},
                                               {token_bytes, head_bytes, batch_bytes}, {Cfg::kOBoxCols, 16, 1, 1},
                                               Cfg::kOBoxRowBytes, "O")
                       .ok();
  }
  const int64_t grid = std::min<int64_t>(tiles, sms);
  if (grid > 0 && a.causal != Causal::kNone) {
    params.causal = cached_causal_order(params.q_tiles, params.tiles / params.q_tiles, static_cast<int>(grid));
  }
  SPARGE_RETURN_IF_ERROR(wgmma_attend::plan_split(&params, grid, ceil_div(a.nbk, Cfg::kBlocksPerStep),
                                                  kHeadDimPad, launch));
  const auto launched = params.split_first < params.tiles ? split_kernel : kernel;
  return launch_kernel(name.c_str(), launch.chained, launched, static_cast<unsigned>(grid), kWgmmaAttendThreads,
                       Cfg::kSmemBytes, launch.stream, params);
}

}  // namespace sparge::cuda
