"""sparge.distributed.ulysses_attention on CPU with gloo: 2 and 4 spawned processes, each with its
sequence shard, against the single-process sparge.attention on the full tensors.

Each head sees the whole sequence on its rank, so the selection and the arithmetic are those of
the single-process op: outputs, LSE and sparsity must be bit-identical. One spawn per world size
runs every case (process start-up dominates the run time) and writes its results to a file.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparge
from sparge.distributed import ulysses_attention
from sparge.testing import structured_qkv

from helpers import assert_equal

B, H, L, D = 1, 8, 512, 64
_SEQ_DIM = {"NHD": 1, "HND": 2}


def _case(name, heads_q=H, heads_kv=H, layout="NHD", len_k=None, seed=0, **kwargs):
    return dict(name=name, heads_q=heads_q, heads_kv=heads_kv, layout=layout, len_k=len_k, seed=seed,
                kwargs=dict(return_lse=True, **kwargs))  # fmt: skip


CASES = [
    _case(f"{mode}-{layout}-{'causal' if causal else 'full'}", layout=layout, seed=i, mode=mode, is_causal=causal,
          **({"topk": 0.5} if mode == "topk" else {}))  # fmt: skip
    for i, (mode, layout, causal) in enumerate(
        (m, lay, c) for m in ("dense", "topk") for lay in ("NHD", "HND") for c in (False, True)
    )
] + [
    _case(f"gqa-topk-{layout}-{'causal' if causal else 'full'}", heads_kv=4, layout=layout, seed=20 + i,
          mode="topk", topk=0.5, is_causal=causal)  # fmt: skip
    for i, (layout, causal) in enumerate((lay, c) for lay in ("NHD", "HND") for c in (False, True))
] + [
    _case("sparsity-topk-NHD-causal", heads_kv=4, seed=30, mode="topk", topk=0.5, is_causal=True,
          return_sparsity=True),  # fmt: skip
    _case("sparsity-cdf-HND", layout="HND", seed=31, mode="cdf", cdfthreshd=0.9, return_sparsity=True),
    _case("per-head-topk-HND", layout="HND", seed=32, mode="topk", topk=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
          pvthreshd=torch.linspace(2.0, 16.0, H), return_sparsity=True),  # fmt: skip
    _case("block-mask-NHD", seed=33, block_mask=torch.rand(B, H, L // 128, L // 64,
                                                           generator=torch.Generator().manual_seed(5)) < 0.4),  # fmt: skip
    _case("cross-lk256-NHD", heads_kv=4, len_k=256, seed=34, mode="topk", topk=0.3),
]
CASES_BY_NAME = {c["name"]: c for c in CASES}


def _inputs(case):
    return structured_qkv(B, case["heads_q"], case["heads_kv"], L, case["len_k"], D, seed=case["seed"],
                          layout=case["layout"])  # fmt: skip


def _shard(x, layout, rank, world):
    return x.tensor_split(world, dim=_SEQ_DIM[layout])[rank]


# Invalid requests: (name, heads_q, heads_kv, len_q, the argument the error must name).
ERRORS = {
    2: [("heads_q", 3, 3, 512, "q: "), ("heads_kv", 6, 3, 512, "k: "), ("len", 8, 8, 511, "q: ")],
    4: [("heads_q", 6, 6, 512, "q: "), ("heads_kv", 8, 2, 512, "k: "), ("len", 8, 8, 510, "q: ")],
}


def _worker(rank, world, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        results = {}
        for case in CASES:
            q, k, v = (_shard(x, case["layout"], rank, world) for x in _inputs(case))
            out = ulysses_attention(q, k, v, layout=case["layout"], **case["kwargs"])
            results[case["name"]] = tuple(out)
        errors = {}
        for name, hq, hkv, lq, _ in ERRORS[world]:
            q, k, v = structured_qkv(B, hq, hkv, lq, None, D, seed=7, layout="NHD")
            q, k, v = (_shard(x, "NHD", rank, world) for x in (q, k, v))
            try:
                ulysses_attention(q, k, v, layout="NHD", topk=0.5)
                errors[name] = None
            except Exception as e:  # noqa: BLE001 - recorded and checked by the parent
                errors[name] = (type(e).__name__, str(e))
        # The group still works after the errors (every rank raised before any all-to-all).
        case = CASES[0]
        q, k, v = (_shard(x, case["layout"], rank, world) for x in _inputs(case))
        results["after-errors"] = tuple(ulysses_attention(q, k, v, layout=case["layout"], **case["kwargs"]))
        torch.save({"results": results, "errors": errors}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P{p}")
def run(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"ulysses{world}")
    mp.spawn(_worker, args=(world, str(out_dir / "store"), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


_REFERENCES = {}


def _reference(name):
    if name not in _REFERENCES:
        case = CASES_BY_NAME[name]
        out = sparge.attention(*_inputs(case), layout=case["layout"], **case["kwargs"])
        _REFERENCES[name] = tuple(out)
    return _REFERENCES[name]


@pytest.mark.parametrize("name", list(CASES_BY_NAME) + ["after-errors"])
def test_matches_single_process(run, name):
    world, ranks = run
    case = CASES_BY_NAME.get(name, CASES[0])
    ref = _reference(case["name"])
    outs = [r["results"][name] for r in ranks]
    ctx = f"{name}, P={world}"
    seq = _SEQ_DIM[case["layout"]]
    for r, out in enumerate(outs):
        assert len(out) == len(ref), ctx
        expected_rows = ref[0].tensor_split(world, dim=seq)[r]
        assert out[0].shape == expected_rows.shape, f"{ctx}, rank {r}: o shape {tuple(out[0].shape)}"
        assert out[1].shape == ref[1].tensor_split(world, dim=2)[r].shape, f"{ctx}, rank {r}: lse shape"
    assert_equal(torch.cat([o[0] for o in outs], dim=seq), ref[0], f"{ctx}: o")
    assert_equal(torch.cat([o[1] for o in outs], dim=2), ref[1], f"{ctx}: lse")
    if case["kwargs"].get("return_sparsity"):
        for r, out in enumerate(outs):
            assert_equal(out[2], ref[2], f"{ctx}, rank {r}: sparsity (global 1 - Σkept / Σallowed)")
        assert 0.0 < float(ref[2]) < 1.0, f"{ctx}: sparsity {float(ref[2])} (the case should be sparse)"


@pytest.mark.parametrize("error", ["heads_q", "heads_kv", "len"])
def test_errors_on_every_rank(run, error):
    world, ranks = run
    _, hq, hkv, lq, prefix = next(e for e in ERRORS[world] if e[0] == error)
    for r, result in enumerate(ranks):
        got = result["errors"][error]
        assert got is not None, f"P={world}, rank {r}: no error for Hq={hq}, Hkv={hkv}, L={lq}"
        kind, message = got
        assert kind == "ValueError", f"P={world}, rank {r}: {kind}: {message}"
        assert message.startswith(prefix), f"P={world}, rank {r}: {message}"
        wanted = {"heads_q": f"Hq = {hq}", "heads_kv": f"Hkv = {hkv}", "len": f"L = {lq}"}[error]
        assert wanted in message and f"world size {world}" in message, f"P={world}, rank {r}: {message}"


def test_world_of_one_and_uninitialized(tmp_path):
    q, k, v = structured_qkv(B, 2, 2, 256, None, D, seed=3, layout="NHD")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_attention(q, k, v)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert_equal(ulysses_attention(q, k, v, topk=0.5), sparge.attention(q, k, v, layout="NHD", topk=0.5), "P=1")
        with pytest.raises(TypeError, match="unexpected keyword argument 'topkk'"):
            ulysses_attention(q, k, v, topkk=0.5)
    finally:
        dist.destroy_process_group()
