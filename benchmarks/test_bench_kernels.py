"""Kernel micro-benchmarks under pytest-benchmark: ours beside the stock PyTorch op, grouped per shape.

    pytest benchmarks/ --benchmark-only [--benchmark-json=out.json]

Needs a CUDA GPU (skipped with the reason on a CPU). Each timed call ends with a device
synchronize, so a round is the kernel's wall time. bench_kernels.py stays the JSON writer
for the README (do_bench medians, ceilings, sweeps); this is the quick interactive view.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fast3r_kernels import attention, layer_norm, patch_embed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")
BF16 = torch.bfloat16


def timed(benchmark, fn) -> None:
    fn()  # compile and warm up outside the timing
    torch.cuda.synchronize()
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)


ATTENTION = {"encoder_224": (1500, 196), "encoder_512": (256, 768), "fusion_16k": (1, 16384)}


@pytest.mark.parametrize("impl", ["ours", "sdpa_flash", "sdpa_cudnn"])
@pytest.mark.parametrize("shape", list(ATTENTION))
def test_attention_forward(benchmark, shape, impl):
    b, l = ATTENTION[shape]
    benchmark.group = f"attention fwd {shape} {b}x16x{l}x64"
    qkv = torch.randn(b, l, 3, 16, 64, device="cuda", dtype=BF16)
    if impl == "ours":
        q, k, v = qkv.unbind(2)
        timed(benchmark, lambda: attention(q, k, v, layout="BLHD"))
        return
    backend = {"sdpa_flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
               "sdpa_cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION}[impl]
    q, k, v = qkv.transpose(1, 3).unbind(2)

    def stock():
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    timed(benchmark, stock)


@pytest.mark.parametrize("impl", ["ours", "torch"])
@pytest.mark.parametrize("residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_layer_norm(benchmark, residual, impl):
    benchmark.group = f"{'add+' if residual else ''}layer_norm 294000x1024 bf16"
    x, h = (torch.randn(294_000, 1024, device="cuda", dtype=BF16) for _ in range(2))
    w, b = torch.randn(1024, device="cuda", dtype=BF16), torch.randn(1024, device="cuda", dtype=BF16)
    if impl == "ours":
        timed(benchmark, lambda: layer_norm(x, w, b, 1e-6, residual=h if residual else None))
    elif residual:
        timed(benchmark, lambda: F.layer_norm(x + h, (1024,), w, b, 1e-6))
    else:
        timed(benchmark, lambda: F.layer_norm(x, (1024,), w, b, 1e-6))


@pytest.mark.parametrize("impl", ["ours", "conv2d", "reshape_matmul"])
def test_patch_embed(benchmark, impl):
    benchmark.group = "patch_embed 1500x3x224x224 -> 1024 bf16"
    images = (torch.rand(1500, 3, 224, 224, device="cuda") * 2 - 1).to(BF16)
    w, b = torch.randn(1024, 3, 16, 16, device="cuda", dtype=BF16), torch.randn(1024, device="cuda", dtype=BF16)
    if impl == "ours":
        timed(benchmark, lambda: patch_embed(images, w, b, 16))
    elif impl == "conv2d":
        timed(benchmark, lambda: F.conv2d(images, w, b, stride=16).flatten(2).transpose(1, 2))
    else:
        def reshape_matmul():
            patches = images.view(1500, 3, 14, 16, 14, 16).permute(0, 2, 4, 1, 3, 5).reshape(-1, 768)
            return (patches @ w.view(1024, 768).T + b).view(1500, 196, 1024)

        timed(benchmark, reshape_matmul)
