// Early-return helpers for functions returning sparge::Status.
#pragma once

#include "sparge/status.h"

#define SPARGE_RETURN_IF_ERROR(...)         \
  do {                                      \
    ::sparge::Status status_ = (__VA_ARGS__); \
    if (!status_.ok()) return status_;      \
  } while (0)
