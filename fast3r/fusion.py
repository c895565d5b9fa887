"""Fusion transformer: all-to-all attention over every token of every view.

Tokens of all views are concatenated into one sequence; each view's tokens get the
sin-cos embedding of its image index so the model can tell views apart.

Two inference plans (``fast3r.memory``): the fast one keeps the hook layers on the device and
returns them; the lean one runs every block in place on one token buffer and copies each hook
layer to host memory as it is produced (``fast3r.offload``), returning the host copies.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .backends import Ops
from .config import Fast3RConfig
from .layers import Block, InPlace, LayerNorm, token_chunks
from .offload import HostLayers

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
        self, tokens: torch.Tensor, view_sizes: list[int], image_ids: torch.Tensor, attend=None,
        lean: InPlace | None = None,
    ) -> list[torch.Tensor]:
        """Run the fusion blocks and return only the layers the heads read.

        tokens: (B, L, enc_dim), the views' encoder tokens concatenated (L = sum(view_sizes));
        image_ids: (B, num_views) image index of each view.
        attend: ``attend(q, k, v, scale)`` for the blocks' attention instead of the backend's
        (context parallelism passes one that spans every rank's tokens).
        lean: the lean plan's chunks (inference only): the hook layers come back in host memory
        (pinned when produced on a GPU), and ``tokens`` is overwritten (its buffer becomes the
        residual stream once it is on the host).
        Returns the 4 hook layers, each (B, L, dim); layer 0 is ``tokens`` itself (or its host copy).
        """
        if lean is not None:
            return self._forward_lean(tokens, view_sizes, image_ids, attend, lean)
        x = self.decoder_embed(tokens)
        self._embed(x, view_sizes, image_ids)
        kept = {0: tokens}
        depth = len(self.dec_blocks)
        for i, block in enumerate(self.dec_blocks, start=1):
            x = block(x, attend=attend)
            if i == depth:
                x = self.dec_norm(x)
            if i in self.hooks:
                kept[i] = x
        return [kept[i] for i in self.hooks]

    def _embed(self, x: torch.Tensor, view_sizes: list[int], image_ids: torch.Tensor) -> None:
        """x += each view's image-index embedding, in place; the embedding is freed on return."""
        _add_per_view(x, image_index_embedding(image_ids, self.decoder_embed.out_features).to(x.dtype), view_sizes)

    def _forward_lean(self, tokens: torch.Tensor, view_sizes: list[int], image_ids: torch.Tensor, attend,
                      plan: InPlace) -> list[torch.Tensor]:
        """One token buffer on the device for the whole stack: x, updated in place by every block.

        Each hook layer is copied to the host on a side stream as it is produced; the next block waits
        for a chunk's copy only where it overwrites that chunk (``plan.before_write``). The encoder
        tokens' buffer becomes x when the widths and dtypes agree (the released model), chunk by chunk
        once each chunk is on the host.
        """
        store = HostLayers(tokens.device, plan.queries)
        store.save(0, tokens)
        embed = self.decoder_embed
        if embed.in_features == embed.out_features and embed.weight.dtype == tokens.dtype:
            x = tokens
            for b, rows in token_chunks(*x.shape[:2], plan.queries):
                store.wait(0, b, rows.start, rows.stop)
                x[b, rows] = embed(x[b, rows])
        else:
            x = embed(tokens)
        self._embed(x, view_sizes, image_ids)
        depth, saved = len(self.dec_blocks), None
        for i, block in enumerate(self.dec_blocks, start=1):
            wait = None if saved is None else (lambda b, start, stop, layer=saved: store.wait(layer, b, start, stop))
            # A compiled block's .forward runs eagerly: the plan waits on copy events between its chunks
            run = block.forward if getattr(block, "_compiled_call_impl", None) is not None else block
            x = run(x, attend=attend, lean=dataclasses.replace(plan, before_write=wait))
            if i == depth:
                for b, rows in token_chunks(*x.shape[:2], plan.queries):
                    x[b, rows] = self.dec_norm(x[b, rows])
            saved = None
            if i in self.hooks:
                store.save(i, x)
                saved = i
        store.done()  # x's memory may be reused once this returns
        return [store.layers[i] for i in self.hooks]


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
