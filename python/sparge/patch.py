"""Model integration: route ``torch.nn.functional.scaled_dot_product_attention`` to sparge.

Three ways in, from broadest to narrowest:

* :func:`sdpa` — a context manager that replaces ``torch.nn.functional.scaled_dot_product_attention``
  while it is active. Each call goes to :func:`sparge.scaled_dot_product_attention` when sparge can
  take it, and to the original SDPA otherwise; the :class:`SdpaLog` it yields records the path,
  the reason of each fallback, the shapes and the settings::

      with sparge.patch.sdpa(mode="topk", topk=0.5, min_seq_len=1024) as log:
          out = model(x)
      print(log.summary())   # {'sparge': 24, 'fallback': 2, 'by_reason': {'attn_mask': 2}}

  :func:`enable` / :func:`disable` are the same as a function pair.
* :func:`patch_module` — the same routing scoped to the ``forward`` of chosen submodules (forward
  pre/post hooks enter/exit it), with settings per layer name; :func:`unpatch` undoes it.
* :func:`register_transformers` and :class:`DiffusersAttnProcessor` — thin hooks for Hugging Face
  transformers (an ``AttentionInterface`` entry named ``"sparge"``) and diffusers (an attention
  processor). They import those libraries only when called.

Masks: an ``attn_mask`` that is a *key-padding* mask (for each batch row the same keys kept for
every head and query: bool True / additive 0 = keep, False / ``-inf`` / a value <= -1000 = drop;
see :func:`sparge.varlen.key_padding_keep`) goes to sparge and is computed exactly over the kept
keys of each row (``CallRecord.attn_mask == "key_padding"``); any other mask (causal or per-query
masks such as transformers' padded causal mask, biases), a mask with ``is_causal=True``, a float
mask of another dtype than the query, or with a ``block_mask`` setting falls back with reason
``"attn_mask"``.

Fallback reasons (``SdpaLog.calls[i].reason``): ``"not_4d"``, ``"attn_mask"``, ``"dropout"``,
``"dtype"`` (not fp16/bf16/fp32, or q/k/v differ), ``"device"`` (not CPU/CUDA, devices differ, or a
CUDA tensor with a build without the CUDA backend), ``"shape"`` (batch / head-dim / k-v shape
mismatch, or heads not divisible), ``"gqa_disabled"`` (different head counts without
``enable_gqa=True``; the original SDPA then raises its own error), ``"head_dim"`` (a head dim sparge
has no kernel for, or a value head dim different from the query's), ``"stride"`` (last dimension
not contiguous), ``"scale"`` (a non-positive scale), ``"requires_grad"`` (an input requires grad while
grad mode is on: sparge is forward-only), ``"short_sequence"`` (``min(Lq, Lk) < min_seq_len``),
``"select"`` (the ``select`` callable returned None) and ``"disabled"`` (a layer patched with
settings None).

The routing decision reads only shapes, dtypes, devices, strides and flags, with one exception:
the key-padding test of an ``attn_mask`` reads the mask's values in eager mode (a device sync for
a CUDA mask). Under ``torch.compile`` (and CUDA-graph capture) masked calls fall back without
reading the mask, so a module calling SDPA inside an active routing traces under
``torch.compile(fullgraph=True)`` (the log records are side effects that torch.compile replays on
every call).

Limits: the replacement is of the attribute ``torch.nn.functional.scaled_dot_product_attention``;
code that bound the function to another name before the routing was entered (``from
torch.nn.functional import scaled_dot_product_attention`` at import time) is not affected. The
replacement is process-wide (not per thread) while any routing is active.
"""

from __future__ import annotations

import inspect
import threading
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C
from .api import _data_checkable
from .api import attention as _sparge_attention
from .varlen import _ATTENTION_DEFAULTS, key_padding_keep, key_padding_parts

__all__ = [
    "CallInfo",
    "CallRecord",
    "DiffusersAttnProcessor",
    "ModulePatch",
    "SdpaLog",
    "SdpaPatch",
    "disable",
    "enable",
    "patch_module",
    "register_transformers",
    "sdpa",
    "transformers_attention",
    "unpatch",
]

