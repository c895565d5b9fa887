"""Per-view ViT encoder: patch embedding, RoPE-2D transformer blocks, final LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from .config import Fast3RConfig
from .layers import Block, PatchEmbed, RoPE2D

ENCODER_NORM_EPS = 1e-6


class Encoder(nn.Module):
    def __init__(self, cfg: Fast3RConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.enc_dim)
        self.rope = RoPE2D(cfg.rope_base)
        self.enc_blocks = nn.ModuleList(
            Block(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio, ENCODER_NORM_EPS, rope=self.rope)
            for _ in range(cfg.enc_depth)
        )
        self.enc_norm = nn.LayerNorm(cfg.enc_dim, eps=ENCODER_NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) of one size -> tokens (N, H/16 * W/16, enc_dim)."""
        x, pos = self.patch_embed(images)
        for block in self.enc_blocks:
            x = block(x, pos)
        return self.enc_norm(x)
