"""sparge.attention_varlen: packed variable-length batches (cu_seqlens), per-sequence semantics.

Each packed sequence must give what attention gives on that sequence alone: exact attention
(fp64, computed per sequence with torch) within the dense-mode bounds, and bit for bit the
single-sequence sparge call, which shows that smoothing, quantization scales and block
prediction never mix sequences (a sequence with a large K offset would change its neighbours'
results otherwise).
"""

from __future__ import annotations

import math

import pytest
import torch

import sparge
from helpers import assert_close_to, assert_equal
from sparge.testing import reference_attention, structured_qkv

D = 64
DENSE = dict(cos_min=0.999, rel_l1_max=0.03)  # INT8 Q·K + FP8 P·V, as the dense tests of test_attention.py


def _pack(seed, lengths_q, lengths_k, heads_q=4, heads_kv=2, dtype=torch.float16, k_offsets=None):
    """Packed [total, H, D] tensors of independent structured sequences and int32 cu_seqlens."""
    qs, ks, vs = [], [], []
    for i, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        q, k, v = structured_qkv(1, heads_q, heads_kv, lq, lk, D, dtype=dtype, layout="NHD", seed=seed + 7 * i)
        if k_offsets is not None:
            k = k + k_offsets[i]
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0])
    cu = [torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
          for lengths in (lengths_q, lengths_k)]  # fmt: skip
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), cu[0], cu[1]


def _sequence(x, cu, i):
    return x[int(cu[i]) : int(cu[i + 1])].unsqueeze(0)  # [1, L, H, D] (NHD)


