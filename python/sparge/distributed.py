"""Sequence-parallel sparge attention over ``torch.distributed``: Ulysses and ring attention.

Each of the ``P`` ranks of a process group holds a contiguous shard of the sequence for all
heads: ``[B, L_r, H, D]`` (``layout="NHD"``) or ``[B, H, L_r, D]`` (``"HND"``), rank ``r`` holding
tokens ``[L_0 + … + L_{r-1}, L_0 + … + L_r)``. Both functions take the keyword arguments of
:func:`sparge.attention` with their meaning for the whole (gathered) sequence, and return this
rank's rows of the result.

:func:`ulysses_attention` (DeepSpeed-Ulysses, equal shards, ``Hq`` and ``Hkv`` divisible by ``P``)

1. turns sequence shards into head shards with one ``all_to_all_single`` (rank ``r`` receives
   the full sequence of query heads ``[r·Hq/P, (r+1)·Hq/P)`` and of the key/value heads they
   read; the grouping keeps each GQA query head with its kv head),
2. runs :func:`sparge.attention` on the full sequence of those heads, and
3. returns the output (and the LSE) to sequence shards with a second ``all_to_all_single``.
   Attention is independent per head, so the result is bit-identical to the single-process op.

:func:`ring_attention` (any head count; shards aligned to the prediction blocks)

1. **Global statistics.** The token mean of K that smoothing subtracts and the per-channel
   amax of V are reduced over the ranks (``send``/``recv`` chain or ``all_reduce``, ``B·Hkv·D``
   values each). Every rank quantizes its shard of ``K − mean`` (INT8, with the pooled means,
   self-similarities and spike keys of its K blocks) and of V (the global scale), which are the
   rows of what the single-process :func:`sparge.quantize` computes for the whole sequence.
2. **Global prediction.** The block statistics of K (``D + 1`` floats per K block, ``3·D + 1``
   when the block score may use the spike keys, i.e. unless ``block_score="mean"``; 1/32 or 3/32
   of the bytes of K in fp16 at 64-row blocks) are all-gathered, and
   every rank runs :func:`sparge.predict` for its Q blocks against all K blocks (causal: the
   blocks up to its own shard), so it keeps the K blocks the single-process op keeps.
3. **Ring.** The quantized KV shards (INT8 K with its scales, FP8 or FP16 V: half the bytes of
   fp16 K and V) travel around the ring with ``batch_isend_irecv`` (the transfer of step ``t+1``
   overlaps the attention of step ``t``). Each rank runs :func:`sparge.attend` on the kept
   blocks of each shard and merges the partial outputs with their log-sum-exp. A shard none of
   the rank's Q blocks keeps is not computed; a transfer no rank further along the ring needs
   is not made (causal attention sends only the shards that later ranks see).

   Causal masking with equal-length Q and K shards per rank (self-attention) is global: shard
   ``s < r`` is fully visible to rank ``r``, ``s == r`` is the causal diagonal (sparge's
   top-left alignment on the shard, which for ``Lq == Lk`` is also bottom-right), ``s > r`` is
   invisible.

Where the result differs from the single-process op: the selection is identical on the CPU
backend (the quantized shards are bit-identical slices of the single-process buffers); on CUDA
the statistics of K are computed by kernels whose reduction order depends on the input dtype
and the mean by another reduction, so block scores can differ in the last bits and a near-tie
at the selection cut can flip (as between the CPU and the CUDA backend); ``smooth_k=False``
makes the CUDA selection exact too. The outputs differ by rounding: each shard's online softmax
starts from its own running maximum, so the P quantization (FP8 or FP16 relative to that
maximum) and the P·V filter decisions (``pvthreshd``, relative to that maximum) differ from the
single pass, and the partial results are merged in fp32.

Backends: any process group whose backend implements the collectives above for the tensors'
device: gloo for CPU tensors (tested), NCCL for CUDA tensors (written for it; tests marked
``gpu``). The small metadata exchanges (shapes, the shards each rank needs) go through the
group's CPU backend when it has one (``init_process_group("cpu:gloo,cuda:nccl")``, the default
of ``init_process_group()`` without a backend): they then cost a host round trip but no GPU
synchronization. On an NCCL-only group they run on the GPU and reading them back waits for the
GPU work queued before the call.

:func:`sequence_parallel` runs an entry point of :mod:`sparge.compat` with its call to
:func:`sparge.attention` replaced by one of the two functions.
"""

from __future__ import annotations

import contextvars
import importlib.util
import inspect
import math
import numbers
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import _ops, api

__all__ = ["RingInfo", "ring_attention", "sequence_parallel", "ulysses_attention"]

_LAYOUT_DIMS = {"NHD": (1, 2), "HND": (2, 1)}  # (sequence dim, head dim) of a 4-D tensor
_PER_HEAD = ("topk", "cdfthreshd", "simthreshd1", "pvthreshd")


