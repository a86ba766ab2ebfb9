"""Tiny randomly initialised Hugging Face models with sparge, on the CPU (configs only, no download).

* transformers: ``sparge.patch.register_transformers()`` + ``model.set_attn_implementation("sparge")``
  on a 2-layer GQA Llama (decoder, causal) and a 2-layer BERT (encoder, key-padding masks);
* diffusers: ``sparge.patch.DiffusersAttnProcessor`` on a 2-layer PixArt transformer (self-attention
  over 1024 latent tokens, cross-attention to 20 text tokens).

Bounds. Dense mode differs from the unpatched model only by sparge's quantization: INT8 Q·K
(per-thread scales, ~0.5% relative error on the scores) and FP8 e4m3 P and V (3 mantissa bits:
up to 2^-4 relative rounding per element, which averages down over the keys). On the flat
attention maps of random-initialised models this measures ~3% relative L1 on the first layer's
attention output (the same level as the dense bound 0.03 of the kernel tests on structured
inputs); the bounds below allow 2× that. The residual stream dilutes it further at the model
output. With sparsity (topk < 1), random models have no concentrated attention to exploit, so
the error grows quickly; the tests ask for what must hold anyway: finite outputs, error growing
(within 10%) as topk drops, and the unpatched result when sparge is not used (fallbacks).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import sparge.patch as sp
from helpers import assert_close_to
from sparge.testing import cosine_similarity, relative_l1

ORIGINAL_SDPA = F.scaled_dot_product_attention
TOPKS = (0.75, 0.5, 0.25, 0.1)
# Random-initialised models have noise-like Q/K blocks, which sparge's self-similarity filter (the
# simthreshd1 default) keeps in full, so topk would select nothing; -1 marks every block predictable.
SPARSE = [{"topk": t, "simthreshd1": -1.0} for t in TOPKS]
SEQ = sp.DEFAULT_MIN_SEQ_LEN  # long enough for sparge's default routing (min_seq_len = 1024)


@pytest.fixture(autouse=True)
def _restored():
    yield
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA and not sp.is_active()


def _hf(name: str):
    """transformers / diffusers, imported offline by the tests that use them (not at collection, so a
    GPU-only run (-m gpu) on a machine without them still collects; a CPU run without them fails)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return importlib.import_module(name)


def _first_attention(module):
    """Hook storing the output of ``module`` (the first attention layer) in the returned dict."""
    seen = {}
    def hook(mod, args, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    module.register_forward_hook(hook)
    return seen


def _monotone(errors, context):
    """Errors ordered by decreasing topk: finite and growing (each at least 0.9x the previous)."""
    for i in range(1, len(errors)):
        assert errors[i] >= 0.9 * errors[i - 1], f"{context}: error not growing with sparsity: {errors}"
    assert errors[-1] > 2 * errors[0], f"{context}: sparsity changed nothing: {errors}"


# ---- transformers -------------------------------------------------------------------------------------------


def _llama(seed):
    transformers = _hf("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=2 * SEQ, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(seed, batch, length):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed + 1))


def _llama_reference(seed):
    """A tiny Llama, its input, the layer-0 attention hook, and the unpatched logits and layer-0
    attention output; the model is switched to the "sparge" attention implementation after."""
    sp.register_transformers()
    model, ids = _llama(seed), _ids(seed, 1, SEQ)
    attn = _first_attention(model.model.layers[0].self_attn)
    with torch.no_grad():
        ref = model(ids).logits
    ref_attn = attn["out"]
    model.set_attn_implementation("sparge")
    return model, ids, attn, ref, ref_attn


def test_llama_dense_matches_unpatched(seed):
    model, ids, attn, ref, ref_attn = _llama_reference(seed)
    with torch.no_grad():
        with sp.sdpa(mode="dense") as log:
            out = model(ids).logits
    assert log.summary() == {"sparge": 2, "fallback": 0, "by_reason": {}}, log
    call = log.calls[0]
    assert call.q_shape == (1, 4, SEQ, 32) and call.k_shape == (1, 2, SEQ, 32) and call.is_causal
    assert not torch.equal(out, ref), "sparge not used: logits identical to the unpatched model"
    assert_close_to(attn["out"], ref_attn, cos_min=0.998, rel_l1_max=0.06, context=f"layer-0 attention seed={seed}")
    assert_close_to(out, ref, cos_min=0.999, rel_l1_max=0.04, context=f"logits seed={seed}")


def test_llama_degrades_gracefully_with_sparsity(seed):
    model, ids, attn, ref, ref_attn = _llama_reference(seed)
    with torch.no_grad():
        attn_errors, logit_cos = [], []
        for settings in [{"mode": "dense"}] + SPARSE:
            with sp.sdpa(**settings) as log:
                out = model(ids).logits
            assert log.summary()["sparge"] == 2 and torch.isfinite(out).all(), (settings, log)
            attn_errors.append(relative_l1(attn["out"], ref_attn))
            logit_cos.append(cosine_similarity(out, ref))
    _monotone(attn_errors, f"llama layer-0 attention seed={seed}")
    assert min(logit_cos) > 0.7 and logit_cos[2] > 0.9, f"logits far off, seed={seed}: {logit_cos}"


def test_llama_fallbacks_and_default_routing(seed):
    sp.register_transformers()
    model = _llama(seed)
    short = _ids(seed, 1, 100)
    padded, padding = _ids(seed + 2, 2, 300), torch.ones(2, 300, dtype=torch.long)
    padding[1, :37] = 0  # left padding: transformers builds a padded causal mask (not a key padding)
    long_ids = _ids(seed + 3, 1, SEQ)
    with torch.no_grad():
        refs = [model(short).logits, model(padded, attention_mask=padding).logits, model(long_ids).logits]
        model.set_attn_implementation("sparge")
        with sp.sdpa(mode="dense", min_seq_len=256) as log:
            outs = [model(short).logits, model(padded, attention_mask=padding).logits]
        default = model(long_ids).logits  # no context: sparge's defaults (topk 0.5, min_seq_len 1024)
        short_default = model(short).logits
    assert [(c.reason, c.attn_mask) for c in log.calls] == [("short_sequence", None)] * 2 + \
        [("attn_mask", "unhandled")] * 2, log.calls  # fmt: skip
    assert log.summary() == {"sparge": 0, "fallback": 4, "by_reason": {"short_sequence": 2, "attn_mask": 2}}
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref), "a fallback call must give the unpatched result"
    assert torch.equal(short_default, refs[0])
    assert not torch.equal(default, refs[2]) and torch.isfinite(default).all()
    assert cosine_similarity(default, refs[2]) > 0.9, f"default routing far off, seed={seed}"


def test_bert_key_padding_runs_on_sparge(seed):
    sp.register_transformers()
    transformers = _hf("transformers")
    config = transformers.BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=SEQ + 64)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids, padding = _ids(seed, 2, SEQ), torch.ones(2, SEQ, dtype=torch.long)
    padding[1, 900:] = 0
    attn = _first_attention(model.encoder.layer[0].attention.self)
    with torch.no_grad():
        ref = model(ids, attention_mask=padding).last_hidden_state
        ref_attn = attn["out"]
        model.set_attn_implementation("sparge")
        with sp.sdpa(mode="dense") as log:
            out = model(ids, attention_mask=padding).last_hidden_state
    assert [(c.path, c.attn_mask) for c in log.calls] == [("sparge", "key_padding")] * 2, log.calls
    assert not torch.equal(attn["out"], ref_attn)
    for b, n in ((0, SEQ), (1, 900)):  # the real tokens of each row (padded queries are not used downstream)
        assert_close_to(attn["out"][b, :n], ref_attn[b, :n], cos_min=0.998, rel_l1_max=0.06,
                        context=f"bert row {b} seed={seed}")  # fmt: skip
        assert_close_to(out[b, :n], ref[b, :n], cos_min=0.999, rel_l1_max=0.04, context=f"bert out row {b}")


