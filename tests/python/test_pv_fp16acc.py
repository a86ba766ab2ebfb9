"""pv_precision="fp8_fp16acc": P and V in e4m3, each 64-key chunk of the P·V product summed in an
fp16 accumulator, V scaled into ±2.25 so that it cannot overflow (docs/method.md §0, §2).

CPU backend here; test_gpu.py compares the CUDA kernel with it on identical quantized inputs.
"""

from __future__ import annotations

import pytest
import torch

import sparge
from helpers import assert_close_to, assert_equal
from sparge import _ops, compat
from sparge.testing import reference_attention, relative_l1, structured_qkv

V_MAX = 2.25  # kVQuantMaxFp16Accum: a chunk sums at most 64 · 448 · 2.25 = 64512 < 65504 (fp16 max)


@pytest.mark.parametrize("block_size", [(128, 64), (128, 128)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["dense", "topk"])
def test_accuracy_against_fp32_attention(seed, block_size, is_causal, mode):
    """The bounds of fp8 P·V (test_attention.py), within 0.3 % relative L1 of the fp32-accumulator
    result; the LSE does not depend on the P·V format."""
    q, k, v = structured_qkv(1, 4, 2, 700, 700, 64, seed=seed)  # GQA
    kwargs = dict(mode=mode, is_causal=is_causal, block_size=block_size, return_lse=True)
    ref, _ = reference_attention(q, k, v, is_causal=is_causal)
    o, lse = sparge.attention(q, k, v, pv_precision="fp8_fp16acc", **kwargs)
    o8, lse8 = sparge.attention(q, k, v, pv_precision="fp8", **kwargs)
    context = f"{mode} block_size={block_size} causal={is_causal} seed={seed}"
    bounds = dict(cos_min=0.999, rel_l1_max=0.03) if mode == "dense" else dict(cos_min=0.98, rel_l1_max=0.2)
    assert_close_to(o, ref, **bounds, context=context)
    assert relative_l1(o, ref) <= relative_l1(o8, ref) + 0.003, context
    assert not torch.equal(o, o8), context
    assert_equal(lse, lse8, context)


def test_quantized_v_uses_the_fp16_accumulator_range(seed):
    q, k, v = structured_qkv(2, 4, 2, 200, 333, 64, seed=seed)
    quantized = sparge.quantize(q, k, v, pv_precision="fp8_fp16acc")
    assert quantized.v.dtype == torch.float8_e4m3fn and quantized.v.shape == (2, 2, 64, 384)
    amax = v.float().abs().amax(dim=2)  # [B, Hkv, D]
    torch.testing.assert_close(quantized.v_scale, amax / V_MAX, rtol=0, atol=0)
    v_q = quantized.v_by_key().float()
    assert float(v_q.abs().max()) == V_MAX  # each channel's amax maps to ±2.25 exactly
    assert torch.all(v_q[..., 333:] == 0), "V padding must be zero"
    inv = torch.full_like(amax, V_MAX) / amax  # tensor / tensor: the IEEE quotient (a scalar / tensor is not)
    expect = (v.float() * inv.unsqueeze(2)).to(torch.float8_e4m3fn).float().transpose(-1, -2)
    assert_equal(v_q[..., :333], expect.contiguous(), "v_q = e4m3(v · 2.25 / amax)")


def test_worst_case_chunks_do_not_overflow(seed):
    """Equal scores (each K row is one constant vector, removed exactly by smoothing), so every
    p8 = 448, and V at ±amax in every key: each 64-key chunk sums ±64512 in fp16."""
    b, h, length, d = 1, 2, 512, 32
    q, _, _ = structured_qkv(b, h, None, 300, length, d, seed=seed)
    channel = torch.arange(d)
    k = (1.0 + 0.125 * channel).to(torch.float16).expand(b, h, length, d).contiguous()
    amax = 0.5 + 0.25 * channel
    sign = torch.where(channel % 2 == 0, 1.0, -1.0)
    v = (sign * amax).to(torch.float16).expand(b, h, length, d).contiguous()
    for block_size in [(128, 64), (128, 128)]:
        o = sparge.attention(q, k, v, mode="dense", block_size=block_size, pv_precision="fp8_fp16acc",
                             output_dtype=torch.float32)  # fmt: skip
        assert torch.isfinite(o).all(), f"block_size={block_size}"
        torch.testing.assert_close(o, (sign * amax).expand_as(o), rtol=1e-5, atol=0)


@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
def test_compat_fp32_fp16_accumulator_runs_fp8_fp16acc(seed, gran):
    """SageAttention2++'s pv_accum_dtype="fp32+fp16" is sparge's fp16-accumulator mode, bit for bit;
    the other accumulators stay fp32."""
    q, k, v = structured_qkv(2, 4, None, 300, None, 64, seed=seed)
    kwargs = dict(is_causal=True, qk_quant_gran=gran)
    o = compat.sageattn_qk_int8_pv_fp8_cuda(q, k, v, pv_accum_dtype="fp32+fp16", **kwargs)
    assert_equal(o, sparge.attention(q, k, v, mode="dense", pv_precision="fp8_fp16acc", **kwargs), gran)
    fp32 = compat.sageattn_qk_int8_pv_fp8_cuda(q, k, v, pv_accum_dtype="fp32+fp32", **kwargs)
    assert_equal(fp32, sparge.attention(q, k, v, mode="dense", pv_precision="fp8", **kwargs), gran)
    assert not torch.equal(o, fp32)


def test_option_names():
    assert _ops.V_DTYPES[_ops.PV_FP8_FP16ACC] == torch.float8_e4m3fn
    assert sparge.attend_kernel((1, 2, 256, 64), device="cpu", pv_precision="fp8_fp16acc") == "cpu"
    q, k, v = structured_qkv(1, 2, None, 64, None, 32, seed=0)
    with pytest.raises(ValueError, match="pv_precision: expected one of 'fp8', 'fp16', 'fp8_fp16acc'"):
        sparge.attention(q, k, v, pv_precision="fp16acc")
