// Shared by the two translation units of sparge._C: how a core call runs and how its Status becomes
// a Python exception (bindings.cpp documents the mapping), and the eager fast path's registration.
#pragma once

#include <nanobind/nanobind.h>

#include "sparge/status.h"

namespace sparge::python {

// Raises a Status that is not ok as the Python exception of its code.
inline void raise_if_error(const Status& status) {
  if (status.ok()) return;
  PyObject* type = PyExc_RuntimeError;
  switch (status.code()) {
    case StatusCode::kInvalidArgument: type = PyExc_ValueError; break;
    case StatusCode::kUnsupported:
    case StatusCode::kNotBuilt: type = PyExc_NotImplementedError; break;
    default: break;
  }
  PyErr_SetString(type, status.message().c_str());
  throw nanobind::python_error();
}

// Runs a C++ entry point without the GIL and raises its Status, if not ok, as a Python exception.
template <typename Params>
void run(Status (*entry)(const Params&), const Params& params) {
  Status status;
  {
    nanobind::gil_scoped_release release;
    status = entry(params);
  }
  raise_if_error(status);
}

// Adds eager_setup and attention_eager (eager.cpp) to the module.
void bind_eager(nanobind::module_& m);

}  // namespace sparge::python
