// Stage 0 on the GPU: K smoothing, INT8 Q/K with their scales, V in the P·V format with
// per-channel scales, the LSE shift and the block statistics of the prediction (docs/method.md §0).
//
// Passes (all on the caller's stream):
//   1. k_block_sums : raw K row sums per prediction K block      → k_pool (temporarily sums)
//   2. k_mean       : k_mean = Σ block sums / Lk                   → k_mean
//   3. rows<K>      : smoothed K → INT8 + scales + pooled mean/self-similarity + spike keys
//   4. rows<Q>      : Q → INT8 + scales (× sm_scale·log2e) + LSE shift + pooled mean/self-similarity
//   5. v_amax       : per-channel amax of V (exact atomic max)     → v_scale (temporarily amax)
//   6. v_quant      : V / scale → e4m3 or fp16, transposed to [D, Lk_pad] with zero padding
//   7. v_finalize   : v_scale = amax / 448
#include <cuda_fp8.h>

#include "cuda/common/device_utils.cuh"
#include "cuda/cuda_backend.h"
#include "sparge/layout.h"

namespace sparge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTileRows = 64;  // rows per shared-memory tile; every scale group lies inside one

struct RowsArgs {
  const void* x;          // [B, H, L, D] input rows (Q or K)
  Strides strides;
  int64_t heads;          // H of this tensor
  int64_t heads_kv;       // for Q: the kv head count (to find k_mean); for K: == heads
  int64_t len;            // L
  int64_t head_dim;       // D
  int64_t block_rows;     // prediction block size along L
  QuantGranularity gran;
  const float* k_mean;    // [B, Hkv, D] (Q: for the LSE shift; K: subtracted; null = zeros)
  float scale_factor;     // Q: sm_scale·log2e, K: 1
  float sm_scale;         // Q: for the LSE shift
  int8_t* out;            // [B, H, L, D]
  float* scales;          // [B, H, groups]
  int64_t groups;         // scale groups per head
  float* pool;            // [B, H, nblocks, D]
  float* sim;             // [B, H, nblocks]
  float* lse_shift;       // [B, H, L] (Q only) or null
  float* spikes;          // [B, H, nblocks, kSpikeKeys, D] (K only) or null
};

template <bool kIsQ>
__device__ __forceinline__ int64_t scale_group(int64_t r, QuantGranularity g) {
  return kIsQ ? q_scale_group(r, g) : k_scale_group(r, g);
}

