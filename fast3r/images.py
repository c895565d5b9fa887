"""Image files -> uint8 (3, H, W) tensors, preprocessed the way the released model was trained.

size 512: resize so the long side is 512, then centre-crop each side down to a multiple of
16 (a square image becomes 4:3). size 224: resize the short side to 224 and centre-crop a
square. Pillow does the decoding and resampling (Lanczos when shrinking, bicubic when
enlarging); it comes with matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

SIZES = (224, 512)


def load_images(paths: Sequence[str | os.PathLike], size: int = 512) -> list[torch.Tensor]:
    """Read and preprocess image files; returns uint8 (3, H, W) tensors ready for ``Fast3R``."""
    if size not in SIZES:
        raise ValueError(f"size={size}; the released model uses 512 (long side) or 224 (square)")
    return [preprocess(_read(path), size) for path in paths]


def _read(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {path} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path} ({err}); pass a PNG, JPEG or other file Pillow can decode") from err


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """Resize and centre-crop one RGB image as the official pipeline does -> uint8 (3, H, W)."""
    w, h = img.size
    target_long = size if size == 512 else round(size * max(w / h, h / w))
    img = _resize_long_side(img, target_long)
    w, h = img.size
    cx, cy = w // 2, h // 2
    if size == 224:
        half = min(cx, cy)
        box = (cx - half, cy - half, cx + half, cy + half)
    else:
        half_w, half_h = (2 * cx) // 16 * 8, (2 * cy) // 16 * 8
        if w == h:  # a square image becomes 4:3 landscape
            half_h = 3 * half_w // 4
        box = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    pixels = np.asarray(img.crop(box), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _resize_long_side(img: Image.Image, long_side: int) -> Image.Image:
    w, h = img.size
    scale = long_side / max(w, h)
    resample = Image.LANCZOS if scale < 1 else Image.BICUBIC
    return img.resize((round(w * scale), round(h * scale)), resample)
