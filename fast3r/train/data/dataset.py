"""Training samples: N views of one scene, cropped to one resolution, with the ground truth ``fast3r_loss`` takes.

``dataset[i]`` is a function of (seed, i) only: the scene of sample i, its views, the zoom and the
colour jitter all come from ``numpy.random.default_rng([seed, stream, i])`` and the resolution from
``[seed, stream, i // batch_size]``. So any DataLoader, with any number of workers, yields the same
samples, and resuming at sample i is exact. ``i`` may run past ``len(dataset)``: sample
``epoch * len(dataset) + j`` is another draw (views, zoom, jitter) of slot ``j``'s scene, which is how
a training loop gets fresh augmentations each epoch.

A sample's world frame is its first view's camera (``camera_pose[0]`` is the identity): the loss
does not depend on the world frame, and float32 then keeps its precision for scenes whose COLMAP
coordinates sit far from the origin.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .formats import load_scene
from .sampling import AUG_CROP, RESOLUTIONS, VAL_RESOLUTION, crop_view, world_points
from .scene import DataError, Scene
from .synthetic import synthetic_scene

SPLITS = ("train", "val")
COMMON_KEYS = ("format", "samples", "window", "aug_crop", "samples_per_visit", "jitter")
# view: every view of a sample its own colour jitter (the official training); sample: one jitter for all the views
# of a sample (their colours still match each other); none: no jitter.
JITTERS = ("view", "sample", "none")
ENTRY_KEYS = {"colmap": (*COMMON_KEYS, "path", "scenes"), "folder": (*COMMON_KEYS, "path", "scenes"),
              "synthetic": (*COMMON_KEYS, "scenes", "seed", "views", "size")}
SYNTHETIC_SEED_STRIDE = 100_000  # scene k of a synthetic entry with seed s is synthetic_scene(s * STRIDE + k)
SYNTHETIC_MIN_VIEWS = 24
SYNTHETIC_SIZE = {224: (224, 224), 512: (384, 512)}  # (H, W) rendered, before the crops
SCENE_STREAM, SAMPLE_STREAM, RESOLUTION_STREAM = 0, 1, 2  # independent random streams of one seed


@dataclass(frozen=True)
class Source:
    """One scene of the dataset and how it is sampled."""

    scene: Scene
    samples: int  # slots per epoch
    window: int  # views are drawn from a random run of this many consecutive views (name order)
    aug_crop: int
    samples_per_visit: int = 1  # the scene's slots come in runs of this many consecutive samples
    jitter: str = "view"  # one of JITTERS


def build_dataset(entries: Sequence[dict], views: int = 20, size: int = 512, batch_size: int = 1, seed: int = 0,
                  split: str = "train") -> SceneDataset:
    """A ``torch.utils.data.Dataset`` of samples of ``views`` views from the scenes of ``entries``.

    entries: dicts from a training config, e.g. ``{"format": "colmap", "path": "data/", "scenes": "*"}``
    (``scenes``: a glob, or a list of names, under ``path``; without it ``path`` is the scene),
    ``{"format": "folder", "path": "scene/"}``, ``{"format": "synthetic", "scenes": 64, "seed": 0}``
    (optional ``views``: per scene, default max(24, 2 * views); ``size``: (H, W) rendered, default
    224 x 224 or 384 x 512). Every entry also takes ``samples`` (slots per epoch for the whole entry,
    spread evenly over its scenes; default per scene max(1, its views // views)), ``window`` (draw a
    sample's views from a random run of this many consecutive views; default the whole scene),
    ``aug_crop`` (the random zoom, default 16 in training, 0 in validation), ``samples_per_visit``
    (default 1: that many of a scene's samples come one after another in the order, so one DataLoader
    worker reads or renders the scene once for all of them; for thousands of synthetic scenes, whose
    texture costs ~10 views' rendering, at the price of fewer scenes per batch) and ``jitter``
    (training's colour jitter: "view", the default and the official, draws one per view; "sample" one
    per sample, shared by its views, so that their colours still match; "none").
    size: 512 (the official aspect ratios, one per batch) or 224 (squares). batch_size: samples i
    and j with i // batch_size == j // batch_size share one resolution. split: "train" (random
    zoom, colour jitter) or "val" (no zoom, no jitter, 512 x 384 or 224 x 224).
    """
    if size not in RESOLUTIONS:
        raise ValueError(f"size={size}; choose 512 (the official 512-wide aspect ratios) or 224 (squares)")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    for name, value in (("views", views), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; pass an integer >= 1")
    if not entries:
        raise ValueError("entries is empty; list at least one dataset, e.g. {'format': 'synthetic', 'scenes': 8}")
    sources = [source for i, entry in enumerate(entries)
               for source in _entry_sources(entry, i, views, size, split)]
    return SceneDataset(sources, views=views, size=size, batch_size=batch_size, seed=seed, split=split)


class SceneDataset(torch.utils.data.Dataset):
    """Samples of ``views`` views; see the module docstring for what ``dataset[i]`` depends on."""

    def __init__(self, sources: Sequence[Source], *, views: int, size: int, batch_size: int, seed: int,
                 split: str) -> None:
        for source in sources:
            if len(source.scene) < views:
                raise DataError(f"scene {source.scene.name}: has {len(source.scene)} views, fewer than the "
                                f"{views} a sample asks for; lower views or leave the scene out")
            if source.window < views:
                raise ValueError(f"scene {source.scene.name}: window={source.window} is smaller than views={views}")
        self.sources, self.views, self.size, self.batch_size, self.seed, self.split = \
            list(sources), views, size, batch_size, seed, split
        # Runs of consecutive slots of one scene (a run per slot unless an entry sets samples_per_visit), shuffled
        # as runs; vectorized, since a synthetic entry may hold ~600k slots.
        counts = [s.samples for s in self.sources]
        scene = np.repeat(np.arange(len(self.sources)), counts)
        within = np.arange(len(scene)) - np.repeat(np.cumsum([0, *counts[:-1]]), counts)
        visit = within // np.repeat([s.samples_per_visit for s in self.sources], counts)
        run = np.cumsum(np.r_[True, (scene[1:] != scene[:-1]) | (visit[1:] != visit[:-1])]) - 1
        order = np.random.default_rng([seed, SCENE_STREAM]).permutation(run[-1] + 1)
        position = np.empty_like(order)
        position[order] = np.arange(len(order))  # where each run lands in the shuffled order
        self.slots = scene[np.argsort(position[run], kind="stable")]

    def __len__(self) -> int:
        return len(self.slots)

    def resolution(self, index: int) -> tuple[int, int]:
        """(W, H) of sample ``index``: one draw per block of batch_size samples (fixed in validation)."""
        if self.split == "val":
            return VAL_RESOLUTION[self.size]
        choices = RESOLUTIONS[self.size]
        batch = index // self.batch_size
        return choices[int(np.random.default_rng([self.seed, RESOLUTION_STREAM, batch]).integers(len(choices)))]

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"sample index {index!r}; pass an integer >= 0")
        index = int(index)
        source = self.sources[self.slots[index % len(self)]]
        rng = np.random.default_rng([self.seed, SAMPLE_STREAM, index])
        start = int(rng.integers(0, len(source.scene) - source.window + 1))
        picks = start + rng.choice(source.window, self.views, replace=False)
        train = self.split == "train"
        shared = int(rng.integers(2**63)) if train and source.jitter == "sample" else None
        crops = [crop_view(source.scene.view(int(j)), self.resolution(index), rng if train else None,
                           aug_crop=source.aug_crop, jitter=source.jitter != "none",
                           jitter_rng=None if shared is None else np.random.default_rng(shared)) for j in picks]
        return assemble(crops, source.scene.name)


def assemble(crops: Sequence[dict], scene: str) -> dict:
    """Stack crops into a sample, in the frame of the first view's camera (see the module docstring)."""
    anchor = np.linalg.inv(crops[0]["cam2world"])
    poses = np.stack([anchor @ crop["cam2world"] for crop in crops])
    points = np.stack([world_points(crop["depth"], crop["intrinsics"], pose, np.float32)
                       for crop, pose in zip(crops, poses)])  # 0 where the depth is unknown (0)
    valid = np.stack([crop["depth"] > 0 for crop in crops])
    return {
        "images": torch.from_numpy(np.stack([crop["image"] for crop in crops])).permute(0, 3, 1, 2).contiguous(),
        "pts3d": torch.from_numpy(points),
        "valid_mask": torch.from_numpy(valid),
        "camera_pose": torch.from_numpy(poses.astype(np.float32)),
        "intrinsics": torch.from_numpy(np.stack([crop["intrinsics"] for crop in crops]).astype(np.float32)),
        "masked_pixels": torch.tensor([crop["masked"] for crop in crops], dtype=torch.int64),
        "scene": scene,
        "names": [crop["name"] for crop in crops],
    }


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch: (B, N, ...) tensors, ``scene`` a list of B names, ``names`` B lists of N."""
    if not samples:
        raise ValueError("collate got no samples")
    first = samples[0]
    for i, sample in enumerate(samples[1:], 1):
        if sample["images"].shape != first["images"].shape:
            raise ValueError(
                f"samples 0 and {i} of the batch differ in shape: {tuple(first['images'].shape)} vs "
                f"{tuple(sample['images'].shape)} (views, 3, H, W). A batch needs one resolution: build the dataset "
                "with the DataLoader's batch size and batch whole blocks of indices b * batch_size ... "
                "(b + 1) * batch_size - 1")
    batch = {key: torch.stack([s[key] for s in samples]) for key, value in first.items()
             if isinstance(value, torch.Tensor)}
    batch["scene"] = [s["scene"] for s in samples]
    batch["names"] = [list(s["names"]) for s in samples]
    return batch


def to_model_inputs(batch: dict, device: torch.device | str | None = None) -> tuple[torch.Tensor, list[dict]]:
    """(images (B, N, 3, H, W) uint8, gts): gts[n] = {pts3d (B, H, W, 3), valid_mask (B, H, W), camera_pose (B, 4, 4)},
    what ``fast3r.fast3r_loss`` takes. device: move everything there, each tensor whole and then sliced per view
    there: a per-view slice of a pinned batch is not contiguous, and its copy would first gather it into pageable
    memory and then wait for the transfer (the learning run's step carried ~150 MB of points that way)."""
    keys = ("images", "pts3d", "valid_mask", "camera_pose")
    moved = {key: batch[key] if device is None else batch[key].to(device, non_blocking=True) for key in keys}
    views = moved["images"].shape[1]
    gts = [{key: moved[key][:, n] for key in keys[1:]} for n in range(views)]
    return moved["images"], gts


# ------------------------------------------------------------------------------ entries
def _entry_sources(entry: dict, position: int, views: int, size: int, split: str) -> list[Source]:
    where = f"data entry {position} ({entry!r})"
    if not isinstance(entry, dict) or entry.get("format") not in ENTRY_KEYS:
        raise ValueError(f"{where}: 'format' must be one of {sorted(ENTRY_KEYS)}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS[entry["format"]]))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a {entry['format']} entry takes "
                         f"{', '.join(ENTRY_KEYS[entry['format']])}")
    aug_crop = _count(entry, "aug_crop", where, AUG_CROP if split == "train" else 0, minimum=0)
    scenes = _synthetic_scenes(entry, where, views, size) if entry["format"] == "synthetic" \
        else _file_scenes(entry, where)
    samples = entry.get("samples")
    if samples is None:
        counts = [max(1, len(scene) // views) for scene in scenes]
    else:
        total = _count(entry, "samples", where, 0)
        counts = [total // len(scenes) + (k < total % len(scenes)) for k in range(len(scenes))]
    window = entry.get("window")
    per_visit = _count(entry, "samples_per_visit", where, 1)
    jitter = entry.get("jitter", "view")
    if jitter not in JITTERS:
        raise ValueError(f"{where}: 'jitter' must be one of {', '.join(map(repr, JITTERS))}, got {jitter!r}")
    return [Source(scene, count, len(scene) if window is None else min(_count(entry, "window", where, None), len(scene)),
                   aug_crop, per_visit, jitter) for scene, count in zip(scenes, counts) if count > 0]


def _synthetic_scenes(entry: dict, where: str, views: int, size: int) -> list[Scene]:
    count = _count(entry, "scenes", where, None)
    if count >= SYNTHETIC_SEED_STRIDE:
        raise ValueError(f"{where}: at most {SYNTHETIC_SEED_STRIDE - 1} scenes per synthetic entry")
    seed = _count(entry, "seed", where, 0, minimum=0)
    per_scene = _count(entry, "views", where, max(SYNTHETIC_MIN_VIEWS, 2 * views))
    render_size = entry.get("size", SYNTHETIC_SIZE[size])
    if not (isinstance(render_size, (list, tuple)) and len(render_size) == 2
            and all(isinstance(x, int) and x > 0 for x in render_size)):
        raise ValueError(f"{where}: 'size' must be [H, W] in pixels, got {render_size!r}")
    return [synthetic_scene(seed * SYNTHETIC_SEED_STRIDE + k, per_scene, tuple(render_size)) for k in range(count)]


def _file_scenes(entry: dict, where: str) -> list[Scene]:
    if entry.get("path") is None:
        raise ValueError(f"{where}: a {entry['format']} entry needs 'path'")
    root = Path(entry["path"])
    if not root.is_dir():
        raise DataError(f"{where}: path {root} is not a directory")
    pattern = entry.get("scenes")
    if pattern is None:
        paths = [root]
    elif isinstance(pattern, str):
        paths = sorted(Path(p) for p in glob.glob(str(root / pattern)) if Path(p).is_dir())
    elif isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern):
        paths = [root / p for p in pattern]
    else:
        raise ValueError(f"{where}: 'scenes' must be a glob under path (e.g. '*') or a list of names")
    if not paths:
        raise DataError(f"{where}: no scene directories match {pattern!r} under {root}")
    from tqdm import tqdm

    return [load_scene(p, entry["format"]) for p in tqdm(paths, desc=f"scenes in {root}", unit="scene",
                                                         disable=len(paths) < 10)]


def _count(entry: dict, key: str, where: str, default: int | None, minimum: int = 1) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value

