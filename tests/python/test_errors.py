"""Bad input raises an exception whose message names the argument, what was expected and what was given."""

from __future__ import annotations

import math

import pytest
import torch

import sparge
from sparge import _C

B, HQ, HKV, LQ, LK, D = 1, 4, 2, 100, 130, 64


def _qkv(dtype=torch.float16):
    return (torch.randn(B, HQ, LQ, D, dtype=dtype), torch.randn(B, HKV, LK, D, dtype=dtype),
            torch.randn(B, HKV, LK, D, dtype=dtype))  # fmt: skip


def _replace(index, value):
    q, k, v = _qkv()
    args = [q, k, v]
    args[index] = value(args[index]) if callable(value) else value
    return args


BAD_TENSORS = [
    # (args, exception, message pattern)
    (lambda: _replace(0, [1.0]), TypeError, r"q: expected a torch.Tensor, got list"),
    (lambda: _replace(0, lambda q: q[0]), ValueError, r"q: expected a 4-D tensor \[B, H, L, D\].*got shape \(4, 100, 64\)"),
    (lambda: _replace(0, lambda q: q.to(torch.int32)), ValueError, r"q: expected dtype .*got torch.int32"),
    (lambda: _replace(0, lambda q: q.double()), ValueError, r"q: expected dtype .*got torch.float64"),
    (lambda: _replace(1, lambda k: k.float()), ValueError, r"k: expected dtype torch.float16 \(the dtype of q\), got torch.float32"),
    (lambda: _replace(2, lambda v: v.to("meta")), ValueError, r"v: expected a tensor on cpu \(the device of q\), got meta"),
    (lambda: _replace(1, lambda k: k.expand(2, HKV, LK, D)), ValueError, r"k: expected batch size 1 \(of q\), got 2"),
    (lambda: _replace(1, lambda k: k[..., :32]), ValueError, r"k: expected head dim 64 \(of q\), got 32"),
    (lambda: _replace(2, lambda v: v[:, :, :10]), ValueError, r"v: expected the shape of k \(1, 2, 130, 64\), got \(1, 2, 10, 64\)"),
    (lambda: _replace(0, lambda q: torch.randn(B, 3, LQ, D, dtype=q.dtype)), ValueError,
     r"q: expected a number of heads divisible by the 2 heads of k and v \(GQA/MQA\), got 3"),
    (lambda: _replace(0, lambda q: q.repeat_interleave(2, dim=-1)[..., ::2]), ValueError,
     r"q: expected a contiguous last \(head-dim\) dimension, got stride 2"),
    (lambda: [torch.randn(B, HQ, LQ, 300, dtype=torch.float16)] + [torch.randn(B, HKV, LK, 300, dtype=torch.float16)] * 2,
     ValueError, r"q: expected a head dim \(last dimension\) in 1..256, got 300"),
    (lambda: [torch.randn(B, HQ, LQ, 0, dtype=torch.float16)] + [torch.randn(B, HKV, LK, 0, dtype=torch.float16)] * 2,
     ValueError, r"q: expected a head dim .*got 0"),
]  # fmt: skip


@pytest.mark.parametrize("make,exc,pattern", BAD_TENSORS)
def test_bad_tensors(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sparge.attention(*make())
    if exc is ValueError and "head dim" not in pattern:
        with pytest.raises(exc, match=pattern):
            sparge.quantize(*make())


def test_last_dim_transposed_names_argument():
    q, k, v = _qkv()
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match=r"k: expected a contiguous last \(head-dim\) dimension, got stride 130; call k.contiguous\(\)"):
        sparge.attention(q, k_t, v)


