"""Calibration: per-layer, per-head sparsity hyperparameters under an error budget.

Instead of SpargeAttn's search-by-training tuner, state an error budget, run a few
representative inputs through the model, and get for every attention layer and every query head
the sparsest setting that stays within the budget::

    import sparge.calibrate as sc

    captured = sc.capture(model, [batch1, batch2])          # q / k / v of every SDPA call, per layer
    result = sc.calibrate(captured, budget=0.05)            # per-head topk (or cdfthreshd), dense heads
    print(result.summary())                                 # expected sparsity / error per layer
    result.save("calibration.json")                         # small, versioned, human-readable
    ...
    result = sc.CalibrationResult.load("calibration.json")
    result.apply(model)                                     # sparge.patch.patch_module with per-head settings

Conventions (first version):

* **Error measure.** The error of a candidate is measured against *exact* attention
  (``torch``'s SDPA in fp32 on the captured q / k / v), per query head, as relative L1
  ``Σ|o - ref| / Σ|ref|`` over batch, rows and channels (and optionally a minimum cosine
  similarity). It therefore includes sparge's quantization error: a layer whose *dense*
  quantized attention already misses the budget on some head cannot be fixed per head, and is
  marked ``exact`` (it keeps torch's SDPA after :meth:`CalibrationResult.apply`).
* **Criterion.** A candidate is feasible for a head when it meets ``budget * (1 - margin)`` on
  *every* captured call of the layer (not on average); among the feasible candidates the one with
  the largest block sparsity (averaged over the calls) is chosen. A per-head error bound implies
  the same bound on the layer (the layer's rel-L1 is a weighted mean of the heads').
* **Dense heads.** Heads with no feasible candidate keep every block: ``topk = 1`` (mode
  ``"topk"``) or ``cdfthreshd = 1`` (mode ``"cdf"``) and ``pvthreshd = inf`` (no P·V skipping).
* **Cost.** Per captured call: one :func:`sparge.quantize`, one exact reference, one dense
  prediction (for the allowed-block counts), then per candidate one :func:`sparge.predict` and one
  :func:`sparge.attend` that evaluate all heads at once (per-head errors are read from the one
  output; each attend only costs the kept blocks), and one final verification pass with the chosen
  per-head tensors. ``mode`` is chosen per layer (it is not a per-head parameter); ``simthreshd1``
  and ``pvthreshd`` are fixed (from ``settings``), recorded per head in the result.
* **Capture.** :func:`capture` records every SDPA call sparge could take (4-D, no ``attn_mask``,
  no dropout) per layer name: the innermost hooked module whose ``forward`` is running when
  ``F.scaled_dot_product_attention`` is called (the name :func:`sparge.patch.patch_module` needs).
  All heads and rows are kept; ``max_calls`` limits the calls kept per layer (the first ones) and
  ``device`` moves the tensors (e.g. to the CPU to save GPU memory).

Not in this version: an automatic mode (choose the budget from an end-to-end metric), a grid over
``simthreshd1`` / ``pvthreshd``, row / head subsampling for very long sequences, and per-call-type
settings inside one layer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _C, patch as _patch
from .api import attend, predict, quantize

__all__ = ["CalibrationError", "CalibrationResult", "Captured", "CapturedCall", "LayerCalibration", "calibrate", "capture"]

FORMAT_NAME = "sparge-calibration"
FORMAT_VERSION = 1
DEFAULT_GRIDS = {
    "topk": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "cdf": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
}
_DENSE_VALUE = {"topk": 1.0, "cdf": 1.0}
_PARAM_OF_MODE = {"topk": "topk", "cdf": "cdfthreshd"}
# Settings of sparge.attention that quantize / predict / attend take and calibration keeps fixed.
_QUANT_KEYS = ("block_size", "smooth_k", "qk_quant_gran", "pv_precision")
_FIXED_KEYS = _QUANT_KEYS + ("simthreshd1", "pvthreshd", "block_score", "attention_sink", "causal_alignment")


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
                         "cosine": self.expected_cosine},  # fmt: skip
            "per_head": {"sparsity": self.head_sparsity, "rel_l1": self.head_rel_l1},
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
            layer = cls(
                heads=heads, mode=mode, exact=bool(d["exact"]), params=[float(x) for x in d[_PARAM_OF_MODE[mode]]],
                simthreshd1=[float(x) for x in d["simthreshd1"]], pvthreshd=[_dec(x) for x in d["pvthreshd"]],
                dense=[bool(x) for x in d["dense"]], expected_sparsity=float(d["expected"]["sparsity"]),
                expected_rel_l1=float(d["expected"]["rel_l1"]), expected_cosine=float(d["expected"]["cosine"]),
                head_sparsity=[float(x) for x in d["per_head"]["sparsity"]],
                head_rel_l1=[float(x) for x in d["per_head"]["rel_l1"]], calls=int(d["captured"]["calls"]),
                q_shape=[int(x) for x in d["captured"]["q_shape"]], is_causal=bool(d["captured"]["is_causal"]),
                seconds=float(d["captured"]["seconds"]),
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise CalibrationError(f"layer {name!r}: malformed entry ({type(e).__name__}: {e})") from e
        for key in ("params", "simthreshd1", "pvthreshd", "dense", "head_sparsity", "head_rel_l1"):
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
            "layers": {name: layer.to_json() for name, layer in self.layers.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationResult":
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CalibrationError(f"not a sparge calibration (expected format {FORMAT_NAME!r}, got "
                                   f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r})")  # fmt: skip
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CalibrationError(f"format_version: this sparge reads version {FORMAT_VERSION}, got {version!r}")
        settings = {k: (tuple(v) if isinstance(v, list) else _dec(v) if v == "inf" else v)
                    for k, v in d.get("settings", {}).items()}  # fmt: skip
        budget = d["budget"]
        layers = {name: LayerCalibration.from_json(name, entry) for name, entry in d["layers"].items()}
        return cls(budget=float(budget["rel_l1"]), cos_budget=budget.get("cosine"), margin=float(budget["margin"]),
                   settings=settings, layers=layers, sparge_version=str(d.get("sparge_version", "")))  # fmt: skip

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
        """Error and sparsity of the calibrated settings on other captured calls (e.g. held-out
        inputs): ``{layer: {"rel_l1": worst, "cosine": worst, "sparsity": mean}}``."""
        from .api import attention  # noqa: PLC0415

        out = {}
        all_settings = self.layer_settings()
        for name, calls in captured.calls.items():
            if name not in self.layers:
                raise CalibrationError(f"captured layer {name!r} is not in the calibration {sorted(self.layers)}")
            s = all_settings[name]
            rel, cos, sp = [], [], []
            for c in calls:
                if c.q.size(1) != self.layers[name].heads:
                    raise CalibrationError(f"layer {name!r}: calibrated for {self.layers[name].heads} query heads, "
                                           f"the call has {c.q.size(1)}")  # fmt: skip
                ref = _exact(c)
                if s is None:
                    o, sparsity = ref, 0.0
                else:
                    o, sparsity = attention(c.q, c.k, c.v, is_causal=c.is_causal, scale=c.scale, return_sparsity=True,
                                            **s)  # fmt: skip
                    sparsity = float(sparsity)
                num, den, cs = _head_errors(o, ref)
                rel.append(float(num.sum() / den.sum().clamp_min(1e-30)))
                cos.append(_layer_cos(o, ref))
                sp.append(sparsity)
            out[name] = {"rel_l1": max(rel), "cosine": min(cos), "sparsity": sum(sp) / len(sp)}
        return out

    def summary(self) -> str:
        lines = [f"sparge calibration: budget rel-L1 {self.budget}" + (
            f", cosine >= {self.cos_budget}" if self.cos_budget is not None else "")]  # fmt: skip
        for name, layer in self.layers.items():
            state = "exact SDPA" if layer.exact else f"{layer.mode} {[round(p, 3) for p in layer.params]}"
            lines.append(
                f"  {name or '<root>'}: {state}, dense heads {[i for i, d in enumerate(layer.dense) if d]}, "
                f"sparsity {layer.expected_sparsity:.3f}, rel-L1 {layer.expected_rel_l1:.4f}, "
                f"cos {layer.expected_cosine:.5f} ({layer.seconds:.2f} s)"
            )
        return "\n".join(lines)


# ---- calibration ----------------------------------------------------------------------------------------


def _exact(c: CapturedCall) -> Tensor:
    """Exact attention in fp32 (torch's SDPA, not the routed one)."""
    kwargs = {"enable_gqa": True} if c.q.size(1) != c.k.size(1) else {}
    return torch._C._nn.scaled_dot_product_attention(c.q.float(), c.k.float(), c.v.float(), is_causal=c.is_causal,
                                                     scale=c.scale, **kwargs)  # fmt: skip


def _head_errors(o: Tensor, ref: Tensor):
    """Per-head (Σ|o - ref|, Σ|ref|, cosine) over batch, rows, channels ([B, H, L, D] inputs)."""
    o = o.float()
    num = (o - ref).abs().sum(dim=(0, 2, 3)).double().cpu()
    den = ref.abs().sum(dim=(0, 2, 3)).double().cpu()
    dot = (o * ref).sum(dim=(0, 2, 3)).double().cpu()
    norms = (o.square().sum(dim=(0, 2, 3)) * ref.square().sum(dim=(0, 2, 3))).double().sqrt().cpu()
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.ones_like(dot))
    return num, den, cos


