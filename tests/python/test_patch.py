"""sparge.patch: routing F.scaled_dot_product_attention to sparge in models (CPU)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge
import sparge.patch as sp
from helpers import assert_close_to
from sparge.testing import cosine_similarity, structured_qkv

ORIGINAL_SDPA = F.scaled_dot_product_attention


class Block(nn.Module):
    """Pre-norm transformer block: Linear q/k/v projections, F.scaled_dot_product_attention, MLP."""

    def __init__(self, dim=128, heads=4, kv_heads=None, causal=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads or heads, dim // heads
        self.causal = causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attn(self, x, **sdpa_kwargs):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, **gqa, **sdpa_kwargs)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x, **sdpa_kwargs):
        x = x + self.attn(self.norm1(x), **sdpa_kwargs)
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList([Block(**kwargs), Block(**kwargs)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _block(seed, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    block = Block(**kwargs).to(dtype).eval()
    return block


def _x(seed, length, dtype=torch.float32, batch=1, dim=128):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, length, dim, generator=g).to(dtype)


def _attn_out(block, x):
    """The attention branch alone (the residual stream hides attention errors)."""
    return block.attn(block.norm1(x))


@pytest.fixture(autouse=True)
def _restored():
    yield
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA, "a test left F.scaled_dot_product_attention replaced"
    assert not sp.is_active()


@pytest.mark.parametrize("dtype,causal,kv_heads", [(torch.float32, False, None), (torch.bfloat16, True, None),
                                                   (torch.float32, True, 2)])  # fmt: skip
def test_dense_mode_matches_unpatched(seed, dtype, causal, kv_heads):
    block, x = _block(seed, dtype, causal=causal, kv_heads=kv_heads), _x(seed, 448, dtype)
    with torch.no_grad():
        ref, ref_attn = block(x), _attn_out(block, x)
        with sp.sdpa(mode="dense", min_seq_len=256) as log:
            out, out_attn = block(x), _attn_out(block, x)
    assert log.summary() == {"sparge": 2, "fallback": 0, "by_reason": {}}, log
    assert log.calls[0].settings == {"mode": "dense"} and log.calls[0].q_shape == (1, 4, 448, 32)
    assert log.calls[0].is_causal == causal
    assert not torch.equal(out_attn, ref_attn), "sparge path not taken: output identical to SDPA"
    tol = 0.999 if dtype == torch.float32 else 0.995  # bf16 output rounding of the attention branch
    assert_close_to(out_attn.float(), ref_attn.float(), cos_min=tol, rel_l1_max=0.1, context=f"attn seed={seed}")
    assert_close_to(out.float(), ref.float(), cos_min=0.999, rel_l1_max=0.02, context=f"block seed={seed}")


def test_topk_degrades_gracefully(seed):
    block, x = _block(seed), _x(seed, 512)
    with torch.no_grad():
        ref, ref_attn = block(x), _attn_out(block, x)
        # A random block's q / k rows are as unalike as noise, which the default simthreshd1 (0.02)
        # keeps dense: -1 makes TopK prune.
        with sp.sdpa(mode="topk", topk=0.5, simthreshd1=-1.0, min_seq_len=256) as log:
            out, out_attn = block(x), _attn_out(block, x)
        with sp.sdpa(mode="dense", min_seq_len=256):
            dense_attn = _attn_out(block, x)
    assert log.summary()["sparge"] == 2
    assert log.calls[0].settings == {"mode": "topk", "topk": 0.5, "simthreshd1": -1.0}
    assert not torch.equal(out_attn, dense_attn), "topk 0.5 gave the dense result: nothing was skipped"
    assert_close_to(out, ref, cos_min=0.99, rel_l1_max=0.1, context=f"block topk=0.5 seed={seed}")
    assert cosine_similarity(out_attn, ref_attn) > 0.5, f"attention branch far off, seed={seed}"


def test_restored_after_context_and_exception(seed):
    block, x = _block(seed), _x(seed, 300)
    with sp.sdpa(min_seq_len=0):
        assert F.scaled_dot_product_attention is not ORIGINAL_SDPA
        assert torch.nn.functional.scaled_dot_product_attention is sp._routed_sdpa
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    with pytest.raises(ZeroDivisionError):
        with sp.sdpa(min_seq_len=0) as log, torch.no_grad():
            block(x)
            1 / 0
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA and len(log) == 1
    # enable / disable pair; disable twice is harmless
    handle = sp.enable(mode="dense", min_seq_len=0)
    assert F.scaled_dot_product_attention is sp._routed_sdpa
    with torch.no_grad():
        block(x)
    sp.disable(handle)
    sp.disable(handle)
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA and handle.log.summary()["sparge"] == 1


def test_nested_contexts_use_innermost(seed):
    block, x = _block(seed), _x(seed, 320)
    with torch.no_grad(), sp.sdpa(mode="dense", min_seq_len=0) as outer:
        block(x)
        with sp.sdpa(mode="topk", topk=0.3, min_seq_len=0) as inner:
            block(x)
            with sp.sdpa(min_seq_len=10_000) as innermost:
                block(x)
            assert F.scaled_dot_product_attention is sp._routed_sdpa
            block(x)
        block(x)
    assert [c.settings["mode"] for c in outer.calls] == ["dense", "dense"]
    assert [c.settings["topk"] for c in inner.calls] == [0.3, 0.3]
    assert [(c.path, c.reason) for c in innermost.calls] == [("fallback", "short_sequence")]


def test_fallback_paths_recorded_with_reason(seed):
    block, x = _block(seed), _x(seed, 384)
    mask = torch.ones(384, 384, dtype=torch.bool).tril()
    with torch.no_grad():
        ref_mask = block(x, attn_mask=mask)
        ref_short = block(x[:, :100])
    with sp.sdpa(min_seq_len=256) as log:
        with torch.no_grad():
            out_short = block(x[:, :100])  # short sequence
            out_mask = block(x, attn_mask=mask)  # attn_mask
        block.train()
        torch.manual_seed(seed)
        with torch.no_grad():
            out_drop = block(x, dropout_p=0.3)  # dropout
        block.eval()
        out_grad = block(x)  # parameters require grad, grad mode on
        out_grad.sum().backward()  # the fallback keeps autograd working
        with torch.no_grad():
            sp_out = block(x)  # and the same call without grad goes to sparge
    reasons = [(c.path, c.reason) for c in log.calls]
    assert reasons == [("fallback", "short_sequence"), ("fallback", "attn_mask"), ("fallback", "dropout"),
                       ("fallback", "requires_grad"), ("sparge", None)], reasons  # fmt: skip
    assert log.summary() == {"sparge": 1, "fallback": 4, "by_reason": {"short_sequence": 1, "attn_mask": 1,
                                                                        "dropout": 1, "requires_grad": 1}}  # fmt: skip
    assert all(c.settings is None for c in log.calls[:4])
    assert torch.equal(out_short, ref_short) and torch.equal(out_mask, ref_mask)
    torch.manual_seed(seed)
    with torch.no_grad():
        block.train()
        ref_drop = block(x, dropout_p=0.3)
        block.eval()
    assert torch.equal(out_drop, ref_drop)
    assert block.q.weight.grad is not None and torch.isfinite(block.q.weight.grad).all()
    assert not torch.equal(sp_out, out_grad.detach())


def test_fallback_shape_dtype_checks(seed):
    q = torch.randn(1, 4, 300, 32)
    cases = [
        ((q[0], q[0], q[0]), {}, "not_4d"),
        ((q.double(), q.double(), q.double()), {}, "dtype"),
        ((q, q.half(), q), {}, "dtype"),
        ((q, q[:, :2], q[:, :2]), {}, "gqa_disabled"),
        ((q, q[:, :3], q[:, :3]), {"enable_gqa": True}, "shape"),
        ((q, q, torch.randn(1, 4, 300, 16)), {}, "head_dim"),
        ((torch.randn(1, 1, 300, 300), torch.randn(1, 1, 300, 300), torch.randn(1, 1, 300, 300)), {}, "head_dim"),
        ((q.transpose(2, 3).contiguous().transpose(2, 3),) * 3, {}, "stride"),
        ((q, q, q), {"scale": -1.0}, "scale"),
        ((q, q[:, :2].contiguous(), q[:, :2].contiguous()), {"enable_gqa": True}, None),
    ]
    for args, kwargs, reason in cases:
        with sp.sdpa(min_seq_len=0) as log:
            try:
                F.scaled_dot_product_attention(*args, **kwargs)
            except RuntimeError:  # the original SDPA rejects some of these itself (not sparge's business)
                pass
        assert [c.reason for c in log.calls] == [reason], (reason, log.calls)
        assert log.calls[0].path == ("sparge" if reason is None else "fallback")


def test_select_overrides_per_call(seed):
    block, x = _block(seed), _x(seed, 384)
    seen = []

    def select(info):
        seen.append(info)
        if info.q_shape[2] < 350:
            return None  # fallback
        return {"mode": "dense"} if info.is_causal is False else {"topk": 0.2}

    with torch.no_grad(), sp.sdpa(mode="topk", topk=0.5, min_seq_len=64, select=select) as log:
        out = block(x)
        block(x[:, :320])
        block(x[:, :40])  # shorter than min_seq_len: select not asked
    assert [c.reason for c in log.calls] == [None, "select", "short_sequence"]
    assert log.calls[0].settings == {"mode": "dense", "topk": 0.5}
    assert len(seen) == 2 and seen[0].q_shape == (1, 4, 384, 32) and seen[0].layer is None
    with torch.no_grad(), sp.sdpa(mode="dense", min_seq_len=64):
        dense = block(x)
    assert torch.equal(out, dense)
    with pytest.raises(TypeError, match="is_causal"):
        with torch.no_grad(), sp.sdpa(min_seq_len=0, select=lambda info: {"is_causal": True}):
            block(x)
    with pytest.raises(TypeError, match="bogus"):
        sp.sdpa(bogus=1)


def test_patch_module_per_layer_settings(seed):
    torch.manual_seed(seed)
    model = Model().eval()
    x = _x(seed, 400)
    with torch.no_grad():
        ref = model(x)
    handle = sp.patch_module(model, settings={"mode": "topk", "topk": 0.3}, layers=["layers.0", "layers.1"],
                             layer_settings={"layers.0": {"mode": "dense"}}, min_seq_len=128)  # fmt: skip
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA  # only replaced inside the patched forwards
    with torch.no_grad():
        out = model(x)
        F.scaled_dot_product_attention(*(torch.randn(1, 2, 200, 16),) * 3)  # outside the layers: not routed
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    calls = [(c.layer, c.path, c.settings) for c in handle.log.calls]
    assert calls == [("layers.0", "sparge", {"mode": "dense", "topk": 0.3}),
                     ("layers.1", "sparge", {"mode": "topk", "topk": 0.3})]
    assert_close_to(out, ref, cos_min=0.99, rel_l1_max=0.1, context=f"patched model seed={seed}")
    assert not torch.equal(out, ref)
    # the patched layer wins over an enclosing context: layer 1 stays topk 0.3 inside sdpa(mode="dense")
    with torch.no_grad(), sp.sdpa(mode="dense", min_seq_len=128) as outer:
        layer1 = model.layers[1](x)
    assert len(outer) == 0 and handle.log.calls[-1].settings == {"mode": "topk", "topk": 0.3}
    with torch.no_grad():
        assert torch.equal(model.layers[1](x), layer1)
    sp.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert len(handle.log) == 4  # nothing recorded after unpatch


def test_patch_module_disabled_layer_and_exception(seed):
    torch.manual_seed(seed)
    model = Model().eval()
    x = _x(seed, 300)
    handle = sp.patch_module(model, settings=lambda name, m: None if name.endswith("1") else {"mode": "dense"},
                             layers=Block, min_seq_len=0)  # fmt: skip
    assert handle.layers == ["layers.0", "layers.1"]
    with torch.no_grad():
        model(x)
        with pytest.raises(RuntimeError):
            model(x[..., :64])  # the first Linear raises inside the patched forward
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA and not sp.is_active()
    assert [(c.layer, c.reason) for c in handle.log.calls] == [("layers.0", None), ("layers.1", "disabled")]
    handle.remove()
    with pytest.raises(ValueError, match="nope"):
        sp.patch_module(model, layers=["nope"])


def test_compile_fullgraph_inside_context(seed):
    torch._dynamo.reset()
    block, x = _block(seed, causal=True), _x(seed, 320)
    with torch.no_grad(), sp.sdpa(mode="topk", topk=0.5, min_seq_len=256) as log:
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out2 = compiled(x)
        short = compiled(x[:, :100])  # recompiles with the fallback path, still one graph
        explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_close_to(out, eager, cos_min=0.99999, rel_l1_max=1e-4, context=f"compiled vs eager seed={seed}")
    assert torch.equal(out, out2)
    assert [c.path for c in log.calls[:4]] == ["sparge"] * 3 + ["fallback"], log.calls
    with torch.no_grad():
        assert_close_to(short, block(x[:, :100]), cos_min=0.99999, rel_l1_max=1e-4, context="compiled fallback")
    torch._dynamo.reset()


def test_hooks_do_not_import_hf_libraries():
    # in a fresh interpreter: other test files of this session import transformers and diffusers
    code = ("import sys, sparge, sparge.patch; bad = [m for m in ('transformers', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_transformers_attention_function(seed):
    torch.manual_seed(seed)
    q, k, v = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    module = nn.Module()
    module.is_causal = True
    causal_mask = torch.zeros(300, 300).masked_fill(~torch.ones(300, 300, dtype=torch.bool).tril(), -math.inf)
    causal_mask = causal_mask.expand(1, 1, 300, 300)
    padding = torch.zeros(1, 1, 300, 300)
    padding[..., 250:] = torch.finfo(torch.float32).min  # transformers' key-padding form
    with sp.sdpa(mode="dense", min_seq_len=0) as log:
        out, weights = sp.transformers_attention(module, q, k, v, None, scaling=0.2)
        masked, _ = sp.transformers_attention(module, q, k, v, causal_mask)
        padded, _ = sp.transformers_attention(module, q, k, v, padding)
    assert weights is None and out.shape == (1, 300, 4, 32)
    calls = [(c.reason, c.is_causal, c.attn_mask) for c in log.calls]
    assert calls == [(None, True, None), ("attn_mask", False, "unhandled"), (None, False, "key_padding")], calls
    ref = ORIGINAL_SDPA(q, k, v, is_causal=True, scale=0.2, enable_gqa=True).transpose(1, 2)
    assert_close_to(out, ref, cos_min=0.999, rel_l1_max=0.05, context="transformers_attention")
    ref_masked = ORIGINAL_SDPA(q, k, v, attn_mask=causal_mask, enable_gqa=True).transpose(1, 2)
    assert torch.equal(masked, ref_masked)
    ref_padded = ORIGINAL_SDPA(q.double(), k[:, :, :250].double(), v[:, :, :250].double(), enable_gqa=True)
    assert_close_to(padded, ref_padded.transpose(1, 2), cos_min=0.999, rel_l1_max=0.05, context="key padding")


class _FakeDiffusersAttention(nn.Module):
    """The attributes of diffusers' Attention that AttnProcessor2_0 reads (diffusers is not installed)."""

    def __init__(self, dim=128, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.spatial_norm = self.group_norm = self.norm_q = self.norm_k = None
        self.norm_cross = False
        self.residual_connection = False
        self.rescale_output_factor = 1.0

    def reference(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        o = ORIGINAL_SDPA(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out[1](self.to_out[0](o))


def test_diffusers_processor_duck_typed(seed):
    torch.manual_seed(seed)
    attn, x = _FakeDiffusersAttention().eval(), _x(seed, 320)
    processor = sp.DiffusersAttnProcessor(mode="dense", min_seq_len=256)
    with torch.no_grad():
        out, ref = processor(attn, x), attn.reference(x)
        processor(attn, x[:, :50])
    assert [c.reason for c in processor.log.calls] == [None, "short_sequence"]
    assert not torch.equal(out, ref)
    assert_close_to(out, ref, cos_min=0.999, rel_l1_max=0.05, context=f"diffusers processor seed={seed}")
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA


# ---- attn_mask: key-padding masks go to sparge, other masks to the original SDPA ---------------------------


def _keys_kept(batch, len_k, seed):
    keep = torch.ones(batch, len_k, dtype=torch.bool)
    keep[0, 400:] = False  # right padding
    keep[1, :64] = False  # left padding
    keep[2] = torch.rand(len_k, generator=torch.Generator().manual_seed(seed)) < 0.7  # any subset
    return keep


def test_key_padding_masks_routed_to_sparge(seed, poison):
    q, k, v = structured_qkv(3, 4, 2, 448, None, 32, dtype=torch.float32, seed=seed)
    keep = _keys_kept(3, 448, seed)
    masks = {
        "bool": keep[:, None, None, :],
        "finfo.min": torch.zeros(3, 1, 448, 448).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min),
        "-inf per head": torch.zeros(3, 4, 1, 448).masked_fill(~keep[:, None, None, :], -math.inf),
    }
    outs = {}
    with sp.sdpa(mode="dense", min_seq_len=256) as log:
        for name, mask in masks.items():
            outs[name] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert [(c.path, c.attn_mask) for c in log.calls] == [("sparge", "key_padding")] * 3, log.calls
    ref = ORIGINAL_SDPA(q.double(), k.double(), v.double(), attn_mask=keep[:, None, None, :], enable_gqa=True)
    for name, out in outs.items():
        assert_close_to(out, ref, cos_min=0.999, rel_l1_max=0.03, context=f"{name} mask seed={seed}")
        for b in range(3):  # each row is the sparge call on that row's kept keys alone
            idx = keep[b].nonzero().flatten()
            alone = sparge.attention(q[b : b + 1], k[b : b + 1, :, idx], v[b : b + 1, :, idx], mode="dense")
            assert torch.equal(out[b : b + 1], alone), f"{name} row {b}"


def test_other_masks_fall_back(seed):
    torch.manual_seed(seed)
    q, k, v = torch.randn(2, 4, 300, 32), torch.randn(2, 4, 300, 32), torch.randn(2, 4, 300, 32)
    per_head = torch.ones(2, 4, 1, 300, dtype=torch.bool)
    per_head[:, 2, :, 100:] = False
    soft = torch.zeros(2, 1, 1, 300)
    soft[..., 150:] = -3.0  # a bias, not a padding
    padded_causal = torch.ones(300, 300, dtype=torch.bool).tril().expand(2, 1, 300, 300).clone()
    padded_causal[1, ..., :20] = False  # transformers' left-padded causal mask
    cases = [
        (per_head, {}),
        (soft, {}),
        (padded_causal, {}),
        (torch.zeros(2, 1, 1, 300, dtype=torch.float64), {}),  # float mask of another dtype: SDPA raises
        (torch.ones(2, 1, 1, 300, dtype=torch.bool), {"is_causal": True}),  # SDPA raises
    ]
    with sp.sdpa(mode="dense", min_seq_len=0) as log:
        for mask, kwargs in cases:
            try:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
            except RuntimeError:
                continue  # the original SDPA's own error
            assert torch.equal(out, ORIGINAL_SDPA(q, k, v, attn_mask=mask, **kwargs))
        F.scaled_dot_product_attention(q, k, v, attn_mask=soft, dropout_p=0.0)
    assert [(c.path, c.reason, c.attn_mask) for c in log.calls] == [("fallback", "attn_mask", "unhandled")] * 6
    with sp.sdpa(mode="dense", min_seq_len=0, block_mask=torch.ones(1, 1, 3, 5, dtype=torch.bool)) as log:
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 1, 1, 300, dtype=torch.bool))
    assert [c.reason for c in log.calls] == ["attn_mask"]  # a block mask does not fit the trimmed keys
    with sp.sdpa(mode="dense", min_seq_len=1000) as log:
        F.scaled_dot_product_attention(q, k, v, attn_mask=per_head)
    assert [c.reason for c in log.calls] == ["short_sequence"]  # shape checks first: the mask is not read


