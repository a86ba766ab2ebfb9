"""The eager fast path of sparge.attention (_C.attention_eager, src/python/eager.cpp): taken for plain
eager tensors and common arguments only, bit-identical to the registered op, and never the source of
an error."""

from __future__ import annotations

import inspect
import math
import re
import sys

import numpy as np
import pytest
import torch

import sparge
from helpers import assert_equal
from sparge import _C, _ops, api
from sparge.testing import structured_qkv


@pytest.fixture
def general_path_calls(monkeypatch):
    """The list of calls that reached the general path (api._attention_parts)."""
    calls = []
    real = api._attention_parts

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "_attention_parts", spy)
    return calls


def _via_registered_op(monkeypatch, fn):
    """fn() with every attention call sent through the dispatcher (torch.ops.sparge.attention)."""
    with monkeypatch.context() as m:
        m.setattr(_C, "attention_eager", lambda *args: None)
        m.setattr(_ops, "is_plain_eager", lambda q, k, v: False)
        return fn()


@pytest.fixture
def eager_results(monkeypatch):
    """The list of what each _C.attention_eager call returned (None where it did not take the call)."""
    results = []
    real = _C.attention_eager
    monkeypatch.setattr(_C, "attention_eager", lambda *args: results.append(real(*args)) or results[-1])
    return results


