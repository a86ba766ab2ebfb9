"""Sequence-parallel sparge: ring and Ulysses attention on P processes against the one-device op.

Run under torchrun, one process per GPU::

    torchrun --nproc-per-node 2 bench/distributed_bench.py                 # L=131072, H=16, D=128, topk 0.5
    torchrun --nproc-per-node 2 bench/distributed_bench.py --causal --len 65536
    torchrun --standalone --nproc-per-node 2 bench/distributed_bench.py --device cpu --len 1024 --heads 2 --head-dim 64

Every rank builds the same full q, k, v (seeded normal noise, with ``simthreshd1=-1`` so that the
TopK work is a fixed fraction of the blocks whatever the data) and takes its contiguous sequence
shard. Times per call (the slowest rank's, after a barrier; CUDA events on GPUs, the wall clock
on the CPU):

* ``1 device``: :func:`sparge.attention` on the full tensors on rank 0's device,
* ``ring`` / ``ulysses``: :func:`sparge.distributed.ring_attention` /
  :func:`~sparge.distributed.ulysses_attention` on P devices,
* ``comm alone``: the same communication without the attention: for the ring, its P - 1
  transfers of a quantized KV shard (INT8 K + scales, FP8 V) with ``batch_isend_irecv`` plus
  the all-gather of the K block statistics (pooled means, self-similarities and, unless
  ``--block-score mean``, spike keys); for Ulysses, its all-to-alls of q, k, v and of the
  output. ``comm share`` is that time over the call's time (the ring overlaps its transfers
  with attention, so for it the share is an upper bound of the exposed communication).

The table goes to stdout on rank 0 (``--json FILE`` also writes it as JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import sparge
from sparge import _ops
from sparge.distributed import ring_attention, ulysses_attention

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--len", type=int, default=131072, help="total sequence length L (default 131072)")
    p.add_argument("--heads", type=int, default=16, help="query heads H (default 16)")
    p.add_argument("--heads-kv", type=int, default=None, help="key/value heads (default: H)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim D (default 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--topk", type=float, default=0.5, help="TopK fraction (default 0.5)")
    p.add_argument("--block-score", choices=("auto", "mean", "spikes"), default=None,
                   help="block score of the prediction (default: sparge's default)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5, help="timed calls per method (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--skip-single", action="store_true", help="do not time the one-device op")
    p.add_argument("--json", default=None, help="also write the results to this file (rank 0)")
    return p.parse_args(argv)


class _Timer:
    """Seconds per call of fn() on this rank, then the slowest rank's (all ranks call it)."""

    def __init__(self, device: torch.device, group_device: torch.device):
        self.device, self.group_device = device, group_device

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, iters: int, warmup: int, collective: bool = True) -> float:
        for _ in range(warmup):
            fn()
        self._sync()
        if collective:
            dist.barrier()
        if self.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            stop.record()
            self._sync()
            seconds = start.elapsed_time(stop) / 1000.0 / iters
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            seconds = (time.perf_counter() - t0) / iters
        if not collective:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.group_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def _ring_comm(shapes, world: int, rank: int, device, stats_numel: int):
    """The ring's communication alone: P - 1 transfers of a quantized KV shard, and the stats all-gather."""
    send = [torch.ones(s, dtype=d, device=device) for s, d in shapes]
    recv = [torch.empty(s, dtype=d, device=device) for s, d in shapes]
    stats = torch.ones(stats_numel, dtype=torch.float32, device=device)
    gathered = torch.empty(world * stats_numel, dtype=torch.float32, device=device)
    nxt, prev = (rank + 1) % world, (rank - 1) % world

    def run():
        dist.all_gather_into_tensor(gathered, stats)
        cur, nxt_buf = send, recv
        for _ in range(world - 1):
            ops = [dist.P2POp(dist.isend, x, nxt) for x in cur] + [dist.P2POp(dist.irecv, x, prev) for x in nxt_buf]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            cur, nxt_buf = nxt_buf, cur

    return run


def _ulysses_comm(q_shard: torch.Tensor, k_shard: torch.Tensor, o_shard: torch.Tensor):
    """Ulysses' all-to-alls alone: q, k, v in (stacked when they have one shape) and o back."""
    qkv = torch.stack((q_shard, k_shard, k_shard)) if q_shard.shape == k_shard.shape else None
    kv = torch.stack((k_shard, k_shard)) if qkv is None else None
    bufs = [x for x in (qkv, kv, q_shard if qkv is None else None, o_shard) if x is not None]
    outs = [torch.empty_like(x) for x in bufs]

    def run():
        for src, dst in zip(bufs, outs):
            dist.all_to_all_single(dst, src)

    return run


def main(argv=None) -> int:
    args = _parse(argv)
    if "RANK" not in os.environ:
        print("run this under torchrun (torchrun --nproc-per-node P bench/distributed_bench.py)", file=sys.stderr)
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=datetime.timedelta(minutes=10), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    try:
        return _run(args, device)
    finally:
        dist.destroy_process_group()


