"""CUDA backend at small shapes, where the stages take their few-launch paths (run where a GPU
exists; skipped when torch.cuda.is_available() is False).

* quantize: Lk <= 1024 takes a two-launch path (K/V statistics and V per kv head, then the K and
  Q rows in one grid), longer keys the five-launch path; both match the CPU backend.
* predict: when score_group(nbq, B·Hq, nbk) == 1 the selection kernel scores its own Q block (no
  score_kernel launch, the block counters cleared by the host); both ways match the CPU backend.
* attention at B=1, H=8, L=256, D=64 is close to fp32 attention and equals its stages.
"""

from __future__ import annotations

import pytest
import torch

import sparge
from helpers import assert_close_to, assert_equal
from sparge.testing import reference_attention, structured_qkv

pytestmark = pytest.mark.gpu

SMALL_LEN_K = 1024  # the largest Lk of the two-launch quantize path (quantize.cu, kSmallLenK)
FLOAT_FIELDS = ("q_scale", "k_scale", "k_mean", "lse_shift", "q_pool", "q_sim", "k_pool", "k_sim", "k_spikes")
BOUNDS = {  # measured on the CPU backend at (1, 8, 8|2, 256, 256, 64) over 40 seeds, causal or not
    "dense": dict(cos_min=0.998, rel_l1_max=0.05),  # worst seen: cos 0.99981, rel-L1 0.018
    "topk": dict(cos_min=0.98, rel_l1_max=0.2),  # worst seen: cos 0.9869, rel-L1 0.087
    "cdf": dict(cos_min=0.98, rel_l1_max=0.1),  # worst seen: cos 0.9956, rel-L1 0.040
}
MODES = {"dense": dict(mode="dense"), "topk": dict(mode="topk", topk=0.5), "cdf": dict(mode="cdf", cdfthreshd=0.98)}


def _to(quantized: sparge.QuantizedQKV, device) -> sparge.QuantizedQKV:
    fields = quantized._fields[: len(sparge._ops.QUANTIZED_FIELDS)]
    return quantized._replace(**{name: getattr(quantized, name).to(device) for name in fields})


