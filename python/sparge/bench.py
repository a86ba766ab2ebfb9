"""Benchmark of sparge against torch's scaled_dot_product_attention (``python -m sparge``).

Runs on the best available device (CUDA if available, else CPU) on the structured workload of
:func:`sparge.testing.structured_qkv`. Every case is timed as the whole user-visible call
(median of ``--repeats`` runs after ``--warmup``; CUDA events and an L2 flush between runs on a
GPU; the cases take turns, one run each per round, so a slow clock drift moves every case alike
— a kernel still runs slower right after a power-hungry one, see bench/RESULTS.md "Timing order";
``--sequential`` times each case's runs back to back; ``--idle-ms T`` leaves the device idle for T ms
before every timed run, so that no run inherits the clocks its predecessor left) and checked against exact attention (fp32
on a GPU, fp64 on the CPU). FLOPs count the dense problem, ``4·B·Hq·Lq·Lk·D`` (half for
causal), the convention of SpargeAttn and SageAttention.

``--overhead`` adds the per-call overhead rows: ``N`` back-to-back calls at the small shape
B=1 H=8 L=256 D=64 (``OVERHEAD_SHAPE``) of torch's SDPA, :func:`sparge.attention` and SDPA routed
through :func:`sparge.patch.sdpa`, reported as µs per call: *host* (the time the Python thread
spends issuing the calls, before the final synchronisation), *C++* (for sparge.attention: the
host time of its C++ call alone, binding and core on buffers allocated once; the rest of the host
time is its Python layer, checks and allocations), *GPU* (CUDA events around the N calls; on a
GPU) and the ratio of the host time to SDPA's. On a GPU, at this shape the kernels are shorter
than the launch path, so the host time is the per-call overhead; on the CPU the calls compute
synchronously and the host time includes the attention itself.

``--power`` (CUDA) adds the SM clock and the board power of every timed case: after the timing,
each case runs back to back for ``--power-seconds`` while ``nvidia-smi`` samples both every 100 ms
(medians, the first quarter-second of each case left out). On an H100 the attention kernel runs at
the board's power cap, so a change that saves energy shows up as a higher clock.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

import sparge
from sparge import _C, _ops
from sparge.testing import cosine_similarity, reference_attention, relative_l1, structured_qkv

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MODES = "dense,topk:0.5,topk:0.25,cdf:0.98"
OVERHEAD_SHAPE = (1, 8, 256, 64)  # B, H, L, D of the per-call overhead measurement


@dataclass
class Result:
    case: str
    time_ms: Optional[float] = None  # median
    times_ms: list = field(default_factory=list)
    speedup: Optional[float] = None  # vs torch SDPA (default backend selection)
    tops: Optional[float] = None
    sparsity: Optional[float] = None
    cosine: Optional[float] = None
    rel_l1: Optional[float] = None
    host_us: Optional[float] = None  # --overhead: host time per call (µs)
    gpu_us: Optional[float] = None  # --overhead: GPU time per call (µs, CUDA events)
    overhead_ratio: Optional[float] = None  # --overhead: host_us / host_us of torch SDPA
    core_us: Optional[float] = None  # --overhead, sparge.attention: host time per call of its C++ call alone (µs)
    sm_mhz: Optional[float] = None  # --power: median SM clock while the case runs back to back
    power_w: Optional[float] = None  # --power: median board power while the case runs back to back
    note: str = ""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse_modes(text: str) -> list[tuple[str, Optional[float]]]:
    modes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition(":")
        if name not in ("dense", "topk", "cdf"):
            raise argparse.ArgumentTypeError(f"--modes: expected dense, topk:FRACTION or cdf:MASS items, got {item!r}")
        if name == "dense" and value:
            raise argparse.ArgumentTypeError(f"--modes: 'dense' takes no value, got {item!r}")
        try:
            number = float(value) if value else {"dense": None, "topk": 0.5, "cdf": 0.98}[name]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--modes: expected a number after ':', got {item!r}") from None
        modes.append((name, number))
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparge",
        description="Benchmark sparge (dense / topk / cdf) against torch scaled_dot_product_attention on a "
        "structured workload; accuracy vs exact attention.",
    )
    p.add_argument("-B", "--batch", type=int, default=1)
    p.add_argument("-H", "--heads", type=int, default=4, help="query heads")
    p.add_argument("--heads-kv", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("-L", "--seq-len", type=int, default=2048, help="query length")
    p.add_argument("--seq-len-k", type=int, default=None, help="key length (default: --seq-len)")
    p.add_argument("-D", "--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16")
    p.add_argument("--causal", action="store_true", help="top-left causal mask (as SDPA is_causal=True)")
    p.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"), default=None,
                   help="video-like workload: positions on a T×H×W grid (sets the lengths to T·H·W)")  # fmt: skip
    p.add_argument("--modes", type=_parse_modes, default=_parse_modes(DEFAULT_MODES),
                   help=f"sparge cases, comma separated (default {DEFAULT_MODES})")  # fmt: skip
    p.add_argument("--pv-precision", choices=("fp8", "fp16", "fp8_fp16acc"), default="fp8")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per case (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--stages", action="store_true",
                   help="also time quantize / predict / attend separately (CUDA: replayed from CUDA graphs) and "
                        "report quantize + dense predict as a share of the dense op")  # fmt: skip
    p.add_argument("--sequential", action="store_true",
                   help="time each case's runs back to back instead of the cases taking turns (the method of the "
                        "tables before 2026-11-22 session 6; on an H100 it favours sparge against cuDNN by 10-20 %%, "
                        "see bench/RESULTS.md)")  # fmt: skip
    p.add_argument("--idle-ms", type=float, default=0.0, metavar="T",
                   help="idle the device for T ms before every timed run (default 0): each run starts from the "
                        "same power state instead of the one its predecessor left (bench/RESULTS.md, timing order)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--overhead", action="store_true",
                   help="also measure the per-call overhead (µs per call, N back-to-back calls at B=1 H=8 L=256 "
                        "D=64) of torch SDPA, sparge.attention and the sparge.patch route")  # fmt: skip
    p.add_argument("--overhead-calls", type=int, default=None, metavar="N",
                   help="calls per overhead measurement (default 200 on CUDA, 20 on CPU)")  # fmt: skip
    p.add_argument("--power", action="store_true",
                   help="also report the SM clock and the board power of every timed case (CUDA, nvidia-smi): each "
                        "runs back to back for --power-seconds while nvidia-smi samples every 100 ms")  # fmt: skip
    p.add_argument("--power-seconds", type=float, default=2.0, metavar="S",
                   help="seconds each case runs for --power (default 2)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot speed-up and relative L1 vs sparsity (matplotlib)")
    return p


class _Timer:
    """Median wall time of a callable: CUDA events with an L2 flush on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, idle_ms: float = 0.0):
        self.device, self.warmup, self.repeats, self.idle_ms = device, warmup, repeats, idle_ms
        self.flush = None
        if device.type == "cuda":
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=device)

    def once(self, fn: Callable[[], object]) -> float:
        """One timed run (ms), after idle_ms of idle device."""
        if self.idle_ms > 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            time.sleep(self.idle_ms * 1e-3)
        if self.flush is None:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        return [self.once(fn) for _ in range(self.repeats)]

    def interleaved(self, fns: Sequence[Callable[[], object]]) -> list[list[float]]:
        """Times of every callable, warmed up in turn and then run once each per round."""
        for fn in fns:
            for _ in range(self.warmup):
                fn()
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(self.repeats):
            for fn, t in zip(fns, times):
                t.append(self.once(fn))
        return times


