// sparge._C.attention_eager: the eager fast path of sparge.attention, in C++.
//
// A common call (plain eager CPU or CUDA tensors, float hyperparameters, no block mask, the string
// choices of the usual arguments) spends most of its host time before the first kernel launch in
// checks and torch queries; after an idle host every step of that time delays the GPU
// (bench/RESULTS.md, sessions 39-44). This function makes those checks and queries through the
// Python C API, on objects the torch layer hands over once (eager_setup), then runs the core as
// _ops.run_attention does: the workspace kept per (device, stream), quantize and predict queued
// before the output is allocated where the workspace is large. No torch headers: only the Python
// API of torch's objects (attributes and methods of torch.Tensor, torch._C's device and stream
// functions), so the build does not depend on the torch version.
//
// It returns None without running anything for any call it does not take (a tensor subclass,
// autograd, a dispatch mode, another device than the current one, per-head tensors, a block mask,
// any other Python type) and for any argument the general path would reject: that path
// (api._attention_parts) then runs the call, or raises its error. Errors of the core itself are
// raised as by the other bindings.
#include <Python.h>

#include <array>
#include <cmath>
#include <cstdint>

#include "core_call.h"
#include "sparge/api.h"

namespace nb = nanobind;

namespace sparge::python {
namespace {

// attention_eager's positional arguments: those of sparge.attention, in its order.
enum Arg : int {
  kQ,
  kK,
  kV,
  kMode,
  kTopk,
  kCdfthreshd,
  kSimthreshd1,
  kBlockScore,
  kPvthreshd,
  kIsCausal,
  kCausalAlignment,
  kScale,
  kLayout,
  kBlockMask,
  kBlockSize,
  kAttentionSink,
  kCdfSharpen,
  kSmoothK,
  kQkQuantGran,
  kPvPrecision,
  kOutputDtype,
  kReturnLse,
  kReturnSparsity,
  kArgCount
};

// What eager_setup hands over (owned references, kept for the life of the process) and the interned
// names the path looks up.
struct Refs {
  PyObject* tensor_type = nullptr;
  std::array<PyObject*, 3> dtypes{};  // indexed by DType: float16, bfloat16, float32
  PyObject* int64 = nullptr;
  PyObject* uint8 = nullptr;
  PyObject* dispatch_modes = nullptr;  // () -> int: torch._C._len_torch_dispatch_stack
  PyObject* current_device = nullptr;  // () -> int, or None without CUDA
  PyObject* current_stream = nullptr;  // (index) -> int, or None
  PyObject* capturing = nullptr;       // () -> bool, or None
  PyObject* codes = nullptr;           // (layout, mode, block_score, alignment, gran, pv) -> their 6 codes
  PyObject* ops = nullptr;             // the module sparge._ops
  PyObject* requires_grad = nullptr;
  PyObject* is_cuda = nullptr;
  PyObject* is_cpu = nullptr;
  PyObject* dtype = nullptr;
  PyObject* shape = nullptr;
  PyObject* stride = nullptr;
  PyObject* data_ptr = nullptr;
  PyObject* get_device = nullptr;
  PyObject* new_empty = nullptr;
  PyObject* workspaces = nullptr;       // _ops._workspaces: (index, stream) -> KeptWorkspace
  PyObject* eager_workspace = nullptr;  // _ops.eager_workspace(q, index, stream, nbytes) -> KeptWorkspace
  PyObject* split_bytes = nullptr;      // _ops.WORKSPACE_CACHE_MIN_BYTES
  PyObject* dtype_keyword = nullptr;    // ("dtype",)
};

Refs* refs = nullptr;

// A new reference from the C API, or the Python error it set raised.
nb::object checked(PyObject* result) {
  if (result == nullptr) throw nb::python_error();
  return nb::steal(result);
}

nb::object attr(PyObject* obj, PyObject* name) { return checked(PyObject_GetAttr(obj, name)); }

nb::object method(PyObject* obj, PyObject* name) { return checked(PyObject_CallMethodNoArgs(obj, name)); }

bool truth(PyObject* obj) {
  const int value = PyObject_IsTrue(obj);
  if (value < 0) throw nb::python_error();
  return value != 0;
}

bool truth(const nb::object& obj) { return truth(obj.ptr()); }

int64_t as_int(PyObject* obj) {
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) throw nb::python_error();
  return value;
}

int64_t as_int(const nb::object& obj) { return as_int(obj.ptr()); }

uintptr_t as_addr(const nb::object& obj) {
  const unsigned long long value = PyLong_AsUnsignedLongLong(obj.ptr());
  if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw nb::python_error();
  return static_cast<uintptr_t>(value);
}

// An exact float in [lo, hi] (NaN is not), as the general path's checks accept it.
bool float_in(PyObject* x, double lo, double hi, double* value) {
  if (!PyFloat_CheckExact(x)) return false;
  *value = PyFloat_AS_DOUBLE(x);
  return lo <= *value && *value <= hi;
}

// An exact int that is a block size the general path accepts: a multiple of 16 in [16, 1024].
bool block_size(PyObject* x, int64_t* value) {
  if (!PyLong_CheckExact(x)) return false;
  int overflow = 0;
  *value = PyLong_AsLongLongAndOverflow(x, &overflow);
  return overflow == 0 && *value >= 16 && *value <= 1024 && *value % 16 == 0;
}

// The four sizes of a torch.Size, or the four entries of a stride tuple; false for another rank.
bool four(const nb::object& tuple, std::array<int64_t, 4>* out) {
  if (!PyTuple_Check(tuple.ptr()) || PyTuple_GET_SIZE(tuple.ptr()) != 4) return false;
  for (int i = 0; i < 4; ++i) (*out)[i] = as_int(PyTuple_GET_ITEM(tuple.ptr(), i));
  return true;
}

// The DType of a torch dtype object, or -1.
int dtype_code(PyObject* dtype) {
  for (int i = 0; i < 3; ++i) {
    if (refs->dtypes[i] == dtype) return i;
  }
  return -1;
}

// like.new_empty(size, dtype=dtype): a contiguous tensor on like's device.
nb::object new_empty(PyObject* like, const nb::object& size, PyObject* dtype) {
  PyObject* argv[] = {like, size.ptr(), dtype};
  return checked(PyObject_VectorcallMethod(refs->new_empty, argv, 2, refs->dtype_keyword));
}

// (batch, head, token) strides of the [B, H, L, D] view of a tensor's strides in `layout`.
Strides hnd_strides(const std::array<int64_t, 4>& s, bool nhd) {
  return nhd ? Strides{.batch = s[0], .head = s[2], .token = s[1]}
             : Strides{.batch = s[0], .head = s[1], .token = s[2]};
}

// The workspace of a CUDA call on (index, stream): the one kept there when it is large enough and no
// graph is being captured, else the one _ops.eager_workspace makes (kept, regrown, or a fresh one).
// Returns the KeptWorkspace tuple (tensor, aligned address, bytes from there).
nb::object cuda_workspace(PyObject* q, int64_t index, int64_t stream, size_t need) {
  if (!truth(checked(PyObject_CallNoArgs(refs->capturing)))) {
    const nb::object kept_map = attr(refs->ops, refs->workspaces);
    const nb::object key = nb::make_tuple(index, stream);
    PyObject* kept = PyDict_GetItemWithError(kept_map.ptr(), key.ptr());
    if (kept == nullptr && PyErr_Occurred()) throw nb::python_error();
    if (kept != nullptr && static_cast<size_t>(as_int(PyTuple_GET_ITEM(kept, 2))) + kWorkspaceAlign >= need) {
      return nb::borrow(kept);
    }
  }
  const nb::object make = attr(refs->ops, refs->eager_workspace);
  return checked(PyObject_CallFunction(make.ptr(), "OLLn", q, static_cast<long long>(index),
                                       static_cast<long long>(stream), static_cast<Py_ssize_t>(need)));
}

// The settings of a call, read from its Python arguments; false where the fast path does not take it.
struct Settings {
  int layout = 0, mode = 0, score = 0, alignment = 0, granularity = 0, pv = 0;
  double topk = 0, cdfthreshd = 0, simthreshd1 = 0, pvthreshd = 0, scale = 0;
  int64_t block_q = 0, block_k = 0;
};

bool read_settings(PyObject* const* args, Settings* s) {
  if (args[kBlockMask] != Py_None) return false;
  const nb::object key = checked(PyTuple_Pack(6, args[kLayout], args[kMode], args[kBlockScore], args[kCausalAlignment],
                                              args[kQkQuantGran], args[kPvPrecision]));
  PyObject* codes = PyDict_GetItemWithError(refs->codes, key.ptr());
  if (codes == nullptr) {
    PyErr_Clear();  // not a combination of the table, or an unhashable argument
    return false;
  }
  std::array<int*, 6> fields = {&s->layout, &s->mode, &s->score, &s->alignment, &s->granularity, &s->pv};
  for (int i = 0; i < 6; ++i) *fields[i] = static_cast<int>(as_int(PyTuple_GET_ITEM(codes, i)));
  if (!(float_in(args[kTopk], 0.0, 1.0, &s->topk) && float_in(args[kCdfthreshd], 0.0, 1.0, &s->cdfthreshd) &&
        float_in(args[kSimthreshd1], -1.0, 1.0, &s->simthreshd1) &&
        float_in(args[kPvthreshd], 0.0, INFINITY, &s->pvthreshd))) {
    return false;
  }
  if (args[kScale] != Py_None &&
      !(float_in(args[kScale], 0.0, INFINITY, &s->scale) && s->scale > 0.0 && std::isfinite(s->scale))) {
    return false;
  }
  PyObject* blocks = args[kBlockSize];
  return PyTuple_CheckExact(blocks) && PyTuple_GET_SIZE(blocks) == 2 &&
         block_size(PyTuple_GET_ITEM(blocks, 0), &s->block_q) && block_size(PyTuple_GET_ITEM(blocks, 1), &s->block_k);
}

// The tensors' part of the checks of is_plain_eager: exact torch.Tensor, no autograd, no dispatch mode.
bool plain_tensors(PyObject* const* args) {
  for (int i : {kQ, kK, kV}) {
    if (Py_TYPE(args[i]) != reinterpret_cast<PyTypeObject*>(refs->tensor_type)) return false;
  }
  for (int i : {kQ, kK, kV}) {
    if (truth(attr(args[i], refs->requires_grad))) return false;
  }
  return as_int(checked(PyObject_CallNoArgs(refs->dispatch_modes))) == 0;
}

// q, k and v on one device: the CUDA device index, -1 for the CPU; false for anything else.
bool one_device(PyObject* const* args, int64_t* index) {
  if (truth(attr(args[kQ], refs->is_cuda))) {
    *index = as_int(method(args[kQ], refs->get_device));
    for (int i : {kK, kV}) {
      if (!truth(attr(args[i], refs->is_cuda)) || as_int(method(args[i], refs->get_device)) != *index) return false;
    }
    return refs->current_device != Py_None && as_int(checked(PyObject_CallNoArgs(refs->current_device))) == *index;
  }
  *index = -1;
  for (int i : {kQ, kK, kV}) {
    if (!truth(attr(args[i], refs->is_cpu))) return false;
  }
  return true;
}

nb::object eager_call(PyObject* const* args) {
  Settings s;
  if (!read_settings(args, &s) || !plain_tensors(args)) return nb::none();
  int64_t index = -1;
  if (!one_device(args, &index)) return nb::none();
  PyObject* q = args[kQ];
  const nb::object dtype = attr(q, refs->dtype);
  const int code = dtype_code(dtype.ptr());
  if (code < 0 || attr(args[kK], refs->dtype).ptr() != dtype.ptr() ||
      attr(args[kV], refs->dtype).ptr() != dtype.ptr()) {
    return nb::none();
  }
  PyObject* out_dtype = args[kOutputDtype] == Py_None ? dtype.ptr() : args[kOutputDtype];
  const int out_code = dtype_code(out_dtype);
  if (out_code < 0) return nb::none();
  std::array<int64_t, 4> q_size{}, k_size{}, v_size{}, sq{}, sk{}, sv{};
  if (!four(attr(q, refs->shape), &q_size) || !four(attr(args[kK], refs->shape), &k_size) ||
      !four(attr(args[kV], refs->shape), &v_size) || v_size != k_size) {
    return nb::none();
  }
  if (!four(method(q, refs->stride), &sq) || !four(method(args[kK], refs->stride), &sk) ||
      !four(method(args[kV], refs->stride), &sv) || sq[3] != 1 || sk[3] != 1 || sv[3] != 1) {
    return nb::none();
  }
  const bool nhd = s.layout == 1;
  const Shape shape{.batch = q_size[0],
                    .heads_q = nhd ? q_size[2] : q_size[1],
                    .heads_kv = nhd ? k_size[2] : k_size[1],
                    .len_q = nhd ? q_size[1] : q_size[2],
                    .len_k = nhd ? k_size[1] : k_size[2],
                    .head_dim = q_size[3]};
  if (k_size[0] != shape.batch || k_size[3] != shape.head_dim || shape.heads_kv == 0 ||
      shape.heads_q % shape.heads_kv != 0 || shape.head_dim < 1 || shape.head_dim > kMaxHeadDim ||
      shape.batch * shape.heads_q * shape.len_q == 0) {
    return nb::none();
  }
  const bool on_cuda = index >= 0;
  const int64_t stream =
      on_cuda ? as_int(checked(PyObject_CallOneArg(refs->current_stream, nb::int_(index).ptr()))) : 0;

  AttentionParams p;
  p.device = on_cuda ? Device::kCUDA : Device::kCPU;
  p.stream = reinterpret_cast<Stream>(stream);
  p.shape = shape;
  p.blocks = {.block_q = s.block_q, .block_k = s.block_k};
  p.causal = truth(args[kIsCausal]) ? static_cast<Causal>(s.alignment) : Causal::kNone;
  p.in = {.q = reinterpret_cast<const void*>(as_addr(method(q, refs->data_ptr))),
          .k = reinterpret_cast<const void*>(as_addr(method(args[kK], refs->data_ptr))),
          .v = reinterpret_cast<const void*>(as_addr(method(args[kV], refs->data_ptr))),
          .dtype = static_cast<DType>(code),
          .q_strides = hnd_strides(sq, nhd),
          .k_strides = hnd_strides(sk, nhd),
          .v_strides = hnd_strides(sv, nhd)};
  p.quant = {.sm_scale = static_cast<float>(s.scale),
             .smooth_k = truth(args[kSmoothK]),
             .granularity = static_cast<QuantGranularity>(s.granularity),
             .pv = static_cast<PvPrecision>(s.pv)};
  p.select = {.mode = static_cast<SelectMode>(s.mode),
              .block_score = static_cast<BlockScore>(s.score),
              .topk = {.value = static_cast<float>(s.topk)},
              .cdfthreshd = {.value = static_cast<float>(s.cdfthreshd)},
              .simthreshd1 = {.value = static_cast<float>(s.simthreshd1)},
              .attention_sink = truth(args[kAttentionSink]),
              .cdf_sharpen = truth(args[kCdfSharpen])};
  p.pvthreshd = {.value = static_cast<float>(s.pvthreshd)};
  const bool return_lse = truth(args[kReturnLse]);
  const bool return_stats = truth(args[kReturnSparsity]);

  // The workspace, over-allocated by kWorkspaceAlign bytes as the torch layer's are.
  const size_t need = workspace_size(p) + kWorkspaceAlign;
  nb::object workspace;  // holds the tensor for the duration of the call
  if (on_cuda) {
    workspace = cuda_workspace(q, index, stream, need);
    p.workspace = reinterpret_cast<void*>(as_int(PyTuple_GET_ITEM(workspace.ptr(), 1)));
    p.workspace_bytes = static_cast<size_t>(as_int(PyTuple_GET_ITEM(workspace.ptr(), 2)));
  } else {
    workspace = new_empty(q, nb::make_tuple(need), refs->uint8);
    const uintptr_t base = as_addr(method(workspace.ptr(), refs->data_ptr));
    const int64_t aligned = round_up(static_cast<int64_t>(base), kWorkspaceAlign);
    p.workspace = reinterpret_cast<void*>(static_cast<uintptr_t>(aligned));
    p.workspace_bytes = need - kWorkspaceAlign;
  }
  nb::object stats = nb::none();
  if (return_stats) {
    stats = new_empty(q, nb::make_tuple(static_cast<int64_t>(kStatCount)), refs->int64);
    p.stats_out = reinterpret_cast<int64_t*>(as_addr(method(stats.ptr(), refs->data_ptr)));
  }
  // A large CUDA call queues quantize and predict before its output exists (see _ops.run_attention).
  const bool split = on_cuda && need > static_cast<size_t>(as_int(attr(refs->ops, refs->split_bytes)));
  if (split) run(&attention_begin, p);
  const int64_t b = shape.batch, h = shape.heads_q, l = shape.len_q, d = shape.head_dim;
  const nb::object o = new_empty(q, nhd ? nb::make_tuple(b, l, h, d) : nb::make_tuple(b, h, l, d), out_dtype);
  p.o = reinterpret_cast<void*>(as_addr(method(o.ptr(), refs->data_ptr)));
  p.o_dtype = static_cast<DType>(out_code);
  p.o_strides = nhd ? Strides{.batch = l * h * d, .head = d, .token = h * d}
                    : Strides{.batch = h * l * d, .head = l * d, .token = d};
  nb::object lse = nb::none();
  if (return_lse) {
    lse = new_empty(q, nb::make_tuple(b, h, l), refs->dtypes[static_cast<int>(DType::kFloat32)]);
    p.lse = reinterpret_cast<float*>(as_addr(method(lse.ptr(), refs->data_ptr)));
  }
  run(split ? &attention_finish : &attention, p);
  return nb::make_tuple(o, lse, stats);
}

PyObject* attention_eager(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (refs == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "attention_eager: eager_setup has not been called");
    return nullptr;
  }
  if (nargs != kArgCount) {
    PyErr_Format(PyExc_TypeError, "attention_eager: expected %d arguments, got %zd", static_cast<int>(kArgCount),
                 nargs);
    return nullptr;
  }
  try {
    return eager_call(args).release().ptr();
  } catch (nb::python_error& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef attention_eager_def = {
    "attention_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_eager)), METH_FASTCALL,
    "attention_eager(q, k, v, mode, topk, cdfthreshd, simthreshd1, block_score, pvthreshd, is_causal, "
    "causal_alignment, scale, layout, block_mask, block_size, attention_sink, cdf_sharpen, smooth_k, qk_quant_gran, "
    "pv_precision, output_dtype, return_lse, return_sparsity)\n\nsparge.attention's arguments, by position: "
    "(o, lse or None, stats or None) after running the call, or None where the fast path does not take it "
    "(nothing run). Needs eager_setup."};

PyObject* owned(nb::handle h) { return nb::borrow(h).release().ptr(); }

PyObject* interned(const char* name) { return PyUnicode_InternFromString(name); }

void eager_setup(nb::handle tensor_type, nb::handle dtypes, nb::handle int64, nb::handle uint8,
                 nb::handle dispatch_modes, nb::handle current_device, nb::handle current_stream,
                 nb::handle capturing, nb::handle codes, nb::handle ops) {
  if (!PyType_Check(tensor_type.ptr())) throw nb::type_error("eager_setup: tensor_type must be a type");
  if (!PyTuple_Check(dtypes.ptr()) || PyTuple_GET_SIZE(dtypes.ptr()) != 3) {
    throw nb::type_error("eager_setup: dtypes must be (float16, bfloat16, float32)");
  }
  if (!PyDict_Check(codes.ptr())) throw nb::type_error("eager_setup: codes must be a dict");
  auto* r = new Refs;  // kept for the life of the process, as the module is
  r->tensor_type = owned(tensor_type);
  for (int i = 0; i < 3; ++i) r->dtypes[i] = owned(PyTuple_GET_ITEM(dtypes.ptr(), i));
  r->int64 = owned(int64);
  r->uint8 = owned(uint8);
  r->dispatch_modes = owned(dispatch_modes);
  r->current_device = owned(current_device);
  r->current_stream = owned(current_stream);
  r->capturing = owned(capturing);
  r->codes = owned(codes);
  r->ops = owned(ops);
  r->requires_grad = interned("requires_grad");
  r->is_cuda = interned("is_cuda");
  r->is_cpu = interned("is_cpu");
  r->dtype = interned("dtype");
  r->shape = interned("shape");
  r->stride = interned("stride");
  r->data_ptr = interned("data_ptr");
  r->get_device = interned("get_device");
  r->new_empty = interned("new_empty");
  r->workspaces = interned("_workspaces");
  r->eager_workspace = interned("eager_workspace");
  r->split_bytes = interned("WORKSPACE_CACHE_MIN_BYTES");
  r->dtype_keyword = Py_BuildValue("(s)", "dtype");
  refs = r;
}

}  // namespace

void bind_eager(nb::module_& m) {
  m.def("eager_setup", &eager_setup, nb::arg("tensor_type"), nb::arg("dtypes"), nb::arg("int64"), nb::arg("uint8"),
        nb::arg("dispatch_modes"), nb::arg("current_device"), nb::arg("current_stream"), nb::arg("capturing"),
        nb::arg("codes"), nb::arg("ops"),
        "Hands attention_eager the torch objects it uses (python/sparge/api.py calls it once at import).");
  m.attr("attention_eager") = nb::steal(PyCFunction_NewEx(&attention_eager_def, nullptr, m.attr("__name__").ptr()));
}

}  // namespace sparge::python
