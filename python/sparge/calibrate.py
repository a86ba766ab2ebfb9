"""Calibration: per-layer, per-head sparsity hyperparameters under an error budget, and an automatic mode.

Instead of SpargeAttn's tuner (binary searches against dense attention, days per model), state an error
budget, run a few representative inputs through the model, and get for every attention layer and every
query head the sparsest setting that stays within the budget::

    import sparge.calibrate as sc

    captured = sc.capture(model, [batch1, batch2])          # q / k / v of every SDPA call, per layer
    result = sc.calibrate(captured, budget=0.05)            # per head: topk or cdfthreshd, simthreshd1, pvthreshd
    print(result.summary())                                 # expected sparsity / error per layer
    result.save("calibration.json")                         # small, versioned, human-readable
    ...
    result = sc.CalibrationResult.load("calibration.json")
    result.apply(model)                                     # sparge.patch.patch_module with per-head settings

Without a calibration run, :func:`auto_attention` chooses the blocks of every Q block from a few exact
query rows per block, aiming at the same kind of budget (below).

**Error measure.** Relative L1 ``Σ|o - ref| / Σ|ref|`` against *exact* attention (fp32 on the captured q /
k / v), per query head over batch, rows and channels; optionally also a minimum cosine similarity per head.
It includes sparge's quantization error: a layer whose *dense* quantized attention already misses the budget
on some head cannot be fixed per head, and is marked ``exact`` (it keeps torch's SDPA after
:meth:`CalibrationResult.apply`). The default budget, 0.05, is a conservative per-head choice (the dense
INT8 / FP8 quantization alone is about 0.005 - 0.03 on the structured inputs of :mod:`sparge.testing`), not
derived from an end-to-end metric: check it against the model's own metric. A per-head bound also bounds
the layer (the layer's relative L1 is a weighted mean of its heads').

**Search space.** Per head: the block selection value (``topk`` in mode ``"topk"``, ``cdfthreshd`` in mode
``"cdf"``), ``simthreshd1`` and ``pvthreshd`` from :data:`DEFAULT_GRIDS` (or ``grid=``), or *dense* (every
block, no P·V skipping). The mode is one per layer (``sparge.attention`` takes one mode per call): the mode
whose per-head choices save the most work in total. The objective is the work saved per head,
``1 - (kept / allowed) · (1 - skipped / 2)``, with ``kept / allowed`` the block density of the prediction
and ``skipped`` the fraction of the kept blocks' P·V products the filter skips (a block costs QKᵀ and P·V
alike, so a skipped P·V product saves half a block); ties go to the smaller error. A candidate must meet
``budget · (1 - margin)`` (and the cosine bound) on *every* captured call of the layer.

**Speed: one pass of exact rows per head, every candidate from partial sums.** Per captured call: one
:func:`sparge.quantize`, one exact reference, one dense attend (the quantization error, for the ``exact``
decision), one :func:`sparge.predict` per (mode, value, simthreshd1) candidate (cheap), then per (batch,
head) the *sampled-row model*: for ``rows_per_block`` query rows of every Q block (stratified: one per equal
slice of the block at a random offset; all rows when ``rows_per_block`` is None or at least the block
size), the per-(row, K block) partial sums of sparge's own quantized attention (INT8 scores, FP8 P and V,
emulated in torch) and the exact fp32 output of those rows. The output of any block selection on those rows
is then a masked matrix product of the partial sums, so all candidates (about 190 by default) cost one
batched product instead of one attention pass each; memory stays at ``rows × nbk × D`` per chunk of rows
(chunked), never ``nbq × nbk × block_q × D``. The P·V filter is applied in the model from the block maxima
and the running maximum over the kept blocks: on sampled single rows a row decides alone (it skips at least
as often as the kernel's 16-row groups, so the error estimate is pessimistic there), and the skip counts
come from one random 16-row group per Q block, where the kernel's rule is reproduced exactly. With every
row, the model reproduces the attend stage up to FP8 rounding of P against the final instead of the running
row maximum (tests/python/test_calibrate.py checks both the exact and the sampled estimate against the true
error).

**Verification.** The chosen per-head settings then run through :func:`sparge.predict` and
:func:`sparge.attend` on every captured call (the layer's reported numbers are these true errors, not
estimates). A head whose true error misses the budget is chosen again among the candidates that save less
work and use another mask, preferring those whose estimate is under the limit scaled by the failed
candidate's estimated / true error (``refine`` rounds, default 4; no new pass over the rows); a head still
missing it keeps every block.

**Capture.** :func:`capture` records every SDPA call sparge could take (4-D, no ``attn_mask``, no dropout)
per layer name: the innermost hooked module whose ``forward`` is running when
``F.scaled_dot_product_attention`` is called (the name :func:`sparge.patch.patch_module` needs). All
heads and rows are kept; ``max_calls`` limits the calls kept per layer (the first ones) and ``device``
moves the tensors (e.g. to the CPU to save GPU memory).

Not in this version: a different mode per head of one layer (``sparge.attention`` takes one mode per call),
per-call-type settings inside one layer, and choosing the budget from an end-to-end metric.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C, _ops, patch as _patch
from .api import attend, block_sparsity, predict, quantize

__all__ = [
    "AutoInfo",
    "CalibrationError",
    "CalibrationResult",
    "Captured",
    "CapturedCall",
    "LayerCalibration",
    "auto_attention",
    "calibrate",
    "capture",
]

FORMAT_NAME = "sparge-calibration"
FORMAT_VERSION = 2  #: version 2 adds per-head pv_skip / cosine / estimated_rel_l1 and the search settings
_READABLE_VERSIONS = (1, 2)
DEFAULT_BUDGET = 0.05  #: relative L1 per head vs exact attention
DEFAULT_ROWS_PER_BLOCK = 16  #: sampled query rows per Q block of the error model
DEFAULT_GRIDS = {
    "topk": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "cdf": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999),
    "simthreshd1": (0.02, 0.3, 0.6),
    "pvthreshd": (15.0, 10.0, 6.0),
}
_PARAM_OF_MODE = {"topk": "topk", "cdf": "cdfthreshd"}
_DENSE_VALUE = 1.0  # topk = 1 / cdfthreshd = 1 with simthreshd1 = 1 (no block uniform): every block
_DENSE_SIM = 1.0
# Settings of sparge.attention that quantize / predict / attend take and calibration keeps fixed.
_QUANT_KEYS = ("block_size", "smooth_k", "qk_quant_gran", "pv_precision")
_PREDICT_KEYS = tuple(k for k in ("block_score", "attention_sink", "cdf_sharpen")
                      if k in inspect.signature(predict).parameters)  # fmt: skip
_FIXED_KEYS = _QUANT_KEYS + _PREDICT_KEYS + ("simthreshd1", "pvthreshd", "causal_alignment")


class CalibrationError(ValueError):
    """A calibration does not fit the model (unknown layer, other head count) or a file is invalid."""


# ---- capture ------------------------------------------------------------------------------------------


class CapturedCall(NamedTuple):
    """One recorded SDPA call: ``[B, H, L, D]`` tensors and the flags of the call."""

    q: Tensor
    k: Tensor
    v: Tensor
    is_causal: bool
    scale: Optional[float]
    enable_gqa: bool


@dataclass
class Captured:
    """Output of :func:`capture`: ``calls[layer name] = [CapturedCall, ...]`` (in call order) and
    ``skipped[layer name] = {reason: count}`` for calls sparge could not take."""

    calls: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def layers(self) -> list:
        return list(self.calls)

    def __repr__(self) -> str:
        desc = {n: f"{len(c)} x q{tuple(c[0].q.shape)}" for n, c in self.calls.items()}
        return f"Captured({desc}, skipped={self.skipped})"


def _skip_reason(q, k, v, attn_mask, dropout_p) -> Optional[str]:
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "not_4d"
    if attn_mask is not None:
        return "attn_mask"
    if dropout_p != 0.0:
        return "dropout"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "dtype"
    if tuple(k.shape) != tuple(v.shape) or k.size(1) == 0 or q.size(1) % k.size(1) != 0:
        return "shape"
    return None


class _Recorder:
    """A router for sparge.patch's SDPA replacement that records the call and runs the original."""

    def __init__(self, captured: Captured, names: list, max_calls: Optional[int], device):
        self.captured, self.names, self.max_calls, self.device = captured, names, max_calls, device

    def __call__(self, fallback, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):  # fmt: skip
        if self.names:
            layer = self.names[-1]
            reason = _skip_reason(q, k, v, attn_mask, dropout_p)
            if reason is not None:
                counts = self.captured.skipped.setdefault(layer, {})
                counts[reason] = counts.get(reason, 0) + 1
            else:
                calls = self.captured.calls.setdefault(layer, [])
                if self.max_calls is None or len(calls) < self.max_calls:
                    keep = (lambda t: t.detach().to(self.device).clone()) if self.device is not None else (
                        lambda t: t.detach().clone())  # fmt: skip
                    calls.append(CapturedCall(keep(q), keep(k), keep(v), bool(is_causal), scale, bool(enable_gqa)))
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return fallback(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)


