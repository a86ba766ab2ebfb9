"""Helpers to test and benchmark attention: realistic structured inputs, exact attention, metrics.

Random i.i.d. inputs give flat attention maps where every block matters equally; real models
do not. :func:`structured_qkv` builds q and k from a smooth positional signal they share
(random Fourier features of the token position, so ``q_r · k_c`` is a random-feature
approximation of a Gaussian kernel of the distance ``r - c`` with a per-head width), plus
channel outliers in k (a per-channel offset constant over tokens, which softmax ignores but
INT8 quantization does not) and noise. Attention maps are then concentrated near the diagonal
with head-dependent widths, like the maps of language and diffusion transformers. With
``grid=(T, H, W)`` the positions are the cells of a video latent in frame-major raster order,
so nearby tokens in space and time attend to each other.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _positions(length: int, span: int, grid: Optional[tuple[int, int, int]]) -> Tensor:
    """[L, axes] positions in token units: a 1-D line spread over `span`, or the cells of `grid`."""
    if grid is None:
        return ((torch.arange(length, dtype=torch.float64) + 0.5) * (span / max(length, 1))).unsqueeze(1)
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
    return coords.reshape(-1, 3).to(torch.float64)


def structured_qkv(
    batch: int = 1,
    heads_q: int = 4,
    heads_kv: Optional[int] = None,
    len_q: int = 1024,
    len_k: Optional[int] = None,
    head_dim: int = 64,
    *,
    dtype: torch.dtype = torch.float16,
    device="cpu",
    layout: str = "HND",
    grid: Optional[tuple[int, int, int]] = None,
    sharpness: tuple[float, float] = (4.0, 12.0),
    width: tuple[float, float] = (1 / 64, 1 / 4),
    outlier_channels: int = 4,
    outlier_scale: float = 8.0,
    noise: float = 0.3,
    seed: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Structured (q, k, v) with concentrated attention maps.

    Args:
        batch, heads_q, heads_kv, len_q, len_k, head_dim: the shape; ``heads_kv`` defaults to
            ``heads_q`` and ``len_k`` to ``len_q``. Query and key positions both cover
            ``[0, max(len_q, len_k))``, so the attention band follows the diagonal also when
            ``len_q != len_k``.
        dtype, device, layout: of the returned tensors (``"HND"`` or ``"NHD"``).
        grid: ``(T, H, W)`` video-latent positions instead of a line (needs
            ``len_q == len_k == T·H·W``).
        sharpness: range of the score gap (nats) between a query's own position and far keys,
            drawn per query head: larger values give more concentrated maps.
        width: range of the kernel width as a fraction of the sequence (per grid axis with
            ``grid``), drawn log-uniformly per key/value head.
        outlier_channels, outlier_scale: channels of k that get a constant offset of about
            ``outlier_scale`` (the outliers K smoothing removes).
        noise: standard deviation of the i.i.d. noise added to q and k.
        seed: seed of the generator; ``None`` draws a fresh one.
    """
    heads_kv = heads_q if heads_kv is None else heads_kv
    len_k = len_q if len_k is None else len_k
    if heads_kv <= 0 or heads_q % heads_kv != 0:
        raise ValueError(f"heads_q: expected a multiple of heads_kv = {heads_kv}, got {heads_q}")
    if grid is not None and not (len(grid) == 3 and math.prod(grid) == len_q == len_k):
        raise ValueError(f"grid: expected (T, H, W) with T·H·W == len_q == len_k, got {grid} for {len_q}, {len_k}")
    if layout not in ("HND", "NHD"):
        raise ValueError(f"layout: expected 'HND' or 'NHD', got {layout!r}")
    gen = torch.Generator().manual_seed(torch.seed() if seed is None else seed)
    f64 = torch.float64
    span = max(len_q, len_k)
    pos_q, pos_k = _positions(len_q, span, grid), _positions(len_k, span, grid)
    extent = torch.tensor([span] if grid is None else list(grid), dtype=f64)  # [axes]
    features = head_dim // 2
    group = heads_q // heads_kv

    q = torch.empty(batch, heads_q, len_q, head_dim, dtype=f64)
    k = torch.empty(batch, heads_kv, len_k, head_dim, dtype=f64)
    v = torch.empty(batch, heads_kv, len_k, head_dim, dtype=f64)
    for hk in range(heads_kv):
        lo, hi = math.log(width[0]), math.log(width[1])
        length = torch.exp(lo + (hi - lo) * torch.rand(extent.shape, generator=gen, dtype=f64)) * extent
        omega = torch.randn(features, extent.numel(), generator=gen, dtype=f64) / length  # [F, axes]
        rotation, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=f64))

        def signal(pos: Tensor) -> Tensor:  # [L, D]: (cos, sin) pairs, rotated; the odd channel is 0
            phase = pos @ omega.T
            x = torch.zeros(pos.size(0), head_dim, dtype=f64)
            x[:, 0 : 2 * features : 2], x[:, 1 : 2 * features : 2] = torch.cos(phase), torch.sin(phase)
            return x @ rotation

        sig_q, sig_k = signal(pos_q), signal(pos_k)
        outliers = torch.zeros(head_dim, dtype=f64)
        channels = torch.randperm(head_dim, generator=gen)[: min(outlier_channels, head_dim)]
        outliers[channels] = outlier_scale * (1 + 0.25 * torch.randn(channels.numel(), generator=gen, dtype=f64))
        for b in range(batch):
            k[b, hk] = sig_k + outliers + noise * torch.randn(len_k, head_dim, generator=gen, dtype=f64)
            v_mix = torch.randn(head_dim, head_dim, generator=gen, dtype=f64) / math.sqrt(head_dim)
            v[b, hk] = sig_k @ v_mix + 0.5 * torch.randn(len_k, head_dim, generator=gen, dtype=f64)
            for h in range(hk * group, (hk + 1) * group):
                gap = sharpness[0] + (sharpness[1] - sharpness[0]) * torch.rand((), generator=gen, dtype=f64)
                amplitude = gap * math.sqrt(head_dim) / max(features, 1)
                q[b, h] = amplitude * sig_q + noise * torch.randn(len_q, head_dim, generator=gen, dtype=f64)
    out = tuple(x.to(dtype) for x in (q, k, v))
    if layout == "NHD":
        out = tuple(x.transpose(1, 2).contiguous() for x in out)
    return tuple(x.to(device) for x in out)


