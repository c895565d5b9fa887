"""One view -> one training crop, as the official training prepares its views (read for facts, not copied).

What the official code does (``dust3r/datasets/base/base_stereo_view_dataset.py``, ``utils/cropping.py``
and the data configs): every view of a sample gets the sample's resolution, (W, H) one of (512, 384),
(512, 336), (512, 288), (512, 256), (512, 160) for the 512 model (224 x 224 at 224); the crop is
centred on the principal point, the widest window symmetric about it; the window is scaled (Lanczos
down, bicubic up) so that it covers the resolution plus ``aug_crop`` extra pixels, a random integer
in [0, aug_crop) (16 for most datasets, 256 for ScanNet++ and ARKitScenes), which zooms in at
random, and is cut to the resolution; the depth map is resampled nearest; training views get
torchvision's ``ColorJitter(0.5, 0.5, 0.5, 0.1)``, each view its own draw; portrait views are cut
to the transposed resolution and transposed back; validation crops have no zoom and no jitter.

Where this differs, and why:
- One exact affine map per crop: the output's pixel centres are ``x_src + 0.5 = x0 + (x + 0.5) / s``
  with one scale ``s``; the image is resampled over exactly that source box (Pillow's ``resize(box=)``,
  in one step, which also reads only the pixels it needs), the depth at the source pixel holding each
  output pixel centre, and the intrinsics follow the same map (fx * s, fy * s; the principal point
  lands at the crop's centre). The official code scales the intrinsics by a factor the rounded image
  size does not have, and cv2's nearest resize is half a pixel off when shrinking: both shift depth
  against colour by up to about a pixel.
- Portrait views are turned by 90 degrees (the camera with them), not transposed: a transpose is a
  mirror, whose "camera" is not a rotation.
- Colour jitter is the same four operations in a random order (Pillow's ImageEnhance and an HSV hue
  shift, as torchvision does them on images), drawn from the sample's own generator so that a sample
  is a function of (seed, index) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from .scene import DataError

RESOLUTIONS = {512: ((512, 384), (512, 336), (512, 288), (512, 256), (512, 160)), 224: ((224, 224),)}  # (W, H)
VAL_RESOLUTION = {512: (512, 384), 224: (224, 224)}  # the official validation sets use 512 x 384
AUG_CROP = 16  # the official default: the zoom adds up to this many pixels to the resolution
JITTER = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.1}  # ColorJitter(0.5, 0.5, 0.5, 0.1)
PORTRAIT = 1.1  # H > 1.1 W: the view is turned to landscape (as the official threshold)
REDUCING_GAP = 3.0  # Pillow: reduce by an integer factor first when shrinking more than 3x (fast, same quality)


@dataclass(frozen=True)
class CropBox:
    """The affine map from an output crop to its source view: output pixel centre x <-> x0 + (x + 0.5) / scale."""

    x0: float  # source coordinates of the output's top-left corner (pixel edges: the source's corner is 0)
    y0: float
    scale: float  # output pixels per source pixel
    size: tuple[int, int]  # output (W, H)


def crop_view(view: dict, resolution: tuple[int, int], rng: np.random.Generator | None, *,
              aug_crop: int = AUG_CROP, jitter: bool = True, jitter_rng: np.random.Generator | None = None) -> dict:
    """The crop of ``view`` at ``resolution`` (W, H): image, depth, intrinsics, cam2world, masked, box.

    rng None: validation (no zoom, no jitter). jitter_rng: the colour jitter draws from it instead of
    ``rng`` (the views of a sample then share one jitter when each gets a generator of the same seed).
    masked: the crop's pixels whose depth was NaN, inf or negative in the file (they are invalid, like
    depth 0, and counted so the log shows bad data).
    """
    image, depth = np.asarray(view["image"]), np.asarray(view["depth"], dtype=np.float32)
    k, pose = np.asarray(view["intrinsics"], dtype=np.float64), np.asarray(view["cam2world"], dtype=np.float64)
    w_out, h_out = resolution
    if w_out != h_out and image.shape[0] > PORTRAIT * image.shape[1]:
        image, depth, k, pose = turn_to_landscape(image, depth, k, pose)
    extra = int(rng.integers(0, aug_crop)) if rng is not None and aug_crop > 1 else 0
    box = crop_box(k, image.shape[:2], resolution, extra, where=view["name"])
    pixels = resample_image(image, box)
    if rng is not None and jitter:
        pixels = color_jitter(pixels, rng if jitter_rng is None else jitter_rng)
    cropped = resample_depth(depth, box)
    bad = ~np.isfinite(cropped) | (cropped < 0)
    return {"image": pixels, "depth": np.where(bad, 0, cropped).astype(np.float32), "intrinsics": crop_intrinsics(k, box),
            "cam2world": pose, "masked": int(bad.sum()), "box": box, "name": view["name"]}


def crop_box(k: np.ndarray, size: tuple[int, int], resolution: tuple[int, int], extra: int, where: str) -> CropBox:
    """The crop centred on the principal point: the widest window symmetric about it, zoomed in by ``extra`` pixels.

    In source edge coordinates the principal point is (cx + 0.5, cy + 0.5); the window reaches
    ``margin`` = min(cx + 0.5, W - cx - 0.5) to either side, and the scale is the smallest that fits
    the crop in the window on both axes, times (res + extra) / res (the official zoom). The crop's
    principal point is then its centre, ((W_out - 1) / 2, (H_out - 1) / 2) in pixel coordinates.
    """
    h, w = size
    w_out, h_out = resolution
    margin_x = min(k[0, 2] + 0.5, w - k[0, 2] - 0.5)
    margin_y = min(k[1, 2] + 0.5, h - k[1, 2] - 0.5)
    if margin_x <= 0 or margin_y <= 0:
        raise DataError(f"view {where}: principal point ({k[0, 2]:.1f}, {k[1, 2]:.1f}) lies outside its "
                        f"{w}x{h} image; check the intrinsics' cx, cy")
    scale = max((w_out + extra) / (2 * margin_x), (h_out + extra) / (2 * margin_y))
    return CropBox(k[0, 2] + 0.5 - w_out / 2 / scale, k[1, 2] + 0.5 - h_out / 2 / scale, scale, (w_out, h_out))


def crop_intrinsics(k: np.ndarray, box: CropBox) -> np.ndarray:
    """The intrinsics of the crop: the pinhole follows the map x_out = (x_src + 0.5 - x0) * s - 0.5."""
    out = k.copy()
    out[:2, :2] *= box.scale
    out[0, 2] = (k[0, 2] + 0.5 - box.x0) * box.scale - 0.5
    out[1, 2] = (k[1, 2] + 0.5 - box.y0) * box.scale - 0.5
    return out


def resample_image(image: np.ndarray, box: CropBox) -> np.ndarray:
    """The source box resized to the crop: Lanczos when shrinking, bicubic when enlarging (as the official code)."""
    w_out, h_out = box.size
    source = (box.x0, box.y0, box.x0 + w_out / box.scale, box.y0 + h_out / box.scale)
    resample = Image.LANCZOS if box.scale < 1 else Image.BICUBIC
    resized = Image.fromarray(image).resize(box.size, resample, box=source, reducing_gap=REDUCING_GAP)
    return np.asarray(resized)


def resample_depth(depth: np.ndarray, box: CropBox) -> np.ndarray:
    """Nearest: each output pixel takes the depth of the source pixel its centre falls in."""
    w_out, h_out = box.size
    cols = np.floor(box.x0 + (np.arange(w_out) + 0.5) / box.scale).astype(np.int64).clip(0, depth.shape[1] - 1)
    rows = np.floor(box.y0 + (np.arange(h_out) + 0.5) / box.scale).astype(np.int64).clip(0, depth.shape[0] - 1)
    return depth[rows[:, None], cols[None, :]]


def turn_to_landscape(image: np.ndarray, depth: np.ndarray, k: np.ndarray,
                      pose: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Turn a view 90 degrees clockwise; the camera turns with it about its optical axis.

    New pixel (x', y') = (H - 1 - y, x); in camera coordinates x' = -y, y' = x, z' = z, so
    fx' = fy, fy' = fx, cx' = H - 1 - cy, cy' = cx and cam2world' = cam2world @ [M^T 0; 0 1]
    with M the map (x, y, z) -> (-y, x, z).
    """
    h = image.shape[0]
    turned_k = np.array([[k[1, 1], 0, h - 1 - k[1, 2]], [0, k[0, 0], k[0, 2]], [0, 0, 1]])
    turn = np.eye(4)
    turn[:3, :3] = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]  # M^T
    return (np.ascontiguousarray(np.rot90(image, -1)), np.ascontiguousarray(np.rot90(depth, -1)), turned_k,
            pose @ turn)


