"""torch.library registration: opcheck on every op, and torch.compile(fullgraph=True) with no graph break."""

from __future__ import annotations

import pytest
import torch

import sparge
from helpers import assert_equal
from sparge.testing import structured_qkv


def _op_args(q, k, v, **overrides):
    args = dict(layout=0, mode=1, block_score=0, topk=0.5, cdfthreshd=0.9, simthreshd1=-0.1, pvthreshd=15.0, causal=1,
                scale=0.0, block_q=64, block_k=32, select_flags=0, smooth_k=True, granularity=2, pv=0,
                output_dtype=q.dtype, return_lse=True, return_stats=True)  # fmt: skip
    args.update(overrides)
    return args


def test_opcheck_attention(seed):
    q, k, v = structured_qkv(1, 4, 2, 150, 130, 64, seed=seed)
    per_head = torch.tensor([0.2, 0.4, 0.6, 0.8])
    torch.library.opcheck(torch.ops.sparge.attention.default, (q, k, v, None, per_head, None, None, None),
                          _op_args(q, k, v))  # fmt: skip
    mask = (torch.rand(1, 4, 3, 5) < 0.5).to(torch.uint8)
    qn, kn, vn = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    torch.library.opcheck(torch.ops.sparge.attention.default, (qn, kn, vn, mask, None, None, None, None),
                          _op_args(q, k, v, layout=1, mode=3, return_lse=False, output_dtype=torch.float32))  # fmt: skip


def test_opcheck_stages(seed):
    q, k, v = structured_qkv(1, 2, 1, 150, 130, 64, seed=seed, dtype=torch.bfloat16)
    stage = dict(scale=0.0, smooth_k=True, granularity=1, pv=1, block_q=64, block_k=32)
    torch.library.opcheck(torch.ops.sparge.quantize.default, (q, k, v), dict(layout=0, **stage))
    quantized = list(torch.ops.sparge.quantize(q, k, v, layout=0, **stage))
    select = dict(mode=2, block_score=1, topk=0.5, cdfthreshd=0.9, simthreshd1=-0.1, causal=2, scale=0.0, granularity=1,
                  block_q=64, block_k=32, select_flags=3)  # fmt: skip
    torch.library.opcheck(torch.ops.sparge.predict.default, (quantized, None, None, torch.full((2,), 0.95), None), select)
    index, count, _, _ = torch.ops.sparge.predict(quantized, None, None, None, None, **select)
    attend = dict(layout=1, causal=2, scale=0.0, granularity=1, pv=1, block_q=64, block_k=32, pvthreshd=5.0,
                  output_dtype=torch.float16, return_lse=True, return_stats=True)  # fmt: skip
    torch.library.opcheck(torch.ops.sparge.attend.default, (quantized, index, count, torch.tensor([1.0, 30.0])), attend)


def _full_pipeline(q, k, v, heads):
    o, lse, s = sparge.attention(q, k, v, mode="topk", topk=torch.linspace(0.2, 0.8, heads), is_causal=True,
                                 return_lse=True, return_sparsity=True)  # fmt: skip
    quantized = sparge.quantize(q, k, v, qk_quant_gran="per_warp")
    pred = sparge.predict(quantized, mode="cdf", cdfthreshd=0.9, is_causal=True)
    o2, stats = sparge.attend(quantized, pred.index, pred.count, is_causal=True, return_stats=True)
    mask = sparge.predict_blocks(q, k, topk=0.3)
    o3 = sparge.block_sparse_attention(q, k, v, mask, pvthreshd=8.0)
    return o * 2, lse, s, o2, stats, o3


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_no_graph_break(seed, backend):
    q, k, v = structured_qkv(1, 4, 2, 200, 200, 64, seed=seed)
    torch._dynamo.reset()
    eager = _full_pipeline(q, k, v, 4)
    compiled = torch.compile(_full_pipeline, fullgraph=True, backend=backend)(q, k, v, 4)
    for a, b in zip(compiled, eager):
        assert_equal(a, b, f"compiled ({backend}) vs eager, seed={seed}")


def test_dynamo_explain_reports_one_graph(seed):
    q, k, v = structured_qkv(1, 4, 2, 130, 130, 32, seed=seed)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_full_pipeline)(q, k, v, 4)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_compile_inductor_dynamic_shapes(seed):
    torch._dynamo.reset()

    def f(q, k, v):
        o, lse = sparge.attention(q * 1.0, k, v, layout="NHD", return_lse=True)
        return o, lse.exp()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for length in (96, 161):
        q, k, v = structured_qkv(2, 2, 1, length, length + 20, 64, seed=seed + length, layout="NHD")
        (o_c, p_c), (o_e, p_e) = compiled(q, k, v), f(q, k, v)
        assert_equal(o_c, o_e, f"inductor L={length} seed={seed}")
        torch.testing.assert_close(p_c, p_e)  # inductor's exp may differ from eager's in the last bit


def test_eager_calls_skip_the_dispatcher_only_where_nothing_needs_it():
    from sparge import _ops

    q = torch.randn(1, 2, 64, 64)
    assert _ops.eager_attention(q, q, q) is _ops._attention_impl
    assert _ops.eager_attention(q.requires_grad_(), q, q) is _ops.attention
    meta = torch.empty(1, 2, 64, 64, device="meta")
    assert _ops.eager_attention(meta, meta, meta) is _ops.attention
    traced = torch.compile(lambda x: _ops.eager_attention(x, x, x) is _ops.attention, fullgraph=True)
    assert traced(torch.randn(1, 2, 64, 64))
