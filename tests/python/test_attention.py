"""sparge.attention on the CPU backend: accuracy against exact attention, every mode and option.

Accuracy bounds (structured inputs, fp64 reference):

* dense, pv_precision="fp8": cos >= 0.999, rel-L1 <= 0.03. P and V are rounded to e4m3 (3
  mantissa bits: up to 2^-4 relative error per element), which averages to 1-2 % of Σ|o|; the
  INT8 Q·K error (<= 1/254 of each group's amax per element) adds little after softmax.
  Measured on these shapes: rel-L1 0.010-0.022.
* dense, pv_precision="fp16": cos >= 0.9999, rel-L1 <= 0.008 (only the INT8 scores and the
  fp16 rounding of P and V remain; measured <= 0.004).
* LSE: |lse - ref| <= 0.1 nats. It only sees the INT8 score error (measured <= 0.05 with
  scores spanning ~12 nats).
* Sparse modes are bounded per mode in test_sparse_modes_degrade_gracefully.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparge
from helpers import assert_close_to, assert_equal
from sparge.testing import reference_attention, relative_l1, structured_qkv

DENSE_FP8 = dict(cos_min=0.999, rel_l1_max=0.03)
DENSE_FP16 = dict(cos_min=0.9999, rel_l1_max=0.008)
LSE_TOL = 0.1


def _lse_close(lse, ref_lse, context):
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite), f"{context}: -inf LSE at different rows"
    err = (lse.double() - ref_lse)[finite].abs()
    assert err.numel() == 0 or float(err.max()) <= LSE_TOL, f"{context}: LSE error {float(err.max()):.4f} > {LSE_TOL}"


# (B, Hq, Hkv, Lq, Lk, D): MHA, GQA, MQA, Lq != Lk both ways, odd lengths, several head dims.
SHAPES = [
    (1, 2, 2, 256, 256, 64),
    (2, 4, 2, 200, 333, 128),
    (1, 4, 1, 77, 130, 32),
    (1, 3, 3, 301, 97, 96),
    (1, 2, 1, 129, 65, 256),
    (1, 2, 2, 17, 513, 40),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dense_matches_exact_attention(qkv, seed, poison, shape, dtype):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype=dtype)
    ref, ref_lse = reference_attention(q, k, v)
    o, lse = sparge.attention(q, k, v, mode="dense", return_lse=True)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == (b, hq, lq) and lse.dtype == torch.float32
    assert_close_to(o, ref, **DENSE_FP8, context=f"dense fp8 seed={seed}")
    _lse_close(lse, ref_lse, f"seed={seed}")
    o16 = sparge.attention(q, k, v, mode="dense", pv_precision="fp16")
    assert_close_to(o16, ref, **DENSE_FP16, context=f"dense fp16 seed={seed}")


def test_lse_matches_logsumexp_of_fp64_scores(qkv, seed):
    q, k, v = qkv(1, 4, 2, 300, 200, 64)
    scale = 0.1
    _, lse = sparge.attention(q, k, v, mode="dense", scale=scale, return_lse=True)
    scores = (q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)) * scale
    _lse_close(lse, torch.logsumexp(scores, dim=-1), f"seed={seed}")


@pytest.mark.parametrize("gran", ["per_thread", "per_warp", "per_block"])
@pytest.mark.parametrize("smooth_k", [True, False])
def test_quantization_options(qkv, seed, gran, smooth_k):
    q, k, v = qkv(1, 2, 2, 200, 260, 64)
    ref, _ = reference_attention(q, k, v)
    o = sparge.attention(q, k, v, mode="dense", qk_quant_gran=gran, smooth_k=smooth_k)
    assert_close_to(o, ref, **DENSE_FP8, context=f"{gran} smooth_k={smooth_k} seed={seed}")


def test_layouts_agree_bit_exactly(qkv, seed):
    q, k, v = qkv(2, 4, 2, 150, 190, 64)
    o_hnd, lse_hnd, s_hnd = sparge.attention(q, k, v, is_causal=True, return_lse=True, return_sparsity=True)
    qn, kn, vn = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    o_nhd, lse_nhd, s_nhd = sparge.attention(qn, kn, vn, layout="NHD", is_causal=True, return_lse=True,
                                             return_sparsity=True)  # fmt: skip
    assert o_nhd.shape == qn.shape
    assert_equal(o_nhd.transpose(1, 2), o_hnd, f"NHD vs HND seed={seed}")
    assert_equal(lse_nhd, lse_hnd, "lse")
    assert_equal(s_nhd, s_hnd, "sparsity")


def test_strided_inputs_agree_with_contiguous(qkv, seed):
    q, k, v = qkv(1, 4, 2, 160, 160, 64)
    base = sparge.attention(q, k, v, is_causal=True)
    # Views with unusual strides: a slice of a wider tensor, NHD memory seen as HND, broadcast K/V heads.
    wide = torch.zeros(1, 4, 160, 96, dtype=q.dtype)
    wide[..., :64] = q
    q_view = wide[..., :64]
    k_view = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    assert_equal(sparge.attention(q_view, k_view, v, is_causal=True), base, f"strided seed={seed}")
    k_b, v_b = k[:, :1].expand(1, 2, 160, 64), v[:, :1].expand(1, 2, 160, 64)
    expected = sparge.attention(q, k[:, :1].repeat(1, 2, 1, 1), v[:, :1].repeat(1, 2, 1, 1), is_causal=True)
    assert_equal(sparge.attention(q, k_b, v_b, is_causal=True), expected, "stride-0 heads")


def test_causal_top_left_matches_sdpa(qkv, seed):
    for lq, lk in ((256, 256), (100, 300), (300, 100)):
        q, k, v = qkv(1, 2, 2, lq, lk, 64)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        o = sparge.attention(q, k, v, mode="dense", is_causal=True)
        assert_close_to(o, ref, **DENSE_FP8, context=f"top-left Lq={lq} Lk={lk} seed={seed}")


@pytest.mark.parametrize("lq,lk", [(64, 300), (200, 200), (300, 100)])
def test_causal_bottom_right(qkv, seed, lq, lk):
    q, k, v = qkv(1, 2, 1, lq, lk, 64)
    ref, ref_lse = reference_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    o, lse = sparge.attention(q, k, v, mode="dense", is_causal=True, causal_alignment="bottom_right", return_lse=True)
    assert_close_to(o, ref, **DENSE_FP8, context=f"bottom-right Lq={lq} Lk={lk} seed={seed}")
    _lse_close(lse, ref_lse, f"bottom-right seed={seed}")
    if lq > lk:  # the first Lq - Lk queries see no key: zeros and -inf
        assert torch.all(o[:, :, : lq - lk] == 0) and torch.all(lse[:, :, : lq - lk] == -math.inf)


def test_causal_does_not_leak_future_tokens_inside_diagonal_blocks(qkv, seed):
    """Changing k/v after position t must not change the outputs of queries <= t."""
    q, k, v = qkv(1, 2, 2, 256, 256, 64)
    t = 100  # inside the diagonal block of Q block 0 (rows 0..127) and K block 1 (64..127)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :]) * 3
    v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :]) * 3
    # No smoothing and per-block granularity: the mean and the scales of k would otherwise mix in future rows.
    kw = dict(mode="dense", is_causal=True, smooth_k=False, qk_quant_gran="per_block")
    o1, o2 = sparge.attention(q, k, v, **kw), sparge.attention(q, k2, v2, **kw)
    rows = slice(0, 64)  # rows whose K scale groups (64 rows, per_block) lie before t
    ref, _ = reference_attention(q, k, v, is_causal=True)
    assert_close_to(o2[:, :, rows], ref[:, :, rows], **DENSE_FP8, context=f"no leak seed={seed}")
    assert_close_to(o1[:, :, rows], o2[:, :, rows], cos_min=0.999, rel_l1_max=0.03, context="no leak")


def test_output_dtype_and_scale(qkv, seed):
    q, k, v = qkv(1, 2, 2, 200, 200, 64, dtype=torch.bfloat16)
    ref, _ = reference_attention(q, k, v, scale=0.2)
    o = sparge.attention(q, k, v, mode="dense", scale=0.2, output_dtype=torch.float32)
    assert o.dtype == torch.float32
    assert_close_to(o, ref, **DENSE_FP8, context=f"scale=0.2 seed={seed}")
    o_bf16 = sparge.attention(q, k, v, mode="dense", scale=0.2)
    assert o_bf16.dtype == torch.bfloat16
    assert_equal(o_bf16, o.to(torch.bfloat16), "fp32 output rounded to bf16 == bf16 output")


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_modes_degrade_gracefully(seed, causal):
    """Bounds on structured inputs, L = 1024, block 128 × 64 (8 × 16 blocks). Measured worst
    cases over 32 seeds: topk 0.5 rel-L1 0.11, topk 0.25 0.19; with the sharpened cdf map, cdf
    0.98 cos 0.9937 / rel-L1 0.055 and cdf 0.9 cos 0.988 / rel-L1 0.123 (a fixed budget loses
    more on heads with wide attention maps; cdf adapts)."""
    q, k, v = structured_qkv(1, 4, 2, 1024, head_dim=64, seed=seed)
    ref, _ = reference_attention(q, k, v, is_causal=True) if causal else reference_attention(q, k, v)
    bounds = {
        ("topk", 0.5): dict(cos_min=0.98, rel_l1_max=0.2),
        ("topk", 0.25): dict(cos_min=0.95, rel_l1_max=0.35),
        ("cdf", 0.98): dict(cos_min=0.99, rel_l1_max=0.08),
        ("cdf", 0.9): dict(cos_min=0.98, rel_l1_max=0.15),
    }
    sparsity, masks = {}, {}
    for (mode, value), bound in bounds.items():
        kw = {"topk": value} if mode == "topk" else {"cdfthreshd": value}
        o, s = sparge.attention(q, k, v, mode=mode, is_causal=causal, return_sparsity=True, **kw)
        assert_close_to(o, ref, **bound, context=f"{mode} {value} causal={causal} seed={seed}")
        sparsity[mode, value] = float(s)
        masks[mode, value] = sparge.predict_blocks(q, k, mode=mode, is_causal=causal, **kw)
    assert 0.3 < sparsity["topk", 0.5] < sparsity["topk", 0.25] < 0.8, sparsity
    assert 0.0 <= sparsity["cdf", 0.98] <= sparsity["cdf", 0.9] < 1.0, sparsity
    # Smaller budgets keep subsets of the blocks of larger ones (same ranking, same always-kept blocks).
    assert not torch.any(masks["topk", 0.25] & ~masks["topk", 0.5]), f"topk subsets seed={seed}"
    assert not torch.any(masks["cdf", 0.9] & ~masks["cdf", 0.98]), f"cdf subsets seed={seed}"
    # Extreme settings stay finite.
    for kw in ({"topk": 0.0}, {"mode": "cdf", "cdfthreshd": 0.0}, {"topk": 0.5, "pvthreshd": 0.0}):
        o = sparge.attention(q, k, v, is_causal=causal, **kw)
        assert torch.isfinite(o).all(), f"{kw} seed={seed}"


def test_topk_one_equals_dense(qkv, seed):
    q, k, v = qkv(1, 2, 2, 300, 400, 64)
    for causal in (False, True):
        dense = sparge.attention(q, k, v, mode="dense", is_causal=causal, return_lse=True, return_sparsity=True)
        full = sparge.attention(q, k, v, topk=1.0, is_causal=causal, return_lse=True, return_sparsity=True)
        for a, b, name in zip(full, dense, ("o", "lse", "sparsity")):
            assert_equal(a, b, f"{name} causal={causal} seed={seed}")
        assert float(dense[2]) == 0.0


def _allowed_blocks(b, hq, lq, lk, bq, bk, causal):
    """Σ allowed blocks (docs/method.md): K block j is allowed for Q block i when j·bk < visible_end(r1)."""
    total = 0
    for i in range(-(-lq // bq)):
        r1 = min((i + 1) * bq, lq) - 1
        end = min(r1 + 1, lk) if causal else lk
        total += -(-end // bk) if end > 0 else 0
    return b * hq * total


@pytest.mark.parametrize("causal", [False, True])
def test_return_sparsity_is_one_minus_kept_over_allowed(qkv, seed, causal):
    q, k, v = qkv(2, 2, 1, 500, 520, 64)
    o, s = sparge.attention(q, k, v, topk=0.4, is_causal=causal, return_sparsity=True)
    assert isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float32
    mask, s2 = sparge.predict_blocks(q, k, topk=0.4, is_causal=causal, return_sparsity=True)
    allowed = _allowed_blocks(2, 2, 500, 520, 128, 64, causal)
    expected = 1.0 - int(mask.sum()) / allowed
    assert abs(float(s) - expected) < 1e-6 and float(s2) == float(s), f"{float(s)} vs {expected} seed={seed}"
    assert float(sparge.attention(q, k, v, mode="dense", is_causal=causal, return_sparsity=True)[1]) == 0.0


def test_return_tuple_order(qkv):
    q, k, v = qkv(1, 2, 2, 64, 64, 64)
    o = sparge.attention(q, k, v)
    assert isinstance(o, torch.Tensor)
    o_l, lse = sparge.attention(q, k, v, return_lse=True)
    o_s, s = sparge.attention(q, k, v, return_sparsity=True)
    o_ls, lse2, s2 = sparge.attention(q, k, v, return_lse=True, return_sparsity=True)
    assert lse.shape == (1, 2, 64) and s.dim() == 0
    for x in (o_l, o_s, o_ls):
        assert_equal(x, o, "o")
    assert_equal(lse2, lse, "lse")
    assert_equal(s2, s, "sparsity")


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_matches_masked_exact_attention(qkv, seed, causal, poison):
    q, k, v = qkv(2, 4, 2, 300, 333, 64)
    nbq, nbk = -(-300 // 128), -(-333 // 64)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 4, nbq, nbk, generator=gen) < 0.5
    mask[0, 0, 1] = False  # a Q block with no kept K block: zeros and -inf
    o, lse, s = sparge.attention(q, k, v, block_mask=mask, is_causal=causal, return_lse=True, return_sparsity=True)
    ref, ref_lse = reference_attention(q, k, v, block_mask=mask, is_causal=causal)
    assert_close_to(o, ref, **DENSE_FP8, context=f"block_mask causal={causal} seed={seed}")
    _lse_close(lse, ref_lse, f"block_mask seed={seed}")
    assert torch.all(o[0, 0, 128:256] == 0) and torch.all(lse[0, 0, 128:256] == -math.inf)
    allowed = _allowed_blocks(2, 4, 300, 333, 128, 64, causal)
    kept = int(sparge.predict(sparge.quantize(q, k, v), block_mask=mask, is_causal=causal).mask.sum())
    assert abs(float(s) - (1 - kept / allowed)) < 1e-6
    # Same blocks through block_sparse_attention, an integer mask, and a broadcast mask.
    assert_equal(sparge.block_sparse_attention(q, k, v, mask, is_causal=causal), o, "block_sparse_attention")
    assert_equal(sparge.attention(q, k, v, block_mask=mask.to(torch.int32), is_causal=causal), o, "int mask")
    shared = mask[:1, :1]
    assert_equal(
        sparge.attention(q, k, v, block_mask=shared, is_causal=causal),
        sparge.attention(q, k, v, block_mask=shared.expand(2, 4, nbq, nbk), is_causal=causal),
        "broadcast mask",
    )


def test_all_true_block_mask_equals_dense(qkv, seed):
    q, k, v = qkv(1, 2, 2, 200, 200, 64)
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    assert_equal(sparge.attention(q, k, v, block_mask=mask), sparge.attention(q, k, v, mode="dense"), f"seed={seed}")


@pytest.mark.parametrize("param,values", [("topk", (0.2, 0.9, 0.5, 0.0)), ("cdfthreshd", (0.5, 0.99, 0.8, 1.0)),
                                          ("simthreshd1", (-1.0, 0.5, 0.9, 0.99)), ("pvthreshd", (0.0, 2.0, 8.0, math.inf))])  # fmt: skip
def test_per_head_parameters(seed, param, values):
    q, k, v = structured_qkv(1, 4, 2, 512, head_dim=64, seed=seed)
    mode = "cdf" if param == "cdfthreshd" else "topk"
    base = {"topk": 0.3} if mode == "topk" and param != "topk" else {}
    per_head = sparge.attention(q, k, v, mode=mode, **base, **{param: torch.tensor(values)}, return_lse=True)
    as_list = sparge.attention(q, k, v, mode=mode, **base, **{param: list(values)}, return_lse=True)
    for h, value in enumerate(values):
        single = sparge.attention(q, k, v, mode=mode, **base, **{param: value}, return_lse=True)
        for a, b, name in zip(per_head, single, ("o", "lse")):
            assert_equal(a[:, h], b[:, h], f"{param}[{h}] = {value}: {name} seed={seed}")
    for a, b in zip(per_head, as_list):
        assert_equal(a, b, "list vs tensor")


def test_pvthreshd_filter_skips_and_stays_accurate(seed):
    q, k, v = structured_qkv(1, 4, 4, 1024, head_dim=64, seed=seed, sharpness=(12.0, 16.0))
    ref, _ = reference_attention(q, k, v)
    quantized = sparge.quantize(q, k, v)
    pred = sparge.predict(quantized, mode="dense")
    skipped = {}
    for pvthreshd in (math.inf, 20.0, 8.0):
        o, stats = sparge.attend(quantized, pred.index, pred.count, pvthreshd=pvthreshd, return_stats=True)
        units, skip = int(stats[sparge.STAT_PV_UNITS]), int(stats[sparge.STAT_PV_SKIPPED])
        assert units == 4 * (1024 // 16) * 16, units  # every (16-row group, block) pair of the dense map
        skipped[pvthreshd] = skip
        assert_close_to(o, ref, **DENSE_FP8, context=f"pvthreshd={pvthreshd} seed={seed}")
    assert skipped[math.inf] == 0 and skipped[20.0] <= skipped[8.0], skipped
    assert skipped[8.0] > 0, f"a sharp map should let the filter skip something, seed={seed}"


@pytest.mark.parametrize(
    "shape", [(0, 2, 2, 64, 64, 64), (1, 0, 0, 64, 64, 64), (1, 2, 2, 0, 64, 64), (1, 2, 1, 0, 0, 32)]
)
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_empty_inputs_give_empty_outputs(shape, layout):
    b, hq, hkv, lq, lk, d = shape
    def make(h, n):
        return torch.randn((b, h, n, d) if layout == "HND" else (b, n, h, d), dtype=torch.float16)
    q, k, v = make(hq, lq), make(hkv, lk), make(hkv, lk)
    o, lse, s = sparge.attention(q, k, v, layout=layout, return_lse=True, return_sparsity=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (b, hq, lq) and float(s) == 0.0
    quantized = sparge.quantize(q, k, v, layout=layout)
    pred = sparge.predict(quantized)
    assert pred.index.shape == (b, hq, -(-lq // 128), -(-lk // 64))
    assert sparge.attend(quantized, pred.index, pred.count).shape == q.shape


def test_empty_keys_give_zeros_and_minus_inf(qkv):
    q, _, _ = qkv(1, 2, 2, 100, 100, 64)
    k = torch.empty(1, 2, 0, 64, dtype=q.dtype)
    o, lse, s = sparge.attention(q, k, k, return_lse=True, return_sparsity=True)
    assert torch.all(o == 0) and torch.all(lse == -math.inf) and float(s) == 0.0


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 8, 300, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 2, 500, 64, dtype=torch.bfloat16, device="meta")
    o, lse, s = sparge.attention(q, k, k, output_dtype=torch.float32, return_lse=True, return_sparsity=True)
    assert o.device.type == "meta" and o.shape == q.shape and o.dtype == torch.float32
    assert lse.shape == (2, 8, 300) and s.shape == ()


def test_sdpa_drop_in(qkv, seed):
    q, k, v = qkv(1, 4, 2, 200, 200, 64)
    o = sparge.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, mode="dense")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    assert_close_to(o, ref, **DENSE_FP8, context=f"sdpa drop-in seed={seed}")
    with pytest.raises(NotImplementedError, match="attn_mask"):
        sparge.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(200, 200, dtype=torch.bool).tril(),
                                            enable_gqa=True)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        sparge.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        sparge.scaled_dot_product_attention(q, k, v)


def test_video_grid_workload(seed):
    q, k, v = structured_qkv(1, 2, 2, 4 * 8 * 16, head_dim=64, grid=(4, 8, 16), seed=seed)
    ref, _ = reference_attention(q, k, v)
    o, s = sparge.attention(q, k, v, mode="cdf", cdfthreshd=0.98, return_sparsity=True)
    assert_close_to(o, ref, cos_min=0.99, rel_l1_max=0.08, context=f"grid cdf seed={seed}")
    assert relative_l1(sparge.attention(q, k, v, mode="dense"), ref) <= DENSE_FP8["rel_l1_max"]