CASES = [
    dict(),
    dict(layout="NHD", is_causal=True),
    dict(mode="cdf", cdfthreshd=0.9, is_causal=True, causal_alignment="bottom_right"),
    dict(mode="dense", block_size=(64, 128), output_dtype=torch.float32, scale=0.1),
    dict(topk=0.3, block_score="mean", attention_sink=True, smooth_k=False, qk_quant_gran="per_warp"),
    dict(pv_precision="fp16", pvthreshd=math.inf, cdf_sharpen=False, return_lse=True),
    dict(return_lse=True, return_sparsity=True, layout="NHD"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(kw) or "defaults")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fast_path_matches_registered_op_bit_exactly(monkeypatch, general_path_calls, seed, kwargs, dtype):
    layout = kwargs.get("layout", "HND")
    q, k, v = structured_qkv(2, 4, 2, 200, 230, 64, dtype=dtype, seed=seed, layout=layout)
    fast = sparge.attention(q, k, v, **kwargs)
    assert not general_path_calls, "the fast path was not taken"
    reference = _via_registered_op(monkeypatch, lambda: sparge.attention(q, k, v, **kwargs))
    assert len(general_path_calls) == 1
    fast, reference = (x if isinstance(x, tuple) else (x,) for x in (fast, reference))
    assert len(fast) == len(reference)
    for i, (a, b) in enumerate(zip(fast, reference)):
        assert_equal(a, b, f"output {i}, {kwargs}, {dtype}, seed={seed}")


def test_positional_core_call_matches_the_binding_names(monkeypatch):
    """_ops.launch_attention (the general path) passes ~35 arguments by position: each lands on the
    binding argument of its name (the names of the nanobind signature)."""
    signature = _C.attention.__doc__.splitlines()[0]
    names = re.findall(r"(\w+): ", signature[signature.index("(") + 1 : signature.rindex(")")])
    calls = []
    monkeypatch.setattr(_C, "attention_eager", lambda *args: None)
    monkeypatch.setattr(_C, "attention", lambda *args: calls.append(dict(zip(names, args, strict=True))))
    q, k, v = structured_qkv(2, 4, 2, 100, 130, 64, layout="NHD", seed=4)
    o, lse = sparge.attention(q, k, v, mode="cdf", topk=0.25, cdfthreshd=0.75, simthreshd1=-0.5, block_score="spikes",
                              pvthreshd=7.0, is_causal=True, causal_alignment="bottom_right", scale=0.1, layout="NHD",
                              block_size=(64, 128), attention_sink=True, cdf_sharpen=False, smooth_k=False,
                              qk_quant_gran="per_warp", pv_precision="fp16", output_dtype=torch.float32,
                              return_lse=True)  # fmt: skip
    (call,) = calls
    hnd = lambda x: (x.stride(0), x.stride(2), x.stride(1))  # noqa: E731
    expected = dict(device=0, stream=0, shape=(2, 4, 2, 100, 130, 64), blocks=(64, 128), causal=_ops.CAUSAL_BOTTOM_RIGHT,
                    q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), dtype=_ops.DTYPE_CODES[torch.float16],
                    q_strides=hnd(q), k_strides=hnd(k), v_strides=hnd(v), sm_scale=0.1, smooth_k=False,
                    granularity=_ops.GRAN_PER_WARP, pv=_ops.PV_FP16, mode=_ops.MODE_CDF, block_score=_ops.SCORE_SPIKES,
                    topk=0.25, topk_per_head=0, cdfthreshd=0.75, cdfthreshd_per_head=0, simthreshd1=-0.5,
                    simthreshd1_per_head=0, select_flags=_ops.SELECT_SINK, block_mask=0, pvthreshd=7.0,
                    pvthreshd_per_head=0, o=o.data_ptr(), o_dtype=_ops.DTYPE_CODES[torch.float32], o_strides=hnd(o),
                    lse=lse.data_ptr(), stats_out=0, part=_ops.PART_WHOLE)  # fmt: skip
    assert {name: call[name] for name in expected} == expected
    assert call["workspace"] % _C.WORKSPACE_ALIGN == 0 and call["workspace_bytes"] >= _C.workspace_size(
        expected["shape"], expected["blocks"], expected["granularity"], expected["pv"])
    calls.clear()
    per_head = dict(topk=torch.full((4,), 0.5), simthreshd1=torch.zeros(4), pvthreshd=torch.full((4,), 3.0))
    sparge.attention(q, k, v, layout="NHD", return_sparsity=True, **per_head)
    sparge.attention(q, k, v, layout="NHD", mode="cdf", cdfthreshd=torch.full((4,), 0.9))
    sparge.attention(q, k, v, layout="NHD", block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
    (topk_call, cdf_call, mask_call) = calls
    for name in ("topk_per_head", "simthreshd1_per_head", "pvthreshd_per_head", "stats_out"):
        assert topk_call[name] != 0, name
    assert cdf_call["cdfthreshd_per_head"] != 0 and mask_call["block_mask"] != 0
    assert mask_call["mode"] == _ops.MODE_BLOCK_MASK

def test_core_call_helpers_pass_every_keyword_to_the_entry():
    """_C.predict / _C.attend take ``index=``: the helpers' own parameters are positional-only, so
    no keyword of an entry can bind to them (on CUDA one did)."""
    seen = {}

    def entry(code, stream, **kwargs):
        seen.update(kwargs, code=code, stream=stream)

    names = dict(index=1, like=2, device=3, entry=4)
    _ops._call_core(torch.empty(1), entry, **names)
    assert seen == dict(names, code=0, stream=0)
    seen.clear()
    _ops._call_on(torch.device("cpu"), entry, **names)
    assert seen == dict(names, code=0, stream=0)
    for helper in (_ops._call_cuda, _ops._call_core, _ops._call_on):
        params = list(inspect.signature(helper).parameters.values())[:2]
        assert all(p.kind is inspect.Parameter.POSITIONAL_ONLY for p in params), helper.__name__


def test_fast_path_allocates_only_the_outputs_asked_for(eager_results):
    q, k, v = structured_qkv(1, 2, 2, 128, 128, 64)
    sparge.attention(q, k, v)
    sparge.attention(q, k, v, return_lse=True, return_sparsity=True)
    (o, lse, stats), (o2, lse2, stats2) = eager_results
    assert lse is None and stats is None
    assert o.shape == o2.shape == q.shape and o.dtype == o2.dtype == q.dtype and o.is_contiguous()
    assert lse2.shape == (1, 2, 128) and lse2.dtype == torch.float32
    assert stats2.shape == (_C.STAT_COUNT,) and stats2.dtype == torch.int64
    nhd = structured_qkv(1, 3, 3, 100, 100, 64, layout="NHD", dtype=torch.bfloat16)
    sparge.attention(*nhd, layout="NHD", output_dtype=torch.float32)
    o3, _, _ = eager_results[-1]
    assert o3.shape == (1, 100, 3, 64) and o3.dtype == torch.float32 and o3.is_contiguous()


def test_eager_path_rejects_calls_it_cannot_take_without_running_them():
    """_C.attention_eager returns None, having run nothing, for any argument the general path must see
    (whose checks raise the errors); a wrong number of arguments is a TypeError."""
    q, k, v = structured_qkv(1, 2, 2, 64, 64, 64)
    defaults = [None, 0.5, 0.98, 0.02, "auto", 15.0, False, "top_left", None, "HND", None, (128, 64), False, True,
                True, "per_thread", "fp8", None, False, False]  # fmt: skip
    assert _C.attention_eager(q, k, v, *defaults) is not None
    for i, bad in [(0, "sliding"), (1, 1), (1, 2.0), (4, ["auto"]), (5, math.nan), (7, "center"), (8, -0.5),
                   (8, math.inf), (9, "nhd"), (10, torch.ones(1)), (11, (128, 64, 64)), (11, (128, 8)),
                   (11, [128, 64]), (11, (128, 2**70)), (15, "per_token"), (17, "fp16"), (17, torch.int8)]:  # fmt: skip
        args = list(defaults)
        args[i] = bad
        assert _C.attention_eager(q, k, v, *args) is None, (i, bad)
    assert _C.attention_eager(q, k.double(), v, *defaults) is None
    assert _C.attention_eager(q, k[:, :, :, :32], v, *defaults) is None
    assert _C.attention_eager(q.transpose(2, 3), k, v, *defaults) is None
    with pytest.raises(TypeError, match="expected 23 arguments, got 22"):
        _C.attention_eager(q, k, v, *defaults[:-1])


GENERAL_CASES = [
    # calls the fast path leaves to the general path (which may accept them, or raise)
    dict(topk=torch.full((4,), 0.5)),
    dict(topk=[0.5] * 4),
    dict(topk=1),
    dict(pvthreshd=np.float64(15.0)),
    dict(scale=np.float32(0.125)),
    dict(block_size=[128, 64]),
    dict(block_mask=torch.ones(1, 4, 1, 3, dtype=torch.bool)),
    dict(output_dtype=torch.float16),
]  # fmt: skip


@pytest.mark.parametrize("kwargs", GENERAL_CASES, ids=lambda kw: str(kw)[:40])
def test_unusual_arguments_take_the_general_path_with_the_same_result(monkeypatch, general_path_calls, kwargs):
    q, k, v = structured_qkv(1, 4, 2, 100, 130, 64, seed=1)
    out = sparge.attention(q, k, v, **kwargs)
    if "output_dtype" in kwargs:  # a valid dtype given explicitly stays on the fast path
        assert not general_path_calls
    else:
        assert len(general_path_calls) == 1
    assert_equal(out, _via_registered_op(monkeypatch, lambda: sparge.attention(q, k, v, **kwargs)), str(kwargs))


BAD_CALLS = [
    (dict(layout=["HND"]), ValueError, r"layout: expected one of 'HND', 'NHD', got \['HND'\]"),
    (dict(mode={"topk": 1}), ValueError, r"mode: expected one of"),
    (dict(block_score="max"), ValueError, r"block_score: expected one of 'mean', 'spikes', 'auto', got 'max'"),
    (dict(topk=math.nan), ValueError, r"topk: expected a value in \[0, 1\], got nan"),
    (dict(pvthreshd=math.nan), ValueError, r"pvthreshd: expected a value >= 0 \(inf allowed\), got nan"),
    (dict(simthreshd1=-1.5), ValueError, r"simthreshd1: expected a value in \[-1, 1\], got -1.5"),
    (dict(scale=0.0), ValueError, r"scale: expected None \(for D \*\* -0.5\) or a positive finite float, got 0.0"),
    (dict(block_size=(128, True)), ValueError, r"block_size: .*got \(128, True\)"),
    (dict(block_size=(128, 64, 64)), ValueError, r"block_size: .*got \(128, 64, 64\)"),
    (dict(output_dtype="fp16"), ValueError, r"output_dtype: expected None, torch.float16"),
    (dict(output_dtype=[torch.float16]), ValueError, r"output_dtype: expected None, torch.float16"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,exc,pattern", BAD_CALLS, ids=lambda x: str(x)[:40])
def test_bad_arguments_raise_the_general_path_errors(general_path_calls, kwargs, exc, pattern):
    q, k, v = structured_qkv(1, 4, 2, 100, 130, 64, seed=1)
    with pytest.raises(exc, match=pattern):
        sparge.attention(q, k, v, **kwargs)
    assert len(general_path_calls) == 1


def test_fast_path_is_skipped_where_the_dispatcher_is_needed(general_path_calls):
    q, k, v = structured_qkv(1, 2, 2, 128, 128, 64, seed=2)
    sparge.attention(q.requires_grad_(), k, v)
    meta = torch.empty(1, 2, 128, 64, device="meta")
    assert sparge.attention(meta, meta, meta).shape == meta.shape
    empty = torch.empty(1, 2, 0, 64)
    assert sparge.attention(empty, empty, empty).shape == empty.shape
    assert len(general_path_calls) == 3


def test_fast_path_is_not_traced_by_torch_compile(monkeypatch, eager_results):
    q = torch.randn(1, 2, 128, 64)
    eager = sparge.attention(q, q, q)
    assert len(eager_results) == 1 and eager_results[0] is not None

    def untraceable(*args):
        raise AssertionError("attention_eager called under torch.compile")

    monkeypatch.setattr(_C, "attention_eager", untraceable)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: sparge.attention(x, x, x), fullgraph=True)
    assert_equal(compiled(q), eager, "compiled against eager")


@pytest.mark.gpu
def test_cuda_fast_path_runs_on_the_current_stream_and_device(monkeypatch, seed):
    q, k, v = structured_qkv(1, 4, 2, 256, 256, 64, device="cuda", seed=seed)
    reference = _via_registered_op(monkeypatch, lambda: sparge.attention(q, k, v))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = sparge.attention(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    assert_equal(out, reference, f"side stream, seed={seed}")
    if torch.cuda.device_count() > 1:  # inputs on another device than the current one: a device guard
        q1, k1, v1 = (x.to("cuda:1") for x in (q, k, v))
        with torch.cuda.device(0):
            out1 = sparge.attention(q1, k1, v1)
        assert out1.device == q1.device
        assert_equal(out1.cpu(), reference.cpu(), f"cuda:1 from cuda:0, seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(kw) or "defaults")
@pytest.mark.parametrize("split", [False, True], ids=["one core call", "two core calls"])
def test_cuda_fast_path_matches_registered_op_bit_exactly(monkeypatch, general_path_calls, eager_results, seed,
                                                          kwargs, split):  # fmt: skip
    """_C.attention_eager on CUDA: the registered op's result bit for bit, in one core call or in two
    (quantize and predict queued before the output exists, as a large problem makes)."""
    layout = kwargs.get("layout", "HND")
    q, k, v = structured_qkv(2, 4, 2, 200, 230, 64, device="cuda", seed=seed, layout=layout)
    if split:
        monkeypatch.setattr(_ops, "WORKSPACE_CACHE_MIN_BYTES", 0)
    fast = sparge.attention(q, k, v, **kwargs)
    assert not general_path_calls and eager_results[-1] is not None, "the fast path was not taken"
    reference = _via_registered_op(monkeypatch, lambda: sparge.attention(q, k, v, **kwargs))
    assert len(general_path_calls) == 1
    fast, reference = (x if isinstance(x, tuple) else (x,) for x in (fast, reference))
    for i, (a, b) in enumerate(zip(fast, reference)):
        assert_equal(a, b, f"output {i}, {kwargs}, split={split}, seed={seed}")


@pytest.mark.gpu
def test_cuda_small_workspaces_are_reused_per_stream(seed):
    """Small calls share one workspace per (device, stream); interleaved problems of different
    sizes on two streams still give each call its own result; a CUDA graph capture takes no
    cached workspace."""
    small = structured_qkv(1, 4, 2, 256, 256, 64, device="cuda", seed=seed)
    other = structured_qkv(2, 4, 4, 333, 700, 128, device="cuda", seed=seed + 1)
    first_small, first_other = sparge.attention(*small), sparge.attention(*other)
    key = (torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream)
    cached = _ops._workspaces[key]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for _ in range(3):
        with torch.cuda.stream(side):
            on_side = sparge.attention(*other)
        again = sparge.attention(*small)
        assert_equal(again, first_small, f"reused workspace, seed={seed}")
    torch.cuda.current_stream().wait_stream(side)
    assert_equal(on_side, first_other, f"side stream, seed={seed}")
    assert _ops._workspaces[key] is cached
    assert (key[0], side.cuda_stream) in _ops._workspaces
    entries = dict(_ops._workspaces)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparge.attention(*small)
    assert _ops._workspaces == entries
    graph.replay()
    assert_equal(captured, first_small, f"graph replay, seed={seed}")



@pytest.mark.gpu
def test_cuda_workspace_cache_limit_and_release(monkeypatch, seed):
    """Workspaces up to 1/256 of the device memory are kept (a large call's first kernels then need no
    allocation), larger ones are not; release_workspace_cache drops them; results never change."""
    index = torch.cuda.current_device()
    memory = torch.cuda.get_device_properties(index).total_memory
    assert _ops.workspace_cache_limit(index) == max(1 << 22, memory // 256)
    key = (index, torch.cuda.current_stream().cuda_stream)
    x = structured_qkv(1, 8, 8, 4096, 4096, 128, device="cuda", seed=seed)
    nbytes = _C.workspace_size((1, 8, 8, 4096, 4096, 128), (128, 64), _ops.GRAN_PER_THREAD, _ops.PV_FP8, 1)
    assert 1 << 22 < nbytes < _ops.workspace_cache_limit(index)
    sparge.release_workspace_cache()
    first = sparge.attention(*x)
    assert _ops._workspaces[key].tensor.numel() >= nbytes
    # The kept entry is referenced by the cache, `kept` and getrefcount's argument alone after the call
    # that made it and after one that reused it: the eager path holds no reference and drops none it lacks.
    kept = _ops._workspaces[key]
    refs = sys.getrefcount(kept)
    assert refs == 3
    assert_equal(sparge.attention(*x), first, f"reused workspace, seed={seed}")
    refs = sys.getrefcount(kept)
    assert refs == 3 and _ops._workspaces[key] is kept
    del kept
    sparge.release_workspace_cache()
    assert not _ops._workspaces
    monkeypatch.setitem(_ops._workspace_limits, index, nbytes // 2)
    assert_equal(sparge.attention(*x), first, f"uncached workspace, seed={seed}")
    assert key not in _ops._workspaces
    monkeypatch.undo()
    assert_equal(sparge.attention(*x), first, f"cached again, seed={seed}")
    assert key in _ops._workspaces


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True, return_lse=True, return_sparsity=True, layout="NHD")],
                         ids=["defaults", "causal,lse,stats,nhd"])
def test_cuda_large_calls_run_in_two_core_calls(monkeypatch, seed, kwargs):
    """Over WORKSPACE_CACHE_MIN_BYTES of workspace a CUDA call queues quantize and predict (part 1, no
    output) before it allocates the output and runs attend (part 2); the result is the one-call result
    bit for bit. Smaller calls make one core call. The general path's core calls are counted (the
    eager path's are made in C++, and test_cuda_fast_path_matches_registered_op_bit_exactly compares
    its split result with the general path's)."""
    q, k, v = structured_qkv(1, 4, 2, 700, 900, 64, device="cuda", seed=seed, layout=kwargs.get("layout", "HND"))
    parts = []
    real = _C.attention
    monkeypatch.setattr(_C, "attention_eager", lambda *args: None)
    monkeypatch.setattr(_C, "attention", lambda *args: parts.append(args[-1]) or real(*args))
    whole = sparge.attention(q, k, v, **kwargs)
    assert parts == [_ops.PART_WHOLE]
    monkeypatch.setattr(_ops, "WORKSPACE_CACHE_MIN_BYTES", 0)
    split = sparge.attention(q, k, v, **kwargs)
    assert parts == [_ops.PART_WHOLE, _ops.PART_BEGIN, _ops.PART_FINISH]
    whole, split = (x if isinstance(x, tuple) else (x,) for x in (whole, split))
    for i, (a, b) in enumerate(zip(whole, split)):
        assert_equal(a, b, f"output {i}, {kwargs}, seed={seed}")


def test_bench_core_call_repeats_only_the_cpp_call(monkeypatch):
    from sparge import bench

    q, k, v = structured_qkv(1, 2, 2, 128, 128, 64, seed=3)
    launch, eager = _ops.launch_attention, _C.attention_eager
    call = bench._core_call(q, k, v)
    call()  # one sparge.attention, recording the arguments of its C++ call
    assert _ops.launch_attention is launch and _C.attention_eager is eager
    monkeypatch.setattr(sparge, "attention", None)
    call()
