"""torch.library operators of sparge: ``torch.ops.sparge.{attention, quantize, predict, attend}``.

Each operator allocates its outputs (and, for ``attention``, the workspace) with torch, passes the
current CUDA stream of the tensors' device to the C++ core (under a device guard when that is not
the current device), and has a fake implementation so ``torch.compile(fullgraph=True)`` traces it
without a graph break. :func:`sparge.attention` skips the dispatcher for plain eager tensors
(:func:`is_plain_eager`): its common calls run in ``_C.attention_eager`` (src/python/eager.cpp),
which makes run_attention's core calls from C++, and the others call :func:`_attention_impl`.

The schemas use plain integers for the enums of ``include/sparge/params.h``:

* ``layout``: 0 = HND ``[B, H, L, D]``, 1 = NHD ``[B, L, H, D]``
* ``mode`` (``SelectMode``): 0 dense, 1 topk, 2 cdf, 3 block_mask
* ``block_score`` (``BlockScore``): 0 mean, 1 spikes
* ``causal`` (``Causal``): 0 none, 1 top-left, 2 bottom-right
* ``granularity`` (``QuantGranularity``): 0 per-block, 1 per-warp, 2 per-thread
* ``pv`` (``PvPrecision``): 0 fp8, 1 fp16, 2 fp8 with fp16 accumulation

``scale = 0.0`` means ``D ** -0.5``. Per-head hyperparameters are ``Tensor?`` arguments (fp32,
``[Hq]``, contiguous, on the device of q) that override the float of the same name.

These operators expect inputs already normalised by :mod:`sparge.api`; they only re-check what
memory safety needs. Use the functions of :mod:`sparge` rather than calling them directly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _C

LAYOUT_HND, LAYOUT_NHD = 0, 1
MODE_DENSE, MODE_TOPK, MODE_CDF, MODE_BLOCK_MASK = 0, 1, 2, 3
SCORE_MEAN, SCORE_SPIKES = 0, 1
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2
GRAN_PER_BLOCK, GRAN_PER_WARP, GRAN_PER_THREAD = 0, 1, 2
PV_FP8, PV_FP16, PV_FP8_FP16ACC = 0, 1, 2

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
PART_WHOLE, PART_BEGIN, PART_FINISH = 0, 1, 2  # _C.attention's part: attention, attention_begin, attention_finish
_ARG_O, _ARG_LSE = 26, 29  # positions of o and lse in _C.attention's arguments after the device code and stream
SELECT_SINK = 1  # select_flags bits: Selection::attention_sink, Selection::cdf_sharpen
SELECT_CDF_SHARPEN = 2
V_DTYPES = {PV_FP8: torch.float8_e4m3fn, PV_FP16: torch.float16, PV_FP8_FP16ACC: torch.float8_e4m3fn}

QUANTIZED_FIELDS = (
    "q", "q_scale", "k", "k_scale", "k_mean", "v", "v_scale",
    "lse_shift", "q_pool", "q_sim", "k_pool", "k_sim", "k_spikes",
)  # fmt: skip


# ---- shapes (mirror of include/sparge/layout.h) --------------------------------------------------


def v_key_slots(length: int, fp8: bool, device=None) -> Tensor:
    """Position of keys ``0 .. length - 1`` in a row of quantized V^T (``v_key_slot`` of
    include/sparge/layout.h): fp16 V keeps key order; e4m3 V stores every aligned group of 16 keys
    as 8a + 2t + b -> 4t + 2a + b, the order in which the 8-bit P·V A fragment takes P from the
    Q·K^T accumulators."""
    key = torch.arange(length, device=device)
    if not fp8:
        return key
    r = key % 16
    return key - r + ((r >> 1) & 3) * 4 + (r >> 3) * 2 + (r & 1)


def v_in_key_order(v: Tensor) -> Tensor:
    """Quantized V ``[..., D, Lk_pad]`` with its last dimension in key order (a gather; fp16 V as is)."""
    fp8 = v.dtype == torch.float8_e4m3fn
    return v[..., v_key_slots(v.size(-1), fp8, v.device)] if fp8 else v


def ceil_div(a, b):
    return (a + b - 1) // b


def q_scale_groups(len_q, granularity: int):
    if granularity == GRAN_PER_BLOCK:
        return ceil_div(len_q, 64)
    if granularity == GRAN_PER_WARP:
        return ceil_div(len_q, 16)
    return ceil_div(len_q, 16) * 8


def k_scale_groups(len_k, granularity: int):
    if granularity == GRAN_PER_THREAD:
        return ceil_div(len_k, 64) * 4
    return ceil_div(len_k, 64)


def quantized_specs(batch, heads_q, heads_kv, len_q, len_k, head_dim, block_q, block_k, granularity, pv):
    """(shape, dtype) of each QuantizedQKV buffer, in QUANTIZED_FIELDS order."""
    nbq, nbk = ceil_div(len_q, block_q), ceil_div(len_k, block_k)
    bq, bk, d, f32 = (batch, heads_q), (batch, heads_kv), head_dim, torch.float32
    return (
        ((*bq, len_q, d), torch.int8),
        ((*bq, q_scale_groups(len_q, granularity)), f32),
        ((*bk, len_k, d), torch.int8),
        ((*bk, k_scale_groups(len_k, granularity)), f32),
        ((*bk, d), f32),
        ((*bk, d, ceil_div(len_k, _C.V_PAD_TOKENS) * _C.V_PAD_TOKENS), V_DTYPES[pv]),
        ((*bk, d), f32),
        ((*bq, len_q), f32),
        ((*bq, nbq, d), f32),
        ((*bq, nbq), f32),
        ((*bk, nbk, d), f32),
        ((*bk, nbk), f32),
        ((*bk, nbk, _C.SPIKE_KEYS, d), f32),
    )


# ---- helpers -------------------------------------------------------------------------------------


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _hnd(x: Tensor, layout: int) -> Tensor:
    """A [B, H, L, D] view of x."""
    return x.transpose(1, 2) if layout == LAYOUT_NHD else x


def _hnd_sizes(size: Sequence[int], layout: int) -> Sequence[int]:
    """(B, H, L, D) of a [B, H, L, D] (HND) or [B, L, H, D] (NHD) size, without making a view."""
    return (size[0], size[2], size[1], size[3]) if layout == LAYOUT_NHD else size


def _hnd_strides(x: Tensor, layout: int) -> tuple[int, int, int]:
    """(batch, head, token) strides of the [B, H, L, D] view of x."""
    s = x.stride()
    return (s[0], s[2], s[1]) if layout == LAYOUT_NHD else s[:3]


def _addr(x: Optional[Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _aligned_addr(workspace: Tensor) -> int:
    """The first WORKSPACE_ALIGN-aligned address of a workspace allocated WORKSPACE_ALIGN bytes over
    (torch's CPU allocator aligns to 64 bytes only)."""
    align = _C.WORKSPACE_ALIGN
    return -(-workspace.data_ptr() // align) * align


def _size_device(device: torch.device) -> int:
    """The device argument of the core's workspace-size queries: 0 on the CPU, 1 on CUDA."""
    return 0 if device.type == "cpu" else 1


def _input_args(q: Tensor, k: Tensor, v: Tensor, layout: int) -> dict:
    """The un-quantized inputs as ``_C`` takes them: addresses, dtype code, [B, H, L] strides."""
    return dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), dtype=DTYPE_CODES[q.dtype],
                q_strides=_hnd_strides(q, layout), k_strides=_hnd_strides(k, layout),
                v_strides=_hnd_strides(v, layout))  # fmt: skip


