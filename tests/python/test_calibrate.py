"""sparge.calibrate: capture, per-head calibration under an error budget, JSON, apply (CPU).

The model: 2 attention layers (Linear q / k / v / out projections, F.scaled_dot_product_attention,
4 heads) over inputs whose first channels are random Fourier features of the token position, so
``q_r · k_c`` is a smooth kernel of ``r - c`` (local attention). Each head scales its queries by
a temperature: heads 0-2 are sharp to mildly local, head 3 has temperature 0 (exactly uniform
attention, where every block matters). Held-out inputs use other seeds (other content and other
position offsets).
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge
import sparge.calibrate as sc
from sparge.testing import relative_l1

L = 1024
FREQS = 24  # Fourier frequencies -> 2 * FREQS positional channels
CONTENT = 32
IN_DIM = 2 * FREQS + CONTENT
HEADS = 4
HEAD_DIM = 2 * FREQS
BUDGET = 0.05
HELD_OUT_MARGIN = 1.3  # held-out per-layer rel-L1 must stay under BUDGET * HELD_OUT_MARGIN
TEMPERATURES = {"layers.0": (14.0, 9.0, 5.0, 0.0), "layers.1": (12.0, 6.0, 3.0, 0.0)}
UNIFORM_HEAD = 3


class Attention(nn.Module):
    def __init__(self, temperatures, causal, gen):
        super().__init__()
        self.heads, self.causal = HEADS, causal
        self.q = nn.Linear(IN_DIM, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(IN_DIM, HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(IN_DIM, HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, IN_DIM, bias=False)
        with torch.no_grad():
            pos = 2 * FREQS
            wq = torch.zeros(HEADS * HEAD_DIM, IN_DIM)
            wk = torch.zeros(HEADS * HEAD_DIM, IN_DIM)
            for h, t in enumerate(temperatures):
                rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                # scores = t * kernel(r - c) (kernel(0) = 1) after SDPA's 1/sqrt(D) scale, plus small noise.
                wq[rows, :pos] = torch.eye(pos) * t * math.sqrt(HEAD_DIM)
                wk[rows, :pos] = torch.eye(pos)
                wk[rows, pos:] = 0.02 * torch.randn(HEAD_DIM, CONTENT, generator=gen)
            self.q.weight.copy_(wq)
            self.k.weight.copy_(wk)
            self.v.weight.copy_(torch.randn(HEADS * HEAD_DIM, IN_DIM, generator=gen) / math.sqrt(IN_DIM))
            self.v.bias.copy_(0.1 * torch.randn(HEADS * HEAD_DIM, generator=gen))
            out = torch.randn(IN_DIM, HEADS * HEAD_DIM, generator=gen) / math.sqrt(HEADS * HEAD_DIM)
            out[:pos] = 0  # keep the positional channels intact through the residual
            self.out.weight.copy_(out)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, HEAD_DIM).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.out(o.transpose(1, 2).reshape(b, n, -1))


class Model(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(
            [Attention(TEMPERATURES["layers.0"], False, gen), Attention(TEMPERATURES["layers.1"], True, gen)]
        )
        # Frequencies of the positional features: kernel width ~ L / 40 tokens.
        self.register_buffer("omega", torch.randn(FREQS, generator=gen) * (40.0 / L))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def make_input(model: Model, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    offset = torch.rand(batch, 1, generator=gen) * 10 * L
    pos = torch.arange(L, dtype=torch.float32).unsqueeze(0) + offset  # [B, L]
    phase = pos.unsqueeze(-1) * model.omega  # [B, L, FREQS]
    fourier = torch.cat([phase.cos(), phase.sin()], dim=-1) / math.sqrt(FREQS)
    content = torch.randn(batch, L, CONTENT, generator=gen)
    return torch.cat([fourier, content], dim=-1)


@pytest.fixture(scope="module")
def calibrated():
    model = Model().eval()
    inputs = [make_input(model, seed) for seed in (1, 2)]
    captured = sc.capture(model, inputs)
    start = time.perf_counter()
    result = sc.calibrate(captured, budget=BUDGET)
    seconds = time.perf_counter() - start
    print("\n" + result.summary() + f"\ncalibration: {seconds:.2f} s for {len(result.layers)} layers")
    return model, captured, result


def test_capture_records_layers(calibrated):
    model, captured, _ = calibrated
    assert list(captured.calls) == ["layers.0", "layers.1"], captured
    for name, calls in captured.calls.items():
        assert len(calls) == 2, (name, len(calls))
        assert tuple(calls[0].q.shape) == (1, HEADS, L, HEAD_DIM)
        assert calls[0].is_causal == (name == "layers.1")
    # Capture leaves F.scaled_dot_product_attention as it was.
    assert not sparge.patch.is_active()


def test_calibration_meets_budget_and_finds_sparsity(calibrated):
    _, _, result = calibrated
    for name, layer in result.layers.items():
        assert layer.heads == HEADS and not layer.exact, (name, layer)
        assert layer.expected_rel_l1 <= BUDGET, (name, layer.expected_rel_l1)
        assert max(layer.head_rel_l1) <= BUDGET, (name, layer.head_rel_l1)
        assert layer.expected_sparsity > 0.1, (name, layer.expected_sparsity)
        # The sharpest heads are sparse, the uniform head is dense (or nearly so).
        for h in (0, 1):
            assert not layer.dense[h] and layer.head_sparsity[h] > 0.2, (name, h, layer.params, layer.head_sparsity)
        u = UNIFORM_HEAD
        assert layer.dense[u] or layer.params[u] >= 0.7, (name, layer.params, layer.dense)
        assert layer.params[u] > max(layer.params[0], layer.params[1]), (name, layer.params)
        assert layer.head_sparsity[u] < min(layer.head_sparsity[0], layer.head_sparsity[1]) / 2, layer.head_sparsity
        # Sharper heads need fewer blocks.
        assert layer.params[0] <= layer.params[2], (name, layer.params)


def test_json_round_trip(calibrated, tmp_path):
    _, _, result = calibrated
    path = tmp_path / "calib.json"
    result.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "sparge-calibration" and data["format_version"] == sc.FORMAT_VERSION
    assert data["sparge_version"] == sparge.__version__
    assert data["budget"]["rel_l1"] == BUDGET
    assert set(data["layers"]) == {"layers.0", "layers.1"}
    assert len(data["layers"]["layers.0"]["topk"]) == HEADS
    loaded = sc.CalibrationResult.load(path)
    assert loaded == result
    path2 = tmp_path / "again.json"
    loaded.save(path2)
    assert path2.read_text() == path.read_text()


def test_apply_held_out(calibrated, tmp_path):
    model, _, result = calibrated
    path = tmp_path / "calib.json"
    result.save(path)
    loaded = sc.CalibrationResult.load(path)
    held_out = [make_input(model, seed) for seed in (11, 12)]
    # Per-layer error on held-out inputs (exact q / k / v of each layer).
    held = sc.capture(model, held_out)
    report = loaded.evaluate(held)
    print("\nheld-out:", {n: {k: round(v, 4) for k, v in r.items()} for n, r in report.items()})
    for name, r in report.items():
        assert r["rel_l1"] <= BUDGET * HELD_OUT_MARGIN, (name, r)
        assert r["sparsity"] > 0.1, (name, r)
    # Through the patched model: every layer goes to sparge with its per-head tensors.
    with torch.no_grad():
        ref = [model(x) for x in held_out]
        patch = loaded.apply(model)
        try:
            out = [model(x) for x in held_out]
        finally:
            patch.remove()
    calls = patch.log.calls
    assert [c.layer for c in calls] == ["layers.0", "layers.1"] * 2, calls
    assert all(c.path == "sparge" for c in calls), calls
    for c in calls:
        topk = c.settings["topk"]
        assert torch.equal(topk, torch.tensor(result.layers[c.layer].params)), (c.layer, topk)
    for o, r in zip(out, ref):
        err = relative_l1(o, r)
        assert 0 < err < 0.05, err  # model output (residual stream) barely moves


def test_mismatch_errors(calibrated):
    _, _, result = calibrated
    # Other head count: the module declares 8 heads.
    other = Model()
    other.layers[1].heads = 8
    with pytest.raises(sc.CalibrationError, match=r"layers\.1.*4 query heads.*8"):
        result.apply(other)
    # Other head count detected at run time (no declared attribute).
    other = Model()
    del other.layers[0].heads
    x = make_input(other, 3)
    other.layers[0].forward = lambda x, m=other.layers[0]: _forward_heads(m, x, 2)
    patch = result.apply(other)
    try:
        with pytest.raises(sc.CalibrationError, match=r"layers\.0.*4 query heads.*has 2"), torch.no_grad():
            other(x)
    finally:
        patch.remove()
    assert not sparge.patch.is_active()
    # Unknown layer names (another model).
    renamed = nn.Sequential(Model())
    with pytest.raises(sc.CalibrationError, match=r"layers\.0"):
        result.apply(renamed)
    # Wrong file format version.
    data = result.to_json()
    data["format_version"] = 99
    with pytest.raises(sc.CalibrationError, match="format_version"):
        sc.CalibrationResult.from_json(data)
    data = result.to_json()
    data["layers"]["layers.0"]["topk"] = [0.5] * 3
    with pytest.raises(sc.CalibrationError, match=r"layers\.0.*topk.*4"):
        sc.CalibrationResult.from_json(data)


def _forward_heads(m: Attention, x, heads):
    """m's attention with the head dim regrouped into `heads` heads (another head count)."""
    b, n, _ = x.shape
    d = HEADS * HEAD_DIM // heads
    q, k, v = (p(x).view(b, n, heads, d).transpose(1, 2) for p in (m.q, m.k, m.v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=m.causal)
    return x + m.out(o.transpose(1, 2).reshape(b, n, -1))


def test_tight_budget_marks_heads_dense(calibrated):
    _, captured, _ = calibrated
    tight = sc.calibrate(captured, budget=1e-4, layers=["layers.0"])
    layer = tight.layers["layers.0"]
    # Quantized dense attention cannot reach 1e-4: the layer keeps exact SDPA.
    assert layer.exact and all(layer.dense), layer
    assert tight.layer_settings()["layers.0"] is None


def test_bad_arguments(calibrated):
    _, captured, _ = calibrated
    with pytest.raises(ValueError, match="budget"):
        sc.calibrate(captured, budget=0)
    with pytest.raises(ValueError, match="modes"):
        sc.calibrate(captured, modes=("block_mask",))
    with pytest.raises(ValueError, match="settings"):
        sc.calibrate(captured, settings={"topk": 0.5})
    with pytest.raises(sc.CalibrationError, match="nope"):
        sc.calibrate(captured, layers=["nope"])
