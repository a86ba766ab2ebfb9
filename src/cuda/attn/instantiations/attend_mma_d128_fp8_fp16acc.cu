// Explicit instantiations of the mma.sync attention kernel: head dims padded to 128, P·V in fp8 with
// f16 accumulators (kFp8Fp16Accum).
#include "cuda/attn/sm80/attend_mma.cuh"

namespace sparge::cuda {

template Status launch_mma_attend<128, 64, PvPrecision::kFp8Fp16Accum>(const MmaAttendParams&, dim3, cudaStream_t, bool);
template Status launch_mma_attend<128, 128, PvPrecision::kFp8Fp16Accum>(const MmaAttendParams&, dim3, cudaStream_t, bool);

}  // namespace sparge::cuda
