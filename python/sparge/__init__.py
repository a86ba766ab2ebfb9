"""sparge: training-free sparse + quantized attention (SpargeAttn on INT8 QKᵀ / FP8 P·V kernels).

Replace ``torch.nn.functional.scaled_dot_product_attention(q, k, v)`` with
``sparge.attention(q, k, v)`` (``[B, H, L, D]`` tensors, fp16 / bf16 / fp32, CPU or CUDA)::

    import sparge
    o = sparge.attention(q, k, v, topk=0.5, is_causal=True)
    o, sparsity = sparge.attention(q, k, v, mode="cdf", cdfthreshd=0.95, return_sparsity=True)
    o = sparge.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)  # packed [total, H, D]

Every function is a ``torch.library`` operator (``torch.ops.sparge.*``) with a fake
implementation, so it runs under ``torch.compile(fullgraph=True)`` and CUDA graphs. The stages
(:func:`quantize`, :func:`predict`, :func:`attend`) are exposed for testing kernels against each
other. See :mod:`sparge.api` for the conventions, and ``python -m sparge --help`` for the benchmark.
"""

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("sparge needs PyTorch (>= 2.4): pip install torch") from e

from . import _C, _ops  # noqa: F401  (_ops registers torch.ops.sparge.*)
from ._ops import release_workspace_cache
from .api import (
    Prediction,
    QuantizedQKV,
    attend,
    attention,
    block_sparse_attention,
    block_sparsity,
    predict,
    predict_blocks,
    quantize,
    scaled_dot_product_attention,
)
from .varlen import attention_varlen  # noqa: E402  (sparge.varlen: packed batches, key-padding masks)
from . import compat  # noqa: E402,F401  (sparge.compat: the original libraries' entry points)
from . import patch  # noqa: E402,F401  (sparge.patch: route F.scaled_dot_product_attention / models to sparge)
from . import calibrate  # noqa: E402,F401  (sparge.calibrate: per-layer, per-head settings under an error budget)
from . import distributed  # noqa: E402,F401  (sparge.distributed: sequence-parallel attention, ulysses_attention)

__version__: str = _C.version()

STAT_BLOCKS_KEPT: int = _C.STAT_BLOCKS_KEPT
STAT_BLOCKS_ALLOWED: int = _C.STAT_BLOCKS_ALLOWED
STAT_PV_UNITS: int = _C.STAT_PV_UNITS
STAT_PV_SKIPPED: int = _C.STAT_PV_SKIPPED


def cuda_backend_built() -> bool:
    """Whether this build of sparge contains the CUDA backend."""
    return _C.cuda_backend_built()


def cuda_architectures() -> str:
    """CUDA architectures the backend was compiled for, e.g. ``"90a;89;80"`` (empty without CUDA)."""
    return _C.cuda_architectures()


def attend_kernel(
    q_shape,
    k_shape=None,
    *,
    device="cuda",
    layout: str = "HND",
    block_size=(128, 64),
    pv_precision: str = "fp8",
) -> str:
    """The stage 2 kernel that attention on tensors of these shapes runs on ``device``: ``"cpu"``,
    ``"wgmma"`` (Hopper, sm_90a) or ``"mma"`` (mma.sync, sm_80 and newer). Raises
    NotImplementedError naming the reason when no kernel covers the request. The environment
    variable ``SPARGE_CUDA_KERNEL=auto|mma|wgmma`` forces the CUDA choice (for testing)."""
    from .api import _PV_PRECISIONS, _choice

    device = torch.device(device)
    if layout not in ("HND", "NHD"):
        raise ValueError(f"layout: expected 'HND' or 'NHD', got {layout!r}")
    k_shape = q_shape if k_shape is None else k_shape
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise ValueError(f"q_shape / k_shape: expected 4 dimensions, got {tuple(q_shape)} / {tuple(k_shape)}")
    layout_code = _ops.LAYOUT_NHD if layout == "NHD" else _ops.LAYOUT_HND
    (b, hq, lq, d), (_, hkv, lk, _) = (_ops._hnd_sizes(s, layout_code) for s in (q_shape, k_shape))
    pv = _choice("pv_precision", pv_precision, _PV_PRECISIONS)
    return _ops._call_on(device, lambda code, _stream: _C.attend_kernel(
        device=code, shape=(b, hq, hkv, lq, lk, d), blocks=tuple(block_size), pv=pv))


__all__ = [
    "Prediction",
    "QuantizedQKV",
    "STAT_BLOCKS_ALLOWED",
    "STAT_BLOCKS_KEPT",
    "STAT_PV_SKIPPED",
    "STAT_PV_UNITS",
    "attend",
    "attend_kernel",
    "attention",
    "attention_varlen",
    "block_sparse_attention",
    "block_sparsity",
    "cuda_architectures",
    "cuda_backend_built",
    "predict",
    "predict_blocks",
    "quantize",
    "release_workspace_cache",
    "scaled_dot_product_attention",
    "__version__",
]
