"""DPT heads: four token layers -> dense per-pixel 3-D points and confidence.

The graph is DPT's (reassemble, refine, fuse) as configured in the released model;
submodule names match the official checkpoint (``dpt.scratch.refinenet1`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .backends import Ops
from .config import Fast3RConfig


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Refine the coarser path (plus a skip connection), upsample x2, project."""

    def __init__(self, features: int, ops: Ops):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.upsample = Upsample(2, ops)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        return self.out_conv(self.upsample(self.resConfUnit2(x)))


class Upsample(nn.Module):
    """Bilinear upsampling with aligned corners (DPT's), on the backend's op; no parameters."""

    def __init__(self, scale_factor: float, ops: Ops):
        super().__init__()
        self.scale_factor = scale_factor
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.upsample(x, self.scale_factor)


class DPT(nn.Module):
    def __init__(self, token_dims: tuple[int, ...], layer_dims: tuple[int, ...], features: int, patch_size: int,
                 ops: Ops):
        super().__init__()
        self.act_postprocess = nn.ModuleList([
            # Reassemble the 1/16 token grid at 1/4, 1/8, 1/16 and 1/32 of the image.
            nn.Sequential(nn.Conv2d(token_dims[0], layer_dims[0], 1), nn.ConvTranspose2d(layer_dims[0], layer_dims[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(token_dims[1], layer_dims[1], 1), nn.ConvTranspose2d(layer_dims[1], layer_dims[1], 2, stride=2)),
            nn.Sequential(nn.Conv2d(token_dims[2], layer_dims[2], 1)),
            nn.Sequential(nn.Conv2d(token_dims[3], layer_dims[3], 1), nn.Conv2d(layer_dims[3], layer_dims[3], 3, stride=2, padding=1)),
        ])
        scratch = nn.Module()
        for i, dim in enumerate(layer_dims, start=1):
            setattr(scratch, f"layer{i}_rn", nn.Conv2d(dim, features, 3, padding=1, bias=False))
        # The official checkpoint lists these convs twice: as layerN_rn and as layer_rn.N-1.
        scratch.layer_rn = nn.ModuleList(getattr(scratch, f"layer{i}_rn") for i in range(1, 5))
        for i in range(1, 5):
            setattr(scratch, f"refinenet{i}", FeatureFusionBlock(features, ops))
        self.scratch = scratch
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            Upsample(patch_size / 8, ops),
            nn.Conv2d(features // 2, features // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(features // 2, 4, 1),
        )

    def forward(self, layers: list[torch.Tensor], grid_hw: tuple[int, int]) -> torch.Tensor:
        """layers: 4 x (B, gh*gw, C_i) tokens of one grid size -> (B, 4, 16*gh, 16*gw)."""
        maps = [rearrange(t, "b (gh gw) c -> b c gh gw", gh=grid_hw[0], gw=grid_hw[1]) for t in layers]
        maps = [rn(post(m)) for m, post, rn in zip(maps, self.act_postprocess, self.scratch.layer_rn)]
        path = self.scratch.refinenet4(maps[3])[:, :, : maps[2].shape[2], : maps[2].shape[3]]
        path = self.scratch.refinenet3(path, maps[2])
        path = self.scratch.refinenet2(path, maps[1])
        path = self.scratch.refinenet1(path, maps[0])
        return self.head(path)


class DPTHead(nn.Module):
    """One pointmap head: DPT, then the activations that turn raw channels into points and confidence."""

    def __init__(self, cfg: Fast3RConfig, ops: Ops):
        super().__init__()
        token_dims = (cfg.enc_dim, cfg.fusion_dim, cfg.fusion_dim, cfg.fusion_dim)
        self.dpt = DPT(token_dims, cfg.head_layer_dims, cfg.head_feature_dim, cfg.patch_size, ops)

    def forward(self, layers: list[torch.Tensor], grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> points (B, H, W, 3) and confidence (B, H, W), both fp32."""
        return pointmap_activation(self.dpt(layers, grid_hw))


def pointmap_activation(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (B, 4, H, W) -> points xyz/|xyz| * expm1(|xyz|) and confidence 1 + exp(c), in fp32."""
    fmap = rearrange(raw.float(), "b c h w -> b h w c")
    xyz = fmap[..., :3]
    dist = xyz.norm(dim=-1, keepdim=True)
    points = xyz / dist.clamp(min=1e-8) * torch.expm1(dist)
    return points, 1.0 + fmap[..., 3].exp()