def capture(
    model: nn.Module,
    inputs: Iterable,
    layers: _patch.LayerSelector = None,
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    max_calls: Optional[int] = None,
    device=None,
) -> Captured:
    """Runs ``model`` on each of ``inputs`` (under ``torch.no_grad()``) and records q / k / v of every
    ``F.scaled_dot_product_attention`` call, per layer name.

    Args:
        model: the model (must not be patched by :func:`sparge.patch.patch_module` while capturing).
        inputs: an iterable of inputs; each is passed as ``model(*x)`` for a tuple, ``model(**x)``
            for a dict, ``model(x)`` otherwise (or ``forward(model, x)`` when given).
        layers: which submodules name the calls (as in :func:`sparge.patch.patch_module`); default
            None: every submodule, so a call is named after the innermost module running it.
        max_calls: keep at most this many calls per layer (the first ones).
        device: move the recorded tensors there (default: keep them where they are).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_sparge_patches", None):
        raise ValueError("model: is patched by sparge.patch.patch_module; call sparge.patch.unpatch(model) before capture")
    if max_calls is not None and (not isinstance(max_calls, int) or max_calls < 1):
        raise ValueError(f"max_calls: expected None or an int >= 1, got {max_calls!r}")
    chosen = list(model.named_modules()) if layers is None else _patch._match_layers(model, layers)
    if not chosen:
        raise ValueError(f"layers: {layers!r} matched no submodule of {type(model).__name__}")
    captured = Captured()
    names: list = []
    recorder = _Recorder(captured, names, max_calls, device)
    handles = []
    for name, module in chosen:
        def pre(mod, args, _name=name):
            names.append(_name)

        def post(mod, args, output):
            names.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    _patch._push(recorder)
    try:
        with torch.no_grad():
            for x in inputs:
                if forward is not None:
                    forward(model, x)
                elif isinstance(x, tuple):
                    model(*x)
                elif isinstance(x, Mapping):
                    model(**x)
                else:
                    model(x)
    finally:
        _patch._pop(recorder)
        for h in handles:
            h.remove()
    return captured


# ---- result -------------------------------------------------------------------------------------------


def _enc(x: float):
    """JSON-safe float (inf as the string "inf")."""
    return "inf" if x == math.inf else x


def _dec(x) -> float:
    return math.inf if x == "inf" else float(x)


@dataclass
class LayerCalibration:
    """Calibrated settings of one layer (one entry per query head in the lists)."""

    heads: int
    mode: str  #: "topk" or "cdf"
    exact: bool  #: the dense quantized attention misses the budget: keep torch's SDPA
    params: list  #: topk (mode "topk") or cdfthreshd (mode "cdf") per head
    simthreshd1: list
    pvthreshd: list
    dense: list  #: heads that keep every block
    expected_sparsity: float  #: block sparsity of the layer on the captured calls
    expected_rel_l1: float  #: worst relative L1 (vs exact attention) of the layer over the calls
    expected_cosine: float  #: worst cosine similarity of the layer over the calls
    head_sparsity: list
    head_rel_l1: list  #: worst over the calls, per head
    calls: int
    q_shape: list  #: of the first captured call
    is_causal: bool
    seconds: float  #: calibration time of the layer
    expected_pv_skip: float = 0.0  #: fraction of the kept blocks' P·V products skipped, on the captured calls
    head_cosine: list = field(default_factory=list)  #: worst over the calls, per head
    head_pv_skip: list = field(default_factory=list)  #: estimated (sampled rows) P·V skip fraction per head
    head_estimated_rel_l1: list = field(default_factory=list)  #: the sampled-row estimate of head_rel_l1

    def settings(self) -> Optional[dict]:
        """Keyword arguments of sparge.attention for this layer (None: exact SDPA)."""
        if self.exact:
            return None
        return {
            "mode": self.mode,
            _PARAM_OF_MODE[self.mode]: torch.tensor(self.params, dtype=torch.float32),
            "simthreshd1": torch.tensor(self.simthreshd1, dtype=torch.float32),
            "pvthreshd": torch.tensor(self.pvthreshd, dtype=torch.float32),
        }

    def to_json(self) -> dict:
        return {
            "heads": self.heads,
            "mode": self.mode,
            "exact": self.exact,
            _PARAM_OF_MODE[self.mode]: self.params,
            "simthreshd1": self.simthreshd1,
            "pvthreshd": [_enc(x) for x in self.pvthreshd],
            "dense": self.dense,
            "expected": {"sparsity": self.expected_sparsity, "rel_l1": self.expected_rel_l1,
                         "cosine": self.expected_cosine, "pv_skip": self.expected_pv_skip},  # fmt: skip
            "per_head": {"sparsity": self.head_sparsity, "rel_l1": self.head_rel_l1, "cosine": self.head_cosine,
                         "pv_skip": self.head_pv_skip, "estimated_rel_l1": self.head_estimated_rel_l1},  # fmt: skip
            "captured": {"calls": self.calls, "q_shape": self.q_shape, "is_causal": self.is_causal,
                         "seconds": self.seconds},  # fmt: skip
        }

    @classmethod
    def from_json(cls, name: str, d: dict) -> "LayerCalibration":
        try:
            mode = d["mode"]
            if mode not in _PARAM_OF_MODE:
                raise CalibrationError(f"layer {name!r}: mode: expected 'topk' or 'cdf', got {mode!r}")
            heads = int(d["heads"])
            per_head = d["per_head"]
            layer = cls(
                heads=heads, mode=mode, exact=bool(d["exact"]), params=[float(x) for x in d[_PARAM_OF_MODE[mode]]],
                simthreshd1=[float(x) for x in d["simthreshd1"]], pvthreshd=[_dec(x) for x in d["pvthreshd"]],
                dense=[bool(x) for x in d["dense"]], expected_sparsity=float(d["expected"]["sparsity"]),
                expected_rel_l1=float(d["expected"]["rel_l1"]), expected_cosine=float(d["expected"]["cosine"]),
                head_sparsity=[float(x) for x in d["per_head"]["sparsity"]],
                head_rel_l1=[float(x) for x in d["per_head"]["rel_l1"]], calls=int(d["captured"]["calls"]),
                q_shape=[int(x) for x in d["captured"]["q_shape"]], is_causal=bool(d["captured"]["is_causal"]),
                seconds=float(d["captured"]["seconds"]),
                expected_pv_skip=float(d["expected"].get("pv_skip", 0.0)),
                head_cosine=[float(x) for x in per_head.get("cosine", [1.0] * heads)],
                head_pv_skip=[float(x) for x in per_head.get("pv_skip", [0.0] * heads)],
                head_estimated_rel_l1=[float(x) for x in per_head.get("estimated_rel_l1", per_head["rel_l1"])],
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CalibrationError):
                raise
            raise CalibrationError(f"layer {name!r}: malformed entry ({type(e).__name__}: {e})") from e
        for key in ("params", "simthreshd1", "pvthreshd", "dense", "head_sparsity", "head_rel_l1", "head_cosine",
                    "head_pv_skip", "head_estimated_rel_l1"):
            shown = _PARAM_OF_MODE[mode] if key == "params" else key
            if len(getattr(layer, key)) != heads:
                raise CalibrationError(
                    f"layer {name!r}: {shown}: expected {heads} per-head values (heads = {heads}), "
                    f"got {len(getattr(layer, key))}"
                )
        return layer


def _module_heads(module: nn.Module) -> Optional[int]:
    for attr in ("heads", "num_heads", "num_attention_heads", "n_heads", "n_head"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass
class CalibrationResult:
    """Per-layer calibrated settings: ``layers[name] = LayerCalibration``; :meth:`save`,
    :meth:`load`, :meth:`apply`, :meth:`summary`."""

    budget: float
    cos_budget: Optional[float]
    margin: float
    settings: dict  #: the fixed sparge.attention settings used (block_size, pv_precision, ...)
    layers: dict
    sparge_version: str = ""
    search: dict = field(default_factory=dict)  #: the search settings (grids, rows_per_block, refine, seed)

    # -- JSON --
    def to_json(self) -> dict:
        settings = {k: (list(v) if isinstance(v, tuple) else _enc(v) if isinstance(v, float) else v)
                    for k, v in self.settings.items()}  # fmt: skip
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "sparge_version": self.sparge_version,
            "error_reference": "exact attention (fp32 SDPA); relative L1 per query head, worst captured call",
            "budget": {"rel_l1": self.budget, "cosine": self.cos_budget, "margin": self.margin},
            "settings": settings,
            "search": self.search,
            "layers": {name: layer.to_json() for name, layer in self.layers.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationResult":
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CalibrationError(f"not a sparge calibration (expected format {FORMAT_NAME!r}, got "
                                   f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r})")  # fmt: skip
        version = d.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise CalibrationError(f"format_version: this sparge reads versions {list(_READABLE_VERSIONS)}, got "
                                   f"{version!r}")  # fmt: skip
        settings = {k: (tuple(v) if isinstance(v, list) else _dec(v) if v == "inf" else v)
                    for k, v in d.get("settings", {}).items()}  # fmt: skip
        try:
            budget = d["budget"]
            entries = d["layers"]
            if not isinstance(entries, dict):
                raise TypeError(f"layers: expected an object keyed by layer name, got {type(entries).__name__}")
            layers = {name: LayerCalibration.from_json(name, entry) for name, entry in entries.items()}
            return cls(budget=float(budget["rel_l1"]), cos_budget=budget.get("cosine"),
                       margin=float(budget["margin"]), settings=settings, layers=layers,
                       sparge_version=str(d.get("sparge_version", "")), search=dict(d.get("search", {})))  # fmt: skip
        except (KeyError, TypeError) as e:
            raise CalibrationError(f"malformed calibration ({type(e).__name__}: {e})") from e

    def save(self, path) -> None:
        """Writes the calibration as indented JSON (inf written as the string "inf")."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path) -> "CalibrationResult":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    # -- use --
    def layer_settings(self) -> dict:
        """``{name: sparge.attention kwargs | None}`` (the fixed settings merged in; None: exact SDPA)."""
        out = {}
        for name, layer in self.layers.items():
            s = layer.settings()
            out[name] = None if s is None else {**self.settings, **s}
        return out

    def apply(self, model: nn.Module, *, min_seq_len: int = 0, record: bool = True) -> _patch.ModulePatch:
        """Patches ``model`` (:func:`sparge.patch.patch_module`) with the calibrated per-head settings.

        Raises :class:`CalibrationError` when a calibrated layer name is not a submodule of
        ``model`` or a module declares (``heads`` / ``num_heads`` / ``num_attention_heads`` ...) a
        head count other than the calibrated one; a call whose query head count differs raises it
        at run time, naming the layer. ``min_seq_len`` as in :func:`sparge.patch.sdpa` (default 0:
        every call of a calibrated layer goes to sparge).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        modules = dict(model.named_modules())
        unknown = [n for n in self.layers if n not in modules]
        if unknown:
            raise CalibrationError(
                f"calibrated layer(s) {unknown} not found in {type(model).__name__} (a calibration of another model?)"
            )
        for name, layer in self.layers.items():
            declared = _module_heads(modules[name])
            if declared is not None and declared != layer.heads:
                raise CalibrationError(
                    f"layer {name!r}: calibrated for {layer.heads} query heads, the module has {declared}"
                )
        heads = {name: layer.heads for name, layer in self.layers.items()}

        def check(info: _patch.CallInfo):
            expected = heads.get(info.layer)
            if expected is not None and info.q_shape[1] != expected:
                raise CalibrationError(
                    f"layer {info.layer!r}: calibrated for {expected} query heads, the call has {info.q_shape[1]} "
                    f"(q shape {info.q_shape})"
                )
            return {}

        return _patch.patch_module(model, {}, layers=list(self.layers), layer_settings=self.layer_settings(),
                                   min_seq_len=min_seq_len, select=check, record=record)  # fmt: skip

    def evaluate(self, captured: Captured) -> dict:
        """Error and sparsity of the calibrated settings on other captured calls (e.g. held-out inputs):
        ``{layer: {"rel_l1": worst, "cosine": worst, "sparsity": mean, "head_rel_l1": worst per head}}``
        (relative L1 and cosine vs exact fp32 attention)."""
        from .api import attention  # noqa: PLC0415

        out = {}
        all_settings = self.layer_settings()
        for name, calls in captured.calls.items():
            if name not in self.layers:
                raise CalibrationError(f"captured layer {name!r} is not in the calibration {sorted(self.layers)}")
            s = all_settings[name]
            heads = self.layers[name].heads
            rel, cos, sp, head_rel = [], [], [], torch.zeros(heads, dtype=torch.float64)
            for c in calls:
                if c.q.size(1) != heads:
                    raise CalibrationError(f"layer {name!r}: calibrated for {heads} query heads, the call has "
                                           f"{c.q.size(1)} (q shape {tuple(c.q.shape)})")  # fmt: skip
                ref = _exact(c)
                if s is None:
                    o, sparsity = ref, 0.0
                else:
                    o, sparsity = attention(c.q, c.k, c.v, is_causal=c.is_causal, scale=c.scale, return_sparsity=True,
                                            **s)  # fmt: skip
                    sparsity = float(sparsity)
                st = _head_stats(o, ref)
                layer_rel, layer_cos = _rel_cos(st.sum(dim=0))
                rel.append(float(layer_rel))
                cos.append(float(layer_cos))
                sp.append(sparsity)
                head_rel = torch.maximum(head_rel, _rel_cos(st)[0])
            out[name] = {"rel_l1": max(rel), "cosine": min(cos), "sparsity": sum(sp) / len(sp),
                         "head_rel_l1": head_rel.tolist()}  # fmt: skip
        return out

    def summary(self) -> str:
        lines = [f"sparge calibration: budget rel-L1 {self.budget}" + (
            f", cosine >= {self.cos_budget}" if self.cos_budget is not None else "")]  # fmt: skip
        for name, layer in self.layers.items():
            state = "exact SDPA" if layer.exact else f"{layer.mode} [{', '.join(f'{p:g}' for p in layer.params)}]"
            lines.append(
                f"  {name or '<root>'}: {state}, dense heads {[i for i, d in enumerate(layer.dense) if d]}, "
                f"sparsity {layer.expected_sparsity:.3f}, rel-L1 {layer.expected_rel_l1:.4f}, "
                f"P·V skipped {layer.expected_pv_skip:.3f}, cos {layer.expected_cosine:.5f} ({layer.seconds:.2f} s)"
            )
        return "\n".join(lines)



# ---- sampled-row error model ----------------------------------------------------------------------------
#
# The output of a block selection for one query row r is a ratio of per-K-block sums: with sparge's own
# quantized scores s2[r, c] (log2 units, as the attend stage computes them) and M_r = max_c s2[r, c],
#
#   O[r, j] = Σ_{c in j} fmt(448 · 2^(s2[r,c] - M_r)) · v_q[c] · v_scale / 448
#   l[r, j] = Σ_{c in j} 2^(s2[r,c] - M_r)
#   o_r(kept) = Σ_{j kept} O[r, j] / Σ_{j kept} l[r, j],
#
# and the P·V filter of a 16-row group depends only on the block maxima m[r, j] = max_{c in j} s2[r, c] and
# the kept set (the running maximum is the cumulative maximum over the kept blocks in ascending order). So
# O, l, m of a few sampled query rows, computed once per (call, batch, head), give the output of *every*
# candidate selection on those rows as a masked matrix product, and its error against the exact fp32
# output of the same rows. The emulation differs from the attend stage only in where P is rounded to FP8
# (against the row's final maximum instead of the running one) and in summation order.

_PV_GROUP = 16  # query rows that decide the P·V skip together (layout.h: kPvGroupRows)
_P_SCALE = 448.0  # P is rounded to the P·V format as P · 448 (layout.h: kPScale)
_STATS = ("err", "ref_l1", "dot", "out_sq", "ref_sq", "units", "skipped")


@contextlib.contextmanager
def _fp32_matmul():
    """fp32 matrix products in full fp32 (not TF32) while the model runs: the int8 dot products of the
    emulated scores are exact in fp32 only. Restores the global setting on exit."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _chunk_elements(device: torch.device) -> int:
    """Working-set size (tensor elements) of one chunk of the sampled-row model."""
    return 1 << 26 if device.type == "cuda" else 1 << 22