def _layer_cos(o: Tensor, ref: Tensor) -> float:
    o, ref = o.double().flatten(), ref.double().flatten()
    d = float(o.norm() * ref.norm())
    return 1.0 if d == 0.0 else float(o @ ref) / d


def _rel(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, math.inf, 0.0))


def _grids(modes: Sequence[str], grid) -> dict:
    modes = tuple(modes)
    if not modes or any(m not in _PARAM_OF_MODE for m in modes):
        raise ValueError(f"modes: expected a non-empty subset of ('topk', 'cdf'), got {modes!r}")
    if grid is None:
        grids = {m: DEFAULT_GRIDS[m] for m in modes}
    elif isinstance(grid, Mapping):
        grids = {m: tuple(grid.get(m, DEFAULT_GRIDS[m])) for m in modes}
    else:
        if len(modes) != 1:
            raise ValueError("grid: a plain sequence needs exactly one mode; pass {mode: values} for several")
        grids = {modes[0]: tuple(grid)}
    for m, values in grids.items():
        if not values or any(not (isinstance(x, (int, float)) and 0.0 <= x <= 1.0) for x in values):
            raise ValueError(f"grid[{m!r}]: expected values in [0, 1], got {values!r}")
        grids[m] = tuple(sorted({float(x) for x in values}))
    return grids