BAD_KWARGS = [
    (dict(layout="BHLD"), ValueError, r"layout: expected one of 'HND', 'NHD', got 'BHLD'"),
    (dict(layout="NHD"), ValueError, r"k: expected batch size|k: expected head dim|v: expected|q: expected"),
    (dict(mode="sparse"), ValueError, r"mode: expected one of 'dense', 'topk', 'cdf', 'block_mask', got 'sparse'"),
    (dict(mode="block_mask"), ValueError, r"block_mask: expected a \[B, Hq, nbq, nbk\] tensor for mode 'block_mask', got None"),
    (dict(topk=1.5), ValueError, r"topk: expected a value in \[0, 1\], got 1.5"),
    (dict(topk=math.nan), ValueError, r"topk: expected a value in \[0, 1\], got nan"),
    (dict(topk=True), TypeError, r"topk: expected a float or a 1-D tensor of 4 per-head values, got bool"),
    (dict(topk="half"), TypeError, r"topk: expected a float or a 1-D tensor of 4 per-head values, got str"),
    (dict(cdfthreshd=-0.1), ValueError, r"cdfthreshd: expected a value in \[0, 1\], got -0.1"),
    (dict(simthreshd1=1.5), ValueError, r"simthreshd1: expected a value in \[-1, 1\], got 1.5"),
    (dict(pvthreshd=-1.0), ValueError, r"pvthreshd: expected a value >= 0 \(inf allowed\), got -1.0"),
    (dict(topk=torch.tensor([0.5, 0.5])), ValueError,
     r"topk: expected a float or a 1-D tensor of 4 per-head values \(one per query head\), got shape \(2,\)"),
    (dict(topk=[0.1, 0.2, 1.2, 0.3]), ValueError, r"topk\[2\]: expected a value in \[0, 1\], got 1.2"),
    (dict(pvthreshd=torch.tensor([1.0, -2.0, 3.0, 4.0])), ValueError, r"pvthreshd\[1\]: expected a value >= 0"),
    (dict(simthreshd1=torch.ones(4, dtype=torch.bool)), ValueError, r"simthreshd1: expected real per-head values"),
    (dict(scale=-1.0), ValueError, r"scale: expected None \(for D \*\* -0.5\) or a positive finite float, got -1.0"),
    (dict(scale=math.inf), ValueError, r"scale: expected None .*got inf"),
    (dict(block_size=(100, 64)), ValueError, r"block_size: expected \(block_q, block_k\), multiples of 16 in \[16, 1024\], got \(100, 64\)"),
    (dict(block_size=(2048, 64)), ValueError, r"block_size: .*got \(2048, 64\)"),
    (dict(block_size=128), ValueError, r"block_size: .*got 128"),
    (dict(causal_alignment="center", is_causal=True), ValueError, r"causal_alignment: expected one of 'top_left', 'bottom_right', got 'center'"),
    (dict(qk_quant_gran="per_tensor"), ValueError, r"qk_quant_gran: expected one of 'per_block', 'per_warp', 'per_thread', got 'per_tensor'"),
    (dict(pv_precision="fp4"), ValueError, r"pv_precision: expected one of 'fp8', 'fp16', 'fp8_fp16acc', got 'fp4'"),
    (dict(output_dtype=torch.int8), ValueError, r"output_dtype: expected None, torch.float16, torch.bfloat16 or torch.float32, got torch.int8"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,exc,pattern", BAD_KWARGS, ids=lambda x: str(x)[:40])
def test_bad_keyword_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sparge.attention(*_qkv(), **kwargs)


BAD_MASKS = [
    (torch.ones(B, HQ, 2, 3, dtype=torch.bool), r"block_mask: expected shape \[B, Hq, ceil\(Lq / 128\), ceil\(Lk / 64\)\] = \[1, 4, 1, 3\] \(size-1 dimensions broadcast\), got \[1, 4, 2, 3\]"),
    (torch.ones(HQ, 1, 3, dtype=torch.bool), r"block_mask: expected shape .*got \[4, 1, 3\]"),
    (torch.ones(B, HQ, 1, 3), r"block_mask: expected a bool or integer tensor, got dtype torch.float32"),
    (torch.ones(B, HQ, 1, 3, dtype=torch.bool, device="meta"), r"block_mask: expected a tensor on cpu \(the device of q\), got meta"),
]  # fmt: skip


@pytest.mark.parametrize("mask,pattern", BAD_MASKS)
def test_bad_block_masks(mask, pattern):
    with pytest.raises(ValueError, match=pattern):
        sparge.attention(*_qkv(), block_mask=mask)
    with pytest.raises(ValueError, match=pattern):
        sparge.block_sparse_attention(*_qkv(), mask)


def test_good_block_mask_shapes_are_accepted():
    for shape in ((B, HQ, 1, 3), (1, 1, 1, 3), (B, 1, 1, 1)):
        assert sparge.attention(*_qkv(), block_mask=torch.ones(shape, dtype=torch.bool)).shape == (B, HQ, LQ, D)


def test_block_mask_conflicts():
    mask = torch.ones(B, HQ, 1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mode: expected 'block_mask' or None when block_mask is given, got 'cdf'"):
        sparge.attention(*_qkv(), mode="cdf", block_mask=mask)
    with pytest.raises(TypeError, match=r"block_sparse_attention: unexpected argument 'topk'"):
        sparge.block_sparse_attention(*_qkv(), mask, topk=0.5)
    with pytest.raises(ValueError, match=r"block_mask: expected a \[B, Hq, nbq, nbk\] tensor, got None"):
        sparge.block_sparse_attention(*_qkv(), None)
    with pytest.raises(TypeError, match=r"block_mask: expected a torch.Tensor, got list"):
        sparge.attention(*_qkv(), block_mask=[[1]])


def test_stage_function_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"mode: expected 'dense', 'topk' or 'cdf'"):
        sparge.predict_blocks(q, k, mode="block_mask")
    with pytest.raises(TypeError, match=r"quantized: expected the QuantizedQKV returned by sparge.quantize, got tuple"):
        sparge.predict(tuple(sparge.quantize(q, k, v)))
    qz = sparge.quantize(q, k, v)
    pred = sparge.predict(qz)
    with pytest.raises(ValueError, match=r"index: expected a contiguous int32 tensor of shape \(1, 4, 1, 3\) on cpu, got torch.int64"):
        sparge.attend(qz, pred.index.long(), pred.count)
    with pytest.raises(ValueError, match=r"count: expected a contiguous int32 tensor of shape \(1, 4, 1\)"):
        sparge.attend(qz, pred.index, pred.count[:, :2])
    with pytest.raises(TypeError, match=r"index: expected a torch.Tensor, got NoneType"):
        sparge.attend(qz, None, pred.count)
    wrong_gran = qz._replace(qk_quant_gran="per_block")
    with pytest.raises(ValueError, match=r"quantized.q_scale: expected a contiguous torch.float32 tensor of shape \(1, 4, 2\)"):
        sparge.attend(wrong_gran, pred.index, pred.count)
    wrong_blocks = qz._replace(block_size=(64, 64))
    with pytest.raises(ValueError, match=r"quantized.q_pool: expected .*shape \(1, 4, 2, 64\)"):
        sparge.predict(wrong_blocks)
    with pytest.raises(ValueError, match=r"pvthreshd: expected a value >= 0"):
        sparge.attend(qz, pred.index, pred.count, pvthreshd=-3.0)
    with pytest.raises(ValueError, match=r"quantized.v: expected a contiguous torch.float8_e4m3fn tensor .* got torch.int16"):
        sparge.attend(qz._replace(v=qz.v.view(torch.uint8).to(torch.int16)), pred.index, pred.count)


def test_op_level_checks_protect_memory():
    """torch.ops.sparge.* called directly (bypassing sparge.api) still reject unsafe tensors."""
    q, k, v = _qkv()
    args = dict(layout=0, mode=3, block_score=0, topk=0.5, cdfthreshd=0.9, simthreshd1=-0.1, pvthreshd=15.0, causal=0,
                scale=0.0, block_q=128, block_k=64, select_flags=0, smooth_k=True, granularity=2, pv=0,
                output_dtype=torch.float16, return_lse=False, return_stats=False)  # fmt: skip
    small_mask = torch.ones(1, 1, 1, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"block_mask: expected a contiguous uint8 tensor of shape \(1, 4, 1, 3\)"):
        torch.ops.sparge.attention(q, k, v, small_mask, None, None, None, None, **args)
    with pytest.raises(ValueError, match=r"topk_per_head: expected a contiguous fp32 tensor of shape \[4\]"):
        torch.ops.sparge.attention(q, k, v, None, torch.ones(2), None, None, None, **{**args, "mode": 1})


def test_core_status_codes_map_to_python_exceptions():
    """kInvalidArgument → ValueError, kNotBuilt / kUnsupported → NotImplementedError, with the Status message."""
    common = dict(stream=0, blocks=(128, 64), q=0, k=0, v=0, dtype=0, q_strides=(0, 0, 0), k_strides=(0, 0, 0),
                  v_strides=(0, 0, 0), sm_scale=0.0, smooth_k=True, granularity=2, pv=0, out=(0,) * 13)  # fmt: skip
    with pytest.raises(ValueError, match=r"shape.head_dim: expected 1..256, got 0"):
        _C.quantize(device=0, shape=(1, 1, 1, 1, 1, 0), **common)
    with pytest.raises(ValueError, match=r"device: expected kCPU \(0\) or kCUDA \(1\), got 7"):
        _C.quantize(device=7, shape=(1, 1, 1, 1, 1, 64), **common)
    with pytest.raises(ValueError, match=r"in.q: expected a non-null pointer, got nullptr"):
        _C.quantize(device=0, shape=(1, 1, 1, 1, 1, 64), **common)
    if not _C.cuda_backend_built():
        with pytest.raises(NotImplementedError, match=r"device: the CUDA backend is not built into this library"):
            _C.quantize(device=1, shape=(1, 1, 1, 1, 1, 64), **common)
    assert issubclass(NotImplementedError, RuntimeError)


def test_module_info():
    assert isinstance(sparge.__version__, str) and sparge.__version__.count(".") == 2
    assert isinstance(sparge.cuda_backend_built(), bool) and isinstance(sparge.cuda_architectures(), str)


def test_attend_kernel_query():
    assert sparge.attend_kernel((1, 2, 256, 64), device="cpu") == "cpu"
    assert sparge.attend_kernel((1, 256, 2, 64), (1, 300, 1, 64), device="cpu", layout="NHD") == "cpu"
    with pytest.raises(ValueError, match="layout"):
        sparge.attend_kernel((1, 2, 256, 64), device="cpu", layout="BSHD")
    with pytest.raises(ValueError, match="block_q"):
        sparge.attend_kernel((1, 2, 256, 64), device="cpu", block_size=(0, 64))
    with pytest.raises(ValueError, match="pv_precision"):
        sparge.attend_kernel((1, 2, 256, 64), device="cpu", pv_precision="int4")