def test_masked_calls_fall_back_under_compile(seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    q, k, v = torch.randn(1, 2, 320, 32), torch.randn(1, 2, 320, 32), torch.randn(1, 2, 320, 32)
    keep = torch.ones(1, 1, 1, 320, dtype=torch.bool)
    keep[..., 300:] = False

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.no_grad(), sp.sdpa(mode="dense", min_seq_len=0) as log:
        explanation = torch._dynamo.explain(fn)(q, k, v, keep)
        out = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v, keep)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert log.calls and all(c.reason == "attn_mask" for c in log.calls), log.calls
    assert torch.allclose(out, ORIGINAL_SDPA(q, k, v, attn_mask=keep), atol=1e-6)
    torch._dynamo.reset()


def test_diffusers_processor_key_padding_cross_attention(seed):
    torch.manual_seed(seed)
    attn = _FakeDiffusersAttention().eval()
    attn.prepare_attention_mask = lambda mask, target_length, batch_size: mask.repeat_interleave(attn.heads, dim=0)
    x, context = _x(seed, 320, batch=2), _x(seed + 5, 77, batch=2)
    encoder_mask = torch.zeros(2, 1, 77)
    encoder_mask[1, :, 50:] = -10000.0  # diffusers' encoder_attention_mask bias
    processor = sp.DiffusersAttnProcessor(mode="dense", min_seq_len=64)
    with torch.no_grad():
        out = processor(attn, x, encoder_hidden_states=context, attention_mask=encoder_mask)
        b, n, _ = x.shape
        qh = attn.to_q(x).view(b, n, 4, -1).transpose(1, 2)
        kh, vh = (p(context).view(b, 77, 4, -1).transpose(1, 2) for p in (attn.to_k, attn.to_v))
        ref = ORIGINAL_SDPA(qh.double(), kh.double(), vh.double(), attn_mask=encoder_mask[:, None].double())
        ref = attn.to_out[0](ref.float().transpose(1, 2).reshape(b, n, -1))
    calls = [(c.path, c.attn_mask, c.k_shape) for c in processor.log.calls]
    assert calls == [("sparge", "key_padding", (2, 4, 77, 32))], calls
    assert_close_to(out, ref, cos_min=0.999, rel_l1_max=0.05, context=f"cross-attention seed={seed}")
