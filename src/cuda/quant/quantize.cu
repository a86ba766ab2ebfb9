// Stage 0 on the GPU: K smoothing, INT8 Q/K with their scales, V in the P·V format with
// per-channel scales, the LSE shift and the block statistics of the prediction (docs/method.md §0).
//
// Passes (all on the caller's stream):
//   1. k_block_sums : raw K row sums per prediction K block      → k_pool (temporarily sums)
//   2. k_mean       : k_mean = Σ block sums / Lk                   → k_mean
//   3. rows<K>      : smoothed K → INT8 + scales + pooled mean/self-similarity + spike keys
//   4. rows<Q>      : Q → INT8 + scales (× sm_scale·log2e) + LSE shift + pooled mean/self-similarity
//   5. v_amax       : per-channel amax of V (exact atomic max)     → v_scale (temporarily amax)
//   6. v_quant      : V / scale → e4m3 or fp16, transposed to [D, Lk_pad] (keys at v_key_slot), zero padded
//   7. v_finalize   : v_scale = amax / 448
// Fast path (quantize_fast, taken for 16-byte aligned rows with D / (16 / sizeof(T)) in {8, 16, 32}
// and 64-multiple prediction blocks, i.e. every CUDA call the dispatcher accepts at D = 64/128/256
// in fp16/bf16): 16-byte loads kept in registers, 1+5 fused into kv_stats_fast (K block sums and
// per-block V amax in one pass, no atomics), one kv_reduce for k_mean and the V amax (so nothing
// needs clearing first), register-resident rows kernels (the Q one also does 7), and a v_quant
// that transposes through shared memory without bank conflicts (by ldmatrix.trans from 2-byte
// inputs to e4m3): five launches for the stage. Same arithmetic per element as the passes above.
// Where the caller predicts nothing from the output (quantize's block_stats), the fast rows kernels
// skip the block statistics.
// Small problems on the fast path (0 < Lk <= kSmallLenK = 1024, quantize_fast_small), where the
// launches rather than the bytes cost the time: two launches.
//   a. kv_head_fast : one CTA per b·Hkv over all its rows: k_mean (1+2), V amax with
//                     v_scale = amax / v_max in its final form (5+7), then V quantized tile by tile
//                     with the v_quant_fast tile code (6)
//   b. rows<K,Q>    : 3 and 4 in one grid (per kv head row: its K blocks spread over the Q heads
//                     of its group, then those heads' Q blocks)
// k_mean sums the rows in another order than the five-launch path (per thread over all rows,
// not per prediction block first), so it may differ from it by fp32 rounding, and so may what
// uses it (smoothed K, an INT8 value on a rounding boundary, the LSE shift); the per-element
// arithmetic is the same.
#include <cuda_fp8.h>

#include "cuda/common/chained_launch.cuh"
#include "cuda/common/device_utils.cuh"
#include "cuda/common/ptx_convert.cuh"
#include "cuda/common/ptx_memory.cuh"
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
  float* v_finalize;      // fast rows<Q> only, or null: v_scale ([v_count]) holding V amax, divided
  int64_t v_count;        //   by v_max here (saves the v_finalize launch; v_quant ran before)
  float v_max;
};

template <bool kIsQ>
__device__ __forceinline__ int64_t scale_group(int64_t r, QuantGranularity g) {
  return kIsQ ? q_scale_group(r, g) : k_scale_group(r, g);
}

// Group amax and stored scales of one 64-row tile (every scale group lies inside one tile;
// groups without rows get amax 0 → scale 0). group_amax ([kTileRows], zeroed and visible to the
// CTA) receives the amax of each group, row_inv ([kTileRows]) the quantization factor 127 / amax
// of each row's group (0 for amax 0), both visible to the CTA on return.
template <bool kIsQ, int NT = kThreads>
__device__ __forceinline__ void tile_group_scales(const RowsArgs& a, int64_t bh, int64_t row0, int rows,
                                                  const float* row_amax, float* group_amax, float* row_inv) {
  const int64_t group0 = scale_group<kIsQ>(row0, a.gran);
  const int64_t my_group = threadIdx.x < rows ? scale_group<kIsQ>(row0 + threadIdx.x, a.gran) - group0 : 0;
  if (threadIdx.x < rows) atomic_max_nonneg(&group_amax[my_group], row_amax[threadIdx.x]);
  __syncthreads();
  const int64_t group_end = row0 + kTileRows >= a.len ? a.groups : scale_group<kIsQ>(row0 + kTileRows, a.gran);
  for (int64_t g = group0 + threadIdx.x; g < group_end; g += NT) {
    a.scales[bh * a.groups + g] = __fdiv_rn(group_amax[g - group0], kInt8Max) * a.scale_factor;
  }
  if (threadIdx.x < rows) {
    const float amax = group_amax[my_group];
    row_inv[threadIdx.x] = amax > 0.0f ? __fdiv_rn(kInt8Max, amax) : 0.0f;
  }
  __syncthreads();
}

