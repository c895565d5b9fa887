"""Fusion transformer: all-to-all attention over every token of every view.

Tokens of all views are concatenated into one sequence; each view's tokens get the
sin-cos embedding of its image index so the model can tell views apart.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import Ops
from .config import Fast3RConfig
from .layers import Block, LayerNorm

FUSION_BLOCK_EPS = 1e-5  # the official fusion blocks use nn.LayerNorm's default eps
FUSION_NORM_EPS = 1e-6
OFFICIAL_INDEX_ROWS = 1000  # rows of the official image-index table; indices past it use the same formula


def image_index_embedding(indices: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE 1-D sin-cos embedding of integer indices: (...,) -> (..., dim), fp32.

    Evaluated in fp64 like the official numpy table, so any index (also >= 1000)
    gets the value the official formula gives.
    """
    omega = torch.arange(dim // 2, dtype=torch.float64, device=indices.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = indices.to(torch.float64)[..., None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def sample_image_indices(batch: int, num_views: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official training-time scheme: view 0 -> 0, the others a random draw without replacement.

    Draws from 1..999 as the official model does; with more than 1000 views the range
    grows to 1..num_views-1 so every view still gets a distinct index.
    """
    pool = max(OFFICIAL_INDEX_ROWS - 1, num_views - 1)
    ids = torch.zeros(batch, num_views, dtype=torch.long)
    for b in range(batch):
        ids[b, 1:] = torch.randperm(pool, generator=generator)[: num_views - 1] + 1
    return ids


class FusionTransformer(nn.Module):
    def __init__(self, cfg: Fast3RConfig, ops: Ops):
        super().__init__()
        self.decoder_embed = nn.Linear(cfg.enc_dim, cfg.fusion_dim)
        self.dec_blocks = nn.ModuleList(
            Block(cfg.fusion_dim, cfg.fusion_heads, cfg.mlp_ratio, FUSION_BLOCK_EPS, ops, fusion_temperature=True)
            for _ in range(cfg.fusion_depth)
        )
        self.dec_norm = LayerNorm(cfg.fusion_dim, FUSION_NORM_EPS, ops)
        self.hooks = cfg.head_hooks

    def forward(
        self, tokens: torch.Tensor, view_sizes: list[int], image_ids: torch.Tensor, attend=None
    ) -> list[torch.Tensor]:
        """Run the fusion blocks and return only the layers the heads read.

        tokens: (B, L, enc_dim), the views' encoder tokens concatenated (L = sum(view_sizes));
        image_ids: (B, num_views) image index of each view.
        attend: ``attend(q, k, v, scale)`` for the blocks' attention instead of the backend's
        (context parallelism passes one that spans every rank's tokens).
        Returns the 4 hook layers, each (B, L, dim); layer 0 is ``tokens`` itself.
        """
        emb = image_index_embedding(image_ids, self.decoder_embed.out_features)
        x = self.decoder_embed(tokens)
        _add_per_view(x, emb.to(x.dtype), view_sizes)
        kept = [tokens]
        depth = len(self.dec_blocks)
        for i, block in enumerate(self.dec_blocks, start=1):
            x = block(x, attend=attend)
            if i == depth:
                x = self.dec_norm(x)
            if i in self.hooks:
                kept.append(x)
        return kept


def _add_per_view(x: torch.Tensor, emb: torch.Tensor, view_sizes: list[int]) -> None:
    """x[:, tokens of view i] += emb[:, i], in place; one broadcast add when views share a size."""
    if len(set(view_sizes)) == 1:
        b, _, d = x.shape
        x.view(b, len(view_sizes), view_sizes[0], d).add_(emb[:, :, None, :])
        return
    start = 0
    for i, n in enumerate(view_sizes):
        x[:, start : start + n] += emb[:, i, None, :]
        start += n
