// sparge — parameter structs of the public C++ API.
//
// Every tensor is a raw pointer on the device named by `device` with a shape comment; strides
// are in elements (int64_t) and the last (head-dim) dimension is always contiguous. Fill the
// structs with designated initialisers:
//
//   sparge::AttentionParams p{.device = sparge::Device::kCPU, .shape = {...}, .q = q_ptr, ...};
//
// Symbols: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), Lq / Lk sequence
// lengths, D head dim, nbq = ceil(Lq / block_q), nbk = ceil(Lk / block_k).
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;

namespace sparge {

using Stream = CUstream_st*;  // the same type as cudaStream_t; nullptr is the legacy stream

enum class Device : int32_t { kCPU = 0, kCUDA = 1 };
enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Rows of Q / K sharing one INT8 scale (see layout.h for the exact row → group maps).
enum class QuantGranularity : int32_t {
  kPerBlock = 0,   // Q: 64 rows, K: 64 rows
  kPerWarp = 1,    // Q: 16 rows, K: 64 rows
  kPerThread = 2,  // Q: rows {r, r+8} of each 16-row tile, K: rows with equal (r % 8) / 2 of each 64
};

// Format of P and V in the P·V product, and how it is accumulated (docs/method.md §0, §2).
enum class PvPrecision : int32_t {
  kFp8 = 0,   // P and V in e4m3, accumulated in fp32 (V scaled into ±kVQuantMax = ±448)
  kFp16 = 1,  // P and V in fp16, accumulated in fp32: the accurate mode
  // P and V in e4m3, the product of each 32-key step accumulated in fp16 inside a 64-key chunk,
  // then added to the fp32 accumulator (SageAttention2++; twice the mma rate of kFp8 on sm_89 /
  // sm_120). V is scaled into ±kVQuantMaxFp16Accum = ±2.25 so that a chunk sums at most
  // 64 · 448 · 2.25 = 64512 < 65504: the fp16 accumulator cannot overflow. Needs sm_89+; runs on
  // the mma.sync kernel on every GPU (Hopper included).
  kFp8Fp16Accum = 2,
};

// kTopLeft matches scaled_dot_product_attention(is_causal=True): key c is visible to query r
// when c <= r. kBottomRight aligns the last query with the last key: c <= r + (Lk - Lq).
enum class Causal : int32_t { kNone = 0, kTopLeft = 1, kBottomRight = 2 };

// How stage 1 chooses the K blocks of each Q block.
enum class SelectMode : int32_t {
  kDense = 0,      // every allowed block
  kTopK = 1,       // round(topk · allowed) best blocks of the compressed map, plus the always-kept ones
  kCdf = 2,        // fewest blocks whose compressed probability mass reaches cdfthreshd, plus always-kept
  kBlockMask = 3,  // the caller's block_mask, intersected with the causal mask
};

// How stage 1 scores a (Q block, K block) pair (docs/method.md §1, "Block scores").
enum class BlockScore : int32_t {
  kMean = 0,    // sm_scale · (q_pool · k_pool): the original SpargeAttn score
  kSpikes = 1,  // log-mass estimate from q_pool, the kSpikeKeys largest-norm keys and the mean of the
                // other keys of the block: keeps sinks and retrieval keys a block mean dilutes
};

// Problem shape. Q is [B, Hq, Lq, D]; K and V are [B, Hkv, Lk, D].
struct Shape {
  int64_t batch = 0;
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  int64_t len_q = 0;
  int64_t len_k = 0;
  int64_t head_dim = 0;
};

// Element strides of a [B, H, L, D] tensor. The D dimension has stride 1.
struct Strides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t token = 0;
};

// Prediction block sizes (rows of Q and of K per block of the block map). A property of the
// method, not of a kernel: every backend selects the same blocks for the same values.
// Both must be multiples of 16 in [16, 1024]; GPU backends may support fewer values.
struct BlockConfig {
  int64_t block_q = 128;
  int64_t block_k = 64;
};

