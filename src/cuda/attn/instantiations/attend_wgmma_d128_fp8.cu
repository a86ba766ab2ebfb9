// Explicit instantiations of the wgmma attention kernel (sm_90a): head dims padded to 128, P·V in fp8.
#include "cuda/attn/sm90/attend_wgmma.cuh"

namespace sparge::cuda {

template Status launch_wgmma_attend<128, 64, false>(const MmaAttendParams&, const WgmmaLaunch&);
template Status launch_wgmma_attend<128, 128, false>(const MmaAttendParams&, const WgmmaLaunch&);

}  // namespace sparge::cuda
