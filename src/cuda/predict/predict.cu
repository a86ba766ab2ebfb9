// Stage 1 on the GPU: block prediction (docs/method.md §1), one or two kernels, no host
// synchronisation, no allocation. score_kernel (TopK / CDF only) computes the compressed scores
// of groups of up to kMaxGroup consecutive Q blocks of one b·Hq together, so each K block's
// statistics (3 rows of D floats with the spike keys) are read once per group rather than once
// per Q block, in one pass over D for all of them; it parks them in the index output. Then one
// of two selection kernels writes the index lists: select_rows_kernel, one warp per (Q block,
// b·Hq), for dense, block-mask and TopK rows (up to kWarpSelectMaxBlocks K blocks), or
// select_kernel, one CTA per row, for CDF, longer TopK rows, and small problems: when the groups
// would hold one Q block each (score_group == 1), score_kernel is not launched and select_kernel
// computes its row's scores itself with the same block_scores call for a group of one (the same
// values bit for bit), and the host clears the statistics counters that score_kernel would have
// cleared.
//
// TopK and CDF avoid sorting, working on order-preserving integer keys of the scores: TopK finds
// the key of its last kept block exactly by a radix selection (four 8-bit digit histograms in
// shared memory; over at most 32 blocks one warp ranks them instead), CDF its mass threshold by a
// 32-step bitwise search (its float sums in a fixed order).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/common/chained_launch.cuh"
#include "cuda/common/device_utils.cuh"
#include "cuda/common/ptx_memory.cuh"
#include "cuda/cuda_backend.h"
#include "sparge/layout.h"

namespace sparge::cuda {
namespace {

// select_kernel's CTA, one Q block row: a chain of barriers and dependent loads over a few hundred
// entries, so small CTAs keep more rows in flight per SM (8 CTAs of 128 threads at 64 registers).
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kScoreThreads = 128;  // K blocks per score_kernel CTA
constexpr int kMaxGroup = 16;  // Q blocks per score_kernel thread
constexpr int kDotRows = 1 + static_cast<int>(kSpikeKeys);  // y rows of a K block: pooled, spike keys
// score_kernel's staged K statistics: kScoreCols columns of every row of its kScoreThreads K blocks
// per stage, rows padded to kScorePitch floats (a thread's 16-byte reads of its own row are then
// conflict-free: consecutive rows start 5 16-byte units apart).
constexpr int kScoreCols = 16;
constexpr int kScorePitch = kScoreCols + 4;

enum : uint8_t { kCandidate = 1, kKept = 2 };

struct PredictArgs {
  Shape shape;
  BlockConfig blocks;
  Causal causal;
  float sm_scale;
  Selection select;
  const float* q_pool;  // [B, Hq, nbq, D]
  const float* q_sim;   // [B, Hq, nbq]
  const float* k_pool;  // [B, Hkv, nbk, D]
  const float* k_sim;   // [B, Hkv, nbk]
  const float* k_spikes;  // [B, Hkv, nbk, kSpikeKeys, D] (BlockScore::kSpikes)
  int32_t* index;       // [B, Hq, nbq, nbk]
  int32_t* count;       // [B, Hq, nbq]
  uint8_t* mask_out;    // [B, Hq, nbq, nbk] or null
  unsigned long long* stats;  // [kStatCount] or null
  int64_t nbq;
  int64_t nbk;
  int group;  // Q blocks per score_kernel thread (1: select_kernel scores its own row)
  bool staged;  // score_kernel stages the K statistics in shared memory (staged_scores)
  uint32_t* zero;   // [zero_words], set to 0 by the selection kernel's first CTA (predict's ZeroRange), or null
  int64_t zero_words;
};

// The selection kernels (the call's last) clear predict's ZeroRange: the first CTA's threads, after the
// wait for the earlier grids (which may still have read it).
__device__ __forceinline__ void clear_zero_range(const PredictArgs& a) {
  if (a.zero == nullptr || blockIdx.x != 0 || blockIdx.y != 0) return;
  for (int64_t w = threadIdx.x; w < a.zero_words; w += blockDim.x) a.zero[w] = 0u;
}

__device__ __forceinline__ float head_value(HeadParam hp, int64_t h) {
  return hp.per_head != nullptr ? hp.per_head[h] : hp.value;
}

// Integer key with the order of the float (larger score → larger key).
__device__ __forceinline__ uint32_t order_key(float s) {
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix count of `flag` over the threads of the CTA, in thread order; `total` gets
// the CTA's count. `scratch` holds kWarps ints.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* scratch, int& total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  __syncthreads();
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// out[g][r] = Σ_d x[g][d] · y[r][d] for g < n, each in ascending d, one fused multiply-add per
// column like the CPU reference. One pass over d for all kRows rows of y (a K block's pooled row and
// spike keys, global memory, each element loaded once) and all n rows of x (pooled queries,
// shared memory): kGroup · kRows independent chains per thread.
template <int kGroup, int kRows>
__device__ __forceinline__ void ordered_dots(const float* x, int n, const float* const (&y)[kRows], int64_t dim,
                                             float (&out)[kGroup][kRows]) {
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) out[g][r] = 0.0f;
  }
  auto add = [&](int g, float xd, const float (&yd)[kRows]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) out[g][r] = __fmaf_rn(xd, yd[r], out[g][r]);
  };
  bool aligned = dim % 4 == 0 && reinterpret_cast<uintptr_t>(x) % sizeof(float4) == 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) aligned = aligned && reinterpret_cast<uintptr_t>(y[r]) % sizeof(float4) == 0;
  // 16-byte loads; the next 4 columns of y are in flight while these are used (y comes from L2).
  // A full group (every group but a short last one) runs without a row check per group.
  auto aligned_dots = [&](auto full_c) {
    constexpr bool kFull = decltype(full_c)::value;
    float4 y4[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) y4[r] = *reinterpret_cast<const float4*>(y[r]);
    for (int64_t d = 0; d < dim; d += 4) {
      float yd[4][kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        yd[0][r] = y4[r].x;
        yd[1][r] = y4[r].y;
        yd[2][r] = y4[r].z;
        yd[3][r] = y4[r].w;
      }
      if (d + 4 < dim) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) y4[r] = *reinterpret_cast<const float4*>(y[r] + d + 4);
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (kFull || g < n) {
          const float4 x4 = *reinterpret_cast<const float4*>(x + g * dim + d);
          add(g, x4.x, yd[0]);
          add(g, x4.y, yd[1]);
          add(g, x4.z, yd[2]);
          add(g, x4.w, yd[3]);
        }
      }
    }
  };
  if (aligned && n == kGroup) {
    aligned_dots(std::true_type{});
  } else if (aligned) {
    aligned_dots(std::false_type{});
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      float yd[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) yd[r] = y[r][d];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (g < n) add(g, x[g * dim + d], yd);
      }
    }
  }
}