# ---- diffusers ----------------------------------------------------------------------------------------------


def _pixart(seed):
    torch.manual_seed(seed)
    diffusers = _hf("diffusers")
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                               out_channels=8, num_layers=2, norm_num_groups=2, cross_attention_dim=64,
                                               sample_size=32, patch_size=1, caption_channels=48,
                                               num_embeds_ada_norm=1000).eval()  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor([500, 20]),
                  encoder_hidden_states=torch.randn(2, 20, 48, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 20, [1] * 13 + [0] * 7]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})  # fmt: skip
    return model, inputs


def test_pixart_dense_sparse_and_fallback(seed):
    model, inputs = _pixart(seed)
    attn = _first_attention(model.transformer_blocks[0].attn1)
    with torch.no_grad():
        ref = model(**inputs).sample
        ref_attn = attn["out"]
        errors = []
        for settings in [{"mode": "dense"}] + SPARSE:
            processor = sp.DiffusersAttnProcessor(min_seq_len=256, **settings)
            model.set_attn_processor(processor)
            out = model(**inputs).sample
            # self-attention (1024 tokens) on sparge; cross-attention (20 text tokens) falls back
            assert [(c.path, c.reason, c.k_shape[2]) for c in processor.log.calls] == \
                [("sparge", None, 1024), ("fallback", "short_sequence", 20)] * 2, processor.log.calls  # fmt: skip
            assert torch.isfinite(out).all()
            errors.append(relative_l1(attn["out"], ref_attn))
            if settings == {"mode": "dense"}:
                assert not torch.equal(attn["out"], ref_attn)
                assert_close_to(attn["out"], ref_attn, cos_min=0.998, rel_l1_max=0.06, context=f"attn1 seed={seed}")
                assert_close_to(out, ref, cos_min=0.999, rel_l1_max=0.04, context=f"pixart seed={seed}")
            else:
                assert_close_to(out, ref, cos_min=0.99, rel_l1_max=0.2, context=f"pixart {settings} seed={seed}")
        _monotone(errors, f"pixart attn1 seed={seed}")
        model.set_attn_processor(_hf("diffusers.models.attention_processor").AttnProcessor2_0())
        assert torch.equal(model(**inputs).sample, ref), "restoring the default processor restores the model"


def test_pixart_cross_attention_key_padding(seed):
    model, inputs = _pixart(seed)
    cross = _first_attention(model.transformer_blocks[0].attn2)
    with torch.no_grad():
        ref = model(**inputs).sample
        ref_cross = cross["out"]
        processor = sp.DiffusersAttnProcessor(mode="dense", min_seq_len=16)
        model.set_attn_processor(processor)
        out = model(**inputs).sample
    calls = [(c.path, c.attn_mask, c.k_shape[2]) for c in processor.log.calls]
    assert calls == [("sparge", None, 1024), ("sparge", "key_padding", 20)] * 2, calls
    # row 1 keeps 13 of its 20 text tokens: ignoring the mask changes its cross-attention by ~14% (rel L1)
    for b in range(2):
        assert_close_to(cross["out"][b], ref_cross[b], cos_min=0.998, rel_l1_max=0.06, context=f"attn2 row {b}")
    assert_close_to(out, ref, cos_min=0.999, rel_l1_max=0.04, context=f"pixart seed={seed}")
