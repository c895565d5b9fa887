"""Per-view ViT encoder: patch embedding, RoPE-2D transformer blocks, final LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from .backends import Ops, Rope
from .config import Fast3RConfig
from .layers import Block, LayerNorm, PatchEmbed

ENCODER_NORM_EPS = 1e-6


class Encoder(nn.Module):
    def __init__(self, cfg: Fast3RConfig, ops: Ops):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.enc_dim, ops)
        self.rope_base = cfg.rope_base
        self.enc_blocks = nn.ModuleList(
            Block(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio, ENCODER_NORM_EPS, ops, rope=True)
            for _ in range(cfg.enc_depth)
        )
        self.enc_norm = LayerNorm(cfg.enc_dim, ENCODER_NORM_EPS, ops)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) of one size -> tokens (N, H/16 * W/16, enc_dim)."""
        x, positions = self.patch_embed(images)
        grid = (images.shape[-2] // self.patch_embed.patch_size, images.shape[-1] // self.patch_embed.patch_size)
        rope = Rope(positions, max(grid), self.rope_base)  # the grid bounds the positions: no device sync
        for block in self.enc_blocks:
            x = block(x, rope)
        return self.enc_norm(x)
