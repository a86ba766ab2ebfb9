// sparge — status returned by every public entry point.
#pragma once

#include <string>
#include <utility>

namespace sparge {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // a field has a bad value, shape, dtype or pointer
  kUnsupported = 2,      // valid request that no built kernel can serve (head dim, GPU arch, ...)
  kNotBuilt = 3,         // the requested backend was not compiled into this library
  kCudaError = 4,        // a CUDA runtime call failed
  kInternal = 5,
};

// A status is either ok or carries a code and a message. Messages name the offending field,
// what was expected and what was given, e.g.
//   "head_dim: expected 1..256, got 320".
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

const char* status_code_name(StatusCode code);

}  // namespace sparge
