"""Sequence-parallel sparge attention over ``torch.distributed`` (DeepSpeed-Ulysses).

Each of the ``P`` ranks of a process group holds a contiguous shard of the sequence for all
heads: ``[B, L/P, H, D]`` (``layout="NHD"``) or ``[B, H, L/P, D]`` (``"HND"``), rank ``r``
holding tokens ``[r·L/P, (r+1)·L/P)``. :func:`ulysses_attention`

1. turns sequence shards into head shards with one ``all_to_all_single`` (rank ``r`` receives
   the full sequence of query heads ``[r·Hq/P, (r+1)·Hq/P)`` and of the key/value heads they
   read, ``[r·Hkv/P, (r+1)·Hkv/P)``; the grouping keeps each GQA query head with its kv head),
2. runs :func:`sparge.attention` on the full sequence of those heads, and
3. returns the output (and the LSE) to sequence shards with a second ``all_to_all_single``.

Attention is independent per head, so the block selection and the arithmetic of every head are
those of the single-process :func:`sparge.attention` on the full tensors: the result is
bit-identical to it (tested on the CPU backend with gloo).

Backends: any process group whose backend implements ``all_to_all_single``,
``all_gather_into_tensor`` and ``all_reduce`` for the tensors' device: gloo for CPU tensors
(tested), NCCL for CUDA tensors (written for it, not yet run on GPUs).
"""

from __future__ import annotations

import inspect
import numbers
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import api

__all__ = ["ulysses_attention"]

_LAYOUT_DIMS = {"NHD": (1, 2), "HND": (2, 1)}  # (sequence dim, head dim) of a 4-D tensor
_PER_HEAD = ("topk", "cdfthreshd", "simthreshd1", "pvthreshd")
_ATTENTION_KWARGS = frozenset(inspect.signature(api.attention).parameters) - {"q", "k", "v", "layout"}
_QUANTIZE_KWARGS = ("scale", "block_size", "smooth_k", "qk_quant_gran", "pv_precision")
_PREDICT_KWARGS = ("mode", "topk", "cdfthreshd", "simthreshd1", "block_score", "is_causal", "causal_alignment",
                   "attention_sink", "block_mask")  # fmt: skip
