"""Drop-in entry points with the names, parameters and defaults of the original libraries.

``from sparge.compat import spas_sage2_attn_meansim_topk_cuda`` replaces
``from spas_sage_attn import spas_sage2_attn_meansim_topk_cuda`` (and likewise for the other
names below). Every function is a thin wrapper over :func:`sparge.attention`: on the same inputs
it returns bit for bit what the native call named in its docstring returns.

================================== ===================== ===========================================
original                           library               native call
================================== ===================== ===========================================
spas_sage2_attn_meansim_topk_cuda  SpargeAttn            mode="topk", INT8 per-thread Q·K, FP8 P·V
spas_sage2_attn_meansim_cuda       SpargeAttn            mode="cdf", INT8 per-thread Q·K, FP8 P·V
spas_sage_attn_meansim_topk_cuda   SpargeAttn            mode="topk", INT8 per-block Q·K, FP16 P·V
spas_sage_attn_meansim_cuda        SpargeAttn            mode="cdf", INT8 per-block Q·K, FP16 P·V
block_sparse_sage2_attn_cuda       SpargeAttn            mode="block_mask" (dense when mask_id=None)
sparse_sageattn                    Sparse SageAttention  mode="block_mask" (dense when mask_id=None),
                                                         INT8 per-block Q·K, FP16 P·V
sageattn                           SageAttention         mode="dense", per-thread, FP8 P·V
sageattn_qk_int8_pv_fp16_cuda      SageAttention         mode="dense", qk_quant_gran, FP16 P·V
sageattn_qk_int8_pv_fp16_triton    SageAttention         mode="dense", per-block, FP16 P·V
sageattn_qk_int8_pv_fp8_cuda       SageAttention         mode="dense", qk_quant_gran, FP8 P·V
sageattn_qk_int8_pv_fp8_cuda_sm90  SageAttention         mode="dense", qk_quant_gran, FP8 P·V
sageattn_varlen                    SageAttention         sparge.attention_varlen, mode="dense",
                                                         INT8 per-block Q·K, FP16 P·V
================================== ===================== ===========================================

Defaults. Where the reference README documents a default it is used (``topk=0.5``,
``simthreshd1=-0.1``, ``pvthreshd=15`` for the TopK APIs; ``pvthreshd=20`` for
``block_sparse_sage2_attn_cuda``). Where the README is silent the value of the original source
is used (``simthreshd1=0.6``, ``cdfthreshd=0.98``, ``pvthreshd=50`` for the CDF APIs). Note that
the original *source* has ``topk=0.35, pvthreshd=50`` in the TopK signatures and ``pvthreshd=50``
in ``block_sparse_sage2_attn_cuda``; the README values were chosen as the documented contract.
Pass the value explicitly to get the other one. ``DEFAULTS`` below lists every default with
its source.

Differences from the originals, common to all functions (they fix the originals' defects):

* Causal masking is applied per element (top-left aligned, as
  ``scaled_dot_product_attention(is_causal=True)``), not per block: no future token leaks into
  the diagonal blocks.
* A query row whose blocks are all masked outputs zeros (and an LSE of ``-inf``), never
  uninitialised memory.
* GQA / MQA (``Hq % Hkv == 0``) is supported by every function, prediction included; any head
  dim 1..256 and any sequence length (``Lq < 128`` included) are accepted; fp32 inputs are
  read directly. CPU tensors run on sparge's CPU backend.
* Hyperparameters (``topk``, ``cdfthreshd``, ``simthreshd1``, ``pvthreshd``) take a float or
  one value per query head (1-D tensor or sequence of length Hq).
* P·V is accumulated in fp32, except for ``sageattn_qk_int8_pv_fp8_cuda(pv_accum_dtype="fp32+fp16")``,
  which runs sparge's fp16-accumulator mode (``pv_precision="fp8_fp16acc"``, SageAttention2++).
  Every other ``pv_accum_dtype`` the originals accept is accepted and changes nothing (the result
  is that of their most accurate setting).
* ``attn_mask`` and ``dropout_p`` are never ignored. An ``attn_mask`` (SDPA convention: bool
  True = attend or additive float, broadcastable to ``[B, Hq, Lq, Lk]`` whatever
  ``tensor_layout``) that is a key-padding mask (the same keys kept for every query and head of
  a batch row) is computed exactly over the kept keys (see
  :func:`sparge.scaled_dot_product_attention`); any other mask, or a mask with
  ``is_causal=True``, raises (``NotImplementedError`` / ``ValueError``) naming the argument.
  ``dropout_p`` other than 0 raises ``NotImplementedError``. The SageAttention functions take
  ``**kwargs`` as the originals do, but only to honour an SDPA-style ``scale`` (used as
  ``sm_scale``; both given and different is a ``ValueError``) and ``attn_mask``, and to accept
  the no-op ``dropout_p=0.0``, ``enable_gqa``; any other name raises ``TypeError`` listing the
  unknown names.
* ``smooth_v=True`` raises ``NotImplementedError`` (the option only matters for the originals'
  fp16 accumulator; sparge's bounds the V range instead, so that it cannot overflow).
* The sparsity of ``return_sparsity`` is a Python float, as in SpargeAttn, but computed as
  ``1 - kept / allowed`` where *allowed* counts the K blocks holding a visible key (the
  original's causal formula was wrong).
* The LSE of ``return_lse`` is the natural-log log-sum-exp ``[B, Hq, Lq]`` fp32 of the scaled
  scores of the un-smoothed K (as SageAttention returns it); asking for both ``return_lse`` and
  ``return_sparsity`` raises ``ValueError`` (SpargeAttn silently returned only the sparsity).
* Outputs have the dtype of ``q`` unless ``output_dtype`` is given.

``sageattn_varlen`` (packed variable-length batches) runs :func:`sparge.attention_varlen`: one
sparge call per sequence, with K smoothed per sequence (the original smoothed over the whole
pack); see its docstring for the cost model.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import _ops
from .api import HeadParam, attention
from .varlen import attention_varlen, masked_attention

__all__ = [
    "DEFAULTS",
    "block_sparse_sage2_attn_cuda",
    "sageattn",
    "sageattn_qk_int8_pv_fp16_cuda",
    "sageattn_qk_int8_pv_fp16_triton",
    "sageattn_qk_int8_pv_fp8_cuda",
    "sageattn_qk_int8_pv_fp8_cuda_sm90",
    "sageattn_varlen",
    "sparse_sageattn",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
]

#: Block size of every mask_id: (BLOCK_M, BLOCK_N) = (128, 64) query x key rows.
MASK_BLOCK_SIZE = (128, 64)

_README = "README"
_SOURCE = "source"
#: (function, parameter) -> (default, where it comes from: "README" (the reference docs) or
#: "source" (the original's code, where the README is silent) or "sparge" (no original default)).
DEFAULTS = {
    ("spas_sage2_attn_meansim_topk_cuda", "simthreshd1"): (-0.1, _README),
    ("spas_sage2_attn_meansim_topk_cuda", "topk"): (0.5, _README),
    ("spas_sage2_attn_meansim_topk_cuda", "pvthreshd"): (15, _README),
    ("spas_sage_attn_meansim_topk_cuda", "simthreshd1"): (-0.1, _README),
    ("spas_sage_attn_meansim_topk_cuda", "topk"): (0.5, _README),
    ("spas_sage_attn_meansim_topk_cuda", "pvthreshd"): (15, _README),
    ("spas_sage2_attn_meansim_cuda", "simthreshd1"): (0.6, _SOURCE),
    ("spas_sage2_attn_meansim_cuda", "cdfthreshd"): (0.98, _SOURCE),
    ("spas_sage2_attn_meansim_cuda", "pvthreshd"): (50, _SOURCE),
    ("spas_sage_attn_meansim_cuda", "simthreshd1"): (0.6, _SOURCE),
    ("spas_sage_attn_meansim_cuda", "cdfthreshd"): (0.98, _SOURCE),
    ("spas_sage_attn_meansim_cuda", "pvthreshd"): (50, _SOURCE),
    ("block_sparse_sage2_attn_cuda", "pvthreshd"): (20, _README),
    ("sageattn_qk_int8_pv_fp16_cuda", "pv_accum_dtype"): ("fp32", _SOURCE),
    ("sageattn_qk_int8_pv_fp8_cuda", "pv_accum_dtype"): ("fp32+fp32", _SOURCE),
    ("sageattn_qk_int8_pv_fp8_cuda_sm90", "pv_accum_dtype"): ("fp32+fp32", _SOURCE),
}

_LAYOUTS = ("HND", "NHD")
_SDPA_NOOP_KWARGS = ("attn_mask", "dropout_p", "enable_gqa", "scale")


# ---- argument handling -----------------------------------------------------------------------------


def _layout(tensor_layout) -> str:
    if not isinstance(tensor_layout, str) or tensor_layout not in _LAYOUTS:
        raise ValueError(f"tensor_layout: expected 'HND' or 'NHD', got {tensor_layout!r}")
    return tensor_layout


def _attention(function: str, q, k, v, attn_mask, **kwargs):
    """sparge.attention, or its key-padding-mask path when attn_mask is given (the originals
    ignored attn_mask silently; other masks raise)."""
    if attn_mask is None:
        return attention(q, k, v, **kwargs)
    return masked_attention(q, k, v, attn_mask, function, **kwargs)


def _no_dropout(dropout_p) -> None:
    if dropout_p is None or dropout_p == 0:
        return
    raise NotImplementedError(
        f"dropout_p: only 0.0 is supported (inference; the original ignored it silently), got {dropout_p!r}"
    )


def _no_smooth_v(smooth_v) -> None:
    if smooth_v:
        raise NotImplementedError(
            "smooth_v: True is not supported (sparge accumulates P·V in fp32, where V smoothing brings "
            "nothing); pass smooth_v=False"
        )


def _choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def _sage_kwargs(function: str, sm_scale, kwargs: dict, extra=()) -> Optional[float]:
    """Checks the **kwargs of a SageAttention function; returns the softmax scale to use.

    Honours an SDPA-style ``scale`` (and leaves ``attn_mask`` to the caller), accepts the no-op
    ``dropout_p=0.0``, ``enable_gqa`` (GQA is always supported) and ``smooth_v=False``; rejects
    anything else."""
    unknown = sorted(set(kwargs) - set(_SDPA_NOOP_KWARGS) - {"smooth_v"} - set(extra))
    if unknown:
        raise TypeError(
            f"{function}: unexpected keyword argument(s) {', '.join(map(repr, unknown))} "
            "(the original ignored unknown keyword arguments silently; sparge rejects them)"
        )
    _no_dropout(kwargs.get("dropout_p", 0.0))
    _no_smooth_v(kwargs.get("smooth_v", False))
    enable_gqa = kwargs.get("enable_gqa", False)
    if not isinstance(enable_gqa, bool):
        raise ValueError(f"enable_gqa: expected a bool, got {enable_gqa!r}")
    if "scale" in kwargs and kwargs["scale"] is not None:
        scale = kwargs["scale"]
        if sm_scale is not None and scale != sm_scale:
            raise ValueError(f"scale: got {scale!r} and sm_scale={sm_scale!r}; pass only one of them")
        return scale
    return sm_scale


def _mask_id(mask_id, q: Tensor, k: Tensor, layout: str) -> Tensor:
    """Validates mask_id against (B, Hq, ceil(Lq / 128), ceil(Lk / 64))."""
    if not isinstance(mask_id, Tensor):
        raise TypeError(f"mask_id: expected None or a torch.Tensor, got {type(mask_id).__name__}")
    if q.dim() == 4 and k.dim() == 4:
        b, hq, lq = (q.size(0), q.size(1), q.size(2)) if layout == "HND" else (q.size(0), q.size(2), q.size(1))
        lk = k.size(2) if layout == "HND" else k.size(1)
        bm, bn = MASK_BLOCK_SIZE
        expected = (b, hq, _ops.ceil_div(lq, bm), _ops.ceil_div(lk, bn))
        if tuple(mask_id.shape) != expected:
            raise ValueError(
                f"mask_id: expected shape (batch_size, num_qo_heads, ceil(qo_len / {bm}), ceil(kv_len / {bn})) "
                f"= {expected}, got {tuple(mask_id.shape)}"
            )
    if mask_id.dtype.is_floating_point or mask_id.is_complex():
        raise ValueError(f"mask_id: expected a bool or integer tensor (1 = compute, 0 = skip), got dtype {mask_id.dtype}")
    if mask_id.device != q.device:
        raise ValueError(f"mask_id: expected a tensor on {q.device} (the device of q), got {mask_id.device}")
    return mask_id


def _spas_result(result, return_lse: bool, return_sparsity: bool):
    if return_sparsity:
        o, sparsity = result
        return o, float(sparsity)
    return result


def _check_flags(return_lse, return_sparsity) -> None:
    if return_lse and return_sparsity:
        raise ValueError(
            "return_lse, return_sparsity: ask for one of them (the original returned only the sparsity when "
            "both were set); sparge.attention returns both"
        )


def _spas(
    function: str,
    mode: str,
    q,
    k,
    v,
    attn_mask,
    dropout_p,
    is_causal,
    scale,
    smooth_k,
    simthreshd1,
    cdfthreshd,
    topk,
    pvthreshd,
    attention_sink,
    tensor_layout,
    output_dtype,
    return_sparsity,
    return_lse,
    qk_quant_gran: str,
    pv_precision: str,
):
    _no_dropout(dropout_p)
    _check_flags(return_lse, return_sparsity)
    kwargs = dict(mode=mode, simthreshd1=simthreshd1, pvthreshd=pvthreshd, block_score="mean")
    if mode == "topk":
        kwargs["topk"] = topk
    else:
        kwargs["cdfthreshd"] = cdfthreshd
        kwargs["cdf_sharpen"] = False  # the original compressed map
    result = _attention(
        function,
        q,
        k,
        v,
        attn_mask,
        **kwargs,
        is_causal=is_causal,
        scale=scale,
        layout=_layout(tensor_layout),
        attention_sink=attention_sink,
        smooth_k=smooth_k,
        qk_quant_gran=qk_quant_gran,
        pv_precision=pv_precision,
        output_dtype=output_dtype,
        return_lse=return_lse,
        return_sparsity=return_sparsity,
    )
    return _spas_result(result, return_lse, return_sparsity)


def _topk_mode(function: str, topk, cdfthreshd) -> str:
    """The original's TopK functions use TopK unless topk is None and cdfthreshd is given."""
    if topk is not None and cdfthreshd is not None:
        raise ValueError(
            f"cdfthreshd: {function} selects blocks by topk; pass cdfthreshd=None (default), or topk=None to "
            f"select by cdfthreshd; got topk={topk!r} and cdfthreshd={cdfthreshd!r}"
        )
    if topk is None and cdfthreshd is None:
        raise ValueError(f"topk: expected a fraction in [0, 1] (or cdfthreshd when topk is None), got None for both")
    return "topk" if topk is not None else "cdf"