// The INT8 value of x · inv (inv from tile_group_scales, |x| <= the group's amax, both from the same
// fp32 values) in the low byte of the result: |x · inv| <= 127 · (1 + 2^-23) < 127.5, so no clamp is
// needed, and adding 1.5 · 2^23 to the product rounds it to the nearest integer, ties to even, like
// __float2int_rn, on the FMA pipe instead of the conversion pipe. The low byte of the sum's bits is
// that integer in two's complement (the CPU reference's quantize_int8, bit for bit, for finite x).
__device__ __forceinline__ uint32_t int8_low_byte(float x, float inv) {
  return __float_as_uint(__fadd_rn(__fmul_rn(x, inv), kRoundMagic));
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
  float* row_inv = row_norm2 + kTileRows;        // [kTileRows] quantization factor of each row
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
    tile_group_scales<kIsQ>(a, bh, row0, rows, row_amax, group_amax, row_inv);
    // INT8 values, pooled sums.
    int8_t* dst = a.out + (bh * a.len + row0) * d_count;
    const int d_int = static_cast<int>(d_count);
    for (int i = threadIdx.x; i < rows * d_int; i += kThreads) {
      const int r = i / d_int;
      const int d = i % d_int;
      dst[i] = static_cast<int8_t>(static_cast<uint8_t>(int8_low_byte(tile[r * pitch + d], row_inv[r])));
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

// The P·V format of quantized V of element type Out (both fp8 modes order keys alike).
template <typename Out>
inline constexpr PvPrecision kOutPv = std::is_same_v<Out, __nv_fp8_e4m3> ? PvPrecision::kFp8 : PvPrecision::kFp16;

// V / scale in the P·V format, transposed: out[bh][d][v_key_slot(t)] for a 64-token tile, zero
// past Lk.
template <typename T, typename Out>
__global__ void __launch_bounds__(kThreads)
    v_quant_kernel(const T* v, Strides strides, int64_t heads, int64_t len, int64_t len_pad, int64_t head_dim,
                   const float* amax, float v_max, Out* out) {
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
    const float inv = m > 0.0f ? __fdiv_rn(v_max, m) : 0.0f;
    const float y = __fmul_rn(vtile[r * pitch + d], inv);
    Out q;
    if constexpr (std::is_same_v<Out, __nv_fp8_e4m3>) {
      q = __nv_fp8_e4m3(y);  // rne, saturating to ±448
    } else {
      q = __float2half_rn(y);
    }
    out[(bh * head_dim + d) * len_pad + row0 + v_key_slot(r, kOutPv<Out>)] = q;
  }
}

// amax → v_scale = amax / v_max (v_max = v_quant_max(pv)), element i.
__device__ __forceinline__ void v_finalize_at(float* scale, int64_t count, float v_max, int64_t i) {
  if (i < count) scale[i] = __fdiv_rn(scale[i], v_max);
}

__global__ void v_finalize_kernel(float* scale, int64_t count, float v_max) {
  wait_for_prior_grids();
  v_finalize_at(scale, count, v_max, blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x);
}

size_t rows_smem_bytes(int64_t head_dim) {
  return sizeof(float) * (kTileRows * (head_dim + 1) + 3 * head_dim + 5 * kTileRows);
}

// The rows<K> arguments of every path.
RowsArgs k_rows_args(const QuantizeParams& p) {
  const Shape& s = p.shape;
  const QuantizedQKV& o = p.out;
  return RowsArgs{.x = p.in.k, .strides = p.in.k_strides, .heads = s.heads_kv, .heads_kv = s.heads_kv,
                  .len = s.len_k, .head_dim = s.head_dim, .block_rows = p.blocks.block_k,
                  .gran = p.quant.granularity, .k_mean = o.k_mean, .scale_factor = 1.0f, .sm_scale = 0.0f,
                  .out = o.k, .scales = o.k_scale, .groups = k_scale_groups(s.len_k, p.quant.granularity),
                  .pool = o.k_pool, .sim = o.k_sim, .lse_shift = nullptr, .spikes = o.k_spikes};
}

// The rows<Q> arguments of every path; v_finalize: v_scale when this launch finalizes it (fast
// rows<Q> only), else null.
RowsArgs q_rows_args(const QuantizeParams& p, float* v_finalize) {
  const Shape& s = p.shape;
  const QuantizedQKV& o = p.out;
  return RowsArgs{.x = p.in.q, .strides = p.in.q_strides, .heads = s.heads_q, .heads_kv = s.heads_kv,
                  .len = s.len_q, .head_dim = s.head_dim, .block_rows = p.blocks.block_q,
                  .gran = p.quant.granularity, .k_mean = o.k_mean, .scale_factor = p.quant.sm_scale * kLog2e,
                  .sm_scale = p.quant.sm_scale, .out = o.q, .scales = o.q_scale,
                  .groups = q_scale_groups(s.len_q, p.quant.granularity), .pool = o.q_pool, .sim = o.q_sim,
                  .lse_shift = o.lse_shift, .spikes = nullptr, .v_finalize = v_finalize,
                  .v_count = s.batch * s.heads_kv * s.head_dim, .v_max = v_quant_max(p.quant.pv)};
}

template <bool kIsQ, typename T>
Status launch_rows(const RowsArgs& a, int64_t nblocks, int64_t bh, cudaStream_t stream) {
  const size_t smem = rows_smem_bytes(a.head_dim);
  constexpr auto kernel = quantize_rows_kernel<kIsQ, T>;
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<kernel>(smem, "quantize_rows: set shared memory"));
  kernel<<<dim3(static_cast<unsigned>(nblocks), static_cast<unsigned>(bh)), kThreads, smem, stream>>>(a);
  return launch_status(kIsQ ? "quantize_rows<Q>" : "quantize_rows<K>");
}


// ---- Fast path: 16-byte vector loads, values kept in registers ------------------------------
// A thread owns one 16-byte column chunk (VEC elements) of rows tid / CPR + k · (256 / CPR);
// the CPR lanes of one row are consecutive, so row reductions are xor-shuffles inside a warp.
// Used when every row is 16-byte aligned, D / VEC is 8, 16 or 32 and the prediction blocks
// are multiples of 64 rows (every 64-row tile is 64-aligned: scale groups never straddle).

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& raw, float* f) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) f[k] = load_as_float(e + k);
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* f) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) f[k] = load_as_float(e + k);
}

// v to dst[0, VEC): 16-byte stores where VEC allows (dst then 16-byte aligned). Lanes write
// VEC consecutive floats each, so with 4-byte stores lanes 32 / VEC apart would share a bank.
template <int VEC>
__device__ __forceinline__ void store_shared_vec(float* dst, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) *reinterpret_cast<float4*>(dst + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] = v[k];
  }
}