CASES = {
    # name: (lengths_q, lengths_k, attention kwargs)
    "dense": ([300, 128, 513], [300, 128, 513], dict(mode="dense")),
    "causal_top_left": ([300, 77, 640], [300, 77, 640], dict(mode="dense", is_causal=True)),
    "bottom_right_kv_cache": ([64, 200, 1], [400, 200, 333], dict(mode="dense", is_causal=True,
                                                               causal_alignment="bottom_right")),  # fmt: skip
    "topk_with_empty_sequences": ([256, 0, 384, 45], [320, 50, 0, 45], dict(mode="topk", topk=0.4)),
    "cdf_gqa_fp32": ([512, 192], [256, 700], dict(mode="cdf", cdfthreshd=0.9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_each_sequence_alone(case, seed, poison):
    lengths_q, lengths_k, kwargs = CASES[case]
    dtype = torch.float32 if case.endswith("fp32") else torch.float16
    # very different K means per sequence: a mean taken over the whole pack would be off for every one
    q, k, v, cu_q, cu_k = _pack(seed, lengths_q, lengths_k, dtype=dtype, k_offsets=[0.0, 6.0, -4.0, 2.0])
    o, lse = sparge.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True, **kwargs)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:2] and lse.dtype == torch.float32
    for i in range(len(lengths_q)):
        qi, ki, vi = _sequence(q, cu_q, i), _sequence(k, cu_k, i), _sequence(v, cu_k, i)
        oi, lse_i = o[int(cu_q[i]) : int(cu_q[i + 1])], lse[int(cu_q[i]) : int(cu_q[i + 1])]
        alone, alone_lse = sparge.attention(qi, ki, vi, layout="NHD", return_lse=True, **kwargs)
        assert_equal(oi, alone[0], f"{case}: sequence {i} vs alone, seed={seed}")
        assert_equal(lse_i, alone_lse[0].transpose(0, 1), f"{case}: lse of sequence {i}, seed={seed}")
        if kwargs["mode"] == "dense" and qi.size(1) > 0:
            causal = {key: kwargs[key] for key in ("is_causal", "causal_alignment") if key in kwargs}
            ref, ref_lse = reference_attention(qi, ki, vi, layout="NHD", **causal)
            assert_close_to(oi, ref[0], **DENSE, context=f"{case}: sequence {i} vs exact, seed={seed}")
            finite = ref_lse[0].isfinite()
            assert torch.equal(finite, lse_i.transpose(0, 1).isfinite())
            # as test_attention's LSE_TOL: INT8 scores, and in the fp8 modes l sums P's e4m3 codes
            assert torch.allclose(lse_i.transpose(0, 1)[finite].double(), ref_lse[0][finite], atol=0.1)
        if ki.size(1) == 0:
            assert bool((oi == 0).all()) and bool((lse_i == -math.inf).all())


def test_sparsity_sums_block_counts(seed):
    lengths_q, lengths_k = [512, 256, 384], [512, 640, 128]
    q, k, v, cu_q, cu_k = _pack(seed, lengths_q, lengths_k)
    o, sparsity = sparge.attention_varlen(q, k, v, cu_q, cu_k, 512, 640, topk=0.3, return_sparsity=True)
    kept = allowed = 0
    for i in range(3):
        pred = sparge.predict(sparge.quantize(_sequence(q, cu_q, i), _sequence(k, cu_k, i), _sequence(v, cu_k, i),
                                              layout="NHD"), topk=0.3)  # fmt: skip
        kept += int(pred.stats[sparge.STAT_BLOCKS_KEPT])
        allowed += int(pred.stats[sparge.STAT_BLOCKS_ALLOWED])
    assert 0 < kept < allowed
    assert sparsity.shape == () and float(sparsity) == pytest.approx(1 - kept / allowed, abs=1e-6)
    assert_equal(o, sparge.attention_varlen(q, k, v, cu_q, cu_k, 512, 640, topk=0.3), "o with return_sparsity")


def test_per_sequence_block_masks_and_output_dtype(seed):
    q, k, v, cu_q, cu_k = _pack(seed, [256, 130], [192, 300], dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(4, 2, 3, generator=g) < 0.5, torch.rand(1, 4, 2, 5, generator=g) < 0.5]
    o = sparge.attention_varlen(q, k, v, cu_q, cu_k, 256, 300, block_mask=masks, output_dtype=torch.float32)
    assert o.dtype == torch.float32
    for i in range(2):
        alone = sparge.attention(_sequence(q, cu_q, i), _sequence(k, cu_k, i), _sequence(v, cu_k, i), layout="NHD",
                                 block_mask=masks[i] if masks[i].dim() == 4 else masks[i][None],
                                 output_dtype=torch.float32)  # fmt: skip
        assert_equal(o[int(cu_q[i]) : int(cu_q[i + 1])], alone[0], f"block mask sequence {i}")
    with pytest.raises(ValueError, match="block_mask: expected a list"):
        sparge.attention_varlen(q, k, v, cu_q, cu_k, 256, 300, block_mask=masks[0])
    with pytest.raises(ValueError, match="block_mask: expected 2 masks"):
        sparge.attention_varlen(q, k, v, cu_q, cu_k, 256, 300, block_mask=masks[:1])


def test_int64_cu_seqlens_and_empty_batches(seed):
    q, k, v, cu_q, cu_k = _pack(seed, [200, 90], [120, 300])
    o = sparge.attention_varlen(q, k, v, cu_q, cu_k, 200, 300)
    assert_equal(sparge.attention_varlen(q, k, v, cu_q.long(), cu_k.long(), 200, 300), o, "int64 cu_seqlens")
    empty = torch.zeros(1, dtype=torch.int32)
    o0, lse0, s0 = sparge.attention_varlen(q[:0], k[:0], v[:0], empty, empty, 0, 0, return_lse=True,
                                           return_sparsity=True)  # fmt: skip
    assert o0.shape == (0, 4, D) and lse0.shape == (0, 4) and float(s0) == 0.0
    no_queries = torch.tensor([0, 0, 0], dtype=torch.int32)
    assert sparge.attention_varlen(q[:0], k, v, no_queries, cu_k, 0, 300).shape == (0, 4, D)
    with pytest.raises(ValueError, match="topk"):  # the settings are checked even without a query
        sparge.attention_varlen(q[:0], k[:0], v[:0], empty, empty, 0, 0, topk=2.0)


def test_rejects_bad_inputs(seed):
    q, k, v, cu_q, cu_k = _pack(seed, [100, 60], [80, 50])
    ok = (q, k, v, cu_q, cu_k, 100, 80)

    def call(*args, **kwargs):
        args = args + ok[len(args) :]
        return sparge.attention_varlen(*args, **kwargs)

    bad = [
        ((q[None],), {}, ValueError, "q: expected a 3-D packed tensor"),
        ((q, k, v[:, :1]), {}, ValueError, "v: expected the shape of k"),
        ((q, k.float(), v.float()), {}, ValueError, "k: expected dtype"),
        ((q, k, v, cu_q.float()), {}, ValueError, "cu_seqlens_q: expected dtype torch.int32"),
        ((q, k, v, cu_q[None]), {}, ValueError, "cu_seqlens_q: expected a 1-D tensor"),
        ((q, k, v, cu_q.tolist()), {}, TypeError, "cu_seqlens_q: expected a torch.Tensor"),
        ((q, k, v, cu_q.to("meta")), {}, ValueError, "cu_seqlens_q: expected a tensor on cpu"),
        ((q, k, v, cu_q + 1), {}, ValueError, r"cu_seqlens_q\[0\] == 0"),
        ((q, k, v, torch.tensor([0, 170, 160], dtype=torch.int32)), {}, ValueError, r"non-decreasing.*\[2\] = 160"),
        ((q, k, v, cu_q, torch.tensor([0, 80, 129], dtype=torch.int32)), {}, ValueError,
         r"cu_seqlens_k\[-1\] == 130"),
        ((q, k, v, cu_q, cu_k[:2]), {}, ValueError, "cu_seqlens_k: expected 3 entries"),
        ((q, k, v, cu_q, cu_k, 99), {}, ValueError, r"max_seqlen_q: expected at least .*\(100, sequence 0\)"),
        ((q, k, v, cu_q, cu_k, 100, 79), {}, ValueError, "max_seqlen_k"),
        ((q, k, v, cu_q, cu_k, 100.0), {}, TypeError, "max_seqlen_q: expected an int"),
        ((q, k, v, cu_q, cu_k, True), {}, TypeError, "max_seqlen_q"),
        ((q, k, v, cu_q, cu_k, -1), {}, ValueError, "max_seqlen_q"),
        ((), {"layout": "HND"}, TypeError, "layout"),
        ((), {"bogus": 1}, TypeError, "bogus"),
        ((), {"mode": "sparse"}, ValueError, "mode"),
        ((), {"pvthreshd": -1.0}, ValueError, "pvthreshd"),
    ]  # fmt: skip
    for args, kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            call(*args, **kwargs)
    call()  # the untouched arguments are valid
    assert torch.equal(cu_q, torch.tensor([0, 100, 160], dtype=torch.int32))  # inputs not modified


def test_sdpa_key_padding_matches_exact_attention(seed, poison):
    """sparge.scaled_dot_product_attention with key-padding masks in their usual forms."""
    q, k, v = structured_qkv(3, 4, 2, 300, 350, D, seed=seed)
    keep = torch.ones(3, 350, dtype=torch.bool)
    keep[0, 280:] = False
    keep[1, :40] = False  # left padding: not a prefix
    keep[2, ::3] = False
    forms = {
        "bool [B, 1, 1, Lk]": keep[:, None, None, :],
        "finfo.min [B, 1, Lq, Lk]": torch.zeros(3, 1, 300, 350, dtype=q.dtype).masked_fill(
            ~keep[:, None, None, :], torch.finfo(q.dtype).min),
        "-10000 [B, Hq, 1, Lk]": ((~keep).to(q.dtype) * -10000.0)[:, None, None, :].expand(3, 4, 1, 350),
    }  # fmt: skip
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=keep[:, None, None, :], enable_gqa=True)
    outs = {}
    for name, mask in forms.items():
        outs[name] = sparge.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, mode="dense")
        assert_close_to(outs[name], ref, **DENSE, context=f"{name} seed={seed}")
    first = next(iter(outs.values()))
    for name, o in outs.items():
        assert_equal(o, first, f"{name} vs bool mask")
    # one mask for the whole batch (2-D [Lq, Lk], constant over queries): a single call on the kept keys
    shared = keep[2].expand(300, 350)
    o = sparge.scaled_dot_product_attention(q, k, v, attn_mask=shared, enable_gqa=True, mode="dense")
    assert_equal(o, sparge.attention(q, k[:, :, keep[2]], v[:, :, keep[2]], mode="dense"), "shared mask")


def test_sdpa_fully_masked_rows_follow_sdpa(seed):
    q, k, v = structured_qkv(2, 2, None, 200, 260, D, dtype=torch.float32, seed=seed)
    keep = torch.ones(2, 260, dtype=torch.bool)
    keep[1] = False  # no key at all: SDPA (math backend) outputs 0 with bool or -inf masks
    o = sparge.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], mode="dense")
    assert bool((o[1] == 0).all())
    assert_equal(o[:1], sparge.attention(q[:1], k[:1], v[:1], mode="dense"), "row 0")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    assert bool((sdpa[1] == 0).all())
    inf_bias = torch.zeros(2, 1, 1, 260).masked_fill(~keep[:, None, None, :], -math.inf)
    assert_equal(sparge.scaled_dot_product_attention(q, k, v, attn_mask=inf_bias, mode="dense"), o, "-inf mask")
    # a row of finite biases only: SDPA's result depends on rounding (finfo.min absorbs the scores)
    bias = torch.zeros(2, 1, 1, 260)
    bias[1] = torch.finfo(torch.float32).min
    with pytest.raises(NotImplementedError, match="key-padding"):
        sparge.scaled_dot_product_attention(q, k, v, attn_mask=bias)