# ---- SpargeAttn ------------------------------------------------------------------------------------


def spas_sage2_attn_meansim_topk_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    smooth_k: bool = True,
    simthreshd1: HeadParam = -0.1,
    cdfthreshd: Optional[HeadParam] = None,
    topk: Optional[HeadParam] = 0.5,
    pvthreshd: HeadParam = 15,
    attention_sink: bool = False,
    tensor_layout: str = "HND",
    output_dtype: Optional[torch.dtype] = None,
    return_sparsity: bool = False,
    return_lse: bool = False,
):
    """SpargeAttn on SageAttention2 with TopK block selection (the recommended SpargeAttn API).

    Native call: ``sparge.attention(q, k, v, mode="topk", topk=topk, simthreshd1=simthreshd1,
    pvthreshd=pvthreshd, is_causal=is_causal, scale=scale, layout=tensor_layout,
    attention_sink=attention_sink, smooth_k=smooth_k, qk_quant_gran="per_thread",
    pv_precision="fp8", output_dtype=output_dtype, ...)`` (``topk=None`` with a ``cdfthreshd``
    gives ``mode="cdf"``, as in the original).

    Parameter order as in the original source (SDPA-like ``attn_mask, dropout_p, is_causal,
    scale`` after ``v``); defaults as in the SpargeAttn README (``topk=0.5``, ``pvthreshd=15``;
    the original source has ``topk=0.35``, ``pvthreshd=50``). Differences from the original:
    causal per element, not per block; rows with no kept block are 0, not garbage; GQA, any
    head dim and ``Lq < 128`` supported; per-head hyperparameter tensors; ``output_dtype=None``
    means the dtype of q (the original's ``torch.float16`` default was not applied);
    ``dropout_p`` raises instead of being ignored, and ``attn_mask`` is honoured when it is a
    key-padding mask (raises otherwise); Q·K quantized per thread (the original quantized per block).

    Returns ``o``; ``(o, sparsity)`` (a Python float) with ``return_sparsity``; ``(o, lse)``
    with ``return_lse``.
    """
    mode = _topk_mode("spas_sage2_attn_meansim_topk_cuda", topk, cdfthreshd)
    return _spas("spas_sage2_attn_meansim_topk_cuda", mode, q, k, v, attn_mask, dropout_p, is_causal, scale, smooth_k,
                 simthreshd1, cdfthreshd, topk, pvthreshd, attention_sink, tensor_layout, output_dtype,
                 return_sparsity, return_lse, "per_thread", "fp8")  # fmt: skip