template <int CPR>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int o = CPR / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int CPR>
__device__ __forceinline__ float row_max(float x) {
#pragma unroll
  for (int o = CPR / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// (n1, r1) ranks before (n2, r2): larger norm, ties to the lower row.
__device__ __forceinline__ bool spike_before(float n1, int64_t r1, float n2, int64_t r2) {
  return n1 > n2 || (n1 == n2 && r1 < r2);
}

// Threads of a fast rows CTA for rows of CPR 16-byte chunks. With 128 instead of 256 threads at
// CPR <= 16 a thread quantizes twice the elements of its block, so the per-CTA work (set-up,
// group scales, column sums, spike keys) costs half as much per element (the stage 1.07-1.13×
// faster at D 64 / 128, bench/RESULTS.md, session 14). At CPR = 32 the raw chunks of a 64-row
// tile would need twice the registers.
template <int CPR>
inline constexpr int kRowsThreads = CPR >= 32 ? 256 : 128;

// CTAs per SM the rows kernels are compiled for: 5 at CPR <= 16 (fp16 D128: 95 registers instead of
// 102, 5 CTAs instead of 4, K rows 50.3 -> 45.8 us at B2 H16 L8k, session 14), except bf16 at
// CPR = 16, which spills at that cap.
template <typename T, int CPR>
inline constexpr int kRowsMinBlocks = CPR >= 32 ? 2 : (std::is_same_v<T, __nv_bfloat16> && CPR == 16 ? 4 : 5);

// Shared memory of the fast rows body (declared by each kernel that runs it, so that a kernel
// running both the Q and the K body holds one copy).
template <typename T, int CPR>
struct RowsFastSmem {
  float row_amax[kTileRows];
  float row_norm2[kTileRows];
  float group_amax[kTileRows];
  float row_inv[kTileRows];
  alignas(16) float red[2][kRowsThreads<CPR> * kVec<T>];  // column partials s and u, [pass row][D]
  float spike_norm2[kSpikeKeys];
  int64_t spike_row[kSpikeKeys];
  float norm2_part[kRowsThreads<CPR> / kWarpSize];
  int nonzero_part[kRowsThreads<CPR> / kWarpSize];
};

// One CTA's work: prediction block block_index (of nblocks per head row) of head row bh_index
// (b·H) of Q or K. kStats: also the block statistics of the prediction (pool, sim, spikes). Without
// them (the fused op's dense and block-mask calls) B2 H16 L8k D128 K rows take 30.3 instead of 44.1 µs
// (with spike keys), Q rows 36.1 instead of 42.4 (bench/RESULTS.md, session 26).
template <bool kIsQ, bool kStats, typename T, int CPR>
__device__ __forceinline__ void quantize_rows_fast_body(const RowsArgs& a, unsigned block_index, unsigned bh_index,
                                                        unsigned nblocks, RowsFastSmem<T, CPR>& sm) {
  constexpr int VEC = kVec<T>;
  constexpr int NT = kRowsThreads<CPR>;
  constexpr int RPP = NT / CPR;               // rows per pass
  constexpr int ITERS = kTileRows / RPP;      // passes per 64-row tile
  constexpr int D = CPR * VEC;
  float* row_amax = sm.row_amax;
  float* row_norm2 = sm.row_norm2;
  float* group_amax = sm.group_amax;
  float* spike_norm2 = sm.spike_norm2;
  int64_t* spike_row = sm.spike_row;

  const int64_t block = block_index;
  const int64_t bh = bh_index;
  const int heads = static_cast<int>(a.heads);
  const int64_t b = bh_index / heads;
  const int64_t h = bh_index % heads;
  const int64_t hk = kIsQ ? static_cast<int>(h) / (heads / static_cast<int>(a.heads_kv)) : h;
  const T* x = static_cast<const T*>(a.x) + b * a.strides.batch + h * a.strides.head;
  const int64_t row_begin = block * a.block_rows;
  const int64_t row_end = min(row_begin + a.block_rows, a.len);
  const int c = threadIdx.x % CPR;
  const int rsub = threadIdx.x / CPR;
  const int col0 = c * VEC;
  if (kIsQ && a.v_finalize != nullptr) {
    const int64_t cta = bh * nblocks + block;
    v_finalize_at(a.v_finalize, a.v_count, a.v_max, cta * NT + threadIdx.x);
  }

  float km[VEC];
  const float* km_head = a.k_mean != nullptr ? a.k_mean + (b * a.heads_kv + hk) * D : nullptr;
  const float* km_src = km_head != nullptr ? km_head + col0 : nullptr;
  if (km_src != nullptr && VEC % 4 == 0 && reinterpret_cast<uintptr_t>(km_src) % sizeof(float4) == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      const float4 m4 = *reinterpret_cast<const float4*>(km_src + k);
      km[k] = m4.x;
      km[k + 1] = m4.y;
      km[k + 2] = m4.z;
      km[k + 3] = m4.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) km[k] = km_src != nullptr ? km_src[k] : 0.0f;
  }
  float s_acc[VEC], u_acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) s_acc[k] = u_acc[k] = 0.0f;
  int nonzero = 0;
  if (kStats && threadIdx.x < kSpikeKeys) {
    spike_norm2[threadIdx.x] = -1.0f;
    spike_row[threadIdx.x] = -1;
  }

  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    const int rows = static_cast<int>(row_end - row0 < kTileRows ? row_end - row0 : kTileRows);
    // Raw 16-byte chunks stay packed in registers; fp32 values are rebuilt (identically) per use.
    uint4 raw4[ITERS];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int r = rsub + it * RPP;
      raw4[it] = r < rows ? __ldg(reinterpret_cast<const uint4*>(x + (row0 + r) * a.strides.token + col0))
                          : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int r = rsub + it * RPP;
      float amax = 0.0f, sumsq = 0.0f, dot = 0.0f;
      float vv[VEC];
      unpack_vec<T>(raw4[it], vv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float raw = vv[k];
        const float y = kIsQ ? raw : raw - km[k];
        vv[k] = y;
        amax = fmaxf(amax, fabsf(y));
        if (kStats) sumsq += y * y;
        if (kIsQ) dot += raw * km[k];
      }
      amax = row_max<CPR>(amax);
      if (kStats) sumsq = row_sum<CPR>(sumsq);
      if (kIsQ) dot = row_sum<CPR>(dot);
      if (r < rows) {
        if constexpr (kStats) {
          const float inv_norm = sumsq > 0.0f ? rsqrtf(sumsq) : 0.0f;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            s_acc[k] += vv[k];
            u_acc[k] += vv[k] * inv_norm;
          }
        }
        if (c == 0) {
          row_amax[r] = amax;
          if (kStats) {
            row_norm2[r] = sumsq;
            if (sumsq > 0.0f) ++nonzero;
          }
          if (kIsQ && a.lse_shift != nullptr) a.lse_shift[bh * a.len + row0 + r] = a.sm_scale * dot;
        }
      }
    }
    if (threadIdx.x < kTileRows) group_amax[threadIdx.x] = 0.0f;
    __syncthreads();
    if (kStats && !kIsQ && a.spikes != nullptr && threadIdx.x < kWarpSize) {
      // Top kSpikeKeys (= 2) rows of this tile by (norm desc, row asc), merged with the block's.
      const int lane = threadIdx.x;
      float n0 = lane < rows ? row_norm2[lane] : -2.0f;
      int64_t r0 = row0 + lane;
      float n1 = lane + 32 < rows ? row_norm2[lane + 32] : -2.0f;
      int64_t r1 = row0 + lane + 32;
      if (spike_before(n1, r1, n0, r0)) {
        const float tn = n0; n0 = n1; n1 = tn;
        const int64_t tr = r0; r0 = r1; r1 = tr;
      }
      // best pair (n0 ≥ n1 by the order) per lane; warp-merge pairs.
#pragma unroll
      for (int o = 16; o > 0; o /= 2) {
        const float on0 = __shfl_xor_sync(0xffffffffu, n0, o);
        const int64_t or0 = __shfl_xor_sync(0xffffffffu, r0, o);
        const float on1 = __shfl_xor_sync(0xffffffffu, n1, o);
        const int64_t or1 = __shfl_xor_sync(0xffffffffu, r1, o);
        if (spike_before(on0, or0, n0, r0)) {
          // other's first is best; second is the better of (mine first, other's second)
          if (spike_before(on1, or1, n0, r0)) { n1 = on1; r1 = or1; } else { n1 = n0; r1 = r0; }
          n0 = on0; r0 = or0;
        } else if (spike_before(on0, or0, n1, r1)) {
          n1 = on0; r1 = or0;
        }
      }
      if (lane == 0) {
        const float cn[4] = {spike_norm2[0], spike_norm2[1], n0, n1};
        const int64_t cr[4] = {spike_row[0], spike_row[1], r0, r1};
        // cn[0..1] and cn[2..3] are each ordered; merge the two lists.
        int i = 0, j = 2;
        for (int t = 0; t < kSpikeKeys; ++t) {
          // invalid tile entries carry norm -2 and never beat an empty slot (-1)
          if (j < 4 && (i >= 2 || spike_before(cn[j], cr[j], cn[i], cr[i]))) {
            spike_norm2[t] = cn[j]; spike_row[t] = cr[j]; ++j;
          } else {
            spike_norm2[t] = cn[i]; spike_row[t] = cr[i]; ++i;
          }
        }
        // keep -1 sentinel for empty slots
        for (int t = 0; t < kSpikeKeys; ++t) {
          if (spike_norm2[t] < -1.5f) { spike_norm2[t] = -1.0f; spike_row[t] = -1; }
        }
      }
    }
    tile_group_scales<kIsQ, NT>(a, bh, row0, rows, row_amax, group_amax, sm.row_inv);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int r = rsub + it * RPP;
      if (r < rows) {
        const float inv = sm.row_inv[r];
        float vv[VEC];
        unpack_vec<T>(raw4[it], vv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) vv[k] = kIsQ ? vv[k] : vv[k] - km[k];
        uint32_t packed[VEC / 4];
#pragma unroll
        for (int w = 0; w < VEC / 4; ++w) {
          uint32_t q[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) q[k] = int8_low_byte(vv[w * 4 + k], inv);
          packed[w] = low_bytes(q[0], q[1], q[2], q[3]);
        }
        int8_t* dst = a.out + (bh * a.len + row0 + r) * D + col0;
        if constexpr (VEC == 8) {
          *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
        } else if constexpr (VEC == 4) {
          *reinterpret_cast<uint32_t*>(dst) = packed[0];
        } else {
          *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
      }
    }
    __syncthreads();
  }
  if constexpr (!kStats) return;

  // Column sums over this thread's rows -> per-column totals, each in a fixed order over the RPP
  // partials: entries i < D of the loop below total s of column i, entries D + d total u of column d.
  store_shared_vec(&sm.red[0][threadIdx.x * VEC], s_acc);
  store_shared_vec(&sm.red[1][threadIdx.x * VEC], u_acc);
  __syncthreads();
  const int64_t n = row_end - row_begin;
  float* pool = a.pool + (bh * nblocks + block) * D;
  float norm2 = 0.0f;
  for (int i = threadIdx.x; i < 2 * D; i += NT) {
    const int which = i / D, d = i % D;
    float t = 0.0f;
#pragma unroll 8
    for (int j = 0; j < RPP; ++j) t += sm.red[which][j * D + d];  // thread j·CPR + d / VEC, element d % VEC
    if (which == 0) {
      pool[d] = t / static_cast<float>(n);
    } else {
      norm2 += t * t;
    }
  }
  norm2 = warp_sum(norm2);
  nonzero = warp_sum_any(nonzero);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    sm.norm2_part[warp] = norm2;
    sm.nonzero_part[warp] = nonzero;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    int nonzero_rows = 0;