// One CTA per (prediction block, b·H): walks the block in 64-row tiles.
template <bool kIsQ, typename T>
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(RowsArgs a) {
  extern __shared__ float smem[];
  const int64_t d_count = a.head_dim;
  const int64_t pitch = d_count + 1;             // (kTileRows, D+1) fp32 tile, padded against bank conflicts
  float* tile = smem;                            // [kTileRows][pitch]
  float* kmean = tile + kTileRows * pitch;       // [D]
  float* pool_sum = kmean + d_count;             // [D]   Σ rows of the block
  float* unit_sum = pool_sum + d_count;          // [D]   Σ normalized rows
  float* row_amax = unit_sum + d_count;          // [kTileRows]
  float* row_inv_norm = row_amax + kTileRows;    // [kTileRows]
  float* group_amax = row_inv_norm + kTileRows;  // [kTileRows] (a tile holds at most 32 groups)
  float* row_norm2 = group_amax + kTileRows;     // [kTileRows] squared norm of each row (spike keys)
  __shared__ int nonzero_rows;
  __shared__ float spike_norm2[kSpikeKeys];      // the largest row norms so far, descending
  __shared__ int64_t spike_row[kSpikeKeys];      // their rows (-1: none yet)

  const int64_t block = blockIdx.x;
  const int64_t bh = blockIdx.y;
  const int heads = static_cast<int>(a.heads);
  const int64_t b = blockIdx.y / heads;
  const int64_t h = blockIdx.y % heads;
  const int64_t hk = kIsQ ? static_cast<int>(h) / (heads / static_cast<int>(a.heads_kv)) : h;
  const T* x = static_cast<const T*>(a.x) + b * a.strides.batch + h * a.strides.head;
  const int64_t row_begin = block * a.block_rows;
  const int64_t row_end = min(row_begin + a.block_rows, a.len);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  for (int64_t d = threadIdx.x; d < d_count; d += kThreads) {
    kmean[d] = a.k_mean != nullptr ? a.k_mean[(b * a.heads_kv + hk) * d_count + d] : 0.0f;
    pool_sum[d] = 0.0f;
    unit_sum[d] = 0.0f;
  }
  if (threadIdx.x == 0) nonzero_rows = 0;
  if (threadIdx.x < kSpikeKeys) {
    spike_norm2[threadIdx.x] = -1.0f;
    spike_row[threadIdx.x] = -1;
  }
  __syncthreads();

  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    const int rows = static_cast<int>(row_end - row0 < kTileRows ? row_end - row0 : kTileRows);
    // Load the tile as fp32 (K smoothed); per-row amax, norm and (Q) the LSE shift.
    for (int r = warp; r < rows; r += kWarps) {
      const T* src = x + (row0 + r) * a.strides.token;
      float amax = 0.0f, sumsq = 0.0f, dot = 0.0f;
      for (int64_t d = lane; d < d_count; d += kWarpSize) {
        const float raw = load_as_float(src + d);
        const float v = kIsQ ? raw : raw - kmean[d];
        tile[r * pitch + d] = v;
        amax = fmaxf(amax, fabsf(v));
        sumsq += v * v;
        dot += raw * kmean[d];
      }
      amax = warp_max(amax);
      sumsq = warp_sum(sumsq);
      dot = warp_sum(dot);
      if (lane == 0) {
        row_amax[r] = amax;
        row_inv_norm[r] = sumsq > 0.0f ? rsqrtf(sumsq) : 0.0f;
        row_norm2[r] = sumsq;
        if (sumsq > 0.0f) atomicAdd(&nonzero_rows, 1);
        if (kIsQ && a.lse_shift != nullptr) a.lse_shift[bh * a.len + row0 + r] = a.sm_scale * dot;
      }
    }
    if (threadIdx.x < kTileRows) group_amax[threadIdx.x] = 0.0f;
    __syncthreads();
    if (!kIsQ && a.spikes != nullptr && threadIdx.x == 0) {
      // Spike keys: the rows of largest squared norm in row order, ties to the earlier row.
      for (int r = 0; r < rows; ++r) {
        const float nr = row_norm2[r];
        for (int t = 0; t < kSpikeKeys; ++t) {
          if (nr > spike_norm2[t]) {
            for (int u = kSpikeKeys - 1; u > t; --u) {
              spike_norm2[u] = spike_norm2[u - 1];
              spike_row[u] = spike_row[u - 1];
            }
            spike_norm2[t] = nr;
            spike_row[t] = row0 + r;
            break;
          }
        }
      }
    }
    const int64_t group0 = scale_group<kIsQ>(row0, a.gran);
    if (threadIdx.x < rows) {
      const int64_t g = scale_group<kIsQ>(row0 + threadIdx.x, a.gran) - group0;
      atomic_max_nonneg(&group_amax[g], row_amax[threadIdx.x]);
    }
    __syncthreads();
    // Scales of every group of this tile (groups without rows get amax 0 → scale 0).
    const int64_t group_end = row0 + kTileRows >= a.len ? a.groups : scale_group<kIsQ>(row0 + kTileRows, a.gran);
    for (int64_t g = group0 + threadIdx.x; g < group_end; g += kThreads) {
      a.scales[bh * a.groups + g] = __fdiv_rn(group_amax[g - group0], kInt8Max) * a.scale_factor;
    }
    // INT8 values, pooled sums.
    int8_t* dst = a.out + (bh * a.len + row0) * d_count;
    const int d_int = static_cast<int>(d_count);
    for (int i = threadIdx.x; i < rows * d_int; i += kThreads) {
      const int r = i / d_int;
      const int d = i % d_int;
      const float amax = group_amax[scale_group<kIsQ>(row0 + r, a.gran) - group0];
      const float inv = amax > 0.0f ? __fdiv_rn(kInt8Max, amax) : 0.0f;
      const int q = __float2int_rn(__fmul_rn(tile[r * pitch + d], inv));
      dst[i] = static_cast<int8_t>(max(-127, min(127, q)));
    }
    for (int64_t d = threadIdx.x; d < d_count; d += kThreads) {
      float s = 0.0f, u = 0.0f;
      for (int r = 0; r < rows; ++r) {
        const float v = tile[r * pitch + d];
        s += v;
        u += v * row_inv_norm[r];
      }
      pool_sum[d] += s;
      unit_sum[d] += u;
    }
    __syncthreads();
  }

  // Pooled mean and mean pairwise cosine similarity over ordered pairs i != j.
  const int64_t n = row_end - row_begin;
  float* pool = a.pool + (bh * gridDim.x + block) * d_count;
  float norm2 = 0.0f;
  for (int64_t d = threadIdx.x; d < d_count; d += kThreads) {
    pool[d] = pool_sum[d] / static_cast<float>(n);
    norm2 += unit_sum[d] * unit_sum[d];
  }
  __shared__ float scratch[kWarps];
  norm2 = block_sum(norm2, scratch);
  if (threadIdx.x == 0) {
    const float nf = static_cast<float>(n);
    a.sim[bh * gridDim.x + block] = n == 1 ? 1.0f : (norm2 - static_cast<float>(nonzero_rows)) / (nf * (nf - 1.0f));
  }
  if (!kIsQ && a.spikes != nullptr) {
    // Spike rows re-read from the input, smoothed exactly as in the tile; zeros for empty slots.
    float* spikes = a.spikes + (bh * gridDim.x + block) * kSpikeKeys * d_count;
    for (int64_t i = threadIdx.x; i < kSpikeKeys * d_count; i += kThreads) {
      const int64_t t = i / d_count, d = i % d_count;
      const int64_t r = spike_row[t];
      spikes[i] = r < 0 ? 0.0f : load_as_float(x + r * a.strides.token + d) - kmean[d];
    }
  }
}