def spas_sage2_attn_meansim_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    smooth_k: bool = True,
    simthreshd1: HeadParam = 0.6,
    cdfthreshd: HeadParam = 0.98,
    pvthreshd: HeadParam = 50,
    attention_sink: bool = False,
    tensor_layout: str = "HND",
    output_dtype: Optional[torch.dtype] = None,
    return_sparsity: bool = False,
    return_lse: bool = False,
):
    """SpargeAttn on SageAttention2 with CDF (Top-P) block selection.

    Native call: ``sparge.attention(q, k, v, mode="cdf", cdfthreshd=cdfthreshd,
    simthreshd1=simthreshd1, pvthreshd=pvthreshd, qk_quant_gran="per_thread",
    pv_precision="fp8", ...)``, other arguments passed on as in
    :func:`spas_sage2_attn_meansim_topk_cuda`.

    The README documents no defaults for this function: ``simthreshd1=0.6``,
    ``cdfthreshd=0.98``, ``pvthreshd=50`` are those of the original source. Differences from
    the original as in :func:`spas_sage2_attn_meansim_topk_cuda`.
    """
    return _spas("spas_sage2_attn_meansim_cuda", "cdf", q, k, v, attn_mask, dropout_p, is_causal, scale, smooth_k,
                 simthreshd1, cdfthreshd, None, pvthreshd, attention_sink, tensor_layout, output_dtype,
                 return_sparsity, return_lse, "per_thread", "fp8")  # fmt: skip


