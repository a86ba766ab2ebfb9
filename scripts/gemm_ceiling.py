"""Measured matrix-unit ceilings of this GPU (METHOD.md: measure the ceilings, don't quote them):
fp16 (torch.matmul), fp8 e4m3 (torch._scaled_mm) and int8 (torch._int_mm) on 8192³ random
operands, median of 20 timed runs after 5 warm-ups, CUDA events.

    python3 scripts/gemm_ceiling.py
"""

import statistics

import torch


def tflops(fn, flops: float) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return flops / statistics.median(times) / 1e12


def main() -> None:
    n = 8192
    flops = 2.0 * n**3
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    rates = {"fp16 matmul": tflops(lambda: a @ b, flops)}
    a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    rates["fp8 e4m3 _scaled_mm"] = tflops(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.float16), flops)
    ai = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8).t().contiguous().t()
    rates["int8 _int_mm"] = tflops(lambda: torch._int_mm(ai, bi), flops)
    for name, rate in rates.items():
        print(f"{name:22s} {rate:8.1f} TFLOP/s")


if __name__ == "__main__":
    main()