#pragma unroll
    for (int w = 0; w < NT / kWarpSize; ++w) {
      total += sm.norm2_part[w];
      nonzero_rows += sm.nonzero_part[w];
    }
    const float nf = static_cast<float>(n);
    a.sim[bh * nblocks + block] = n == 1 ? 1.0f : (total - static_cast<float>(nonzero_rows)) / (nf * (nf - 1.0f));
  }
  if (!kIsQ && a.spikes != nullptr) {
    float* spikes = a.spikes + (bh * nblocks + block) * kSpikeKeys * D;
    for (int i = threadIdx.x; i < kSpikeKeys * D; i += NT) {
      const int t = i / D, d = i % D;
      const int64_t r = spike_row[t];
      const float mean = km_head != nullptr ? km_head[d] : 0.0f;
      spikes[i] = r < 0 ? 0.0f : load_as_float(x + r * a.strides.token + d) - mean;
    }
  }
}

// The K rows run their CTAs in reverse order (last head row, last block first): kv_stats has just read
// K and V in launch order, so the rows of the last heads are the ones still in L2.
template <bool kIsQ, bool kStats, typename T, int CPR>
__global__ void __launch_bounds__(kRowsThreads<CPR>, kRowsMinBlocks<T, CPR>) quantize_rows_fast_kernel(RowsArgs a) {
  __shared__ RowsFastSmem<T, CPR> sm;
  wait_for_prior_grids();
  const unsigned block = kIsQ ? blockIdx.x : gridDim.x - 1 - blockIdx.x;
  const unsigned row = kIsQ ? blockIdx.y : gridDim.y - 1 - blockIdx.y;
  quantize_rows_fast_body<kIsQ, kStats, T, CPR>(a, block, row, gridDim.x, sm);
}

// Small problems: the K rows and the Q rows in one grid of (kpz + nbq, B·Hkv, G) CTAs, G = Hq / Hkv
// (1 without Q rows), kpz = ⌈nbk / G⌉. CTA (x, y, z) works for kv head row y: x < kpz is its K
// block z · kpz + x (none past nbk: fewer than G idle CTAs per row), x >= kpz is Q block x − kpz
// of query head row y · G + z. The role depends on the CTA index only, so every barrier inside
// is reached by the whole CTA. The indices are sums and products of blockIdx, not quotients of a
// flat index: with quotients ptxas spilled at D = 128 on sm_89, where quantize_rows_fast_kernel
// does not.
template <typename T, int CPR>
__global__ void __launch_bounds__(kRowsThreads<CPR>, kRowsMinBlocks<T, CPR>)
    quantize_rows_kq_fast_kernel(RowsArgs ka, unsigned nbk, unsigned kpz, RowsArgs qa, unsigned nbq) {
  __shared__ RowsFastSmem<T, CPR> sm;
  wait_for_prior_grids();
  if (blockIdx.x < kpz) {
    const unsigned block = blockIdx.z * kpz + blockIdx.x;
    if (block < nbk) quantize_rows_fast_body<false, true, T, CPR>(ka, block, blockIdx.y, nbk, sm);
  } else {
    quantize_rows_fast_body<true, true, T, CPR>(qa, blockIdx.x - kpz, blockIdx.y * gridDim.z + blockIdx.z, nbq, sm);
  }
}

