"""Public functions of sparge: sparse + quantized attention on torch tensors.

Every function validates its inputs before calling the C++ core and raises ``TypeError`` (not a
tensor / wrong Python type) or ``ValueError`` (wrong dtype, device, rank, shape, range) with a
message naming the argument, what was expected and what was given. Errors of the core keep its
mapping: ``ValueError`` for invalid arguments, ``NotImplementedError`` when the request needs a
kernel or backend this build lacks (e.g. CUDA tensors with a CPU-only build, or a head dim
without a GPU kernel), ``RuntimeError`` otherwise.

Conventions shared by all functions:

* ``q`` is ``[B, Hq, Lq, D]`` and ``k``, ``v`` are ``[B, Hkv, Lk, D]`` with ``layout="HND"``;
  ``[B, L, H, D]`` with ``layout="NHD"``. ``Hq % Hkv == 0`` (GQA / MQA); ``1 <= D <= 256``.
  Query head ``h`` reads key/value head ``h // (Hq // Hkv)``.
* dtypes fp16, bf16 or fp32 (the core reads fp32 directly); q, k and v share dtype and device.
  CPU tensors run on the CPU backend, CUDA tensors on the CUDA backend (current stream, under a
  device guard). Any strides are accepted except in the last dimension, which must have stride
  1 (the functions raise rather than copy).
* ``block_size=(block_q, block_k)`` are the prediction block sizes (rows of Q and K per block
  of the block map), multiples of 16 in [16, 1024]; ``nbq = ceil(Lq / block_q)``,
  ``nbk = ceil(Lk / block_k)``.
* Causal masking: ``is_causal=True`` with ``causal_alignment="top_left"`` matches
  ``scaled_dot_product_attention(is_causal=True)`` (key ``c`` visible to query ``r`` when
  ``c <= r``); ``"bottom_right"`` aligns the last query with the last key
  (``c <= r + Lk - Lq``, the KV-cache case).
* ``topk``, ``cdfthreshd``, ``simthreshd1`` and ``pvthreshd`` take a float, or one value per
  query head (a 1-D tensor or sequence of length Hq). Value ranges are checked: ``topk`` and
  ``cdfthreshd`` in [0, 1], ``simthreshd1`` in [-1, 1], ``pvthreshd`` >= 0 (``inf`` disables the
  P·V filter). Per-head tensors on a CUDA device are range-checked with a device sync, except
  under ``torch.compile`` or CUDA-graph capture; pass them on the CPU or as lists to avoid it,
  and on the device when capturing a CUDA graph (a host-to-device copy cannot be captured).
* Sparsity is ``1 - kept / allowed`` over all (batch, head, Q block) rows, where *allowed*
  counts the K blocks that hold at least one visible key. It is returned as a 0-d fp32 tensor
  on the device of the inputs (no host sync, so it works under ``torch.compile`` and CUDA
  graphs); ``float(s)`` gives a Python number.
* Forward only: the operators have no autograd formula (backward raises a RuntimeError).
* Empty inputs (B, H or L equal to 0) give empty outputs. Queries that see no key (``Lk = 0``,
  or rows masked by the block mask or by bottom-right alignment) output zeros and an LSE of
  ``-inf``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _C, _ops

HeadParam = Union[float, Tensor, Sequence[float]]

_LAYOUTS = {"HND": _ops.LAYOUT_HND, "NHD": _ops.LAYOUT_NHD}
_SCORES = {"mean": _ops.SCORE_MEAN, "spikes": _ops.SCORE_SPIKES}
_SCORE_CHOICES = {**_SCORES, "auto": None}  # "auto": resolved per mode by _score_code


def _score_code(block_score: str, mode_code: int) -> int:
    """block_score "auto": what won the prediction-quality table (bench/RESULTS.md): "spikes" for
    topk (better or equal on every workload), "mean" for cdf (spikes is over-confident on very
    peaked maps)."""
    code = _choice("block_score", block_score, _SCORE_CHOICES)
    if code is None:
        return _ops.SCORE_SPIKES if mode_code == _ops.MODE_TOPK else _ops.SCORE_MEAN
    return code
_MODES = {"dense": _ops.MODE_DENSE, "topk": _ops.MODE_TOPK, "cdf": _ops.MODE_CDF, "block_mask": _ops.MODE_BLOCK_MASK}
_ALIGNMENTS = {"top_left": _ops.CAUSAL_TOP_LEFT, "bottom_right": _ops.CAUSAL_BOTTOM_RIGHT}
_GRANULARITIES = {"per_block": _ops.GRAN_PER_BLOCK, "per_warp": _ops.GRAN_PER_WARP, "per_thread": _ops.GRAN_PER_THREAD}
_PV_PRECISIONS = {"fp8": _ops.PV_FP8, "fp16": _ops.PV_FP16, "fp8_fp16acc": _ops.PV_FP8_FP16ACC}
_DEVICE_TYPES = ("cpu", "cuda", "meta")


class QuantizedQKV(NamedTuple):
    """Output of :func:`quantize`: the buffers of the C++ ``QuantizedQKV`` plus the settings
    that produced them (read back by :func:`predict` and :func:`attend`).

    Shapes use ``nbq = ceil(Lq / block_q)``, ``nbk = ceil(Lk / block_k)``,
    ``Lk_pad = ceil(Lk / 64) * 64``; the scale-group counts follow ``include/sparge/layout.h``.
    """

    q: Tensor  #: int8 [B, Hq, Lq, D]: round(q / q_dequant)
    q_scale: Tensor  #: fp32 [B, Hq, q_groups]: q_dequant · scale · log2(e)
    k: Tensor  #: int8 [B, Hkv, Lk, D]: round((k - k_mean) / k_scale)
    k_scale: Tensor  #: fp32 [B, Hkv, k_groups]
    k_mean: Tensor  #: fp32 [B, Hkv, D]: token mean of k (zeros when smooth_k is off)
    #: float8_e4m3fn ("fp8", "fp8_fp16acc") or float16 [B, Hkv, D, Lk_pad], transposed, zero padded; e4m3
    #: keys in P·V fragment order within each 16-key group (:meth:`v_by_key` undoes it)
    v: Tensor
    v_scale: Tensor  #: fp32 [B, Hkv, D]: per-channel amax / 448 (amax / 2.25 for "fp8_fp16acc")
    lse_shift: Tensor  #: fp32 [B, Hq, Lq]: scale · (q · k_mean), the LSE removed by smoothing
    q_pool: Tensor  #: fp32 [B, Hq, nbq, D]: mean of the q rows of each block
    q_sim: Tensor  #: fp32 [B, Hq, nbq]: mean pairwise cosine similarity of those rows
    k_pool: Tensor  #: fp32 [B, Hkv, nbk, D]: mean of the smoothed k rows of each block
    k_sim: Tensor  #: fp32 [B, Hkv, nbk]
    k_spikes: Tensor  #: fp32 [B, Hkv, nbk, 2, D]: the 2 smoothed k rows of largest norm of each block
    block_size: tuple[int, int] = (128, 64)
    scale: Optional[float] = None
    qk_quant_gran: str = "per_thread"
    pv_precision: str = "fp8"
    dtype: torch.dtype = torch.float16  #: dtype of the quantized inputs (default output dtype of attend)
    layout: str = "HND"  #: layout of the quantized inputs (default output layout of attend)

    def buffers(self) -> tuple[Tensor, ...]:
        """The 13 tensors in the order of the C++ struct."""
        return tuple(self[: len(_ops.QUANTIZED_FIELDS)])

    def v_by_key(self) -> Tensor:
        """``v`` with its last dimension in key order: column ``t`` is key ``t`` (a copy for e4m3,
        whose rows the kernels read in P·V fragment order; ``v`` itself for fp16)."""
        return _ops.v_in_key_order(self.v)


class Prediction(NamedTuple):
    """Output of :func:`predict`."""

    index: Tensor  #: int32 [B, Hq, nbq, nbk]: kept K blocks of each Q block, ascending; entries past count are -1
    count: Tensor  #: int32 [B, Hq, nbq]: number of kept K blocks
    mask: Tensor  #: bool [B, Hq, nbq, nbk]: True where a block is kept
    stats: Tensor  #: int64 [4]: see STAT_BLOCKS_KEPT, STAT_BLOCKS_ALLOWED (the P·V entries are 0)


# ---- validation helpers --------------------------------------------------------------------------


def _choice(name: str, value, options: dict) -> int:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return options[value]


def _data_checkable(t: Tensor) -> bool:
    """Whether reading t's values is allowed here (not while tracing or capturing a CUDA graph)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _range_text(lo: float, hi: float) -> str:
    return f"a value in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f"a value >= {lo:g} (inf allowed)"


