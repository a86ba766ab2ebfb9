#!/usr/bin/env python3
"""Diffusion-transformer (DiT) blocks over a video latent, with per-layer sparge settings.

The model is built here (random init, no downloads): ``--blocks`` DiT blocks (adaLN modulation
from a timestep embedding, full non-causal self-attention over the T x H x W token grid of a
video latent, an MLP), 16 heads of dim 64 by default. The blocks call
``torch.nn.functional.scaled_dot_product_attention``; ``sparge.patch.patch_module`` routes those
calls to sparge with settings chosen per block:

* ``blocks.0`` dense (sparge's quantized attention over every block; first layers are often the
  least sparse, so video-DiT recipes keep them dense),
* odd blocks ``topk`` (keep the best ``--topk`` fraction of key blocks per query block),
* other even blocks ``cdf`` (keep the fewest key blocks holding ``--cdf`` of the predicted mass).

It prints the time of a forward with PyTorch SDPA and with the patched model, the error of the
output, and, per block, the sparsity sparge achieved (a direct ``sparge.attention(...,
return_sparsity=True)`` call on that block's q, k, v) with the error of that attention alone.

As in a trained video DiT (and as in ``sparge.testing.structured_qkv`` with ``grid=``), tokens
carry a 3-D positional embedding (random Fourier features of (t, h, w)) and each head's query
projection is tied to its key projection, so a token attends mostly to tokens near it in space
and time; random weights on noise would attend uniformly and nothing could be skipped.

    python examples/python/dit_block.py                          # CPU-sized: grid 4x16x16 = 1024 tokens
    python examples/python/dit_block.py --device cuda --grid 16 32 32 --blocks 4
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparge
import sparge.patch


# ---- the model -------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, gen: torch.Generator):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        wk = torch.randn(heads, self.head_dim, d_model, generator=gen) / math.sqrt(d_model)
        gain = 0.6 + 1.0 * torch.rand(heads, 1, 1, generator=gen)  # per-head sharpness
        wq = gain * wk + 0.02 * torch.randn(heads, self.head_dim, d_model, generator=gen)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            wv = torch.randn(d_model, d_model, generator=gen) / math.sqrt(d_model)
            self.qkv_proj.weight.copy_(torch.cat([wq.reshape(d_model, d_model), wk.reshape(d_model, d_model), wv]))
            self.out.weight.copy_(torch.randn(d_model, d_model, generator=gen) / math.sqrt(d_model))

    def qkv(self, x: torch.Tensor):
        """q, k, v as [B, H, L, D] (also used below for the direct sparge.attention call)."""
        b, length, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        o = F.scaled_dot_product_attention(q, k, v)  # non-causal, no mask: what sparge takes over
        return self.out(o.transpose(1, 2).flatten(2))


class DiTBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, gen: torch.Generator):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.attn = SelfAttention(d_model, heads, gen)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"), nn.Linear(4 * d_model, d_model))
        self.ada = nn.Linear(d_model, 6 * d_model)  # adaLN: shift, scale, gate for attention and MLP
        with torch.no_grad():
            for lin in (self.mlp[0], self.mlp[2], self.ada):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / math.sqrt(lin.in_features))
                lin.bias.zero_()
            self.ada.weight.mul_(0.1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        x = x + (1 + gate1) * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + (1 + gate2) * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    def __init__(self, blocks: int, heads: int, head_dim: int, channels: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        d_model = heads * head_dim
        self.d_model = d_model
        self.patch_embed = nn.Linear(channels, d_model)
        self.time_mlp = nn.Sequential(nn.Linear(256, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        with torch.no_grad():
            for lin in (self.patch_embed, self.time_mlp[0], self.time_mlp[2]):
                lin.weight.copy_(0.3 * torch.randn(lin.weight.shape, generator=gen) / math.sqrt(lin.in_features))
                lin.bias.zero_()
        # 3-D random Fourier features: frequencies per axis (t, h, w) with length scales of 1-8 cells.
        scales = torch.exp(torch.empty(d_model // 2, 3).uniform_(math.log(1.0), math.log(8.0), generator=gen))
        self.register_buffer("omega", torch.randn(d_model // 2, 3, generator=gen) / scales)
        self.blocks = nn.ModuleList(DiTBlock(d_model, heads, gen) for _ in range(blocks))
        self.final = nn.Linear(d_model, channels)

    def positional(self, grid, device, dtype) -> torch.Tensor:
        t, h, w = grid  # cells in frame-major raster order, as video latents are flattened
        cells = torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij"), -1)
        phase = cells.reshape(-1, 3).float() @ self.omega.T
        return torch.cat([phase.cos(), phase.sin()], dim=-1).to(dtype)  # [T*H*W, d_model]

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b, t, h, w, ch = latent.shape
        x = self.patch_embed(latent.reshape(b, t * h * w, ch)) + self.positional((t, h, w), latent.device, latent.dtype)
        freqs = torch.exp(-math.log(10000) * torch.arange(128, device=latent.device) / 128)
        temb = torch.cat([(timestep[:, None] * freqs).cos(), (timestep[:, None] * freqs).sin()], -1).to(latent.dtype)
        c = self.time_mlp(temb)
        for block in self.blocks:
            x = block(x, c)
        return self.final(x).reshape(b, t, h, w, ch)


# ---- helpers ---------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    return torch.device(name)


def timed(fn, device: torch.device, reps: int):
    """(result of the last call, median seconds per call) after one warm-up call."""
    out = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def compare(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L1 error) of x against ref, in fp64."""
    x, ref = x.double().flatten(), ref.double().flatten()
    cos = F.cosine_similarity(x, ref, dim=0).item()
    rel_l1 = ((x - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30)).item()
    return cos, rel_l1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), metavar=("T", "H", "W"),
                   help="latent grid; tokens = T*H*W (default 4 16 16 = 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--channels", type=int, default=16, help="latent channels")
    p.add_argument("--topk", type=float, default=0.5)
    p.add_argument("--cdf", type=float, default=0.95)
    p.add_argument("--min-seq-len", type=int, default=1024,
                   help="SDPA calls shorter than this keep PyTorch's SDPA (sparge.patch default 1024)")
    p.add_argument("--reps", type=int, default=2, help="timed forwards per run (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def block_plan(i: int, args) -> dict:
    """sparge.attention settings of block i: first dense, then topk / cdf alternating."""
    if i == 0:
        return {"mode": "dense"}
    if i % 2 == 1:
        return {"mode": "topk", "topk": args.topk}
    return {"mode": "cdf", "cdfthreshd": args.cdf}


def describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


# ---- the example -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = {"auto": torch.float32 if device.type == "cpu" else torch.bfloat16,
             "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    grid = tuple(args.grid)
    tokens = math.prod(grid)
    print(f"[dit_block] device={device} dtype={str(dtype).replace('torch.', '')} grid={'x'.join(map(str, grid))} "
          f"({tokens} tokens) batch={args.batch} blocks={args.blocks} heads={args.heads} head_dim={args.head_dim}")

    print("[dit_block] building the model (random init + 3-D positional embedding) ...")
    model = TinyDiT(args.blocks, args.heads, args.head_dim, args.channels, args.seed).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    latent = torch.randn(args.batch, *grid, args.channels, generator=gen).to(device=device, dtype=dtype)
    timestep = torch.full((args.batch,), 500.0, device=device)

    # Reference run with PyTorch SDPA; a pre-hook on every attention module keeps its input so
    # that the per-block sparsity can be measured below.
    attn_inputs = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda mod, a, i=i: attn_inputs.__setitem__(i, a[0]))
             for i, blk in enumerate(model.blocks)]
    print("[dit_block] running the model with PyTorch SDPA ...")
    with torch.inference_mode():
        ref, t_sdpa = timed(lambda: model(latent, timestep), device, args.reps)
    for h in hooks:
        h.remove()

    # Route the SDPA calls of each DiTBlock to sparge, with its own settings. `settings` apply to
    # every matched layer; `layer_settings` override them by module name (None would keep SDPA).
    plans = {f"blocks.{i}": block_plan(i, args) for i in range(args.blocks)}
    patch = sparge.patch.patch_module(model, {}, layers=DiTBlock, layer_settings=plans, min_seq_len=args.min_seq_len)
    print(f"[dit_block] patched {len(patch.layers)} blocks: " + "; ".join(f"{n}: {describe(s)}" for n, s in plans.items()))
    print("[dit_block] running the patched model ...")
    with torch.inference_mode():
        out, t_sparge = timed(lambda: model(latent, timestep), device, args.reps)
    summary = patch.log.summary()
    per_layer = {}
    for call in patch.log:
        per_layer.setdefault(call.layer, []).append(call.path)
    patch.remove()  # the model is plain PyTorch again
    print(f"[dit_block]   routing log: {summary['sparge']} calls to sparge, {summary['fallback']} fallbacks",
          summary["by_reason"] or "")
    cos, rel_l1 = compare(out, ref)

    # Direct calls: sparge.attention on each block's own q, k, v (from the reference run) with that
    # block's settings, returning the achieved block sparsity; error against SDPA on the same q, k, v.
    print("[dit_block] direct sparge.attention(..., return_sparsity=True) per block ...")
    layers = []
    with torch.inference_mode():
        for i, blk in enumerate(model.blocks):
            q, k, v = blk.attn.qkv(attn_inputs[i])
            o_ref = F.scaled_dot_product_attention(q, k, v)
            o, sparsity = sparge.attention(q, k, v, **plans[f"blocks.{i}"], return_sparsity=True)
            c, l1 = compare(o, o_ref)
            layers.append(dict(layer=f"blocks.{i}", settings=plans[f"blocks.{i}"], sparsity=float(sparsity),
                               cos=c, rel_l1=l1, calls=per_layer.get(f"blocks.{i}", [])))

    # The result tables.
    print()
    header = f"{'block':<10} {'settings':<28} {'sparge calls':>12} {'sparsity':>9} {'cos(attn)':>10} {'relL1(attn)':>12}"
    print(header)
    print("-" * len(header))
    for r in layers:
        print(f"{r['layer']:<10} {describe(r['settings']):<28} {r['calls'].count('sparge'):>12} {r['sparsity']:>9.3f} "
              f"{r['cos']:>10.5f} {r['rel_l1']:>12.4f}")
    print()
    header = f"{'run':<16} {'s/forward':>10} {'cos(output)':>12} {'relL1(output)':>14}"
    print(header)
    print("-" * len(header))
    print(f"{'sdpa':<16} {t_sdpa:>10.3f} {1.0:>12.5f} {0.0:>14.4f}")
    print(f"{'sparge (mixed)':<16} {t_sparge:>10.3f} {cos:>12.5f} {rel_l1:>14.4f}")
    print("\n(sparsity = 1 - kept / allowed key blocks; errors are against PyTorch SDPA)")
    if device.type == "cpu":
        print("(on CPU sparge runs its reference backend, written for clarity, not speed: compare times on a GPU)")
    return {"device": str(device), "dtype": str(dtype), "t_sdpa": t_sdpa, "t_sparge": t_sparge, "log": summary,
            "cos": cos, "rel_l1": rel_l1, "layers": layers}


if __name__ == "__main__":
    main()