// This thread's share of rows [row_begin, row_end) of one head: the sums of its K column chunk
// (when with_sums, else zeros) and the amax of its V column chunk, over rows row_begin + tid / CPR
// + k · (kThreads / CPR).
template <typename T, int CPR>
__device__ __forceinline__ void kv_column_stats(const T* kx, int64_t k_token, const T* vx, int64_t v_token,
                                                int64_t row_begin, int64_t row_end, bool with_sums,
                                                float (&s)[kVec<T>], float (&m)[kVec<T>]) {
  constexpr int VEC = kVec<T>;
  constexpr int RPP = kThreads / CPR;
  const int col0 = (threadIdx.x % CPR) * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = m[j] = 0.0f;
#pragma unroll 4
  for (int64_t r = row_begin + threadIdx.x / CPR; r < row_end; r += RPP) {
    float f[VEC];
    if (with_sums) {
      load_vec(kx + r * k_token + col0, f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[j] += f[j];
    }
    load_vec(vx + r * v_token + col0, f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = fmaxf(m[j], fabsf(f[j]));
  }
}

// kv_column_stats' per-thread partials reduced over the CTA: done(d, sum, amax) for every column
// d, threads looping over the columns, each summing the RPP partials of its column in thread
// order. red: 2 · kThreads · VEC floats of 16-byte aligned shared memory, free again after the
// caller's next barrier.
template <typename T, int CPR, typename Done>
__device__ __forceinline__ void reduce_column_stats(const float (&s)[kVec<T>], const float (&m)[kVec<T>], float* red,
                                                    Done done) {
  constexpr int VEC = kVec<T>;
  constexpr int RPP = kThreads / CPR;
  constexpr int D = CPR * VEC;
  float* red_sum = red;
  float* red_max = red + kThreads * VEC;
  store_shared_vec(&red_sum[threadIdx.x * VEC], s);
  store_shared_vec(&red_max[threadIdx.x * VEC], m);
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float ts = 0.0f, tm = 0.0f;
    for (int j = 0; j < RPP; ++j) {
      ts += red_sum[j * D + d];  // thread j·CPR + d / VEC, element d % VEC
      tm = fmaxf(tm, red_max[j * D + d]);
    }
    done(d, ts, tm);
  }
}

// Raw K block sums (when sums != null) and the V per-channel amax of the block (into amax_parts,
// [B, Hkv, nbk, D]), one CTA per prediction K block.
template <typename T, int CPR>
__global__ void __launch_bounds__(kThreads)
    kv_stats_fast_kernel(const T* k, Strides ks, const T* v, Strides vs, int64_t heads, int64_t len,
                         int64_t block_rows, float* sums, float* amax_parts) {
  constexpr int VEC = kVec<T>;
  constexpr int D = CPR * VEC;
  __shared__ alignas(16) float red[2 * kThreads * VEC];
  wait_for_prior_grids();
  const int64_t block = blockIdx.x;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / heads, h = bh % heads;
  const T* kx = k + b * ks.batch + h * ks.head;
  const T* vx = v + b * vs.batch + h * vs.head;
  const int64_t row_begin = block * block_rows;
  const int64_t row_end = min(row_begin + block_rows, len);
  float s[VEC], m[VEC];
  const bool do_sums = sums != nullptr;
  kv_column_stats<T, CPR>(kx, ks.token, vx, vs.token, row_begin, row_end, do_sums, s, m);
  reduce_column_stats<T, CPR>(s, m, red, [&](int d, float ts, float tm) {
    if (do_sums) sums[(bh * gridDim.x + block) * D + d] = ts;
    amax_parts[(bh * gridDim.x + block) * D + d] = tm;
  });
}

// kv_reduce's CTA: 32 channels × kReduceWarps partials. A few loads per warp in flight at once: the
// kernel is the loads' latency. With 8 warps per CTA: 4.0 µs at B2 H16 L8k D128 (12 % achieved
// occupancy), 10.3 µs at B1 H16 L32k D128 (64 CTAs); with 32: 3.5 and 6.0 µs (bench/RESULTS.md, session 27).
constexpr int kReduceWarps = 32;

// k_mean from the block sums (zeros when sums is null) and the V amax from the per-block amax:
// 32 channels × kReduceWarps partials per CTA, reduced in a fixed order.
__global__ void __launch_bounds__(kReduceWarps * kWarpSize)
    kv_reduce_kernel(const float* sums, const float* amax_parts, int64_t nblocks, int64_t len, int64_t head_dim,
                     float* mean, float* amax) {
  __shared__ float part[2][kReduceWarps][kWarpSize];
  wait_for_prior_grids();
  const int64_t bh = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t d = blockIdx.y * kWarpSize + lane;
  float s = 0.0f, m = 0.0f;
  if (d < head_dim) {
    // Unrolled so that the loads of several blocks are in flight (the sums keep their order).
#pragma unroll 4
    for (int64_t j = warp; j < nblocks; j += kReduceWarps) {
      const int64_t at = (bh * nblocks + j) * head_dim + d;
      if (sums != nullptr) s += sums[at];
      m = fmaxf(m, amax_parts[at]);
    }
  }
  part[0][warp][lane] = s;
  part[1][warp][lane] = m;
  __syncthreads();
  if (warp == 0 && d < head_dim) {
    float t = 0.0f, tm = 0.0f;
    for (int w = 0; w < kReduceWarps; ++w) {
      t += part[0][w][lane];
      tm = fmaxf(tm, part[1][w][lane]);
    }
    mean[bh * head_dim + d] = sums != nullptr ? t / static_cast<float>(len) : 0.0f;
    amax[bh * head_dim + d] = tm;
  }
}

// V · inv of a 64-token tile as e4m3 in the P·V key order, for 2-byte inputs (the
// v_quant_fast_tile contract): the raw tile goes to shared memory unconverted (cp.async, rows
// padded against ldmatrix bank conflicts) and comes back transposed by ldmatrix.trans, whose
// fragment is already in slot order: lane l holds keys 8m + 2u, 8m + 2u + 1 (u = l % 4) of
// channel l / 4 in r[m], and keys 8a + 2u + b of a 16-key group sit at slots 4u + 2a + b.
template <typename T, int CPR>
__device__ __forceinline__ void v_quant_e4m3_tile(const T* x, int64_t token_stride, int64_t len, int64_t len_pad,
                                                  int64_t row0, const float* inv, float* smem, __nv_fp8_e4m3* out) {
  using Tile = PaddedTile<kTileRows, CPR * kCpAsyncBytes>;
  constexpr int VEC = kVec<T>;
  static_assert(Tile::kBytes <= sizeof(float) * kTileRows * (CPR * VEC + 1), "fits the fp32 tile's shared memory");
  const uint32_t base = smem_address(smem);
  load_tile_async<Tile, kThreads>(base, threadIdx.x, [&](int row, int chunk, bool& valid) -> const void* {
    valid = row0 + row < len;
    return valid ? x + (row0 + row) * token_stride + chunk * VEC : x;
  });
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  // Task: channels 8·dg .. 8·dg + 7 of keys 32·kh .. 32·kh + 31 (matrix m: keys 32·kh + 8m ..).
  for (int task = warp; task < 2 * CPR; task += kWarps) {
    const int dg = task / 2, kh = task % 2;
    uint32_t r[4];
    ldmatrix_x4_trans(r, base + Tile::offset(32 * kh + lane, dg));
    const int d = 8 * dg + lane / 4;
    const float inv_d = inv[d];
    uint32_t words[2];
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      uint32_t pairs[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        float2 f;
        if constexpr (std::is_same_v<T, __half>) {
          f = __half22float2(*reinterpret_cast<const __half2*>(&r[2 * g + a]));
        } else {
          f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r[2 * g + a]));
        }
        pairs[a] = pack_e4m3x2(__fmul_rn(f.x, inv_d), __fmul_rn(f.y, inv_d));
      }
      words[g] = pairs[0] | (pairs[1] << 16);
    }
    auto* dst = reinterpret_cast<uint32_t*>(out + d * len_pad + row0 + 32 * kh + 4 * (lane % 4));
    dst[0] = words[0];
    dst[4] = words[1];
  }
}