def _check_fixed(settings: Optional[Mapping]) -> dict:
    settings = dict(settings or {})
    bad = sorted(set(settings) - set(_FIXED_KEYS))
    if bad:
        raise ValueError(f"settings: unexpected key(s) {bad}; expected some of {list(_FIXED_KEYS)} "
                         "(mode / topk / cdfthreshd are calibrated)")  # fmt: skip
    for key in ("simthreshd1", "pvthreshd"):
        if key in settings and not isinstance(settings[key], (int, float)):
            raise ValueError(f"settings[{key!r}]: expected one float for all heads, got {type(settings[key]).__name__}")
    return settings


def _calibrate_layer(name: str, calls: list, budget: float, cos_budget: Optional[float], margin: float, grids: dict,
                     fixed: dict) -> LayerCalibration:  # fmt: skip
    start = time.perf_counter()
    heads = calls[0].q.size(1)
    for c in calls:
        if c.q.size(1) != heads:
            raise CalibrationError(f"layer {name!r}: captured calls with {heads} and {c.q.size(1)} query heads")
    quant_kw = {k: fixed[k] for k in _QUANT_KEYS if k in fixed}
    sim = float(fixed.get("simthreshd1", -0.1))
    pv = float(fixed.get("pvthreshd", 15.0))
    pred_kw = {k: fixed[k] for k in ("block_score", "attention_sink", "causal_alignment") if k in fixed}
    limit = budget * (1.0 - margin)
    cos_limit = None if cos_budget is None else 1.0 - (1.0 - cos_budget) * (1.0 - margin)

    # Per call: quantize once, exact reference, dense prediction (allowed blocks per head).
    prepared = []
    dense_ok = torch.ones(heads, dtype=torch.bool)
    for c in calls:
        qz = quantize(c.q, c.k, c.v, scale=c.scale, **quant_kw)
        ref = _exact(c)
        causal = {"is_causal": c.is_causal, **({"causal_alignment": fixed["causal_alignment"]}
                                              if "causal_alignment" in fixed else {})}  # fmt: skip
        dense = predict(qz, mode="dense", **causal)
        allowed = dense.count.sum(dim=(0, 2)).double().cpu()
        o = attend(qz, dense.index, dense.count, pvthreshd=math.inf, output_dtype=torch.float32, **causal)
        num, den, cs = _head_errors(o, ref)
        ok = _rel(num, den) <= limit
        if cos_limit is not None:
            ok &= cs >= cos_limit
        dense_ok &= ok
        prepared.append((c, qz, ref, allowed, causal))

    # Per mode and candidate: one predict + one attend per call for all heads.
    best = {}
    for mode, values in grids.items():
        param = _PARAM_OF_MODE[mode]
        feasible = torch.zeros(len(values), heads, dtype=torch.bool)
        sparsity = torch.zeros(len(values), heads, dtype=torch.float64)
        for i, value in enumerate(values):
            ok = torch.ones(heads, dtype=torch.bool)
            for c, qz, ref, allowed, causal in prepared:
                pred = predict(qz, mode=mode, simthreshd1=sim, **{param: value}, **pred_kw, **causal)
                o = attend(qz, pred.index, pred.count, pvthreshd=pv, output_dtype=torch.float32, **causal)
                num, den, cs = _head_errors(o, ref)
                ok &= _rel(num, den) <= limit
                if cos_limit is not None:
                    ok &= cs >= cos_limit
                kept = pred.count.sum(dim=(0, 2)).double().cpu()
                sparsity[i] += torch.where(allowed > 0, 1.0 - kept / allowed.clamp_min(1), 0.0) / len(prepared)
            feasible[i] = ok
        chosen, dense_heads, head_sp = [], [], []
        for h in range(heads):
            idx = [i for i in range(len(values)) if feasible[i, h]]
            if idx:  # sparsest feasible; ties -> the larger value (less error)
                i = max(idx, key=lambda j: (float(sparsity[j, h]), values[j]))
                if float(sparsity[i, h]) > 0.0:
                    chosen.append(values[i])
                    dense_heads.append(False)
                    head_sp.append(float(sparsity[i, h]))
                    continue
            chosen.append(_DENSE_VALUE[mode])
            dense_heads.append(True)
            head_sp.append(0.0)
        best[mode] = (sum(head_sp) / heads, chosen, dense_heads)
    mode = max(best, key=lambda m: best[m][0])
    _, chosen, dense_heads = best[mode]
    exact = not bool(dense_ok.all())
    if exact:
        chosen, dense_heads = [_DENSE_VALUE[mode]] * heads, [True] * heads
    param = _PARAM_OF_MODE[mode]
    sims = [sim] * heads
    pvs = [math.inf if d else pv for d in dense_heads]

    # Verification with the chosen per-head tensors (also gives the exact per-layer numbers).
    head_rel = torch.zeros(heads, dtype=torch.float64)
    head_acc = torch.zeros(heads, dtype=torch.float64)
    layer_rel, layer_cos, layer_sp = 0.0, 1.0, []
    for c, qz, ref, allowed, causal in prepared:
        if exact:
            o, kept = ref, allowed
        else:
            pred = predict(qz, mode=mode, simthreshd1=torch.tensor(sims), **{param: torch.tensor(chosen)},
                           **pred_kw, **causal)  # fmt: skip
            o = attend(qz, pred.index, pred.count, pvthreshd=torch.tensor(pvs), output_dtype=torch.float32, **causal)
            kept = pred.count.sum(dim=(0, 2)).double().cpu()
        num, den, cs = _head_errors(o, ref)
        head_rel = torch.maximum(head_rel, _rel(num, den))
        head_acc += torch.where(allowed > 0, 1.0 - kept / allowed.clamp_min(1), 0.0) / len(prepared)
        layer_rel = max(layer_rel, float(num.sum() / den.sum().clamp_min(1e-300)))
        layer_cos = min(layer_cos, _layer_cos(o, ref))
        layer_sp.append(1.0 - float(kept.sum()) / max(float(allowed.sum()), 1.0))
    head_sp = head_acc.tolist()
    return LayerCalibration(
        heads=heads, mode=mode, exact=exact, params=[float(x) for x in chosen], simthreshd1=sims, pvthreshd=pvs,
        dense=[bool(d) for d in dense_heads],
        expected_sparsity=sum(layer_sp) / len(layer_sp), expected_rel_l1=layer_rel,
        expected_cosine=layer_cos, head_sparsity=head_sp, head_rel_l1=head_rel.tolist(), calls=len(calls),
        q_shape=list(calls[0].q.shape), is_causal=calls[0].is_causal, seconds=time.perf_counter() - start,
    )  # fmt: skip