def _selection_args(mode, block_score, topk, topk_per_head, cdfthreshd, cdfthreshd_per_head, simthreshd1,
                    simthreshd1_per_head, select_flags, block_mask) -> dict:
    """The stage-1 keyword arguments of ``_C.predict``."""
    return dict(mode=mode, block_score=block_score, topk=topk, topk_per_head=_addr(topk_per_head),
                cdfthreshd=cdfthreshd, cdfthreshd_per_head=_addr(cdfthreshd_per_head), simthreshd1=simthreshd1,
                simthreshd1_per_head=_addr(simthreshd1_per_head), select_flags=select_flags,
                block_mask=_addr(block_mask))  # fmt: skip


def _empty_out(batch, heads, length, head_dim, layout: int, dtype, device) -> Tensor:
    """An uninitialised [B, H, L, D] (HND) or [B, L, H, D] (NHD) output."""
    if layout == LAYOUT_NHD:
        return torch.empty((batch, length, heads, head_dim), dtype=dtype, device=device)
    return torch.empty((batch, heads, length, head_dim), dtype=dtype, device=device)


def _call_cuda(index: int, entry, /, *args, **kwargs):
    """``entry(1, stream handle, *args, **kwargs)`` on CUDA device `index` and its current stream,
    under a device guard only when it is not the current device (entering one costs more than the
    rest of a small call). Positional-only parameters: the callers' keyword arguments (``index=``
    of _C.predict and _C.attend among them) go to `entry`."""
    if torch._C._cuda_getDevice() == index:
        return entry(1, torch._C._cuda_getCurrentRawStream(index), *args, **kwargs)
    with torch.cuda.device(index):
        return entry(1, torch._C._cuda_getCurrentRawStream(index), *args, **kwargs)