// v_quant_fast_tile for the other inputs and formats: the tile goes to shared memory as fp32.
// Loads: a warp covers 8 rows × 4 chunks (bank-conflict-free scalar smem stores with pitch D + 1);
// stores: 8 slots per thread.
template <typename T, typename Out, int CPR>
__device__ __forceinline__ void v_quant_fp32_tile(const T* x, int64_t token_stride, int64_t len, int64_t len_pad,
                                                  int64_t row0, const float* inv, float* tile, Out* out) {
  constexpr int VEC = kVec<T>;
  constexpr int D = CPR * VEC;
  constexpr int P = D + 1;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  constexpr int kTasks = (kTileRows / 8) * (CPR / 4);
#pragma unroll
  for (int t = warp; t < kTasks; t += kWarps) {
    const int r = (t % 8) * 8 + lane % 8;
    const int c = (t / 8) * 4 + lane / 8;
    float f[VEC];
    if (row0 + r < len) {
      load_vec(x + (row0 + r) * token_stride + c * VEC, f);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) tile[r * P + c * VEC + j] = f[j];
  }
  __syncthreads();
  // Item: 8 consecutive slots of channel d, converted in pairs, one 8-byte (e4m3) or 16-byte
  // (fp16) store.
  for (int i = threadIdx.x; i < D * (kTileRows / 8); i += kThreads) {
    const int d = i / (kTileRows / 8), q = i % (kTileRows / 8);
    const float inv_d = inv[d];
    uint32_t words[2 * sizeof(Out)];
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      const float y0 = __fmul_rn(tile[v_slot_key(8 * q + j, kOutPv<Out>) * P + d], inv_d);
      const float y1 = __fmul_rn(tile[v_slot_key(8 * q + j + 1, kOutPv<Out>) * P + d], inv_d);
      if constexpr (std::is_same_v<Out, __nv_fp8_e4m3>) {
        const uint32_t pair = pack_e4m3x2(y0, y1);
        words[j / 4] = j % 4 == 0 ? pair : words[j / 4] | (pair << 16);
      } else {
        words[j / 2] = pack_f16x2(y0, y1);
      }
    }
    Out* dst = out + d * len_pad + row0 + 8 * q;
    if constexpr (sizeof(Out) == 1) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

// V · inv in the P·V format of the 64-token tile at row0 of one head (x: its rows; out: its
// [D][len_pad] slice), transposed (keys at v_key_slot), zero past len. inv ([D], shared) is read
// only after the barrier inside, so the caller may write it just before; tile ([kTileRows][D + 1]
// floats of 16-byte aligned shared memory) may be reused after the caller's next barrier.
template <typename T, typename Out, int CPR>
__device__ __forceinline__ void v_quant_fast_tile(const T* x, int64_t token_stride, int64_t len, int64_t len_pad,
                                                  int64_t row0, const float* inv, float* tile, Out* out) {
  if constexpr (sizeof(T) == 2 && std::is_same_v<Out, __nv_fp8_e4m3>) {
    v_quant_e4m3_tile<T, CPR>(x, token_stride, len, len_pad, row0, inv, tile, out);
  } else {
    v_quant_fp32_tile<T, Out, CPR>(x, token_stride, len, len_pad, row0, inv, tile, out);
  }
}

// V / scale in the P·V format, transposed, 64 tokens per CTA.
template <typename T, typename Out, int CPR>
__global__ void __launch_bounds__(kThreads)
    v_quant_fast_kernel(const T* v, Strides strides, int64_t heads, int64_t len, int64_t len_pad,
                        const float* amax, float v_max, Out* out) {
  constexpr int D = CPR * kVec<T>;
  extern __shared__ __align__(16) float tile[];  // [kTileRows][D + 1]
  __shared__ float inv[D];
  wait_for_prior_grids();
  const int64_t bh = blockIdx.y;
  const T* x = v + (bh / heads) * strides.batch + (bh % heads) * strides.head;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    const float m = amax[bh * D + d];
    inv[d] = m > 0.0f ? __fdiv_rn(v_max, m) : 0.0f;
  }
  v_quant_fast_tile<T, Out, CPR>(x, strides.token, len, len_pad, row0, inv, tile, out + bh * D * len_pad);
}