def _run(args, device: torch.device) -> int:
    world, rank = dist.get_world_size(), dist.get_rank()
    batch, heads, dim, length = args.batch, args.heads, args.head_dim, args.len
    heads_kv = args.heads_kv or heads
    dtype = _DTYPES[args.dtype]
    align = 128  # lcm(block_q, block_k, 64) at the default block size
    if length % (world * align):
        print(f"--len: expected a multiple of P · {align} = {world * align}, got {length}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=device).manual_seed(1234)
    q = torch.randn(batch, length, heads, dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(batch, length, heads_kv, dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, length, heads_kv, dim, generator=gen, device=device, dtype=dtype)
    shard = length // world
    qs, ks, vs = (x[:, rank * shard : (rank + 1) * shard].contiguous() for x in (q, k, v))
    # simthreshd1 -1: noise rows are as unalike as random vectors, which the default (0.02) keeps
    # dense; the benchmark wants the fixed TopK fraction.
    settings = dict(mode="topk", topk=args.topk, simthreshd1=-1.0, is_causal=args.causal)
    if args.block_score:
        settings["block_score"] = args.block_score
    group_device = torch.device("cpu")
    timer = _Timer(device, group_device)
    rows = []

    single = None
    if not args.skip_single:
        if rank == 0:
            single = timer(lambda: sparge.attention(q, k, v, layout="NHD", **settings), args.iters, args.warmup,
                           collective=False)  # fmt: skip
        dist.barrier()
        rows.append(dict(method="1 device", devices=1, ms=single * 1e3 if single else None))
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()

    ring = timer(lambda: ring_attention(qs, ks, vs, layout="NHD", **settings), args.iters, args.warmup)
    _, info = ring_attention(qs, ks, vs, layout="NHD", return_ring_info=True, **settings)
    counts = torch.tensor([info.shards_attended, info.shards_skipped, info.transfers, info.transfers_skipped],
                          dtype=torch.int64)  # fmt: skip
    table = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(table, counts)
    shapes = [((batch, heads_kv, _ops.k_scale_groups(shard, _ops.GRAN_PER_THREAD)), torch.float32),
              ((batch, heads_kv, dim, shard), torch.uint8), ((batch, heads_kv, shard, dim), torch.int8)]  # fmt: skip
    per_block = dim + 1 if args.block_score == "mean" else 3 * dim + 1  # pooled mean, sim (+ 2 spike keys)
    stats_numel = batch * heads_kv * (shard // 64) * per_block
    ring_comm = timer(_ring_comm(shapes, world, rank, device, stats_numel), args.iters, args.warmup)
    rows.append(dict(method="ring", devices=world, ms=ring * 1e3, comm_ms=ring_comm * 1e3))

    if heads % world == 0 and heads_kv % world == 0:
        uly = timer(lambda: ulysses_attention(qs, ks, vs, layout="NHD", **settings), args.iters, args.warmup)
        uly_comm = timer(_ulysses_comm(qs, ks, torch.empty_like(qs)), args.iters, args.warmup)
        rows.append(dict(method="ulysses", devices=world, ms=uly * 1e3, comm_ms=uly_comm * 1e3))
    else:
        rows.append(dict(method=f"ulysses (needs H and Hkv divisible by {world})", devices=world, ms=None))

    if rank == 0:
        for row in rows:
            row["speedup"] = single / (row["ms"] / 1e3) if single and row.get("ms") else None
            row["comm_share"] = row["comm_ms"] / row["ms"] if "comm_ms" in row else None
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"# sparge sequence parallel: P={world} ({name}), B={batch} L={length} H={heads} Hkv={heads_kv} "
              f"D={dim} {args.dtype} topk={args.topk} causal={args.causal}, "
              f"{args.iters} calls after {args.warmup} warm-up")  # fmt: skip
        print("| method | devices | ms / call | speed-up vs 1 device | comm alone (ms) | comm share |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            cells = [row["method"], str(row["devices"]), _fmt(row["ms"], "{:.2f}"), _fmt(row["speedup"], "{:.2f}x"),
                     _fmt(row.get("comm_ms"), "{:.2f}"), _fmt(row.get("comm_share"), "{:.1%}")]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        print("ring shards per rank (attended, skipped, transfers, transfers skipped): "
              + ", ".join(f"rank {r}: {tuple(t.tolist())}" for r, t in enumerate(table)))  # fmt: skip
        if args.json:
            config = {n: getattr(args, n) for n in ("len", "heads", "head_dim", "batch", "topk", "causal", "dtype")}
            with open(args.json, "w") as f:
                json.dump(dict(config=dict(config, world=world, device=name), results=rows), f, indent=2)
    return 0


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


if __name__ == "__main__":
    sys.exit(main())
