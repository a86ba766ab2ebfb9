// Warp-level mma.sync wrappers (sm_80+; the e4m3 forms need sm_89+, the one with an f16
// accumulator also PTX ISA 8.7, i.e. nvcc 12.8+).
//
// Fragment layouts (PTX ISA "Matrix Fragments for mma.m16n8k*"), with g = lane / 4 and
// t = lane % 4:
//   C / D (all shapes here, 16 × 8): c[0], c[1] → row g,     columns 2t, 2t+1
//                                    c[2], c[3] → row g + 8, columns 2t, 2t+1
//     fp32: one register per element; f16: two f16x2 registers, c[0] | c[1] << 16 then c[2] | c[3] << 16
//   m16n8k32, 8-bit A (16 × 32, four 8-bit values per register, lowest k in the lowest byte):
//     a[0] → row g, k 4t..4t+3;  a[1] → row g+8, k 4t..4t+3;
//     a[2] → row g, k 4t+16..4t+19;  a[3] → row g+8, k 4t+16..4t+19
//   m16n8k32, 8-bit B (32 × 8, "col"): b[0] → column g, k 4t..4t+3;  b[1] → column g, k 4t+16..4t+19
//   m16n8k16, f16 A (16 × 16, two halves per register, lower k in the low half):
//     a[0] → row g, k 2t, 2t+1;  a[1] → row g+8, k 2t, 2t+1;
//     a[2] → row g, k 2t+8, 2t+9;  a[3] → row g+8, k 2t+8, 2t+9
//   m16n8k16, f16 B (16 × 8, "col"): b[0] → column g, k 2t, 2t+1;  b[1] → column g, k 2t+8, 2t+9
#pragma once

#include <cstdint>

// Whether this nvcc assembles mma.sync with e4m3 operands and an f16 accumulator (PTX ISA 8.7).
#define SPARGE_HAS_MMA_E4M3_F16_ACCUM \
  (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 8))

namespace sparge::cuda {

inline constexpr bool kHasMmaE4m3F16Accum = SPARGE_HAS_MMA_E4M3_F16_ACCUM;

// D = A · B + C, A int8 16×32 (row), B int8 32×8 (col), int32 accumulators.
__device__ __forceinline__ void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A · B + C, A e4m3 16×32 (row), B e4m3 32×8 (col), fp32 accumulators. sm_89+.
__device__ __forceinline__ void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  __trap();  // no e4m3 tensor-core instruction before sm_89; attend_supports rejects these devices
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// D = A · B + C, A e4m3 16×32 (row), B e4m3 32×8 (col), f16 accumulators as two f16x2 registers
// (rows g and g + 8; the lower column in the low half). sm_89+, PTX ISA 8.7.
__device__ __forceinline__ void mma_m16n8k32_e4m3_f16(uint32_t (&d)[2], const uint32_t (&a)[4], uint32_t b0,
                                                      uint32_t b1) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 890 || !SPARGE_HAS_MMA_E4M3_F16_ACCUM)
  __trap();  // no such instruction on this target; attend_supports rejects these devices and builds
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f16.e4m3.e4m3.f16 {%0, %1}, {%2, %3, %4, %5}, {%6, %7}, {%0, %1};\n"
      : "+r"(d[0]), "+r"(d[1])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// D = A · B + C, A fp16 16×16 (row), B fp16 16×8 (col), fp32 accumulators.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace sparge::cuda
