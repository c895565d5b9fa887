"""Synthetic scenes with known cameras: exact (or perturbed) pointmaps as Fast3R would predict them."""

from __future__ import annotations

import math

import torch


def random_rotation(max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """A rotation about a random axis by up to max_degrees, float64 (3, 3) (Rodrigues' formula)."""
    axis = torch.randn(3, generator=generator, dtype=torch.float64)
    axis /= axis.norm()
    angle = math.radians(max_degrees) * float(torch.rand(1, generator=generator, dtype=torch.float64))
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def synthetic_scene(n_views: int = 6, h: int = 48, w: int = 64, *, seed: int, focal: float | None = None,
                    noise: float = 0.0, outliers: float = 0.0, sizes: list[tuple[int, int]] | None = None) -> dict:
    """Views of known pinhole cameras (principal point (W/2, H/2)) and their exact pointmaps.

    Each view sees depths in [2, 5] along its pixel rays; its local pointmap is in its own
    camera frame at a random scale (the local head has its own scale), its global pointmap in
    view 0's frame. noise: Gaussian noise, as a fraction of depth, on both pointmaps.
    outliers: fraction of pixels replaced by far-off points with low confidence (conf 1.0-1.1
    against 3-20 for the others). sizes: (H, W) per view instead of h, w for all (one camera,
    so one focal). Returns preds, cam2world (N, 4, 4), focals (N,), baseline (the largest
    distance between two camera centres).
    """
    sizes = sizes or [(h, w)] * n_views
    n_views = len(sizes)
    g = torch.Generator().manual_seed(seed)
    focal = focal if focal is not None else max(sizes[0]) * (0.7 + 0.8 * float(torch.rand(1, generator=g)))
    cam2world = torch.eye(4, dtype=torch.float64).repeat(n_views, 1, 1)
    for i in range(1, n_views):
        cam2world[i, :3, :3] = random_rotation(35.0, g)
        direction = torch.randn(3, generator=g, dtype=torch.float64)
        cam2world[i, :3, 3] = direction / direction.norm() * (0.3 + 0.9 * float(torch.rand(1, generator=g)))
    preds = []
    for i, (rows, cols) in enumerate(sizes):
        y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                              indexing="ij")
        rays = torch.stack(((x - cols / 2) / focal, (y - rows / 2) / focal, torch.ones_like(x)), dim=-1)
        depth = 2 + 3 * torch.rand(rows, cols, 1, generator=g, dtype=torch.float64)
        cam = rays * depth
        world = cam @ cam2world[i, :3, :3].T + cam2world[i, :3, 3]
        local = cam * (0.5 + 1.5 * float(torch.rand(1, generator=g)))
        conf = 3 + 17 * torch.rand(rows, cols, generator=g, dtype=torch.float64)
        conf_local = 3 + 17 * torch.rand(rows, cols, generator=g, dtype=torch.float64)
        if noise:
            world = world + noise * depth * torch.randn(rows, cols, 3, generator=g, dtype=torch.float64)
            local = local + noise * depth * torch.randn(rows, cols, 3, generator=g, dtype=torch.float64)
        if outliers:
            bad = torch.rand(rows, cols, generator=g) < outliers
            n_bad = int(bad.sum())
            world[bad] = 20 * torch.randn(n_bad, 3, generator=g, dtype=torch.float64)
            local[bad] = 20 * torch.randn(n_bad, 3, generator=g, dtype=torch.float64)
            conf[bad] = 1 + 0.1 * torch.rand(n_bad, generator=g, dtype=torch.float64)
            conf_local[bad] = 1 + 0.1 * torch.rand(n_bad, generator=g, dtype=torch.float64)
        preds.append({"pts3d_in_other_view": world.float(), "conf": conf.float(),
                      "pts3d_local": local.float(), "conf_local": conf_local.float()})
    centres = cam2world[:, :3, 3]
    baseline = float(torch.cdist(centres, centres).max())
    return {"preds": preds, "cam2world": cam2world, "focals": torch.full((n_views,), focal, dtype=torch.float64),
            "baseline": baseline}


def pose_errors(estimated: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view rotation error (degrees) and camera-centre distance between two (N, 4, 4) cam2world stacks."""
    relative = estimated[:, :3, :3].transpose(1, 2) @ truth[:, :3, :3]
    cos = ((relative.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)), (estimated[:, :3, 3] - truth[:, :3, 3]).norm(dim=-1)