_CUDA_BUILT = _C.cuda_backend_built()  # read once: a call into the extension breaks torch.compile graphs
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Arguments of sparge.attention that the SDPA call itself determines.
_CALL_ARGS = frozenset({"is_causal", "scale", "layout", "return_lse", "return_sparsity"})
_SETTING_NAMES = frozenset(inspect.signature(_sparge_attention).parameters) - {"q", "k", "v"} - _CALL_ARGS
DEFAULT_MIN_SEQ_LEN = 1024


class CallInfo(NamedTuple):
    """What ``select`` sees of one SDPA call (shapes and flags only, no tensor values)."""

    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    dtype: torch.dtype
    device: torch.device
    is_causal: bool
    scale: Optional[float]
    enable_gqa: bool
    layer: Optional[str]  #: the module name under :func:`patch_module`, else None


class CallRecord(NamedTuple):
    """One logged SDPA call."""

    path: str  #: "sparge" or "fallback"
    reason: Optional[str]  #: why it fell back (None on the sparge path)
    layer: Optional[str]  #: the module name under :func:`patch_module`, else None
    q_shape: tuple
    k_shape: tuple
    dtype: torch.dtype
    is_causal: bool
    settings: Optional[dict]  #: keyword arguments given to sparge.attention (None on fallback)
    #: None: no attn_mask; "key_padding": sparge ran the call over the kept keys of a key-padding
    #: mask; "unhandled": the call had a mask and ran the original SDPA
    attn_mask: Optional[str] = None


class SdpaLog:
    """Records of the SDPA calls seen by a routing: ``calls`` (list of :class:`CallRecord`)."""

    def __init__(self) -> None:
        self.calls: list = []

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self):
        return iter(self.calls)

    def clear(self) -> None:
        self.calls.clear()

    def summary(self) -> dict:
        """``{"sparge": n, "fallback": m, "by_reason": {reason: count}}``."""
        paths = Counter(c.path for c in self.calls)
        reasons = Counter(c.reason for c in self.calls if c.path == "fallback")
        return {"sparge": paths.get("sparge", 0), "fallback": paths.get("fallback", 0), "by_reason": dict(reasons)}

    def __repr__(self) -> str:
        return f"SdpaLog({self.summary()})"


def _check_settings(settings: Mapping[str, Any], what: str) -> dict:
    if not isinstance(settings, Mapping):
        raise TypeError(f"{what}: expected a dict of sparge.attention keyword arguments, got {type(settings).__name__}")
    bad = sorted(set(settings) - _SETTING_NAMES)
    if bad:
        extra = " (set by the SDPA call)" if set(bad) & _CALL_ARGS else ""
        raise TypeError(
            f"{what}: unexpected sparge.attention argument(s) {bad}{extra}; expected some of {sorted(_SETTING_NAMES)}"
        )
    return dict(settings)


