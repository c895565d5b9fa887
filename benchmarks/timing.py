"""Timing helpers shared by the benchmarks: device-synced medians, ceilings, GPU naming."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, *, warmup: int = 2, repeats: int = 10, max_seconds: float = 20.0) -> float:
    """Median wall time of ``fn()`` in ms, timed with CUDA events after ``warmup`` calls.

    Stops early once ``max_seconds`` of timed calls have run (very long kernels get fewer
    repeats, never fewer than 3).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start_all = time.perf_counter()
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return statistics.median(times)


def gpu_name(name: str | None = None) -> str:
    """Short file-name-safe name of a device (default: the current one), e.g. 'h100' or 'h200'."""
    name = (name or torch.cuda.get_device_name()).lower()
    for short in ("h100", "h200", "a100", "b200", "l40s"):
        if short in name:
            return short
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def measure_ceilings() -> dict[str, float]:
    """Measured bf16 matmul TFLOP/s (8192^3, random data) and device-to-device copy GB/s (read + write)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b, warmup=3, repeats=10)
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), warmup=3, repeats=20)
    return {"matmul_bf16_tflops": 2 * n**3 / mm_ms / 1e9, "copy_gbs": 2 * src.nbytes / copy_ms / 1e6}
