"""Calibration speed and quality (sparge.calibrate), and the overshoot rate of the automatic mode.

Part 1, calibration. Each synthetic attention "layer" is one structured workload of
:mod:`sparge.testing` (cycling through the kinds ``local_1d``, ``video_3d``, ``peaked`` with the
parameters of :func:`sparge.testing.prediction_workloads`), drawn at twice the sequence length with
the layer's seed. The first half of the tokens is the captured call the layer is calibrated on; the
second half is the held-out input: the same heads (``structured_qkv`` draws the per-head kernel
widths and sharpness from the seed, so another seed would be another layer), other tokens, other
noise. Calibration uses ``--margin`` (default 0.1: candidates meet 0.9 of the budget on the
calibration input, room for the held-out one). ``--heldout seed`` instead draws the held-out input
with another seed (other heads of the same kind: a test of the settings' transfer, not of
calibration). Per layer it prints the
calibration time (device synchronised), the mode, the block sparsity and P·V skip fraction reached,
the worst per-head relative L1 on the calibration input (verified by calibrate) and on the held-out
input (``CalibrationResult.evaluate``) against the budget.

Part 2, automatic mode. :func:`sparge.calibrate.auto_attention` on every workload of
:func:`sparge.testing.prediction_workloads` for ``--auto-seeds`` seeds: per head the relative L1
against exact attention (fp32, torch SDPA), the rate of heads over the budget (the overshoot rate;
heads whose dense quantized attention already misses the budget are counted apart), the estimate's
ratio true / estimated, the block sparsity, and the time of auto_attention vs dense sparge attention.

Usage::

    python bench/calibration_bench.py --len 32768 --heads 32 --dim 128 --device cuda --layers 3
    python bench/calibration_bench.py --len 512 --heads 2 --dim 32 --device cpu --layers 1 --auto-seeds 1

Progress goes to stderr, the tables to stdout (``--json FILE`` also writes the numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import sparge
import sparge.calibrate as sc
from sparge.testing import prediction_workloads, structured_qkv

LAYER_KINDS = ("local_1d", "video_3d", "peaked")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _video_side(length: int) -> int:
    """The grid side prediction_workloads uses for this length."""
    return 32 if length >= 8192 else 16 if length >= 1024 else 8


def _layer_qkv(kind: str, length: int, heads: int, dim: int, seed: int) -> tuple:
    """q, k, v of ``2 * length`` tokens (fp16, CPU) of one synthetic layer."""
    if kind == "local_1d":
        return structured_qkv(1, heads, heads, 2 * length, 2 * length, dim, seed=seed)
    if kind == "video_3d":
        side = _video_side(length)
        if length % (side * side):
            raise ValueError(f"--len: expected a multiple of {side * side} for the video layer, got {length}")
        grid = (2 * length // (side * side), side, side)
        return structured_qkv(1, heads, heads, 2 * length, 2 * length, dim, grid=grid, width=(1 / 16, 1 / 4),
                              sharpness=(12.0, 24.0), seed=seed)  # fmt: skip
    if kind == "peaked":
        return structured_qkv(1, heads, heads, 2 * length, 2 * length, dim, sharpness=(40.0, 64.0),
                              width=(1 / 64, 1 / 8), noise=0.5, seed=seed)  # fmt: skip
    raise ValueError(f"unknown layer kind {kind!r}")


def _call(q, k, v, device, causal: bool) -> sc.CapturedCall:
    q, k, v = (x.to(device).contiguous() for x in (q, k, v))
    return sc.CapturedCall(q, k, v, causal, None, False)


def calibration_part(args, device: torch.device) -> list:
    rows = []
    for i in range(args.layers):
        kind = LAYER_KINDS[i % len(LAYER_KINDS)]
        name = f"layer{i}.{kind}"
        seed = 1000 * (i + 1)
        _log(f"[{name}] generating inputs")
        q, k, v = _layer_qkv(kind, args.len, args.heads, args.dim, seed)
        first = slice(0, args.len)
        second = slice(args.len, 2 * args.len)
        train = sc.Captured(calls={name: [_call(q[:, :, first], k[:, :, first], v[:, :, first], device, args.causal)]})
        if args.heldout == "window":
            held_qkv = (q[:, :, second], k[:, :, second], v[:, :, second])
        else:
            hq, hk, hv = _layer_qkv(kind, args.len, args.heads, args.dim, seed + 1)
            held_qkv = (hq[:, :, first], hk[:, :, first], hv[:, :, first])
        held = sc.Captured(calls={name: [_call(*held_qkv, device, args.causal)]})
        del q, k, v
        _log(f"[{name}] calibrating")
        _sync(device)
        t0 = time.perf_counter()
        result = sc.calibrate(train, budget=args.budget, margin=args.margin, rows_per_block=args.rows_per_block)
        _sync(device)
        seconds = time.perf_counter() - t0
        layer = result.layers[name]
        report = result.evaluate(held)[name]
        rows.append({
            "layer": name, "seconds": seconds, "mode": "exact" if layer.exact else layer.mode,
            "dense_heads": sum(layer.dense), "heads": layer.heads, "sparsity": layer.expected_sparsity,
            "pv_skip": layer.expected_pv_skip, "calib_rel_l1": max(layer.head_rel_l1),
            "estimated_rel_l1": max(layer.head_estimated_rel_l1), "heldout_rel_l1": max(report["head_rel_l1"]),
            "heldout_layer_rel_l1": report["rel_l1"], "heldout_sparsity": report["sparsity"],
            "budget": args.budget,
        })  # fmt: skip
        del train, held, result
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def auto_part(args, device: torch.device) -> dict:
    length = args.auto_len or args.len
    budget = args.budget
    heads_total = over = infeasible = 0
    ratios, sparsities, rows = [], [], []
    t_auto = t_dense = 0.0
    for seed in range(args.auto_seeds):
        _log(f"[auto] seed {seed}: generating workloads (len {length})")
        for name, qkv in prediction_workloads(length, args.heads, args.dim, seed=100 * seed).items():
            q, k, v = (x.to(device) for x in qkv)
            ref = torch._C._nn.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=args.causal)
            dense = sparge.attention(q, k, v, mode="dense", pvthreshd=math.inf, is_causal=args.causal,
                                     output_dtype=torch.float32)  # fmt: skip
            _sync(device)
            t0 = time.perf_counter()
            o, info = sc.auto_attention(q, k, v, budget, is_causal=args.causal, output_dtype=torch.float32, seed=seed,
                                        return_info=True)  # fmt: skip
            _sync(device)
            t_auto += time.perf_counter() - t0
            t0 = time.perf_counter()
            sparge.attention(q, k, v, mode="dense", is_causal=args.causal)
            _sync(device)
            t_dense += time.perf_counter() - t0
            dims = (0, 2, 3)
            den = ref.abs().sum(dim=dims).double()
            true = ((o - ref).abs().sum(dim=dims).double() / den).cpu()
            base = ((dense - ref).abs().sum(dim=dims).double() / den).cpu()
            feasible = base <= budget
            heads_total += int(feasible.sum())
            infeasible += int((~feasible).sum())
            over += int(((true > budget) & feasible).sum())
            ratios += (true / info.estimated_rel_l1.clamp_min(1e-12)).tolist()
            sparsities.append(float(info.sparsity))
            rows.append({"seed": seed, "workload": name, "sparsity": float(info.sparsity),
                         "max_rel_l1": float(true.max()),
                         "max_estimated": float(info.estimated_rel_l1.max())})  # fmt: skip
    return {
        "len": length, "runs": len(rows), "heads": heads_total, "overshoot": over,
        "overshoot_rate": over / heads_total if heads_total else 0.0, "infeasible_heads": infeasible,
        "mean_sparsity": sum(sparsities) / len(sparsities), "ratio_mean": sum(ratios) / len(ratios),
        "ratio_max": max(ratios), "auto_seconds": t_auto / len(rows), "dense_seconds": t_dense / len(rows),
        "rows": rows, "margin": sc.AUTO_MARGIN,
    }  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--len", type=int, default=32768, help="sequence length (default 32768)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=3, help="synthetic layers to calibrate (default 3)")
    parser.add_argument("--budget", type=float, default=sc.DEFAULT_BUDGET)
    parser.add_argument("--margin", type=float, default=0.1,
                        help="calibrate(margin=...): candidates must meet budget * (1 - margin) (default 0.1)")
    parser.add_argument("--rows-per-block", type=int, default=sc.DEFAULT_ROWS_PER_BLOCK)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--heldout", choices=("window", "seed"), default="window")
    parser.add_argument("--auto-seeds", type=int, default=3, help="seeds of the auto-mode workloads (0: skip)")
    parser.add_argument("--auto-len", type=int, default=0, help="sequence length of the auto part (default --len)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    rows = calibration_part(args, device) if args.layers > 0 else []
    out["calibration"] = rows
    print(f"# calibration: L={args.len} H={args.heads} D={args.dim} causal={args.causal} on {out['device']}, "
          f"budget rel-L1 {args.budget} per head (margin {args.margin}), held-out = {args.heldout}")  # fmt: skip
    print("| layer | seconds | mode | dense heads | block sparsity | P·V skipped | rel-L1 calib (est.) | "
          "rel-L1 held-out (worst head / layer) | within budget |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "yes" if r["heldout_rel_l1"] <= r["budget"] else "NO"
        print(f"| {r['layer']} | {r['seconds']:.2f} | {r['mode']} | {r['dense_heads']}/{r['heads']} | "
              f"{r['sparsity']:.3f} | {r['pv_skip']:.3f} | {r['calib_rel_l1']:.4f} ({r['estimated_rel_l1']:.4f}) | "
              f"{r['heldout_rel_l1']:.4f} / {r['heldout_layer_rel_l1']:.4f} | {ok} |")  # fmt: skip
    if rows:
        print(f"time per layer: mean {sum(r['seconds'] for r in rows) / len(rows):.2f} s, "
              f"max {max(r['seconds'] for r in rows):.2f} s")  # fmt: skip

    if args.auto_seeds > 0:
        auto = auto_part(args, device)
        out["auto"] = auto
        print(f"\n# auto mode: prediction_workloads L={auto['len']} x {args.auto_seeds} seeds, budget {args.budget}, "
              f"margin {auto['margin']}")  # fmt: skip
        print("| seed | workload | block sparsity | worst head rel-L1 | worst head estimate |")
        print("|---|---|---|---|---|")
        for r in auto["rows"]:
            print(f"| {r['seed']} | {r['workload']} | {r['sparsity']:.3f} | {r['max_rel_l1']:.4f} | "
                  f"{r['max_estimated']:.4f} |")  # fmt: skip
        print(f"overshoot rate: {auto['overshoot']}/{auto['heads']} heads = {auto['overshoot_rate']:.3f} "
              f"(+ {auto['infeasible_heads']} heads whose dense quantized attention misses the budget)")  # fmt: skip
        print(f"true / estimated rel-L1: mean {auto['ratio_mean']:.3f}, max {auto['ratio_max']:.3f}; "
              f"mean block sparsity {auto['mean_sparsity']:.3f}; time auto {auto['auto_seconds'] * 1e3:.1f} ms vs "
              f"dense sparge {auto['dense_seconds'] * 1e3:.1f} ms per call")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