def _call_core(like: Tensor, entry, /, *args, **kwargs):
    """``entry(device code, stream handle, *args, **kwargs)``: a call of the C++ core on the device
    of `like`, on its current CUDA stream (stream 0 on the CPU)."""
    if like.is_cpu:
        return entry(0, 0, *args, **kwargs)
    if not like.is_cuda:
        raise ValueError(f"device: expected a cpu or cuda tensor, got {like.device}")
    return _call_cuda(like.get_device(), entry, *args, **kwargs)


def _call_on(device: torch.device, entry, /, *args, **kwargs):
    """_call_core for the calls that have a device but no tensor, such as :func:`sparge.attend_kernel`."""
    if device.type == "cpu":
        return entry(0, 0, *args, **kwargs)
    if device.type != "cuda":
        raise ValueError(f"device: expected a cpu or cuda tensor, got {device}")
    return _call_cuda(device.index if device.index is not None else torch._C._cuda_getDevice(), entry, *args, **kwargs)


def _check_per_head(name: str, x: Optional[Tensor], heads_q: int, device: torch.device) -> None:
    if x is None:
        return
    _require(
        x.dtype == torch.float32 and x.dim() == 1 and x.numel() == heads_q and x.is_contiguous(),
        f"{name}: expected a contiguous fp32 tensor of shape [{heads_q}], got {x.dtype} {tuple(x.shape)}",
    )
    _require(x.device == device, f"{name}: expected a tensor on {device}, got {x.device}")


