// Explicit instantiations of the mma.sync attention kernel: head dims padded to 64, P·V in fp16.
#include "cuda/attn/sm80/attend_mma.cuh"

namespace sparge::cuda {

template Status launch_mma_attend<64, 64, PvPrecision::kFp16>(const MmaAttendParams&, dim3, cudaStream_t, bool);
template Status launch_mma_attend<64, 128, PvPrecision::kFp16>(const MmaAttendParams&, dim3, cudaStream_t, bool);

}  // namespace sparge::cuda
