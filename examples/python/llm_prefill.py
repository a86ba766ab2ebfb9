#!/usr/bin/env python3
"""Long-prompt prefill of a small decoder-only LLM, with attention routed to sparge.

The model is built here (random init, no downloads): ``--layers`` pre-norm decoder layers with
grouped-query attention (8 query heads sharing 2 key/value heads, head dim 64, causal, optional
RoPE) and a SwiGLU MLP. The layers call ``torch.nn.functional.scaled_dot_product_attention``, as
Hugging Face / vLLM style models do, so sparge can take the attention over without touching the
model code. One prefill of ``--seq-len`` tokens runs three ways:

1. plain PyTorch SDPA (the reference);
2. inside ``with sparge.patch.sdpa(mode="dense")``: sparge's quantized (INT8 QK, FP8 PV) dense attention;
3. inside ``with sparge.patch.sdpa(topk=0.5)``: the same, keeping half of the key blocks of each query block.

and prints the time per forward, how many SDPA calls sparge took (the routing log), and how close
the final hidden states and logits are to the SDPA run.

Why the model is not purely random: a random-init transformer on random tokens attends almost
uniformly (every block matters the same), which says nothing about sparse attention. Trained LLMs
have local, position-driven heads. We mimic them by (a) adding a position-dependent embedding
(random Fourier features of the position, whose dot product decays with distance) and (b) tying
each query head's projection to its key/value head's key projection (times a per-head gain), so
``q_r · k_c`` follows the positional kernel and attention concentrates near the diagonal, with a
different sharpness per head. This is the same idea as ``sparge.testing.structured_qkv``.

    python examples/python/llm_prefill.py                   # CPU-sized defaults (L=2048)
    python examples/python/llm_prefill.py --device cuda --seq-len 32768 --layers 4
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


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [B, H, L, D] (rotate-half convention, as in Llama)."""
    _, _, length, dim = x.shape
    inv_freq = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angle = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(x.dtype), torch.cat([angle.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, use_rope: bool, gen: torch.Generator):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.use_rope = heads, kv_heads, head_dim, use_rope
        group = heads // kv_heads
        # Key projection: one random [head_dim, d_model] matrix per key/value head.
        wk = torch.randn(kv_heads, head_dim, d_model, generator=gen) / math.sqrt(d_model)
        # Query projection: the key projection of the head's group times a per-head gain (how sharp
        # that head attends), plus a little noise: the "positional heads" described above.
        gain = 0.6 + 1.0 * torch.rand(heads, 1, 1, generator=gen)
        wq = gain * wk.repeat_interleave(group, dim=0) + 0.02 * torch.randn(heads, head_dim, d_model, generator=gen)
        self.q = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d_model, bias=False)
        with torch.no_grad():
            self.q.weight.copy_(wq.reshape(-1, d_model))
            self.k.weight.copy_(wk.reshape(-1, d_model))
            self.v.weight.copy_(torch.randn(self.v.weight.shape, generator=gen) / math.sqrt(d_model))
            self.o.weight.copy_(torch.randn(self.o.weight.shape, generator=gen) / math.sqrt(heads * head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)  # [B, Hq, L, D]
        k = self.k(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.v(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = rope(q), rope(k)
        # The call sparge.patch.sdpa reroutes: causal, GQA (enable_gqa), no mask, no dropout.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, length, -1))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, use_rope: bool, gen: torch.Generator):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.attn = Attention(d_model, heads, kv_heads, head_dim, use_rope, gen)
        hidden = 2 * d_model
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        with torch.no_grad():
            self.gate_up.weight.copy_(torch.randn(self.gate_up.weight.shape, generator=gen) / math.sqrt(d_model))
            self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=gen) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLLM(nn.Module):
    def __init__(self, vocab: int, layers: int, heads: int, kv_heads: int, head_dim: int, use_rope: bool, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        d_model = heads * head_dim
        self.embed = nn.Embedding(vocab, d_model)
        with torch.no_grad():
            self.embed.weight.copy_(0.3 * torch.randn(vocab, d_model, generator=gen))
        # Random Fourier features of the position: cos/sin(pos * omega) with omega ~ N(0, 1/l^2),
        # length scales l spread log-uniformly over [8, 512] tokens. emb(r) . emb(c) then is a
        # mixture of Gaussian kernels of r - c: nearby positions look alike, far ones do not.
        scales = torch.exp(torch.empty(d_model // 2).uniform_(math.log(8), math.log(512), generator=gen))
        self.register_buffer("omega", torch.randn(d_model // 2, generator=gen) / scales)
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, kv_heads, head_dim, use_rope, gen) for _ in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(vocab, d_model, generator=gen) / math.sqrt(d_model))

    def positional(self, length: int, device, dtype) -> torch.Tensor:
        phase = torch.arange(length, device=device, dtype=torch.float32)[:, None] * self.omega[None, :]
        return torch.cat([phase.cos(), phase.sin()], dim=-1).to(dtype)  # [L, d_model], unit-size entries

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens) + self.positional(tokens.size(1), tokens.device, self.embed.weight.dtype)
        for layer in self.layers:
            x = layer(x)
        hidden = self.norm(x)
        return hidden, self.lm_head(hidden)


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
    """(cosine similarity, relative L1 error) of x against ref, in fp32."""
    x, ref = x.double().flatten(), ref.double().flatten()  # fp64: exact 1.0 for identical tensors
    cos = F.cosine_similarity(x, ref, dim=0).item()
    rel_l1 = ((x - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30)).item()
    return cos, rel_l1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--seq-len", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--no-rope", dest="rope", action="store_false", help="no rotary embedding")
    p.add_argument("--topk", type=float, default=0.5, help="fraction of key blocks kept in the sparse run")
    p.add_argument("--min-seq-len", type=int, default=1024,
                   help="SDPA calls shorter than this keep PyTorch's SDPA (sparge.patch default 1024)")
    p.add_argument("--reps", type=int, default=2, help="timed forwards per run (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- the example -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = {"auto": torch.float32 if device.type == "cpu" else torch.bfloat16,
             "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    print(f"[llm_prefill] device={device} dtype={str(dtype).replace('torch.', '')} L={args.seq_len} batch={args.batch} "
          f"layers={args.layers} heads={args.heads}/{args.kv_heads} (GQA) head_dim={args.head_dim} rope={args.rope}")

    print("[llm_prefill] building the model (random init + positional embedding) ...")
    model = TinyLLM(args.vocab, args.layers, args.heads, args.kv_heads, args.head_dim, args.rope, args.seed)
    model = model.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen).to(device)

    # Three runs of the same prefill. sparge.patch.sdpa replaces F.scaled_dot_product_attention
    # while the `with` block is active and logs, per call, whether sparge or the original took it.
    runs = [
        ("sdpa", None),
        ("sparge dense", dict(mode="dense")),
        (f"sparge topk={args.topk:g}", dict(topk=args.topk)),
    ]
    results, ref = [], None
    for name, settings in runs:
        print(f"[llm_prefill] running {name} ({args.reps} timed forwards after a warm-up) ...")
        with torch.inference_mode():  # sparge is forward-only; inference mode also skips autograd
            if settings is None:
                (hidden, logits), seconds = timed(lambda: model(tokens), device, args.reps)
                summary = None
            else:
                with sparge.patch.sdpa(min_seq_len=args.min_seq_len, **settings) as log:
                    (hidden, logits), seconds = timed(lambda: model(tokens), device, args.reps)
                summary = log.summary()  # over the warm-up and the timed forwards
        if ref is None:
            ref = (hidden, logits)
        cos_h, l1_h = compare(hidden, ref[0])
        cos_l, l1_l = compare(logits, ref[1])
        top1 = (logits.argmax(-1) == ref[1].argmax(-1)).float().mean().item()
        results.append(dict(name=name, seconds=seconds, log=summary, cos_hidden=cos_h, rel_l1_hidden=l1_h,
                            cos_logits=cos_l, rel_l1_logits=l1_l, top1_agree=top1))
        if summary is not None:
            print(f"[llm_prefill]   routing log: {summary['sparge']} calls to sparge, {summary['fallback']} "
                  f"fallbacks", summary["by_reason"] or "")

    # The result table.
    print()
    header = f"{'run':<18} {'s/forward':>10} {'sparge':>7} {'fallbk':>7} {'cos(hidden)':>12} {'relL1(hidden)':>14} " \
             f"{'cos(logits)':>12} {'relL1(logits)':>14} {'top1 agree':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        calls = ("-", "-") if r["log"] is None else (r["log"]["sparge"], r["log"]["fallback"])
        print(f"{r['name']:<18} {r['seconds']:>10.3f} {calls[0]:>7} {calls[1]:>7} {r['cos_hidden']:>12.5f} "
              f"{r['rel_l1_hidden']:>14.4f} {r['cos_logits']:>12.5f} {r['rel_l1_logits']:>14.4f} {r['top1_agree']:>11.3f}")
    print("\n(sparge / fallbk: SDPA calls taken by sparge / left to PyTorch over all forwards of the run; "
          "errors are against the sdpa run)")
    if device.type == "cpu":
        print("(on CPU sparge runs its reference backend, written for clarity, not speed: compare times on a GPU)")
    return {"device": str(device), "dtype": str(dtype), "runs": results}


if __name__ == "__main__":
    main()