def _parameters(function, *excluded: str) -> tuple[str, ...]:
    return tuple(n for n in inspect.signature(function).parameters if n not in excluded)


# The keyword arguments of sparge.attention, and those of the stage each belongs to.
_ATTENTION_KWARGS = frozenset(_parameters(api.attention, "q", "k", "v", "layout"))
_QUANTIZE_KWARGS = _parameters(api.quantize, "q", "k", "v", "layout")
_PREDICT_KWARGS = _parameters(api.predict, "quantized")
_SELECT_KWARGS = _parameters(api.predict, "quantized", "mode", "is_causal", "causal_alignment", "block_mask")
_ATTEND_KWARGS = _parameters(api.attend, "quantized", "index", "count", "layout", "return_stats")
_PREDICT_DEFAULT_SCORE = inspect.signature(api.predict).parameters["block_score"].default
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_ROWS = 64  # rows of the INT8 scale groups of Q and K (include/sparge/layout.h): shards align to them
#: V is scaled into [-v_max, v_max] (docs/method.md §0): 2.25 keeps the fp16 accumulator of
#: "fp8_fp16acc" from overflowing.
_V_MAX = {"fp8": 448.0, "fp16": 448.0, "fp8_fp16acc": 2.25}


# ---- checks shared by both functions ---------------------------------------------------------------


def _require_initialized(name: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{name}: torch.distributed is not initialized; call torch.distributed.init_process_group first"
        )