def spas_sage_attn_meansim_topk_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    smooth_k: bool = True,
    simthreshd1: HeadParam = -0.1,
    cdfthreshd: Optional[HeadParam] = None,
    topk: Optional[HeadParam] = 0.5,
    pvthreshd: HeadParam = 15,
    attention_sink: bool = False,
    tensor_layout: str = "HND",
    output_dtype: Optional[torch.dtype] = None,
    return_sparsity: bool = False,
    return_lse: bool = False,
):
    """SpargeAttn on SageAttention (1) with TopK block selection.

    Native call: ``sparge.attention(q, k, v, mode="topk", ..., qk_quant_gran="per_block",
    pv_precision="fp16")``: SageAttention's scheme, INT8 Q·K with one scale per block and FP16
    P·V (fp32 accumulation). Defaults: those of the README's TopK API (the README gives none
    for this variant specifically; the original source has ``topk=0.35``, ``pvthreshd=50``).
    Differences from the original as in :func:`spas_sage2_attn_meansim_topk_cuda`.
    """
    mode = _topk_mode("spas_sage_attn_meansim_topk_cuda", topk, cdfthreshd)
    return _spas("spas_sage_attn_meansim_topk_cuda", mode, q, k, v, attn_mask, dropout_p, is_causal, scale, smooth_k,
                 simthreshd1, cdfthreshd, topk, pvthreshd, attention_sink, tensor_layout, output_dtype,
                 return_sparsity, return_lse, "per_block", "fp16")  # fmt: skip