def _visible(rows: Tensor, len_q: int, len_k: int, is_causal: bool, causal_alignment: str) -> Tensor:
    """[rows, Lk] bool: key c visible to query r (docs/method.md, visible_end)."""
    cols = torch.arange(len_k, device=rows.device)
    if not is_causal:
        return torch.ones(rows.numel(), len_k, dtype=torch.bool, device=rows.device)
    offset = len_k - len_q if causal_alignment == "bottom_right" else 0
    return cols.unsqueeze(0) <= (rows + offset).unsqueeze(1)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    layout: str = "HND",
    block_mask: Optional[Tensor] = None,
    block_size: tuple[int, int] = (128, 64),
    dtype: Optional[torch.dtype] = None,
    max_chunk_elements: int = 1 << 26,
) -> tuple[Tensor, Tensor]:
    """Exact attention ``(o, lse)`` in ``dtype`` (default fp64 on the CPU, fp32 on a GPU).

    Same conventions as :func:`sparge.attention` (GQA, layouts, causal alignments, a block mask
    ``[B, Hq, nbq, nbk]`` with size-1 dimensions broadcast); queries that see no key get
    ``o = 0`` and ``lse = -inf``. ``o`` has the layout of q; ``lse`` is ``[B, Hq, Lq]``.
    Works in chunks of query rows so the score matrix stays under ``max_chunk_elements``.
    """
    if dtype is None:
        dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.size(1), k.size(2)
    group = heads_q // heads_kv
    scale = head_dim**-0.5 if scale is None else scale
    o = torch.zeros(batch, heads_q, len_q, head_dim, dtype=dtype, device=q.device)
    lse = torch.full((batch, heads_q, len_q), -math.inf, dtype=dtype, device=q.device)
    if block_mask is not None:
        nbq, nbk = -(-len_q // block_size[0]), -(-len_k // block_size[1])
        block_mask = block_mask.to(q.device).bool().expand(batch, heads_q, nbq, nbk)
    chunk = max(1, min(len_q, max_chunk_elements // max(len_k, 1)))
    for b in range(batch):
        for h in range(heads_q):
            kh = k[b, h // group].to(dtype)
            vh = v[b, h // group].to(dtype)
            for r0 in range(0, len_q, chunk):
                rows = torch.arange(r0, min(r0 + chunk, len_q), device=q.device)
                s = (q[b, h, rows].to(dtype) @ kh.T) * scale
                visible = _visible(rows, len_q, len_k, is_causal, causal_alignment)
                if block_mask is not None:
                    m = block_mask[b, h][rows // block_size[0]]
                    visible &= m.repeat_interleave(block_size[1], dim=1)[:, :len_k]
                s = s.masked_fill(~visible, -math.inf)
                row_lse = torch.logsumexp(s, dim=1)
                p = torch.exp(s - row_lse.unsqueeze(1)).nan_to_num(0.0)
                o[b, h, rows] = p @ vh
                lse[b, h, rows] = row_lse
    if layout == "NHD":
        o = o.transpose(1, 2)
    return o, lse


def cosine_similarity(x: Tensor, ref: Tensor) -> float:
    """Cosine similarity of the flattened tensors (fp64); 1.0 when both are zero."""
    x, ref = x.double().flatten(), ref.double().flatten()
    denom = x.norm() * ref.norm()
    return 1.0 if float(denom) == 0.0 else float((x @ ref) / denom)


def relative_l1(x: Tensor, ref: Tensor) -> float:
    """``Σ|x - ref| / Σ|ref|`` (fp64); 0.0 when both are zero."""
    x, ref = x.double(), ref.double()
    denom = float(ref.abs().sum())
    num = float((x - ref).abs().sum())
    return 0.0 if num == 0.0 else num / denom if denom > 0 else math.inf


# ---- workloads of the prediction-quality benchmark (bench/prediction_quality.py) ------------------


def sink_retrieval_qkv(
    batch: int = 1,
    heads: int = 4,
    length: int = 1024,
    head_dim: int = 64,
    *,
    dtype: torch.dtype = torch.float16,
    device="cpu",
    sink_logit: float = 9.0,
    retrieval_keys: int = 6,
    retrieval_span: int = 256,
    retrieval_logit: float = 12.0,
    seed: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A smooth 1-D workload (:func:`structured_qkv`) plus the spikes a block mean dilutes.

    * **Sink**: key 0 gets a direction ``u`` that every query shares, raising its logit by about
      ``sink_logit`` nats for every query.
    * **Retrieval keys**: ``retrieval_keys`` keys at random positions, each with its own direction
      ``w``; the queries of one random span of ``retrieval_span`` rows share ``w``, raising the
      logit of that one key by about ``retrieval_logit`` nats for them.

    Mean pooling over 64 keys divides each spike by 64. Deterministic for a given ``seed``.
    """
    q, k, v = structured_qkv(batch, heads, heads, length, length, head_dim, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed((torch.seed() if seed is None else seed) + 1)
    f64 = torch.float64
    scale = head_dim**-0.5
    k_norm = float(k.std() * math.sqrt(head_dim))

    def boost(rows: slice, col: int, bh: tuple[int, int], logit: float) -> None:
        w = torch.randn(head_dim, generator=gen, dtype=f64)
        w /= w.norm()
        b_k = 2.0 * k_norm  # the spike key stands out after K smoothing
        a_q = logit / (b_k * scale)
        q[bh[0], bh[1], rows] += a_q * w
        k[bh[0], bh[1], col] += b_k * w

    for b in range(batch):
        for h in range(heads):
            boost(slice(0, length), 0, (b, h), sink_logit)
            for _ in range(retrieval_keys):
                col = int(torch.randint(1, max(length, 2), (), generator=gen))
                r0 = int(torch.randint(0, max(length - retrieval_span, 1), (), generator=gen))
                boost(slice(r0, r0 + retrieval_span), col, (b, h), retrieval_logit)
    return tuple(x.to(dtype).to(device) for x in (q, k, v))


def noise_qkv(
    batch: int = 1,
    heads: int = 4,
    length: int = 1024,
    head_dim: int = 64,
    *,
    dtype: torch.dtype = torch.float16,
    device="cpu",
    seed: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """i.i.d. standard normal q, k, v: flat attention maps where no block can be pruned."""
    gen = torch.Generator().manual_seed(torch.seed() if seed is None else seed)
    shape = (batch, heads, length, head_dim)
    return tuple(torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(3))


def prediction_workloads(length: int = 2048, heads: int = 4, head_dim: int = 128, seed: int = 0) -> dict:
    """The workloads of the prediction-quality benchmark: name → (q, k, v), [1, heads, length, head_dim]
    fp16, deterministic from ``seed``. ``video_3d`` uses a (T, H, W) grid with T·H·W = length
    (``length`` a multiple of 64, H = W = 8 or 16 or 32 depending on the length)."""
    side = 32 if length >= 8192 else 16 if length >= 1024 else 8
    if length % (side * side) != 0:
        raise ValueError(f"length: expected a multiple of {side * side} for the video grid, got {length}")
    grid = (length // (side * side), side, side)
    return {
        "local_1d": structured_qkv(1, heads, heads, length, length, head_dim, seed=seed),
        "video_3d": structured_qkv(1, heads, heads, length, length, head_dim, grid=grid, width=(1 / 16, 1 / 4),
                                   sharpness=(12.0, 24.0), seed=seed + 1),  # fmt: skip
        "sink_retrieval": sink_retrieval_qkv(1, heads, length, head_dim, seed=seed + 2),
        "peaked": structured_qkv(1, heads, heads, length, length, head_dim, sharpness=(40.0, 64.0),
                                 width=(1 / 64, 1 / 8), noise=0.5, seed=seed + 3),  # fmt: skip
        "noise": noise_qkv(1, heads, length, head_dim, seed=seed + 4),
    }


def block_attention_mass(
    q: Tensor,
    k: Tensor,
    *,
    block_size: tuple[int, int] = (128, 64),
    scale: Optional[float] = None,
    is_causal: bool = False,
    dtype: torch.dtype = torch.float32,
    max_chunk_elements: int = 1 << 24,
) -> Tensor:
    """Exact attention mass of every (Q block, K block): ``Σ_{r in block i} Σ_{c in block j} P[r, c]``
    with ``P`` the softmax of the scaled scores (top-left causal when ``is_causal``), as fp64
    ``[B, Hq, nbq, nbk]`` on the CPU. ``q`` ``[B, Hq, Lq, D]``, ``k`` ``[B, Hkv, Lk, D]`` (HND)."""
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.size(1), k.size(2)
    group = heads_q // heads_kv
    scale = head_dim**-0.5 if scale is None else scale
    bq, bk = block_size
    nbq, nbk = -(-len_q // bq), -(-len_k // bk)
    mass = torch.zeros(batch, heads_q, nbq, nbk, dtype=torch.float64)
    key_block = torch.arange(len_k, device=q.device) // bk
    rows_per_chunk = max(bq, (max_chunk_elements // max(len_k, 1)) // bq * bq)
    for b in range(batch):
        for h in range(heads_q):
            kh = k[b, h // group].to(dtype)
            for r0 in range(0, len_q, rows_per_chunk):
                rows = torch.arange(r0, min(r0 + rows_per_chunk, len_q), device=q.device)
                s = (q[b, h, rows].to(dtype) @ kh.T) * scale
                s = s.masked_fill(~_visible(rows, len_q, len_k, is_causal, "top_left"), -math.inf)
                p = torch.softmax(s, dim=1).nan_to_num(0.0).double()
                per_key_block = torch.zeros(rows.numel(), nbk, dtype=torch.float64, device=q.device)
                per_key_block.index_add_(1, key_block, p)
                mass[b, h].index_add_(0, (rows // bq).cpu(), per_key_block.cpu())
    return mass


def oracle_block_mask(mass: Tensor, counts: Tensor) -> Tensor:
    """The oracle selection: for every (b, h, Q block) the ``counts[b, h, i]`` K blocks of largest
    exact mass (``mass`` from :func:`block_attention_mass`; ties by lower index) as a bool mask on
    the device of ``counts``."""
    order = torch.sort(-mass, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(mass.size(-1)).expand_as(order))
    return (rank < counts.cpu().to(torch.int64).unsqueeze(-1)).to(counts.device)
