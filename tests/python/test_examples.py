"""Runs the Python examples (examples/python/*.py) at tiny sizes, so a broken example fails CI.

Each example exposes ``main(argv) -> dict`` with its metrics; the checks are loose (cosine
similarity against PyTorch SDPA, calls routed to sparge), they catch broken code, not accuracy
regressions (tests/python/test_prediction_quality.py does that).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "python"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"sparge_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llm_prefill(capsys):
    res = _load("llm_prefill").main(
        ["--device", "cpu", "--seq-len", "512", "--layers", "2", "--vocab", "512", "--min-seq-len", "256", "--reps", "1"]
    )
    out = capsys.readouterr().out
    assert "routing log" in out and "sparge dense" in out
    runs = {r["name"].split()[-1] if r["name"] != "sdpa" else "sdpa": r for r in res["runs"]}
    assert set(runs) == {"sdpa", "dense", "topk=0.5"}
    assert runs["sdpa"]["cos_logits"] == pytest.approx(1.0)
    for name, floor in (("dense", 0.99), ("topk=0.5", 0.95)):
        r = runs[name]
        # 2 layers x (1 warm-up + 1 timed forward), all taken by sparge
        assert r["log"]["sparge"] == 4 and r["log"]["fallback"] == 0, r["log"]
        assert r["cos_hidden"] >= floor and r["cos_logits"] >= floor, r
        assert 0 <= r["rel_l1_logits"] < 0.5, r


def test_llm_prefill_short_prompt_falls_back(capsys):
    # Prompts shorter than min_seq_len keep PyTorch's SDPA; the log says so.
    res = _load("llm_prefill").main(["--device", "cpu", "--seq-len", "128", "--layers", "1", "--vocab", "256",
                                      "--reps", "1", "--min-seq-len", "1024"])  # fmt: skip
    for r in res["runs"][1:]:
        assert r["log"] == {"sparge": 0, "fallback": 2, "by_reason": {"short_sequence": 2}}
        assert r["cos_logits"] == pytest.approx(1.0)


def test_dit_block(capsys):
    res = _load("dit_block").main(
        ["--device", "cpu", "--grid", "4", "8", "16", "--blocks", "3", "--heads", "4", "--min-seq-len", "256",
         "--reps", "1"]  # fmt: skip
    )
    out = capsys.readouterr().out
    assert "sparsity" in out and "routing log" in out
    # 3 blocks x (1 warm-up + 1 timed forward)
    assert res["log"]["sparge"] == 6 and res["log"]["fallback"] == 0, res["log"]
    assert res["cos"] >= 0.95, res
    dense, topk, cdf = res["layers"]
    assert dense["settings"]["mode"] == "dense" and dense["sparsity"] == 0.0 and dense["cos"] >= 0.99, dense
    assert topk["settings"]["mode"] == "topk" and 0.3 <= topk["sparsity"] <= 0.6 and topk["cos"] >= 0.95, topk
    assert cdf["settings"]["mode"] == "cdf" and 0.0 <= cdf["sparsity"] < 1.0 and cdf["cos"] >= 0.95, cdf
    for layer in res["layers"]:
        assert layer["calls"] == ["sparge", "sparge"], layer
