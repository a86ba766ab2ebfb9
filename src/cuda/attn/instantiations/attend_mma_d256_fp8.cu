// Explicit instantiations of the mma.sync attention kernel: head dims padded to 256, P·V in fp8.
#include "cuda/attn/sm80/attend_mma.cuh"

namespace sparge::cuda {

template Status launch_mma_attend<256, 64, PvPrecision::kFp8>(const MmaAttendParams&, dim3, cudaStream_t, bool);
template Status launch_mma_attend<256, 128, PvPrecision::kFp8>(const MmaAttendParams&, dim3, cudaStream_t, bool);

}  // namespace sparge::cuda