class _Router:
    """Settings of one active routing (one context, or one patched layer's forward)."""

    def __init__(self, settings: Optional[dict], min_seq_len: int, select: Optional[Callable], log: Optional[SdpaLog],
                 layer: Optional[str] = None):  # fmt: skip
        if not isinstance(min_seq_len, int) or isinstance(min_seq_len, bool) or min_seq_len < 0:
            raise ValueError(f"min_seq_len: expected an int >= 0, got {min_seq_len!r}")
        if select is not None and not callable(select):
            raise TypeError(f"select: expected a callable (CallInfo) -> dict | None, got {type(select).__name__}")
        self.settings = None if settings is None else _check_settings(settings, "settings")
        self.min_seq_len = min_seq_len
        self.select = select
        self.log = log
        self.layer = layer

    def _reason(self, q, k, v, attn_mask, dropout_p, scale, enable_gqa) -> Optional[str]:
        """Why this call cannot go to sparge (None when it can); shapes, dtypes and flags only."""
        if self.settings is None:
            return "disabled"
        if not all(isinstance(t, Tensor) for t in (q, k, v)) or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return "not_4d"
        if dropout_p != 0.0:
            return "dropout"
        if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            return "dtype"
        dev = q.device
        if dev.type not in ("cpu", "cuda") or k.device != dev or v.device != dev:
            return "device"
        if dev.type == "cuda" and not _CUDA_BUILT:
            return "device"
        d = q.size(3)
        if k.size(3) != d:
            return "shape"
        if v.size(3) != d:
            return "head_dim"
        if not 1 <= d <= _C.MAX_HEAD_DIM or dev.type == "cuda" and not (16 <= d <= 256 and d % 16 == 0):
            return "head_dim"
        if k.size(0) != q.size(0) or tuple(v.shape) != tuple(k.shape):
            return "shape"
        hq, hkv = q.size(1), k.size(1)
        if hkv == 0 or hq % hkv != 0:
            return "shape"
        if hq != hkv and not enable_gqa:
            return "gqa_disabled"
        if d > 1 and (q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1):
            return "stride"
        if scale is not None and not scale > 0:
            return "scale"
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return "requires_grad"
        if min(q.size(2), k.size(2)) < self.min_seq_len:
            return "short_sequence"
        return None

    def _key_padding(self, q, k, attn_mask, is_causal) -> Optional[Tensor]:
        """The kept keys [B, Lk] of a key-padding attn_mask sparge can take exactly, else None.
        Reads the mask's values, so only in eager mode."""
        if is_causal or not isinstance(attn_mask, Tensor) or attn_mask.device != q.device:
            return None
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            return None  # the original SDPA rejects a float mask of another dtype
        if self.settings.get("block_mask") is not None or not _data_checkable(attn_mask):
            return None
        return key_padding_keep(attn_mask, (q.size(0), q.size(1), q.size(2), k.size(2)))

    def __call__(self, fallback, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):  # fmt: skip
        reason = self._reason(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
        keep = None
        if reason is None and attn_mask is not None:
            keep = self._key_padding(query, key, attn_mask, is_causal)
            if keep is None:
                reason = "attn_mask"
        settings = None
        if reason is None:
            settings = self.settings
            if self.select is not None:
                info = CallInfo(tuple(query.shape), tuple(key.shape), tuple(value.shape), query.dtype, query.device,
                                bool(is_causal), scale, bool(enable_gqa), self.layer)  # fmt: skip
                chosen = self.select(info)
                if chosen is None:
                    reason = "select"
                    settings = None
                else:
                    settings = {**settings, **_check_settings(chosen, "select(...)")}
                    if keep is not None and settings.get("block_mask") is not None:
                        reason, settings = "attn_mask", None
        if self.log is not None:
            shapes = (tuple(query.shape), tuple(key.shape)) if isinstance(query, Tensor) and isinstance(key, Tensor) else ((), ())
            dtype = query.dtype if isinstance(query, Tensor) else None
            mask = None if attn_mask is None else "unhandled" if reason else "key_padding"
            self.log.calls.append(
                CallRecord("fallback" if reason else "sparge", reason, self.layer, shapes[0], shapes[1], dtype,
                           bool(is_causal), None if settings is None else dict(settings), mask)  # fmt: skip
            )
        if reason is not None:
            kwargs = {"enable_gqa": True} if enable_gqa else {}
            return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)  # fmt: skip
        if keep is not None:
            call = {**_ATTENTION_DEFAULTS, **settings, "is_causal": False, "scale": scale, "layout": "HND"}
            return key_padding_parts(query, key, value, keep, call)[0]
        return _sparge_attention(query, key, value, is_causal=bool(is_causal), scale=scale, layout="HND", **settings)


# ---- the replacement of F.scaled_dot_product_attention ------------------------------------------------