// Keys of K block j, and how many of them are spike keys.
__device__ __forceinline__ int64_t block_keys(const PredictArgs& a, int64_t j) {
  return min(a.blocks.block_k, a.shape.len_k - j * a.blocks.block_k);
}
__device__ __forceinline__ int64_t spike_keys(const PredictArgs& a, int64_t j) {
  return min(static_cast<int64_t>(kSpikeKeys), block_keys(a, j));
}

// kSpikes score of K block j from its dot products with the pooled queries: dots[g][0] with the
// pooled K row, dots[g][1 + t] with spike key t (used for t < spike_keys).
template <int kGroup>
__device__ void spike_scores(const PredictArgs& a, int64_t j, int n_rows, const float (&dots)[kGroup][kDotRows],
                             float (&out)[kGroup]) {
  const int64_t n = block_keys(a, j);
  const int64_t m = spike_keys(a, j);
  const float rest = static_cast<float>(n - m);
  const float log_rest = n > m ? logf(rest) : 0.0f;
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g >= n_rows) continue;
    const float dot = dots[g][0];
    // Terms in order: spike[t] for t < m, then the rest term when n > m (constant indices only, so
    // the terms stay in registers).
    float term[kSpikeKeys];
    float spike_sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kSpikeKeys; ++t) {
      term[t] = 0.0f;
      if (t < m) {
        spike_sum = __fadd_rn(spike_sum, dots[g][1 + t]);
        term[t] = __fmul_rn(dots[g][1 + t], a.sm_scale);
      }
    }
    const bool has_rest = n > m;
    float rest_term = 0.0f;
    if (has_rest) {
      const float value = __fmul_rn(
          __fdiv_rn(__fsub_rn(__fmul_rn(static_cast<float>(n), dot), spike_sum), rest), a.sm_scale);
      rest_term = __fadd_rn(value, log_rest);
    }
    float max_term = m > 0 ? term[0] : rest_term;
#pragma unroll
    for (int t = 1; t < kSpikeKeys; ++t) {
      if (t < m) max_term = fmaxf(max_term, term[t]);
    }
    if (has_rest) max_term = fmaxf(max_term, rest_term);
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kSpikeKeys; ++t) {
      if (t < m) sum = __fadd_rn(sum, expf(__fsub_rn(term[t], max_term)));
    }
    if (has_rest) sum = __fadd_rn(sum, expf(__fsub_rn(rest_term, max_term)));
    out[g] = __fadd_rn(max_term, logf(sum));
  }
}

// Compressed scores of K block j for the n pooled queries of the group (method.md §1, "Block
// scores"), one thread per K block, in the exact fp32 order of the CPU reference: kMean s·q̄·k̄;
// kSpikes log(Σ_t exp(s·q̄·k*_t) + (n − m)·exp(s·q̄·k̄')), k̄' the mean of the other n − m keys. With
// kSpikes every spike row is multiplied (rows t >= m hold zeros and are not used).
// The scores from the dot products with the rows of K block j: dots_of(dots) fills float[kGroup][1] (kMean:
// the pooled K row) or float[kGroup][kDotRows] (kSpikes: the pooled K row, then the spike keys).
template <int kGroup, typename DotsOf>
__device__ __forceinline__ void scores_from_dots(const PredictArgs& a, int64_t j, int n_rows, DotsOf&& dots_of,
                                                 float (&out)[kGroup]) {
  if (a.select.block_score != BlockScore::kSpikes) {
    float dots[kGroup][1];
    dots_of(dots);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) out[g] = __fmul_rn(dots[g][0], a.sm_scale);
    return;
  }
  float dots[kGroup][kDotRows];
  dots_of(dots);
  spike_scores(a, j, n_rows, dots, out);
}

// The number of rows of K block j that a dots array of scores_from_dots holds.
template <typename Dots>
inline constexpr int kRowsOf = static_cast<int>(std::extent_v<std::remove_reference_t<Dots>, 1>);

template <int kGroup>
__device__ void block_scores(const PredictArgs& a, const float* q_rows, int n_rows, int64_t bhk, int64_t j,
                             float (&out)[kGroup]) {
  const int64_t dim = a.shape.head_dim;
  const float* k_row = a.k_pool + (bhk * a.nbk + j) * dim;
  static_assert(kDotRows == 3, "the pooled K row and two spike keys");
  scores_from_dots<kGroup>(a, j, n_rows, [&](auto& dots) {
    if constexpr (kRowsOf<decltype(dots)> == 1) {
      ordered_dots<kGroup, 1>(q_rows, n_rows, {k_row}, dim, dots);
    } else {
      const float* spikes = a.k_spikes + (bhk * a.nbk + j) * kSpikeKeys * dim;
      ordered_dots<kGroup, kDotRows>(q_rows, n_rows, {k_row, spikes, spikes + dim}, dim, dots);
    }
  }, out);
}