// Small problems (Lk <= kSmallLenK), one CTA per b·Hkv: k_mean (Σ rows / Lk per channel, each
// thread summing its rows in order and the kThreads / CPR partials added in a fixed order; zeros
// without smoothing), the V amax per channel → v_scale = amax / v_max in its final form, then V
// quantized tile by tile as v_quant_fast_kernel does.
template <typename T, typename Out, int CPR>
__global__ void __launch_bounds__(kThreads)
    kv_head_fast_kernel(const T* k, Strides ks, const T* v, Strides vs, int64_t heads, int64_t len, int64_t len_pad,
                        bool smooth_k, float v_max, float* k_mean, float* v_scale, Out* out) {
  constexpr int VEC = kVec<T>;
  constexpr int D = CPR * VEC;
  extern __shared__ __align__(16) float smem[];  // red [2][kThreads · VEC], then reused as the V tile [kTileRows][D + 1]
  __shared__ float inv[D];
  wait_for_prior_grids();
  const int64_t bh = blockIdx.x;
  const int64_t b = static_cast<int>(bh) / static_cast<int>(heads), h = static_cast<int>(bh) % static_cast<int>(heads);
  const T* kx = k + b * ks.batch + h * ks.head;
  const T* vx = v + b * vs.batch + h * vs.head;
  float s[VEC], m[VEC];
  kv_column_stats<T, CPR>(kx, ks.token, vx, vs.token, 0, len, smooth_k, s, m);
  reduce_column_stats<T, CPR>(s, m, smem, [&](int d, float ts, float tm) {
    k_mean[bh * D + d] = smooth_k ? ts / static_cast<float>(len) : 0.0f;
    v_scale[bh * D + d] = __fdiv_rn(tm, v_max);
    inv[d] = tm > 0.0f ? __fdiv_rn(v_max, tm) : 0.0f;
  });
  __syncthreads();  // every channel's amax is final before any V element is quantized; red is free
  Out* out_head = out + bh * D * len_pad;
  for (int64_t row0 = 0; row0 < len_pad; row0 += kTileRows) {
    v_quant_fast_tile<T, Out, CPR>(vx, vs.token, len, len_pad, row0, inv, smem, out_head);
    __syncthreads();  // the tile is reloaded by the next pass
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool strides_ok(const Strides& s, int64_t vec) { return s.batch % vec == 0 && s.head % vec == 0 && s.token % vec == 0; }

template <typename T, int CPR, typename Out>
Status launch_v_quant_fast(const QuantizeParams& p, bool chained, int64_t bhk, int64_t len_pad, Out* out) {
  const dim3 vgrid(static_cast<unsigned>(len_pad / kTileRows), static_cast<unsigned>(bhk));
  const size_t smem = sizeof(float) * kTileRows * (CPR * kVec<T> + 1);
  constexpr auto kernel = v_quant_fast_kernel<T, Out, CPR>;
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<kernel>(smem, "v_quant_fast: set shared memory"));
  return launch_kernel("v_quant_fast", chained, kernel, vgrid, kThreads, smem, p.stream,
                       static_cast<const T*>(p.in.v), p.in.v_strides, p.shape.heads_kv, p.shape.len_k, len_pad,
                       p.out.v_scale, v_quant_max(p.quant.pv), out);
}

// Largest Lk of the two-launch small-problem path.
constexpr int64_t kSmallLenK = 1024;

template <typename T, int CPR, typename Out>
Status launch_kv_head_fast(const QuantizeParams& p, bool chained, int64_t bhk, int64_t len_pad, Out* out) {
  constexpr size_t kRed = 2 * kThreads * kVec<T>;
  constexpr size_t kTile = kTileRows * (CPR * kVec<T> + 1);
  const size_t smem = sizeof(float) * (kRed > kTile ? kRed : kTile);
  constexpr auto kernel = kv_head_fast_kernel<T, Out, CPR>;
  SPARGE_RETURN_IF_ERROR(allow_dynamic_smem<kernel>(smem, "kv_head_fast: set shared memory"));
  return launch_kernel("kv_head_fast", chained, kernel, static_cast<unsigned>(bhk), kThreads, smem, p.stream,
                       static_cast<const T*>(p.in.k), p.in.k_strides, static_cast<const T*>(p.in.v), p.in.v_strides,
                       p.shape.heads_kv, p.shape.len_k, len_pad, p.quant.smooth_k, v_quant_max(p.quant.pv),
                       p.out.k_mean, p.out.v_scale, out);
}

// The fast path for 0 < Lk <= kSmallLenK in two launches: kv_head_fast (k_mean, final v_scale,
// quantized V), then the K and Q rows in one grid.
template <typename T, int CPR>
Status quantize_fast_small(const QuantizeParams& p, bool chained) {
  const Shape& s = p.shape;
  const QuantizedQKV& o = p.out;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const int64_t bhq = s.batch * s.heads_q;
  const int64_t bhk = s.batch * s.heads_kv;
  const int64_t len_pad = padded_len_k(s.len_k);
  if (pv_is_fp8(p.quant.pv)) {
    SPARGE_RETURN_IF_ERROR((launch_kv_head_fast<T, CPR>(p, chained, bhk, len_pad, static_cast<__nv_fp8_e4m3*>(o.v))));
  } else {
    SPARGE_RETURN_IF_ERROR((launch_kv_head_fast<T, CPR>(p, chained, bhk, len_pad, static_cast<__half*>(o.v))));
  }
  const RowsArgs ka = k_rows_args(p);
  const RowsArgs qa = q_rows_args(p, nullptr);
  const bool q_rows = bhq > 0 && s.len_q > 0;
  const int64_t group = q_rows ? s.heads_q / s.heads_kv : 1;
  const int64_t kpz = ceil_div(nbk, group);
  const dim3 grid(static_cast<unsigned>(kpz + (q_rows ? nbq : 0)), static_cast<unsigned>(bhk),
                  static_cast<unsigned>(group));
  return launch_kernel("quantize_rows_kq_fast", chained, quantize_rows_kq_fast_kernel<T, CPR>, grid, kRowsThreads<CPR>,
                       0, p.stream, ka, static_cast<unsigned>(nbk), static_cast<unsigned>(kpz), qa,
                       static_cast<unsigned>(nbq));
}

// The rows kernel of Q (kIsQ) or K, with or without the block statistics.
template <bool kIsQ, typename T, int CPR>
Status launch_rows_fast(const RowsArgs& a, bool block_stats, int64_t nblocks, int64_t bh, bool chained,
                        cudaStream_t stream) {
  const char* what = kIsQ ? "quantize_rows_fast<Q>" : "quantize_rows_fast<K>";
  const dim3 grid(static_cast<unsigned>(nblocks), static_cast<unsigned>(bh));
  const auto kernel = block_stats ? quantize_rows_fast_kernel<kIsQ, true, T, CPR>
                                  : quantize_rows_fast_kernel<kIsQ, false, T, CPR>;
  return launch_kernel(what, chained, kernel, grid, kRowsThreads<CPR>, 0, stream, a);
}

// The whole stage on the fast path (see above for when it applies).
template <typename T, int CPR>
Status quantize_fast(const QuantizeParams& p, bool block_stats, bool chained) {
  if (p.shape.len_k > 0 && p.shape.len_k <= kSmallLenK) return quantize_fast_small<T, CPR>(p, chained);
  constexpr int kRowThreads = kRowsThreads<CPR>;
  const Shape& s = p.shape;
  const QuantizedQKV& o = p.out;
  const cudaStream_t stream = p.stream;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const int64_t bhq = s.batch * s.heads_q;
  const int64_t bhk = s.batch * s.heads_kv;
  const int64_t d = s.head_dim;
  const T* k = static_cast<const T*>(p.in.k);
  const T* v = static_cast<const T*>(p.in.v);
  if (s.len_k == 0) {
    SPARGE_CUDA_TRY(cudaMemsetAsync(o.k_mean, 0, sizeof(float) * bhk * d, stream), "quantize: clear k_mean");
    SPARGE_CUDA_TRY(cudaMemsetAsync(o.v_scale, 0, sizeof(float) * bhk * d, stream), "quantize: clear v_scale");
  } else {
    // The per-block V amax lives in the quantized V buffer until v_quant overwrites it: it needs
    // nbk · D floats per head, V holds D · Lk_pad >= D · 64 · nbk elements of at least one byte.
    float* v_amax_parts = static_cast<float*>(o.v);
    float* k_sums = p.quant.smooth_k ? o.k_pool : nullptr;
    SPARGE_RETURN_IF_ERROR(launch_kernel("kv_stats_fast", chained, kv_stats_fast_kernel<T, CPR>, dim3(nbk, bhk),
                                         kThreads, 0, stream, k, p.in.k_strides, v, p.in.v_strides, s.heads_kv,
                                         s.len_k, p.blocks.block_k, k_sums, v_amax_parts));
    SPARGE_RETURN_IF_ERROR(launch_kernel("kv_reduce", chained, kv_reduce_kernel, dim3(bhk, ceil_div(d, kWarpSize)),
                                         kReduceWarps * kWarpSize, 0, stream, k_sums, v_amax_parts, nbk, s.len_k, d,
                                         o.k_mean, o.v_scale));
    SPARGE_RETURN_IF_ERROR((launch_rows_fast<false, T, CPR>(k_rows_args(p), block_stats, nbk, bhk, chained, stream)));
    const int64_t len_pad = padded_len_k(s.len_k);
    if (pv_is_fp8(p.quant.pv)) {
      SPARGE_RETURN_IF_ERROR(
          (launch_v_quant_fast<T, CPR>(p, chained, bhk, len_pad, static_cast<__nv_fp8_e4m3*>(o.v))));
    } else {
      SPARGE_RETURN_IF_ERROR((launch_v_quant_fast<T, CPR>(p, chained, bhk, len_pad, static_cast<__half*>(o.v))));
    }
  }
  // v_scale still holds the V amax when Lk > 0: the Q rows launch finalizes it when it has a thread
  // per entry, else v_finalize does.
  const bool q_rows = bhq > 0 && s.len_q > 0;
  const bool finalize_in_q_rows = q_rows && nbq * bhq * kRowThreads >= bhk * d;
  if (s.len_k > 0 && !finalize_in_q_rows) {
    SPARGE_RETURN_IF_ERROR(launch_kernel("v_finalize", chained, v_finalize_kernel,
                                         static_cast<unsigned>(ceil_div(bhk * d, kThreads)), kThreads, 0, stream,
                                         o.v_scale, bhk * d, v_quant_max(p.quant.pv)));
  }
  if (q_rows) {
    const RowsArgs qa = q_rows_args(p, s.len_k > 0 && finalize_in_q_rows ? o.v_scale : nullptr);
    SPARGE_RETURN_IF_ERROR((launch_rows_fast<true, T, CPR>(qa, block_stats, nbq, bhq, chained, stream)));
  }
  return Status::Ok();
}

// Which chunks-per-row count the fast path takes (0: none).
template <typename T>
int fast_cpr(const QuantizeParams& p) {
  constexpr int64_t vec = kVec<T>;
  const Shape& s = p.shape;
  if (s.head_dim % vec != 0) return 0;
  const int64_t cpr = s.head_dim / vec;
  if (cpr != 8 && cpr != 16 && cpr != 32) return 0;
  if (p.blocks.block_q % kTileRows != 0 || p.blocks.block_k % kTileRows != 0) return 0;
  if (s.batch * s.heads_kv == 0) return 0;
  if (!aligned16(p.in.q) || !aligned16(p.in.k) || !aligned16(p.in.v)) return 0;
  if (!strides_ok(p.in.q_strides, vec) || !strides_ok(p.in.k_strides, vec) || !strides_ok(p.in.v_strides, vec)) return 0;
  if (!aligned16(p.out.q) || !aligned16(p.out.k) || !aligned16(p.out.v)) return 0;
  if (s.len_q > 0 && (s.batch * s.heads_q == 0)) return 0;
  return static_cast<int>(cpr);
}

}  // namespace