// Raw K row sums per prediction block into `sums` ([B, Hkv, nbk, D]).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_block_sums_kernel(const T* k, Strides strides, int64_t heads, int64_t len, int64_t head_dim, int64_t block_rows,
                        float* sums) {
  const int64_t block = blockIdx.x;
  const int64_t bh = blockIdx.y;
  const T* x = k + (bh / heads) * strides.batch + (bh % heads) * strides.head;
  const int64_t row_end = min((block + 1) * block_rows, len);
  for (int64_t d = threadIdx.x; d < head_dim; d += kThreads) {
    float s = 0.0f;
    for (int64_t r = block * block_rows; r < row_end; ++r) s += load_as_float(x + r * strides.token + d);
    sums[(bh * gridDim.x + block) * head_dim + d] = s;
  }
}

__global__ void k_mean_kernel(const float* sums, int64_t nblocks, int64_t len, int64_t head_dim, float* mean) {
  const int64_t bh = blockIdx.x;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float s = 0.0f;
    for (int64_t j = 0; j < nblocks; ++j) s += sums[(bh * nblocks + j) * head_dim + d];
    mean[bh * head_dim + d] = s / static_cast<float>(len);
  }
}

// Per-channel amax of V over 64-token tiles, into amax ([B, Hkv, D], zeroed first).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    v_amax_kernel(const T* v, Strides strides, int64_t heads, int64_t len, int64_t head_dim, float* amax) {
  const int64_t bh = blockIdx.y;
  const T* x = v + (bh / heads) * strides.batch + (bh % heads) * strides.head;
  const int64_t row0 = blockIdx.x * kTileRows;
  const int64_t row_end = min(row0 + kTileRows, len);
  for (int64_t d = threadIdx.x; d < head_dim; d += kThreads) {
    float m = 0.0f;
    for (int64_t r = row0; r < row_end; ++r) m = fmaxf(m, fabsf(load_as_float(x + r * strides.token + d)));
    atomic_max_nonneg(&amax[bh * head_dim + d], m);
  }
}

