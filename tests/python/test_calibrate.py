"""sparge.calibrate: capture, per-head calibration under an error budget, the sampled-row error model,
JSON, apply, the automatic mode and the benchmark script (CPU).

The model: 2 attention layers (Linear q / k / v / out projections, F.scaled_dot_product_attention,
4 heads) over inputs whose first channels are random Fourier features of the token position, so
``q_r · k_c`` is a smooth kernel of ``r - c`` (local attention). Each head scales its queries by
a temperature: heads 0-2 are sharp to mildly local, head 3 has temperature 0 (exactly uniform
attention, where every block matters). Held-out inputs use other seeds (other content and other
position offsets).

Expected errors are computed here, not taken from sparge.calibrate: sparge's own output
(sparge.attention, or quantize / predict / attend) against exact attention
(sparge.testing.reference_attention, fp64).
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge
import sparge.calibrate as sc
from sparge.testing import prediction_workloads, reference_attention, relative_l1, structured_qkv

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
BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "calibration_bench.py"


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
def model_and_captured():
    model = Model().eval()
    captured = sc.capture(model, [make_input(model, seed) for seed in (1, 2)])
    return model, captured


@pytest.fixture(scope="module")
def calibrated(model_and_captured):
    model, captured = model_and_captured
    start = time.perf_counter()
    result = sc.calibrate(captured, budget=BUDGET)  # both modes, the default simthreshd1 x pvthreshd grid
    seconds = time.perf_counter() - start
    print("\n" + result.summary() + f"\ncalibration: {seconds:.2f} s for {len(result.layers)} layers")
    return model, captured, result


def head_rel_l1(o: torch.Tensor, ref: torch.Tensor) -> list:
    """Per-head relative L1 of [B, H, L, D] outputs (fp64)."""
    o, ref = o.double(), ref.double()
    return ((o - ref).abs().sum(dim=(0, 2, 3)) / ref.abs().sum(dim=(0, 2, 3))).tolist()


def run_layer(call: sc.CapturedCall, settings: dict):
    """sparge.attention with a layer's settings: (per-head rel-L1 vs fp64 exact attention, block sparsity)."""
    o, sparsity = sparge.attention(call.q, call.k, call.v, is_causal=call.is_causal, scale=call.scale,
                                   output_dtype=torch.float32, return_sparsity=True, **settings)  # fmt: skip
    ref, _ = reference_attention(call.q, call.k, call.v, is_causal=call.is_causal, scale=call.scale)
    return head_rel_l1(o, ref), float(sparsity)


def per_head_density(call: sc.CapturedCall, settings: dict) -> torch.Tensor:
    """kept / allowed blocks per head of a layer's selection settings (sparge.predict_blocks)."""
    keys = ("mode", "topk", "cdfthreshd", "simthreshd1")
    selection = {k: settings[k] for k in keys if k in settings}
    kept = sparge.predict_blocks(call.q, call.k, is_causal=call.is_causal, **selection)
    allowed = sparge.predict_blocks(call.q, call.k, mode="dense", is_causal=call.is_causal)
    return kept.sum(dim=(0, 2, 3)).double() / allowed.sum(dim=(0, 2, 3)).double()


def test_capture_records_layers(model_and_captured):
    model, captured = model_and_captured
    assert list(captured.calls) == ["layers.0", "layers.1"], captured
    for name, calls in captured.calls.items():
        assert len(calls) == 2, (name, len(calls))
        assert tuple(calls[0].q.shape) == (1, HEADS, L, HEAD_DIM)
        assert calls[0].is_causal == (name == "layers.1")
    # Capture leaves F.scaled_dot_product_attention as it was.
    assert not sparge.patch.is_active()


