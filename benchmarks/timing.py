"""Timing helpers shared by the benchmarks: medians from triton.testing.do_bench, ceilings, GPU naming."""

from __future__ import annotations

import torch
from triton.testing import do_bench


def median_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median time of ``fn()`` in ms: CUDA events around each call, L2 flushed in between (do_bench).

    ``rep_ms`` of calls are timed; kernels longer than that get a handful of repeats.
    """
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


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
    mm_ms = median_ms(lambda: a @ b)
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    return {"matmul_bf16_tflops": 2 * n**3 / mm_ms / 1e9, "copy_gbs": 2 * src.nbytes / copy_ms / 1e6}
