"""Transformer building blocks of Fast3R, in plain PyTorch (the reference backend).

Module and attribute names follow the official checkpoint (``qkv``, ``proj``, ``norm1``,
``mlp.fc1`` ...), so state dicts load unchanged and ``fast3r_kernels.accelerate`` can
swap any of these modules for its fused Triton counterpart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Fusion blocks were trained on 20 views and run on ~137 at inference; in eval mode the
# official model sharpens their softmax by sqrt(ln 137 / ln 20) to compensate.
TRAIN_VIEWS, INFERENCE_VIEWS = 20, 137
FUSION_TEMPERATURE = math.sqrt(math.log(INFERENCE_VIEWS) / math.log(TRAIN_VIEWS))
MLP_TOKEN_CHUNK = 65536  # tokens per MLP pass in inference: 512 MiB of bf16 hidden activations at width 4096


def patch_positions(grid_h: int, grid_w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(grid_h * grid_w, 2) int64 (y, x) positions of the patch tokens, row-major."""
    ys = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    xs = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.stack([ys, xs], dim=-1)


class PatchEmbed(nn.Module):
    """16x16 stride-16 convolution from images to tokens, plus their (y, x) grid positions."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, 3, H, W) in [-1, 1], or uint8 RGB -> tokens (N, H/p * W/p, dim), positions (N, tokens, 2)."""
        n, _, h, w = images.shape
        check_patch_grid(h, w, self.patch_size)
        if images.dtype == torch.uint8:
            images = images / 127.5 - 1
        x = self.proj(images.to(self.proj.weight.dtype))
        pos = patch_positions(h // self.patch_size, w // self.patch_size, images.device)
        return x.flatten(2).transpose(1, 2).contiguous(), pos.expand(n, -1, -1)


def check_patch_grid(h: int, w: int, patch_size: int) -> None:
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise ValueError(
            f"image size {h}x{w} is not a positive multiple of the patch size {patch_size}; "
            f"resize or crop to e.g. {max(patch_size, h // patch_size * patch_size)}x"
            f"{max(patch_size, w // patch_size * patch_size)}"
        )


class RoPE2D(nn.Module):
    """2-D rotary embedding: the first half of each head rotates by the token's y, the second by its x.

    Each half uses the rotate-half convention with frequencies ``base ** (-2i / half)``;
    angles and rotation are computed in fp32 whatever the activation dtype.
    """

    def __init__(self, base: float = 100.0):
        super().__init__()
        self.base = base

    def cos_sin(self, half: int, n_pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, 2, device=device).float() / half))
        angles = torch.outer(torch.arange(n_pos, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens: (B, heads, L, head_dim); positions: (B, L, 2) int (y, x)."""
        half = tokens.shape[-1] // 2
        cos, sin = self.cos_sin(half, int(positions.max()) + 1, tokens.device)
        y, x = tokens.float().chunk(2, dim=-1)
        y = _rotate(y, cos[positions[..., 0]], sin[positions[..., 0]])
        x = _rotate(x, cos[positions[..., 1]], sin[positions[..., 1]])
        return torch.cat([y, x], dim=-1).to(tokens.dtype)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return t * cos[:, None] + rotated_half * sin[:, None]


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE-2D and the fusion eval-mode temperature."""

    def __init__(self, dim: int, num_heads: int, rope: RoPE2D | None = None, fusion_temperature: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.scale = head_dim**-0.5
        self.attn_bias_for_inference_enabled = fusion_temperature
        self.attn_bias_scale = head_dim**-0.5 * FUSION_TEMPERATURE

    def softmax_scale(self) -> float:
        if self.attn_bias_for_inference_enabled and not self.training:
            return self.attn_bias_scale
        return self.scale

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim); pos: (B, L, 2) token positions, used only with RoPE."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale())
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        eps: float,
        rope: RoPE2D | None = None,
        fusion_temperature: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, rope=rope, fusion_temperature=fusion_temperature)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = (x + self.attn(self.norm1(x), pos)).contiguous()
        if torch.is_grad_enabled():
            return x + self.mlp(self.norm2(x))
        # Without autograd, update the fresh residual in place, a band of tokens at a time, so the
        # 4x-wide MLP activation of a 300k-token fusion sequence never exists in full.
        for rows in x.view(-1, x.shape[-1]).split(MLP_TOKEN_CHUNK):
            rows += self.mlp(self.norm2(rows))
        return x