def test_calibration_meets_budget_and_finds_sparsity(calibrated):
    _, captured, result = calibrated
    grid = sc.DEFAULT_GRIDS
    for name, layer in result.layers.items():
        assert layer.heads == HEADS and not layer.exact, (name, layer)
        assert layer.mode in ("topk", "cdf")
        settings = result.layer_settings()[name]
        # Every captured call, re-run here: each head within the budget, the layer sparse.
        for call in captured.calls[name]:
            rel, sparsity = run_layer(call, settings)
            assert max(rel) <= BUDGET, (name, rel)
            assert sparsity > 0.1, (name, sparsity)
        density = sum(per_head_density(call, settings) for call in captured.calls[name]) / len(captured.calls[name])
        # The sharpest heads are sparse, the uniform head is dense (or much denser).
        for h in (0, 1):
            assert not layer.dense[h] and density[h] < 0.8, (name, h, layer.params, density)
        u = UNIFORM_HEAD
        assert layer.dense[u] or density[u] > 1.0 - (1.0 - min(density[0], density[1])) / 2, (name, density)
        # The settings come from the search space; dense heads keep every block and never skip P·V.
        for h in range(HEADS):
            if layer.dense[h]:
                assert (layer.params[h], layer.simthreshd1[h], layer.pvthreshd[h]) == (1.0, 1.0, math.inf)
                assert float(density[h]) == 1.0, (name, h, density)
            else:
                assert layer.params[h] in grid[layer.mode], (name, layer.params)
                assert layer.simthreshd1[h] in grid["simthreshd1"] and layer.pvthreshd[h] in grid["pvthreshd"]
        # The reported per-head numbers are the true ones (re-measured above): same block sparsity.
        assert layer.head_sparsity == pytest.approx((1.0 - density).tolist(), abs=1e-6), (name, layer.head_sparsity)


def test_verification_keeps_the_budget_with_a_poor_estimate(model_and_captured):
    """One sampled row per Q block: a noisy estimate; the verification and re-choice still hold every head
    within the budget on the captured calls (re-measured here)."""
    _, captured = model_and_captured
    result = sc.calibrate(captured, budget=BUDGET, modes=("topk",), rows_per_block=1, layers=["layers.1"], seed=3)
    layer = result.layers["layers.1"]
    settings = result.layer_settings()["layers.1"]
    for call in captured.calls["layers.1"]:
        rel, sparsity = run_layer(call, settings)
        assert max(rel) <= BUDGET and sparsity > 0.05, (rel, sparsity, layer)


def _single_head(x: torch.Tensor, h: int) -> torch.Tensor:
    return x[:, h : h + 1].contiguous()