// The b·Hkv row of the K statistics that b·Hq row bh reads.
__device__ __forceinline__ int64_t kv_row(const PredictArgs& a, int64_t bh) {
  const int heads_q = static_cast<int>(a.shape.heads_q);
  return (bh / heads_q) * a.shape.heads_kv +
         static_cast<int>(bh % heads_q) / (heads_q / static_cast<int>(a.shape.heads_kv));
}

// Blocks of Q block i with at least one visible key (32-bit division: lengths fit in int).
__device__ __forceinline__ int64_t allowed_blocks(const PredictArgs& a, int64_t i) {
  const Shape& s = a.shape;
  const int64_t r1 = min((i + 1) * a.blocks.block_q, s.len_q) - 1;
  const int64_t end_r1 = visible_end(r1, a.causal, s.len_q, s.len_k);
  const int bk = static_cast<int>(a.blocks.block_k);
  return end_r1 <= 0 ? 0 : min(a.nbk, static_cast<int64_t>((static_cast<int>(end_r1) + bk - 1) / bk));
}

// What classifying the allowed K blocks of Q block i of b·Hq row bh takes (TopK / CDF).
struct RowRules {
  int64_t bhk;     // the kv head row
  int64_t end_r0;  // visible_end of the block's first row
  float sim_threshold;
  bool q_uniform;
};

__device__ __forceinline__ RowRules row_rules(const PredictArgs& a, int64_t bh, int64_t i) {
  const float sim_threshold = head_value(a.select.simthreshd1, bh % a.shape.heads_q);
  return {.bhk = kv_row(a, bh),
          .end_r0 = visible_end(i * a.blocks.block_q, a.causal, a.shape.len_q, a.shape.len_k),
          .sim_threshold = sim_threshold,
          .q_uniform = a.q_sim[bh * a.nbq + i] > sim_threshold};
}

// kCandidate (uniform) and kKept (method.md §1, "Always kept") of allowed K block j.
__device__ __forceinline__ uint8_t block_state(const PredictArgs& a, const RowRules& r, int64_t j) {
  const bool partial = min((j + 1) * a.blocks.block_k, a.shape.len_k) > r.end_r0;
  const bool k_uniform = a.k_sim[r.bhk * a.nbk + j] > r.sim_threshold;
  const bool kept = !r.q_uniform || !k_uniform || partial || (a.select.attention_sink && j == 0);
  return static_cast<uint8_t>((k_uniform ? kCandidate : 0) | (kept ? kKept : 0));
}

// How many candidates TopK keeps: min(n_cand, clamp(⌊topk · n_allowed + 0.5⌋, 1, n_allowed)), in fp32.
__device__ __forceinline__ int64_t topk_keep_count(const PredictArgs& a, int64_t h, int64_t n_allowed, int n_cand) {
  const float topk = head_value(a.select.topk, h);
  int64_t n_keep = static_cast<int64_t>(floorf(topk * static_cast<float>(n_allowed) + 0.5f));
  n_keep = n_keep < 1 ? 1 : (n_keep > n_allowed ? n_allowed : n_keep);
  return n_keep > n_cand ? static_cast<int64_t>(n_cand) : n_keep;
}

// One warp's digit search of a radix selection over a 256-bin histogram: lane l reads bins
// 8l .. 8l + 7, and the digit d wanted has Σ_{e > d} < remaining <= Σ_{e >= d}. Exactly one lane
// holds it: that lane returns true with *digit = d and *above = Σ_{e > d}. Every lane must call it.
__device__ __forceinline__ bool find_digit(const int* hist, int remaining, int* digit, int* above) {
  const int lane = threadIdx.x % kWarpSize;
  int c[8];
  int total = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    c[e] = hist[8 * lane + e];
    total += c[e];
  }
  int from_lane = total;  // Σ over lanes >= this one
#pragma unroll
  for (int o = 1; o < kWarpSize; o *= 2) {
    const int other = __shfl_down_sync(0xffffffffu, from_lane, o);
    if (lane + o < kWarpSize) from_lane += other;
  }
  int a = from_lane - total;
  if (from_lane < remaining || a >= remaining) return false;
  int d = 0;
  for (int e = 7; e >= 0; --e) {
    if (a + c[e] >= remaining) {
      d = e;
      break;
    }
    a += c[e];
  }
  *digit = 8 * lane + d;
  *above = a;
  return true;
}

// Shared scratch of kth_largest_key: a histogram of one 8-bit digit, the key prefix found so far
// and how many keys are still to be passed over.
struct RadixScratch {
  int hist[256];
  uint32_t prefix;
  int remaining;
};

// The order key of the k-th largest candidate score (1 <= k <= #candidates): the largest T with
// #{key >= T} >= k, found digit by digit (four 8-bit passes over the candidates, most significant
// first), each pass a shared histogram of the candidates that match the digits found so far.
__device__ uint32_t kth_largest_key(const float* score, const uint8_t* state, int64_t n, int k, RadixScratch& rs) {
  if (threadIdx.x == 0) {
    rs.prefix = 0;
    rs.remaining = k;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int e = threadIdx.x; e < 256; e += kThreads) rs.hist[e] = 0;
    __syncthreads();
    const uint32_t prefix = rs.prefix;
    const uint64_t high_mask = ~((uint64_t{1} << (shift + 8)) - 1);  // the digits already found
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const uint32_t key = order_key(score[j]);
      if ((state[j] & kCandidate) && ((key ^ prefix) & high_mask) == 0) atomicAdd(&rs.hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < kWarpSize) {
      const int remaining = rs.remaining;
      int digit = 0;
      int above = 0;
      const bool holder = find_digit(rs.hist, remaining, &digit, &above);
      __syncwarp();  // every lane has read rs.remaining before one lane writes it
      if (holder) {
        rs.prefix = prefix | (static_cast<uint32_t>(digit) << shift);
        rs.remaining = remaining - above;
      }
    }
    __syncthreads();
  }
  return rs.prefix;
}

