"""Image files -> uint8 (3, H, W) tensors, preprocessed the way the released model was trained.

As the official loader: the EXIF orientation is applied first (phone portraits stand upright), then
size 512: resize so the long side is 512 and centre-crop each side down to a multiple of 16 (a
square image becomes 4:3); size 224: resize the short side to 224 and centre-crop a square. Pillow
does the decoding and resampling (Lanczos when shrinking, bicubic when enlarging); it comes with
matplotlib. Unlike the official loader, 16-bit images are scaled to 8 bits (their high byte, as
Pillow reads 16-bit RGB PNGs) instead of clipped to white, and an image too elongated to leave one
16-pixel patch on its short side is refused instead of returned empty.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

SIZES = (224, 512)
PATCH = 16
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 'I' (32-bit) is how Pillow reads some 16-bit files


def load_images(paths: str | os.PathLike | Sequence[str | os.PathLike], size: int = 512) -> list[torch.Tensor]:
    """Read and preprocess image files (or one file); returns uint8 (3, H, W) tensors ready for ``Fast3R``."""
    _check_size(size)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [_load(path, size) for path in paths]


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """Preprocess one decoded image exactly as ``load_images`` does -> uint8 (3, H, W).

    For frames decoded elsewhere (e.g. from a video). Applies the EXIF orientation if the image carries
    one, scales 16-bit pixels to 8 bits, converts to RGB, then resizes and centre-crops as the official
    pipeline. Raises ValueError for an aspect ratio too extreme to keep a 16-pixel patch on both sides.
    """
    _check_size(size)
    img = _to_rgb8(_upright(image))
    w, h = img.size
    _check_aspect(w, h, size)
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


def _check_size(size: int) -> None:
    if size not in SIZES:
        raise ValueError(f"size={size}; the released model uses 512 (long side) or 224 (square)")


def _load(path: str | os.PathLike, size: int) -> torch.Tensor:
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; pass its image files, e.g. sorted(Path(dir).glob('*.jpg'))")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now, so a truncated file fails here, with its name
                pixels = preprocess_image(img, size)
        for warning in caught:  # Pillow's own does not say which file; ours does
            if issubclass(warning.category, Image.DecompressionBombWarning):
                w, h = img.size
                warnings.warn(f"image {path} has {w * h} pixels, over Pillow's decompression-bomb warning limit of "
                              f"{Image.MAX_IMAGE_PIXELS}: decoding it takes about {3 * w * h / 2**30:.1f} GiB",
                              UserWarning, stacklevel=3)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return pixels
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"image {path} has {_pixel_count(err)} pixels, more than twice Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS} (a guard against files that decode to huge images). If you trust the file, "
            "downscale it (it is resized to 512 or 224 anyway), or in Python lift the guard before loading: "
            "PIL.Image.MAX_IMAGE_PIXELS = None"
        ) from err
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {path} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path} ({err}); pass a PNG, JPEG or other file Pillow can decode") from err
    except ValueError as err:
        raise ValueError(f"image {path}: {err}") from err


def _pixel_count(err: Exception) -> str:
    """The pixel count in Pillow's DecompressionBombError message ('Image size (N pixels) exceeds ...')."""
    match = re.search(r"\((\d+) pixels\)", str(err))
    return match[1] if match else "too many"


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation as the official loader does; an image without one is used as is (no copy)."""
    image.load()  # some formats (PNG) keep EXIF after the pixels
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb8(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel; 16-bit grayscale keeps its high byte rather than clipping at 255."""
    if img.mode in SIXTEEN_BIT_MODES:
        high_byte = (np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(high_byte).convert("RGB")
    if img.mode == "F":
        raise ValueError("floating-point (mode F) images have no fixed range; convert them to 8-bit RGB first")
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_aspect(w: int, h: int, size: int) -> None:
    """size 512 keeps the aspect ratio: the short side must still hold one patch after the resize and crop."""
    if size != 512:
        return  # size 224 scales the short side to 224 and crops a square
    short = round(min(w, h) * (size / max(w, h)))  # as _resize_long_side computes it
    if short < PATCH:
        raise ValueError(
            f"a {w}x{h} image resized to a long side of 512 keeps {short} pixels on "
            f"its short side, less than one {PATCH}-pixel patch; crop it to an aspect ratio of at most "
            f"{512 // PATCH}:1 or use size=224 (fast3r reconstruct: --size 224)"
        )


def _resize_long_side(img: Image.Image, long_side: int) -> Image.Image:
    w, h = img.size
    scale = long_side / max(w, h)
    resample = Image.LANCZOS if scale < 1 else Image.BICUBIC
    return img.resize((round(w * scale), round(h * scale)), resample)