def spas_sage_attn_meansim_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    smooth_k: bool = True,
    simthreshd1: HeadParam = 0.6,
    cdfthreshd: HeadParam = 0.98,
    pvthreshd: HeadParam = 50,
    attention_sink: bool = False,
    tensor_layout: str = "HND",
    output_dtype: Optional[torch.dtype] = None,
    return_sparsity: bool = False,
    return_lse: bool = False,
):
    """SpargeAttn on SageAttention (1) with CDF (Top-P) block selection.

    Native call: ``sparge.attention(q, k, v, mode="cdf", ..., qk_quant_gran="per_block",
    pv_precision="fp16")``. Defaults of the original source (the README documents none).
    Differences from the original as in :func:`spas_sage2_attn_meansim_topk_cuda`.
    """
    return _spas("spas_sage_attn_meansim_cuda", "cdf", q, k, v, attn_mask, dropout_p, is_causal, scale, smooth_k,
                 simthreshd1, cdfthreshd, None, pvthreshd, attention_sink, tensor_layout, output_dtype,
                 return_sparsity, return_lse, "per_block", "fp16")  # fmt: skip


def _block_sparse(q, k, v, mask_id, layout, **kwargs):
    """sparge.attention with mode="block_mask" and block_size (128, 64), or "dense" without mask."""
    if mask_id is None:
        return attention(q, k, v, mode="dense", layout=layout, block_size=MASK_BLOCK_SIZE, **kwargs)
    mask = _mask_id(mask_id, q, k, layout)
    return attention(q, k, v, mode="block_mask", block_mask=mask, layout=layout, block_size=MASK_BLOCK_SIZE, **kwargs)