// The count of Q block row `row` (b·Hq·nbq + i) and its share of the statistics counters; one
// thread per row calls it after the row's index list.
__device__ __forceinline__ void record_row(const PredictArgs& a, int64_t row, int written, int64_t n_allowed) {
  a.count[row] = written;
  if (a.stats != nullptr) {
    atomicAdd(&a.stats[kStatBlocksKept], static_cast<unsigned long long>(written));
    atomicAdd(&a.stats[kStatBlocksAllowed], static_cast<unsigned long long>(n_allowed));
  }
}

// TopK / CDF selection, index list and statistics of Q block i of b·Hq row bh, from the scores of
// its candidates in `score` ([nbk], shared memory). `state` ([nbk], shared) is scratch.
__device__ void select_row(const PredictArgs& a, int64_t bh, int64_t i, const float* score, uint8_t* state,
                           int* iscratch, float* fscratch, RadixScratch& radix) {
  const int64_t h = bh % a.shape.heads_q;
  const int64_t n_allowed = allowed_blocks(a, i);
  const SelectMode mode = a.select.mode;
  const int64_t row = bh * a.nbq + i;
  const RowRules rules = row_rules(a, bh, i);
  for (int64_t j = threadIdx.x; j < a.nbk; j += kThreads) state[j] = j < n_allowed ? block_state(a, rules, j) : 0;
  __syncthreads();

  int n_cand = 0;
  {
    int local = 0;
    for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) local += (state[j] & kCandidate) ? 1 : 0;
    n_cand = block_sum(local, iscratch);
  }

  if (mode == SelectMode::kTopK && n_cand > 0) {
    const int64_t n_keep = topk_keep_count(a, h, n_allowed, n_cand);
    if (n_allowed <= kWarpSize) {
      // Few blocks (short sequences): one warp ranks every candidate against all others by
      // (key desc, index asc) and keeps ranks < n_keep, the same set as the search below,
      // without its 32 CTA-wide reductions.
      if (threadIdx.x < kWarpSize) {
        const int j = static_cast<int>(threadIdx.x);
        const bool cand = j < n_allowed && (state[j] & kCandidate);
        const uint32_t key = cand ? order_key(score[j]) : 0u;
        int rank = 0;
        for (int o = 0; o < n_allowed; ++o) {
          const bool other_cand = __shfl_sync(0xffffffffu, cand, o);
          const uint32_t other_key = __shfl_sync(0xffffffffu, key, o);
          rank += other_cand && (other_key > key || (other_key == key && o < j)) ? 1 : 0;
        }
        if (cand && rank < n_keep) state[j] |= kKept;
      }
      __syncthreads();
    } else {
      const uint32_t threshold = kth_largest_key(score, state, n_allowed, static_cast<int>(n_keep), radix);
      int above = 0;
      {
        int local = 0;
        for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) {
          local += ((state[j] & kCandidate) && order_key(score[j]) > threshold) ? 1 : 0;
        }
        above = block_sum(local, iscratch);
      }
      // Ties at the threshold: the lowest indices first.
      int ties_taken = 0;
      for (int64_t base = 0; base < n_allowed; base += kThreads) {
        const int64_t j = base + threadIdx.x;
        const bool cand = j < n_allowed && (state[j] & kCandidate);
        const uint32_t key = cand ? order_key(score[j]) : 0u;
        int chunk_ties = 0;
        const int rank = block_exclusive_count(cand && key == threshold, iscratch, chunk_ties);
        if (cand && (key > threshold || (key == threshold && ties_taken + rank < n_keep - above))) state[j] |= kKept;
        ties_taken += chunk_ties;
      }
      __syncthreads();
    }
  } else if (mode == SelectMode::kCdf && n_cand > 0) {
    float local_max = -INFINITY;
    for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) {
      if (state[j] & kCandidate) local_max = fmaxf(local_max, score[j]);
    }
    local_max = warp_max(local_max);
    if (threadIdx.x % kWarpSize == 0) fscratch[threadIdx.x / kWarpSize] = local_max;
    __syncthreads();
    float smax = -INFINITY;
    for (int w = 0; w < kWarps; ++w) smax = fmaxf(smax, fscratch[w]);
    __syncthreads();
    // Un-normalised masses e_j = exp(g · (s_j - max)); keep the fewest top blocks with Σe >= cdf·Σe.
    const float gain = cdf_score_gain(a.q_sim[bh * a.nbq + i], a.select.cdf_sharpen);
    float local_sum = 0.0f;
    for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) {
      if (state[j] & kCandidate) local_sum += expf(gain * (score[j] - smax));
    }
    const float total = block_sum(local_sum, fscratch);
    const float target = head_value(a.select.cdfthreshd, h) * total;
    uint32_t threshold = 0;  // keeps every candidate when the target is never reached
    if (total >= target) {
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t trial = threshold | (1u << bit);
        float mass = 0.0f;
        for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) {
          if ((state[j] & kCandidate) && order_key(score[j]) >= trial) mass += expf(gain * (score[j] - smax));
        }
        if (block_sum(mass, fscratch) >= target) threshold = trial;
      }
    }
    for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) {
      if ((state[j] & kCandidate) && order_key(score[j]) >= threshold) state[j] |= kKept;
    }
    __syncthreads();
  }

  // At least one block: the best candidate (lowest index among equal scores).
  if (n_cand > 0) {
    int local_kept = 0;
    for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) local_kept += (state[j] & kKept) ? 1 : 0;
    if (block_sum(local_kept, iscratch) == 0 && threadIdx.x == 0) {
      int64_t best = -1;
      for (int64_t j = 0; j < n_allowed; ++j) {
        if ((state[j] & kCandidate) && (best < 0 || score[j] > score[best])) best = j;
      }
      state[best] |= kKept;
    }
    __syncthreads();
  }

  // Ascending index list, count, optional mask and statistics.
  int written = 0;
  for (int64_t base = 0; base < a.nbk; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const bool kept = j < a.nbk && (state[j] & kKept);
    int chunk = 0;
    const int pos = block_exclusive_count(kept, iscratch, chunk);
    if (kept) a.index[row * a.nbk + written + pos] = static_cast<int32_t>(j);
    if (j < a.nbk && a.mask_out != nullptr) a.mask_out[row * a.nbk + j] = kept ? 1 : 0;
    written += chunk;
  }
  for (int64_t k = written + threadIdx.x; k < a.nbk; k += kThreads) a.index[row * a.nbk + k] = -1;
  if (threadIdx.x == 0) record_row(a, row, written, n_allowed);
}

