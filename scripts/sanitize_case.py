"""A small CUDA problem through every sparge kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python3 scripts/sanitize_case.py
"""

import torch

import sparge
from sparge.testing import structured_qkv


def main() -> None:
    q, k, v = structured_qkv(1, 4, 2, 200, 333, 64, dtype=torch.float16, device="cuda", seed=1)
    for kwargs in ({"mode": "dense"}, {"topk": 0.5}, {"mode": "cdf", "cdfthreshd": 0.9},
                   {"topk": 0.5, "is_causal": True}, {"mode": "dense", "pv_precision": "fp16"}):
        o, lse = sparge.attention(q, k, v, return_lse=True, **kwargs)
        assert torch.isfinite(o).all() and torch.isfinite(lse).all(), kwargs
    torch.cuda.synchronize()
    print("sanitize case: ok")


if __name__ == "__main__":
    main()