class _Sample(NamedTuple):
    """Sampled query rows of one (call, head): ``rows`` int64 ``[n]`` grouped by ``group`` consecutive
    entries that decide the P·V skip together; ``weight`` fp32 ``[n]`` (0 for padding entries, which
    repeat a row of their group); ``qblock`` int64 ``[n]``: the Q block of each row."""

    rows: Tensor
    weight: Tensor
    qblock: Tensor
    group: int

    def to(self, device) -> "_Sample":
        return _Sample(self.rows.to(device), self.weight.to(device), self.qblock.to(device), self.group)


def _group_sample(len_q: int, block_q: int, per_block: Optional[int], gen: torch.Generator) -> _Sample:
    """``per_block`` random 16-row P·V groups of every Q block (every group when None or when the
    block has no more), so the P·V filter is modelled exactly on the sampled groups."""
    groups_per_block = block_q // _PV_GROUP
    n_groups = -(-len_q // _PV_GROUP)
    chosen = []
    for i in range(-(-len_q // block_q)):
        cand = torch.arange(i * groups_per_block, min((i + 1) * groups_per_block, n_groups))
        if per_block is not None and per_block < cand.numel():
            cand = cand[torch.randperm(cand.numel(), generator=gen)[:per_block]].sort().values
        chosen.append(cand)
    rows = torch.cat(chosen + [torch.zeros(0, dtype=torch.int64)]).unsqueeze(1) * _PV_GROUP + torch.arange(_PV_GROUP)
    weight = (rows < len_q).float().flatten()
    rows = rows.clamp(max=len_q - 1).flatten()  # the last group's missing rows repeat its last row
    return _Sample(rows, weight, rows // block_q, _PV_GROUP)


def _spread_sample(len_q: int, block_q: int, per_block: int, gen: torch.Generator) -> _Sample:
    """``per_block`` rows of every Q block, stratified (one per equal slice of the block, at one random
    offset per block), each its own P·V group; blocks with fewer rows take all of them and pad by
    repeating the last (weight 0), so entry ``i · per_block + t`` is row ``t`` of block ``i``."""
    nbq = -(-len_q // block_q)
    start = torch.arange(nbq) * block_q
    n = (len_q - start).clamp(max=block_q).unsqueeze(1)  # rows per block
    taken = n.clamp(max=per_block)
    t = torch.arange(per_block).unsqueeze(0)
    offset = torch.rand(nbq, 1, generator=gen, dtype=torch.float64)
    pos = torch.floor((torch.minimum(t, taken - 1) + offset) * n / taken).long().clamp(max=block_q - 1)
    rows = (start.unsqueeze(1) + pos).clamp(max=len_q - 1)
    weight = (t < taken).float()
    return _Sample(rows.flatten(), weight.flatten(), (rows // block_q).flatten(), 1)


def _visible_end(rows: Tensor, len_q: int, len_k: int, is_causal: bool, alignment: str) -> Tensor:
    """docs/method.md visible_end(r): keys ``c < end`` are visible to row r."""
    if not is_causal:
        return torch.full_like(rows, len_k)
    offset = len_k - len_q if alignment == "bottom_right" else 0
    return (rows + offset + 1).clamp(max=len_k)


def _scale_groups(idx: Tensor, gran: str, for_q: bool) -> Tensor:
    """layout.h q_scale_group / k_scale_group."""
    if for_q:
        if gran == "per_block":
            return idx // 64
        if gran == "per_warp":
            return idx // 16
        return (idx // 16) * 8 + idx % 8
    if gran == "per_thread":
        return (idx // 64) * 4 + (idx % 8) // 2
    return idx // 64


class _Partials(NamedTuple):
    """Per sampled row: ``O`` fp32 ``[n, nbk, D]``, ``l`` ``[n, nbk]``, ``m`` ``[n, nbk]`` (log2
    units, -inf for a block the row sees no key of), and the exact output ``ref`` ``[n, D]``."""

    O: Tensor
    l: Tensor
    m: Tensor
    ref: Tensor


def _scores(qz, b: int, h: int, rows: Tensor, len_q: int, is_causal: bool, alignment: str) -> Tensor:
    """sparge's scores of ``rows`` of query head ``h`` (int8 dot products, exact in fp32, times the product of
    the two scales; log2 units), -inf where hidden, as ``[n, nbk, block_k]`` (the last block padded)."""
    len_k = qz.k.size(2)
    hk = h // (qz.q.size(1) // qz.k.size(1))
    bk = qz.block_size[1]
    nbk = -(-len_k // bk)
    cols = torch.arange(len_k, device=rows.device)
    q_scale = qz.q_scale[b, h, _scale_groups(rows, qz.qk_quant_gran, True)]
    k_scale = qz.k_scale[b, hk, _scale_groups(cols, qz.qk_quant_gran, False)]
    s2 = (qz.q[b, h, rows].float() @ qz.k[b, hk].float().T) * (q_scale.unsqueeze(1) * k_scale.unsqueeze(0))
    hidden = cols.unsqueeze(0) >= _visible_end(rows, len_q, len_k, is_causal, alignment).unsqueeze(1)
    s2 = s2.masked_fill(hidden, -math.inf)
    return F.pad(s2, (0, nbk * bk - len_k), value=-math.inf).view(-1, nbk, bk)


def _partials(qz, q: Tensor, k: Tensor, v: Tensor, b: int, h: int, rows: Tensor, is_causal: bool, alignment: str,
              scale: float) -> _Partials:  # fmt: skip
    """The block partial sums of sparge's quantized attention and the exact fp32 output of ``rows`` of
    query head ``h`` (q / k / v ``[B, H, L, D]``, ``qz`` their :func:`sparge.quantize`)."""
    len_q, len_k, dim = q.size(2), k.size(2), q.size(3)
    hk = h // (q.size(1) // k.size(1))
    s2 = _scores(qz, b, h, rows, len_q, is_causal, alignment)
    nbk, bk = s2.size(1), s2.size(2)
    m = s2.amax(dim=2)
    top = m.amax(dim=1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    x = s2 - top.view(-1, 1, 1)
    if qz.pv_precision == "fp16":
        p = torch.exp2(x)
        l = p.sum(dim=2)
        p = (p * _P_SCALE).to(torch.float16).float()
    else:  # the e4m3 code of P · 448 (docs/method.md 2.3), l sums those values
        code = torch.clamp(torch.round(8.0 * x + 126.0), 0.0, 126.0).to(torch.uint8)
        p = code.view(torch.float8_e4m3fn).float()
        l = p.sum(dim=2) / _P_SCALE
    vq = _ops.v_in_key_order(qz.v[b, hk])[:, :len_k].float() * (qz.v_scale[b, hk].unsqueeze(1) / _P_SCALE)  # [D, Lk]
    vq = F.pad(vq, (0, nbk * bk - len_k)).view(dim, nbk, bk).permute(1, 2, 0)  # [nbk, bk, D]
    O = torch.bmm(p.transpose(0, 1), vq).transpose(0, 1).contiguous()  # [n, nbk, D]
    # exact attention of the same rows in fp32
    s = (q[b, h, rows].float() @ k[b, hk].float().T) * scale
    hidden = torch.arange(len_k, device=rows.device).unsqueeze(0) >= _visible_end(rows, len_q, len_k, is_causal,
                                                                                  alignment).unsqueeze(1)  # fmt: skip
    ref = torch.softmax(s.masked_fill(hidden, -math.inf), dim=1).nan_to_num(0.0) @ v[b, hk].float()
    return _Partials(O, l, m, ref)


def _gaps(m: Tensor, keep: Tensor) -> Tensor:
    """``running maximum before the block - block maximum`` of kept blocks, +inf where the row sees no key of
    the block: ``m`` ``[n, nbk]`` block maxima of sampled rows, ``keep`` bool ``[C, n, nbk]``; returns fp32
    ``[C, n, nbk]``. A row is negligible for a block (docs/method.md 2.2) when its gap exceeds ``pvthreshd``
    or is +inf."""
    dead = ~torch.isfinite(m)
    low = torch.finfo(torch.float32).min / 4  # finite stand-in for -inf, so that differences stay finite
    m = torch.where(dead, low, m)
    running = torch.cummax(torch.where(keep, m, low), dim=2).values
    gap = F.pad(running[:, :, :-1], (1, 0), value=low) - m
    return gap.masked_fill_(dead, math.inf)


def _skips(gap: Tensor, pv: float, group: int) -> Tensor:
    """bool ``[C, n // group, nbk]``: the group of ``group`` rows skips the block (every row negligible)."""
    negligible = gap > pv if pv != math.inf else gap == math.inf
    return negligible.view(gap.size(0), -1, group, gap.size(2)).all(dim=2)


def _evaluate(part: _Partials, weight: Tensor, group: int, keep: Tensor, pvs: Sequence[float],
              counts: bool = False) -> Tensor:  # fmt: skip
    """Statistics (:data:`_STATS`) of candidate selections on sampled rows: ``keep`` bool ``[C, n, nbk]`` (the
    kept blocks of each row's Q block), ``pvs`` the P·V thresholds, applied per ``group`` rows (with
    ``group = 1`` every row decides alone, which skips at least as much as the kernel's 16-row groups).
    Returns fp64 ``[C, len(pvs), 7]``: Σ|o - ref|, Σ|ref|, Σ o·ref, Σ o², Σ ref² over the weighted rows and
    channels, then the P·V units and skipped units of the groups when ``counts`` (zeros otherwise)."""
    n_cand = keep.size(0)
    ref, w = part.ref.unsqueeze(1), weight.unsqueeze(1)
    ref_abs = (part.ref.abs().sum(dim=1) * weight).sum().double().expand(n_cand)
    ref_sq = (part.ref.square().sum(dim=1) * weight).sum().double().expand(n_cand)
    gap = _gaps(part.m, keep)
    keep_group = keep.view(n_cand, -1, group, keep.size(2))[:, :, 0]
    units = keep_group.sum(dim=(1, 2)).double() if counts else torch.zeros(n_cand, dtype=torch.float64,
                                                                          device=keep.device)  # fmt: skip
    out = []
    for pv in pvs:
        skip = _skips(gap, pv, group)
        skipped = (keep_group & skip).sum(dim=(1, 2)).double() if counts else torch.zeros_like(units)
        used = keep & ~(skip if group == 1 else skip.repeat_interleave(group, dim=1))
        used = used.transpose(0, 1).float()  # [n, C, nbk]
        num = torch.bmm(used, part.O)  # [n, C, D]
        den = torch.bmm(used, part.l.unsqueeze(2))  # [n, C, 1]
        o = torch.where(den > 0, num / den.clamp_min(1e-38), torch.zeros_like(num))
        err = ((o - ref).abs().sum(dim=2) * w).sum(dim=0).double()
        dot = ((o * ref).sum(dim=2) * w).sum(dim=0).double()
        out_sq = (o.square().sum(dim=2) * w).sum(dim=0).double()
        out.append(torch.stack([err, ref_abs, dot, out_sq, ref_sq, units, skipped], dim=1))
    return torch.stack(out, dim=1)


def _pv_counts(m: Tensor, group: int, keep: Tensor, pvs: Sequence[float]) -> Tensor:
    """P·V units and skipped units of sampled 16-row groups: fp64 ``[C, len(pvs), 2]``."""
    gap = _gaps(m, keep)
    keep_group = keep.view(keep.size(0), -1, group, keep.size(2))[:, :, 0]
    units = keep_group.sum(dim=(1, 2)).double()
    out = [torch.stack([units, (keep_group & _skips(gap, pv, group)).sum(dim=(1, 2)).double()], dim=1) for pv in pvs]
    return torch.stack(out, dim=1)


def _estimate(qz, q: Tensor, k: Tensor, v: Tensor, masks: Tensor, pvs: Sequence[float], sample: _Sample,
              counts: Optional[_Sample], is_causal: bool, alignment: str, scale: float) -> Tensor:  # fmt: skip
    """Statistics (:data:`_STATS`) of every candidate, summed over the batch: ``masks`` bool
    ``[C, B, Hq, nbq, nbk]``; errors from the rows of ``sample``, P·V counts from the 16-row groups of
    ``counts`` (of ``sample`` when None). Returns fp64 ``[C, len(pvs), Hq, 7]`` on the CPU."""
    n_cand, batch, heads, _, nbk = masks.shape
    dim, len_q, len_k = q.size(3), q.size(2), k.size(2)
    budget = _chunk_elements(q.device)
    out = torch.zeros(n_cand, len(pvs), heads, len(_STATS), dtype=torch.float64)

    def chunks(s: _Sample, width: int):
        rows = max(s.group, budget // max(width, 1) // s.group * s.group)
        return [slice(r0, r0 + rows) for r0 in range(0, s.rows.numel(), rows)], max(1, budget // max(rows * nbk, 1))

    sample = sample.to(q.device)
    counts = None if counts is None else counts.to(q.device)
    row_slices, cand_chunk = chunks(sample, max(len_k, nbk * dim))
    for b in range(batch):
        for h in range(heads):
            for sl in row_slices:
                part = _partials(qz, q, k, v, b, h, sample.rows[sl], is_causal, alignment, scale)
                for c0 in range(0, n_cand, cand_chunk):
                    keep = masks[c0 : c0 + cand_chunk, b, h][:, sample.qblock[sl]]
                    out[c0 : c0 + cand_chunk, :, h] += _evaluate(part, sample.weight[sl], sample.group, keep, pvs,
                                                                 counts=counts is None).cpu()  # fmt: skip
            if counts is None:
                continue
            count_slices, count_chunk = chunks(counts, len_k)
            for sl in count_slices:
                m = _scores(qz, b, h, counts.rows[sl], len_q, is_causal, alignment).amax(dim=2)
                for c0 in range(0, n_cand, count_chunk):
                    keep = masks[c0 : c0 + count_chunk, b, h][:, counts.qblock[sl]]
                    out[c0 : c0 + count_chunk, :, h, 5:] += _pv_counts(m, counts.group, keep, pvs).cpu()
    return out


# ---- calibration ----------------------------------------------------------------------------------------


def _exact(c: CapturedCall) -> Tensor:
    """Exact attention in fp32 (torch's SDPA, not the routed one)."""
    kwargs = {"enable_gqa": True} if c.q.size(1) != c.k.size(1) else {}
    return torch._C._nn.scaled_dot_product_attention(c.q.float(), c.k.float(), c.v.float(), is_causal=c.is_causal,
                                                     scale=c.scale, **kwargs)  # fmt: skip


def _head_stats(o: Tensor, ref: Tensor) -> Tensor:
    """Per query head of ``[B, H, L, D]`` outputs: fp64 ``[H, 5]`` = (Σ|o - ref|, Σ|ref|, Σ o·ref, Σ o², Σ ref²)
    over batch, rows and channels, on the CPU."""
    o = o.float()
    dims = (0, 2, 3)
    stats = [(o - ref).abs().sum(dim=dims), ref.abs().sum(dim=dims), (o * ref).sum(dim=dims), o.square().sum(dim=dims),
             ref.square().sum(dim=dims)]  # fmt: skip
    return torch.stack(stats, dim=-1).double().cpu()


def _rel(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, math.inf, 0.0))


def _rel_cos(stats: Tensor) -> tuple[Tensor, Tensor]:
    """(relative L1, cosine similarity) from ``[..., 5]`` statistics (:func:`_head_stats`)."""
    norms = (stats[..., 3] * stats[..., 4]).sqrt()
    both_zero = (stats[..., 3] == 0) & (stats[..., 4] == 0)
    cos = torch.where(norms > 0, stats[..., 2] / norms.clamp_min(1e-300), torch.where(both_zero, 1.0, 0.0))
    return _rel(stats[..., 0], stats[..., 1]), cos


def _grids(modes: Sequence[str], grid, fixed: dict) -> dict:
    """``{mode: values, "simthreshd1": values, "pvthreshd": values}`` (sorted, validated)."""
    modes = tuple(modes) if not isinstance(modes, str) else (modes,)
    if not modes or any(m not in _PARAM_OF_MODE for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"modes: expected a non-empty subset of ('topk', 'cdf'), got {modes!r}")
    extra = ("simthreshd1", "pvthreshd")
    if grid is None:
        given = {}
    elif isinstance(grid, Mapping):
        bad = sorted(set(grid) - set(modes) - set(extra))
        if bad:
            raise ValueError(f"grid: unexpected key(s) {bad}; expected some of {list(modes) + list(extra)}")
        given = dict(grid)
    else:
        if len(modes) != 1:
            raise ValueError("grid: a plain sequence needs exactly one mode; pass {mode: values} for several")
        given = {modes[0]: grid}
    grids = {}
    for key in modes + extra:
        if key in fixed:
            if key in given:
                raise ValueError(f"grid[{key!r}]: also fixed by settings[{key!r}]; give one of the two")
            values = (fixed[key],)
        else:
            values = given.get(key, DEFAULT_GRIDS[key])
        lo, hi = {"simthreshd1": (-1.0, 1.0), "pvthreshd": (0.0, math.inf)}.get(key, (0.0, 1.0))
        try:
            values = tuple(values)
        except TypeError:
            values = None
        if not values or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not lo <= x <= hi
                             for x in values):  # fmt: skip
            raise ValueError(f"grid[{key!r}]: expected a non-empty sequence of values in [{lo:g}, {hi:g}], got "
                             f"{given.get(key, fixed.get(key))!r}")  # fmt: skip
        grids[key] = tuple(sorted({float(x) for x in values}, reverse=key == "pvthreshd"))
    return grids


def _check_fixed(settings: Optional[Mapping]) -> dict:
    settings = dict(settings or {})
    bad = sorted(set(settings) - set(_FIXED_KEYS))
    if bad:
        raise ValueError(f"settings: unexpected key(s) {bad}; expected some of {list(_FIXED_KEYS)} "
                         "(mode / topk / cdfthreshd are calibrated)")  # fmt: skip
    for key in ("simthreshd1", "pvthreshd"):
        if key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], (int, float))):
            raise ValueError(f"settings[{key!r}]: expected one float for all heads, got {type(settings[key]).__name__}")
    return settings


def _samples(len_q: int, block_q: int, rows_per_block: Optional[int], gen: torch.Generator):
    """(rows for the errors, 16-row groups for the P·V counts or None when the first are whole groups)."""
    if rows_per_block is None or rows_per_block >= block_q:
        return _group_sample(len_q, block_q, None, gen), None
    return _spread_sample(len_q, block_q, rows_per_block, gen), _group_sample(len_q, block_q, 1, gen)


class _Call(NamedTuple):
    """One captured call prepared for the search."""

    call: CapturedCall
    qz: Any  # QuantizedQKV
    ref: Tensor  # exact output, fp32 [B, H, L, D]
    allowed: Tensor  # fp64 [H]: allowed blocks per head (summed over batch and Q blocks)
    causal: dict  # is_causal / causal_alignment of predict and attend
    dense: Tensor  # fp64 [H, 5]: _head_stats of dense quantized attention


class _Verified(NamedTuple):
    head_rel: Tensor  # fp64 [H], worst over the calls
    head_cos: Tensor  # fp64 [H], worst over the calls
    head_sparsity: Tensor  # fp64 [H], mean over the calls
    layer_rel: float
    layer_cos: float
    layer_sparsity: float
    pv_skip: float


def _verify(prepared: list, mode: str, params: list, sims: list, pvs: list, pred_kw: dict) -> _Verified:
    """True errors of per-head settings: predict + attend on every prepared call."""
    heads = len(params)
    head_rel = torch.zeros(heads, dtype=torch.float64)
    head_cos = torch.ones(heads, dtype=torch.float64)
    head_sp = torch.zeros(heads, dtype=torch.float64)
    layer_rel, layer_cos, layer_sp, units, skipped = 0.0, 1.0, [], 0, 0
    for pr in prepared:
        pred = predict(pr.qz, mode=mode, simthreshd1=sims, **{_PARAM_OF_MODE[mode]: params}, **pred_kw, **pr.causal)
        o, stats = attend(pr.qz, pred.index, pred.count, pvthreshd=pvs, output_dtype=torch.float32, return_stats=True,
                          **pr.causal)  # fmt: skip
        st = _head_stats(o, pr.ref)
        rel, cos = _rel_cos(st)
        head_rel, head_cos = torch.maximum(head_rel, rel), torch.minimum(head_cos, cos)
        lr, lc = _rel_cos(st.sum(dim=0))
        layer_rel, layer_cos = max(layer_rel, float(lr)), min(layer_cos, float(lc))
        kept = pred.count.sum(dim=(0, 2)).double().cpu()
        head_sp += torch.where(pr.allowed > 0, 1.0 - kept / pr.allowed.clamp_min(1), 0.0) / len(prepared)
        total = float(pr.allowed.sum())
        layer_sp.append(1.0 - float(kept.sum()) / total if total > 0 else 0.0)
        stats = stats.cpu()
        units += int(stats[_C.STAT_PV_UNITS])
        skipped += int(stats[_C.STAT_PV_SKIPPED])
    return _Verified(head_rel, head_cos, head_sp, layer_rel, layer_cos, sum(layer_sp) / len(layer_sp),
                     skipped / units if units else 0.0)  # fmt: skip


def _calibrate_layer(name: str, calls: list, budget: float, cos_budget: Optional[float], margin: float, grids: dict,
                     fixed: dict, rows_per_block: Optional[int], refine: int,
                     seed: int) -> LayerCalibration:  # fmt: skip
    start = time.perf_counter()
    heads = calls[0].q.size(1)
    for c in calls:
        if c.q.size(1) != heads:
            raise CalibrationError(f"layer {name!r}: captured calls with {heads} and {c.q.size(1)} query heads")
    quant_kw = {k: fixed[k] for k in _QUANT_KEYS if k in fixed}
    pred_kw = {k: fixed[k] for k in _PREDICT_KEYS if k in fixed}
    alignment = fixed.get("causal_alignment", "top_left")
    limit = budget * (1.0 - margin)
    cos_limit = -math.inf if cos_budget is None else 1.0 - (1.0 - cos_budget) * (1.0 - margin)
    modes = [m for m in _PARAM_OF_MODE if m in grids]
    n_calls = len(calls)

    # Per call: quantize once, exact reference, dense quantized attention (the `exact` decision).
    prepared = []
    dense_ok = torch.ones(heads, dtype=torch.bool)
    for c in calls:
        qz = quantize(c.q, c.k, c.v, scale=c.scale, **quant_kw)
        ref = _exact(c)
        causal = {"is_causal": c.is_causal, "causal_alignment": alignment}
        dense = predict(qz, mode="dense", **causal)
        allowed = dense.count.sum(dim=(0, 2)).double().cpu()
        o = attend(qz, dense.index, dense.count, pvthreshd=math.inf, output_dtype=torch.float32, **causal)
        st = _head_stats(o, ref)
        rel, cos = _rel_cos(st)
        dense_ok &= (rel <= limit) & (cos >= cos_limit)
        prepared.append(_Call(c, qz, ref, allowed, causal, st))
    dense_rel = torch.stack([_rel_cos(pr.dense)[0] for pr in prepared]).amax(dim=0)

    def layer(mode, params, sims, pvs, dense, ver: _Verified, exact, pv_skip, estimated) -> LayerCalibration:
        return LayerCalibration(
            heads=heads, mode=mode, exact=exact, params=[float(x) for x in params],
            simthreshd1=[float(x) for x in sims],
            pvthreshd=[float(x) for x in pvs], dense=[bool(d) for d in dense],
            expected_sparsity=ver.layer_sparsity, expected_rel_l1=ver.layer_rel, expected_cosine=ver.layer_cos,
            head_sparsity=ver.head_sparsity.tolist(), head_rel_l1=ver.head_rel.tolist(), calls=n_calls,
            q_shape=list(calls[0].q.shape), is_causal=calls[0].is_causal, seconds=time.perf_counter() - start,
            expected_pv_skip=ver.pv_skip, head_cosine=ver.head_cos.tolist(), head_pv_skip=[float(x) for x in pv_skip],
            head_estimated_rel_l1=[float(x) for x in estimated],
        )  # fmt: skip

    if not bool(dense_ok.all()):
        zeros, ones = torch.zeros(heads, dtype=torch.float64), torch.ones(heads, dtype=torch.float64)
        exact_ver = _Verified(zeros, ones, zeros, 0.0, 1.0, 0.0, 0.0)
        return layer(modes[0], [_DENSE_VALUE] * heads, [_DENSE_SIM] * heads, [math.inf] * heads, [True] * heads,
                     exact_ver, True, [0.0] * heads, [0.0] * heads)  # fmt: skip

    # Candidates: (mode, value, simthreshd1) masks from sparge.predict, times the pvthreshd grid; every
    # candidate's error from the sampled-row model (one pass over the rows per head and call).
    sims, pvs = grids["simthreshd1"], grids["pvthreshd"]
    cands = [(m, value, sim) for m in modes for value in grids[m] for sim in sims]
    shape = (len(cands), len(pvs), heads)
    est_rel = torch.zeros(shape, dtype=torch.float64)
    est_cos = torch.ones(shape, dtype=torch.float64)
    gain = torch.zeros(shape, dtype=torch.float64)
    skip = torch.zeros(shape, dtype=torch.float64)
    for i, pr in enumerate(prepared):
        c = pr.call
        masks = torch.stack([
            predict(pr.qz, mode=m, simthreshd1=sim, **{_PARAM_OF_MODE[m]: value}, **pred_kw, **pr.causal).mask
            for m, value, sim in cands
        ])  # fmt: skip
        kept = masks.sum(dim=(1, 3, 4)).double().cpu()  # [C, H]
        density = torch.where(pr.allowed > 0, kept / pr.allowed.clamp_min(1), 1.0)
        sample, counts = _samples(c.q.size(2), pr.qz.block_size[0], rows_per_block,
                                  torch.Generator().manual_seed(seed + i))  # fmt: skip
        scale = c.q.size(3) ** -0.5 if c.scale is None else c.scale
        st = _estimate(pr.qz, c.q, c.k, c.v, masks, pvs, sample, counts, c.is_causal, alignment, scale)
        del masks
        rel, cos = _rel_cos(st[..., :5])
        frac = st[..., 6] / st[..., 5].clamp_min(1)
        est_rel, est_cos = torch.maximum(est_rel, rel), torch.minimum(est_cos, cos)
        gain += (1.0 - density.unsqueeze(1) * (1.0 - 0.5 * frac)) / n_calls
        skip += frac / n_calls

    by_mode = {m: torch.tensor([i for i, cand in enumerate(cands) if cand[0] == m]) for m in modes}

    def choose(mode: str, h: int, excluded: Optional[Tensor] = None, prefer_rel: float = math.inf,
               prefer_cos: float = -math.inf):  # fmt: skip
        """(candidate, pv index) of the largest gain within the limits (ties: smaller error), or None; among the
        candidates not ``excluded``, those within ``prefer_rel`` / ``prefer_cos`` first."""
        idx = by_mode[mode]
        r, cs, g = est_rel[idx, :, h], est_cos[idx, :, h], gain[idx, :, h]
        pool = (r <= limit) & (cs >= cos_limit) & (g > 0)
        if excluded is not None:
            pool &= ~excluded[idx]
        for allowed in (pool & (r <= prefer_rel) & (cs >= prefer_cos), pool):
            if bool(allowed.any()):
                best = float(g[allowed].max())
                flat = int(torch.where(allowed & (g >= best - 1e-12), r, math.inf).flatten().argmin())
                return int(idx[flat // len(pvs)]), flat % len(pvs)
        return None

    def total_gain(choice) -> float:
        return sum(float(gain[c[0], c[1], h]) for h, c in enumerate(choice) if c is not None)

    per_mode = {m: [choose(m, h) for h in range(heads)] for m in modes}
    mode = max(modes, key=lambda m: total_gain(per_mode[m]))  # first mode on ties
    choice = per_mode[mode]

    def settings_of(choice):
        params = [_DENSE_VALUE if c is None else cands[c[0]][1] for c in choice]
        sim_h = [_DENSE_SIM if c is None else cands[c[0]][2] for c in choice]
        pv_h = [math.inf if c is None else pvs[c[1]] for c in choice]
        return params, sim_h, pv_h

    # Verification on every call with the chosen per-head tensors (heads are independent: a head's output
    # depends only on its own settings). A head over the budget excludes its candidate's mask and every
    # candidate saving as much work, and is chosen again, preferring estimates under its limit scaled by the
    # failed candidate's estimated / true error; after `refine` rounds it keeps every block.
    excluded = [torch.zeros(len(cands), len(pvs), dtype=torch.bool) for _ in range(heads)]
    prefer_rel, prefer_cos = [math.inf] * heads, [-math.inf] * heads
    for round_ in range(refine + 1):
        ver = _verify(prepared, mode, *settings_of(choice), pred_kw)
        bad = [h for h, c in enumerate(choice)
               if c is not None and not (ver.head_rel[h] <= limit and ver.head_cos[h] >= cos_limit)]  # fmt: skip
        if not bad:
            break
        for h in bad:
            ci, pi = choice[h]
            if round_ == refine:
                choice[h] = None
                continue
            excluded[h] |= gain[:, :, h] >= float(gain[ci, pi, h]) - 1e-12
            excluded[h][ci] = True
            if ver.head_rel[h] > limit:
                prefer_rel[h] = min(prefer_rel[h], float(est_rel[ci, pi, h]) * limit / float(ver.head_rel[h]))
            if ver.head_cos[h] < cos_limit:
                ratio = (1.0 - cos_limit) / max(1.0 - float(ver.head_cos[h]), 1e-300)
                prefer_cos[h] = max(prefer_cos[h], 1.0 - (1.0 - float(est_cos[ci, pi, h])) * ratio)
            choice[h] = choose(mode, h, excluded[h], prefer_rel[h], prefer_cos[h])
        if round_ == refine:
            ver = _verify(prepared, mode, *settings_of(choice), pred_kw)
    params, sim_h, pv_h = settings_of(choice)
    pv_skip = [0.0 if c is None else float(skip[c[0], c[1], h]) for h, c in enumerate(choice)]
    estimated = [float(dense_rel[h]) if c is None else float(est_rel[c[0], c[1], h]) for h, c in enumerate(choice)]
    return layer(mode, params, sim_h, pv_h, [c is None for c in choice], ver, False, pv_skip, estimated)


def calibrate(
    captured: Captured,
    budget: float = DEFAULT_BUDGET,
    cos_budget: Optional[float] = None,
    modes: Sequence[str] = ("topk", "cdf"),
    grid: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None,
    *,
    margin: float = 0.0,
    settings: Optional[Mapping[str, Any]] = None,
    layers: Optional[Iterable[str]] = None,
    rows_per_block: Optional[int] = DEFAULT_ROWS_PER_BLOCK,
    refine: int = 4,
    seed: int = 0,
) -> CalibrationResult:
    """Per layer and per query head, the sparsest setting within the error budget (see the module docs).

    Args:
        captured: the output of :func:`capture`.
        budget: maximum relative L1 vs exact attention, per head, on every captured call (default
            :data:`DEFAULT_BUDGET`).
        cos_budget: optional minimum cosine similarity vs exact attention, per head (e.g. 0.999).
        modes: block-selection modes to search, ``"topk"`` and / or ``"cdf"`` (one mode per layer: the one
            whose per-head choices save the most work).
        grid: candidate values: a sequence (for a single mode) or ``{key: values}`` with keys among the
            modes, ``"simthreshd1"`` and ``"pvthreshd"``; missing keys take :data:`DEFAULT_GRIDS`.
        margin: candidates must meet ``budget * (1 - margin)`` (and the cosine budget tightened likewise),
            to leave room for inputs not seen in calibration.
        settings: fixed sparge.attention settings (``block_size``, ``pv_precision``, ``qk_quant_gran``,
            ``smooth_k``, ``block_score``, ``attention_sink``, ``cdf_sharpen``, ``causal_alignment``, and
            ``simthreshd1`` / ``pvthreshd`` to fix those instead of searching them); also applied by
            :meth:`CalibrationResult.apply`.
        layers: calibrate only these captured layers (default: all).
        rows_per_block: query rows per Q block of the sampled-row error model; None: every row (exact
            estimates, slower at long sequences).
        refine: rounds of re-choosing the heads whose verified error misses the budget.
        seed: seed of the row sampling.
    """
    if not isinstance(captured, Captured):
        raise TypeError(f"captured: expected the Captured returned by sparge.calibrate.capture, got "
                        f"{type(captured).__name__}")  # fmt: skip
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget: expected a relative L1 > 0, got {budget!r}")
    if cos_budget is not None and not (isinstance(cos_budget, (int, float)) and -1.0 <= cos_budget <= 1.0):
        raise ValueError(f"cos_budget: expected None or a minimum cosine similarity in [-1, 1], got {cos_budget!r}")
    if not (isinstance(margin, (int, float)) and 0.0 <= margin < 1.0):
        raise ValueError(f"margin: expected a fraction in [0, 1), got {margin!r}")
    if rows_per_block is not None and (isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int)
                                       or rows_per_block < 1):  # fmt: skip
        raise ValueError(f"rows_per_block: expected None or an int >= 1, got {rows_per_block!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine: expected an int >= 0, got {refine!r}")
    fixed = _check_fixed(settings)
    grids = _grids(modes, grid, fixed)
    names = list(captured.calls) if layers is None else list(layers)
    missing = [n for n in names if n not in captured.calls]
    if missing:
        raise CalibrationError(f"layers: {missing} were not captured (captured: {list(captured.calls)})")
    if not names:
        raise CalibrationError("captured: no SDPA call was recorded (does the model call F.scaled_dot_product_attention?)")
    result = {}
    with torch.no_grad(), _fp32_matmul():
        for name in names:
            result[name] = _calibrate_layer(name, captured.calls[name], float(budget), cos_budget, float(margin), grids,
                                            fixed, rows_per_block, refine, int(seed))  # fmt: skip
    search = {"modes": [m for m in _PARAM_OF_MODE if m in grids],
              "grid": {k: [_enc(x) for x in v] for k, v in grids.items()},
              "rows_per_block": rows_per_block, "refine": refine, "seed": int(seed)}  # fmt: skip
    return CalibrationResult(budget=float(budget), cos_budget=None if cos_budget is None else float(cos_budget),
                             margin=float(margin), settings=fixed, layers=result, sparge_version=_C.version(),
                             search=search)  # fmt: skip


# ---- automatic mode ---------------------------------------------------------------------------------------

AUTO_MARGIN = 0.2  #: auto_attention aims at budget * (1 - AUTO_MARGIN) on its sampled rows


class AutoInfo(NamedTuple):
    """What :func:`auto_attention` chose."""

    mask: Tensor  #: bool [B, Hq, nbq, nbk]: the kept blocks
    sparsity: Tensor  #: 0-d fp32: 1 - kept / allowed
    estimated_rel_l1: Tensor  #: fp64 [Hq] (CPU): relative L1 vs exact attention estimated on the sampled rows
    pvthreshd: list  #: per-head P·V threshold used (inf where the estimate turned the filter off)


def _partial_blocks(len_q: int, len_k: int, blocks: tuple, is_causal: bool, alignment: str, device) -> Tensor:
    """bool [nbq, nbk]: allowed blocks not fully visible to the first row of the Q block (docs/method.md 1)."""
    bq, bk = blocks
    nbq, nbk = -(-len_q // bq), -(-len_k // bk)
    first = torch.arange(nbq, device=device) * bq
    last = (first + bq - 1).clamp(max=len_q - 1)
    start = torch.arange(nbk, device=device) * bk
    end = (start + bk).clamp(max=len_k)
    allowed = start.unsqueeze(0) < _visible_end(last, len_q, len_k, is_causal, alignment).unsqueeze(1)
    return allowed & (end.unsqueeze(0) > _visible_end(first, len_q, len_k, is_causal, alignment).unsqueeze(1))


def _prefix_errors(part: _Partials, weight: Tensor, per_block: int, allowed: Tensor, forced: Tensor):
    """Error curves of ``nb`` Q blocks from their sampled rows (``per_block`` consecutive entries each).

    The K blocks of each Q block are ranked: ``forced`` first, then the allowed ones by the sampled rows'
    mean softmax share. Returns ``order`` int64 ``[nb, nbk]`` (the ranking), ``err`` fp32 ``[nb, nbk]``:
    Σ|o - ref| of the sampled rows when the first ``n + 1`` blocks are kept (sparge's quantized output of
    those blocks from the partial sums vs the exact output), and their Σ|ref| ``[nb]``."""
    nb, nbk = allowed.shape
    dim = part.O.size(2)
    w = weight.view(nb, per_block)
    l = part.l.view(nb, per_block, nbk)
    share = l / l.sum(dim=2, keepdim=True).clamp_min(1e-38)
    mass = (share * w.unsqueeze(2)).sum(dim=1)
    key = torch.where(forced, math.inf, torch.where(allowed, mass, -math.inf))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    num = part.O.view(nb, per_block, nbk, dim).gather(2, order.view(nb, 1, nbk, 1).expand(nb, per_block, nbk, dim))
    den = l.gather(2, order.view(nb, 1, nbk).expand(nb, per_block, nbk))
    num, den = num.cumsum(dim=2), den.cumsum(dim=2).unsqueeze(3)
    o = torch.where(den > 0, num / den.clamp_min(1e-38), torch.zeros_like(num))  # output of each prefix
    err = ((o - part.ref.view(nb, per_block, 1, dim)).abs().sum(dim=3) * w.unsqueeze(2)).sum(dim=1)
    ref_l1 = (part.ref.abs().sum(dim=1).view(nb, per_block) * w).sum(dim=1)
    return order, err, ref_l1


def _pv_change(part: _Partials, weight: Tensor, keep: Tensor, pv: float) -> float:
    """Σ|o(P·V filter) - o(no filter)| of the sampled rows (each deciding alone) for ``keep`` bool [n, nbk]."""
    skip = _skips(_gaps(part.m, keep.unsqueeze(0)), pv, 1)[0]
    outs = []
    for used in (keep, keep & ~skip):
        used = used.float()
        num = torch.einsum("nj,njd->nd", used, part.O)
        den = (used * part.l).sum(dim=1, keepdim=True)
        outs.append(torch.where(den > 0, num / den.clamp_min(1e-38), torch.zeros_like(num)))
    return float(((outs[1] - outs[0]).abs().sum(dim=1) * weight).sum())


def _allocate(err: Tensor, n_min: Tensor, n_max: Tensor, limit: float) -> Tensor:
    """Blocks to keep per Q block (``count`` int64 ``[nbq]``, the prefix lengths of the rankings): the fewest in
    total with ``Σ_i err[i, count_i - 1] <= limit``, between ``n_min`` and ``n_max`` per block (fp64 ``err``
    ``[nbq, nbk]`` on the CPU). Lagrangian relaxation: for a multiplier λ every Q block takes the prefix
    minimising ``n + λ · err``; λ is bisected (log scale) to the smallest value within the limit. When even
    the smallest errors exceed the limit, every allowed block (``n_max``)."""
    nbq, nbk = err.shape
    idx = torch.arange(nbk, dtype=torch.float64)
    valid = (idx + 1 >= n_min.unsqueeze(1)) & (idx < n_max.unsqueeze(1))
    has = n_max > 0
    e = err / max(limit, 1e-300)

    def pick(lam: float):
        n = torch.where(valid, idx + 1 + lam * e, math.inf).argmin(dim=1)
        total = float(torch.where(has, e.gather(1, n.unsqueeze(1)).squeeze(1), 0.0).sum())
        return torch.where(has, n + 1, 0), total

    lo, hi = 1e-9, 1e15
    best, total = pick(hi)
    if total > 1.0:
        return n_max.clone()
    count, total = pick(0.0)
    if total <= 1.0:
        return count
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        count, total = pick(mid)
        if total <= 1.0:
            hi, best = mid, count
        else:
            lo = mid
    return best


def auto_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    budget: float = DEFAULT_BUDGET,
    *,
    margin: float = AUTO_MARGIN,
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK,
    pvthreshd: float = 15.0,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    layout: str = "HND",
    block_size: tuple = (128, 64),
    smooth_k: bool = True,
    qk_quant_gran: str = "per_thread",
    pv_precision: str = "fp8",
    output_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    return_info: bool = False,
):
    """Sparse attention that chooses its blocks for an error budget without a calibration run.

    For every (batch, head) it takes ``rows_per_block`` query rows of every Q block (stratified, as the
    calibration's error model), computes their exact fp32 output and the per-K-block partial sums of sparge's
    quantized attention, and ranks the K blocks of each Q block by the sampled rows' mean softmax share (the
    blocks a causal mask cuts first: they are always kept). The sampled rows' error of every prefix of every
    ranking is then known (quantization included); the prefixes are chosen to keep the fewest blocks in total
    with the head's summed error at most ``budget * (1 - margin)`` of its Σ|ref| (a Lagrangian allocation:
    Q blocks where dropping blocks costs little give up more), or every block when even dense quantized
    attention misses that. The P·V filter ``pvthreshd`` is kept for a head when it changes the sampled rows'
    dense output by at most a quarter of that error (each row deciding alone, pessimistic); its change is
    then taken off the selection's allowance, else the filter is off for the head. The mask runs through
    sparge's block-mask path (:func:`sparge.predict` with ``mode="block_mask"`` and :func:`sparge.attend` on
    the one quantization, identical to :func:`sparge.block_sparse_attention`).

    The promise is on average, not per call: the error is estimated on a sample of rows. On the workloads of
    :func:`sparge.testing.prediction_workloads` the rate of heads over the budget is measured by
    ``bench/calibration_bench.py`` (and bounded in tests/python/test_calibrate.py). The cost is the exact
    attention of ``rows_per_block / block_q`` of the rows (1/8 by default) in fp32, on top of the sparse
    attention.

    Args:
        q, k, v, is_causal, causal_alignment, scale, layout, block_size, smooth_k, qk_quant_gran,
            pv_precision, output_dtype: as in :func:`sparge.attention`.
        budget: relative L1 vs exact attention to aim at, per head.
        margin: the selection aims at ``budget * (1 - margin)`` on the sampled rows.
        rows_per_block: sampled query rows per Q block (at most the block size).
        pvthreshd: the P·V filter threshold (log2 units) where the estimate allows it; ``inf``: off.
        seed: seed of the row sampling.
        return_info: also return an :class:`AutoInfo`.

    Returns ``o``, or ``(o, AutoInfo)`` with ``return_info``.
    """
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget: expected a relative L1 > 0, got {budget!r}")
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and 0.0 <= margin < 1.0):
        raise ValueError(f"margin: expected a fraction in [0, 1), got {margin!r}")
    if isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int) or rows_per_block < 1:
        raise ValueError(f"rows_per_block: expected an int >= 1, got {rows_per_block!r}")
    if isinstance(pvthreshd, bool) or not (isinstance(pvthreshd, (int, float)) and pvthreshd >= 0):
        raise ValueError(f"pvthreshd: expected a value >= 0 (inf allowed), got {pvthreshd!r}")
    qz = quantize(q, k, v, scale=scale, layout=layout, block_size=block_size, smooth_k=smooth_k,
                  qk_quant_gran=qk_quant_gran, pv_precision=pv_precision)  # fmt: skip
    causal = {"is_causal": bool(is_causal), "causal_alignment": causal_alignment}
    dense = predict(qz, mode="dense", **causal)
    allowed = dense.mask
    batch, heads, len_q, dim = qz.q.shape
    len_k = qz.k.size(2)
    if 0 in (batch, heads, len_q, len_k):  # nothing to choose: sparge's dense path gives the empty / zero output
        o = attend(qz, dense.index, dense.count, layout=layout, output_dtype=output_dtype, **causal)
        info = AutoInfo(allowed, block_sparsity(dense.stats), torch.zeros(heads, dtype=torch.float64),
                        [float(pvthreshd)] * heads)  # fmt: skip
        return (o, info) if return_info else o
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    nbq, nbk = allowed.shape[2], allowed.shape[3]
    bq = qz.block_size[0]
    per_block = min(rows_per_block, bq)
    target = float(budget) * (1.0 - float(margin))
    forced = _partial_blocks(len_q, len_k, qz.block_size, bool(is_causal), causal_alignment, q.device)
    mask = torch.zeros_like(allowed)
    n_forced = forced.sum(dim=1).clamp(min=1).cpu()
    use_pv = [pvthreshd != math.inf] * heads
    err = torch.zeros(heads, 2, dtype=torch.float64)  # Σ estimated error, Σ|ref| of the sampled rows
    scale_v = dim**-0.5 if scale is None else float(scale)
    chunk = max(1, _chunk_elements(q.device) // max(per_block * max(len_k, nbk * dim), 1))
    with torch.no_grad(), _fp32_matmul():
        sample = _spread_sample(len_q, bq, per_block, torch.Generator().manual_seed(int(seed))).to(q.device)
        for b in range(batch):
            for h in range(heads):
                orders, curves, ref_l1, pv_change = [], [], 0.0, 0.0
                for i0 in range(0, nbq, chunk):
                    blocks = slice(i0, min(i0 + chunk, nbq))
                    rows = slice(i0 * per_block, blocks.stop * per_block)
                    part = _partials(qz, q, k, v, b, h, sample.rows[rows], bool(is_causal), causal_alignment, scale_v)
                    order, curve, ref_rows = _prefix_errors(part, sample.weight[rows], per_block, allowed[b, h, blocks],
                                                            forced[blocks])  # fmt: skip
                    orders.append(order)
                    curves.append(curve.double().cpu())
                    ref_l1 += float(ref_rows.sum())
                    if use_pv[h]:
                        keep_rows = allowed[b, h, blocks][sample.qblock[rows] - i0]
                        pv_change += _pv_change(part, sample.weight[rows], keep_rows, pvthreshd)
                # The filter may take a quarter of the budget (its change adds to the selection's error at most).
                use_pv[h] = use_pv[h] and pv_change <= 0.25 * target * ref_l1
                limit = target * ref_l1 - (pv_change if use_pv[h] else 0.0)
                curve = torch.cat(curves)
                count = _allocate(curve, n_forced, allowed[b, h].sum(dim=1).cpu(), limit)
                order = torch.cat(orders)
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(nbk, device=q.device).expand(nbq, nbk))
                mask[b, h] = (rank < count.to(q.device).unsqueeze(1)) & allowed[b, h]
                chosen = curve.gather(1, (count - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
                err[h, 0] += float(torch.where(count > 0, chosen, 0.0).sum()) + (pv_change if use_pv[h] else 0.0)
                err[h, 1] += ref_l1
    pvs = [float(pvthreshd) if u else math.inf for u in use_pv]
    pred = predict(qz, mode="block_mask", block_mask=mask, **causal)
    o = attend(qz, pred.index, pred.count, pvthreshd=pvs, layout=layout, output_dtype=output_dtype, **causal)
    if not return_info:
        return o
    return o, AutoInfo(pred.mask, block_sparsity(pred.stats), _rel(err[:, 0], err[:, 1]), pvs)
