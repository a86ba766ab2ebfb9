// Explicit instantiation of the wgmma attention kernel (sm_90a): head dims padded to 64, 256-key
// tiles made of four kept 64-key blocks, P·V in fp8.
#include "cuda/attn/sm90/attend_wgmma.cuh"

namespace sparge::cuda {

template Status launch_wgmma_attend<64, 256, true>(const MmaAttendParams&, const WgmmaLaunch&);

}  // namespace sparge::cuda
