// CPU backend: access to host data. Strided [B, H, L, D] tensors of the public dtypes (the last,
// D, dimension is contiguous; the other strides are arbitrary non-negative element strides, 0
// included, e.g. heads expanded from one) and per-head hyperparameters.
#pragma once

#include <cstdint>

#include "common/numerics.h"
#include "sparge/params.h"

namespace sparge::cpu {

// Element offset of row (b, h, t) of a strided tensor.
inline int64_t row_offset(const Strides& s, int64_t b, int64_t h, int64_t t) {
  return b * s.batch + h * s.head + t * s.token;
}

// Converts the `n` contiguous elements of `dtype` at element offset `offset` of `base` to fp32.
inline void load_row(const void* base, DType dtype, int64_t offset, int64_t n, float* out) {
  switch (dtype) {
    case DType::kFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) out[d] = num::fp16_to_float(x[d]);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) out[d] = num::bf16_to_float(x[d]);
      return;
    }
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) out[d] = x[d];
      return;
    }
  }
}

// Writes `n` fp32 values as `dtype` (round-to-nearest-even) at element offset `offset` of `base`.
inline void store_row(void* base, DType dtype, int64_t offset, int64_t n, const float* in) {
  switch (dtype) {
    case DType::kFloat16: {
      uint16_t* x = static_cast<uint16_t*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) x[d] = num::float_to_fp16(in[d]);
      return;
    }
    case DType::kBFloat16: {
      uint16_t* x = static_cast<uint16_t*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) x[d] = num::float_to_bf16(in[d]);
      return;
    }
    case DType::kFloat32: {
      float* x = static_cast<float*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) x[d] = in[d];
      return;
    }
  }
}

// The value of a HeadParam for query head h (host memory on the CPU backend).
inline float head_value(const HeadParam& p, int64_t h) { return p.per_head != nullptr ? p.per_head[h] : p.value; }

}  // namespace sparge::cpu
