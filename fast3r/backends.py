"""The ops Fast3R's layers call, per backend: the one place that knows both "torch" and "triton".

A model is built with one backend (``Fast3R(cfg, backend=...)``); each layer keeps the
``Ops`` it was given and calls them, so no forward pass branches on the backend. Both
backends take the same facts from ``fast3r_kernels`` (default softmax scale, RoPE-2D
angle tables, uint8 normalization, supported head dims), so they cannot drift apart.

Layouts: attention takes q, k, v as (B, L, H, D) views of the packed qkv projection and
returns (B, L, H, D); ``attention_with_lse`` also returns the row log-sum-exp (B, H, L),
fp32, which context parallelism merges across key shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fast3r_kernels import attention as triton_attention
from fast3r_kernels import layer_norm as triton_layer_norm
from fast3r_kernels import patch_embed as triton_patch_embed
from fast3r_kernels import tuning
from fast3r_kernels import upsample_bilinear as triton_upsample
from fast3r_kernels._config import device_guard, interpreting
from fast3r_kernels.attention import HEAD_DIMS, ROPE_HEAD_DIMS, attention_forward, rope_rotate, rope_tables
from fast3r_kernels.layernorm import layer_norm_forward
from fast3r_kernels.patch_embed import normalize_uint8, patch_embed_forward
from fast3r_kernels.upsample import scaled_size, upsample_forward

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Rope:
    """RoPE-2D inputs of one attention call: (B, L, 2) int (y, x) positions in [0, num_pos), angle base."""

    positions: torch.Tensor
    num_pos: int
    base: float


@dataclass(frozen=True)
class Ops:
    """What a backend provides to the layers (signatures in the module docstring)."""

    name: str
    attention: Callable[..., torch.Tensor]
    attention_with_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    layer_norm: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    patch_embed: Callable[..., torch.Tensor]
    upsample: Callable[..., torch.Tensor]

    def check_attention(self, head_dim: int, rope: bool) -> None:
        """Refuse, when the model is built, a head dim this backend cannot run."""
        if self.name != "triton":
            return
        supported = ROPE_HEAD_DIMS if rope else HEAD_DIMS
        if head_dim not in supported:
            raise ValueError(f"the triton backend runs {'RoPE ' if rope else ''}attention at head dims {supported}, "
                             f"not {head_dim}; build this config with backend='torch'")


def get_ops(backend: str) -> Ops:
    if backend == "torch":
        return TORCH
    if backend == "triton":
        return TRITON
    raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")


# ----------------------------------------------------------------------------- torch
def rotate_rope(t: torch.Tensor, rope: Rope) -> torch.Tensor:
    """RoPE-2D on (B, H, L, D) with the kernels' own tables and rotation (fp32), back in t's dtype."""
    cos, sin = rope_tables(rope.num_pos, t.shape[-1], rope.base, t.device)
    return rope_rotate(t, rope.positions, cos, sin).to(t.dtype)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    rope: Rope | None = None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = rotate_rope(q, rope), rotate_rope(k, rope)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def torch_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused attention with its row log-sum-exp: BLHD in, (out (B, L, H, D), lse (B, H, L) fp32) out.

    CUDA: cuDNN attention for fp16/bf16, the memory-efficient kernel for fp32 (cuDNN has no
    fp32 attention); CPU: the flash kernel for CPU (fp32 accumulation, bounded tiles). All three
    read BLHD views (also strided views of a packed qkv) in place via a transpose to BHLD.
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    length = q.shape[1]
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, scale=scale)[:2]
        # cuDNN returns lse as (B, H, L, 1); the efficient kernel pads L to a multiple of 32.
        return out.transpose(1, 2), lse.flatten(2)[..., :length].float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=scale)
    return out.transpose(1, 2), lse.float()


def torch_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                     residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """LN(x), or (x + residual, LN(x + residual)); the sum goes into ``residual_out`` when given."""
    if residual is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    total = torch.add(x, residual, out=residual_out) if residual_out is not None else x + residual
    return total, F.layer_norm(total, x.shape[-1:], weight, bias, eps)


def torch_patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, 3, H, W) floats in [-1, 1] or uint8 -> (N, T, D) tokens, with a stride = kernel conv."""
    if images.dtype == torch.uint8:
        images = normalize_uint8(images)
    x = F.conv2d(images.to(weight.dtype), weight, bias, stride=patch_size)
    return x.flatten(2).transpose(1, 2).contiguous()


def torch_upsample(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """(N, C, H, W) -> bilinear, aligned corners (DPT's), ``floor(H * scale_factor)`` x ``floor(W * scale_factor)``.

    On the CPU through ``fast3r::upsample_bilinear_cpu``, which Inductor cannot see into: compiled on
    the CPU (torch 2.13), the DPT heads built on ``F.interpolate`` returned all-zero gradients for
    every parameter and input of the heads, while the forward was right (aot_eager was right too;
    tests/test_compile.py holds the case). With aligned corners the size alone fixes the result.
    """
    if x.device.type == "cpu":
        return torch.ops.fast3r.upsample_bilinear_cpu(x, *scaled_size(x, scale_factor))
    return F.interpolate(x, scale_factor=scale_factor, mode="bilinear", align_corners=True)


@torch.library.custom_op("fast3r::upsample_bilinear_cpu", mutates_args=(), device_types="cpu")
def _upsample_bilinear_cpu(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True).contiguous()


@_upsample_bilinear_cpu.register_fake
def _(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], height, width)