def calibrate(
    captured: Captured,
    budget: float = 0.05,
    cos_budget: Optional[float] = None,
    modes: Sequence[str] = ("topk",),
    grid: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None,
    *,
    margin: float = 0.0,
    settings: Optional[Mapping[str, Any]] = None,
    layers: Optional[Iterable[str]] = None,
) -> CalibrationResult:
    """Per layer and per query head, the sparsest candidate within the error budget.

    Args:
        captured: the output of :func:`capture`.
        budget: maximum relative L1 vs exact attention, per head, on every captured call
            (default 0.05).
        cos_budget: optional minimum cosine similarity vs exact attention, per head (e.g. 0.999).
        modes: block-selection modes to try, ``"topk"`` and / or ``"cdf"`` (one mode per layer:
            the one with the larger mean sparsity).
        grid: candidate values: a sequence (for a single mode) or ``{mode: values}``; default
            :data:`DEFAULT_GRIDS`.
        margin: candidates must meet ``budget * (1 - margin)`` (and the cosine budget tightened
            likewise), to leave room for inputs not seen in calibration.
        settings: fixed sparge.attention settings (``block_size``, ``pv_precision``,
            ``qk_quant_gran``, ``smooth_k``, ``simthreshd1``, ``pvthreshd``, ``block_score``,
            ``attention_sink``, ``causal_alignment``); also applied by
            :meth:`CalibrationResult.apply`.
        layers: calibrate only these captured layers (default: all).
    """
    if not isinstance(captured, Captured):
        raise TypeError(f"captured: expected the Captured returned by sparge.calibrate.capture, got "
                        f"{type(captured).__name__}")  # fmt: skip
    if not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget: expected a relative L1 > 0, got {budget!r}")
    if cos_budget is not None and not (isinstance(cos_budget, (int, float)) and -1.0 <= cos_budget <= 1.0):
        raise ValueError(f"cos_budget: expected None or a minimum cosine similarity in [-1, 1], got {cos_budget!r}")
    if not (isinstance(margin, (int, float)) and 0.0 <= margin < 1.0):
        raise ValueError(f"margin: expected a fraction in [0, 1), got {margin!r}")
    grids = _grids(modes, grid)
    fixed = _check_fixed(settings)
    names = list(captured.calls) if layers is None else list(layers)
    missing = [n for n in names if n not in captured.calls]
    if missing:
        raise CalibrationError(f"layers: {missing} were not captured (captured: {list(captured.calls)})")
    if not names:
        raise CalibrationError("captured: no SDPA call was recorded (does the model call F.scaled_dot_product_attention?)")
    result = {}
    with torch.no_grad():
        for name in names:
            result[name] = _calibrate_layer(name, captured.calls[name], float(budget), cos_budget, float(margin), grids,
                                            fixed)  # fmt: skip
    return CalibrationResult(budget=float(budget), cos_budget=None if cos_budget is None else float(cos_budget),
                             margin=float(margin), settings=fixed, layers=result, sparge_version=_C.version())  # fmt: skip