// Whether score_kernel can stage the K statistics in 16-byte pieces (any head dim a multiple of 4,
// 16-byte aligned statistics: the fused op's and sparge.quantize's buffers are).
bool staged_scores(const PredictParams& p) {
  auto aligned = [](const float* x) { return reinterpret_cast<uintptr_t>(x) % kCpAsyncBytes == 0; };
  return p.shape.head_dim % 4 == 0 && aligned(p.stats.k_pool) &&
         (p.select.block_score != BlockScore::kSpikes || aligned(p.stats.k_spikes));
}

// Shared memory of score_kernel<kGroup>: the pooled queries, then two stages of staged K statistics.
size_t score_smem_bytes(int group, const PredictArgs& a) {
  const int rows = a.select.block_score == BlockScore::kSpikes ? kDotRows : 1;
  const size_t stages = a.staged ? 2 * static_cast<size_t>(rows) * kScoreThreads * kScorePitch : 0;
  return sizeof(float) * (static_cast<size_t>(group) * static_cast<size_t>(a.shape.head_dim) + stages);
}

// ordered_dots for the CTA's kScoreThreads K blocks [j0, j0 + kScoreThreads), thread t for block j0 + t:
// the kRows rows of every block (k_pool, then the spike keys) come through shared memory kScoreCols
// columns at a time in two stages (cp.async), loaded as whole 64-byte row pieces; unstaged, each
// thread read 16 bytes of each of its rows per step, rows 512 bytes apart (D128), so a warp's load
// touched 32 sectors for 512 bytes. Same fused multiply-adds in the same order (bit-identical).
// score_kernel<16> with spike keys 96.3 -> 80.1 µs at B1 H16 L32k D128, B2 H16 L8k 22.8 -> 17.8,
// mean scores 41.0 -> 37.2, D64 103.0 -> 101.4 (bench/RESULTS.md, session 26): now bound by the
// shared-memory reads of the pooled queries (16 broadcast 16-byte reads per 192 fmas). x:
// kGroup rows of dim floats in shared memory (rows past the group's hold zeros). Every thread of
// the CTA calls it (blocks from n_scored on are zeros, their results unused).
template <int kGroup, int kRows>
__device__ __forceinline__ void staged_dots(const PredictArgs& a, const float* x, int64_t bhk, int64_t j0,
                                            int64_t n_scored, float* stage, float (&out)[kGroup][kRows]) {
  const int64_t dim = a.shape.head_dim;
  constexpr int kPieces = kScoreCols / 4;  // 16-byte pieces per staged row
  constexpr int kStageFloats = kRows * kScoreThreads * kScorePitch;
  const int64_t chunks = (dim + kScoreCols - 1) / kScoreCols;
  // Pass i of a stage: thread t copies 16-byte piece t % kPieces of row kind r = i / 4 (k_pool, then the
  // spike keys) of block j0 + t / kPieces + 32 · (i % 4), so four passes cover the CTA's blocks.
  static_assert(kScoreThreads / kPieces == 32 && 4 * 32 == kScoreThreads, "four passes of 32 blocks per row kind");
  const int piece = static_cast<int>(threadIdx.x) % kPieces;
  const int64_t first = j0 + static_cast<int>(threadIdx.x) / kPieces;
  const float* pool_src = a.k_pool + (bhk * a.nbk + first) * dim + 4 * piece;
  const float* spike_src = kRows > 1 ? a.k_spikes + (bhk * a.nbk + first) * kSpikeKeys * dim + 4 * piece : nullptr;
  const uint32_t dst0 = smem_address(stage + (threadIdx.x / kPieces) * kScorePitch + 4 * piece);
  auto load = [&](int64_t chunk) {
    const int64_t d0 = chunk * kScoreCols;
    const uint32_t dst = dst0 + static_cast<uint32_t>((chunk % 2) * kStageFloats * sizeof(float));
    const bool in_row = d0 + 4 * piece < dim;
#pragma unroll
    for (int i = 0; i < 4 * kRows; ++i) {
      const int r = i / 4, pass = i % 4;
      const bool valid = in_row && first + 32 * pass < n_scored;
      const float* src = r == 0 ? pool_src + 32 * pass * dim : spike_src + ((r - 1) + 32 * pass * kSpikeKeys) * dim;
      cp_async_16_zfill(dst + static_cast<uint32_t>((r * kScoreThreads + 32 * pass) * kScorePitch * sizeof(float)),
                        valid ? src + d0 : a.k_pool, valid);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) out[g][r] = 0.0f;
  }
  auto add4 = [&](const float* mine, int64_t d, int c) {
    float4 y4[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) y4[r] = *reinterpret_cast<const float4*>(mine + r * kScoreThreads * kScorePitch + c);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float4 x4 = *reinterpret_cast<const float4*>(x + g * dim + d);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        out[g][r] = __fmaf_rn(x4.x, y4[r].x, out[g][r]);
        out[g][r] = __fmaf_rn(x4.y, y4[r].y, out[g][r]);
        out[g][r] = __fmaf_rn(x4.z, y4[r].z, out[g][r]);
        out[g][r] = __fmaf_rn(x4.w, y4[r].w, out[g][r]);
      }
    }
  };
  load(0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    if (chunk + 1 < chunks) {
      load(chunk + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* mine = stage + (chunk % 2) * kStageFloats + threadIdx.x * kScorePitch;
    const int64_t d0 = chunk * kScoreCols;
    const int cols = static_cast<int>(min(static_cast<int64_t>(kScoreCols), dim - d0));
#pragma unroll 1
    for (int c = 0; c < cols; c += 4) add4(mine, d0 + c, c);
    __syncthreads();  // the stage is read before chunk + 2 overwrites it
  }
}

// Compressed scores of a group of kGroup consecutive Q blocks (TopK / CDF; fewer in the last
// group), written as fp32 bits into their rows of the index output, which select_kernel reads
// back before it overwrites them: one thread per K block (kScoreThreads of them per CTA along
// grid z), every K statistic read once for the whole group (the pooled queries are a
// shared-memory broadcast; the K statistics staged through shared memory where a.staged). The
// last Q block of a group allows the most K blocks; entries past a row's allowed blocks are
// scored but never read. Also clears the block counters of the statistics, which the selection
// adds to (in place of a memset call).
template <int kGroup>
__global__ void __launch_bounds__(kScoreThreads) score_kernel(PredictArgs a) {
  extern __shared__ float4 q_rows4[];  // [kGroup][D] floats, then (a.staged) the stages of staged_dots
  float* q_rows = reinterpret_cast<float*>(q_rows4);
  wait_for_prior_grids();
  if (a.stats != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0) {
    a.stats[kStatBlocksKept] = 0;
    a.stats[kStatBlocksAllowed] = 0;
  }
  const Shape& s = a.shape;
  const int64_t bh = blockIdx.y;
  const int64_t bhk = kv_row(a, bh);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kGroup;
  const int n_rows = static_cast<int>(min(static_cast<int64_t>(kGroup), a.nbq - i0));
  const int64_t dim = s.head_dim;
  const int64_t n_scored = allowed_blocks(a, i0 + n_rows - 1);
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * kScoreThreads;
  if (j0 >= n_scored) return;  // the whole CTA
  const int64_t x_floats = (a.staged ? kGroup : n_rows) * dim;
  for (int64_t e = threadIdx.x; e < x_floats; e += kScoreThreads) {
    q_rows[e] = e < n_rows * dim ? a.q_pool[(bh * a.nbq + i0) * dim + e] : 0.0f;
  }
  __syncthreads();
  const int64_t j = j0 + threadIdx.x;
  float out[kGroup];
  if (a.staged) {
    // Every thread of the CTA stages; those past the allowed blocks score zeros and write nothing.
    float* stage = q_rows + kGroup * dim;
    scores_from_dots<kGroup>(a, j, n_rows, [&](auto& dots) {
      staged_dots<kGroup, kRowsOf<decltype(dots)>>(a, q_rows, bhk, j0, n_scored, stage, dots);
    }, out);
    if (j >= n_scored) return;
  } else {
    if (j >= n_scored) return;
    block_scores(a, q_rows, n_rows, bhk, j, out);
  }
  float* out_rows = reinterpret_cast<float*>(a.index) + (bh * a.nbq + i0) * a.nbk;
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g < n_rows) out_rows[g * a.nbk + j] = out[g];
  }
}