def block_sparse_sage2_attn_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_id: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    pvthreshd: HeadParam = 20,
    attention_sink: bool = False,
    tensor_layout: str = "HND",
    return_sparsity: bool = False,
    dropout_p: float = 0.0,
    smooth_k: bool = True,
    output_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
):
    """Sparse SageAttention2 over a caller-given block mask (SpargeAttn's block-sparse API).

    ``mask_id``: bool or integer ``(batch_size, num_qo_heads, ceil(qo_len / 128),
    ceil(kv_len / 64))``, 1 = compute the block, 0 = skip it; ``None`` computes every block
    (dense). A wrong shape raises ``ValueError``.

    Native call: ``sparge.attention(q, k, v, mode="block_mask", block_mask=mask_id,
    block_size=(128, 64), pvthreshd=pvthreshd, scale=scale, layout=tensor_layout,
    smooth_k=smooth_k, qk_quant_gran="per_thread", pv_precision="fp8", ...)``, or
    ``mode="dense"`` when ``mask_id is None``.

    Parameters after ``mask_id`` are keyword-only: the README's order (``scale, pvthreshd, ...``)
    and the original source's (``dropout_p, scale, smooth_k, pvthreshd, ...``) disagree, so a
    positional call would be ambiguous. Defaults from the README (``pvthreshd=20``; the source
    has 50). ``attention_sink=True`` adds the first K block to every row of ``mask_id`` (the
    original accepted the flag and ignored it). Differences from the original: the mask shape does not depend on the
    GPU generation; rows with no kept block are 0; ``mask_id=None`` is dense instead of an
    error; GQA supported; ``dropout_p != 0`` raises; the sparsity (a Python float) is
    ``1 - kept / total blocks``.
    """
    _no_dropout(dropout_p)
    _check_flags(return_lse, return_sparsity)
    if attention_sink and mask_id is not None:
        mask_id = _mask_id(mask_id, q, k, _layout(tensor_layout)).clone()
        mask_id[..., 0] = 1
    result = _block_sparse(q, k, v, mask_id, _layout(tensor_layout), scale=scale, pvthreshd=pvthreshd,
                           smooth_k=smooth_k, qk_quant_gran="per_thread", pv_precision="fp8",
                           output_dtype=output_dtype, return_lse=return_lse,
                           return_sparsity=return_sparsity)  # fmt: skip
    return _spas_result(result, return_lse, return_sparsity)


# ---- Sparse SageAttention ----------------------------------------------------------------------------


def sparse_sageattn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_id: Optional[Tensor] = None,
    is_causal: bool = False,
    tensor_layout: str = "HND",
):
    """Sparse SageAttention (V1) over a block mask (``sparse_sageattn`` of Sparse_SageAttention_API).

    ``mask_id``: bool or integer ``(batch_size, num_qo_heads, ceil(qo_len / 128),
    ceil(kv_len / 64))``, 1 = compute, 0 = skip; ``None`` is full SageAttention V1 (dense).

    Native call: ``sparge.attention(q, k, v, mode="block_mask", block_mask=mask_id,
    block_size=(128, 64), is_causal=is_causal, layout=tensor_layout,
    qk_quant_gran="per_block", pv_precision="fp16", pvthreshd=float("inf"))`` (the original has
    no P·V filter), or ``mode="dense"`` when ``mask_id is None``. Differences: the causal mask
    is applied per element and intersected with ``mask_id``; rows with no kept block are 0;
    lengths need not be multiples of the block size; GQA supported.
    """
    return _block_sparse(q, k, v, mask_id, _layout(tensor_layout), is_causal=is_causal,
                         pvthreshd=float("inf"), qk_quant_gran="per_block", pv_precision="fp16")  # fmt: skip


# ---- SageAttention ----------------------------------------------------------------------------------

_FP16_ACCUM = ("fp16", "fp16+fp32", "fp32")
_FP8_ACCUM = ("fp32", "fp32+fp32", "fp32+fp16")
_QK_GRANS = ("per_warp", "per_thread")


def _dense(function, q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse, qk_quant_gran, pv_precision,
           attn_mask=None):  # fmt: skip
    return _attention(function, q, k, v, attn_mask, mode="dense", is_causal=is_causal, scale=sm_scale,
                      layout=_layout(tensor_layout), smooth_k=smooth_k, qk_quant_gran=qk_quant_gran,
                      pv_precision=pv_precision, return_lse=return_lse)  # fmt: skip