def _check_blocks(block_q: int, block_k: int) -> None:
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        ok = 16 <= value <= 1024 and value % 16 == 0
        _require(ok, f"{name}: expected a multiple of 16 in [16, 1024], got {value}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, layout: int):
    """Shape of a (q, k, v) call as (B, Hq, Hkv, Lq, Lk, D) after the checks memory safety needs
    (messages are formatted only on failure: this runs on every call)."""
    if layout not in (LAYOUT_HND, LAYOUT_NHD):
        _require(False, f"layout: expected 0 (HND) or 1 (NHD), got {layout}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            _require(False, f"{name}: expected a 4-D tensor, got {x.dim()}-D")
        if x.dtype != q.dtype or q.dtype not in DTYPE_CODES:
            _require(False, f"{name}: expected fp16/bf16/fp32 like q, got {x.dtype}")
        if x.device != q.device:
            _require(False, f"{name}: expected a tensor on {q.device}, got {x.device}")
        if x.size(-1) > 1 and x.stride(-1) != 1:
            _require(False, f"{name}: expected stride 1 in the last dimension")
    batch, heads_q, len_q, head_dim = _hnd_sizes(q.shape, layout)
    k_batch, heads_kv, len_k, k_dim = _hnd_sizes(k.shape, layout)
    if k.shape != v.shape:
        _require(False, f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k_batch != batch or k_dim != head_dim:
        _require(False, f"k: batch and head_dim must match q {tuple(q.shape)}")
    return batch, heads_q, heads_kv, len_q, len_k, head_dim


def _check_quantized(quantized: Sequence[Tensor], shape, blocks, granularity: int, pv: int) -> None:
    specs = quantized_specs(*shape, *blocks, granularity, pv)
    device = quantized[0].device
    for name, x, (size, dtype) in zip(QUANTIZED_FIELDS, quantized, specs):
        _require(
            tuple(x.shape) == tuple(size) and x.dtype == dtype and x.is_contiguous() and x.device == device,
            f"quantized.{name}: expected a contiguous {dtype} tensor of shape {tuple(size)} on {device}, "
            f"got {x.dtype} {tuple(x.shape)} on {x.device}",
        )


def _stats(return_stats: bool, device) -> Tensor:
    if not return_stats:
        return torch.empty(0, dtype=torch.int64, device=device)  # no fill launched for nothing
    return torch.zeros(_C.STAT_COUNT, dtype=torch.int64, device=device)


# ---- sparge::attention ---------------------------------------------------------------------------


def _attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Optional[Tensor],
    topk_per_head: Optional[Tensor],
    cdfthreshd_per_head: Optional[Tensor],
    simthreshd1_per_head: Optional[Tensor],
    pvthreshd_per_head: Optional[Tensor],
    layout: int,
    mode: int,
    block_score: int,
    topk: float,
    cdfthreshd: float,
    simthreshd1: float,
    pvthreshd: float,
    causal: int,
    scale: float,
    block_q: int,
    block_k: int,
    select_flags: int,
    smooth_k: bool,
    granularity: int,
    pv: int,
    output_dtype: torch.dtype,
    return_lse: bool,
    return_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused quantize → predict → attend. Returns (o, lse or [0], stats [4] int64 or [0])."""
    shape = _check_inputs(q, k, v, layout)
    batch, heads_q, _, len_q, len_k, _ = shape
    _check_blocks(block_q, block_k)
    _require(output_dtype in DTYPE_CODES, f"output_dtype: expected fp16/bf16/fp32, got {output_dtype}")
    for name, x in (
        ("topk_per_head", topk_per_head),
        ("cdfthreshd_per_head", cdfthreshd_per_head),
        ("simthreshd1_per_head", simthreshd1_per_head),
        ("pvthreshd_per_head", pvthreshd_per_head),
    ):
        _check_per_head(name, x, heads_q, q.device)
    nbq, nbk = ceil_div(len_q, block_q), ceil_div(len_k, block_k)
    if block_mask is not None:
        _require(
            block_mask.dtype == torch.uint8
            and tuple(block_mask.shape) == (batch, heads_q, nbq, nbk)
            and block_mask.is_contiguous()
            and block_mask.device == q.device,
            f"block_mask: expected a contiguous uint8 tensor of shape {(batch, heads_q, nbq, nbk)} on {q.device}",
        )
    o, lse, stats = run_attention(
        q, k, v, shape, block_mask, topk_per_head, cdfthreshd_per_head, simthreshd1_per_head, pvthreshd_per_head,
        layout, mode, block_score, topk, cdfthreshd, simthreshd1, pvthreshd, causal, scale, block_q, block_k,
        select_flags, smooth_k, granularity, pv, output_dtype, return_lse, return_stats,
    )  # fmt: skip
    if lse is None:
        lse = torch.empty(0, dtype=torch.float32, device=q.device)
    if stats is None:
        stats = torch.empty(0, dtype=torch.int64, device=q.device)
    return o, lse, stats


def run_attention(q, k, v, shape, block_mask, topk_per_head, cdfthreshd_per_head, simthreshd1_per_head,
                  pvthreshd_per_head, layout, mode, block_score, topk, cdfthreshd, simthreshd1, pvthreshd, causal,
                  scale, block_q, block_k, select_flags, smooth_k, granularity, pv, output_dtype, return_lse,
                  return_stats):  # fmt: skip
    """The work of sparge::attention on arguments that passed its checks, ``shape`` being what
    _check_inputs returns: allocates o, the workspace and only the outputs asked for, and runs the
    C++ core. Returns (o, lse or None, stats or None). _C.attention_eager makes the same core calls
    for the common eager calls, with a workspace kept for reuse (eager_workspace).

    Few Python frames and torch queries from here to the binding: after an idle host every distinct
    step of a call runs many times slower than warm (cold caches), and each one before the first
    kernel launch delays it (bench/RESULTS.md, sessions 36-37)."""
    batch, heads_q, _, len_q, _, head_dim = shape
    device = q.device
    stats = torch.empty(_C.STAT_COUNT, dtype=torch.int64, device=device) if return_stats else None
    if batch * heads_q * len_q == 0:
        if stats is not None:
            stats.zero_()  # the core writes the counters of non-empty problems only
        lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=device) if return_lse else None
        return _empty_out(batch, heads_q, len_q, head_dim, layout, output_dtype, device), lse, stats
    on_cpu = q.is_cpu
    align = _C.WORKSPACE_ALIGN
    # Over-allocated by `align` bytes: the core gets the first aligned address in it.
    nbytes = _C.workspace_size(shape, (block_q, block_k), granularity, pv, 0 if on_cpu else 1) + align
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
    settings = (block_mask, topk_per_head, cdfthreshd_per_head, simthreshd1_per_head, pvthreshd_per_head, layout, mode,
                block_score, topk, cdfthreshd, simthreshd1, pvthreshd, causal, scale, block_q, block_k, select_flags,
                smooth_k, granularity, pv)  # fmt: skip
    # A large CUDA call in two core calls, so that quantize and predict are queued before the outputs
    # exist: with a kept workspace (_C.attention_eager's calls, which split alike), the GPU starts
    # before the host's first allocation, which after an idle host costs ~0.1 ms (bench/RESULTS.md,
    # session 37). Small calls stay one core call: the second costs more host time than the GPU work
    # it would overlap.
    split = not on_cpu and nbytes > WORKSPACE_CACHE_MIN_BYTES
    if split:
        launch_attention(q, k, v, shape, None, None, stats, workspace, *settings, PART_BEGIN)
    o = _empty_out(batch, heads_q, len_q, head_dim, layout, output_dtype, device)
    lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=device) if return_lse else None
    launch_attention(q, k, v, shape, o, lse, stats, workspace, *settings, PART_FINISH if split else PART_WHOLE)
    return o, lse, stats


# CUDA workspaces of up to 1 / WORKSPACE_CACHE_FRACTION of the device's memory (at least
# WORKSPACE_CACHE_MIN_BYTES) are kept per (device, stream) and reused by later calls.
WORKSPACE_CACHE_FRACTION = 256
WORKSPACE_CACHE_MIN_BYTES = 1 << 22


class KeptWorkspace(NamedTuple):
    """A workspace kept for reuse: the tensor, its first WORKSPACE_ALIGN-aligned address and the bytes
    from there (read once when it is made, so that a call reuses it without a tensor query)."""

    tensor: Tensor
    addr: int
    nbytes: int


_workspaces: dict[tuple[int, int], KeptWorkspace] = {}
_workspace_limits: dict[int, int] = {}


def workspace_cache_limit(index: int) -> int:
    """Bytes of the largest workspace kept for reuse on CUDA device ``index``."""
    limit = _workspace_limits.get(index)
    if limit is None:
        memory = torch.cuda.get_device_properties(index).total_memory
        limit = _workspace_limits[index] = max(WORKSPACE_CACHE_MIN_BYTES, memory // WORKSPACE_CACHE_FRACTION)
    return limit


def release_workspace_cache() -> None:
    """Drops the workspaces that :func:`sparge.attention` keeps for reuse per (device, stream), up to
    1/256 of each device's memory; their memory returns to torch's caching allocator."""
    _workspaces.clear()


def _kept_workspace(key: tuple[int, int], nbytes: int, limit: int, device: torch.device) -> KeptWorkspace:
    """The workspace kept for ``key`` = (device index, stream), regrown to hold ``nbytes`` <= ``limit``
    (including the WORKSPACE_ALIGN bytes the callers over-allocate by)."""
    kept = _workspaces.get(key)
    if kept is None or kept.nbytes < nbytes - _C.WORKSPACE_ALIGN:
        size = min(limit, 1 << (nbytes - 1).bit_length())  # fewer regrowths
        tensor = torch.empty(size, dtype=torch.uint8, device=device)
        kept = _workspaces[key] = KeptWorkspace(tensor, _aligned_addr(tensor), size - _C.WORKSPACE_ALIGN)
    return kept


def eager_workspace(q: Tensor, index: int, stream: int, nbytes: int) -> KeptWorkspace:
    """The workspace of an eager call of ``nbytes`` (WORKSPACE_ALIGN included) on CUDA device ``index``
    and ``stream`` where _C.attention_eager finds none kept large enough. One of at most
    workspace_cache_limit bytes is kept per (device, stream) and reused: a small call saves an
    allocation, and a large one starts its first kernels without one. Calls that share it run in the
    order of their stream, so none overlaps another's use of it. Over the limit, or while a CUDA graph
    is being captured (the graph keeps the addresses it captured, so those come from its own pool), a
    fresh one."""
    limit = workspace_cache_limit(index)
    if nbytes > limit or torch._C._cuda_isCurrentStreamCapturing():
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
        return KeptWorkspace(workspace, _aligned_addr(workspace), nbytes - _C.WORKSPACE_ALIGN)
    return _kept_workspace((index, stream), nbytes, limit, q.device)


def launch_attention(q, k, v, shape, o, lse, stats, workspace, block_mask, topk_per_head, cdfthreshd_per_head,
                     simthreshd1_per_head, pvthreshd_per_head, layout, mode, block_score, topk, cdfthreshd,
                     simthreshd1, pvthreshd, causal, scale, block_q, block_k, select_flags, smooth_k, granularity,
                     pv, part=PART_WHOLE):  # fmt: skip
    """The C++ call of run_attention into the buffers it allocated: o, lse and stats (None when not
    asked for), and a uint8 workspace of workspace_size + WORKSPACE_ALIGN bytes. ``part``: the whole
    op, its first part (quantize, predict; o and lse not read, may be None) or its second (attend).
    Strides, addresses and the device dispatch are inline (see run_attention)."""
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    so = (0, 0, 0, 0) if o is None else o.stride()
    if layout == LAYOUT_NHD:
        strides = (sq[0], sq[2], sq[1]), (sk[0], sk[2], sk[1]), (sv[0], sv[2], sv[1]), (so[0], so[2], so[1])
    else:
        strides = sq[:3], sk[:3], sv[:3], so[:3]
    # Positional, in the order of the binding (src/python/bindings.cpp): keywords cost more per call.
    args = (
        shape, (block_q, block_k), causal,
        q.data_ptr(), k.data_ptr(), v.data_ptr(), DTYPE_CODES[q.dtype], strides[0], strides[1], strides[2],
        scale, smooth_k, granularity, pv,
        mode, block_score, topk, _addr(topk_per_head), cdfthreshd, _addr(cdfthreshd_per_head), simthreshd1,
        _addr(simthreshd1_per_head), select_flags, _addr(block_mask),
        pvthreshd, _addr(pvthreshd_per_head),
        0 if o is None else o.data_ptr(), 0 if o is None else DTYPE_CODES[o.dtype], strides[3],
        0 if lse is None else lse.data_ptr(), 0 if stats is None else stats.data_ptr(),
        _aligned_addr(workspace), workspace.numel() - _C.WORKSPACE_ALIGN, part,
    )  # fmt: skip
    if q.is_cpu:
        _C.attention(0, 0, *args)
    else:
        _call_cuda(q.get_device(), _C.attention, *args)


attention = torch.library.custom_op("sparge::attention", mutates_args=())(_attention_impl)


# Bound once: each attribute step of ``torch.compiler.is_compiling`` is one more lookup per call (dynamo
# knows the function by identity, so an alias traces as the original).
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def is_plain_eager(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a sparge::attention call on these inputs may skip the dispatcher (about half of the
    Python overhead of a call): plain eager CPU / CUDA tensors, with no torch.compile tracing, no
    autograd, no meta tensor, tensor subclass or dispatch mode that should see the op. ``is_cuda`` is
    asked first, so a CUDA call makes one device query here, not two (after an idle host each distinct
    query costs microseconds before the first launch, bench/RESULTS.md, session 41)."""
    return (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and (q.is_cuda or q.is_cpu)
            and not (q.requires_grad or k.requires_grad or v.requires_grad) and not _is_compiling()
            and not _dispatch_modes())  # fmt: skip


def eager_attention(q: Tensor, k: Tensor, v: Tensor):
    """The function to call for sparge::attention on these inputs: the implementation itself where
    :func:`is_plain_eager`, the registered op otherwise."""
    return _attention_impl if is_plain_eager(q, k, v) else attention


@attention.register_fake
def _(q, k, v, block_mask, topk_per_head, cdfthreshd_per_head, simthreshd1_per_head, pvthreshd_per_head, layout,
      mode, block_score, topk, cdfthreshd, simthreshd1, pvthreshd, causal, scale, block_q, block_k, select_flags,
      smooth_k, granularity, pv, output_dtype, return_lse, return_stats):  # fmt: skip
    batch, heads_q, _, len_q, _, head_dim = _check_inputs(q, k, v, layout)
    o = _empty_out(batch, heads_q, len_q, head_dim, layout, output_dtype, q.device)
    lse = q.new_empty((batch, heads_q, len_q) if return_lse else (0,), dtype=torch.float32)
    stats = q.new_empty((_C.STAT_COUNT if return_stats else 0,), dtype=torch.int64)
    return o, lse, stats


# ---- sparge::quantize ----------------------------------------------------------------------------


@torch.library.custom_op("sparge::quantize", mutates_args=())
def quantize(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: int,
    scale: float,
    smooth_k: bool,
    granularity: int,
    pv: int,
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stage 0. Returns the 13 QuantizedQKV buffers in QUANTIZED_FIELDS order."""
    shape = _check_inputs(q, k, v, layout)
    _check_blocks(block_q, block_k)
    _require(pv in V_DTYPES, f"pv: expected 0 (fp8), 1 (fp16) or 2 (fp8 with fp16 accumulation), got {pv}")
    out = tuple(torch.empty(size, dtype=dtype, device=q.device) for size, dtype in
                quantized_specs(*shape, block_q, block_k, granularity, pv))  # fmt: skip
    batch, heads_q, heads_kv = shape[:3]
    if batch * heads_q * heads_kv == 0:
        return out
    _call_core(
        q,
        _C.quantize,
        shape=shape,
        blocks=(block_q, block_k),
        **_input_args(q, k, v, layout),
        sm_scale=scale,
        smooth_k=smooth_k,
        granularity=granularity,
        pv=pv,
        out=tuple(x.data_ptr() for x in out),
    )
    return out


@quantize.register_fake
def _(q, k, v, layout, scale, smooth_k, granularity, pv, block_q, block_k):
    shape = _check_inputs(q, k, v, layout)
    return tuple(q.new_empty(size, dtype=dtype) for size, dtype in
                 quantized_specs(*shape, block_q, block_k, granularity, pv))  # fmt: skip


# ---- sparge::predict -----------------------------------------------------------------------------


def _predict_shape(quantized: Sequence[Tensor]):
    """(B, Hq, Hkv, Lq, Lk, D) of a QuantizedQKV."""
    count = len(QUANTIZED_FIELDS)
    _require(len(quantized) == count, f"quantized: expected {count} tensors, got {len(quantized)}")
    _require(quantized[0].dim() == 4 and quantized[2].dim() == 4, "quantized.q, quantized.k: expected 4-D tensors")
    q8, k8 = quantized[0], quantized[2]
    return q8.size(0), q8.size(1), k8.size(1), q8.size(2), k8.size(2), q8.size(3)


def _pv_of(quantized: Sequence[Tensor]) -> int:
    v_dtype = quantized[5].dtype
    _require(v_dtype in V_DTYPES.values(), f"quantized.v: expected float8_e4m3fn or float16, got {v_dtype}")
    return PV_FP8 if v_dtype == V_DTYPES[PV_FP8] else PV_FP16


@torch.library.custom_op("sparge::predict", mutates_args=())
def predict(
    quantized: Sequence[Tensor],
    block_mask: Optional[Tensor],
    topk_per_head: Optional[Tensor],
    cdfthreshd_per_head: Optional[Tensor],
    simthreshd1_per_head: Optional[Tensor],
    mode: int,
    block_score: int,
    topk: float,
    cdfthreshd: float,
    simthreshd1: float,
    causal: int,
    scale: float,
    granularity: int,
    block_q: int,
    block_k: int,
    select_flags: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage 1. Returns (index int32 [B, Hq, nbq, nbk] (-1 past count), count int32 [B, Hq, nbq],
    mask bool [B, Hq, nbq, nbk], stats int64 [4])."""
    shape = _predict_shape(quantized)
    batch, heads_q = shape[:2]
    device = quantized[0].device
    _check_blocks(block_q, block_k)
    _check_quantized(quantized, shape, (block_q, block_k), granularity, _pv_of(quantized))
    for name, x in (
        ("topk_per_head", topk_per_head),
        ("cdfthreshd_per_head", cdfthreshd_per_head),
        ("simthreshd1_per_head", simthreshd1_per_head),
    ):
        _check_per_head(name, x, heads_q, device)
    nbq, nbk = ceil_div(shape[3], block_q), ceil_div(shape[4], block_k)
    if block_mask is not None:
        _require(
            block_mask.dtype == torch.uint8
            and tuple(block_mask.shape) == (batch, heads_q, nbq, nbk)
            and block_mask.is_contiguous()
            and block_mask.device == device,
            f"block_mask: expected a contiguous uint8 tensor of shape {(batch, heads_q, nbq, nbk)} on {device}",
        )
    index = torch.full((batch, heads_q, nbq, nbk), -1, dtype=torch.int32, device=device)
    count = torch.zeros((batch, heads_q, nbq), dtype=torch.int32, device=device)
    mask = torch.zeros((batch, heads_q, nbq, nbk), dtype=torch.bool, device=device)
    stats = _stats(True, device)
    if batch * heads_q * nbq == 0:
        return index, count, mask, stats
    _call_core(
        quantized[0],
        _C.predict,
        shape=shape,
        blocks=(block_q, block_k),
        causal=causal,
        sm_scale=scale,
        **_selection_args(mode, block_score, topk, topk_per_head, cdfthreshd, cdfthreshd_per_head, simthreshd1,
                          simthreshd1_per_head, select_flags, block_mask),
        quantized=tuple(x.data_ptr() for x in quantized),
        index=index.data_ptr(),
        count=count.data_ptr(),
        mask_out=mask.data_ptr(),
        stats_out=stats.data_ptr(),
    )
    return index, count, mask, stats


@predict.register_fake
def _(quantized, block_mask, topk_per_head, cdfthreshd_per_head, simthreshd1_per_head, mode, block_score, topk,
      cdfthreshd, simthreshd1, causal, scale, granularity, block_q, block_k, select_flags):  # fmt: skip
    batch, heads_q, _, len_q, len_k, _ = _predict_shape(quantized)
    nbq, nbk = ceil_div(len_q, block_q), ceil_div(len_k, block_k)
    q8 = quantized[0]
    return (
        q8.new_empty((batch, heads_q, nbq, nbk), dtype=torch.int32),
        q8.new_empty((batch, heads_q, nbq), dtype=torch.int32),
        q8.new_empty((batch, heads_q, nbq, nbk), dtype=torch.bool),
        q8.new_empty((_C.STAT_COUNT,), dtype=torch.int64),
    )


# ---- sparge::attend ------------------------------------------------------------------------------


@torch.library.custom_op("sparge::attend", mutates_args=())
def attend(
    quantized: Sequence[Tensor],
    index: Tensor,
    count: Tensor,
    pvthreshd_per_head: Optional[Tensor],
    layout: int,
    causal: int,
    scale: float,
    granularity: int,
    pv: int,
    block_q: int,
    block_k: int,
    pvthreshd: float,
    output_dtype: torch.dtype,
    return_lse: bool,
    return_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 2. Returns (o in `layout`, lse or [0], stats [4] int64 or [0]). ``pv`` is the P·V mode
    of the quantize call (V's dtype alone does not tell the two fp8 modes apart)."""
    shape = _predict_shape(quantized)
    batch, heads_q, _, len_q, len_k, head_dim = shape
    device = quantized[0].device
    _require(pv in V_DTYPES, f"pv: expected 0 (fp8), 1 (fp16) or 2 (fp8 with fp16 accumulation), got {pv}")
    _check_blocks(block_q, block_k)
    _check_quantized(quantized, shape, (block_q, block_k), granularity, pv)
    _require(output_dtype in DTYPE_CODES, f"output_dtype: expected fp16/bf16/fp32, got {output_dtype}")
    _check_per_head("pvthreshd_per_head", pvthreshd_per_head, heads_q, device)
    nbq, nbk = ceil_div(len_q, block_q), ceil_div(len_k, block_k)
    for name, x, size in (("index", index, (batch, heads_q, nbq, nbk)), ("count", count, (batch, heads_q, nbq))):
        _require(
            x.dtype == torch.int32 and tuple(x.shape) == size and x.is_contiguous() and x.device == device,
            f"{name}: expected a contiguous int32 tensor of shape {size} on {device}, "
            f"got {x.dtype} {tuple(x.shape)} on {x.device}",
        )
    o = _empty_out(batch, heads_q, len_q, head_dim, layout, output_dtype, device)
    lse = torch.empty((batch, heads_q, len_q) if return_lse else (0,), dtype=torch.float32, device=device)
    stats = _stats(return_stats, device)
    if batch * heads_q * len_q == 0:
        return o, lse, stats
    # The kernel's optional scratch (the split of a last round of work tiles; never with a causal mask).
    ws_bytes = 0 if causal else _C.attend_workspace_size(shape, (block_q, block_k), pv, _size_device(device))
    workspace = torch.empty(ws_bytes + _C.WORKSPACE_ALIGN, dtype=torch.uint8, device=device) if ws_bytes else None
    _call_core(
        quantized[0],
        _C.attend,
        shape=shape,
        blocks=(block_q, block_k),
        causal=causal,
        sm_scale=scale,
        granularity=granularity,
        pv=pv,
        quantized=tuple(x.data_ptr() for x in quantized),
        index=index.data_ptr(),
        count=count.data_ptr(),
        pvthreshd=pvthreshd,
        pvthreshd_per_head=_addr(pvthreshd_per_head),
        o=o.data_ptr(),
        o_dtype=DTYPE_CODES[output_dtype],
        o_strides=_hnd_strides(o, layout),
        lse=lse.data_ptr() if return_lse else 0,
        stats_out=stats.data_ptr() if return_stats else 0,
        workspace=_aligned_addr(workspace) if ws_bytes else 0,
        workspace_bytes=ws_bytes,
    )
    return o, lse, stats


@attend.register_fake
def _(quantized, index, count, pvthreshd_per_head, layout, causal, scale, granularity, pv, block_q, block_k,
      pvthreshd, output_dtype, return_lse, return_stats):  # fmt: skip
    batch, heads_q, _, len_q, _, head_dim = _predict_shape(quantized)
    q8 = quantized[0]
    o = _empty_out(batch, heads_q, len_q, head_dim, layout, output_dtype, q8.device)
    lse = q8.new_empty((batch, heads_q, len_q) if return_lse else (0,), dtype=torch.float32)
    stats = q8.new_empty((_C.STAT_COUNT if return_stats else 0,), dtype=torch.int64)
    return o, lse, stats