_LOCK = threading.RLock()
_STACK: list = []  # active routers, innermost last
_ORIGINAL: list = []  # [the function that was installed before the first routing was entered]


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Replacement of ``torch.nn.functional.scaled_dot_product_attention`` while a routing is active."""
    original = _ORIGINAL[0] if _ORIGINAL else torch._C._nn.scaled_dot_product_attention
    if not _STACK:
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)  # fmt: skip
    return _STACK[-1](original, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _push(router: _Router) -> None:
    with _LOCK:
        if not _STACK:
            current = F.scaled_dot_product_attention
            _ORIGINAL[:] = [current if current is not _routed_sdpa else torch._C._nn.scaled_dot_product_attention]
            F.scaled_dot_product_attention = _routed_sdpa
        _STACK.append(router)


def _pop(router: _Router) -> None:
    with _LOCK:
        for i in range(len(_STACK) - 1, -1, -1):
            if _STACK[i] is router:
                del _STACK[i]
                break
        if not _STACK and _ORIGINAL:
            if F.scaled_dot_product_attention is _routed_sdpa:
                F.scaled_dot_product_attention = _ORIGINAL[0]
            _ORIGINAL.clear()


def is_active() -> bool:
    """Whether a routing is active (``F.scaled_dot_product_attention`` is replaced)."""
    return bool(_STACK)


class SdpaPatch:
    """A routing of SDPA calls to sparge; a context manager (yielding its :class:`SdpaLog`) or
    :meth:`enable` / :meth:`disable`. Re-entrant use of one object is not supported."""

    def __init__(self, settings: dict, min_seq_len: int, select, record: bool):
        self.log = SdpaLog()
        self._router = _Router(settings, min_seq_len, select, self.log if record else None)
        self._active = False

    def enable(self) -> "SdpaPatch":
        if self._active:
            raise RuntimeError("this sparge.patch.sdpa routing is already active")
        _push(self._router)
        self._active = True
        return self

    def disable(self) -> None:
        if self._active:
            _pop(self._router)
            self._active = False

    def __enter__(self) -> SdpaLog:
        self.enable()
        return self.log

    def __exit__(self, *exc) -> None:
        self.disable()


def sdpa(*, min_seq_len: int = DEFAULT_MIN_SEQ_LEN, select: Optional[Callable[[CallInfo], Optional[dict]]] = None,
         record: bool = True, **settings) -> SdpaPatch:  # fmt: skip
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to sparge inside a ``with`` block.

    Args:
        min_seq_len: calls with ``min(Lq, Lk) < min_seq_len`` keep the original SDPA.
        select: optional ``select(CallInfo) -> dict | None`` called for each call sparge can take:
            a dict overrides ``settings`` for that call, None sends it to the original SDPA.
        record: keep a :class:`CallRecord` per call in the log.
        **settings: keyword arguments of :func:`sparge.attention` (``mode``, ``topk``,
            ``cdfthreshd``, ``simthreshd1``, ``pvthreshd``, ``block_size``, ...; not ``is_causal``,
            ``scale`` or ``layout``, which come from the call). Unknown names raise TypeError.

    ``with sparge.patch.sdpa(mode="topk", topk=0.5) as log: ...`` — the function is restored on
    exit (also on an exception); nested blocks use the innermost settings.
    """
    return SdpaPatch(settings, min_seq_len, select, record)


def enable(*, min_seq_len: int = DEFAULT_MIN_SEQ_LEN, select=None, record: bool = True, **settings) -> SdpaPatch:
    """:func:`sdpa` without ``with``: returns the active :class:`SdpaPatch` (``.log``); undo with :func:`disable`."""
    return SdpaPatch(settings, min_seq_len, select, record).enable()


def disable(patch: SdpaPatch) -> None:
    """Ends a routing started by :func:`enable`."""
    if not isinstance(patch, SdpaPatch):
        raise TypeError(f"patch: expected the SdpaPatch returned by sparge.patch.enable, got {type(patch).__name__}")
    patch.disable()


# ---- per-module routing ---------------------------------------------------------------------------------

LayerSelector = Union[None, str, Iterable[str], type, tuple, Callable[[str, nn.Module], bool]]