def sageattn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
    **kwargs: Any,
):
    """SageAttention (dense INT8 Q·K + quantized P·V), ``sageattn`` of SageAttention.

    Native call: ``sparge.attention(q, k, v, mode="dense", is_causal=is_causal, scale=sm_scale,
    layout=tensor_layout, qk_quant_gran="per_thread", pv_precision="fp8",
    return_lse=return_lse)`` on every device (the original picks a kernel per GPU
    architecture; this is its Ada/Hopper choice, with fp32 accumulation).

    ``**kwargs``: the original ignores them all. Here ``scale`` (SDPA name) is used as
    ``sm_scale``; ``smooth_k`` (default True) and ``qk_quant_gran`` (``"per_thread"`` or
    ``"per_warp"``) are honoured; ``pv_accum_dtype`` (any value an original kernel accepts) is
    accepted and has no effect; ``attn_mask`` is honoured when it is a key-padding mask (see the
    module docstring); ``dropout_p=0.0``, ``enable_gqa`` and ``smooth_v=False`` are accepted;
    other values of those raise ``NotImplementedError``, other names ``TypeError``. Differences:
    causal for ``Lq != Lk`` is top-left aligned (SDPA); CPU tensors, fp32, any head dim and GQA
    supported.

    Returns ``o``, or ``(o, lse)`` with ``return_lse`` (natural log, ``[B, Hq, Lq]`` fp32).
    """
    sm_scale = _sage_kwargs("sageattn", sm_scale, kwargs, extra=("smooth_k", "qk_quant_gran", "pv_accum_dtype"))
    gran = _choice("qk_quant_gran", kwargs.get("qk_quant_gran", "per_thread"), _QK_GRANS)
    if "pv_accum_dtype" in kwargs:
        _choice("pv_accum_dtype", kwargs["pv_accum_dtype"], tuple(dict.fromkeys(_FP16_ACCUM + _FP8_ACCUM)))
    smooth_k = kwargs.get("smooth_k", True)
    return _dense("sageattn", q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse,
                  gran, "fp8", kwargs.get("attn_mask"))


def sageattn_qk_int8_pv_fp16_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensor_layout: str = "HND",
    quantization_backend: str = "triton",
    is_causal: bool = False,
    sm_scale: Optional[float] = None,
    smooth_k: bool = True,
    return_lse: bool = False,
    **kwargs: Any,
):
    """SageAttention (1): INT8 Q·K with one scale per block, FP16 P·V (name of the Triton kernel).

    Native call: ``sparge.attention(q, k, v, mode="dense", qk_quant_gran="per_block",
    pv_precision="fp16", ...)``. ``quantization_backend`` (``"triton"`` or ``"cuda"``) is
    checked and has no effect (sparge has one quantizer). P·V accumulates in fp32 (the
    original: fp16 added to an fp32 buffer). ``**kwargs`` as in :func:`sageattn` (``scale``
    honoured, no-op SDPA arguments accepted, anything else rejected).
    """
    sm_scale = _sage_kwargs("sageattn_qk_int8_pv_fp16_triton", sm_scale, kwargs)
    _choice("quantization_backend", quantization_backend, ("triton", "cuda"))
    return _dense("sageattn_qk_int8_pv_fp16_triton", q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse,
                  "per_block", "fp16", kwargs.get("attn_mask"))


def sageattn_qk_int8_pv_fp16_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    qk_quant_gran: str = "per_thread",
    sm_scale: Optional[float] = None,
    pv_accum_dtype: str = "fp32",
    smooth_k: bool = True,
    smooth_v: bool = False,
    return_lse: bool = False,
    **kwargs: Any,
):
    """SageAttention2: INT8 Q·K (``qk_quant_gran`` ``"per_thread"`` or ``"per_warp"``), FP16 P·V.

    Native call: ``sparge.attention(q, k, v, mode="dense", qk_quant_gran=qk_quant_gran,
    pv_precision="fp16", ...)``. ``pv_accum_dtype`` accepts the original's ``"fp16"``,
    ``"fp16+fp32"``, ``"fp32"``; sparge always accumulates in fp32. ``smooth_v=True`` raises
    ``NotImplementedError``. ``**kwargs`` as in :func:`sageattn`.
    """
    sm_scale = _sage_kwargs("sageattn_qk_int8_pv_fp16_cuda", sm_scale, kwargs)
    gran = _choice("qk_quant_gran", qk_quant_gran, _QK_GRANS)
    _choice("pv_accum_dtype", pv_accum_dtype, _FP16_ACCUM)
    _no_smooth_v(smooth_v)
    return _dense("sageattn_qk_int8_pv_fp16_cuda", q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse,
                  gran, "fp16", kwargs.get("attn_mask"))


def sageattn_qk_int8_pv_fp8_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    qk_quant_gran: str = "per_thread",
    sm_scale: Optional[float] = None,
    pv_accum_dtype: str = "fp32+fp32",
    smooth_k: bool = True,
    smooth_v: bool = False,
    return_lse: bool = False,
    **kwargs: Any,
):
    """SageAttention2: INT8 Q·K (``qk_quant_gran``), FP8 e4m3 P·V.

    Native call: ``sparge.attention(q, k, v, mode="dense", qk_quant_gran=qk_quant_gran,
    pv_precision="fp8", ...)``. ``pv_accum_dtype`` accepts ``"fp32"``, ``"fp32+fp32"`` (the
    default documented by the original; both accumulate in fp32) and ``"fp32+fp16"``
    (SageAttention2++; the 2.2 source uses it as the signature default), which runs
    ``pv_precision="fp8_fp16acc"``: each 64-key chunk of P·V summed in fp16 with V scaled into
    ±2.25, added to an fp32 accumulator (needs sm_89+; faster on Ada and RTX 50xx, slower on
    Hopper, where it runs the mma.sync kernel). ``smooth_v=True`` raises
    ``NotImplementedError``. ``**kwargs`` as in :func:`sageattn`.
    """
    sm_scale = _sage_kwargs("sageattn_qk_int8_pv_fp8_cuda", sm_scale, kwargs)
    gran = _choice("qk_quant_gran", qk_quant_gran, _QK_GRANS)
    _choice("pv_accum_dtype", pv_accum_dtype, _FP8_ACCUM)
    _no_smooth_v(smooth_v)
    pv_precision = "fp8_fp16acc" if pv_accum_dtype == "fp32+fp16" else "fp8"
    return _dense("sageattn_qk_int8_pv_fp8_cuda", q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse,
                  gran, pv_precision, kwargs.get("attn_mask"))