Status quantize(const QuantizeParams& p, bool block_stats) {
  const Shape& s = p.shape;
  const QuantizedQKV& o = p.out;
  const cudaStream_t stream = p.stream;
  const auto [nbq, nbk] = block_counts(s, p.blocks);
  const int64_t bhq = s.batch * s.heads_q;
  const int64_t bhk = s.batch * s.heads_kv;
  const int64_t d = s.head_dim;
  bool chained = false;
  SPARGE_RETURN_IF_ERROR(chained_launches(&chained));

  return dispatch_dtype(p.in.dtype, "in.dtype", [&](auto type_tag) -> Status {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(type_tag)>>;
    switch (fast_cpr<T>(p)) {
      case 8: return quantize_fast<T, 8>(p, block_stats, chained);
      case 16: return quantize_fast<T, 16>(p, block_stats, chained);
      case 32: return quantize_fast<T, 32>(p, block_stats, chained);
      default: break;
    }
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
      const RowsArgs ka = k_rows_args(p);
      SPARGE_RETURN_IF_ERROR(launch_rows<false, T>(ka, nbk, bhk, stream));

      SPARGE_CUDA_TRY(cudaMemsetAsync(o.v_scale, 0, sizeof(float) * bhk * d, stream), "quantize: clear v_scale");
      const int64_t len_pad = padded_len_k(s.len_k);
      v_amax_kernel<T><<<dim3(ceil_div(s.len_k, kTileRows), bhk), kThreads, 0, stream>>>(
          v, p.in.v_strides, s.heads_kv, s.len_k, d, o.v_scale);
      SPARGE_RETURN_IF_ERROR(launch_status("v_amax"));
      const dim3 vgrid(static_cast<unsigned>(len_pad / kTileRows), static_cast<unsigned>(bhk));
      const size_t vsmem = sizeof(float) * kTileRows * (d + 1);
      if (pv_is_fp8(p.quant.pv)) {
        auto kernel = v_quant_kernel<T, __nv_fp8_e4m3>;
        SPARGE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, vsmem),
                        "v_quant: set shared memory");
        kernel<<<vgrid, kThreads, vsmem, stream>>>(v, p.in.v_strides, s.heads_kv, s.len_k, len_pad, d, o.v_scale,
                                                   v_quant_max(p.quant.pv), static_cast<__nv_fp8_e4m3*>(o.v));
      } else {
        auto kernel = v_quant_kernel<T, __half>;
        SPARGE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, vsmem),
                        "v_quant: set shared memory");
        kernel<<<vgrid, kThreads, vsmem, stream>>>(v, p.in.v_strides, s.heads_kv, s.len_k, len_pad, d, o.v_scale,
                                                   v_quant_max(p.quant.pv), static_cast<__half*>(o.v));
      }
      SPARGE_RETURN_IF_ERROR(launch_status("v_quant"));
      v_finalize_kernel<<<ceil_div(bhk * d, kThreads), kThreads, 0, stream>>>(o.v_scale, bhk * d,
                                                                              v_quant_max(p.quant.pv));
      SPARGE_RETURN_IF_ERROR(launch_status("v_finalize"));
    } else if (bhk > 0) {
      SPARGE_CUDA_TRY(cudaMemsetAsync(o.v_scale, 0, sizeof(float) * bhk * d, stream), "quantize: clear v_scale");
    }
    if (bhq > 0 && s.len_q > 0) {
      const RowsArgs qa = q_rows_args(p, nullptr);
      SPARGE_RETURN_IF_ERROR(launch_rows<true, T>(qa, nbq, bhq, stream));
    }
    return Status::Ok();
  });
}

}  // namespace sparge::cuda
