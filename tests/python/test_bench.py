"""The benchmark CLI (python -m sparge) on a small CPU problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
    for label in ("torch sdpa", "sparge dense", "sparge topk 0.5", "sparge cdf 0.9", "sparge / quantize", "speed-up",
                  "quantize + predict", "% of the sparge dense op"):
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


def test_bench_cases_take_turns_unless_sequential(tmp_path, capsys):
    calls = []
    timer = bench._Timer(torch.device("cpu"), warmup=1, repeats=3)
    times = timer.interleaved([lambda: calls.append("a"), lambda: calls.append("b")])
    assert calls == ["a", "b"] + ["a", "b"] * 3 and [len(t) for t in times] == [3, 3]
    for flag, timing in (([], "interleaved"), (["--sequential"], "sequential")):
        out_json = tmp_path / f"{timing}.json"
        argv = ["-L", "128", "-H", "1", "--repeats", "2", "--warmup", "0", "--device", "cpu", "--modes", "dense",
                "--json", str(out_json), *flag]  # fmt: skip
        assert bench.main(argv) == 0
        data = json.loads(out_json.read_text())
        assert data["config"]["timing"] == timing
        assert all(len(r["times_ms"]) == 2 for r in data["results"]), data["results"]
    assert "rounds of one run per case" in capsys.readouterr().err


def test_bench_idle_gap_before_every_timed_run(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: events.append(("idle", seconds)))
    timer = bench._Timer(torch.device("cpu"), warmup=2, repeats=3, idle_ms=50.0)
    times = timer.interleaved([lambda: events.append("a"), lambda: events.append("b")])
    assert [len(t) for t in times] == [3, 3]
    idle = ("idle", pytest.approx(0.05))
    assert events == ["a", "a", "b", "b"] + [idle, "a", idle, "b"] * 3  # warm-up runs wait for nothing
    out_json = tmp_path / "idle.json"
    argv = ["-L", "128", "-H", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--modes", "dense",
            "--idle-ms", "1.5", "--json", str(out_json)]  # fmt: skip
    assert bench.main(argv) == 0
    assert json.loads(out_json.read_text())["config"]["idle_ms"] == 1.5


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bench_rejects_bad_idle_gap(value):
    with pytest.raises(SystemExit, match="--idle-ms"):
        bench.main(["--idle-ms", value, "--device", "cpu"])


def test_bench_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "sparge", "--help"], capture_output=True, text=True, check=True)
    assert "--modes" in result.stdout and "--json" in result.stdout and "--plot" in result.stdout


@pytest.mark.parametrize("modes", ["sparse", "topk:x", "dense:0.5"])
def test_bench_rejects_bad_modes(modes, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--modes", modes])
    assert "--modes" in capsys.readouterr().err


def test_bench_overhead_rows(tmp_path, capsys):
    out_json = tmp_path / "o.json"
    argv = ["-L", "128", "-H", "1", "--modes", "dense", "--repeats", "1", "--warmup", "0", "--device", "cpu",
            "--dtype", "fp32", "--overhead", "--overhead-calls", "2", "--json", str(out_json)]  # fmt: skip
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    for label in ("overhead torch sdpa", "overhead sparge.attention", "overhead sparge.patch route", "host µs/call",
                  "vs sdpa", "B=1 H=8 L=256 D=64"):  # fmt: skip
        assert label in table, table
    data = json.loads(out_json.read_text())
    assert data["config"]["overhead_shape"] == [1, 8, 256, 64]
    rows = {r["case"]: r for r in data["results"] if r["case"].startswith("overhead")}
    assert len(rows) == 3
    for name, row in rows.items():
        assert row["host_us"] > 0 and row["overhead_ratio"] > 0, (name, row)
        assert row["gpu_us"] is None  # CUDA events only on a GPU
    sdpa = rows["overhead torch sdpa"]
    assert sdpa["overhead_ratio"] == pytest.approx(1.0)
    sparge_row = rows["overhead sparge.attention"]
    assert sparge_row["overhead_ratio"] == pytest.approx(sparge_row["host_us"] / sdpa["host_us"])
    assert all(r["host_us"] is None for r in data["results"] if r["case"] not in rows)  # other rows: no overhead


def test_bench_rejects_bad_overhead_calls():
    with pytest.raises(SystemExit, match="overhead-calls"):
        bench.main(["--overhead", "--overhead-calls", "0"])


def test_power_sample_lines_parse_to_time_clock_and_watts():
    first = bench.parse_power_sample("2026/11/22 21:35:40.250, 1755, 696.52")
    second = bench.parse_power_sample("2026/11/22 21:35:41.750, 1275, 697.00\n")
    assert first[1:] == (1755.0, 696.52) and second[1:] == (1275.0, 697.0)
    assert second[0] - first[0] == pytest.approx(1.5)
    for line in ("2026/11/22 21:35:40.250, [N/A], 696.52", "1755, 696.52", "", "not a time, 1, 2"):
        assert bench.parse_power_sample(line) is None, line


def test_power_window_medians():
    samples = [(0.0, 1980.0, 100.0), (1.0, 1700.0, 690.0), (1.1, 1750.0, 700.0), (1.2, 1800.0, 650.0), (3.0, 1.0, 1.0)]
    assert bench.window_medians(samples, 0.5, 2.0) == (1750.0, 690.0)
    assert bench.window_medians(samples, 1.05, 1.1) == (1750.0, 700.0)  # both ends inclusive
    assert bench.window_medians(samples, 1.5, 2.5) is None


def test_power_phase_reads_clock_and_watts_of_each_case(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!" + sys.executable + "\n"
        "import datetime, sys, time\n"
        "if any('power.limit' in a for a in sys.argv):\n"
        "    print('700.00'); sys.exit(0)\n"
        "while True:\n"
        "    now = datetime.datetime.now().strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]\n"
        "    print(f'{now}, 1755, 696.50', flush=True)\n"
        "    time.sleep(0.02)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(bench.shutil, "which", lambda name: str(fake) if name == "nvidia-smi" else None)
    monkeypatch.setattr(bench, "_nvidia_smi_gpu", lambda device: "00000000:00:06.0")
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda device=None: None)
    calls = {"a": 0, "b": 0}
    timed = [(bench.Result("a"), lambda: calls.__setitem__("a", calls["a"] + 1)),
             (bench.Result("b"), lambda: calls.__setitem__("b", calls["b"] + 1))]  # fmt: skip
    assert bench._power(timed, torch.device("cpu"), 0.4) == 700.0
    assert calls["a"] > 0 and calls["b"] > 0
    for res, _ in timed:
        assert (res.sm_mhz, res.power_w) == (1755.0, 696.5), res
    table = bench.format_table([res for res, _ in timed])
    assert "SM MHz" in table and "1755" in table and "696" in table


def test_power_phase_needs_nvidia_smi(monkeypatch):
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="nvidia-smi"):
        bench._power([], torch.device("cpu"), 1.0)


def test_bench_rejects_power_off_cuda_and_bad_power_seconds():
    with pytest.raises(SystemExit, match="--power"):
        bench.main(["--power", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--power-seconds"):
        bench.main(["--power-seconds", "0", "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA device")
def test_bench_rejects_cuda_device_without_gpu():
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--device", "cuda", "--modes", "dense"])


def test_bench_rejects_unknown_device():
    with pytest.raises(SystemExit, match="--device"):
        bench.main(["--device", "tpu9", "--modes", "dense"])


def test_stage_share_of_the_dense_op():
    rows = [bench.Result("sparge dense", time_ms=10.0), bench.Result("  sparge / quantize", time_ms=0.4),
            bench.Result("  sparge dense / predict", time_ms=0.1), bench.Result("  sparge dense / attend", time_ms=9.4)]
    share = bench._stage_share(rows)
    assert share.time_ms == pytest.approx(0.5) and share.note == "5.0 % of the sparge dense op"
    assert bench._stage_share(rows[:2]) is None  # no dense selection timed
    assert bench._stage_share(rows[1:]) is None  # no dense op timed