// A hyperparameter: one value for all query heads, or one value per query head.
struct HeadParam {
  float value = 0.0f;
  const float* per_head = nullptr;  // [Hq] on the backend's device; overrides `value` when set
};

// The un-quantized inputs.
struct Inputs {
  const void* q = nullptr;  // [B, Hq, Lq, D]
  const void* k = nullptr;  // [B, Hkv, Lk, D]
  const void* v = nullptr;  // [B, Hkv, Lk, D]
  DType dtype = DType::kFloat16;  // of q, k and v
  Strides q_strides;
  Strides k_strides;
  Strides v_strides;
};

struct QuantOptions {
  float sm_scale = 0.0f;  // softmax scale; 0 means D^-0.5
  bool smooth_k = true;   // subtract the token mean of K before quantizing it
  QuantGranularity granularity = QuantGranularity::kPerThread;
  PvPrecision pv = PvPrecision::kFp8;
};

// Output of the quantize stage, input of predict and attend. All buffers are contiguous in the
// order written; layout.h gives their sizes and carves them out of one allocation.
struct QuantizedQKV {
  int8_t* q = nullptr;         // [B, Hq, Lq, D]          rne(q · 127 / amax) per scale group
  float* q_scale = nullptr;    // [B, Hq, q_groups]       q_dequant · sm_scale · log2(e)
  int8_t* k = nullptr;         // [B, Hkv, Lk, D]         rne((k - k_mean) · 127 / amax) per scale group
  float* k_scale = nullptr;    // [B, Hkv, k_groups]
  float* k_mean = nullptr;     // [B, Hkv, D]             token mean of K (zero when smooth_k is off)
  void* v = nullptr;           // [B, Hkv, D, Lk_pad]     V / v_scale as e4m3 (kFp8, kFp8Fp16Accum) or fp16, transposed;
                               //                         key t at position v_key_slot(t, pv) (layout.h)
  float* v_scale = nullptr;    // [B, Hkv, D]             per-channel amax / v_quant_max(pv): 448 or 2.25
  float* lse_shift = nullptr;  // [B, Hq, Lq]             sm_scale · (q · k_mean): the LSE lost to smoothing
  float* q_pool = nullptr;     // [B, Hq, nbq, D]         mean of the Q rows of each block
  float* q_sim = nullptr;      // [B, Hq, nbq]            mean pairwise cosine similarity of those rows
  float* k_pool = nullptr;     // [B, Hkv, nbk, D]        mean of the smoothed K rows of each block
  float* k_sim = nullptr;      // [B, Hkv, nbk]
  float* k_spikes = nullptr;   // [B, Hkv, nbk, kSpikeKeys, D]  the smoothed K rows of largest norm of each
                               // block, by descending norm (zeros past the block's rows); optional for
                               // quantize (skipped when null), needed by BlockScore::kSpikes
};

// Kept K blocks of every Q block: index[b][h][i][0 .. count[b][h][i]) ascending, -1 after them.
struct BlockIndex {
  int32_t* index = nullptr;  // [B, Hq, nbq, nbk]
  int32_t* count = nullptr;  // [B, Hq, nbq]
};

struct Selection {
  SelectMode mode = SelectMode::kTopK;
  BlockScore block_score = BlockScore::kMean;  // kTopK / kCdf: the compressed score of a block pair
  HeadParam topk{0.5f};          // kTopK: fraction of the allowed blocks to keep, in [0, 1]
  HeadParam cdfthreshd{0.98f};   // kCdf: probability mass to keep, in [0, 1]
  // A block is uniform when its self-similarity exceeds this, in [-1, 1]. The default 0.02 is about
  // 10-20 standard deviations of the self-similarity of random vectors (64-128 rows, D >= 64): only
  // blocks no more alike than noise are kept whole. The original SpargeAttn default is 0.6.
  HeadParam simthreshd1{0.02f};
  bool attention_sink = false;   // always keep the first K block
  // kCdf: multiply the compressed scores of Q block i by 1 / sqrt(max(q_sim_i, kCdfSimFloor)),
  // undoing the flattening of mean pooling (a pooled query is shorter than its rows by about
  // sqrt(q_sim)). Off: the original SpargeAttn map. Never changes a TopK ranking.
  bool cdf_sharpen = true;
  const uint8_t* block_mask = nullptr;  // [B, Hq, nbq, nbk] for kBlockMask, nonzero = keep
};

