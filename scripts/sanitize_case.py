"""A small CUDA problem through every sparge kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python3 scripts/sanitize_case.py
"""

import os

import torch

import sparge
from sparge.testing import structured_qkv


def main() -> None:
    # Lk = 333: the two-launch quantize path, TopK ranked in one warp, 6 (dense) or 3 (topk 0.5) kept
    # blocks for the wgmma kernel's tiles of four blocks at D = 64. Lk = 2420, D = 128: the
    # five-launch path, TopK by radix selection over 38 blocks, an odd count of kept blocks
    # (19 at topk 0.5) for the wgmma kernel's pairs of blocks. Then again with the persistent wgmma
    # kernel on one CTA, which runs every work tile (8 and 4) one after the other.
    run_cases()
    predict_case()
    os.environ["SPARGE_WGMMA_CTAS"] = "1"
    run_cases()
    torch.cuda.synchronize()
    print("sanitize case: ok")


def run_cases() -> None:
    for shape in ((1, 4, 2, 200, 333, 64), (1, 2, 1, 256, 2420, 128)):
        q, k, v = structured_qkv(*shape, dtype=torch.float16, device="cuda", seed=1)
        for kwargs in ({"mode": "dense"}, {"topk": 0.5}, {"mode": "cdf", "cdfthreshd": 0.9},
                       {"topk": 0.5, "is_causal": True}, {"mode": "dense", "pv_precision": "fp16"}):
            o, lse = sparge.attention(q, k, v, return_lse=True, **kwargs)
            assert torch.isfinite(o).all() and torch.isfinite(lse).all(), (shape, kwargs)


def predict_case() -> None:
    # Q blocks x query heads x K blocks = 65536: score_kernel before the one-warp TopK selection
    # and the one-CTA CDF selection. Prediction only: attention at this size takes minutes under
    # the tools.
    q, k, v = structured_qkv(1, 16, 2, 2048, 16384, 64, dtype=torch.float16, device="cuda", seed=1)
    quantized = sparge.quantize(q, k, v)
    for kwargs in ({"topk": 0.5}, {"topk": 0.5, "block_score": "mean"}, {"mode": "cdf", "cdfthreshd": 0.9}):
        prediction = sparge.predict(quantized, **kwargs)
        assert int(prediction.count.min()) >= 1, kwargs


if __name__ == "__main__":
    main()