// TopK / CDF selection of one Q block per CTA: its scores into shared memory, then select_row.
// With groups of one Q block (a.group == 1) the CTA computes them itself, exactly as score_kernel
// would for a group of one (no score_kernel launch); else it reads them from its index row.
__global__ void __launch_bounds__(kThreads) select_kernel(PredictArgs a) {
  extern __shared__ float score[];  // [nbk], then (scores computed here) q_row[D], then state[nbk] (uint8_t)
  const bool fused = a.group == 1;
  const int64_t dim = a.shape.head_dim;
  float* q_row = score + a.nbk;
  uint8_t* state = reinterpret_cast<uint8_t*>(q_row + (fused ? dim : 0));
  __shared__ int iscratch[kWarps];
  __shared__ RadixScratch radix;
  __shared__ float fscratch[kWarps];
  wait_for_prior_grids();
  clear_zero_range(a);
  const int64_t bh = blockIdx.y;
  const int64_t i = blockIdx.x;
  if (fused) {
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) q_row[d] = a.q_pool[(bh * a.nbq + i) * dim + d];
    __syncthreads();
    const int64_t bhk = kv_row(a, bh);
    const int64_t n_allowed = allowed_blocks(a, i);
    for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) {
      float out[1];
      block_scores(a, q_row, 1, bhk, j, out);
      score[j] = out[0];
    }
    __syncthreads();
  } else {
    const float* row_scores = reinterpret_cast<const float*>(a.index) + (bh * a.nbq + i) * a.nbk;
    const int64_t n_allowed = allowed_blocks(a, i);
    for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) score[j] = row_scores[j];
    __syncthreads();  // every score is read before select_row writes the index row
  }
  select_row(a, bh, i, score, state, iscratch, fscratch, radix);
}

// ---- One warp per Q block row: dense, block mask, and TopK over score_kernel's scores ---------
// select_kernel's time goes to CTA barriers between dependent steps (latency, not work: session
// 12); a warp per row synchronizes by shuffles and votes only. Each lane owns the entries
// j ≡ lane (mod 32) of its row throughout, so only the radix histogram is shared between lanes.
constexpr int kRowWarps = kThreads / kWarpSize;  // rows per select_rows_kernel CTA
constexpr int kRadixBins = 256;
// TopK keeps per warp the order keys (4 bytes), states (1 byte) and a histogram: under the 48 KB of
// dynamic shared memory that needs no opt-in for 4 warps up to this many K blocks (L = 131072 at
// block_k = 64); longer rows take select_kernel.
constexpr int64_t kWarpSelectMaxBlocks = 2048;