class ModulePatch:
    """Hooks installed by :func:`patch_module`: ``log`` (one :class:`SdpaLog` for all layers),
    ``layers`` (the patched names), :meth:`remove`."""

    def __init__(self, model: nn.Module, log: SdpaLog):
        self.model = model
        self.log = log
        self.layers: list = []
        self._handles: list = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        patches = getattr(self.model, "_sparge_patches", None)
        if patches is not None and self in patches:
            patches.remove(self)


def _match_layers(model: nn.Module, layers: LayerSelector) -> list:
    named = list(model.named_modules())
    if layers is None:
        return [("", model)]
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        return [(n, m) for n, m in named if isinstance(m, layers)]
    if callable(layers):
        return [(n, m) for n, m in named if layers(n, m)]
    wanted = list(layers)
    by_name = dict(named)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ValueError(f"layers: no submodule named {missing} in {type(model).__name__}")
    return [(n, by_name[n]) for n in wanted]


def patch_module(
    model: nn.Module,
    settings: Union[None, Mapping[str, Any], Callable[[str, nn.Module], Optional[dict]]] = None,
    layers: LayerSelector = None,
    *,
    layer_settings: Optional[Mapping[str, Optional[dict]]] = None,
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN,
    select: Optional[Callable[[CallInfo], Optional[dict]]] = None,
    record: bool = True,
) -> ModulePatch:
    """Route the SDPA calls made inside the ``forward`` of chosen submodules to sparge.

    A forward pre-hook on each chosen module enters a routing with that layer's settings and a
    forward hook (``always_call=True``, so also when forward raises) leaves it; the innermost
    patched module wins.

    Args:
        model: the model.
        settings: sparge.attention keyword arguments for every chosen layer (a dict, default
            ``{}``: sparge's defaults), or ``settings(name, module) -> dict | None`` per layer (None:
            that layer keeps the original SDPA).
        layers: which submodules: None (the model itself), a name or list of names (as in
            ``model.named_modules()``), a module class or tuple of classes, or a predicate
            ``(name, module) -> bool``.
        layer_settings: ``{name: dict | None}`` overriding ``settings`` for these layers (a dict
            is merged over the common settings; None disables sparge for the layer).
        min_seq_len, select, record: as in :func:`sdpa` (``CallInfo.layer`` is the module name).

    Returns a :class:`ModulePatch` (``.log``, ``.remove()``); :func:`unpatch` removes every patch
    of the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    chosen = _match_layers(model, layers)
    if not chosen:
        raise ValueError(f"layers: {layers!r} matched no submodule of {type(model).__name__}")
    layer_settings = dict(layer_settings or {})
    names = {n for n, _ in chosen}
    unknown = sorted(set(layer_settings) - names)
    if unknown:
        raise ValueError(f"layer_settings: names {unknown} are not among the patched layers {sorted(names)}")
    log = SdpaLog()
    patch = ModulePatch(model, log)
    routers = []
    for name, module in chosen:
        if callable(settings) and not isinstance(settings, Mapping):
            s = settings(name, module)
        else:
            s = dict(settings or {})
        if name in layer_settings:
            override = layer_settings[name]
            s = None if override is None else {**(s or {}), **override}
        routers.append((module, _Router(s, min_seq_len, select, log if record else None, layer=name)))
    for module, router in routers:
        def pre_hook(mod, args, _router=router):
            _push(_router)

        def post_hook(mod, args, output, _router=router):
            _pop(_router)

        patch._handles.append(module.register_forward_pre_hook(pre_hook))
        patch._handles.append(module.register_forward_hook(post_hook, always_call=True))
        patch.layers.append(router.layer)
    if not hasattr(model, "_sparge_patches"):
        model._sparge_patches = []
    model._sparge_patches.append(patch)
    return patch


def unpatch(model: nn.Module) -> None:
    """Removes every :func:`patch_module` patch of ``model``."""
    for patch in list(getattr(model, "_sparge_patches", [])):
        patch.remove()
    if hasattr(model, "_sparge_patches"):
        del model._sparge_patches


# ---- Hugging Face transformers ------------------------------------------------------------------------


def transformers_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """Attention function with the signature of transformers' ``AttentionInterface``:
    ``[B, H, L, D]`` inputs, returns ``(attn_output [B, L, H, D], None)``.

    Mirrors transformers' own ``sdpa_attention_forward``: ``is_causal`` defaults to the module's
    ``is_causal`` and is used only without a mask and with more than one query; GQA goes to
    sparge natively. The call goes through the active routing (of :func:`sdpa` or
    :func:`patch_module`), else through a routing with sparge's default settings and
    ``min_seq_len`` = ``DEFAULT_MIN_SEQ_LEN``. Key-padding masks (bidirectional models with
    padded batches) run on sparge over the kept keys; calls sparge cannot take (the padded causal
    mask of a decoder, dropout, ...) run the original SDPA.
    """
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    gqa = query.size(1) != key.size(1)
    args = (query, key, value, attention_mask, dropout, is_causal, scaling, gqa)
    original = _ORIGINAL[0] if _ORIGINAL else F.scaled_dot_product_attention
    router = _STACK[-1] if _STACK else _DEFAULT_ROUTER
    out = router(original, *args)
    return out.transpose(1, 2).contiguous(), None


_DEFAULT_ROUTER = _Router({}, DEFAULT_MIN_SEQ_LEN, None, None)


def register_transformers(name: str = "sparge") -> None:
    """Registers :func:`transformers_attention` as ``attn_implementation=name`` in transformers
    (``transformers.AttentionInterface.register``; its mask function is ``sdpa_mask``, registered
    with ``transformers.masking_utils.AttentionMaskInterface`` where that exists). Then
    ``AutoModel.from_pretrained(..., attn_implementation="sparge")`` or
    ``model.set_attn_implementation("sparge")`` use sparge. Raises ImportError when transformers
    (or its AttentionInterface, transformers >= 4.48) is missing."""
    import transformers  # noqa: PLC0415 (lazy: optional dependency)

    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        raise ImportError("sparge.patch.register_transformers needs transformers >= 4.48 (AttentionInterface)")
    interface.register(name, transformers_attention)
    try:  # transformers >= 4.53: custom implementations choose their mask format
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: PLC0415
    except ImportError:  # pragma: no cover - depends on the transformers version
        return
    AttentionMaskInterface.register(name, sdpa_mask)


# ---- diffusers ---------------------------------------------------------------------------------------


class DiffusersAttnProcessor:
    """Attention processor for diffusers' ``Attention`` modules (the computation of
    ``AttnProcessor2_0``, with the attention itself routed to sparge)::

        pipe.transformer.set_attn_processor(sparge.patch.DiffusersAttnProcessor(topk=0.5))

    Projections, norms, residual and output projection are the module's own (``to_q``, ``to_k``,
    ``to_v``, ``norm_q``, ``norm_k``, ``to_out``, ...). Key-padding masks (e.g. the text-encoder
    mask of a cross-attention) run on sparge over the kept keys; calls sparge cannot take (other
    masks, short sequences, ...) run torch's SDPA. Only for processors of the classic
    ``Attention`` class; models with their own processors (rotary embeddings, joint attention,
    e.g. Flux or SD3) need their processor's logic and are not covered: for those, wrap the
    pipeline call in :func:`sdpa` instead. ``log`` records the calls.
    """

    def __init__(self, *, min_seq_len: int = DEFAULT_MIN_SEQ_LEN, select=None, record: bool = True, **settings):
        self.log = SdpaLog()
        self._router = _Router(settings, min_seq_len, select, self.log if record else None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):  # fmt: skip
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif getattr(attn, "norm_cross", None):
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        original = _ORIGINAL[0] if _ORIGINAL else F.scaled_dot_product_attention
        # AttnProcessor2_0 leaves the scale to SDPA's default (head_dim ** -0.5); so does this.
        hidden_states = self._router(original, query, key, value, attention_mask, 0.0, False, None, False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if getattr(attn, "residual_connection", False):
            hidden_states = hidden_states + residual
        return hidden_states / getattr(attn, "rescale_output_factor", 1.0)
