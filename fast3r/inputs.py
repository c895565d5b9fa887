"""What ``fast3r reconstruct`` reads: image files, folders of them, and videos -> preprocessed views.

A folder contributes its image and video files (not its subfolders), in natural name
order (img2 before img10); files given one by one keep the command line's order. Images go
through ``load_images`` (the official resize and crop, in a thread pool); videos through
``fast3r.video``. ``max_views`` keeps that many views evenly spread over all of them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .images import load_images
from .video import VIDEO_EXTENSIONS, probe, read_frames

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGES_PER_TASK = 8  # image files per load_images call in the thread pool


class NoImagesFoundError(ValueError):
    """An input folder, or the inputs as a whole, holds no image or video file."""


class UnreadableImageError(ValueError):
    """An image file Pillow cannot decode."""


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "image" or "video"


@dataclass
class Views:
    images: list[torch.Tensor]  # uint8 (3, H, W), preprocessed
    names: list[str]  # unique PNG file names, e.g. "00003_IMG_0042.png" or "00007_clip_f000120.png"


def find_sources(inputs: Sequence[str | os.PathLike]) -> list[Source]:
    """Expand the command line's inputs into image and video files (by extension; nothing is opened)."""
    sources: list[Source] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = [_source(p) for p in sorted(path.iterdir(), key=_natural_key)
                     if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (*IMAGE_EXTENSIONS,
                                                                                            *VIDEO_EXTENSIONS)]
            if not found:
                folders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
                hint = f"; subfolders are not searched: pass them ({', '.join(folders[:5])})" if folders else ""
                raise NoImagesFoundError(f"no images found in folder {path} (looked for "
                                         f"{', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)}){hint}")
            sources += found
        elif path.is_file():
            sources.append(_source(path))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not sources:
        raise NoImagesFoundError("no images found: pass image files, folders of images, or videos")
    return _once_each(sources)


def _once_each(sources: list[Source]) -> list[Source]:
    """Each file once, at its first place (a file given alone and in its folder, overlapping globs), with a warning."""
    first: dict[Path, Source] = {}
    counts: dict[Path, int] = {}
    for source in sources:
        key = source.path.resolve()
        first.setdefault(key, source)
        counts[key] = counts.get(key, 0) + 1
    repeated = [f"{first[key].path} is given {n} times" for key, n in counts.items() if n > 1]
    if repeated:
        warnings.warn(f"{'; '.join(repeated[:5])}: each file is read once, at its first place", UserWarning,
                      stacklevel=3)
    return list(first.values())


def count_work(sources: Sequence[Source]) -> int | None:
    """Images plus video frames to decode (for a progress bar's total; None if a video does not say).

    Opens every video, so an unreadable one raises UnreadableVideoError here.
    """
    counts = [1 if source.kind == "image" else probe(source.path).frames for source in sources]
    return None if None in counts else sum(counts)


def load_views(
    sources: Sequence[Source],
    *,
    size: int,
    fps: float | None = None,
    every: int | None = None,
    max_views: int | None = None,
    on_decoded: Callable[[int], object] | None = None,
) -> Views:
    """Decode and preprocess every source; keep ``max_views`` evenly spread views if there are more."""
    loaded: list[tuple[torch.Tensor, str]] = []  # image, stem for its file name
    images = [s for s in sources if s.kind == "image"]
    by_path = dict(zip((s.path for s in images), _load_image_files([s.path for s in images], size, on_decoded)))
    for source in sources:
        if source.kind == "image":
            loaded.append((by_path[source.path], source.path.stem))
        else:
            for index, frame in read_frames(source.path, size=size, fps=fps, every=every, on_decoded=on_decoded):
                loaded.append((frame, f"{source.path.stem}_f{index:06d}"))
    if max_views is not None and len(loaded) > max_views:
        keep = np.unique(np.linspace(0, len(loaded) - 1, max_views).round().astype(int))
        loaded = [loaded[i] for i in keep]
    return Views(images=[image for image, _ in loaded],
                 names=[f"{i:05d}_{_safe(stem)}.png" for i, (_, stem) in enumerate(loaded)])


def _load_image_files(paths: list[Path], size: int, on_decoded: Callable[[int], object] | None) -> list[torch.Tensor]:
    chunks = [paths[i : i + IMAGES_PER_TASK] for i in range(0, len(paths), IMAGES_PER_TASK)]

    def load(chunk: list[Path]) -> list[torch.Tensor]:
        try:
            out = load_images(chunk, size=size)
        except ValueError as err:  # load_images names the file
            raise UnreadableImageError(str(err)) from err
        if on_decoded is not None:
            on_decoded(len(chunk))
        return out

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return [image for chunk in pool.map(load, chunks) for image in chunk]


def _source(path: Path) -> Source:
    return Source(path, "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _safe(stem: str) -> str:
    """A file-name stem with only letters, digits, '-', '_' and '.' (COLMAP and nerfstudio read names as text)."""
    return re.sub(r"[^\w.-]+", "_", stem)