def _head_param(name: str, value: HeadParam, heads_q: int, device: torch.device, lo: float, hi: float):
    """(float, per-head fp32 tensor on `device` or None) for a hyperparameter."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        x = float(value)
        if not lo <= x <= hi:
            raise ValueError(f"{name}: expected {_range_text(lo, hi)}, got {x}")
        return x, None
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value, dtype=torch.float32)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name}: expected a float or a 1-D tensor of {heads_q} per-head values, got {type(value).__name__}"
        )
    if value.dim() != 1 or value.size(0) != heads_q:
        raise ValueError(
            f"{name}: expected a float or a 1-D tensor of {heads_q} per-head values (one per query head), "
            f"got shape {tuple(value.shape)}"
        )
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name}: expected real per-head values, got dtype {value.dtype}")
    if _data_checkable(value):
        bad = ~((value >= lo) & (value <= hi))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{i}]: expected {_range_text(lo, hi)}, got {float(value[i])}")
    return 0.0, value.detach().to(device=device, dtype=torch.float32).contiguous()


def _select_flags(attention_sink: bool, cdf_sharpen: bool) -> int:
    return (_ops.SELECT_SINK if attention_sink else 0) | (_ops.SELECT_CDF_SHARPEN if cdf_sharpen else 0)


def _check_tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _check_qkv(q, k, v, layout: str):
    """Validates q, k, v; returns (layout code, (B, Hq, Hkv, Lq, Lk, D))."""
    layout_code = _choice("layout", layout, _LAYOUTS)
    dims = "[B, H, L, D]" if layout == "HND" else "[B, L, H, D]"
    tensors = (("q", _check_tensor("q", q)), ("k", _check_tensor("k", k)), ("v", _check_tensor("v", v)))
    for name, x in tensors:
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor {dims} (layout {layout}), got shape {tuple(x.shape)}")
    if q.dtype not in _ops.DTYPE_CODES:
        raise ValueError(f"q: expected dtype torch.float16, torch.bfloat16 or torch.float32, got {q.dtype}")
    if q.device.type not in _DEVICE_TYPES:
        raise ValueError(f"q: expected a CPU or CUDA tensor, got device {q.device}")
    for name, x in tensors[1:]:
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got {x.device}")
    qh, kh, vh = (_ops._hnd(x, layout_code) for x in (q, k, v))
    batch, heads_q, len_q, head_dim = qh.shape
    _, heads_kv, len_k, _ = kh.shape
    if kh.size(0) != batch:
        raise ValueError(f"k: expected batch size {batch} (of q), got {kh.size(0)} (shape {tuple(k.shape)})")
    if kh.size(3) != head_dim:
        raise ValueError(f"k: expected head dim {head_dim} (of q), got {kh.size(3)} (shape {tuple(k.shape)})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if heads_kv == 0 and heads_q != 0 or heads_kv != 0 and heads_q % heads_kv != 0:
        raise ValueError(
            f"q: expected a number of heads divisible by the {heads_kv} heads of k and v (GQA/MQA), got {heads_q}"
        )
    if not 1 <= head_dim <= _C.MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim (last dimension) in 1..{_C.MAX_HEAD_DIM}, got {head_dim}")
    for name, x in tensors:
        if head_dim > 1 and x.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected a contiguous last (head-dim) dimension, got stride {x.stride(-1)}; "
                f"call {name}.contiguous() first"
            )
    return layout_code, (batch, heads_q, heads_kv, len_q, len_k, head_dim)


def _check_blocks(block_size) -> tuple[int, int]:
    ok = isinstance(block_size, (tuple, list)) and len(block_size) == 2
    ok = ok and all(isinstance(b, int) and not isinstance(b, bool) and 16 <= b <= 1024 and b % 16 == 0
                    for b in block_size)  # fmt: skip
    if not ok:
        raise ValueError(f"block_size: expected (block_q, block_k), multiples of 16 in [16, 1024], got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def _check_scale(scale) -> float:
    if scale is None:
        return 0.0
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected None (for D ** -0.5) or a positive finite float, got {scale!r}")
    return float(scale)


def _check_output_dtype(output_dtype, default: torch.dtype) -> torch.dtype:
    if output_dtype is None:
        return default
    if not isinstance(output_dtype, torch.dtype) or output_dtype not in _ops.DTYPE_CODES:
        raise ValueError(
            f"output_dtype: expected None, torch.float16, torch.bfloat16 or torch.float32, got {output_dtype}"
        )
    return output_dtype


def _causal(is_causal: bool, causal_alignment: str) -> int:
    alignment = _choice("causal_alignment", causal_alignment, _ALIGNMENTS)
    return alignment if is_causal else _ops.CAUSAL_NONE


def _mode(mode: Optional[str], block_mask) -> int:
    if mode is None:
        return _ops.MODE_TOPK if block_mask is None else _ops.MODE_BLOCK_MASK
    code = _choice("mode", mode, _MODES)
    if code == _ops.MODE_BLOCK_MASK and block_mask is None:
        raise ValueError("block_mask: expected a [B, Hq, nbq, nbk] tensor for mode 'block_mask', got None")
    if code != _ops.MODE_BLOCK_MASK and block_mask is not None:
        raise ValueError(f"mode: expected 'block_mask' or None when block_mask is given, got {mode!r}")
    return code


def _block_mask(block_mask, shape, blocks, device: torch.device) -> Optional[Tensor]:
    """The mask as a contiguous uint8 [B, Hq, nbq, nbk] tensor (size-1 dimensions broadcast)."""
    if block_mask is None:
        return None
    block_mask = _check_tensor("block_mask", block_mask)
    batch, heads_q, _, len_q, len_k, _ = shape
    expected = (batch, heads_q, _ops.ceil_div(len_q, blocks[0]), _ops.ceil_div(len_k, blocks[1]))
    if block_mask.dim() != 4 or any(s != e and s != 1 for s, e in zip(block_mask.shape, expected)):
        raise ValueError(
            f"block_mask: expected shape [B, Hq, ceil(Lq / {blocks[0]}), ceil(Lk / {blocks[1]})] = {list(expected)} "
            f"(size-1 dimensions broadcast), got {list(block_mask.shape)}"
        )
    if block_mask.dtype.is_floating_point or block_mask.is_complex():
        raise ValueError(f"block_mask: expected a bool or integer tensor, got dtype {block_mask.dtype}")
    if block_mask.device != device:
        raise ValueError(f"block_mask: expected a tensor on {device} (the device of q), got {block_mask.device}")
    if block_mask.dtype == torch.bool:
        block_mask = block_mask.view(torch.uint8)
    elif block_mask.dtype != torch.uint8:
        block_mask = (block_mask != 0).view(torch.uint8)
    return block_mask.expand(expected).contiguous()


def _selection(mode, block_mask, topk, cdfthreshd, simthreshd1, shape, blocks, device):
    """Op arguments of the block selection: (mode, mask, (topk, cdf, sim) floats, their tensors)."""
    code = _mode(mode, block_mask)
    heads_q = shape[1]
    topk_v, topk_t = _head_param("topk", topk, heads_q, device, 0.0, 1.0)
    cdf_v, cdf_t = _head_param("cdfthreshd", cdfthreshd, heads_q, device, 0.0, 1.0)
    sim_v, sim_t = _head_param("simthreshd1", simthreshd1, heads_q, device, -1.0, 1.0)
    mask = _block_mask(block_mask, shape, blocks, device)
    return code, mask, (topk_v, cdf_v, sim_v), (topk_t, cdf_t, sim_t)


def block_sparsity(stats: Tensor) -> Tensor:
    """``1 - kept / allowed`` from a stats tensor of :func:`predict` (0-d fp32 tensor; 0 when
    nothing is allowed)."""
    kept = stats[_C.STAT_BLOCKS_KEPT].to(torch.float64)
    allowed = stats[_C.STAT_BLOCKS_ALLOWED].to(torch.float64)
    return torch.where(allowed > 0, 1.0 - kept / allowed.clamp(min=1), 0.0).to(torch.float32)


# ---- fused attention -----------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: Optional[str] = None,
    topk: HeadParam = 0.5,
    cdfthreshd: HeadParam = 0.98,
    simthreshd1: HeadParam = 0.02,
    block_score: str = "auto",
    pvthreshd: HeadParam = 15.0,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    layout: str = "HND",
    block_mask: Optional[Tensor] = None,
    block_size: tuple[int, int] = (128, 64),
    attention_sink: bool = False,
    cdf_sharpen: bool = True,
    smooth_k: bool = True,
    qk_quant_gran: str = "per_thread",
    pv_precision: str = "fp8",
    output_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
    return_sparsity: bool = False,
):
    """Sparse + quantized attention (SpargeAttn): ``softmax(q kᵀ · scale) v`` over the predicted blocks.

    Quantizes Q and K to INT8 (after subtracting the token mean of K when ``smooth_k``) and V to
    FP8, predicts which K blocks each Q block needs from mean-pooled blocks, then runs flash
    attention over the kept blocks, skipping the P·V product of a block whose scores are more
    than ``pvthreshd`` (log2 units) under the running row maximum. See ``docs/method.md``.

    Args:
        q, k, v: ``[B, Hq, Lq, D]`` and ``[B, Hkv, Lk, D]`` (``layout="HND"``) or ``[B, L, H, D]``
            (``"NHD"``), fp16 / bf16 / fp32, on one CPU or CUDA device.
        mode: block selection. ``"dense"``: every block (quantized dense attention);
            ``"topk"``: the ``topk`` fraction of the allowed blocks of each Q block with the largest
            pooled scores; ``"cdf"``: the fewest blocks whose pooled softmax mass reaches
            ``cdfthreshd``; ``"block_mask"``: the caller's ``block_mask``. Default: ``"topk"``, or
            ``"block_mask"`` when ``block_mask`` is given. In topk and cdf modes, non-uniform
            blocks (self-similarity <= ``simthreshd1``), the diagonal of causal attention, the
            first block when ``attention_sink`` and at least one block per row are always kept.
        topk: fraction of the allowed blocks to keep (mode "topk"), in [0, 1]; float or per head.
        cdfthreshd: probability mass to keep (mode "cdf"), in [0, 1]; float or per head.
        simthreshd1: a block is uniform (can be skipped) when the mean pairwise cosine similarity
            of its rows exceeds this, in [-1, 1]; float or per head. The default 0.02 flags only
            blocks no more alike than random vectors (noise); the original SpargeAttn uses 0.6,
            which also flags smooth video-like blocks and so disables sparsity there.
        block_score: how topk and cdf modes score a (Q block, K block) pair: ``"mean"`` (the original
            SpargeAttn score, pooled q · pooled k), ``"spikes"`` (a log-mass estimate that also
            scores the 2 largest-norm keys of each K block, so attention sinks and retrieval keys
            are not diluted by the block mean; see docs/method.md) or ``"auto"`` (the default:
            spikes for topk, mean for cdf, as measured in bench/RESULTS.md).
        pvthreshd: threshold of the P·V filter in log2 units, >= 0 (``float("inf")`` disables it);
            float or per head.
        is_causal, causal_alignment: causal mask, ``"top_left"`` (as SDPA) or ``"bottom_right"``.
        scale: softmax scale; ``None`` for ``D ** -0.5``.
        layout: ``"HND"`` or ``"NHD"``, for q, k, v and the output.
        block_mask: bool or integer ``[B, Hq, nbq, nbk]`` (size-1 dimensions broadcast), nonzero
            = keep; intersected with the causal mask, and nothing is added to it (a row with no
            kept block outputs zeros).
        block_size: ``(block_q, block_k)`` prediction block sizes.
        attention_sink: always keep the first K block.
        cdf_sharpen: mode "cdf": scale each Q block's pooled scores by ``1 / sqrt(q_sim)``, undoing
            the flattening of mean pooling (docs/method.md); ``False`` gives the original map,
            which keeps nearly every block of video-like inputs. No effect on topk.
        smooth_k: subtract the token mean of K before quantizing it (exact for softmax).
        qk_quant_gran: rows sharing one INT8 scale: ``"per_thread"``, ``"per_warp"`` or ``"per_block"``.
        pv_precision: ``"fp8"`` (P and V in e4m3), ``"fp16"`` (more accurate) or ``"fp8_fp16acc"``
            (P and V in e4m3, each 64-key chunk of the P·V product summed in an fp16 accumulator,
            V scaled into ±2.25 so that it cannot overflow; as accurate as ``"fp8"`` to about 0.1 %;
            meant for Ada and RTX 50xx GPUs, whose f16-accumulator e4m3 mma runs at twice the rate
            (not measured by sparge yet); on Hopper it runs the mma.sync kernel rather than wgmma,
            so it is slower there; needs sm_89 or newer).
        output_dtype: dtype of the output, default the dtype of q.
        return_lse: also return the log-sum-exp ``[B, Hq, Lq]`` fp32 (natural log) of the scaled
            scores over the kept blocks.
        return_sparsity: also return the block sparsity ``1 - kept / allowed`` (0-d fp32 tensor).

    Returns:
        ``o`` (the layout of q) when neither flag is set; otherwise the tuple ``(o, lse)``,
        ``(o, sparsity)`` or ``(o, lse, sparsity)``, in that order.
    """
    # The common eager call runs in C++ (src/python/eager.cpp; None for the others): its host time before
    # the first kernel delays the GPU after an idle host. Never traced: torch.compile sees the general path.
    parts = None if _is_compiling() else _C.attention_eager(
        q, k, v, mode, topk, cdfthreshd, simthreshd1, block_score, pvthreshd, is_causal, causal_alignment, scale,
        layout, block_mask, block_size, attention_sink, cdf_sharpen, smooth_k, qk_quant_gran, pv_precision,
        output_dtype, return_lse, return_sparsity,
    )  # fmt: skip
    if parts is None:
        parts = _attention_parts(
            q, k, v, mode=mode, topk=topk, cdfthreshd=cdfthreshd, simthreshd1=simthreshd1, block_score=block_score,
            pvthreshd=pvthreshd, is_causal=is_causal, causal_alignment=causal_alignment, scale=scale, layout=layout,
            block_mask=block_mask, block_size=block_size, attention_sink=attention_sink, smooth_k=smooth_k,
            qk_quant_gran=qk_quant_gran, pv_precision=pv_precision, output_dtype=output_dtype, return_lse=return_lse,
            return_sparsity=return_sparsity, cdf_sharpen=cdf_sharpen,
        )  # fmt: skip
    o, lse, stats = parts
    return _attention_result(o, lse, block_sparsity(stats) if return_sparsity else None, return_lse, return_sparsity)


def _attention_result(o: Tensor, lse: Optional[Tensor], sparsity: Optional[Tensor], return_lse: bool,
                      return_sparsity: bool):  # fmt: skip
    """What :func:`attention` returns for these flags (:func:`attend` too, its stats in place of
    the sparsity)."""
    if not (return_lse or return_sparsity):
        return o
    result = (o,)
    if return_lse:
        result += (lse,)
    if return_sparsity:
        result += (sparsity,)
    return result


def _attention_parts(q, k, v, *, mode, topk, cdfthreshd, simthreshd1, block_score, pvthreshd, is_causal,
                     causal_alignment, scale, layout, block_mask, block_size, attention_sink, smooth_k, qk_quant_gran,
                     pv_precision, output_dtype, return_lse, return_sparsity, cdf_sharpen=True):  # fmt: skip
    """The body of :func:`attention` (every argument explicit): ``(o, lse, stats)``, where ``stats``
    is the int64 ``[4]`` statistics of the core (the block counts are set when ``return_sparsity``).
    Used by the variable-length and key-padding paths, which add up the counts of several calls."""
    layout_code, shape = _check_qkv(q, k, v, layout)
    blocks = _check_blocks(block_size)
    code, mask, (topk_v, cdf_v, sim_v), (topk_t, cdf_t, sim_t) = _selection(
        mode, block_mask, topk, cdfthreshd, simthreshd1, shape, blocks, q.device
    )
    pv_v, pv_t = _head_param("pvthreshd", pvthreshd, shape[1], q.device, 0.0, math.inf)
    return _ops.eager_attention(q, k, v)(
        q,
        k,
        v,
        mask,
        topk_t,
        cdf_t,
        sim_t,
        pv_t,
        layout=layout_code,
        mode=code,
        block_score=_score_code(block_score, code),
        topk=topk_v,
        cdfthreshd=cdf_v,
        simthreshd1=sim_v,
        pvthreshd=pv_v,
        causal=_causal(is_causal, causal_alignment),
        scale=_check_scale(scale),
        block_q=blocks[0],
        block_k=blocks[1],
        select_flags=_select_flags(attention_sink, cdf_sharpen),
        smooth_k=bool(smooth_k),
        granularity=_choice("qk_quant_gran", qk_quant_gran, _GRANULARITIES),
        pv=_choice("pv_precision", pv_precision, _PV_PRECISIONS),
        output_dtype=_check_output_dtype(output_dtype, q.dtype),
        return_lse=bool(return_lse),
        return_stats=bool(return_sparsity),
    )


# (layout, mode, block_score, causal_alignment, qk_quant_gran, pv_precision) → their codes (mode
# and block_score resolved as by _mode and _score_code), for every valid combination without a
# block mask: one lookup checks and converts all the string arguments of an eager fast-path call.
_FAST_MODES = {None: _ops.MODE_TOPK, **{name: code for name, code in _MODES.items() if code != _ops.MODE_BLOCK_MASK}}
_FAST_CODES = {
    (layout, mode, score, alignment, gran, pv): (layout_code, mode_code, _score_code(score, mode_code),
                                                 alignment_code, gran_code, pv_code)
    for (layout, layout_code), (mode, mode_code), score, (alignment, alignment_code), (gran, gran_code), (pv, pv_code)
    in itertools.product(_LAYOUTS.items(), _FAST_MODES.items(), _SCORE_CHOICES, _ALIGNMENTS.items(),
                         _GRANULARITIES.items(), _PV_PRECISIONS.items())
}  # fmt: skip

# What _C.attention_eager reads from torch: calls it does not take go to the general path.
_is_compiling = _ops._is_compiling
_C.eager_setup(
    Tensor, tuple(sorted(_ops.DTYPE_CODES, key=_ops.DTYPE_CODES.get)), torch.int64, torch.uint8,
    torch._C._len_torch_dispatch_stack,
    getattr(torch._C, "_cuda_getDevice", None), getattr(torch._C, "_cuda_getCurrentRawStream", None),
    getattr(torch._C, "_cuda_isCurrentStreamCapturing", None), _FAST_CODES, _ops,
)  # fmt: skip


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, **kwargs):
    """Attention over the K blocks chosen by ``block_mask`` (bool or integer ``[B, Hq, nbq, nbk]``,
    nonzero = keep, size-1 dimensions broadcast, intersected with the causal mask).

    Same keyword arguments and returns as :func:`attention` with ``mode="block_mask"``; the
    selection arguments (``topk``, ``cdfthreshd``, ``simthreshd1``, ``block_score``, ``attention_sink``) do
    not apply.
    """
    for name in ("mode", "topk", "cdfthreshd", "simthreshd1", "block_score", "attention_sink", "cdf_sharpen"):
        if name in kwargs:
            raise TypeError(f"block_sparse_attention: unexpected argument {name!r} (the block mask selects the blocks)")
    if block_mask is None:
        raise ValueError("block_mask: expected a [B, Hq, nbq, nbk] tensor, got None")
    return attention(q, k, v, mode="block_mask", block_mask=block_mask, **kwargs)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    **kwargs,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on ``[B, H, L, D]`` tensors.

    Runs :func:`attention` (default ``mode="topk"``; extra keyword arguments of :func:`attention`
    are passed on). As in SDPA, different head counts of query and key need ``enable_gqa=True``.

    ``attn_mask`` (bool, True = attend, or additive float, broadcastable to ``[B, Hq, Lq, Lk]``)
    is computed exactly when it is a *key-padding* mask: for each batch row, the same keys kept
    for every head and query (any subset of keys, not only a prefix; additive 0 keeps a key,
    ``-inf`` or a value <= -1000 drops it, see :func:`sparge.varlen.key_padding_keep`). The
    attention then runs over the kept keys of each row (one call when all rows keep the same
    keys, else one per row; K smoothing and prediction see only the kept keys). Reading the
    mask costs a device sync for a CUDA mask and is not possible under ``torch.compile`` or
    CUDA-graph capture. Any other mask (causal-shaped, per-query, biases) raises
    ``NotImplementedError`` (use ``is_causal=True`` / ``block_mask=...``, or
    :mod:`sparge.patch`, which sends those calls to torch's SDPA); ``attn_mask`` with
    ``is_causal=True`` raises ``ValueError`` as in SDPA. ``dropout_p != 0`` raises
    ``NotImplementedError`` instead of being ignored.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: sparge supports only 0.0 (inference), got {dropout_p}")
    if not enable_gqa and query.dim() == 4 and key.dim() == 4 and query.size(1) != key.size(1):
        raise ValueError(
            f"key: expected {query.size(1)} heads (of query) unless enable_gqa=True, got {key.size(1)}"
        )
    if attn_mask is not None:
        from .varlen import masked_attention  # noqa: PLC0415 (varlen imports this module)

        return masked_attention(query, key, value, attn_mask, "sparge.scaled_dot_product_attention",
                                is_causal=is_causal, scale=scale, layout="HND", **kwargs)  # fmt: skip
    return attention(query, key, value, is_causal=is_causal, scale=scale, layout="HND", **kwargs)


def predict_blocks(
    q: Tensor,
    k: Tensor,
    *,
    mode: str = "topk",
    topk: HeadParam = 0.5,
    cdfthreshd: HeadParam = 0.98,
    simthreshd1: HeadParam = 0.02,
    block_score: str = "auto",
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    layout: str = "HND",
    block_size: tuple[int, int] = (128, 64),
    attention_sink: bool = False,
    cdf_sharpen: bool = True,
    smooth_k: bool = True,
    return_sparsity: bool = False,
):
    """The blocks :func:`attention` keeps: a bool mask ``[B, Hq, nbq, nbk]``, True where the K block
    is attended by the Q block.

    ``mode`` is ``"dense"``, ``"topk"`` or ``"cdf"``; the other arguments are those of
    :func:`attention`. Returns the mask, or ``(mask, sparsity)`` with ``return_sparsity``.
    """
    if mode == "block_mask":
        raise ValueError("mode: expected 'dense', 'topk' or 'cdf' (a block mask needs no prediction), got 'block_mask'")
    quantized = quantize(q, k, k, scale=scale, layout=layout, block_size=block_size, smooth_k=smooth_k,
                         qk_quant_gran="per_block", pv_precision="fp8")  # fmt: skip
    pred = predict(
        quantized,
        mode=mode,
        topk=topk,
        cdfthreshd=cdfthreshd,
        simthreshd1=simthreshd1,
        block_score=block_score,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        attention_sink=attention_sink,
        cdf_sharpen=cdf_sharpen,
    )
    return (pred.mask, block_sparsity(pred.stats)) if return_sparsity else pred.mask


# ---- stages --------------------------------------------------------------------------------------


def quantize(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    layout: str = "HND",
    block_size: tuple[int, int] = (128, 64),
    smooth_k: bool = True,
    qk_quant_gran: str = "per_thread",
    pv_precision: str = "fp8",
) -> QuantizedQKV:
    """Stage 0 of :func:`attention`: K smoothing, INT8 Q and K, V in the P·V format, block statistics.

    Arguments as in :func:`attention`. The result remembers them, so :func:`predict` and
    :func:`attend` on it reproduce :func:`attention` exactly (bit for bit on one backend).
    """
    layout_code, shape = _check_qkv(q, k, v, layout)
    blocks = _check_blocks(block_size)
    buffers = _ops.quantize(
        q,
        k,
        v,
        layout=layout_code,
        scale=_check_scale(scale),
        smooth_k=bool(smooth_k),
        granularity=_choice("qk_quant_gran", qk_quant_gran, _GRANULARITIES),
        pv=_choice("pv_precision", pv_precision, _PV_PRECISIONS),
        block_q=blocks[0],
        block_k=blocks[1],
    )
    return QuantizedQKV(*buffers, block_size=blocks, scale=scale, qk_quant_gran=qk_quant_gran,
                        pv_precision=pv_precision, dtype=q.dtype, layout=layout)  # fmt: skip


def _check_quantized(quantized) -> None:
    if not isinstance(quantized, QuantizedQKV):
        raise TypeError(
            f"quantized: expected the QuantizedQKV returned by sparge.quantize, got {type(quantized).__name__}"
        )


def predict(
    quantized: QuantizedQKV,
    *,
    mode: Optional[str] = None,
    topk: HeadParam = 0.5,
    cdfthreshd: HeadParam = 0.98,
    simthreshd1: HeadParam = 0.02,
    block_score: str = "auto",
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    attention_sink: bool = False,
    cdf_sharpen: bool = True,
    block_mask: Optional[Tensor] = None,
) -> Prediction:
    """Stage 1 of :func:`attention`: block prediction from the block statistics of ``quantized``.

    Selection arguments as in :func:`attention` (block sizes and scale come from ``quantized``).
    Returns a :class:`Prediction` ``(index, count, mask, stats)``.
    """
    _check_quantized(quantized)
    q8, k8 = quantized.q, quantized.k
    shape = (q8.size(0), q8.size(1), k8.size(1), q8.size(2), k8.size(2), q8.size(3))
    blocks = quantized.block_size
    code, mask, (topk_v, cdf_v, sim_v), (topk_t, cdf_t, sim_t) = _selection(
        mode, block_mask, topk, cdfthreshd, simthreshd1, shape, blocks, q8.device
    )
    index, count, kept, stats = _ops.predict(
        quantized.buffers(),
        mask,
        topk_t,
        cdf_t,
        sim_t,
        mode=code,
        block_score=_score_code(block_score, code),
        topk=topk_v,
        cdfthreshd=cdf_v,
        simthreshd1=sim_v,
        causal=_causal(is_causal, causal_alignment),
        scale=_check_scale(quantized.scale),
        granularity=_choice("quantized.qk_quant_gran", quantized.qk_quant_gran, _GRANULARITIES),
        block_q=blocks[0],
        block_k=blocks[1],
        select_flags=_select_flags(attention_sink, cdf_sharpen),
    )
    return Prediction(index, count, kept, stats)


def attend(
    quantized: QuantizedQKV,
    index: Tensor,
    count: Tensor,
    *,
    pvthreshd: HeadParam = 15.0,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    layout: Optional[str] = None,
    output_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
    return_stats: bool = False,
):
    """Stage 2 of :func:`attention`: sparse attention over the blocks listed in ``index[..., :count]``
    with the online P·V filter.

    ``layout`` and ``output_dtype`` default to those of the inputs of :func:`quantize`.
    Returns ``o``, or a tuple ``(o, lse)``, ``(o, stats)`` or ``(o, lse, stats)`` where ``stats``
    is int64 ``[4]`` with ``STAT_PV_UNITS`` (16-row groups × kept blocks reaching the filter)
    and ``STAT_PV_SKIPPED`` (of those, the P·V products skipped) set.
    """
    _check_quantized(quantized)
    index, count = _check_tensor("index", index), _check_tensor("count", count)
    layout_code = _choice("layout", quantized.layout if layout is None else layout, _LAYOUTS)
    q8 = quantized.q
    pv_v, pv_t = _head_param("pvthreshd", pvthreshd, q8.size(1), q8.device, 0.0, math.inf)
    blocks = quantized.block_size
    o, lse, stats = _ops.attend(
        quantized.buffers(),
        index,
        count,
        pv_t,
        layout=layout_code,
        causal=_causal(is_causal, causal_alignment),
        scale=_check_scale(quantized.scale),
        granularity=_choice("quantized.qk_quant_gran", quantized.qk_quant_gran, _GRANULARITIES),
        pv=_choice("quantized.pv_precision", quantized.pv_precision, _PV_PRECISIONS),
        block_q=blocks[0],
        block_k=blocks[1],
        pvthreshd=pv_v,
        output_dtype=_check_output_dtype(output_dtype, quantized.dtype),
        return_lse=bool(return_lse),
        return_stats=bool(return_stats),
    )
    return _attention_result(o, lse, stats, return_lse, return_stats)
