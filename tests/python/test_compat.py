"""sparge.compat: the original SpargeAttn / Sparse SageAttention / SageAttention entry points.

Each compat function must equal, bit for bit, the native sparge.attention call its docstring
names; its signature must carry the defaults of the original libraries' documentation (table
below, written from the reference READMEs and, where they are silent, the original sources);
arguments the originals silently ignored must raise.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import sparge
from helpers import assert_close_to, assert_equal
from sparge import compat
from sparge.testing import reference_attention, structured_qkv

B, H, L, D = 1, 2, 300, 64
NOT_CAUSAL = ("block_sparse_sage2_attn_cuda",)  # no is_causal parameter in the original

# native keyword arguments of sparge.attention each compat function must reproduce (with its defaults)
SPAS2 = dict(qk_quant_gran="per_thread", pv_precision="fp8", block_score="mean")
SPAS1 = dict(qk_quant_gran="per_block", pv_precision="fp16", block_score="mean")
NATIVE = {
    "spas_sage2_attn_meansim_topk_cuda": dict(mode="topk", topk=0.5, simthreshd1=-0.1, pvthreshd=15.0, **SPAS2),
    "spas_sage2_attn_meansim_cuda": dict(mode="cdf", cdfthreshd=0.98, simthreshd1=0.6, pvthreshd=50.0,
                                         cdf_sharpen=False, **SPAS2),
    "spas_sage_attn_meansim_topk_cuda": dict(mode="topk", topk=0.5, simthreshd1=-0.1, pvthreshd=15.0, **SPAS1),
    "spas_sage_attn_meansim_cuda": dict(mode="cdf", cdfthreshd=0.98, simthreshd1=0.6, pvthreshd=50.0,
                                        cdf_sharpen=False, **SPAS1),
    "block_sparse_sage2_attn_cuda": dict(mode="dense", pvthreshd=20.0, block_size=(128, 64), **SPAS2),
    "sparse_sageattn": dict(mode="dense", pvthreshd=math.inf, block_size=(128, 64), **SPAS1),
    "sageattn": dict(mode="dense", qk_quant_gran="per_thread", pv_precision="fp8"),
    "sageattn_qk_int8_pv_fp16_cuda": dict(mode="dense", qk_quant_gran="per_thread", pv_precision="fp16"),
    "sageattn_qk_int8_pv_fp16_triton": dict(mode="dense", qk_quant_gran="per_block", pv_precision="fp16"),
    "sageattn_qk_int8_pv_fp8_cuda": dict(mode="dense", qk_quant_gran="per_thread", pv_precision="fp8"),
    "sageattn_qk_int8_pv_fp8_cuda_sm90": dict(mode="dense", qk_quant_gran="per_thread", pv_precision="fp8"),
}

# Defaults of the originals. "README": the reference READMEs (SpargeAttn: topk API
# `simthreshd1=-0.1, topk=0.5, pvthreshd=15`; block-sparse API signature `mask_id=None,
# scale=None, pvthreshd=20, attention_sink=False, tensor_layout="HND", return_sparsity=False`;
# Sparse SageAttention: `mask_id=None, is_causal=False, tensor_layout="HND"`; SageAttention:
# `tensor_layout="HND", is_causal=False`). Others from the original sources where the READMEs are
# silent (CDF APIs: simthreshd1=0.6, cdfthreshd=0.98, pvthreshd=50; SageAttention kernels:
# qk_quant_gran="per_thread", pv_accum_dtype, smooth_k=True, smooth_v=False, return_lse=False).
_SPAS_COMMON = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, smooth_k=True, attention_sink=False,
                    tensor_layout="HND", return_sparsity=False, return_lse=False)  # fmt: skip
_SAGE_COMMON = dict(tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False)
ORIGINAL_DEFAULTS = {
    "spas_sage2_attn_meansim_topk_cuda": dict(_SPAS_COMMON, simthreshd1=-0.1, topk=0.5, pvthreshd=15, cdfthreshd=None),
    "spas_sage_attn_meansim_topk_cuda": dict(_SPAS_COMMON, simthreshd1=-0.1, topk=0.5, pvthreshd=15, cdfthreshd=None),
    "spas_sage2_attn_meansim_cuda": dict(_SPAS_COMMON, simthreshd1=0.6, cdfthreshd=0.98, pvthreshd=50),
    "spas_sage_attn_meansim_cuda": dict(_SPAS_COMMON, simthreshd1=0.6, cdfthreshd=0.98, pvthreshd=50),
    "block_sparse_sage2_attn_cuda": dict(mask_id=None, scale=None, pvthreshd=20, attention_sink=False,
                                         tensor_layout="HND", return_sparsity=False, dropout_p=0.0, smooth_k=True,
                                         return_lse=False),  # fmt: skip
    "sparse_sageattn": dict(mask_id=None, is_causal=False, tensor_layout="HND"),
    "sageattn": dict(_SAGE_COMMON),
    "sageattn_qk_int8_pv_fp16_cuda": dict(_SAGE_COMMON, qk_quant_gran="per_thread", pv_accum_dtype="fp32",
                                          smooth_k=True, smooth_v=False),  # fmt: skip
    "sageattn_qk_int8_pv_fp16_triton": dict(_SAGE_COMMON, quantization_backend="triton", smooth_k=True),
    "sageattn_qk_int8_pv_fp8_cuda": dict(_SAGE_COMMON, qk_quant_gran="per_thread", pv_accum_dtype="fp32+fp32",
                                         smooth_k=True, smooth_v=False),  # fmt: skip
    "sageattn_qk_int8_pv_fp8_cuda_sm90": dict(_SAGE_COMMON, qk_quant_gran="per_thread", pv_accum_dtype="fp32+fp32",
                                              smooth_k=True),  # fmt: skip
    "sageattn_varlen": dict(is_causal=False, sm_scale=None, smooth_k=True),
}
# leading positional parameters after (q, k, v), in the originals' order
ORIGINAL_ORDER = {
    "spas_sage2_attn_meansim_topk_cuda": ("attn_mask", "dropout_p", "is_causal", "scale"),
    "spas_sage2_attn_meansim_cuda": ("attn_mask", "dropout_p", "is_causal", "scale"),
    "block_sparse_sage2_attn_cuda": ("mask_id",),
    "sparse_sageattn": ("mask_id", "is_causal", "tensor_layout"),
    "sageattn": ("tensor_layout", "is_causal", "sm_scale", "return_lse"),
    "sageattn_qk_int8_pv_fp16_cuda": ("tensor_layout", "is_causal", "qk_quant_gran", "sm_scale", "pv_accum_dtype"),
    "sageattn_qk_int8_pv_fp8_cuda": ("tensor_layout", "is_causal", "qk_quant_gran", "sm_scale", "pv_accum_dtype"),
    "sageattn_varlen": ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "is_causal", "sm_scale",
                        "smooth_k"),  # fmt: skip
}
SAGE_FUNCTIONS = [name for name in NATIVE if name.startswith("sageattn")]


@pytest.mark.parametrize("name", sorted(ORIGINAL_DEFAULTS))
def test_defaults_match_originals(name):
    params = inspect.signature(getattr(compat, name)).parameters
    assert list(params)[:3] == ["q", "k", "v"], name
    for param, default in ORIGINAL_DEFAULTS[name].items():
        assert param in params, f"{name}: missing parameter {param}"
        got = params[param].default
        assert got == default and type(got) is type(default), f"{name}({param}=...): default {got!r}, original {default!r}"
    for i, param in enumerate(ORIGINAL_ORDER.get(name, ()), start=3):
        assert list(params)[i] == param, f"{name}: positional parameter {i} is {list(params)[i]}, original {param}"
    for (function, param), (value, _) in compat.DEFAULTS.items():
        if function == name:
            assert params[param].default == value, f"compat.DEFAULTS disagrees with {name}({param}=...)"
    assert "output_dtype" not in params or params["output_dtype"].default is None


def test_every_compat_function_is_tested():
    assert set(NATIVE) == set(compat.__all__) - {"DEFAULTS", "sageattn_varlen"}  # varlen: tests below
    assert sparge.compat is compat


def _mask(qkv_shape, layout, seed, len_k=None):
    b, h, lq = (qkv_shape[0], qkv_shape[1], qkv_shape[2]) if layout == "HND" else (qkv_shape[0], qkv_shape[2],
                                                                                      qkv_shape[1])  # fmt: skip
    lk = lq if len_k is None else len_k
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, -(-lq // 128), -(-lk // 64), generator=g) < 0.6


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("name,is_causal", [(name, causal) for name in sorted(NATIVE) for causal in (False, True)
                                            if not (causal and name in NOT_CAUSAL)])  # fmt: skip
def test_equals_native_call(name, is_causal, layout, seed, poison):
    q, k, v = structured_qkv(B, H, None, L, None, D, layout=layout, seed=seed)
    kwargs = dict(tensor_layout=layout)
    native = dict(NATIVE[name], layout=layout)
    if is_causal:
        kwargs["is_causal"] = native["is_causal"] = True
    args = (q, k, v)
    if name in ("block_sparse_sage2_attn_cuda", "sparse_sageattn"):
        mask = _mask(q.shape, layout, seed)
        args += (mask,)
        native.update(mode="block_mask", block_mask=mask)
    out = getattr(compat, name)(*args, **kwargs)
    ref = sparge.attention(q, k, v, **native)
    assert_equal(out, ref, f"{name} causal={is_causal} {layout} seed={seed}")


@pytest.mark.parametrize("name", ["block_sparse_sage2_attn_cuda", "sparse_sageattn"])
def test_mask_id_none_is_dense(name, seed):
    q, k, v = structured_qkv(B, H, None, L, None, D, seed=seed)
    out = getattr(compat, name)(q, k, v)
    assert_equal(out, sparge.attention(q, k, v, **NATIVE[name]), f"{name} seed={seed}")
    full = torch.ones(B, H, 3, 5, dtype=torch.bool)
    assert_equal(out, getattr(compat, name)(q, k, v, full), f"{name}: all-ones mask vs None, seed={seed}")


def test_variants_differ(seed):
    """The bit-exact tests above can only fail if the variants compute different things."""
    q, k, v = structured_qkv(B, H, None, L, None, D, seed=seed)
    outs = {name: getattr(compat, name)(q, k, v) for name in NATIVE}
    distinct = [("spas_sage2_attn_meansim_topk_cuda", "spas_sage2_attn_meansim_cuda"),
                ("spas_sage2_attn_meansim_topk_cuda", "spas_sage_attn_meansim_topk_cuda"),
                ("spas_sage_attn_meansim_topk_cuda", "spas_sage_attn_meansim_cuda"),
                ("sageattn", "sageattn_qk_int8_pv_fp16_cuda"),
                ("sageattn_qk_int8_pv_fp16_cuda", "sageattn_qk_int8_pv_fp16_triton")]  # fmt: skip
    for a, b in distinct:
        assert not torch.equal(outs[a], outs[b]), f"{a} and {b} gave identical outputs (seed={seed})"
    # the README default topk=0.5 differs from the source's 0.35
    assert not torch.equal(outs["spas_sage2_attn_meansim_topk_cuda"],
                           compat.spas_sage2_attn_meansim_topk_cuda(q, k, v, topk=0.35))  # fmt: skip


@pytest.mark.parametrize("name", [n for n in NATIVE if n.startswith("spas")])
def test_spas_options_and_returns(name, seed):
    q, k, v = structured_qkv(1, 4, 2, 200, 330, 64, dtype=torch.bfloat16, seed=seed)  # GQA, Lq != Lk, Lq < 256
    heads = torch.tensor([-0.2, 0.0, 0.3, 0.9])
    pv = [10.0, 15.0, 20.0, math.inf]
    f = getattr(compat, name)
    native = dict(NATIVE[name], simthreshd1=heads, pvthreshd=pv, attention_sink=True, scale=0.1,
                  output_dtype=torch.float32)  # fmt: skip
    kwargs = dict(simthreshd1=heads, pvthreshd=pv, attention_sink=True, scale=0.1, output_dtype=torch.float32)
    o, sparsity = f(q, k, v, **kwargs, return_sparsity=True)
    o_ref, s_ref = sparge.attention(q, k, v, **native, return_sparsity=True)
    assert_equal(o, o_ref, f"{name} seed={seed}")
    assert isinstance(sparsity, float) and sparsity == float(s_ref)
    o, lse = f(q, k, v, **kwargs, return_lse=True)
    o_ref, lse_ref = sparge.attention(q, k, v, **native, return_lse=True)
    assert_equal(o, o_ref, name)
    assert_equal(lse, lse_ref, name)
    with pytest.raises(ValueError, match="return_lse"):
        f(q, k, v, return_lse=True, return_sparsity=True)


@pytest.mark.parametrize("name", ["spas_sage2_attn_meansim_topk_cuda", "spas_sage_attn_meansim_topk_cuda"])
def test_topk_functions_cdf_fallback(name, seed):
    q, k, v = structured_qkv(B, H, None, L, None, D, seed=seed)
    f = getattr(compat, name)
    ref = sparge.attention(q, k, v, **dict(NATIVE[name], mode="cdf", cdfthreshd=0.9, cdf_sharpen=False))
    assert_equal(f(q, k, v, topk=None, cdfthreshd=0.9), ref, name)
    with pytest.raises(ValueError, match="cdfthreshd"):
        f(q, k, v, cdfthreshd=0.9)  # topk=0.5 and cdfthreshd both set: ambiguous
    per_head = torch.tensor([0.2, 0.7])
    assert_equal(f(q, k, v, topk=per_head), sparge.attention(q, k, v, **dict(NATIVE[name], topk=per_head)), name)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("lengths", [(300, 300), (300, 200), (100, 450)])
def test_mask_id_odd_lengths(lengths, layout, seed):
    len_q, len_k = lengths
    q, k, v = structured_qkv(B, H, None, len_q, len_k, D, layout=layout, seed=seed)
    mask = _mask(q.shape, layout, seed, len_k)
    assert mask.shape == (B, H, math.ceil(len_q / 128), math.ceil(len_k / 64))
    mask[0, 0, 0] = False  # a row of blocks with nothing kept outputs zeros
    o = compat.block_sparse_sage2_attn_cuda(q, k, v, mask, tensor_layout=layout)
    native = dict(NATIVE["block_sparse_sage2_attn_cuda"], mode="block_mask", block_mask=mask, layout=layout)
    assert_equal(o, sparge.attention(q, k, v, **native), f"{lengths} {layout} seed={seed}")
    o_hnd = o if layout == "HND" else o.transpose(1, 2)
    assert bool((o_hnd[0, 0, : min(128, len_q)] == 0).all())
    o1 = compat.sparse_sageattn(q, k, v, mask, tensor_layout=layout)
    ref, _ = reference_attention(q, k, v, layout=layout, block_mask=mask)
    assert_close_to(o1, ref, cos_min=0.999, rel_l1_max=0.03, context=f"sparse_sageattn {lengths} {layout}")
    # attention_sink adds the first K block to every row
    o2 = compat.block_sparse_sage2_attn_cuda(q, k, v, mask, tensor_layout=layout, attention_sink=True)
    sink = mask.clone()
    sink[..., 0] = True
    assert_equal(o2, sparge.attention(q, k, v, **dict(native, block_mask=sink)), "attention_sink")


@pytest.mark.parametrize("name", ["block_sparse_sage2_attn_cuda", "sparse_sageattn"])
def test_mask_id_wrong_shape(name):
    q, k, v = structured_qkv(B, H, None, 300, 200, D, seed=0)
    f = getattr(compat, name)
    for shape in [(1, 2, 2, 3), (1, 2, 3, 3), (1, 2, 2, 4), (1, 1, 3, 4), (2, 3, 4), (1, 2, 3, 4, 1)]:
        with pytest.raises(ValueError, match="mask_id"):  # incl. the floor shape (300 // 128, 200 // 64)
            f(q, k, v, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_id"):
        f(q, k, v, torch.ones(1, 2, 3, 4))  # float mask
    with pytest.raises(TypeError, match="mask_id"):
        f(q, k, v, [[1]])
    f(q, k, v, torch.ones(1, 2, 3, 4, dtype=torch.int32))


@pytest.mark.parametrize("name", [n for n in NATIVE if n.startswith("spas")])
def test_spas_rejects_attn_mask_and_dropout(name):
    q, k, v = structured_qkv(B, H, None, 200, None, D, seed=0)
    f = getattr(compat, name)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        f(q, k, v, torch.ones(200, 200, dtype=torch.bool).tril())  # positional, as SDPA; not a key-padding mask
    with pytest.raises(NotImplementedError, match="dropout_p"):
        f(q, k, v, None, 0.1)
    with pytest.raises(TypeError):
        f(q, k, v, unknown=1)
    with pytest.raises(ValueError, match="tensor_layout"):
        f(q, k, v, tensor_layout="BHLD")
    f(q, k, v, None, 0.0, True)  # the no-op values are accepted


def test_block_sparse_rejects():
    q, k, v = structured_qkv(B, H, None, 200, None, D, seed=0)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        compat.block_sparse_sage2_attn_cuda(q, k, v, dropout_p=0.5)
    with pytest.raises(TypeError):  # README and source disagree on positional order: keyword-only
        compat.block_sparse_sage2_attn_cuda(q, k, v, None, 0.1)
    with pytest.raises(TypeError):
        compat.block_sparse_sage2_attn_cuda(q, k, v, attn_mask=None)
    with pytest.raises(TypeError):
        compat.sparse_sageattn(q, k, v, dropout_p=0.0)


@pytest.mark.parametrize("name", SAGE_FUNCTIONS)
def test_sage_kwargs(name, seed):
    q, k, v = structured_qkv(B, H, None, 200, None, D, seed=seed)
    f = getattr(compat, name)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        f(q, k, v, attn_mask=torch.ones(200, 200, dtype=torch.bool).tril())  # not a key-padding mask
    with pytest.raises(NotImplementedError, match="dropout_p"):
        f(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match="'bogus'.*'window_size'"):
        f(q, k, v, window_size=(1, 1), bogus=3)
    with pytest.raises(NotImplementedError, match="smooth_v"):
        f(q, k, v, smooth_v=True)
    with pytest.raises(ValueError, match="tensor_layout"):
        f(q, k, v, "BHLD")
    with pytest.raises(ValueError, match="scale"):
        f(q, k, v, sm_scale=0.1, scale=0.2)
    # scale (SDPA name) is honoured, not dropped
    by_scale = f(q, k, v, scale=0.05)
    assert_equal(by_scale, f(q, k, v, sm_scale=0.05), name)
    assert_equal(by_scale, sparge.attention(q, k, v, **dict(NATIVE[name], scale=0.05)), name)
    assert not torch.equal(by_scale, f(q, k, v))
    no_ops = f(q, k, v, attn_mask=None, dropout_p=0.0, enable_gqa=True, smooth_v=False, scale=None)
    assert_equal(no_ops, f(q, k, v), name)
    o, lse = f(q, k, v, is_causal=True, return_lse=True)
    o_ref, lse_ref = sparge.attention(q, k, v, **dict(NATIVE[name], is_causal=True), return_lse=True)
    assert_equal(o, o_ref, name)
    assert_equal(lse, lse_ref, name)
    o = f(q, k, v, smooth_k=False)
    assert_equal(o, sparge.attention(q, k, v, **dict(NATIVE[name], smooth_k=False)), name)


@pytest.mark.parametrize("name", ["sageattn_qk_int8_pv_fp16_cuda", "sageattn_qk_int8_pv_fp8_cuda",
                                  "sageattn_qk_int8_pv_fp8_cuda_sm90", "sageattn"])  # fmt: skip
def test_sage_granularity_and_accumulators(name, seed):
    q, k, v = structured_qkv(B, H, None, 200, None, D, seed=seed)
    f = getattr(compat, name)
    accums = {"sageattn_qk_int8_pv_fp16_cuda": ["fp16", "fp16+fp32", "fp32"],
              "sageattn_qk_int8_pv_fp8_cuda": ["fp32", "fp32+fp32"],  # "fp32+fp16": test_pv_fp16acc.py
              "sageattn_qk_int8_pv_fp8_cuda_sm90": ["fp32+fp32", "fp32"],
              "sageattn": ["fp32", "fp32+fp16", "fp16+fp32"]}[name]  # fmt: skip
    base = f(q, k, v)
    for accum in accums:  # always accumulated in fp32: same result
        assert_equal(f(q, k, v, pv_accum_dtype=accum), base, f"{name} pv_accum_dtype={accum}")
    with pytest.raises(ValueError, match="pv_accum_dtype"):
        f(q, k, v, pv_accum_dtype="fp8")
    warp = f(q, k, v, qk_quant_gran="per_warp")
    assert_equal(warp, sparge.attention(q, k, v, **dict(NATIVE[name], qk_quant_gran="per_warp")), name)
    with pytest.raises(ValueError, match="qk_quant_gran"):
        f(q, k, v, qk_quant_gran="per_token")


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("name", SAGE_FUNCTIONS)
def test_sage_accuracy(name, is_causal, layout, seed):
    q, k, v = structured_qkv(1, 4, 2, 300, None, D, layout=layout, seed=seed)  # GQA
    o = getattr(compat, name)(q, k, v, tensor_layout=layout, is_causal=is_causal)
    ref, _ = reference_attention(q, k, v, layout=layout, is_causal=is_causal)
    assert_close_to(o, ref, cos_min=0.999, rel_l1_max=0.03, context=f"{name} causal={is_causal} {layout} seed={seed}")



# ---- attn_mask: key-padding masks are computed exactly, other masks raise ------------------------------

MASKED = ["spas_sage2_attn_meansim_topk_cuda", "spas_sage_attn_meansim_cuda", "sageattn",
          "sageattn_qk_int8_pv_fp16_cuda"]


def _keep_rows(batch, len_k, seed):
    """Kept keys of each batch row: a prefix (right padding), every key, an arbitrary subset."""
    keep = torch.ones(batch, len_k, dtype=torch.bool)
    keep[0, 230:] = False
    keep[2] = torch.rand(len_k, generator=torch.Generator().manual_seed(seed)) < 0.6
    return keep


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("name", MASKED)
def test_key_padding_attn_mask(name, layout, seed, poison):
    q, k, v = structured_qkv(3, 4, 2, 280, 300, D, layout=layout, seed=seed)  # GQA, Lq != Lk
    keep = _keep_rows(3, 300, seed)
    f = getattr(compat, name)
    by_bool = f(q, k, v, attn_mask=keep[:, None, None, :], tensor_layout=layout)  # [B, 1, 1, Lk]
    additive = torch.zeros(3, 4, 280, 300).masked_fill(~keep[:, None, None, :], -math.inf)  # materialised
    assert_equal(f(q, k, v, attn_mask=additive, tensor_layout=layout), by_bool, f"{name}: additive vs bool mask")
    seq_dim = 2 if layout == "HND" else 1
    for b in range(3):
        idx = keep[b].nonzero().flatten()
        kb, vb = k[b : b + 1].index_select(seq_dim, idx), v[b : b + 1].index_select(seq_dim, idx)
        native = sparge.attention(q[b : b + 1], kb, vb, **dict(NATIVE[name], layout=layout))
        assert_equal(by_bool[b : b + 1], native, f"{name} row {b} {layout} seed={seed}")
    if NATIVE[name]["mode"] == "dense":  # and against exact attention with the mask (fp64 SDPA)
        to_hnd = (lambda x: x) if layout == "HND" else (lambda x: x.transpose(1, 2))
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(to_hnd(x).double() for x in (q, k, v)), attn_mask=keep[:, None, None, :], enable_gqa=True
        )
        assert_close_to(to_hnd(by_bool), ref, cos_min=0.999, rel_l1_max=0.03, context=f"{name} vs fp64 SDPA")


@pytest.mark.parametrize("name", ["spas_sage2_attn_meansim_topk_cuda", "spas_sage_attn_meansim_topk_cuda"])
def test_key_padding_sparsity_and_lse(name, seed):
    q, k, v = structured_qkv(3, 2, None, 256, 320, D, seed=seed)
    keep = _keep_rows(3, 320, seed)
    f = getattr(compat, name)
    o, sparsity = f(q, k, v, keep[:, None, None, :], return_sparsity=True)
    o2, lse = f(q, k, v, keep[:, None, None, :], return_lse=True)
    assert_equal(o, o2, name)
    row_sparsity = []
    for b in range(3):
        idx = keep[b].nonzero().flatten()
        out = sparge.attention(q[b : b + 1], k[b : b + 1, :, idx], v[b : b + 1, :, idx], **NATIVE[name],
                               return_lse=True, return_sparsity=True)  # fmt: skip
        assert_equal(lse[b : b + 1], out[1], f"{name} lse row {b}")
        row_sparsity.append(float(out[2]))
    assert isinstance(sparsity, float)
    assert min(row_sparsity) - 1e-6 <= sparsity <= max(row_sparsity) + 1e-6, (sparsity, row_sparsity)


def test_attn_mask_rejections():
    q, k, v = structured_qkv(2, 2, None, 200, None, D, seed=0)
    f = compat.spas_sage2_attn_meansim_topk_cuda
    keep = torch.ones(2, 1, 1, 200, dtype=torch.bool)
    per_head = torch.ones(2, 2, 1, 200, dtype=torch.bool)
    per_head[:, 1, :, 150:] = False
    bias = torch.zeros(2, 1, 1, 200)
    bias[..., 100:] = -0.5  # a soft bias, not a padding
    for mask in (per_head, bias, torch.ones(200, 200, dtype=torch.bool).tril()):
        with pytest.raises(NotImplementedError, match="key-padding"):
            f(q, k, v, mask)
    with pytest.raises(ValueError, match="is_causal"):
        f(q, k, v, keep, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask.*broadcastable"):
        f(q, k, v, torch.ones(2, 1, 1, 199, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask.*dtype"):
        f(q, k, v, torch.ones(2, 1, 1, 200, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="attn_mask"):
        compat.sageattn(q, k, v, attn_mask=per_head)


# ---- sageattn_varlen ------------------------------------------------------------------------------------


def _packed(seed, lengths_q, lengths_k, heads_q=4, heads_kv=2, dtype=torch.float16):
    """Packed [total, H, D] q, k, v of independent structured sequences, and int32 cu_seqlens."""
    parts = [structured_qkv(1, heads_q, heads_kv, lq, lk, D, dtype=dtype, layout="NHD", seed=seed + i)
             for i, (lq, lk) in enumerate(zip(lengths_q, lengths_k))]  # fmt: skip
    q, k, v = (torch.cat([p[j][0] for p in parts]) for j in range(3))
    cu = [torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
          for lengths in (lengths_q, lengths_k)]  # fmt: skip
    return q, k, v, cu[0], cu[1]


@pytest.mark.parametrize("is_causal", [False, True])
def test_sageattn_varlen_equals_native_and_reference(is_causal, seed, poison):
    lengths = [300, 77, 512]
    q, k, v, cu_q, cu_k = _packed(seed, lengths, lengths)
    o = compat.sageattn_varlen(q, k, v, cu_q, cu_k, 512, 512, is_causal=is_causal)
    native = sparge.attention_varlen(q, k, v, cu_q, cu_k, 512, 512, mode="dense", is_causal=is_causal,
                                     qk_quant_gran="per_block", pv_precision="fp16")  # fmt: skip
    assert_equal(o, native, f"sageattn_varlen causal={is_causal} seed={seed}")
    assert o.shape == q.shape and o.dtype == q.dtype
    for i in range(len(lengths)):
        s, e = int(cu_q[i]), int(cu_q[i + 1])
        ref, _ = reference_attention(q[s:e][None], k[s:e][None], v[s:e][None], layout="NHD", is_causal=is_causal)
        assert_close_to(o[s:e], ref[0], cos_min=0.999, rel_l1_max=0.03, context=f"sequence {i} seed={seed}")
    assert_equal(compat.sageattn_varlen(q, k, v, cu_q.long(), cu_k.long(), 512, 512, is_causal=is_causal), o,
                 "int64 cu_seqlens")  # fmt: skip


def test_sageattn_varlen_kwargs(seed):
    q, k, v, cu_q, cu_k = _packed(seed, [200, 130], [150, 260])
    f = compat.sageattn_varlen
    by_scale = f(q, k, v, cu_q, cu_k, 200, 260, scale=0.05)
    assert_equal(by_scale, f(q, k, v, cu_q, cu_k, 200, 260, sm_scale=0.05), "scale")
    assert not torch.equal(by_scale, f(q, k, v, cu_q, cu_k, 200, 260))
    assert_equal(f(q, k, v, cu_q, cu_k, 200, 260, smooth_k=False),
                 sparge.attention_varlen(q, k, v, cu_q, cu_k, 200, 260, mode="dense", smooth_k=False,
                                         qk_quant_gran="per_block", pv_precision="fp16"), "smooth_k")  # fmt: skip
    no_ops = f(q, k, v, cu_q, cu_k, 200, 260, attn_mask=None, dropout_p=0.0, enable_gqa=True, smooth_v=False)
    assert_equal(no_ops, f(q, k, v, cu_q, cu_k, 200, 260), "no-op kwargs")
    with pytest.raises(NotImplementedError, match="attn_mask"):
        f(q, k, v, cu_q, cu_k, 200, 260, attn_mask=torch.ones(330, 410, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        f(q, k, v, cu_q, cu_k, 200, 260, dropout_p=0.1)
    with pytest.raises(TypeError, match="bogus"):
        f(q, k, v, cu_q, cu_k, 200, 260, bogus=1)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        f(q, k, v, cu_q, cu_k, 200, 200)