def test_search_picks_the_sparsest_feasible_setting():
    """Brute force over the grid with sparge itself, head by head (a head's quantization and selection do
    not depend on the other heads): the calibrated choice is within the budget and saves as much work as the
    best feasible candidate. Exact error model (rows_per_block=None)."""
    q, k, v = structured_qkv(1, 2, 2, 1024, 1024, 64, sharpness=(6.0, 14.0), seed=5)
    captured = sc.Captured(calls={"attn": [sc.CapturedCall(q, k, v, False, None, False)]})
    grid = {"topk": (0.1, 0.2, 0.3, 0.5, 0.7), "simthreshd1": (0.02, 0.6), "pvthreshd": (15.0, 5.0)}
    layer = sc.calibrate(captured, BUDGET, modes=("topk",), grid=grid, rows_per_block=None).layers["attn"]
    for h in range(2):
        qh, kh, vh = (_single_head(x, h) for x in (q, k, v))
        ref, _ = reference_attention(qh, kh, vh)
        qz = sparge.quantize(qh, kh, vh)
        allowed = float(sparge.predict(qz, mode="dense").count.sum())
        table = {}
        for topk in grid["topk"]:
            for sim in grid["simthreshd1"]:
                pred = sparge.predict(qz, mode="topk", topk=topk, simthreshd1=sim)
                for pv in grid["pvthreshd"]:
                    o, stats = sparge.attend(qz, pred.index, pred.count, pvthreshd=pv, output_dtype=torch.float32,
                                             return_stats=True)  # fmt: skip
                    skipped = float(stats[sparge.STAT_PV_SKIPPED]) / float(stats[sparge.STAT_PV_UNITS])
                    gain = 1.0 - float(pred.count.sum()) / allowed * (1.0 - skipped / 2)
                    table[(topk, sim, pv)] = (relative_l1(o, ref), gain)
        feasible = [gain for rel, gain in table.values() if rel <= BUDGET]
        assert feasible and max(feasible) > 0.3, (h, table)  # a sparse setting exists: the test means something
        assert not layer.dense[h], (h, layer)
        rel, gain = table[(layer.params[h], layer.simthreshd1[h], layer.pvthreshd[h])]
        assert rel <= BUDGET, (h, rel)
        assert gain >= max(feasible) - 0.01, (h, gain, max(feasible), table)
        assert layer.head_rel_l1[h] == pytest.approx(rel, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_error_model_is_exact_with_every_row(is_causal):
    """The sampled-row model with every row reproduces sparge's attend stage: the error against exact
    attention and the P·V units / skips (the kernel's rule on 16-row groups)."""
    q, k, v = structured_qkv(1, 2, 2, 1000, 1000, 64, seed=11)  # odd length: a partial last Q block / group
    qz = sparge.quantize(q, k, v)
    ref, _ = reference_attention(q, k, v, is_causal=is_causal)
    preds = [sparge.predict(qz, mode="topk", topk=t, is_causal=is_causal) for t in (0.1, 0.3)]
    preds.append(sparge.predict(qz, mode="cdf", cdfthreshd=0.9, is_causal=is_causal))
    pvs = (math.inf, 12.0, 4.0)
    sample, counts = sc._samples(1000, 128, None, torch.Generator().manual_seed(0))
    assert counts is None and sample.rows.unique().numel() == 1000
    stats = sc._estimate(qz, q, k, v, torch.stack([p.mask for p in preds]), pvs, sample, None, is_causal, "top_left",
                         64**-0.5)  # fmt: skip
    for c, pred in enumerate(preds):
        for i, pv in enumerate(pvs):
            o, st = sparge.attend(qz, pred.index, pred.count, pvthreshd=pv, is_causal=is_causal,
                                  output_dtype=torch.float32, return_stats=True)  # fmt: skip
            true = head_rel_l1(o, ref)
            est = (stats[c, i, :, 0] / stats[c, i, :, 1]).tolist()
            assert est == pytest.approx(true, rel=0.02, abs=2e-4), (c, pv, est, true)
            assert int(stats[c, i, :, 5].sum()) == int(st[sparge.STAT_PV_UNITS]), (c, pv)
            skipped = int(st[sparge.STAT_PV_SKIPPED])
            assert abs(int(stats[c, i, :, 6].sum()) - skipped) <= 0.01 * skipped + 1, (c, pv, skipped)


def test_sampled_error_estimate_tracks_true_error():
    """16 sampled rows per Q block (the default): the estimate of every candidate stays close to the true
    error (measured on these inputs: |log(est / true)| at most 0.094, mean 0.013)."""
    logs = []
    for seed, (q, k, v) in enumerate([structured_qkv(1, 2, 2, 4096, 4096, 64, seed=21),
                                      prediction_workloads(4096, 2, 64, seed=3)["sink_retrieval"]]):  # fmt: skip
        for is_causal in (False, True):
            qz = sparge.quantize(q, k, v)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal)  # fp32 exact
            preds = [sparge.predict(qz, mode="topk", topk=t, is_causal=is_causal) for t in (0.05, 0.15, 0.4)]
            sample, counts = sc._samples(4096, 128, 16, torch.Generator().manual_seed(seed))
            stats = sc._estimate(qz, q, k, v, torch.stack([p.mask for p in preds]), (15.0,), sample, counts,
                                 is_causal, "top_left", 64**-0.5)  # fmt: skip
            for c, pred in enumerate(preds):
                o = sparge.attend(qz, pred.index, pred.count, pvthreshd=15.0, is_causal=is_causal,
                                  output_dtype=torch.float32)  # fmt: skip
                true = torch.tensor(head_rel_l1(o, ref))
                logs.append((stats[c, 0, :, 0] / stats[c, 0, :, 1] / true).log())
    logs = torch.cat(logs).abs()
    assert float(logs.max()) <= 0.2 and float(logs.mean()) <= 0.04, logs


