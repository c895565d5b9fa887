"""A stand-in for ``fast3r.train.data`` (branch ``data``) that follows /work/wt/CONTRACT_TRAIN_DATA.md, so that
the training loop's tests run before that branch lands. Importing this module installs it as
``fast3r.train.data`` only when the real package is missing; with the real one nothing changes.

Scenes: a few textured spheres inside a textured spherical room (every pixel ray hits a surface, so every
pixel is valid), seen by pinhole cameras on a ring around the centre looking inwards; world points from
the exact depth. Test-only: not part of the package.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import torch
from torch.utils.data import Dataset

SIZES = {224: (224, 224), 512: (384, 512)}


class DataError(ValueError):
    pass


def _look_at(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    forward = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = torch.stack([right, down, forward], dim=1)  # OpenCV axes: x right, y down, z forward
    pose[:3, 3] = eye
    return pose


def synthetic_scene(seed: int = 0, views: int = 24, size: tuple[int, int] = (224, 224)) -> dict:
    return render(seed, list(range(views)), size)


def render(seed: int, views: list[int], size: tuple[int, int]) -> dict:
    """Views ``views`` of scene ``seed`` (view v's camera depends on (seed, v) only)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    spheres = [(torch.cat([(rand(2) - 0.5) * 3, (rand(1) - 0.5)]), 0.5 + 0.7 * float(rand(1))) for _ in range(3)]
    shapes = [(c, r, 1.0) for c, r in spheres] + [(torch.zeros(3, dtype=torch.float64), 7.0, -1.0)]  # -1: the room
    frequencies = [1.5 + 3 * rand(3, 3) for _ in shapes]
    phases = [6.3 * rand(3) for _ in shapes]
    h, w = size
    focal = 0.9 * w
    start = 2 * math.pi * float(rand(1))
    out = []
    for v in views:
        jitter = torch.rand(5, generator=torch.Generator().manual_seed(seed * 1000 + v), dtype=torch.float64)
        angle = start + 0.08 * v * math.pi + 0.1 * float(jitter[0])
        eye = torch.tensor([4.0 * math.cos(angle), 4.0 * math.sin(angle), 0.8 * (float(jitter[1]) - 0.5)],
                           dtype=torch.float64)
        pose = _look_at(eye, (jitter[2:] - 0.5) * 0.6)
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                              indexing="ij")
        rays = torch.stack(((x - w / 2) / focal, (y - h / 2) / focal, torch.ones_like(x)), -1) @ pose[:3, :3].T
        depth = torch.full((h, w), math.inf, dtype=torch.float64)
        color = torch.zeros(h, w, 3, dtype=torch.float64)
        for (centre, radius, side), freq, phase in zip(shapes, frequencies, phases):
            oc = eye - centre
            a, b, c = (rays * rays).sum(-1), (rays * oc).sum(-1), (oc * oc).sum() - radius**2
            disc = b * b - a * c
            t = (-b - side * disc.clamp(min=0).sqrt()) / a
            hit = (disc >= 0) & (t > 1e-3) & (t < depth)
            points = eye + t[..., None] * rays
            depth = torch.where(hit, t, depth)
            shade = 0.5 + 0.5 * torch.sin(points @ freq.T + phase)
            color = torch.where(hit[..., None], shade, color)
        k = torch.tensor([[focal, 0, w / 2], [0, focal, h / 2], [0, 0, 1]], dtype=torch.float64)
        out.append({"image": (color * 255).round().clamp(0, 255).to(torch.uint8).numpy(),
                    "depth": depth.float().numpy(), "intrinsics": k.numpy(), "cam2world": pose.numpy(),
                    "name": f"synthetic_{seed:04d}/view_{v:03d}.png"})
    return {"name": f"synthetic_{seed:04d}", "views": out}


class _SyntheticSamples(Dataset):
    def __init__(self, scene_seeds: list[tuple[int, int]], views: int, size: int, seed: int, split: str):
        self.scene_seeds, self.views, self.hw, self.seed, self.split = scene_seeds, views, SIZES[size], seed, split

    def __len__(self) -> int:
        return len(self.scene_seeds)

    def __getitem__(self, i: int) -> dict:
        scene_seed, available = self.scene_seeds[i]
        if self.split == "train":
            g = torch.Generator().manual_seed(self.seed * 7919 + i)
            chosen = torch.randperm(available, generator=g)[: self.views].tolist()
        else:
            chosen = list(range(min(self.views, available)))
        scene = render(scene_seed, chosen, self.hw)
        views = scene["views"]
        depth = torch.stack([torch.from_numpy(v["depth"]) for v in views])
        k = torch.stack([torch.from_numpy(v["intrinsics"]) for v in views])
        pose = torch.stack([torch.from_numpy(v["cam2world"]) for v in views])
        h, w = self.hw
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                              indexing="ij")
        cam = torch.stack(((x - k[:, 0, 2, None, None]) / k[:, 0, 0, None, None] * depth,
                           (y - k[:, 1, 2, None, None]) / k[:, 1, 1, None, None] * depth, depth.double()), -1)
        world = cam @ pose[:, None, :3, :3].transpose(-1, -2) + pose[:, None, None, :3, 3]
        return {"images": torch.stack([torch.from_numpy(v["image"]).permute(2, 0, 1) for v in views]),
                "pts3d": world.float(), "valid_mask": torch.isfinite(depth) & (depth > 0),
                "camera_pose": pose.float(), "intrinsics": k.float(), "scene": scene["name"],
                "names": [v["name"] for v in views]}


def build_dataset(entries, views=20, size=512, batch_size=1, seed=0, split="train") -> Dataset:
    scene_seeds = []
    for entry in entries:
        if entry.get("format") != "synthetic":
            raise DataError(f"the test stand-in reads only format: synthetic, not {entry.get('format')!r}")
        first = entry.get("seed", 0)
        available = entry.get("views_per_scene", max(views, 8))  # fewer than `views`: samples with fewer views
        scene_seeds += [(first + s, available) for s in range(entry.get("scenes", 4))]
    return _SyntheticSamples(scene_seeds, views, size, seed, split)


def collate(samples: list[dict]) -> dict:
    shapes = {tuple(s["images"].shape) for s in samples}
    if len(shapes) > 1:
        raise DataError(f"samples of one batch differ in shape: {sorted(shapes)}")
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key not in ("scene", "names")}
    batch["scene"] = [s["scene"] for s in samples]
    batch["names"] = [s["names"] for s in samples]
    return batch


def to_model_inputs(batch: dict):
    gts = [{"pts3d": batch["pts3d"][:, v], "valid_mask": batch["valid_mask"][:, v],
            "camera_pose": batch["camera_pose"][:, v]} for v in range(batch["images"].shape[1])]
    return batch["images"], gts


if importlib.util.find_spec("fast3r.train.data") is None:
    sys.modules["fast3r.train.data"] = sys.modules[__name__]
