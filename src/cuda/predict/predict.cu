// Stage 1 on the GPU: block prediction (docs/method.md §1). One CTA per (Q block, b·Hq) row of
// the block map; no host synchronisation, no allocation.
//
// TopK and CDF avoid sorting: a 32-step bitwise search over the order-preserving integer keys
// of the scores finds the selection threshold exactly (TopK) or the mass threshold (CDF).
#include "cuda/common/device_utils.cuh"
#include "cuda/cuda_backend.h"
#include "sparge/layout.h"

namespace sparge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

enum : uint8_t { kAllowed = 1, kCandidate = 2, kKept = 4 };

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
};

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

// BlockScore::kSpikes score of K block j (method.md §1), from `dot` = q̄ · k̄ (warp-uniform):
// log(Σ_t exp(s·q̄·k*_t) + (n − m)·exp(s·q̄·k̄' + ...)) in the exact fp32 order of the CPU reference.
__device__ __forceinline__ float spikes_score(const PredictArgs& a, const float* q_row, int64_t bhk, int64_t j,
                                              float dot, int lane) {
  const Shape& s = a.shape;
  const int64_t bk = a.blocks.block_k;
  const int64_t n = min(bk, s.len_k - j * bk);
  const int64_t m = min(kSpikeKeys, n);
  float term[kSpikeKeys + 1];
  float spike_sum = 0.0f;
#pragma unroll
  for (int t = 0; t < kSpikeKeys; ++t) {
    term[t] = 0.0f;
    if (t < m) {
      const float* kp = a.k_spikes + ((bhk * a.nbk + j) * kSpikeKeys + t) * s.head_dim;
      float b = 0.0f;
      for (int64_t d = lane; d < s.head_dim; d += kWarpSize) b += q_row[d] * kp[d];
      b = warp_sum(b);
      spike_sum += b;
      term[t] = b * a.sm_scale;
    }
  }
  int terms = static_cast<int>(m);
  term[kSpikeKeys] = 0.0f;
  if (n > m) {
    const float rest = static_cast<float>(n - m);
    const float value = __fmul_rn(__fdiv_rn(__fsub_rn(__fmul_rn(static_cast<float>(n), dot), spike_sum), rest),
                                  a.sm_scale);
    term[terms] = __fadd_rn(value, logf(rest));
    ++terms;
  }
  float max_term = term[0];
  for (int t = 1; t < terms; ++t) max_term = fmaxf(max_term, term[t]);
  float sum = 0.0f;
  for (int t = 0; t < terms; ++t) sum += expf(term[t] - max_term);
  return max_term + logf(sum);
}