def test_json_round_trip(calibrated, tmp_path):
    _, _, result = calibrated
    path = tmp_path / "calib.json"
    result.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "sparge-calibration" and data["format_version"] == sc.FORMAT_VERSION == 2
    assert data["sparge_version"] == sparge.__version__
    assert data["budget"]["rel_l1"] == BUDGET
    assert set(data["layers"]) == {"layers.0", "layers.1"}
    for name, entry in data["layers"].items():
        param = {"topk": "topk", "cdf": "cdfthreshd"}[entry["mode"]]
        for key in (param, "simthreshd1", "pvthreshd", "dense"):
            assert len(entry[key]) == HEADS, (name, key)
        assert set(entry["per_head"]) == {"sparsity", "rel_l1", "cosine", "pv_skip", "estimated_rel_l1"}
    assert data["search"]["grid"]["pvthreshd"] == [15.0, 10.0, 6.0]
    loaded = sc.CalibrationResult.load(path)
    assert loaded == result
    path2 = tmp_path / "again.json"
    loaded.save(path2)
    assert path2.read_text() == path.read_text()
    # A version-1 file (no P·V / cosine / estimate fields, no search settings) still loads.
    data["format_version"] = 1
    del data["search"]
    for entry in data["layers"].values():
        entry["per_head"] = {k: entry["per_head"][k] for k in ("sparsity", "rel_l1")}
        del entry["expected"]["pv_skip"]
    old = sc.CalibrationResult.from_json(data)
    assert old.layer_settings().keys() == result.layer_settings().keys()
    assert old.layers["layers.0"].params == result.layers["layers.0"].params


def _held_out_checks(model, result, tmp_path, mode=None, min_sparsity=0.1):
    path = tmp_path / "calib.json"
    result.save(path)
    loaded = sc.CalibrationResult.load(path)
    held_out = [make_input(model, seed) for seed in (11, 12)]
    held = sc.capture(model, held_out)
    report = loaded.evaluate(held)
    print("\nheld-out:", {n: {k: round(v, 4) for k, v in r.items() if k != "head_rel_l1"} for n, r in report.items()})
    for name, calls in held.calls.items():
        settings = loaded.layer_settings()[name]
        if mode is not None:
            assert settings["mode"] == mode
        for call in calls:
            rel, sparsity = run_layer(call, settings)
            layer_rel = report[name]["rel_l1"]
            assert max(rel) <= BUDGET * HELD_OUT_MARGIN, (name, rel)
            assert layer_rel <= BUDGET * HELD_OUT_MARGIN and sparsity > min_sparsity, (name, report[name], sparsity)
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
        layer = result.layers[c.layer]
        param = {"topk": "topk", "cdf": "cdfthreshd"}[layer.mode]
        assert c.settings["mode"] == layer.mode
        assert torch.equal(c.settings[param], torch.tensor(layer.params)), (c.layer, c.settings)
        assert torch.equal(c.settings["pvthreshd"], torch.tensor(layer.pvthreshd)), (c.layer, c.settings)
        assert torch.equal(c.settings["simthreshd1"], torch.tensor(layer.simthreshd1)), (c.layer, c.settings)
    for o, r in zip(out, ref):
        err = relative_l1(o, r)
        assert 0 < err < 0.05, err  # model output (residual stream) barely moves


def test_apply_held_out(calibrated, tmp_path):
    model, _, result = calibrated
    _held_out_checks(model, result, tmp_path)