def sageattn_qk_int8_pv_fp8_cuda_sm90(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    qk_quant_gran: str = "per_thread",
    sm_scale: Optional[float] = None,
    pv_accum_dtype: str = "fp32+fp32",
    smooth_k: bool = True,
    return_lse: bool = False,
    **kwargs: Any,
):
    """SageAttention2 for Hopper: same computation as :func:`sageattn_qk_int8_pv_fp8_cuda`.

    Native call: ``sparge.attention(q, k, v, mode="dense", qk_quant_gran=qk_quant_gran,
    pv_precision="fp8", ...)``; runs on any device (sparge picks its kernel per GPU).
    ``pv_accum_dtype`` accepts ``"fp32+fp32"`` and ``"fp32"`` (which the original rejects on
    sm90; sparge accumulates in fp32 either way). ``**kwargs`` as in :func:`sageattn`
    (``smooth_v=False`` accepted, ``True`` raises).
    """
    sm_scale = _sage_kwargs("sageattn_qk_int8_pv_fp8_cuda_sm90", sm_scale, kwargs)
    gran = _choice("qk_quant_gran", qk_quant_gran, _QK_GRANS)
    _choice("pv_accum_dtype", pv_accum_dtype, ("fp32+fp32", "fp32"))
    return _dense("sageattn_qk_int8_pv_fp8_cuda_sm90", q, k, v, tensor_layout, is_causal, sm_scale, smooth_k,
                  return_lse, gran, "fp8", kwargs.get("attn_mask"))


def sageattn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool = False,
    sm_scale: Optional[float] = None,
    smooth_k: bool = True,
    **kwargs: Any,
):
    """SageAttention on a packed variable-length batch (``sageattn_varlen`` of SageAttention).

    ``q`` ``[cu_seqlens_q[-1], Hq, D]``, ``k``, ``v`` ``[cu_seqlens_k[-1], Hkv, D]``;
    ``cu_seqlens_*`` ``[batch + 1]`` int32 or int64 cumulative lengths (on q's device or the
    CPU); ``max_seqlen_*`` the longest sequences. Returns ``o`` ``[cu_seqlens_q[-1], Hq, D]``.

    Native call: ``sparge.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, mode="dense", is_causal=is_causal, scale=sm_scale, smooth_k=smooth_k,
    qk_quant_gran="per_block", pv_precision="fp16")`` (the original's varlen kernel is
    SageAttention 1: INT8 Q·K with one scale per block, FP16 P·V). Differences: K is smoothed
    per sequence (the original subtracted one mean over the whole pack, which mixes sequences);
    causal is top-left aligned per sequence (the original documents causal only for equal query
    and key lengths); CPU tensors, fp32, any head dim and GQA supported; the cu_seqlens are
    validated (start 0, non-decreasing, end at the token counts, lengths <= max_seqlen) and
    read on the host (one sync for CUDA tensors; see :func:`sparge.attention_varlen` for the
    cost model). ``**kwargs`` as in :func:`sageattn` (``scale`` honoured, ``dropout_p=0.0``,
    ``enable_gqa`` and ``smooth_v=False`` accepted), except that ``attn_mask`` must be None
    (a packed batch has no padding).
    """
    if kwargs.get("attn_mask") is not None:
        raise NotImplementedError(
            "attn_mask: sageattn_varlen takes no mask (the sequences of a packed batch have no padding; the original "
            f"ignored it silently), got {type(kwargs['attn_mask']).__name__}"
        )
    sm_scale = _sage_kwargs("sageattn_varlen", sm_scale, kwargs)
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mode="dense",
                            is_causal=is_causal, scale=sm_scale, smooth_k=smooth_k, qk_quant_gran="per_block",
                            pv_precision="fp16")  # fmt: skip
