"""Stage functions: quantize → predict → attend compose to attention (bit-exact on the CPU), and
the quantized buffers follow docs/method.md."""

from __future__ import annotations

import math

import pytest
import torch

import sparge
from helpers import assert_equal
from sparge import _C, _ops
from sparge.testing import structured_qkv

CASES = [
    dict(mode="dense"),
    dict(mode="topk", topk=0.3),
    dict(mode="cdf", cdfthreshd=0.9, is_causal=True),
    dict(mode="topk", topk=0.5, is_causal=True, causal_alignment="bottom_right", attention_sink=True),
    dict(mode="block_mask"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize(
    "quant", [dict(), dict(layout="NHD", qk_quant_gran="per_warp", pv_precision="fp16", block_size=(64, 32)),
              dict(qk_quant_gran="per_block", smooth_k=False, scale=0.07, block_size=(32, 128))],
)  # fmt: skip
def test_stages_compose_to_attention(seed, poison, case, quant):
    layout = quant.get("layout", "HND")
    q, k, v = structured_qkv(2, 4, 2, 333, 270, 64, seed=seed, layout=layout)
    case = dict(case)
    blocks = quant.get("block_size", (128, 64))
    if case["mode"] == "block_mask":
        nbq, nbk = -(-333 // blocks[0]), -(-270 // blocks[1])
        case["block_mask"] = torch.rand(2, 4, nbq, nbk, generator=torch.Generator().manual_seed(seed)) < 0.6
    fused = sparge.attention(q, k, v, **case, **quant, pvthreshd=6.0, return_lse=True, return_sparsity=True)

    quantized = sparge.quantize(q, k, v, **quant)
    causal = {key: case[key] for key in ("is_causal", "causal_alignment") if key in case}
    pred = sparge.predict(quantized, **case)
    o, lse = sparge.attend(quantized, pred.index, pred.count, pvthreshd=6.0, return_lse=True, **causal)
    context = f"{case} {quant} seed={seed}"
    assert_equal(o, fused[0], f"o: {context}")
    assert_equal(lse, fused[1], f"lse: {context}")
    assert_equal(sparge.block_sparsity(pred.stats), fused[2], f"sparsity: {context}")
    # index lists the kept blocks of the mask in ascending order, then -1.
    nbk = pred.mask.size(-1)
    ar = torch.arange(nbk).expand_as(pred.mask)
    expected = torch.where(pred.mask, ar, nbk).sort(dim=-1).values
    valid = torch.arange(nbk) < pred.count.unsqueeze(-1)
    assert torch.equal(pred.count, pred.mask.sum(-1).to(torch.int32))
    assert torch.equal(pred.index[valid], expected[valid].to(torch.int32))
    assert torch.all(pred.index[~valid] == -1)
    if case["mode"] != "block_mask":
        mask = sparge.predict_blocks(q, k, **{key: val for key, val in case.items()},
                                     **{key: quant[key] for key in ("layout", "block_size", "smooth_k", "scale")
                                        if key in quant})  # fmt: skip
        assert torch.equal(mask, pred.mask), context


def _run_everything(q, k, v):
    quantized = sparge.quantize(q, k, v, block_size=(64, 64))
    pred = sparge.predict(quantized, mode="cdf", cdfthreshd=0.9, is_causal=True)
    staged = sparge.attend(quantized, pred.index, pred.count, is_causal=True, return_lse=True, return_stats=True)
    fused = sparge.attention(q, k, v, mode="cdf", cdfthreshd=0.9, is_causal=True, block_size=(64, 64),
                             return_lse=True, return_sparsity=True)  # fmt: skip
    return (*quantized.buffers(), *pred, *staged, *fused)


def test_results_do_not_depend_on_uninitialised_memory(seed, monkeypatch):
    """Every output, workspace and scratch buffer comes from torch.empty: fill them with two
    different patterns; any read of an unwritten byte shows up as a difference."""
    q, k, v = structured_qkv(2, 4, 2, 150, 190, 64, seed=seed)
    real_empty = torch.empty
    results = []
    for pattern in (0x00, 0xFF, 0x5A):

        def patterned_empty(*args, pattern=pattern, **kwargs):
            x = real_empty(*args, **kwargs)
            if x.numel() > 0 and x.dtype != torch.bool and x.device.type != "meta":
                x.view(-1).view(torch.uint8).fill_(pattern)
            return x

        monkeypatch.setattr(torch, "empty", patterned_empty)
        results.append(_run_everything(q, k, v))
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert_equal(a, b, f"output {i} depends on the initial memory, seed={seed}")


def test_quantized_buffers_follow_the_method(seed, poison):
    b, hq, hkv, lq, lk, d = 1, 4, 2, 200, 150, 64
    q, k, v = structured_qkv(b, hq, hkv, lq, lk, d, seed=seed, dtype=torch.float32)
    scale = d**-0.5
    qz = sparge.quantize(q, k, v, qk_quant_gran="per_warp", block_size=(64, 32))
    # Q: int8 in [-127, 127], per-warp groups of 16 rows, scale folds sm_scale·log2(e).
    assert qz.q.dtype == torch.int8 and int(qz.q.min()) >= -127
    assert qz.q_scale.shape == (b, hq, math.ceil(lq / 16))
    q_deq = qz.q.float() * qz.q_scale.repeat_interleave(16, dim=-1)[..., :lq, None] / (scale * math.log2(math.e))
    assert float((q_deq - q).abs().max()) <= float(q.abs().max()) / 127 * 0.51 + 1e-5
    # K: token mean removed, int8 per 64-row groups.
    assert torch.allclose(qz.k_mean, k.mean(dim=2), atol=1e-5)
    k_deq = qz.k.float() * qz.k_scale.repeat_interleave(64, dim=-1)[..., :lk, None]
    assert float((k_deq - (k - k.mean(dim=2, keepdim=True))).abs().max()) <= float(k.abs().max()) / 127 + 1e-4
    # V: e4m3, transposed, padded to 64 tokens with zeros, per-channel scale amax / 448; every 16-key
    # group in P·V fragment order (the order v_by_key undoes, checked against the C++ layout in
    # test_quantize.cpp).
    assert qz.v.dtype == torch.float8_e4m3fn and qz.v.shape == (b, hkv, d, 192)
    v_keys = qz.v_by_key()
    assert torch.all(v_keys[..., lk:].float() == 0)
    assert not torch.equal(v_keys.float(), qz.v.float()), "e4m3 V is stored in fragment order"
    assert torch.allclose(qz.v_scale, v.abs().amax(dim=2) / 448, rtol=1e-6)
    v_deq = (v_keys[..., :lk].float() * qz.v_scale[..., None]).transpose(-1, -2)
    # e4m3 rounding: half an ulp, 2^-4 relative for normals, 2^-10 · v_scale absolute for subnormals.
    bound = torch.maximum(v.abs() * 2**-4, qz.v_scale[..., None, :] * 2**-10) * (1 + 1e-5)
    assert torch.all((v_deq - v).abs() <= bound)
    # LSE shift, pools and similarities.
    shift = scale * (q @ qz.k_mean.repeat_interleave(2, dim=1).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(qz.lse_shift, shift, atol=1e-4, rtol=1e-4)
    pools = torch.stack([q[:, :, i : i + 64].mean(dim=2) for i in range(0, lq, 64)], dim=2)
    assert torch.allclose(qz.q_pool, pools, atol=1e-5)
    rows = torch.nn.functional.normalize(q[:, :, 192:200], dim=-1)  # the last Q block: 8 rows
    n = rows.size(2)
    sim = ((rows.sum(2).norm(dim=-1) ** 2 - n) / (n * (n - 1)))
    assert torch.allclose(qz.q_sim[..., -1], sim, atol=1e-4)
    assert qz.k_pool.shape == (b, hkv, math.ceil(lk / 32), d) and qz.k_sim.shape == (b, hkv, math.ceil(lk / 32))


@pytest.mark.parametrize("gran", ["per_thread", "per_warp", "per_block"])
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_python_shapes_match_cpp_layout(gran, pv):
    """_ops.quantized_specs mirrors include/sparge/layout.h: its buffers, each rounded up to 256
    bytes, plus index and count add up to stage_buffers_size, the CPU workspace of the fused op; on
    CUDA the fused op adds the attention kernel's scratch, which sparge.attend allocates by itself
    (attend_workspace_size: nothing on the CPU, something only where the split can run: the wgmma
    kernel's requests with more than 132 work tiles of 128 query rows)."""
    g, p = sparge.api._GRANULARITIES[gran], sparge.api._PV_PRECISIONS[pv]
    for shape, blocks in [((2, 8, 2, 1000, 777, 128), (128, 64)), ((1, 1, 1, 1, 1, 1), (16, 16)),
                          ((3, 6, 3, 4097, 65, 80), (64, 256)), ((1, 40, 8, 1000, 500, 128), (128, 64))]:  # fmt: skip
        total = 0
        for size, dtype in _ops.quantized_specs(*shape, *blocks, g, p):
            total += -(-math.prod(size) * dtype.itemsize // 256) * 256
        b, hq, _, lq, lk, _ = shape
        nbq, nbk = -(-lq // blocks[0]), -(-lk // blocks[1])
        total += -(-b * hq * nbq * nbk * 4 // 256) * 256 + -(-b * hq * nbq * 4 // 256) * 256
        assert total == _C.stage_buffers_size(shape=shape, blocks=blocks, granularity=g, pv=p), (shape, gran, pv)
        assert _C.workspace_size(shape=shape, blocks=blocks, granularity=g, pv=p) == total
        scratch = _C.attend_workspace_size(shape, blocks, p, 1)
        assert _C.workspace_size(shape, blocks, g, p, 1) == total + scratch
        assert _C.attend_workspace_size(shape, blocks, p, 0) == 0
        b, hq, _, lq, _, d = shape
        wgmma = pv == "fp8" and blocks[0] % 128 == 0 and blocks[1] in (64, 128) and d <= 128
        split_can_run = wgmma and b * hq * -(-lq // 128) > 132
        assert (scratch > 0) == split_can_run, (shape, pv, scratch)


def test_quantized_tuple_carries_its_settings(seed):
    q, k, v = structured_qkv(1, 2, 2, 100, 100, 32, seed=seed, dtype=torch.bfloat16, layout="NHD")
    qz = sparge.quantize(q, k, v, layout="NHD", block_size=(32, 32), scale=0.3, qk_quant_gran="per_block",
                         pv_precision="fp16")  # fmt: skip
    assert qz.block_size == (32, 32) and qz.scale == 0.3 and qz.qk_quant_gran == "per_block"
    assert qz.pv_precision == "fp16" and qz.dtype == torch.bfloat16 and qz.layout == "NHD"
    assert qz.v.dtype == torch.float16 and len(qz.buffers()) == 13
    pred = sparge.predict(qz)
    o = sparge.attend(qz, pred.index, pred.count)
    assert o.shape == q.shape and o.dtype == torch.bfloat16
    o_hnd = sparge.attend(qz, pred.index, pred.count, layout="HND", output_dtype=torch.float32)
    assert_equal(o_hnd.to(torch.bfloat16), o.transpose(1, 2), "layout / dtype of attend")