// V / scale in the P·V format, transposed: out[bh][d][t] for a 64-token tile, zero past Lk.
template <typename T, typename Out>
__global__ void __launch_bounds__(kThreads)
    v_quant_kernel(const T* v, Strides strides, int64_t heads, int64_t len, int64_t len_pad, int64_t head_dim,
                   const float* amax, Out* out) {
  extern __shared__ float vtile[];  // (kTileRows, D+1)
  const int64_t pitch = head_dim + 1;
  const int64_t bh = blockIdx.y;
  const T* x = v + (bh / heads) * strides.batch + (bh % heads) * strides.head;
  const int64_t row0 = blockIdx.x * kTileRows;
  for (int64_t i = threadIdx.x; i < kTileRows * head_dim; i += kThreads) {
    const int64_t r = i / head_dim, d = i % head_dim;
    vtile[r * pitch + d] = row0 + r < len ? load_as_float(x + (row0 + r) * strides.token + d) : 0.0f;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < kTileRows * head_dim; i += kThreads) {
    const int64_t d = i / kTileRows, r = i % kTileRows;
    const float m = amax[bh * head_dim + d];
    const float inv = m > 0.0f ? __fdiv_rn(kVQuantMax, m) : 0.0f;
    const float y = __fmul_rn(vtile[r * pitch + d], inv);
    Out q;
    if constexpr (std::is_same_v<Out, __nv_fp8_e4m3>) {
      q = __nv_fp8_e4m3(y);  // rne, saturating to ±448
    } else {
      q = __float2half_rn(y);
    }
    out[(bh * head_dim + d) * len_pad + row0 + r] = q;
  }
}

__global__ void v_finalize_kernel(float* scale, int64_t count) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < count) scale[i] = __fdiv_rn(scale[i], kVQuantMax);
}

size_t rows_smem_bytes(int64_t head_dim) {
  return sizeof(float) * (kTileRows * (head_dim + 1) + 3 * head_dim + 4 * kTileRows);
}

template <bool kIsQ, typename T>
Status launch_rows(const RowsArgs& a, int64_t nblocks, int64_t bh, cudaStream_t stream) {
  const size_t smem = rows_smem_bytes(a.head_dim);
  auto kernel = quantize_rows_kernel<kIsQ, T>;
  SPARGE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                  "quantize_rows: set shared memory");
  kernel<<<dim3(static_cast<unsigned>(nblocks), static_cast<unsigned>(bh)), kThreads, smem, stream>>>(a);
  return launch_status(kIsQ ? "quantize_rows<Q>" : "quantize_rows<K>");
}

}  // namespace