def _score_group(nbq: int, bhq: int, nbk: int) -> int:
    """predict.cu's score_group: Q blocks per score_kernel thread (1: select_kernel scores itself)."""
    want = max(1, min(16, nbq, nbq * bhq * nbk // 32768))
    return 1 << (want.bit_length() - 1)


def _runnable_pv() -> str:
    """fp8 where the kernel image has e4m3 mma, else fp16."""
    try:
        sparge.attend_kernel((1, 1, 128, 64), device="cuda", pv_precision="fp8")
    except NotImplementedError as e:
        assert "compiled for 8." in str(e), str(e)
        return "fp16"
    return "fp8"


def _assert_quantized_match(gpu: sparge.QuantizedQKV, cpu: sparge.QuantizedQKV, len_k: int, context: str) -> None:
    """test_gpu.py::test_cuda_quantize_matches_cpu_backend's bounds: INT8 values within one step in
    at most 1e-3 of the elements (a value on a rounding boundary after a differently summed
    k_mean), V differing in at most 1e-3 of the elements, floats to fp32 rounding, v_scale exact
    (an exact amax divided once)."""
    for name in ("q", "k"):
        a, b = getattr(gpu, name), getattr(cpu, name)
        if a.numel() == 0:
            assert b.numel() == 0, f"{name} {context}"
            continue
        diff = (a.int() - b.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3, f"{name} {context}"
    assert gpu.v.dtype == cpu.v.dtype and gpu.v.shape == cpu.v.shape, f"v {context}"
    if gpu.v.numel() > 0:
        v_diff = (gpu.v.float() - cpu.v.float()).abs() > 0
        assert float(v_diff.float().mean()) <= 1e-3, f"v {context}"
        assert torch.all(gpu.v_by_key()[..., len_k:].float() == 0), f"V padding must be zero: {context}"
    assert_equal(gpu.v_scale, cpu.v_scale, f"v_scale {context}")
    for name in FLOAT_FIELDS:
        if name == "k_spikes":
            continue
        torch.testing.assert_close(getattr(gpu, name), getattr(cpu, name), rtol=1e-5, atol=1e-5,
                                   msg=f"{name} {context}")  # fmt: skip
    # Spike keys are the rows of largest smoothed norm: two rows whose norms tie to rounding may
    # swap after a differently summed k_mean (seen at Lk = 2048, D = 128, on the 5-launch path).
    assert gpu.k_spikes.shape == cpu.k_spikes.shape, f"k_spikes {context}"
    if gpu.k_spikes.numel() > 0:
        differ = (gpu.k_spikes - cpu.k_spikes).abs().amax(dim=-1) > 1e-4
        assert float(differ.float().mean()) <= 0.02, f"k_spikes: {int(differ.sum())} rows differ, {context}"


@pytest.mark.parametrize("smooth_k", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pv", ["fp8", "fp16", "fp8_fp16acc"])
@pytest.mark.parametrize("len_k", [256, 1000, SMALL_LEN_K, 1088, 2048])
def test_cuda_quantize_on_both_sides_of_the_small_path_matches_cpu_backend(seed, poison, len_k, pv, dtype, head_dim,
                                                                           smooth_k):  # fmt: skip
    """GQA (Hq = 2·Hkv), Lq != Lk; poisoned outputs catch an element neither path writes."""
    q, k, v = structured_qkv(2, 4, 2, 300, len_k, head_dim, dtype=dtype, seed=seed)
    kwargs = dict(pv_precision=pv, smooth_k=smooth_k)
    cpu = sparge.quantize(q, k, v, **kwargs)
    gpu = _to(sparge.quantize(q.cuda(), k.cuda(), v.cuda(), **kwargs), "cpu")
    context = f"Lk={len_k} {pv} {dtype} D={head_dim} smooth_k={smooth_k} seed={seed}"
    _assert_quantized_match(gpu, cpu, len_k, context)
    if not smooth_k:
        assert torch.all(gpu.k_mean == 0), f"k_mean without smoothing: {context}"
    if pv == "fp8_fp16acc":
        assert float(gpu.v.float().abs().max()) <= 2.25, context


@pytest.mark.parametrize("len_q,len_k", [(0, 256), (300, 0), (1, 1), (129, 65)])
def test_cuda_quantize_of_empty_and_tiny_lengths_matches_cpu_backend(seed, poison, len_q, len_k):
    """Lq = 0 (the small path without Q rows), Lk = 0 (k_mean and v_scale cleared), one token."""
    q, k, v = structured_qkv(1, 4, 2, max(len_q, 1), max(len_k, 1), 64, seed=seed)
    q, k, v = q[:, :, :len_q].contiguous(), k[:, :, :len_k].contiguous(), v[:, :, :len_k].contiguous()
    cpu = sparge.quantize(q, k, v)
    gpu = _to(sparge.quantize(q.cuda(), k.cuda(), v.cuda()), "cpu")
    _assert_quantized_match(gpu, cpu, len_k, f"Lq={len_q} Lk={len_k} seed={seed}")


PREDICT_CASES = [
    dict(mode="topk", topk=0.5),  # block_score "auto": spikes
    dict(mode="topk", topk=0.3, block_score="mean"),
    dict(mode="cdf", cdfthreshd=0.95),  # block_score "auto": mean
    dict(mode="cdf", cdfthreshd=0.9, block_score="spikes", is_causal=True),
    dict(mode="topk", topk=0.5, is_causal=True, attention_sink=True),
]


@pytest.mark.parametrize("case", PREDICT_CASES, ids=str)
@pytest.mark.parametrize(
    "shape,grouped",
    [
        ((1, 8, 8, 256, 256, 64), False),
        ((1, 8, 4, 256, 320, 128), False),
        ((2, 8, 2, 8064, 8192, 64), True),  # groups of 2 Q blocks, the last one short
        ((1, 8, 2, 16384, 32768, 128), True),  # groups of 16
        ((1, 8, 2, 8192, 8192, 72), True),  # K statistics staged 16 columns at a time, the last stage 8
        ((1, 8, 2, 8192, 8192, 50), True),  # a head dim not a multiple of 4: not staged
    ],
    ids=str,
)
def test_cuda_predict_with_and_without_score_kernel_matches_cpu_backend(seed, shape, grouped, case):
    """Same quantized inputs on both backends (test_gpu.py::test_cuda_predict_matches_cpu_backend's
    bounds): mean-score topk selections exact, spikes scores and the cdf cut (expf / logf rounding)
    at most 1e-3 of the blocks differing; the block counters agree."""
    b, hq, hkv, lq, lk, d = shape
    nbq, nbk = -(-lq // 128), -(-lk // 64)
    assert (_score_group(nbq, b * hq, nbk) > 1) == grouped, "the shape no longer selects the path it is meant to test"
    q, k, v = (x.cpu() for x in structured_qkv(b, hq, hkv, lq, lk, d, device="cuda", seed=seed))
    quantized = sparge.quantize(q, k, v)
    cpu = sparge.predict(quantized, **case)
    gpu = sparge.Prediction(*(x.cpu() for x in sparge.predict(_to(quantized, "cuda"), **case)))
    context = f"{shape} {case} seed={seed}"
    if case["mode"] == "topk" and case.get("block_score") == "mean":
        for a, b_, name in zip(gpu, cpu, sparge.Prediction._fields):
            assert_equal(a, b_, f"{name} {context}")
        return
    mismatch = float((gpu.mask != cpu.mask).float().mean())
    assert mismatch <= 1e-3, f"{context}: {mismatch:.2%} of the blocks differ"
    assert int(gpu.stats[sparge.STAT_BLOCKS_ALLOWED]) == int(cpu.stats[sparge.STAT_BLOCKS_ALLOWED]), context
    assert int(gpu.stats[sparge.STAT_BLOCKS_KEPT]) == int(gpu.count.sum()), context
    assert torch.equal(gpu.count, gpu.mask.sum(-1).to(torch.int32)), context


@pytest.fixture(params=["auto", "mma"])
def kernel(request, monkeypatch):
    """Stage 2 kernel choice, as in test_gpu.py: "auto" and the forced mma.sync kernel."""
    monkeypatch.setenv("SPARGE_CUDA_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("heads_kv", [8, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_small_attention_matches_fp32_truth(seed, kernel, mode, causal, heads_kv):
    q, k, v = structured_qkv(1, 8, heads_kv, 256, 256, 64, device="cuda", seed=seed)
    ref, ref_lse = reference_attention(q, k, v, is_causal=causal)
    o, lse = sparge.attention(q, k, v, is_causal=causal, return_lse=True, pv_precision=_runnable_pv(), **MODES[mode])
    context = f"cuda {kernel} {mode} causal={causal} Hkv={heads_kv} seed={seed}"
    assert o.device == q.device and o.dtype == q.dtype
    assert_close_to(o, ref, **BOUNDS[mode], context=context)
    if mode == "dense":
        finite = ref_lse.isfinite()
        assert float((lse - ref_lse)[finite].abs().max()) <= 0.1, context


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_small_attention_equals_its_stages(seed, poison, mode):
    """The fused op (poisoned outputs and statistics: the host must clear the block counters when
    no score_kernel runs) equals quantize → predict → attend on the GPU, sparsity included."""
    q, k, v = structured_qkv(1, 8, 8, 256, 256, 64, device="cuda", seed=seed)
    pv = _runnable_pv()
    o, lse, sparsity = sparge.attention(q, k, v, pv_precision=pv, return_lse=True, return_sparsity=True,
                                        **MODES[mode])  # fmt: skip
    quantized = sparge.quantize(q, k, v, pv_precision=pv)
    pred = sparge.predict(quantized, **MODES[mode])
    o_stages, lse_stages = sparge.attend(quantized, pred.index, pred.count, return_lse=True)
    context = f"{mode} seed={seed}"
    assert_equal(o, o_stages, f"o: {context}")
    assert_equal(lse, lse_stages, f"lse: {context}")
    assert_equal(sparsity, sparge.block_sparsity(pred.stats), f"sparsity: {context}")
    assert 0.0 <= float(sparsity) <= 1.0, context