// 32-bit words of one warp's TopK slice: keys [nbk], histogram [kRadixBins], states [nbk] bytes.
__host__ __device__ constexpr int64_t warp_slice_words(int64_t nbk) { return nbk + kRadixBins + ceil_div(nbk, 4); }
static_assert(kRowWarps * warp_slice_words(kWarpSelectMaxBlocks) * sizeof(uint32_t) <= kDefaultDynamicSmem,
              "select_rows_kernel launches without a shared-memory opt-in");

// kth_largest_key for one warp over its row (n entries, the lanes' own), histogram in `hist`.
__device__ uint32_t warp_kth_largest_key(const uint32_t* key, const uint8_t* state, int64_t n, int k, int* hist) {
  const int lane = threadIdx.x % kWarpSize;
  uint32_t prefix = 0;
  int remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int e = lane; e < kRadixBins; e += kWarpSize) hist[e] = 0;
    __syncwarp();
    const uint32_t high_mask = shift == 24 ? 0u : ~((1u << (shift + 8)) - 1u);  // the digits already found
    for (int64_t j = lane; j < n; j += kWarpSize) {
      if ((state[j] & kCandidate) && ((key[j] ^ prefix) & high_mask) == 0) atomicAdd(&hist[(key[j] >> shift) & 255u], 1);
    }
    __syncwarp();
    int digit = 0;
    int above = 0;
    const int src = __ffs(__ballot_sync(0xffffffffu, find_digit(hist, remaining, &digit, &above))) - 1;
    digit = __shfl_sync(0xffffffffu, digit, src);
    above = __shfl_sync(0xffffffffu, above, src);
    prefix |= static_cast<uint32_t>(digit) << shift;
    remaining -= above;
    __syncwarp();  // every lane has read the histogram before the next pass clears it
  }
  return prefix;
}

// TopK of Q block i of b·Hq row bh (select_row's kTopK rules, the same kept set): marks kKept in
// the warp's states [0, n_allowed), reading the candidates' scores from the index row.
__device__ void warp_select_topk(const PredictArgs& a, int64_t bh, int64_t i, int64_t n_allowed, uint32_t* key,
                                 uint8_t* state, int* hist) {
  const int lane = threadIdx.x % kWarpSize;
  const RowRules rules = row_rules(a, bh, i);
  const float* score = reinterpret_cast<const float*>(a.index) + (bh * a.nbq + i) * a.nbk;
  // The loads of one trip do not depend on each other (the score is read whether or not it is
  // used), and unrolled trips keep several in flight: the trips are latency, not work.
  int local_cand = 0;
#pragma unroll 8
  for (int64_t j = lane; j < n_allowed; j += kWarpSize) {
    const float sc = score[j];
    const uint8_t st = block_state(a, rules, j);
    key[j] = order_key(sc);
    state[j] = st;
    local_cand += (st & kCandidate) ? 1 : 0;
  }
  const int n_cand = __reduce_add_sync(0xffffffffu, local_cand);
  if (!rules.q_uniform || n_cand == 0) return;  // every allowed block is kept already / no candidate
  const int64_t n_keep = topk_keep_count(a, bh % a.shape.heads_q, n_allowed, n_cand);
  const uint32_t threshold = warp_kth_largest_key(key, state, n_allowed, static_cast<int>(n_keep), hist);
  int local_above = 0;
  for (int64_t j = lane; j < n_allowed; j += kWarpSize) {
    local_above += ((state[j] & kCandidate) && key[j] > threshold) ? 1 : 0;
  }
  const int above = __reduce_add_sync(0xffffffffu, local_above);
  // Ties at the threshold: the lowest indices first.
  const unsigned lanes_below = (1u << lane) - 1u;
  int ties_taken = 0;
  for (int64_t base = 0; base < n_allowed; base += kWarpSize) {
    const int64_t j = base + lane;
    const bool cand = j < n_allowed && (state[j] & kCandidate);
    const bool tie = cand && key[j] == threshold;
    const unsigned ties = __ballot_sync(0xffffffffu, tie);
    if (cand && (key[j] > threshold || (tie && ties_taken + __popc(ties & lanes_below) < n_keep - above))) {
      state[j] |= kKept;
    }
    ties_taken += __popc(ties);
  }
}

// One Q block row per warp (kDense, kBlockMask, and kTopK with the scores in the index rows, at most
// kWarpSelectMaxBlocks K blocks): the selection, then the index list, count, optional mask and
// statistics exactly as select_row writes them.
__global__ void __launch_bounds__(kThreads) select_rows_kernel(PredictArgs a) {
  extern __shared__ uint32_t slices[];  // kTopK: per warp warp_slice_words(nbk) words
  wait_for_prior_grids();
  clear_zero_range(a);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp;
  if (row >= a.shape.batch * a.shape.heads_q * a.nbq) return;
  const int64_t bh = row / a.nbq;
  const int64_t i = row % a.nbq;
  const int64_t n_allowed = allowed_blocks(a, i);
  const SelectMode mode = a.select.mode;
  uint8_t* state = nullptr;
  if (mode == SelectMode::kTopK) {
    uint32_t* key = slices + warp * warp_slice_words(a.nbk);
    int* hist = reinterpret_cast<int*>(key + a.nbk);
    state = reinterpret_cast<uint8_t*>(hist + kRadixBins);
    warp_select_topk(a, bh, i, n_allowed, key, state, hist);
  }
  __syncwarp();  // every score of the index row is read before the row is overwritten
  const uint8_t* block_mask = mode == SelectMode::kBlockMask ? a.select.block_mask + row * a.nbk : nullptr;
  int32_t* index = a.index + row * a.nbk;
  const unsigned lanes_below = (1u << lane) - 1u;
  int written = 0;
  for (int64_t base = 0; base < a.nbk; base += kWarpSize) {
    const int64_t j = base + lane;
    bool kept = j < n_allowed;
    if (kept && mode == SelectMode::kBlockMask) kept = block_mask[j] != 0;
    if (kept && mode == SelectMode::kTopK) kept = (state[j] & kKept) != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, kept);
    if (kept) index[written + __popc(ballot & lanes_below)] = static_cast<int32_t>(j);
    if (j < a.nbk && a.mask_out != nullptr) a.mask_out[row * a.nbk + j] = kept ? 1 : 0;
    written += __popc(ballot);
  }
  for (int64_t k = written + lane; k < a.nbk; k += kWarpSize) index[k] = -1;
  if (lane == 0) record_row(a, row, written, n_allowed);
}

}  // namespace

