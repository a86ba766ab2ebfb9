"""Variable-length (packed) batches and key-padding masks.

* :func:`attention_varlen` — :func:`sparge.attention` on packed ``[total_tokens, H, D]`` tensors
  described by ``cu_seqlens`` (the convention of flash-attn and SageAttention's varlen API).
* Key-padding ``attn_mask`` — the masks that only remove keys (the same keys for every query and
  head of a batch row) are computed exactly by attending over the kept keys of each row; this is
  what :func:`sparge.scaled_dot_product_attention`, the :mod:`sparge.compat` functions and the
  :mod:`sparge.patch` routing do with an ``attn_mask``. Other masks raise (native API) or run the
  original SDPA (routing).

Both are written on top of :func:`sparge.attention`, one call per sequence (or per batch row of
a masked batch): K smoothing, quantization scales and block prediction are therefore computed per
sequence, never across sequences. A fused kernel over packed sequences is not implemented.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import api
from .api import _attention_parts, _attention_result, _check_output_dtype, _check_qkv, _check_tensor, block_sparsity

__all__ = ["KEY_DROP_BIAS", "attention_varlen", "key_padding_keep"]

#: An additive mask value at or below this (or ``-inf``) removes the key (see :func:`key_padding_keep`).
KEY_DROP_BIAS = -1000.0

# keyword arguments of sparge.attention, with their defaults
_ATTENTION_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(api.attention).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
_CU_DTYPES = (torch.int32, torch.int64)


def _merge_stats(total: Optional[Tensor], stats: Tensor) -> Tensor:
    return stats if total is None else total + stats


# ---- variable length --------------------------------------------------------------------------------


def _check_max_seqlen(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int (the longest sequence), got {type(value).__name__}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0 (the longest sequence), got {value}")
    return value


def _check_cu_seqlens(name: str, cu, device: torch.device) -> Tensor:
    cu = _check_tensor(name, cu)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(
            f"{name}: expected a 1-D tensor [batch + 1] of cumulative lengths, got shape {tuple(cu.shape)}"
        )
    if cu.dtype not in _CU_DTYPES:
        raise ValueError(f"{name}: expected dtype torch.int32 (or torch.int64), got {cu.dtype}")
    if cu.device.type != "cpu" and cu.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q) or on the CPU, got {cu.device}")
    if cu.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError(
            f"{name}: a CUDA tensor cannot be read during CUDA graph capture (the split into sequences is done on "
            "the host); pass the cu_seqlens as CPU tensors"
        )
    if cu.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a CPU or CUDA tensor (its values are read), got device {cu.device}")
    return cu


def _offsets(name: str, values: list, total: int, total_what: str, max_name: str, max_len: int) -> list:
    """Checks host cumulative lengths: start 0, non-decreasing, end = total, each length <= max_len."""
    if values[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(
                f"{name}: expected non-decreasing values (sequence lengths >= 0), got {name}[{i}] = {values[i]} < "
                f"{name}[{i - 1}] = {values[i - 1]}"
            )
    if values[-1] != total:
        raise ValueError(f"{name}: expected {name}[-1] == {total} ({total_what}), got {values[-1]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if lengths and max(lengths) > max_len:
        longest = max(lengths)
        raise ValueError(
            f"{max_name}: expected at least the longest sequence of {name} ({longest}, sequence "
            f"{lengths.index(longest)}), got {max_len}"
        )
    return values


def _host_values(cu_q: Tensor, cu_k: Tensor) -> tuple[list, list]:
    """The values of both cu_seqlens on the host: one device-to-host copy when they are on the GPU."""
    if cu_q.device == cu_k.device and cu_q.device.type != "cpu" and cu_q.numel() == cu_k.numel():
        both = torch.stack([cu_q.to(torch.int64), cu_k.to(torch.int64)]).tolist()
        return both[0], both[1]
    return cu_q.tolist(), cu_k.tolist()


def _sequence_masks(block_mask, batch: int) -> list:
    """The per-sequence block masks of attention_varlen (a list of batch [1 | Hq, nbq, nbk] tensors, or Nones)."""
    if block_mask is None:
        return [None] * batch
    if isinstance(block_mask, Tensor) or not isinstance(block_mask, Sequence):
        raise ValueError(
            "block_mask: expected a list with one [Hq, ceil(len_q_i / block_q), ceil(len_k_i / block_k)] mask per "
            f"sequence (sequences have different block counts), got {type(block_mask).__name__}"
        )
    if len(block_mask) != batch:
        raise ValueError(f"block_mask: expected {batch} masks (one per sequence), got {len(block_mask)}")
    masks = []
    for i, m in enumerate(block_mask):
        m = _check_tensor(f"block_mask[{i}]", m)
        masks.append(m.unsqueeze(0) if m.dim() == 3 else m)
    return masks


@torch.compiler.disable
def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    **kwargs,
):
    """:func:`sparge.attention` on a packed batch of variable-length sequences.

    Sequence ``i`` is ``q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]`` attending to
    ``k, v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]``; sequences never see each other. K smoothing,
    quantization and block prediction are per sequence (the original SageAttention varlen API
    smooths K over the whole pack).

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` (``Hq % Hkv == 0``), fp16 / bf16 /
            fp32 on one CPU or CUDA device, last dimension contiguous.
        cu_seqlens_q, cu_seqlens_k: 1-D ``[batch + 1]`` cumulative lengths, dtype int32 (int64
            also accepted), starting at 0, non-decreasing (empty sequences allowed), ending at
            ``total_q`` / ``total_k``; on q's device or on the CPU.
        max_seqlen_q, max_seqlen_k: ints at least the longest query / key sequence.
        **kwargs: the keyword arguments of :func:`sparge.attention` (``mode``, ``topk``,
            ``cdfthreshd``, ``simthreshd1``, ``block_score``, ``pvthreshd``, ``is_causal``,
            ``causal_alignment`` (per sequence), ``scale``, ``block_size``, ``attention_sink``,
            ``smooth_k``, ``qk_quant_gran``, ``pv_precision``, ``output_dtype``, ``return_lse``,
            ``return_sparsity``), except ``layout`` (the packed layout is fixed). ``block_mask``
            is a list with one ``[Hq | 1, nbq_i, nbk_i]`` mask per sequence.

    Returns:
        ``o`` ``[total_q, Hq, D]``; with ``return_lse`` also the LSE packed the same way,
        ``[total_q, Hq]`` fp32; with ``return_sparsity`` the block sparsity of the whole batch
        (``1 - kept / allowed`` summed over the sequences, 0-d fp32 tensor). Same tuple order as
        :func:`sparge.attention`.

    Cost model: one :func:`sparge.attention` call per non-empty sequence (quantize, predict,
    attend) plus a copy of its output into the packed result, so the host overhead grows with
    the batch size and, on a GPU, short sequences do not fill the device (there is no
    parallelism across sequences); long sequences run at the speed of :func:`sparge.attention`.
    Host synchronisation: the split reads the ``cu_seqlens`` on the host: none for CPU
    tensors, one device-to-host copy (a sync of the current stream) for CUDA tensors. Pass CPU
    ``cu_seqlens`` to avoid it; that is also required under CUDA-graph capture (the lengths are
    then baked into the graph).

    ``torch.compile`` does not trace into this function (``torch.compiler.disable``): it runs
    eagerly behind a graph break, and ``fullgraph=True`` is not supported, since the split depends
    on the values of ``cu_seqlens``.
    """
    bad = sorted(set(kwargs) - set(_ATTENTION_DEFAULTS))
    if bad or "layout" in kwargs:
        names = bad + (["layout"] if "layout" in kwargs else [])
        raise TypeError(
            f"attention_varlen: unexpected keyword argument(s) {names} (packed inputs are [total, H, D]; "
            f"expected some of {sorted(set(_ATTENTION_DEFAULTS) - {'layout'})})"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        x = _check_tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D packed tensor [total_tokens, H, D], got shape {tuple(x.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    _check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), "NHD")
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"cu_seqlens_k: expected {cu_q.numel()} entries (batch + 1, as cu_seqlens_q), got {cu_k.numel()}"
        )
    values_q, values_k = _host_values(cu_q, cu_k)
    offsets_q = _offsets("cu_seqlens_q", values_q, q.size(0), "q.shape[0], the packed query tokens", "max_seqlen_q",
                         max_q)  # fmt: skip
    offsets_k = _offsets("cu_seqlens_k", values_k, k.size(0), "k.shape[0], the packed key tokens", "max_seqlen_k",
                         max_k)  # fmt: skip
    batch = len(offsets_q) - 1
    settings = {**_ATTENTION_DEFAULTS, **kwargs, "layout": "NHD"}
    masks = _sequence_masks(settings.pop("block_mask"), batch)
    return_lse, return_sparsity = bool(settings["return_lse"]), bool(settings["return_sparsity"])
    out_dtype = _check_output_dtype(settings["output_dtype"], q.dtype)
    total_q, heads_q, head_dim = q.shape
    o = torch.empty((total_q, heads_q, head_dim), dtype=out_dtype, device=q.device)
    lse = torch.empty((total_q, heads_q), dtype=torch.float32, device=q.device) if return_lse else None
    stats = None
    computed = False
    for i in range(batch):
        qs, qe, ks, ke = offsets_q[i], offsets_q[i + 1], offsets_k[i], offsets_k[i + 1]
        if qe == qs:
            continue
        oi, lse_i, st = _attention_parts(q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                                         block_mask=masks[i], **settings)  # fmt: skip
        computed = True
        o[qs:qe] = oi[0]
        if return_lse:
            lse[qs:qe] = lse_i[0].transpose(0, 1)
        if return_sparsity:
            stats = _merge_stats(stats, st)
    if not computed:  # no query token: still validate the settings, as attention does on empty inputs
        _, _, stats = _attention_parts(q[:0].unsqueeze(0), k[:0].unsqueeze(0), v[:0].unsqueeze(0), block_mask=None,
                                       **settings)  # fmt: skip
    sparsity = block_sparsity(stats) if return_sparsity else None
    return _attention_result(o, lse, sparsity, return_lse, return_sparsity)


# ---- key-padding masks --------------------------------------------------------------------------------


def mask_shape_error(attn_mask: Tensor, shape: tuple) -> Optional[str]:
    """Why ``attn_mask`` does not broadcast to ``shape`` = ``(B, Hq, Lq, Lk)`` (None when it does)."""
    dims = tuple(attn_mask.shape)
    if len(dims) > 4 or any(s != 1 and s != t for s, t in zip(reversed(dims), reversed(shape))):
        return f"expected a mask broadcastable to [B, Hq, Lq, Lk] = {list(shape)}, got shape {list(dims)}"
    return None


def key_padding_keep(attn_mask: Tensor, shape: tuple) -> Optional[Tensor]:
    """The kept keys ``[B, Lk]`` (bool, CPU) when ``attn_mask`` is a key-padding mask, else None.

    ``attn_mask`` follows ``scaled_dot_product_attention``: bool (True = attend) or additive
    float, broadcastable to ``shape`` = ``(B, Hq, Lq, Lk)``. It is a key-padding mask when, for each
    batch row, the same keys are kept for every head and query. An additive value is "keep" when
    it is 0 and "drop" when it is ``-inf`` or at most :data:`KEY_DROP_BIAS` (``-1000``: the
    ``torch.finfo(dtype).min`` of transformers and the ``-10000`` of diffusers): a dropped key's
    softmax weight is then below ``exp(-1000 + spread)``, exactly 0 in fp32 as long as the
    scaled scores of a row span less than about 890. Any other value makes the mask a general
    one (None). A row that keeps no key is a padding only with bool or ``-inf`` masks (its
    output is 0, as SDPA's); a row of finite biases only gives None (SDPA's result then depends
    on how the bias absorbs the scores in floating point).

    Reads the mask's values (one device-to-host synchronisation for a CUDA mask).
    """
    if mask_shape_error(attn_mask, shape) is not None:
        return None
    batch, _, _, len_k = shape
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.dtype == torch.bool:
        keep, valid = m, None
    elif m.dtype.is_floating_point:
        keep = m == 0
        valid = (keep | (m <= KEY_DROP_BIAS)).all()
    else:
        return None
    first = keep[:, :1, :1, :]
    ok = (keep == first).all()
    ok = ok if valid is None else ok & valid
    if not bool(ok):
        return None
    keep_rows = first[:, 0, 0, :].expand(m.size(0), len_k).cpu()
    if m.dtype != torch.bool:
        for b in (~keep_rows.any(dim=1)).nonzero().flatten().tolist():
            if not bool((m[b] == -math.inf).all()):
                return None
    return keep_rows.expand(batch, len_k)


def _select_keys(k: Tensor, v: Tensor, keep: Tensor, seq_dim: int) -> tuple[Tensor, Tensor]:
    """k and v restricted to the kept keys (a view when they form a prefix)."""
    n = int(keep.sum())
    if n == keep.numel():
        return k, v
    idx = keep.nonzero().flatten()
    if n == 0 or int(idx[-1]) == n - 1:
        return k.narrow(seq_dim, 0, n), v.narrow(seq_dim, 0, n)
    idx = idx.to(k.device)
    return k.index_select(seq_dim, idx), v.index_select(seq_dim, idx)


def key_padding_parts(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, settings: dict):
    """``(o, lse, stats)`` of attention over the kept keys of each batch row (``keep`` ``[B, Lk]``
    bool on the CPU); ``settings`` holds every keyword argument of :func:`sparge.attention`.

    One :func:`sparge.attention` call when all rows keep the same keys, else one per batch row
    (outputs concatenated, block counts added)."""
    seq_dim = 2 if settings["layout"] == "HND" else 1
    batch = q.size(0)
    if batch == 0 or bool(keep.all()):
        return _attention_parts(q, k, v, **settings)
    if bool((keep == keep[:1]).all()):
        groups = [(slice(0, batch), keep[0])]
    else:
        groups = [(slice(b, b + 1), keep[b]) for b in range(batch)]
    parts = []
    for rows, kept in groups:
        kb, vb = _select_keys(k[rows], v[rows], kept, seq_dim)
        parts.append(_attention_parts(q[rows], kb, vb, **settings))
    if len(parts) == 1:
        return parts[0]
    o = torch.cat([p[0] for p in parts])
    lse = torch.cat([p[1] for p in parts]) if settings["return_lse"] else parts[0][1]
    stats = parts[0][2]
    for p in parts[1:]:
        stats = _merge_stats(stats, p[2])
    return o, lse, stats


def masked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, function: str, **kwargs):
    """:func:`sparge.attention` (same keyword arguments and returns) with an SDPA ``attn_mask``
    that is a key-padding mask (see :func:`key_padding_keep`); any other mask raises
    ``NotImplementedError``. ``function`` names the caller in messages."""
    settings = {**_ATTENTION_DEFAULTS, **kwargs}
    _, (batch, heads_q, _, len_q, len_k, _) = _check_qkv(q, k, v, settings["layout"])
    attn_mask = _check_tensor("attn_mask", attn_mask)
    shape = (batch, heads_q, len_q, len_k)
    error = mask_shape_error(attn_mask, shape)
    if error is not None:
        raise ValueError(f"attn_mask: {error}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise ValueError(f"attn_mask: expected a bool or floating-point (additive) mask, got dtype {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask: expected a tensor on {q.device} (the device of q), got {attn_mask.device}")
    if settings["is_causal"]:
        raise ValueError(f"attn_mask: {function} takes an attn_mask or is_causal=True, not both (as torch's SDPA)")
    if settings["block_mask"] is not None:
        raise ValueError(f"attn_mask: {function} takes an attn_mask or a block_mask, not both")
    if not api._data_checkable(attn_mask):
        raise NotImplementedError(
            f"attn_mask: {function} reads the mask's values to find the padded keys, which is not possible under "
            "torch.compile, CUDA-graph capture or on the meta device; use is_causal=True / block_mask=..., or call "
            "it eagerly"
        )
    keep = key_padding_keep(attn_mask, shape)
    if keep is None:
        raise NotImplementedError(
            f"attn_mask: {function} supports key-padding masks only (for each batch row the same keys kept for every "
            "query and head: bool True / additive 0 = keep, False / -inf / <= -1000 = drop); for other masks use "
            "is_causal=True, block_mask=..., or torch's scaled_dot_product_attention (sparge.patch falls back to it "
            "automatically)"
        )
    return_sparsity = bool(settings["return_sparsity"])
    o, lse, stats = key_padding_parts(q, k, v, keep, settings)
    sparsity = block_sparsity(stats) if return_sparsity else None
    return _attention_result(o, lse, sparsity, bool(settings["return_lse"]), return_sparsity)