def _peer(group, rank: int) -> int:
    """The global rank of `rank` of `group` (what send / recv / broadcast take)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _metadata_device(group, q) -> torch.device:
    """Where the small metadata collectives run: the CPU when the group has a CPU backend (gloo,
    or a ``"cpu:gloo,cuda:nccl"`` group), else the CUDA device of q (an NCCL-only group)."""
    if "cpu:" in dist.get_backend_config(group):
        return torch.device("cpu")
    if isinstance(q, Tensor) and q.device.type == "cuda":
        return q.device
    return torch.device("cuda", torch.cuda.current_device())


def _check_local(name: str, q, k, v, layout: str, kwargs: dict) -> list[int]:
    """Checks this rank's arguments (every one, through sparge.attention on empty shards, which
    computes nothing); returns the row of shapes exchanged with the other ranks."""
    unknown = sorted(set(kwargs) - _ATTENTION_KWARGS)
    if unknown:
        raise TypeError(f"{name}: unexpected keyword argument {unknown[0]!r}")
    if layout not in _LAYOUT_DIMS:
        raise ValueError(f"layout: expected one of 'HND', 'NHD', got {layout!r}")
    dims = "[B, L/P, H, D]" if layout == "NHD" else "[B, H, L/P, D]"
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{arg}: expected a 4-D tensor {dims} (layout {layout}), got shape {tuple(x.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for arg, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{arg}: expected the dtype and device of q ({q.dtype}, {q.device}), got ({x.dtype}, {x.device})"
            )
    seq_dim, head_dim = _LAYOUT_DIMS[layout]
    dry = dict(kwargs)
    if isinstance(dry.get("block_mask"), Tensor):
        dry["block_mask"] = dry["block_mask"].new_zeros((1, 1, 0, 0))  # its full-sequence shape is checked later
    empty = [x.narrow(seq_dim, 0, 0) for x in (q, k, v)]
    api.attention(*empty, layout=layout, **dry)
    return [q.size(0), q.size(seq_dim), q.size(head_dim), q.size(3), k.size(seq_dim), k.size(head_dim), k.size(3),
            _DTYPES.index(q.dtype)]  # fmt: skip


def _agree(name: str, local_check: Callable[[], list[int]], group, world: int, device: torch.device):
    """Runs `local_check` and all-gathers its shape row with an error flag (one all-gather of
    9 int64 per rank). A rank whose check failed raises its error; the others raise a
    RuntimeError naming it, so no rank waits in a later collective."""
    error, row = None, [0] * 8
    try:
        row = local_check()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = e
    local = torch.tensor([int(error is not None)] + row, dtype=torch.int64, device=device)
    table = torch.empty(world * local.numel(), dtype=torch.int64, device=device)  # flat: gloo wants 1-D
    dist.all_gather_into_tensor(table, local, group=group)
    rows = table.view(world, local.numel()).tolist()
    if error is not None:
        raise error
    failed = [r for r, x in enumerate(rows) if x[0]]
    if failed:
        raise RuntimeError(
            f"{name}: rank(s) {failed} of the group rejected their arguments (the error naming the argument is "
            f"raised there); nothing was computed"
        )
    return [x[1:] for x in rows]


def _check_same_problem(rows: list[list[int]]) -> None:
    batch, _, heads_q, dim, _, heads_kv, _, dtype = rows[0]
    for r, row in enumerate(rows):
        if row[0] != batch or row[2] != heads_q or row[3] != dim or row[5] != heads_kv or row[7] != dtype:
            raise ValueError(
                f"q, k: expected the same batch size, head counts, head dim and dtype on every rank, got "
                f"(B, Hq, D, Hkv) = {(batch, heads_q, dim, heads_kv)} on rank 0 and {(row[0], row[2], row[3], row[5])} "
                f"on rank {r}"
            )


# ---- Ulysses -----------------------------------------------------------------------------------------


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


def _check_ulysses_shapes(rows: list[list[int]], world: int) -> None:
    """Raises the same ValueError on every rank when the shards cannot form a Ulysses problem."""
    _check_same_problem(rows)
    _, _, heads_q, _, _, heads_kv, _, _ = rows[0]
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

    Requirements: the same B, Hq, Hkv, D and dtype on all ranks; ``Hq % P == 0`` and
    ``Hkv % P == 0``; ``Lq`` and ``Lk`` divisible by ``P`` with equal shards. Every rank first
    checks its arguments (through :func:`sparge.attention` on empty shards), then the ranks
    all-gather one row of 9 int64 (the shard shapes and whether the check passed), so every rank
    raises an error (the same ``ValueError`` for inconsistent shapes) before any data moves.
    Cost of that exchange: one small all-gather per call; on an NCCL-only group it runs on the
    GPU and reading it back waits for the GPU work queued before the call (give the group a CPU
    backend, ``init_process_group("cpu:gloo,cuda:nccl")``, to make it a host round trip).

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
    _require_initialized("ulysses_attention")
    world = dist.get_world_size(group)
    if world == 1:
        _check_local("ulysses_attention", q, k, v, layout, attention_kwargs)
        return api.attention(q, k, v, layout=layout, **attention_kwargs)
    rows = _agree("ulysses_attention", lambda: _check_local("ulysses_attention", q, k, v, layout, attention_kwargs),
                  group, world, _metadata_device(group, q))  # fmt: skip
    _check_ulysses_shapes(rows, world)
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


# ---- ring attention ----------------------------------------------------------------------------------


class RingInfo(NamedTuple):
    """What :func:`ring_attention` did on this rank (``return_ring_info=True``)."""

    block_mask: Tensor  #: bool [B, Hq, nbq_r, nbk]: the K blocks (whole sequence) this rank's Q blocks keep
    shards_attended: int  #: ring steps whose KV shard this rank attended
    shards_skipped: int  #: ring steps not computed: none of this rank's Q blocks keeps a block of the shard
    transfers: int  #: KV shards this rank sent to the next rank
    transfers_skipped: int  #: sends left out: no rank further along the ring keeps a block of the shard


class _Geometry(NamedTuple):
    """The global problem as every rank sees it after the shape exchange."""

    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    q_lens: list[int]
    k_lens: list[int]
    q_offsets: list[int]
    k_offsets: list[int]
    blocks: tuple[int, int]
    causal: bool
    mode: str


def _offsets(lens: list[int]) -> list[int]:
    out, total = [], 0
    for n in lens:
        out.append(total)
        total += n
    return out


def _check_ring_shapes(rows: list[list[int]], kwargs: dict) -> _Geometry:
    """Raises the same ValueError on every rank when the shards cannot form a ring problem."""
    _check_same_problem(rows)
    batch, _, heads_q, dim, _, heads_kv, _, _ = rows[0]
    blocks = tuple(kwargs.get("block_size", (128, 64)))
    causal = bool(kwargs.get("is_causal", False))
    q_lens, k_lens = [row[1] for row in rows], [row[4] for row in rows]
    align_q, align_k = math.lcm(blocks[0], _QUANT_ROWS), math.lcm(blocks[1], _QUANT_ROWS)
    if causal:
        align_q = align_k = math.lcm(align_q, align_k)
        if q_lens != k_lens:
            raise ValueError(
                f"is_causal: ring_attention masks causally only self-attention shards (q and k of the same length "
                f"on every rank), got q shards {q_lens} and k shards {k_lens}; use ulysses_attention for causal "
                f"attention with Lq != Lk"
            )
    for name, lens, align in (("q", q_lens, align_q), ("k", k_lens, align_k)):
        if any(n % align for n in lens[:-1]):
            total = sum(lens)
            even = -(-total // (len(lens) * align)) * align
            raise ValueError(
                f"{name}: expected every sequence shard except the last to hold a multiple of {align} tokens "
                f"(block_size {blocks} and the {_QUANT_ROWS}-row quantization groups must not straddle ranks), got "
                f"shards {lens} (L = {total}); e.g. shard as {min(even, total)} tokens per rank, the rest on the last"
            )
    mode = kwargs.get("mode")
    if mode is None:
        mode = "topk" if kwargs.get("block_mask") is None else "block_mask"
    block_mask = kwargs.get("block_mask")
    if isinstance(block_mask, Tensor):
        expected = (batch, heads_q, -(-sum(q_lens) // blocks[0]), -(-sum(k_lens) // blocks[1]))
        if block_mask.dim() != 4 or any(s not in (e, 1) for s, e in zip(block_mask.shape, expected)):
            raise ValueError(
                f"block_mask: expected [B, Hq, ceil(Lq / {blocks[0]}), ceil(Lk / {blocks[1]})] = {list(expected)} over "
                f"the full sequence (size-1 dimensions broadcast), got {list(block_mask.shape)}"
            )
    return _Geometry(batch, heads_q, heads_kv, dim, q_lens, k_lens, _offsets(q_lens), _offsets(k_lens), blocks,
                     causal, mode)  # fmt: skip


def _global_k_mean(kh: Tensor, len_k: int, group, rank: int, world: int) -> Tensor:
    """fp32 [B, Hkv, D]: the token mean of K over all ranks' shards (kh: this rank's [B, Hkv, L_r, D]).

    CPU: the CPU backend's own arithmetic, a sequential fp32 sum over the tokens in order, carried
    from rank to rank (each rank adds its tokens to the partial sum of the previous one), divided
    by Lk on the last rank and broadcast, so the mean is bit-identical to the single-process one.
    CUDA: the single-GPU kernels sum in an order that depends on their thread layout; the shards'
    sums are taken in fp64 and all-reduced (one all-reduce of B·Hkv·D values)."""
    batch, heads, length, dim = kh.shape
    if len_k == 0:
        return torch.zeros(batch, heads, dim, dtype=torch.float32, device=kh.device)
    if kh.device.type != "cpu":
        sums = kh.sum(dim=2, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return (sums / len_k).to(torch.float32)
    acc = torch.zeros(batch, heads, dim, dtype=torch.float32)
    if rank > 0:
        dist.recv(acc, src=_peer(group, rank - 1), group=group)
    for t in range(length):
        acc.add_(kh[:, :, t])
    if rank < world - 1:
        dist.send(acc, dst=_peer(group, rank + 1), group=group)
    mean = acc / torch.full_like(acc, float(len_k))  # tensor / tensor: the IEEE quotient, as the backend
    if world > 1:
        dist.broadcast(mean, src=_peer(group, world - 1), group=group)
    return mean


def _quantize_v(vh: Tensor, amax: Tensor, pv_precision: str) -> tuple[Tensor, Tensor]:
    """V of this shard in the P·V format with the global per-channel amax (docs/method.md §0):
    ``[B, Hkv, D, ceil(L_r / 64)·64]`` transposed (e4m3 keys in ``v_key_slots`` order) and zero padded,
    and ``v_scale = amax / v_max``."""
    batch, heads, length, dim = vh.shape
    full = torch.full_like(amax, _V_MAX[pv_precision])
    inv = torch.where(amax == 0, 0.0, full / torch.where(amax == 0, 1.0, amax))
    v_scale = amax / full
    dtype = torch.float16 if pv_precision == "fp16" else torch.float8_e4m3fn
    padded = _ops.ceil_div(length, _QUANT_ROWS) * _QUANT_ROWS
    out = torch.zeros(batch, heads, dim, padded, dtype=dtype, device=vh.device)
    slots = _ops.v_key_slots(length, dtype == torch.float8_e4m3fn, vh.device)
    out[..., slots] = (vh.to(torch.float32) * inv.unsqueeze(2)).to(dtype).transpose(-1, -2)
    return out, v_scale


def _quantize_shard(qh: Tensor, kh: Tensor, vh: Tensor, len_k: int, kwargs: dict, group, rank: int, world: int):
    """This rank's shards (HND views) quantized with the global K mean and V amax.

    Returns ``(quantized, k_mean, q_in)``: every buffer of ``quantized`` except ``lse_shift``
    (zeros: the shift is added after the merge) and ``k_mean`` (zeros; the mean is returned
    apart) is this rank's slice of what :func:`sparge.quantize` gives for the whole sequence.
    docs/method.md §0 makes that exact: smoothing is ``k̃ = k − k_mean`` in fp32, so quantizing
    the fp32 ``k̃`` with smoothing off reproduces the INT8 K, its scales, the pooled means,
    self-similarities and spike keys of the smoothed rows (the groups of 64 rows and the
    prediction blocks do not straddle shards); Q quantization does not depend on K; V's scale is
    per channel over all tokens (an all-reduce of the amax), its conversion elementwise.
    ``q_in`` is q as quantized (fp32 when smoothing, for the LSE shift)."""
    batch, heads_kv, _, dim = kh.shape
    smooth_k = bool(kwargs.get("smooth_k", True))
    pv_precision = kwargs.get("pv_precision", "fp8")
    if smooth_k:
        k_mean = _global_k_mean(kh, len_k, group, rank, world)
        k_in, q_in = kh.to(torch.float32) - k_mean.unsqueeze(2), qh.to(torch.float32)
    else:
        k_mean = torch.zeros(batch, heads_kv, dim, dtype=torch.float32, device=kh.device)
        k_in, q_in = kh, qh
    if vh.size(2):
        v_amax = vh.to(torch.float32).abs().amax(dim=2)
    else:
        v_amax = torch.zeros(batch, heads_kv, dim, dtype=torch.float32, device=vh.device)
    if world > 1:
        dist.all_reduce(v_amax, op=dist.ReduceOp.MAX, group=group)
    quantized = api.quantize(q_in, k_in, k_in, scale=kwargs.get("scale"), layout="HND",
                             block_size=tuple(kwargs.get("block_size", (128, 64))), smooth_k=False,
                             qk_quant_gran=kwargs.get("qk_quant_gran", "per_thread"), pv_precision=pv_precision)
    v_q, v_scale = _quantize_v(vh, v_amax, pv_precision)
    return quantized._replace(v=v_q, v_scale=v_scale), k_mean, q_in


def _gather_k_stats(local: api.QuantizedQKV, geo: _Geometry, spikes: bool, group, world: int):
    """(k_pool, k_sim, k_spikes) of every K block of the sequence: one all-gather of this rank's
    block statistics, padded to the largest shard (gloo and NCCL want equal sizes)."""
    dim = geo.head_dim
    parts = [local.k_pool, local.k_sim.unsqueeze(-1)] + ([local.k_spikes.flatten(-2)] if spikes else [])
    mine = torch.cat(parts, dim=-1)  # [B, Hkv, nbk_r, W]
    counts = [_ops.ceil_div(n, geo.blocks[1]) for n in geo.k_lens]
    if world > 1:
        most = max(counts)
        mine = F.pad(mine, (0, 0, 0, most - mine.size(2))).contiguous()
        table = torch.empty(world * mine.numel(), dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(table, mine.view(-1), group=group)
        table = table.view(world, *mine.shape)
        mine = torch.cat([table[s, :, :, : counts[s]] for s in range(world)], dim=2)
    k_pool = mine[..., :dim].contiguous()
    k_sim = mine[..., dim].contiguous()
    if spikes:
        k_spikes = mine[..., dim + 1 :].unflatten(-1, (_ops._C.SPIKE_KEYS, dim)).contiguous()
    else:
        k_spikes = torch.zeros(*k_pool.shape[:3], _ops._C.SPIKE_KEYS, dim, dtype=torch.float32, device=k_pool.device)
    return k_pool, k_sim, k_spikes


def _shard_index(kept: Tensor, first: int, count: int) -> tuple[Tensor, Tensor]:
    """index / count (sparge.attend's format) of the kept blocks [first, first + count) of `kept`,
    renumbered from 0."""
    sub = kept[..., first : first + count]
    cols = torch.arange(count, dtype=torch.int32, device=kept.device)
    ordered = torch.where(sub, cols, count).sort(dim=-1).values  # kept columns first, ascending
    index = torch.where(ordered == count, -1, ordered).to(torch.int32).contiguous()
    return index, sub.sum(dim=-1, dtype=torch.int32)


def _merge(o_acc: Tensor, lse_acc: Tensor, o: Tensor, lse: Tensor) -> None:
    """o_acc, lse_acc <- the softmax-weighted merge of two partial attentions (in place; rows
    with lse = -inf contribute nothing)."""
    top = torch.maximum(lse_acc, lse)
    top = torch.where(torch.isneginf(top), 0.0, top)
    w_acc, w = torch.exp(lse_acc - top), torch.exp(lse - top)
    total = w_acc + w
    inv = torch.where(total > 0, 1.0 / total, 0.0)
    o_acc.mul_((w_acc * inv).unsqueeze(-1)).add_(o * (w * inv).unsqueeze(-1))
    lse_acc.copy_(top + torch.log(total))


def _empty_k_stats(geo: _Geometry, nbk: int, device) -> dict:
    """K block statistics of the right shapes for sparge.attend, which does not read them."""
    shape = (geo.batch, geo.heads_kv, nbk)
    f32 = torch.float32
    return dict(k_pool=torch.empty(*shape, geo.head_dim, dtype=f32, device=device),
                k_sim=torch.empty(*shape, dtype=f32, device=device),
                k_spikes=torch.empty(*shape, _ops._C.SPIKE_KEYS, geo.head_dim, dtype=f32, device=device))  # fmt: skip


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, layout: str = "NHD", **attention_kwargs):
    """Sequence-parallel :func:`sparge.attention` by ring attention with global block prediction.

    Call it on every rank of ``group`` (default: WORLD, which must be initialized) with that
    rank's contiguous sequence shard. See the module docstring for the algorithm.

    Args:
        q: ``[B, Lq_r, Hq, D]`` (``layout="NHD"``) or ``[B, Hq, Lq_r, D]`` (``"HND"``): rank
            ``r``'s query tokens, all heads.
        k, v: ``[B, Lk_r, Hkv, D]`` or ``[B, Hkv, Lk_r, D]``: rank ``r``'s key / value tokens.
        group: the process group (``None`` for WORLD).
        layout: ``"NHD"`` (default here) or ``"HND"``.
        **attention_kwargs: the keyword arguments of :func:`sparge.attention`, with the meaning
            they have for the full tensors (``is_causal`` by global positions; per-head values for
            all ``Hq`` heads; ``block_mask`` over the full sequence, ``[B, Hq, ceil(Lq / block_q),
            ceil(Lk / block_k)]``, size-1 dimensions broadcast), plus ``return_ring_info=True`` to
            also return a :class:`RingInfo` (this rank's rows of the block mask, the shards it
            computed and skipped, the transfers it made and left out).

    Requirements: the same B, Hq, Hkv, D and dtype on all ranks; every Q shard except the last a
    multiple of ``lcm(block_q, 64)`` tokens and every K shard except the last of
    ``lcm(block_k, 64)`` (so no prediction block or quantization group straddles two ranks; the
    last shard holds the rest, so any total length works when sharded that way); with
    ``is_causal``, Q and K shards of equal lengths (self-attention) and a multiple of
    ``lcm(block_q, block_k, 64)``. Errors are raised on every rank before any data moves (one
    all-gather of 9 int64, see :func:`ulysses_attention` for what it costs).

    Host synchronizations: the shape exchange, and one after the prediction to learn which shards
    each rank needs (an all-gather of ``P`` flags): on CUDA it waits for the prediction. Memory
    per rank: the local shards, two quantized KV shards in flight, fp32 partial outputs, and for
    the prediction uninitialized INT8 / V buffers of the visible sequence length (the stage API
    wants the full QuantizedQKV; :func:`sparge.predict` reads only the statistics).

    Returns:
        ``o`` (this rank's rows, the layout and shape of ``q``), or a tuple with ``lse`` (fp32
        ``[B, Hq, Lq_r]``), ``sparsity`` (global ``1 - Σkept / Σallowed``, all-reduced, the same
        0-d tensor on every rank) and ``RingInfo``, in that order, as asked.
    """
    _require_initialized("ring_attention")
    kwargs = dict(attention_kwargs)
    return_info = bool(kwargs.pop("return_ring_info", False))
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = _agree("ring_attention", lambda: _check_local("ring_attention", q, k, v, layout, kwargs), group, world,
                  _metadata_device(group, q))  # fmt: skip
    geo = _check_ring_shapes(rows, kwargs)
    qh, kh, vh = (x if layout == "HND" else x.transpose(1, 2) for x in (q, k, v))
    device = q.device
    batch, heads_q, heads_kv, dim = geo.batch, geo.heads_q, geo.heads_kv, geo.head_dim
    block_q, block_k = geo.blocks
    len_k = sum(geo.k_lens)
    len_q_r = geo.q_lens[rank]
    smooth_k = bool(kwargs.get("smooth_k", True))
    scale = kwargs.get("scale")
    granularity = kwargs.get("qk_quant_gran", "per_thread")
    gran_code = api._GRANULARITIES[granularity]
    output_dtype = kwargs.get("output_dtype") or q.dtype

    # 1. This rank's shards quantized as the rows of the single-process QuantizedQKV.
    local, k_mean, q_in = _quantize_shard(qh, kh, vh, len_k, kwargs, group, rank, world)
    v_dtype = local.v.dtype
    lse_shift = None  # scale · (q · k_mean), the LSE removed by smoothing (docs/method.md §0)
    if smooth_k and kwargs.get("return_lse"):
        sm_scale = dim**-0.5 if scale is None else float(scale)
        mean_q = k_mean.repeat_interleave(heads_q // heads_kv, dim=1)
        lse_shift = torch.einsum("bhld,bhd->bhl", q_in, mean_q) * sm_scale
    del q_in

    # 2. Global prediction for this rank's Q blocks (causal: against the K blocks up to its shard,
    # bottom-right aligned on that prefix, which is the global top-left mask).
    len_k_pred = geo.q_offsets[rank] + len_q_r if geo.causal else len_k
    nbk, nbk_pred = _ops.ceil_div(len_k, block_k), _ops.ceil_div(len_k_pred, block_k)
    if geo.mode in ("topk", "cdf"):
        spikes = kwargs.get("block_score", _PREDICT_DEFAULT_SCORE) != "mean"  # "spikes", or "auto" may pick it
        k_pool, k_sim, k_spikes = _gather_k_stats(local, geo, spikes, group, world)
        k_pool, k_sim, k_spikes = (x[:, :, :nbk_pred].contiguous() for x in (k_pool, k_sim, k_spikes))
    else:
        zeros = _empty_k_stats(geo, nbk_pred, device)
        k_pool, k_sim, k_spikes = (zeros[n].zero_() for n in ("k_pool", "k_sim", "k_spikes"))
    predict_in = local._replace(
        k=torch.empty(batch, heads_kv, len_k_pred, dim, dtype=torch.int8, device=device),
        k_scale=torch.empty(batch, heads_kv, _ops.k_scale_groups(len_k_pred, gran_code), dtype=torch.float32,
                            device=device),
        v=torch.empty(batch, heads_kv, dim, _ops.ceil_div(len_k_pred, _QUANT_ROWS) * _QUANT_ROWS, dtype=v_dtype,
                      device=device),  # fmt: skip
        k_pool=k_pool, k_sim=k_sim, k_spikes=k_spikes)
    predict_kwargs = {n: kwargs[n] for n in _SELECT_KWARGS if n in kwargs}
    block_mask = kwargs.get("block_mask")
    if block_mask is not None:
        first = geo.q_offsets[rank] // block_q
        if block_mask.size(2) != 1:
            block_mask = block_mask[:, :, first : first + _ops.ceil_div(len_q_r, block_q)]
        if block_mask.size(3) != 1:
            block_mask = block_mask[..., :nbk_pred]
    pred = api.predict(predict_in, mode=geo.mode, is_causal=geo.causal, causal_alignment="bottom_right",
                       block_mask=block_mask, **predict_kwargs)  # fmt: skip
    del predict_in
    kept = pred.mask  # [B, Hq, nbq_r, nbk_pred]

    # 3. Which shards each rank keeps a block of: need[r][s] (one all-gather of P flags, read on the host).
    first_block = [off // block_k for off in geo.k_offsets]
    shard_blocks = [_ops.ceil_div(n, block_k) for n in geo.k_lens]
    column_kept = kept.flatten(0, 2).any(dim=0) if kept.numel() else kept.new_zeros(nbk_pred)
    meta = _metadata_device(group, q)
    wanted = torch.stack([column_kept[first_block[s] : first_block[s] + shard_blocks[s]].any()
                          for s in range(world)]).to(device=meta, dtype=torch.uint8)  # fmt: skip
    table = torch.empty(world * world, dtype=torch.uint8, device=meta)
    if world > 1:
        dist.all_gather_into_tensor(table, wanted, group=group)
    else:
        table.copy_(wanted)
    need = [[bool(x) for x in row] for row in table.view(world, world).tolist()]

    # 4. The ring: at step t this rank holds KV shard (rank - t) mod P.
    o_acc = torch.zeros(batch, heads_q, len_q_r, dim, dtype=torch.float32, device=device)
    lse_acc = torch.full((batch, heads_q, len_q_r), -math.inf, dtype=torch.float32, device=device)
    attend_kwargs = {"pvthreshd": kwargs["pvthreshd"]} if "pvthreshd" in kwargs else {}
    wire_v_dtype = torch.uint8 if v_dtype.itemsize == 1 else v_dtype  # fp8 travels as bytes (gloo has no fp8)
    current = (local.k_scale, local.v.view(wire_v_dtype), local.k)
    nxt = _peer(group, (rank + 1) % world)
    prev = _peer(group, (rank - 1) % world)
    attended = skipped = transfers = transfers_skipped = 0
    for t in range(world):
        shard = (rank - t) % world
        works, incoming = [], None
        if t < world - 1:
            onward = range(1, world - t)
            if any(need[(rank + u) % world][shard] for u in onward):
                works += [dist.P2POp(dist.isend, x, nxt, group) for x in current]
                transfers += 1
            else:
                transfers_skipped += 1
            source = (rank - t - 1) % world
            if any(need[(rank - 1 + u) % world][source] for u in onward):
                n_k = geo.k_lens[source]
                incoming = (torch.empty(batch, heads_kv, _ops.k_scale_groups(n_k, gran_code), dtype=torch.float32,
                                        device=device),
                            torch.empty(batch, heads_kv, dim, _ops.ceil_div(n_k, _QUANT_ROWS) * _QUANT_ROWS,
                                        dtype=wire_v_dtype, device=device),
                            torch.empty(batch, heads_kv, n_k, dim, dtype=torch.int8, device=device))  # fmt: skip
                works += [dist.P2POp(dist.irecv, x, prev, group) for x in incoming]
            works = dist.batch_isend_irecv(works) if works else []
        if need[rank][shard]:
            k_scale_s, v_s, k_s = current
            shard_in = local._replace(k=k_s, k_scale=k_scale_s, v=v_s.view(v_dtype),
                                      **_empty_k_stats(geo, shard_blocks[shard], device))  # fmt: skip
            index, count = _shard_index(kept, first_block[shard], shard_blocks[shard])
            o_s, lse_s = api.attend(shard_in, index, count, is_causal=geo.causal and shard == rank,
                                    causal_alignment="top_left", layout="HND", output_dtype=torch.float32,
                                    return_lse=True, **attend_kwargs)  # fmt: skip
            _merge(o_acc, lse_acc, o_s, lse_s)
            attended += 1
        else:
            skipped += 1
        for work in works:
            work.wait()
        current = incoming

    # 5. This rank's rows: LSE back to the un-smoothed scores, output in the caller's layout and dtype.
    o = o_acc.to(output_dtype)
    o = o.transpose(1, 2).contiguous() if layout == "NHD" else o
    result = (o,)
    if kwargs.get("return_lse"):
        result += (lse_acc if lse_shift is None else lse_acc + lse_shift,)
    if kwargs.get("return_sparsity"):
        stats = pred.stats.clone()
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        result += (api.block_sparsity(stats),)
    if return_info:
        mask = F.pad(kept, (0, nbk - nbk_pred))
        result += (RingInfo(mask, attended, skipped, transfers, transfers_skipped),)
    return result[0] if len(result) == 1 else result


# ---- compat entry points -----------------------------------------------------------------------------

_ROUTE: contextvars.ContextVar = contextvars.ContextVar("sparge_distributed_route", default=None)
_COMPAT_ROUTED = None
_UNROUTABLE = ("masked_attention", "attention_varlen")  # compat paths that cannot take sequence shards


def _routed_attention(q, k, v, *, layout: str = "HND", **kwargs):
    """sparge.attention as seen by the routed copy of sparge.compat: the distributed function of
    the active :func:`sequence_parallel` call."""
    function, group = _ROUTE.get()
    return function(q, k, v, group=group, layout=layout, **kwargs)


def _unroutable(name: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(
            f"sequence_parallel: this call needs sparge.{name} (an attn_mask or packed sequences), which does not "
            f"run on sequence shards; call ring_attention or ulysses_attention directly"
        )

    return refuse


def _compat_routed():
    """A private copy of the sparge.compat module whose calls to sparge.attention go to _routed_attention
    (the public module is left untouched, so other callers and threads are not affected)."""
    global _COMPAT_ROUTED
    if _COMPAT_ROUTED is None:
        spec = importlib.util.find_spec("sparge.compat")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if getattr(module, "attention", None) is not api.attention:
            raise NotImplementedError(
                "sequence_parallel: sparge.compat no longer calls sparge.attention through its module-level name "
                "'attention', so its calls cannot be routed; call ring_attention or ulysses_attention directly"
            )
        module.attention = _routed_attention
        for name in _UNROUTABLE:
            if hasattr(module, name):
                setattr(module, name, _unroutable(name))
        _COMPAT_ROUTED = module
    return _COMPAT_ROUTED


def sequence_parallel(function, q, k, v, *args, group=None, method: str = "ring", **kwargs):
    """Runs an entry point of :mod:`sparge.compat` on sequence shards: its call to
    :func:`sparge.attention` goes to :func:`ring_attention` (``method="ring"``) or
    :func:`ulysses_attention` (``"ulysses"``) over ``group``::

        from sparge.compat import spas_sage2_attn_meansim_topk_cuda
        o = sequence_parallel(spas_sage2_attn_meansim_topk_cuda, q, k, v, is_causal=True, topk=0.5,
                              tensor_layout="NHD", group=pg)

    The arguments after ``function`` are those of the compat function, with their meaning for the
    whole sequence, and q, k, v are this rank's shards in its ``tensor_layout`` (default
    ``"HND"``); the compat defaults, checks and return conventions apply. Not routable (a
    ``NotImplementedError``): a key-padding ``attn_mask`` and ``sageattn_varlen``; the
    ``mask_id`` of ``block_sparse_sage2_attn_cuda`` / ``sparse_sageattn`` is checked by compat
    against the shard's shape, so only ``mask_id=None`` (dense) works there.
    """
    if method not in ("ring", "ulysses"):
        raise ValueError(f"method: expected 'ring' or 'ulysses', got {method!r}")
    from . import compat

    name = getattr(function, "__name__", None)
    if name not in compat.__all__ or getattr(compat, name) is not function or not callable(function):
        names = ", ".join(n for n in compat.__all__ if callable(getattr(compat, n)))
        raise TypeError(f"function: expected an entry point of sparge.compat ({names}), got {function!r}")
    routed = getattr(_compat_routed(), name)
    token = _ROUTE.set((ring_attention if method == "ring" else ulysses_attention, group))
    try:
        return routed(q, k, v, *args, **kwargs)
    finally:
        _ROUTE.reset(token)