// Q blocks per score_kernel thread: a power of two up to kMaxGroup (each K statistic is read once
// per group) while at least kMinThreads threads share the work (nbq · B·Hq · nbk block pairs).
int score_group(int64_t nbq, int64_t bhq, int64_t nbk) {
  constexpr int64_t kMinThreads = 32768;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>({kMaxGroup, nbq, nbq * bhq * nbk / kMinThreads}));
  int group = 1;
  while (2 * group <= want) group *= 2;
  return group;
}

template <int kGroup>
Status launch_scores(const PredictArgs& args, bool chained, int64_t bhq, cudaStream_t stream) {
  const size_t smem = score_smem_bytes(kGroup, args);
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<score_kernel<kGroup>>(smem, "predict (scores): set shared memory"));
  const dim3 grid(static_cast<unsigned>(ceil_div(args.nbq, kGroup)), static_cast<unsigned>(bhq),
                  static_cast<unsigned>(ceil_div(args.nbk, kScoreThreads)));
  return launch_kernel("predict (scores)", chained, score_kernel<kGroup>, grid, kScoreThreads, smem, stream, args);
}

Status predict(const PredictParams& p, ZeroRange zero) {
  const auto [nbq, nbk] = block_counts(p.shape, p.blocks);
  unsigned long long* stats = reinterpret_cast<unsigned long long*>(p.stats_out);
  const int64_t bhq = p.shape.batch * p.shape.heads_q;
  const bool launches = bhq > 0 && nbq > 0;
  const bool scored = p.select.mode == SelectMode::kTopK || p.select.mode == SelectMode::kCdf;
  const int group = score_group(nbq, bhq, nbk);
  // score_kernel runs for groups of more than one Q block; select_kernel scores groups of one.
  const bool score_launch = launches && scored && group > 1;
  static_assert(kStatBlocksAllowed == kStatBlocksKept + 1, "the two block counters are cleared with one memset");
  if (stats != nullptr && !score_launch) {  // else score_kernel clears them
    SPARGE_CUDA_TRY(cudaMemsetAsync(stats + kStatBlocksKept, 0, 2 * sizeof(int64_t), p.stream), "predict: clear stats");
  }
  if (!launches) {
    if (zero.bytes > 0) SPARGE_CUDA_TRY(cudaMemsetAsync(zero.at, 0, zero.bytes, p.stream), "predict: clear ZeroRange");
    return Status::Ok();
  }
  bool chained = false;
  SPARGE_RETURN_IF_ERROR(chained_launches(&chained));
  const PredictArgs args{.shape = p.shape, .blocks = p.blocks, .causal = p.causal, .sm_scale = p.sm_scale,
                         .select = p.select, .q_pool = p.stats.q_pool, .q_sim = p.stats.q_sim,
                         .k_pool = p.stats.k_pool, .k_sim = p.stats.k_sim, .k_spikes = p.stats.k_spikes,
                         .index = p.out.index,
                         .count = p.out.count, .mask_out = p.mask_out, .stats = stats, .nbq = nbq, .nbk = nbk,
                         .group = group, .staged = staged_scores(p), .zero = static_cast<uint32_t*>(zero.at),
                         .zero_words = static_cast<int64_t>(zero.bytes / sizeof(uint32_t))};
  if (score_launch) {
    switch (group) {
      case 2: SPARGE_RETURN_IF_ERROR(launch_scores<2>(args, chained, bhq, p.stream)); break;
      case 4: SPARGE_RETURN_IF_ERROR(launch_scores<4>(args, chained, bhq, p.stream)); break;
      case 8: SPARGE_RETURN_IF_ERROR(launch_scores<8>(args, chained, bhq, p.stream)); break;
      default: SPARGE_RETURN_IF_ERROR(launch_scores<kMaxGroup>(args, chained, bhq, p.stream)); break;
    }
  }
  // One warp per row wherever the row needs no CTA: dense, block mask, and TopK over score_kernel's
  // scores up to kWarpSelectMaxBlocks; select_kernel for CDF, rows scoring themselves, longer rows.
  const SelectMode mode = p.select.mode;
  if (mode == SelectMode::kDense || mode == SelectMode::kBlockMask ||
      (mode == SelectMode::kTopK && score_launch && nbk <= kWarpSelectMaxBlocks)) {
    const size_t slices = mode == SelectMode::kTopK
                              ? static_cast<size_t>(kRowWarps * warp_slice_words(nbk)) * sizeof(uint32_t)
                              : 0;
    const int64_t rows = nbq * bhq;
    return launch_kernel("predict (rows)", chained, select_rows_kernel,
                         dim3(static_cast<unsigned>(ceil_div(rows, kRowWarps))), kThreads, slices, p.stream, args);
  }
  const size_t q_row_bytes = group == 1 ? static_cast<size_t>(p.shape.head_dim) * sizeof(float) : 0;
  const size_t smem = static_cast<size_t>(nbk) * (sizeof(float) + sizeof(uint8_t)) + q_row_bytes;
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<select_kernel>(smem, "predict: set shared memory"));
  return launch_kernel("predict", chained, select_kernel, dim3(static_cast<unsigned>(nbq), static_cast<unsigned>(bhq)),
                       kThreads, smem, p.stream, args);
}

}  // namespace sparge::cuda