def _sdpa_cases(device: torch.device) -> list[tuple[str, Optional[object]]]:
    """(name, sdpa_kernel backend or None for torch's own choice)."""
    cases: list[tuple[str, Optional[object]]] = [("torch sdpa", None)]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        cases += [("torch sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("torch sdpa flash", SDPBackend.FLASH_ATTENTION)]
    return cases


def _stages(q, k, v, args: argparse.Namespace, stage_cases) -> list[tuple[str, Callable[[], object]]]:
    """(label, callable) timing quantize once and predict / attend for every sparge case; on CUDA
    each replays the stage from a CUDA graph (_graphed)."""
    quant_kw = {"pv_precision": args.pv_precision}
    quantized = sparge.quantize(q, k, v, **quant_kw)
    stages = [("sparge / quantize", lambda: sparge.quantize(q, k, v, **quant_kw))]
    attend_kw = {"is_causal": args.causal}
    for label, kwargs in stage_cases:
        select_kw = {key: val for key, val in kwargs.items() if key in ("mode", "topk", "cdfthreshd", "is_causal")}
        pred = sparge.predict(quantized, **select_kw)
        stages.append((f"{label} / predict", lambda kw=select_kw: sparge.predict(quantized, **kw)))
        stages.append((f"{label} / attend", lambda p=pred: sparge.attend(quantized, p.index, p.count, **attend_kw)))
    if q.device.type == "cuda":
        stages = [(label, _graphed(fn, q.device)) for label, fn in stages]
    return stages


def _graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn captured once into a CUDA graph; the returned callable replays it. A stage call from
    Python costs more host time than some stages take on the GPU (the dense selection: tens of µs),
    so timed as calls the GPU would wait for the host; a replay is one launch."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture, on a side stream as torch.cuda.graph asks
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _stage_share(results: Sequence[Result]) -> Optional[Result]:
    """Quantize + the dense selection as a share of the whole dense op (issue target: <= 8 %)."""
    times = {r.case.strip(): r.time_ms for r in results if r.time_ms}
    parts = [times.get("sparge / quantize"), times.get("sparge dense / predict")]
    if times.get("sparge dense") is None or None in parts:
        return None
    share = 100.0 * sum(parts) / times["sparge dense"]
    return Result("  quantize + predict", time_ms=sum(parts), note=f"{share:.1f} % of the sparge dense op")


def _timed_calls(fn: Callable[[], object], device: torch.device, calls: int) -> tuple[float, Optional[float]]:
    """(host µs per call, GPU µs per call or None) of ``calls`` back-to-back calls."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - t0
    if not on_gpu:
        return issued * 1e6 / calls, None
    end.record()
    end.synchronize()
    return issued * 1e6 / calls, start.elapsed_time(end) * 1e3 / calls


Case = tuple[Callable[[], object], Callable[[], contextlib.AbstractContextManager]]  # (call, context of its runs)


def _per_call_us(cases: dict[str, Case], device: torch.device, calls: int,
                 rounds: int = 7) -> dict[str, tuple[float, Optional[float]]]:  # fmt: skip
    """{name: (host µs per call, GPU µs per call or None)} for cases {name: (fn, context)}: medians
    over ``rounds`` runs of ``calls`` back-to-back calls after one warm-up run, the cases taking
    turns within each round, so that a drift of the machine's speed reaches all of them alike."""
    times: dict[str, list[tuple[float, Optional[float]]]] = {name: [] for name in cases}
    for r in range(rounds + 1):
        for name, (fn, context) in cases.items():
            with context():
                measured = _timed_calls(fn, device, calls)
            if r > 0:
                times[name].append(measured)
    result = {}
    for name, runs in times.items():
        gpu = [g for _, g in runs if g is not None]
        result[name] = (statistics.median(h for h, _ in runs), statistics.median(gpu) if gpu else None)
    return result


def _core_call(q, k, v) -> Callable[[], None]:
    """A callable that repeats only the C++ calls of ``sparge.attention(q, k, v)``
    (``_ops.launch_attention``, its two parts: binding and core, no checks, no allocation), into the
    buffers of the first call, which it records and keeps alive. The first call takes the general
    path (the eager path, ``_C.attention_eager``, makes the same core calls from C++)."""
    launch, eager = _ops.launch_attention, _C.attention_eager
    recorded = []

    def record(*args):
        recorded.append(args)
        launch(*args)

    def call():
        if recorded:
            for args in recorded:
                launch(*args)
            return
        _ops.launch_attention, _C.attention_eager = record, lambda *args: None
        try:
            sparge.attention(q, k, v)
        finally:
            _ops.launch_attention, _C.attention_eager = launch, eager

    return call


def _overhead(device: torch.device, dtype: torch.dtype, calls: int, seed: int) -> list[Result]:
    """The --overhead rows: torch SDPA, sparge.attention (with the host time of its C++ call alone)
    and SDPA routed by sparge.patch.sdpa."""
    batch, heads, length, head_dim = OVERHEAD_SHAPE
    q, k, v = structured_qkv(batch, heads, heads, length, length, head_dim, dtype=dtype, device=device, seed=seed)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def routed():  # F.scaled_dot_product_attention inside an active sparge.patch.sdpa (sparge's defaults)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    cases = [("overhead torch sdpa", lambda: sdpa(q, k, v), False),
             ("overhead sparge.attention", lambda: sparge.attention(q, k, v), False),
             ("overhead sparge.patch route", routed, True)]  # fmt: skip
    shape = f"B={batch} H={heads} L={length} D={head_dim}"
    results, timed = [], {}
    for name, fn, patched in cases:  # one call each first: a case that cannot run gets a note
        context = (lambda: sparge.patch.sdpa(min_seq_len=0, record=False)) if patched else contextlib.nullcontext
        try:
            with context():
                fn()
        except (RuntimeError, NotImplementedError) as e:
            note = str(e).splitlines()[0] if str(e) else type(e).__name__
            _log(f"{name}: skipped ({note})")
            results.append(Result(name, note=f"unavailable: {note}"))
            continue
        results.append(Result(name))
        timed[name] = (fn, context)
    core = "C++ call alone"
    if results[1].case in timed:
        timed[core] = (_core_call(q, k, v), contextlib.nullcontext)
    _log(f"overhead ({shape}, {calls} calls per run, cases interleaved): {', '.join(timed)} ...")
    per_call = _per_call_us(timed, device, calls)
    for r in results:
        if r.case in per_call:
            r.host_us, r.gpu_us = per_call[r.case]
    if core in per_call:
        results[1].core_us = per_call[core][0]
    base = results[0].host_us
    for r in results:
        if base and r.host_us is not None:
            r.overhead_ratio = r.host_us / base
    results[0].note = (f"overhead rows: {shape} {dtype}, medians of 7 runs of {calls} back-to-back calls, the "
                       "cases taking turns in each round; host = time to issue them, "
                       "GPU = CUDA events (on the CPU the host time includes the computation)")  # fmt: skip
    return results


# FlexAttention's kernel tiles: they must divide the (128, 64) blocks of the mask; its own choice at
# head dim 64 (BLOCK_N = 128) does not compile with them.
_FLEX_TILES = {"BLOCK_M": 128, "BLOCK_N": 64}


def _flex_case(q, k, v, label: str, kwargs: dict, causal: bool, gqa: bool):
    """FlexAttention (compiled) over the blocks sparge keeps for the same inputs: the
    block-sparse baseline of DESIGN §4. Times only the attention, not the prediction."""
    select = {key: val for key, val in kwargs.items() if key in ("mode", "topk", "cdfthreshd", "is_causal")}
    pred = sparge.predict(sparge.quantize(q, k, v), **select)
    len_q, len_k = q.size(2), k.size(2)

    def build():
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        kept = pred.mask  # [B, H, nbq, nbk]: the same blocks, so any path of flex_attention agrees

        def mask_mod(b, h, q_idx, kv_idx):
            keep = kept[b, h, q_idx // 128, kv_idx // 64]
            return keep & (q_idx >= kv_idx) if causal else keep

        mask = BlockMask.from_kv_blocks(pred.count, pred.index.clamp_min(0), BLOCK_SIZE=(128, 64), mask_mod=mask_mod,
                                        seq_lengths=(len_q, len_k))  # fmt: skip
        return torch.compile(flex_attention, dynamic=False), mask

    state = {}

    def run_flex():
        try:
            if not state:
                state["fn"], state["mask"] = build()
            return state["fn"](q, k, v, block_mask=state["mask"], enable_gqa=gqa, kernel_options=_FLEX_TILES)
        except Exception as e:  # FlexAttention missing or failing to compile: reported as unavailable
            raise RuntimeError(f"FlexAttention: {type(e).__name__}: {e}") from e

    return (f"flex {label[len('sparge '):]}", run_flex, lambda: float(sparge.block_sparsity(pred.stats)))


_SMI_TIME_FORMAT = "%Y/%m/%d %H:%M:%S.%f"


def parse_power_sample(line: str) -> Optional[tuple[float, float, float]]:
    """(time.time() seconds, SM MHz, W) of one line of ``nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw
    --format=csv,noheader,nounits``; None for a line without numbers (e.g. "[N/A]")."""
    parts = [x.strip() for x in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        when = datetime.datetime.strptime(parts[0], _SMI_TIME_FORMAT).timestamp()
        return when, float(parts[1]), float(parts[2])
    except ValueError:
        return None


def window_medians(samples: Sequence[tuple[float, float, float]], t0: float, t1: float):
    """(median SM MHz, median W) of the samples taken in [t0, t1], or None if there is none."""
    inside = [(mhz, watts) for when, mhz, watts in samples if t0 <= when <= t1]
    if not inside:
        return None
    return statistics.median(m for m, _ in inside), statistics.median(w for _, w in inside)


def _nvidia_smi_gpu(device: torch.device) -> str:
    """The PCI address of a CUDA device, as nvidia-smi -i takes it (independent of CUDA_VISIBLE_DEVICES)."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


def _power(
    timed: Sequence[tuple[Result, Callable[[], object]]], device: torch.device, seconds: float
) -> Optional[float]:
    """Runs every case back to back for ``seconds`` under nvidia-smi sampling and sets its sm_mhz / power_w;
    returns the board's power limit (W) or None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise SystemExit("--power needs nvidia-smi on the PATH")
    gpu = _nvidia_smi_gpu(device)
    limit = subprocess.run([exe, "-i", gpu, "--query-gpu=power.limit", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    query = [exe, "-i", gpu, "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
             "-lms", "100"]  # fmt: skip
    proc = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    windows = []
    try:
        for i, (res, fn) in enumerate(timed, 1):
            _log(f"power [{i}/{len(timed)}] {res.case}: {seconds:g} s back to back ...")
            torch.cuda.synchronize(device)
            start = time.time()
            while time.time() - start < seconds:
                fn()
                torch.cuda.synchronize(device)
            windows.append((res, start + min(0.25, seconds / 4), time.time()))
        time.sleep(0.3)  # the last samples
    finally:
        proc.terminate()
        output, _ = proc.communicate()
    samples = [s for s in map(parse_power_sample, output.splitlines()) if s is not None]
    for res, t0, t1 in windows:
        medians = window_medians(samples, t0, t1)
        if medians is not None:
            res.sm_mhz, res.power_w = medians
    try:
        return float(limit)
    except ValueError:
        return None


def _device(args: argparse.Namespace) -> torch.device:
    """The device of --device (auto: CUDA if available), checked against --power."""
    try:
        name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.power and device.type != "cuda":
        raise SystemExit("--power: the SM clock and the board power are read with nvidia-smi, on a CUDA device only")
    return device


def run(args: argparse.Namespace, device: torch.device) -> tuple[list[Result], dict]:
    """Runs every case on ``device``; returns the results and the configuration (for --json)."""
    on_gpu = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (20 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    if args.grid is not None:
        args.seq_len = args.seq_len_k = math.prod(args.grid)
    heads_kv = args.heads_kv or args.heads
    len_k = args.seq_len_k or args.seq_len
    dtype = _DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    _log(
        f"sparge {sparge.__version__} | torch {torch.__version__} | {name} | B={args.batch} Hq={args.heads} "
        f"Hkv={heads_kv} Lq={args.seq_len} Lk={len_k} D={args.head_dim} {args.dtype} causal={args.causal}"
        + (f" grid={tuple(args.grid)}" if args.grid else "")
    )
    q, k, v = structured_qkv(args.batch, args.heads, heads_kv, args.seq_len, len_k, args.head_dim, dtype=dtype,
                             device=device, grid=tuple(args.grid) if args.grid else None, seed=args.seed)  # fmt: skip
    _log("computing exact attention (fp32 on GPU, fp64 on CPU) ...")
    ref, _ = reference_attention(q, k, v, is_causal=args.causal)
    flops = 4.0 * args.batch * args.heads * args.seq_len * len_k * args.head_dim * (0.5 if args.causal else 1.0)
    timer = _Timer(device, warmup, repeats, args.idle_ms)
    gqa = {"enable_gqa": True} if heads_kv != args.heads else {}

    cases: list[tuple[str, Callable[[], torch.Tensor], Optional[Callable[[], float]]]] = []
    for case_name, backend in _sdpa_cases(device):
        def sdpa(backend=backend):
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal, **gqa)
            with torch.nn.attention.sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal, **gqa)

        cases.append((case_name, sdpa, None))
    stage_cases = []
    for mode, value in args.modes:
        kwargs = {"mode": mode, "is_causal": args.causal, "pv_precision": args.pv_precision}
        if mode == "topk":
            kwargs["topk"] = value
        elif mode == "cdf":
            kwargs["cdfthreshd"] = value
        label = f"sparge {mode}" + (f" {value:g}" if value is not None else "")
        cases.append((label, lambda kw=kwargs: sparge.attention(q, k, v, **kw),
                      lambda kw=kwargs: float(sparge.attention(q, k, v, return_sparsity=True, **kw)[1])))  # fmt: skip
        if on_gpu and mode != "dense":
            cases.append(_flex_case(q, k, v, label, kwargs, args.causal, bool(gqa)))
        if args.stages:
            stage_cases.append((label, kwargs))

    results: list[Result] = []
    timed: list[tuple[Result, Callable[[], object]]] = []
    total = len(cases) + (1 + 2 * len(stage_cases) if stage_cases else 0)
    for i, (case_name, fn, sparsity_fn) in enumerate(cases, 1):
        _log(f"[{i}/{total}] {case_name}: first run and accuracy ...")
        try:
            out = fn()
        except RuntimeError as e:
            note = str(e).splitlines()[0] if str(e) else type(e).__name__
            _log(f"[{i}/{total}] {case_name}: skipped ({note})")
            results.append(Result(case_name, note=f"unavailable: {note}"))
            continue
        res = Result(case_name, sparsity=sparsity_fn() if sparsity_fn else 0.0, cosine=cosine_similarity(out, ref),
                     rel_l1=relative_l1(out, ref))  # fmt: skip
        results.append(res)
        timed.append((res, fn))
        del out
    fns = [fn for _, fn in timed]
    if args.sequential:
        _log(f"timing {len(timed)} cases one after the other: {warmup} warm-up and {repeats} timed runs each ...")
        case_times = [timer(fn) for fn in fns]
    else:
        _log(f"timing {len(timed)} cases: {warmup} warm-up runs each, then {repeats} rounds of one run per case ...")
        case_times = timer.interleaved(fns)
    for (res, _), times in zip(timed, case_times):
        res.times_ms, res.time_ms = times, statistics.median(times)
        res.tops = flops / (res.time_ms * 1e-3) / 1e12
        _log(f"{res.case}: {res.time_ms:.3f} ms")

    power_limit = _power(timed, device, args.power_seconds) if args.power else None

    if stage_cases:
        try:
            stages = _stages(q, k, v, args, stage_cases)
        except RuntimeError as e:
            note = str(e).splitlines()[0] if str(e) else type(e).__name__
            _log(f"stage timings skipped ({note})")
            results.append(Result("  sparge stages", note=f"unavailable: {note}"))
            stages = []
        for i, (label, fn) in enumerate(stages, len(cases) + 1):
            _log(f"[{i}/{total}] {label} ...")
            times = timer(fn)
            results.append(Result(f"  {label}", time_ms=statistics.median(times), times_ms=times))
        share = _stage_share(results)
        if share is not None:
            results.append(share)

    if args.overhead:
        calls = args.overhead_calls if args.overhead_calls is not None else (200 if on_gpu else 20)
        results += _overhead(device, dtype, calls, args.seed)

    baseline = next((r.time_ms for r in results if r.case == "torch sdpa" and r.time_ms), None)
    for r in results:
        if baseline and r.time_ms and r.tops is not None:
            r.speedup = baseline / r.time_ms
    return results, {
        "device": name,
        "torch": torch.__version__,
        "sparge": sparge.__version__,
        "batch": args.batch,
        "heads_q": args.heads,
        "heads_kv": heads_kv,
        "len_q": args.seq_len,
        "len_k": len_k,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "causal": args.causal,
        "grid": list(args.grid) if args.grid else None,
        "pv_precision": args.pv_precision,
        "repeats": repeats,
        "warmup": warmup,
        "timing": "sequential" if args.sequential else "interleaved",
        "idle_ms": args.idle_ms,
        "flops": flops,
        "reference": "fp32" if on_gpu else "fp64",
        "overhead_shape": list(OVERHEAD_SHAPE) if args.overhead else None,
        "power_seconds": args.power_seconds if args.power else None,
        "power_limit_w": power_limit,
    }


def format_table(results: list[Result]) -> str:
    """The results as an aligned text table; unavailable cases are listed under it."""

    def fmt(x, spec, suffix=""):
        return "-" if x is None else format(x, spec) + suffix

    header = ("case", "time ms", "speed-up", "TOPS", "sparsity", "cos sim", "rel L1")
    rows = [
        (r.case, fmt(r.time_ms, ".3f"), fmt(r.speedup, ".2f", "x"), fmt(r.tops, ".4g"), fmt(r.sparsity, ".3f"),
         fmt(r.cosine, ".6f"), fmt(r.rel_l1, ".5f"))
        for r in results
    ]  # fmt: skip
    if any(r.host_us is not None for r in results):
        header += ("host µs/call", "C++ µs/call", "GPU µs/call", "vs sdpa")
        rows = [row + (fmt(r.host_us, ".1f"), fmt(r.core_us, ".1f"), fmt(r.gpu_us, ".1f"),
                       fmt(r.overhead_ratio, ".2f", "x"))
                for row, r in zip(rows, results)]  # fmt: skip
    if any(r.sm_mhz is not None for r in results):
        header += ("SM MHz", "W")
        rows = [row + (fmt(r.sm_mhz, ".0f"), fmt(r.power_w, ".0f")) for row, r in zip(rows, results)]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    lines += [f"note: {r.case}: {r.note}" for r in results if r.note]
    return "\n".join(lines)


def plot(results: list[Result], config: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {e}") from e
    points = [r for r in results if r.speedup is not None and r.sparsity is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "speedup", "speed-up vs torch sdpa"), (axes[1], "rel_l1", "relative L1 vs exact")):
        for r in points:
            ax.scatter(r.sparsity, getattr(r, key), s=36)
            ax.annotate(r.case, (r.sparsity, getattr(r, key)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("block sparsity")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    fig.suptitle(
        f"{config['device']}: B={config['batch']} Hq={config['heads_q']} Hkv={config['heads_kv']} "
        f"L={config['len_q']} D={config['head_dim']} {config['dtype']}" + (" causal" if config["causal"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "heads", "seq_len", "head_dim", "overhead_calls"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if not args.idle_ms >= 0:
        raise SystemExit(f"--idle-ms: expected a number of milliseconds >= 0, got {args.idle_ms}")
    if not args.power_seconds > 0:
        raise SystemExit(f"--power-seconds: expected a number of seconds > 0, got {args.power_seconds}")
    results, config = run(args, _device(args))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": [asdict(r) for r in results]}, f, indent=2)
        _log(f"wrote {args.json}")
    if args.plot:
        plot(results, config, args.plot)
        _log(f"wrote {args.plot}")
    return 0
