"""The benchmark CLI (python -m sparge) on a small CPU problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparge import bench


def test_bench_cli_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["-L", "256", "-H", "2", "--heads-kv", "1", "--causal", "--repeats", "2", "--warmup", "0", "--stages",
            "--device", "cpu", "--modes", "dense,topk:0.5,cdf:0.9", "--json", str(out_json), "--plot", str(out_png)]  # fmt: skip
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    assert "[1/" in captured.err and "wrote" in captured.err  # progress on stderr
    table = captured.out
    for label in ("torch sdpa", "sparge dense", "sparge topk 0.5", "sparge cdf 0.9", "sparge / quantize", "speed-up"):
        assert label in table, table
    data = json.loads(out_json.read_text())
    assert data["config"]["causal"] is True and data["config"]["heads_kv"] == 1 and data["config"]["reference"] == "fp64"
    results = {r["case"]: r for r in data["results"]}
    assert results["torch sdpa"]["speedup"] == pytest.approx(1.0)
    dense, topk = results["sparge dense"], results["sparge topk 0.5"]
    assert dense["sparsity"] == 0.0 and 0.0 < topk["sparsity"] < 1.0
    assert dense["rel_l1"] < 0.03 and dense["cosine"] > 0.999 and len(dense["times_ms"]) == 2
    assert dense["tops"] == pytest.approx(data["config"]["flops"] / (dense["time_ms"] * 1e-3) / 1e12)
    assert data["config"]["flops"] == 4 * 1 * 2 * 256 * 256 * 64 * 0.5
    assert out_png.stat().st_size > 0


def test_bench_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "sparge", "--help"], capture_output=True, text=True, check=True)
    assert "--modes" in result.stdout and "--json" in result.stdout and "--plot" in result.stdout


@pytest.mark.parametrize("modes", ["sparse", "topk:x", "dense:0.5"])
def test_bench_rejects_bad_modes(modes, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--modes", modes])
    assert "--modes" in capsys.readouterr().err