def test_cdf_calibration_held_out(model_and_captured, tmp_path):
    model, captured = model_and_captured
    result = sc.calibrate(captured, budget=BUDGET, modes=("cdf",))
    for name, layer in result.layers.items():
        assert layer.mode == "cdf" and not layer.exact, (name, layer)
        assert all(p in sc.DEFAULT_GRIDS["cdf"] or d for p, d in zip(layer.params, layer.dense)), layer.params
        # CDF selects per Q block from the pooled map: on this model it prunes less than TopK at the same error.
        assert sum(layer.dense) < HEADS and layer.expected_sparsity > 0.05, layer
    _held_out_checks(model, result, tmp_path, mode="cdf", min_sparsity=0.05)


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
    # ... and in evaluate.
    with pytest.raises(sc.CalibrationError, match=r"layers\.0.*4 query heads.*has 2"):
        result.evaluate(sc.capture(other, [x]))
    # Unknown layer names (another model), in apply and in evaluate.
    renamed = nn.Sequential(Model())
    with pytest.raises(sc.CalibrationError, match=r"layers\.0"):
        result.apply(renamed)
    with pytest.raises(sc.CalibrationError, match=r"0\.layers\.0.*not in the calibration"):
        result.evaluate(sc.capture(renamed, [x]))
    # Wrong file format version, wrong per-head lengths, missing fields.
    data = result.to_json()
    data["format_version"] = 99
    with pytest.raises(sc.CalibrationError, match="format_version"):
        sc.CalibrationResult.from_json(data)
    data = result.to_json()
    entry = data["layers"]["layers.0"]
    entry[{"topk": "topk", "cdf": "cdfthreshd"}[entry["mode"]]] = [0.5] * 3
    with pytest.raises(sc.CalibrationError, match=r"layers\.0.*(topk|cdfthreshd).*4"):
        sc.CalibrationResult.from_json(data)
    data = result.to_json()
    data["layers"]["layers.1"]["pvthreshd"] = [15.0] * 5
    with pytest.raises(sc.CalibrationError, match=r"layers\.1.*pvthreshd.*4"):
        sc.CalibrationResult.from_json(data)
    data = result.to_json()
    del data["layers"]["layers.1"]["simthreshd1"]
    with pytest.raises(sc.CalibrationError, match=r"layers\.1.*malformed.*simthreshd1"):
        sc.CalibrationResult.from_json(data)
    with pytest.raises(sc.CalibrationError, match="not a sparge calibration"):
        sc.CalibrationResult.from_json({"format": "something else"})


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
    with pytest.raises(ValueError, match=r"grid\['pvthreshd'\]"):
        sc.calibrate(captured, grid={"pvthreshd": (-1.0,)})
    with pytest.raises(ValueError, match=r"grid\['simthreshd1'\]"):
        sc.calibrate(captured, grid={"simthreshd1": ()})
    with pytest.raises(ValueError, match=r"grid: unexpected key.*'blocks'"):
        sc.calibrate(captured, grid={"blocks": (0.5,)})
    with pytest.raises(ValueError, match=r"grid\['pvthreshd'\]: also fixed by settings"):
        sc.calibrate(captured, grid={"pvthreshd": (10.0,)}, settings={"pvthreshd": 15.0})
    with pytest.raises(ValueError, match="rows_per_block"):
        sc.calibrate(captured, rows_per_block=0)
    with pytest.raises(ValueError, match="refine"):
        sc.calibrate(captured, refine=-1)
    with pytest.raises(sc.CalibrationError, match="nope"):
        sc.calibrate(captured, layers=["nope"])
    q, k, v = structured_qkv(1, 2, 2, 256, 256, 32, seed=1)
    with pytest.raises(ValueError, match="budget"):
        sc.auto_attention(q, k, v, budget=-0.1)
    with pytest.raises(ValueError, match="rows_per_block"):
        sc.auto_attention(q, k, v, rows_per_block=0)
    with pytest.raises(ValueError, match="margin"):
        sc.auto_attention(q, k, v, margin=1.0)
    with pytest.raises(ValueError, match="pvthreshd"):
        sc.auto_attention(q, k, v, pvthreshd=-1.0)


# ---- automatic mode -------------------------------------------------------------------------------------

# Measured overshoot rate of auto_attention (heads over the budget, relative L1 vs exact attention) at the
# default margin 0.2 on all prediction_workloads, 4 heads, D = 64, L = 2048, 5 seeds: 1 / 100 heads not causal,
# 0 / 100 causal (at margin 0.1: 4 / 100 and 6 / 100). On the set below (L = 1024, fewer Q blocks: noisier
# estimates; 2 heads, 2 seeds, causal and not: 40 heads): 0 / 40, worst head 0.048, true / estimated error in
# [0.92, 1.26], mean sparsity 0.70 on the structured workloads. The bounds allow 2 / 40 (5 %) over the budget,
# none by more than 20 %, and the estimate ratio in [0.7, 1.4].
AUTO_SEEDS = (0, 1)
OVERSHOOT_MAX = 2