// Indices into the optional statistics array of the fused op (int64_t, on the backend's device).
enum StatIndex : int {
  kStatBlocksKept = 0,     // Σ kept blocks
  kStatBlocksAllowed = 1,  // Σ blocks with at least one visible (query, key) pair
  kStatPvUnits = 2,        // Σ (16-row group, kept block) pairs that reached the P·V filter
  kStatPvSkipped = 3,      // of those, how many skipped the P·V product
  kStatCount = 4,
};

// Stage 0: smoothing, INT8 Q/K, V in the P·V format, block statistics.
struct QuantizeParams {
  Device device = Device::kCPU;
  Stream stream = nullptr;  // CUDA backend only
  Shape shape;
  BlockConfig blocks;
  Inputs in;
  QuantOptions quant;
  QuantizedQKV out;
};

// Stage 1: block prediction from the block statistics of a QuantizedQKV.
struct PredictParams {
  Device device = Device::kCPU;
  Stream stream = nullptr;
  Shape shape;
  BlockConfig blocks;
  Causal causal = Causal::kNone;
  float sm_scale = 0.0f;  // 0 means D^-0.5
  Selection select;
  QuantizedQKV stats;        // reads q_pool, q_sim, k_pool, k_sim (and k_spikes for BlockScore::kSpikes)
  BlockIndex out;
  uint8_t* mask_out = nullptr;  // optional [B, Hq, nbq, nbk]: 1 where a block is kept
  int64_t* stats_out = nullptr;  // optional [kStatCount]: writes kStatBlocksKept and kStatBlocksAllowed
};

// Stage 2: sparse attention over the kept blocks with the online P·V filter.
struct AttendParams {
  Device device = Device::kCPU;
  Stream stream = nullptr;
  Shape shape;
  BlockConfig blocks;
  Causal causal = Causal::kNone;
  QuantOptions quant;        // granularity and pv must match the quantize stage
  QuantizedQKV quantized;
  BlockIndex index;
  HeadParam pvthreshd{15.0f};  // skip P·V of a block for a 16-row group when every row's block max
                               // is more than pvthreshd (log2 units) under its running max
  void* o = nullptr;           // [B, Hq, Lq, D]
  DType o_dtype = DType::kFloat16;
  Strides o_strides;
  float* lse = nullptr;        // optional [B, Hq, Lq], natural log, of the un-smoothed scores
  int64_t* stats_out = nullptr;  // optional [kStatCount]: writes kStatPvUnits and kStatPvSkipped
  // Optional scratch of attend_workspace_size(params) bytes on the backend's device, 256-byte aligned:
  // lets the CUDA kernel split its last round of work tiles over every SM (layout.h). Results then
  // differ from a call without it by accumulation-order rounding (and the P·V filter of a split
  // tile's later pieces starts from their own running maxima).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// The whole operation: quantize → predict → attend, with caller-provided workspace.
struct AttentionParams {
  Device device = Device::kCPU;
  Stream stream = nullptr;
  Shape shape;
  BlockConfig blocks;
  Causal causal = Causal::kNone;
  Inputs in;
  QuantOptions quant;
  Selection select;
  HeadParam pvthreshd{15.0f};
  void* o = nullptr;           // [B, Hq, Lq, D]
  DType o_dtype = DType::kFloat16;
  Strides o_strides;
  float* lse = nullptr;        // optional [B, Hq, Lq]
  int64_t* stats_out = nullptr;  // optional [kStatCount]; left untouched when B·Hq·Lq = 0
  void* workspace = nullptr;   // workspace_size(params) bytes on the backend's device, 256-byte aligned
  size_t workspace_bytes = 0;
};

}  // namespace sparge