__global__ void __launch_bounds__(kThreads) predict_kernel(PredictArgs a) {
  extern __shared__ float score[];  // [nbk], followed by uint8_t state[nbk]
  uint8_t* state = reinterpret_cast<uint8_t*>(score + a.nbk);
  __shared__ float q_row[kMaxHeadDim];
  __shared__ int iscratch[kWarps];
  __shared__ float fscratch[kWarps];

  const Shape& s = a.shape;
  const int64_t i = blockIdx.x;
  const int64_t bh = blockIdx.y;
  const int heads_q = static_cast<int>(s.heads_q);
  const int64_t b = blockIdx.y / heads_q;
  const int64_t h = blockIdx.y % heads_q;
  const int64_t bhk = b * s.heads_kv + static_cast<int>(h) / (heads_q / static_cast<int>(s.heads_kv));
  const int64_t bq = a.blocks.block_q, bk = a.blocks.block_k;
  const int64_t r0 = i * bq;
  const int64_t r1 = min(r0 + bq, s.len_q) - 1;
  const int64_t end_r0 = visible_end(r0, a.causal, s.len_q, s.len_k);
  const int64_t end_r1 = visible_end(r1, a.causal, s.len_q, s.len_k);
  // Blocks with at least one visible key (32-bit division: lengths fit in int).
  const int64_t n_allowed = end_r1 <= 0 ? 0 : min(a.nbk, static_cast<int64_t>((static_cast<int>(end_r1) +
                                                                             static_cast<int>(bk) - 1) /
                                                                            static_cast<int>(bk)));
  const SelectMode mode = a.select.mode;
  const bool scored = mode == SelectMode::kTopK || mode == SelectMode::kCdf;
  const float sim_threshold = head_value(a.select.simthreshd1, h);
  const bool q_uniform = scored && a.q_sim[bh * a.nbq + i] > sim_threshold;
  const int64_t row = bh * a.nbq + i;

  if (scored) {
    for (int64_t d = threadIdx.x; d < s.head_dim; d += kThreads) q_row[d] = a.q_pool[row * s.head_dim + d];
  }
  for (int64_t j = threadIdx.x; j < a.nbk; j += kThreads) {
    uint8_t st = 0;
    if (j < n_allowed) {
      st = kAllowed;
      const bool partial = min((j + 1) * bk, s.len_k) > end_r0;
      if (mode == SelectMode::kDense) {
        st |= kKept;
      } else if (mode == SelectMode::kBlockMask) {
        if (a.select.block_mask[row * a.nbk + j] != 0) st |= kKept;
      } else {
        const bool k_uniform = a.k_sim[bhk * a.nbk + j] > sim_threshold;
        if (k_uniform) st |= kCandidate;
        if (!q_uniform || !k_uniform || partial || (a.select.attention_sink && j == 0)) st |= kKept;
      }
    }
    state[j] = st;
  }
  __syncthreads();

  if (scored) {
    // Compressed scores of the candidates: one warp per K block, lanes over D.
    const int lane = threadIdx.x % kWarpSize;
    for (int64_t j = threadIdx.x / kWarpSize; j < n_allowed; j += kWarps) {
      if (!(state[j] & kCandidate)) continue;
      const float* kp = a.k_pool + (bhk * a.nbk + j) * s.head_dim;
      float dot = 0.0f;
      for (int64_t d = lane; d < s.head_dim; d += kWarpSize) dot += q_row[d] * kp[d];
      dot = warp_sum(dot);
      if (a.select.block_score == BlockScore::kSpikes) {
        dot = spikes_score(a, q_row, bhk, j, dot, lane);
      } else {
        dot *= a.sm_scale;
      }
      if (lane == 0) score[j] = dot;
    }
    __syncthreads();

    int n_cand = 0;
    {
      int local = 0;
      for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) local += (state[j] & kCandidate) ? 1 : 0;
      n_cand = block_sum(local, iscratch);
    }

    if (mode == SelectMode::kTopK && n_cand > 0) {
      const float topk = head_value(a.select.topk, h);
      int64_t n_keep = static_cast<int64_t>(floorf(topk * static_cast<float>(n_allowed) + 0.5f));
      n_keep = n_keep < 1 ? 1 : (n_keep > n_allowed ? n_allowed : n_keep);
      n_keep = n_keep > n_cand ? static_cast<int64_t>(n_cand) : n_keep;
      // Largest T with #{key >= T} >= n_keep: the key of the n_keep-th best candidate.
      uint32_t threshold = 0;
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t trial = threshold | (1u << bit);
        int local = 0;
        for (int64_t j = threadIdx.x; j < n_allowed; j += kThreads) {
          local += ((state[j] & kCandidate) && order_key(score[j]) >= trial) ? 1 : 0;
        }
        if (block_sum(local, iscratch) >= n_keep) threshold = trial;
      }
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
  if (threadIdx.x == 0) {
    a.count[row] = written;
    if (a.stats != nullptr) {
      atomicAdd(&a.stats[kStatBlocksKept], static_cast<unsigned long long>(written));
      atomicAdd(&a.stats[kStatBlocksAllowed], static_cast<unsigned long long>(n_allowed));
    }
  }
}

}  // namespace

size_t predict_smem_bytes(int64_t nbk) { return static_cast<size_t>(nbk) * (sizeof(float) + sizeof(uint8_t)); }

Status predict(const PredictParams& p) {
  const auto [nbq, nbk] = block_counts(p.shape, p.blocks);
  unsigned long long* stats = reinterpret_cast<unsigned long long*>(p.stats_out);
  if (stats != nullptr) {
    SPARGE_CUDA_TRY(cudaMemsetAsync(stats + kStatBlocksKept, 0, 2 * sizeof(int64_t), p.stream), "predict: clear stats");
  }
  const int64_t bhq = p.shape.batch * p.shape.heads_q;
  if (bhq == 0 || nbq == 0) return Status::Ok();
  const PredictArgs args{.shape = p.shape, .blocks = p.blocks, .causal = p.causal, .sm_scale = p.sm_scale,
                         .select = p.select, .q_pool = p.stats.q_pool, .q_sim = p.stats.q_sim,
                         .k_pool = p.stats.k_pool, .k_sim = p.stats.k_sim, .k_spikes = p.stats.k_spikes,
                         .index = p.out.index,
                         .count = p.out.count, .mask_out = p.mask_out, .stats = stats, .nbq = nbq, .nbk = nbk};
  const size_t smem = predict_smem_bytes(nbk);
  SPARGE_CUDA_TRY(cudaFuncSetAttribute(predict_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)),
                  "predict: set shared memory");
  predict_kernel<<<dim3(static_cast<unsigned>(nbq), static_cast<unsigned>(bhq)), kThreads, smem, p.stream>>>(args);
  return launch_status("predict");
}

}  // namespace sparge::cuda