@torch.library.custom_op("fast3r::upsample_bilinear_cpu_backward", mutates_args=(), device_types="cpu")
def _upsample_bilinear_cpu_backward_op(grad: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The gradient of an (height, width) input from the output's gradient."""
    n, c = grad.shape[:2]
    return torch.ops.aten.upsample_bilinear2d_backward(grad.contiguous(), list(grad.shape[-2:]), [n, c, height, width],
                                                       True)


@_upsample_bilinear_cpu_backward_op.register_fake
def _(grad: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], grad.shape[1], height, width)


def _upsample_bilinear_cpu_setup(ctx, inputs, output) -> None:
    ctx.input_hw = tuple(inputs[0].shape[-2:])


def _upsample_bilinear_cpu_backward(ctx, grad: torch.Tensor):
    return torch.ops.fast3r.upsample_bilinear_cpu_backward(grad, *ctx.input_hw), None, None


_upsample_bilinear_cpu.register_autograd(_upsample_bilinear_cpu_backward, setup_context=_upsample_bilinear_cpu_setup)


TORCH = Ops("torch", torch_attention, torch_attention_with_lse, torch_layer_norm, torch_patch_embed, torch_upsample)


# ---------------------------------------------------------------------------- triton
def _on_kernel_device(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors (or anywhere under TRITON_INTERPRET); elsewhere the PyTorch op runs."""
    return t.is_cuda or interpreting()


def _inference(*tensors: torch.Tensor) -> bool:
    """Eager, no autograd and no autocast: the layers may call the launchers directly (their inputs are
    well-formed), skipping the custom op's dispatch. torch.compile and export always see the ops."""
    return not torch.compiler.is_compiling() \
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) \
        and not torch.is_autocast_enabled(tensors[0].device.type)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    rope: Rope | None = None) -> torch.Tensor:
    """Our kernel wherever it wins: with RoPE (fused) and on long sequences; stock SDPA below that (tuning.py)."""
    short = rope is None and k.shape[1] < tuning.FUSED_ATTENTION_MIN_KEYS and q.is_cuda
    if short or not _on_kernel_device(q):
        return torch_attention(q, k, v, scale, rope)
    if _inference(q, k, v):  # skips the autograd Function and the argument checks: launch cost at small sizes
        tables = None if rope is None else (rope.positions, *rope_tables(rope.num_pos, q.shape[-1], rope.base,
                                                                          q.device))
        with device_guard(q.device):
            return attention_forward(q, k, v, scale, "BLHD", tables)[0]
    if rope is None:
        return triton_attention(q, k, v, scale=scale, layout="BLHD")
    return triton_attention(q, k, v, scale=scale, layout="BLHD", rope_pos=rope.positions, rope_base=rope.base,
                            rope_num_pos=rope.num_pos)


def fused_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not _on_kernel_device(q):
        return torch_attention_with_lse(q, k, v, scale)
    return triton_attention(q, k, v, scale=scale, layout="BLHD", return_lse=True)


def fused_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                     residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """The LayerNorm kernel; with ``residual`` it also adds the residual in the same pass."""
    if not _on_kernel_device(x):
        return torch_layer_norm(x, weight, bias, eps, residual, residual_out)
    if not _inference(*(t for t in (x, weight, bias, residual) if t is not None)):
        out = triton_layer_norm(x, weight, bias, eps, residual=residual)
        if residual_out is None or residual is None:
            return out
        total, y = out
        return residual_out.copy_(total), y
    # Inference: x + residual goes into the caller's buffer (no new tensor), no autograd bookkeeping.
    with device_guard(x.device):
        y, total, _, _ = layer_norm_forward(x, weight, bias, eps, residual, residual_out=residual_out)
    return y if residual is None else (total, y)


def fused_patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int) -> torch.Tensor:
    if not _on_kernel_device(images):
        return torch_patch_embed(images, weight, bias, patch_size)
    if _inference(weight, bias):
        with device_guard(images.device):
            return patch_embed_forward(images if images.dtype == torch.uint8 else images.to(weight.dtype), weight,
                                       bias, patch_size)
    return triton_patch_embed(images, weight, bias, patch_size)


def fused_upsample(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    if not _on_kernel_device(x):
        return torch_upsample(x, scale_factor)
    if _inference(x) and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        with device_guard(x.device):
            return upsample_forward(x, scaled_size(x, scale_factor))
    return triton_upsample(x, scale_factor)


TRITON = Ops("triton", fused_attention, fused_attention_with_lse, fused_layer_norm, fused_patch_embed, fused_upsample)