_ATTEND_KWARGS = ("pvthreshd", "is_causal", "causal_alignment", "output_dtype", "return_lse")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _seq_to_heads(x: Tensor, world: int, group, seq_dim: int, head_dim: int) -> Tensor:
    """[.., L/P (seq_dim), H (head_dim), ..] on every rank -> [.., L, H/P, ..]: rank r gets head group r."""
    send = x.unflatten(head_dim, (world, x.size(head_dim) // world)).movedim(head_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, seq_dim).flatten(seq_dim, seq_dim + 1)  # chunk i of recv = sequence shard of rank i


def _heads_to_seq(x: Tensor, world: int, group, seq_dim: int, head_dim: int) -> Tensor:
    """Inverse of :func:`_seq_to_heads`: [.., L, H/P, ..] -> [.., L/P, H, ..]."""
    send = x.unflatten(seq_dim, (world, x.size(seq_dim) // world)).movedim(seq_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, head_dim).flatten(head_dim, head_dim + 1)  # chunk i of recv = head group of rank i


def _local_heads(name: str, value, heads_q: int, first: int, count: int):
    """The per-head hyperparameter `value` restricted to query heads [first, first + count)."""
    if isinstance(value, numbers.Real) or not isinstance(value, (Tensor, list, tuple)):
        return value  # a float (or a wrong type: sparge.attention names it)
    if isinstance(value, Tensor):
        size, given = (value.size(0) if value.dim() == 1 else None), f"shape {tuple(value.shape)}"
    else:
        size, given = len(value), f"a sequence of {len(value)} values"
    if size != heads_q:
        raise ValueError(
            f"{name}: expected a float or {heads_q} per-head values (one per query head of the full model), got {given}"
        )
    return value[first : first + count]


def _local_block_mask(block_mask, heads_q: int, first: int, count: int):
    """The rows of `block_mask` ([B, Hq or 1, nbq, nbk], over the full sequence) for this rank's heads."""
    if isinstance(block_mask, Tensor) and block_mask.dim() == 4 and block_mask.size(1) != 1:
        if block_mask.size(1) != heads_q:
            raise ValueError(
                f"block_mask: expected [B, {heads_q} (Hq) or 1, ceil(L / block_q), ceil(L / block_k)] over the full "
                f"sequence, got shape {list(block_mask.shape)}"
            )
        return block_mask[:, first : first + count]
    return block_mask


def _check_global_shapes(q: Tensor, k: Tensor, v: Tensor, layout: str, world: int, group) -> None:
    """Gathers the shapes of every rank's shards and raises the same ValueError on every rank when
    they cannot form a sequence-parallel problem (one small all-gather, a host sync on CUDA)."""
    seq_dim, head_dim = _LAYOUT_DIMS[layout]
    dtype_code = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    mine = [q.size(0), q.size(seq_dim), q.size(head_dim), q.size(3), k.size(seq_dim), k.size(head_dim), k.size(3),
            dtype_code]  # fmt: skip
    device = q.device if q.device.type == "cuda" else torch.device("cpu")
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    table = torch.empty(world * len(mine), dtype=torch.int64, device=device)  # flat: gloo wants 1-D
    dist.all_gather_into_tensor(table, local, group=group)
    rows = table.view(world, len(mine)).tolist()
    batch, _, heads_q, dim, _, heads_kv, _, _ = rows[0]
    for r, row in enumerate(rows):
        if row[0] != batch or row[2] != heads_q or row[3] != dim or row[5] != heads_kv or row[7] != rows[0][7]:
            raise ValueError(
                f"q, k: expected the same batch size, head counts, head dim and dtype on every rank, got "
                f"(B, Hq, D, Hkv) = {(batch, heads_q, dim, heads_kv)} on rank 0 and {(row[0], row[2], row[3], row[5])} "
                f"on rank {r}"
            )
    if heads_q % world != 0:
        raise ValueError(
            f"q: expected a number of heads divisible by the world size {world} (Ulysses splits the heads over "
            f"the ranks), got Hq = {heads_q}"
        )
    if heads_kv % world != 0:
        raise ValueError(
            f"k: expected a number of key/value heads divisible by the world size {world} (Ulysses splits the "
            f"heads over the ranks; GQA keeps each query head with its kv head), got Hkv = {heads_kv}"
        )
    for name, col in (("q", 1), ("k", 4)):
        shards = [row[col] for row in rows]
        total = sum(shards)
        if total % world != 0 or len(set(shards)) != 1:
            raise ValueError(
                f"{name}: expected a sequence length L divisible by the world size {world}, sharded evenly "
                f"(L / {world} tokens per rank), got L = {total} as shards {shards}"
            )


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, layout: str = "NHD", **attention_kwargs):
    """Sequence-parallel :func:`sparge.attention` (DeepSpeed-Ulysses all-to-all over the heads).

    Call it on every rank of ``group`` (default: the WORLD group of ``torch.distributed``, which
    must be initialized) with that rank's contiguous sequence shard.

    Args:
        q: ``[B, Lq/P, Hq, D]`` (``layout="NHD"``) or ``[B, Hq, Lq/P, D]`` (``"HND"``): the query
            tokens ``[r·Lq/P, (r+1)·Lq/P)`` of rank ``r`` of ``P``, all heads.
        k, v: ``[B, Lk/P, Hkv, D]`` or ``[B, Hkv, Lk/P, D]``, sharded the same way (``Lk`` may
            differ from ``Lq``).
        group: the process group (``None`` for WORLD).
        layout: ``"NHD"`` (default here, the usual layout of sequence-parallel code) or ``"HND"``.
        **attention_kwargs: the keyword arguments of :func:`sparge.attention`, with the meaning
            they have for the full tensors: ``is_causal`` masks by global token positions;
            per-head ``topk`` / ``cdfthreshd`` / ``simthreshd1`` / ``pvthreshd`` hold all
            ``Hq`` heads; ``block_mask`` is the full-sequence mask
            ``[B, Hq or 1, ceil(Lq / block_q), ceil(Lk / block_k)]`` (each rank uses the rows of
            its heads).

    Requirements (checked on every rank after one small all-gather of the shard shapes, so every
    rank raises the same ``ValueError``): the same B, Hq, Hkv, D and dtype on all ranks;
    ``Hq % P == 0`` and ``Hkv % P == 0``; ``Lq`` and ``Lk`` divisible by ``P`` with equal shards.

    Returns:
        As :func:`sparge.attention`: ``o`` (this rank's rows, in the layout and shape of ``q``),
        or a tuple with ``lse`` (fp32 ``[B, Hq, Lq/P]``, this rank's rows, all heads) and / or
        ``sparsity``. The sparsity is global: ``1 - Σkept / Σallowed`` over all ranks (the counts
        are all-reduced), the same 0-d fp32 tensor on every rank, equal to the single-process
        value. With ``return_sparsity`` the attention runs as :func:`sparge.quantize`,
        :func:`sparge.predict` and :func:`sparge.attend` (bit-identical to the fused op on one
        backend) to read the block counts.

    Bit-identical to the rows of ``sparge.attention`` on the full (gathered) tensors.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ulysses_attention: torch.distributed is not initialized; call torch.distributed.init_process_group first"
        )
    unknown = sorted(set(attention_kwargs) - _ATTENTION_KWARGS)
    if unknown:
        raise TypeError(f"ulysses_attention: unexpected keyword argument {unknown[0]!r}")
    if layout not in _LAYOUT_DIMS:
        raise ValueError(f"layout: expected one of 'HND', 'NHD', got {layout!r}")
    dims = "[B, L/P, H, D]" if layout == "NHD" else "[B, H, L/P, D]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor {dims} (layout {layout}), got shape {tuple(x.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{name}: expected the dtype and device of q ({q.dtype}, {q.device}), got ({x.dtype}, {x.device})"
            )

    world = dist.get_world_size(group)
    if world == 1:
        return api.attention(q, k, v, layout=layout, **attention_kwargs)
    _check_global_shapes(q, k, v, layout, world, group)
    rank = dist.get_rank(group)
    seq_dim, head_dim = _LAYOUT_DIMS[layout]
    heads_q = q.size(head_dim)
    local_q = heads_q // world

    kwargs = dict(attention_kwargs)
    for name in _PER_HEAD:
        if name in kwargs:
            kwargs[name] = _local_heads(name, kwargs[name], heads_q, rank * local_q, local_q)
    if kwargs.get("block_mask") is not None:
        kwargs["block_mask"] = _local_block_mask(kwargs["block_mask"], heads_q, rank * local_q, local_q)

    # Sequence shards -> head shards; one all-to-all per distinct shape (q, k, v together when equal).
    if q.shape == k.shape:
        q_full, k_full, v_full = _seq_to_heads(torch.stack((q, k, v)), world, group, seq_dim + 1, head_dim + 1).unbind(0)
    else:
        q_full = _seq_to_heads(q, world, group, seq_dim, head_dim)
        k_full, v_full = _seq_to_heads(torch.stack((k, v)), world, group, seq_dim + 1, head_dim + 1).unbind(0)

    return_lse = bool(kwargs.pop("return_lse", False))
    return_sparsity = bool(kwargs.pop("return_sparsity", False))
    sparsity = None
    if return_sparsity:
        quantized = api.quantize(q_full, k_full, v_full, layout=layout,
                                 **{n: kwargs[n] for n in _QUANTIZE_KWARGS if n in kwargs})  # fmt: skip
        pred = api.predict(quantized, **{n: kwargs[n] for n in _PREDICT_KWARGS if n in kwargs})
        attend_kwargs = {n: kwargs[n] for n in _ATTEND_KWARGS if n in kwargs}
        out = api.attend(quantized, pred.index, pred.count, return_lse=return_lse,
                         **{n: v_ for n, v_ in attend_kwargs.items() if n != "return_lse"})  # fmt: skip
        stats = pred.stats.clone()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        sparsity = api.block_sparsity(stats)
    else:
        out = api.attention(q_full, k_full, v_full, layout=layout, return_lse=return_lse, **kwargs)
    o, lse = (out[0], out[1]) if return_lse else (out if isinstance(out, Tensor) else out[0], None)

    # Head shards -> sequence shards.
    o = _heads_to_seq(o, world, group, seq_dim, head_dim)
    result = (o,)
    if return_lse:
        result += (_heads_to_seq(lse, world, group, 2, 1),)  # lse is [B, Hq/P, Lq] in both layouts
    if return_sparsity:
        result += (sparsity,)
    return result[0] if len(result) == 1 else result