def color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation (factors in [0.5, 1.5]) and hue (shift in [-0.1, 0.1]) in a random order."""
    img = Image.fromarray(image)
    factors = {name: rng.uniform(1 - JITTER[name], 1 + JITTER[name]) for name in ("brightness", "contrast", "saturation")}
    hue = rng.uniform(-JITTER["hue"], JITTER["hue"])
    for step in rng.permutation(4):
        if step == 0:
            img = ImageEnhance.Brightness(img).enhance(factors["brightness"])
        elif step == 1:
            img = ImageEnhance.Contrast(img).enhance(factors["contrast"])
        elif step == 2:
            img = ImageEnhance.Color(img).enhance(factors["saturation"])
        else:
            img = _shift_hue(img, hue)
    return np.asarray(img)


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns (uint8 wrap-around of the HSV hue channel)."""
    h, s, v = img.convert("HSV").split()
    hue = (np.asarray(h).astype(np.int16) + round(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8)), s, v)).convert("RGB")


def camera_points(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 points in the camera frame: ((x - cx) / fx * z, (y - cy) / fy * z, z)."""
    h, w = depth.shape
    z = depth.astype(np.float64)
    x = (np.arange(w) - k[0, 2]) / k[0, 0]
    y = (np.arange(h) - k[1, 2]) / k[1, 1]
    return np.stack([x[None, :] * z, y[:, None] * z, z], axis=-1)


def world_points(depth: np.ndarray, k: np.ndarray, cam2world: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(H, W, 3) world points of a depth map: per world axis i, depth * (R @ K^-1 (x, y, 1))_i + t_i.

    Written per axis into the output (each direction an outer sum of a row of R): 2x faster than
    broadcasting over the last axis. float32 keeps 1e-6 relative in a sample's frame (metres from
    its first camera).
    """
    h, w = depth.shape
    rotation, origin = cam2world[:3, :3], cam2world[:3, 3]
    x = ((np.arange(w) - k[0, 2]) / k[0, 0]).astype(dtype)
    y = ((np.arange(h) - k[1, 2]) / k[1, 1]).astype(dtype)
    z = depth.astype(dtype, copy=False)
    out = np.empty((h, w, 3), dtype)
    for axis, (r0, r1, r2) in enumerate(rotation.tolist()):
        np.multiply(z, x[None, :] * dtype(r0) + (y[:, None] * dtype(r1) + dtype(r2)), out=out[..., axis])
        out[..., axis] += dtype(origin[axis])
    return out