Status quantize(const QuantizeParams& p) {
  const Shape& s = p.shape;
  const QuantizedQKV& o = p.out;
  const cudaStream_t stream = p.stream;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const int64_t bhq = s.batch * s.heads_q;
  const int64_t bhk = s.batch * s.heads_kv;
  const int64_t d = s.head_dim;
  const QuantGranularity g = p.quant.granularity;

  return dispatch_dtype(p.in.dtype, "in.dtype", [&](auto type_tag) -> Status {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(type_tag)>>;
    const T* k = static_cast<const T*>(p.in.k);
    const T* v = static_cast<const T*>(p.in.v);
    if (bhk > 0) {
      SPARGE_CUDA_TRY(cudaMemsetAsync(o.k_mean, 0, sizeof(float) * bhk * d, stream), "quantize: clear k_mean");
    }
    if (bhk > 0 && s.len_k > 0) {
      if (p.quant.smooth_k) {
        k_block_sums_kernel<T><<<dim3(nbk, bhk), kThreads, 0, stream>>>(k, p.in.k_strides, s.heads_kv, s.len_k, d,
                                                                        p.blocks.block_k, o.k_pool);
        SPARGE_RETURN_IF_ERROR(launch_status("k_block_sums"));
        k_mean_kernel<<<bhk, kThreads, 0, stream>>>(o.k_pool, nbk, s.len_k, d, o.k_mean);
        SPARGE_RETURN_IF_ERROR(launch_status("k_mean"));
      }
      const RowsArgs ka{.x = k, .strides = p.in.k_strides, .heads = s.heads_kv, .heads_kv = s.heads_kv,
                        .len = s.len_k, .head_dim = d, .block_rows = p.blocks.block_k, .gran = g,
                        .k_mean = o.k_mean, .scale_factor = 1.0f, .sm_scale = 0.0f, .out = o.k,
                        .scales = o.k_scale, .groups = k_scale_groups(s.len_k, g), .pool = o.k_pool,
                        .sim = o.k_sim, .lse_shift = nullptr, .spikes = o.k_spikes};
      SPARGE_RETURN_IF_ERROR(launch_rows<false, T>(ka, nbk, bhk, stream));

      SPARGE_CUDA_TRY(cudaMemsetAsync(o.v_scale, 0, sizeof(float) * bhk * d, stream), "quantize: clear v_scale");
      const int64_t len_pad = padded_len_k(s.len_k);
      v_amax_kernel<T><<<dim3(ceil_div(s.len_k, kTileRows), bhk), kThreads, 0, stream>>>(
          v, p.in.v_strides, s.heads_kv, s.len_k, d, o.v_scale);
      SPARGE_RETURN_IF_ERROR(launch_status("v_amax"));
      const dim3 vgrid(static_cast<unsigned>(len_pad / kTileRows), static_cast<unsigned>(bhk));
      const size_t vsmem = sizeof(float) * kTileRows * (d + 1);
      if (p.quant.pv == PvPrecision::kFp8) {
        auto kernel = v_quant_kernel<T, __nv_fp8_e4m3>;
        SPARGE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, vsmem),
                        "v_quant: set shared memory");
        kernel<<<vgrid, kThreads, vsmem, stream>>>(v, p.in.v_strides, s.heads_kv, s.len_k, len_pad, d, o.v_scale,
                                                   static_cast<__nv_fp8_e4m3*>(o.v));
      } else {
        auto kernel = v_quant_kernel<T, __half>;
        SPARGE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, vsmem),
                        "v_quant: set shared memory");
        kernel<<<vgrid, kThreads, vsmem, stream>>>(v, p.in.v_strides, s.heads_kv, s.len_k, len_pad, d, o.v_scale,
                                                   static_cast<__half*>(o.v));
      }
      SPARGE_RETURN_IF_ERROR(launch_status("v_quant"));
      v_finalize_kernel<<<ceil_div(bhk * d, kThreads), kThreads, 0, stream>>>(o.v_scale, bhk * d);
      SPARGE_RETURN_IF_ERROR(launch_status("v_finalize"));
    } else if (bhk > 0) {
      SPARGE_CUDA_TRY(cudaMemsetAsync(o.v_scale, 0, sizeof(float) * bhk * d, stream), "quantize: clear v_scale");
    }
    if (bhq > 0 && s.len_q > 0) {
      const float c = p.quant.sm_scale * kLog2e;
      const RowsArgs qa{.x = p.in.q, .strides = p.in.q_strides, .heads = s.heads_q, .heads_kv = s.heads_kv,
                        .len = s.len_q, .head_dim = d, .block_rows = p.blocks.block_q, .gran = g,
                        .k_mean = o.k_mean, .scale_factor = c, .sm_scale = p.quant.sm_scale, .out = o.q,
                        .scales = o.q_scale, .groups = q_scale_groups(s.len_q, g), .pool = o.q_pool,
                        .sim = o.q_sim, .lse_shift = o.lse_shift, .spikes = nullptr};
      SPARGE_RETURN_IF_ERROR(launch_rows<true, T>(qa, nbq, bhq, stream));
    }
    return Status::Ok();
  });
}

}  // namespace sparge::cuda
