"""Numerical precision of a training step: what runs in bf16, what stays fp32.

- ``bf16-mixed``: fp32 master weights (and AdamW state); the forward runs under
  ``torch.autocast(dtype=torch.bfloat16)``, so matmuls and attention take bf16 copies of the
  weights while LayerNorm, the head activations and the loss stay fp32.
- ``official``: as the official training runs: everything fp32 except the attention itself, whose
  q, k, v are cast to bf16 in every encoder and fusion block and whose output is cast back to fp32
  (the official blocks wrap SDPA in a bf16 autocast). Applied by giving each ``Attention`` module an
  ``Ops`` whose attention casts; the layers are not edited. One difference: the official code rotates
  q and k by RoPE in fp32 before the cast; here the backend rotates the bf16-rounded q and k (the
  Triton kernel fuses RoPE into the attention), which changes q and k by at most one bf16 rounding.
- ``fp32``: nothing in reduced precision (CPU runs, gradient checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ..layers import Attention
from ..model import Fast3R
from .config import PRECISIONS


def apply_precision(model: Fast3R, precision: str) -> Callable[[], AbstractContextManager]:
    """Prepare ``model`` for ``precision``; -> a factory of the context the forward runs in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("training keeps fp32 master weights: build or load the model in fp32 "
                         f"(precision={precision!r} decides what runs in bf16)")
    if precision == "bf16-mixed":
        device_type = next(model.parameters()).device.type
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "official":
        for module in model.modules():
            if isinstance(module, Attention):
                module.ops = dataclasses.replace(module.ops, attention=_bf16_attention(module.ops.attention))
    return contextlib.nullcontext


def _bf16_attention(attention):
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rope=None) -> torch.Tensor:
        dtype = q.dtype
        out = attention(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), scale, rope)
        return out.to(dtype)

    return run
