// CPU backend: the readable reference of docs/method.md. Every function receives params that
// dispatch.cpp has already validated (and whose sm_scale is resolved), on host pointers.
#pragma once

#include "sparge/params.h"

namespace sparge::cpu {

void quantize(const QuantizeParams& p);
void predict(const PredictParams& p);
void attend(const AttendParams& p);

}  // namespace sparge::cpu