def test_auto_attention_overshoot_rate():
    rows = []
    for seed in AUTO_SEEDS:
        for name, (q, k, v) in prediction_workloads(1024, 2, 64, seed=seed).items():
            for is_causal in (False, True):
                ref, _ = reference_attention(q, k, v, is_causal=is_causal)
                o, info = sc.auto_attention(q, k, v, BUDGET, is_causal=is_causal, output_dtype=torch.float32,
                                            return_info=True)  # fmt: skip
                for h, rel in enumerate(head_rel_l1(o, ref)):
                    rows.append((name, seed, is_causal, h, rel, float(info.estimated_rel_l1[h]), float(info.sparsity)))
    over = [r for r in rows if r[4] > BUDGET]
    print(f"\nauto_attention: {len(over)}/{len(rows)} heads over the budget {BUDGET}", over)
    assert len(over) <= OVERSHOOT_MAX, over
    assert max(r[4] for r in rows) <= 1.2 * BUDGET, max(rows, key=lambda r: r[4])
    # Not trivially dense: structured workloads are sparse and use most of the budget.
    structured = [r for r in rows if r[0] != "noise"]
    assert sum(r[6] for r in structured) / len(structured) > 0.5, structured
    assert sum(r[4] for r in structured) / len(structured) > 0.5 * BUDGET, structured
    # The estimate tracks the truth.
    ratios = torch.tensor([r[4] / r[5] for r in rows])
    assert 0.7 <= float(ratios.min()) and float(ratios.max()) <= 1.4, ratios


def test_auto_attention_conventions():
    q, k, v = structured_qkv(2, 4, 2, 640, 640, 64, seed=7)  # GQA, batch 2, partial last blocks
    ref, _ = reference_attention(q, k, v)
    o, info = sc.auto_attention(q, k, v, return_info=True)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert info.mask.shape == (2, 4, 5, 10) and info.mask.dtype == torch.bool
    assert info.estimated_rel_l1.shape == (4,) and len(info.pvthreshd) == 4
    assert max(head_rel_l1(o, ref)) <= BUDGET, head_rel_l1(o, ref)
    kept = info.mask.sum().item() / info.mask.numel()
    assert float(info.sparsity) == pytest.approx(1.0 - kept, abs=1e-6)
    # The mask runs through the block-mask path: block_sparse_attention with it gives the same output.
    again = sparge.block_sparse_attention(q, k, v, info.mask, pvthreshd=torch.tensor(info.pvthreshd))
    assert torch.equal(again, o)
    # NHD layout: the same result, transposed.
    o_nhd = sc.auto_attention(*(x.transpose(1, 2).contiguous() for x in (q, k, v)), layout="NHD")
    assert torch.equal(o_nhd.transpose(1, 2), o)
    # Bottom-right causal with Lq < Lk (the KV-cache case).
    q2 = q[:, :, :200].contiguous()
    ref2, _ = reference_attention(q2, k, v, is_causal=True, causal_alignment="bottom_right")
    o2 = sc.auto_attention(q2, k, v, is_causal=True, causal_alignment="bottom_right")
    assert max(head_rel_l1(o2, ref2)) <= BUDGET, head_rel_l1(o2, ref2)


def test_bench_script_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("calibration_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--len", "512", "--heads", "2", "--dim", "32", "--device", "cpu", "--layers", "2",
                      "--auto-seeds", "1"])  # fmt: skip
    text = capsys.readouterr().out
    assert "| layer | seconds |" in text and "overshoot rate:" in text, text
    rows = out["calibration"]
    assert [r["layer"] for r in rows] == ["layer0.local_1d", "layer1.video_3d"]
    for r in rows:
        assert r["seconds"] > 0 and 0.0 < r["sparsity"] < 1.0 and r["calib_rel_l1"] <= BUDGET, r
        assert 0.0 < r["heldout_rel_l1"] < 2 * BUDGET, r
    auto = out["auto"]
    assert auto["runs"] == 5 and auto["heads"] + auto["infeasible_heads"] == 10, auto
    assert 0.0 <= auto["overshoot_rate"] <= 1.0 and auto["mean_sparsity"] > 0.2, auto
