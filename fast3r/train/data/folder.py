"""The folder format: images, depth maps and one ``cameras.json`` (our conventions, no conversion).

    scene/
      cameras.json        {"depth_scale": 0.001,                      # only for 16-bit PNG depth maps
                           "frames": [{"image": "00000.png",          # relative to images/
                                       "depth": "00000.npy",          # relative to depth/ (optional)
                                       "fx": 500.0, "fy": 500.0, "cx": 320.0, "cy": 240.0,
                                       "cam2world": [[...], [...], [...], [0, 0, 0, 1]]}, ...]}
      images/00000.png    any image Pillow reads (PNG, JPEG, ...), stored pixels (EXIF orientation is not applied)
      depth/00000.npy     float (H, W): z in the camera frame, the poses' units; 0 or NaN = unknown
      depth/00000.png     or 16-bit PNG: depth = value * depth_scale; 0 = unknown

``cx, cy`` put the centre of the top-left pixel at (0, 0) (COLMAP's and nerfstudio's cx, cy less
0.5); ``cam2world`` is OpenCV (x right, y down, z forward). Without a "depth" entry a frame's depth
map is ``depth/<image stem>.npy``, else ``.png``. ``load_folder`` checks the whole scene from the
files' headers (names, sizes, cameras, poses); pixels are read per view, when asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...export import atomic_directory
from .scene import Camera, DataError, Scene, check_intrinsics, check_pose, check_view_arrays

CAMERAS_FILE = "cameras.json"
IMAGES_DIR = "images"
DEPTH_DIR = "depth"
FRAME_KEYS = ("image", "fx", "fy", "cx", "cy", "cam2world")
PNG_DEPTH_MAX = 65535


def load_folder(path: str | os.PathLike) -> Scene:
    """A scene in the folder format (see the module docstring); DataError naming file and field for bad data."""
    root = Path(path)
    meta_file = root / CAMERAS_FILE
    if not meta_file.is_file():
        raise DataError(f"{root}: no {CAMERAS_FILE}; a folder-format scene holds {CAMERAS_FILE}, {IMAGES_DIR}/ and "
                        f"{DEPTH_DIR}/ (README, 'Training data')")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{meta_file}: not valid JSON ({err})") from err
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{meta_file}: field 'frames' must be a non-empty list of per-image dicts")
    cameras, depth_files = [], []
    for i, frame in enumerate(frames):
        where = f"{meta_file}: frames[{i}]"
        if not isinstance(frame, dict) or any(k not in frame for k in FRAME_KEYS):
            missing = [k for k in FRAME_KEYS if not isinstance(frame, dict) or k not in frame]
            raise DataError(f"{where}: missing field(s) {missing}; each frame needs {', '.join(FRAME_KEYS)}")
        where = f"{meta_file}: frames[{i}] ({frame['image']})"
        image_file = root / IMAGES_DIR / _relative(frame["image"], f"{where}: field 'image'")
        depth_file = _depth_file(root, frame, where)
        size = image_size(image_file)
        depth_size = _depth_size(depth_file, meta, meta_file)
        if depth_size != size:
            raise DataError(f"{depth_file}: depth map is {depth_size[1]}x{depth_size[0]} but image {image_file} is "
                            f"{size[1]}x{size[0]} (W x H); depth and image must have the same size")
        try:
            k = np.array([[frame["fx"], 0, frame["cx"]], [0, frame["fy"], frame["cy"]], [0, 0, 1]], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}: fields fx, fy, cx, cy must be numbers ({err})") from err
        k = check_intrinsics(k, f"{where}: fields fx, fy, cx, cy")
        try:
            pose = np.array(frame["cam2world"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}: field 'cam2world' must be a 4x4 list of numbers ({err})") from err
        cameras.append(Camera(str(frame["image"]), size, k, check_pose(pose, f"{where}: field 'cam2world'")))
        depth_files.append(depth_file)
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{meta_file}: image {duplicate} is listed twice in 'frames'")
    return Scene(str(root), cameras, FolderReader(root, cameras, depth_files, meta.get("depth_scale")))


class FolderReader:
    """Reads one view's image and depth map of a folder-format scene."""

    def __init__(self, root: Path, cameras: list[Camera], depth_files: list[Path], depth_scale: float | None) -> None:
        self.root, self.cameras, self.depth_files, self.depth_scale = root, cameras, depth_files, depth_scale

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        camera = self.cameras[index]
        image_file = self.root / IMAGES_DIR / camera.name
        image = read_image(image_file)
        depth = read_depth(self.depth_files[index], self.depth_scale)
        check_view_arrays(image, depth, camera, str(image_file), str(self.depth_files[index]))
        return image, depth


@contextmanager
def new_scene_directory(out: Path) -> Iterator[Path]:
    """A staging directory that becomes ``out`` when the block succeeds (all or nothing); ``out`` must be new
    or an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; pass a new path")
    with atomic_directory(out) as tmp:
        yield tmp


def save_folder(scene: Scene, path: str | os.PathLike, *, depth_format: str = "npy", depth_scale: float = 1e-3) -> Path:
    """Write ``scene`` in the folder format into the new directory ``path`` (all or nothing).

    depth_format: "npy" (float32, exact) or "png" (16-bit, depth / depth_scale rounded; unknown and
    NaN become 0, depths above 65535 * depth_scale are refused). Images keep their names; the
    extension picks the encoding (PNG lossless, JPEG at quality 95).
    """
    if depth_format not in ("npy", "png"):
        raise ValueError(f"depth_format={depth_format!r}; choose 'npy' or 'png'")
    out = Path(path)
    with new_scene_directory(out) as tmp:
        frames = []
        for view in scene.views:
            image_name = PurePosixPath(view["name"])
            depth_name = image_name.with_suffix(f".{depth_format}")
            write_image(tmp / IMAGES_DIR / image_name, view["image"])
            depth_file = tmp / DEPTH_DIR / depth_name
            depth_file.parent.mkdir(parents=True, exist_ok=True)
            if depth_format == "npy":
                np.save(depth_file, np.asarray(view["depth"], dtype=np.float32))
            else:
                Image.fromarray(_depth_to_png(view["depth"], depth_scale, view["name"])).save(depth_file)
            k = view["intrinsics"]
            frames.append({"image": str(image_name), "depth": str(depth_name), "fx": float(k[0, 0]),
                           "fy": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2]),
                           "cam2world": np.asarray(view["cam2world"], dtype=np.float64).tolist()})
        meta = {"frames": frames} | ({"depth_scale": depth_scale} if depth_format == "png" else {})
        (tmp / CAMERAS_FILE).write_text(json.dumps(meta, indent=1))
    return out


# ------------------------------------------------------------------------------ files
def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file as stored; DataError if missing or unreadable."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # writable, unlike np.asarray of a Pillow image
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from err


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, quality=95)


def read_depth(path: Path, depth_scale: float | None) -> np.ndarray:
    """A float32 (H, W) depth map from ``.npy`` (float) or 16-bit ``.png`` (times depth_scale; 0 stays unknown)."""
    if path.suffix == ".npy":
        try:
            depth = np.load(path, allow_pickle=False)
        except FileNotFoundError as err:
            raise DataError(f"{path}: depth file does not exist") from err
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: cannot read depth map ({err})") from err
        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
            raise DataError(f"{path}: depth map has shape {depth.shape} and dtype {depth.dtype}; expected a float "
                            "(H, W) array")
        return depth.astype(np.float32, copy=False)
    try:
        with Image.open(path) as img:
            _check_png_depth_mode(img.mode, path)
            values = np.asarray(img)
    except FileNotFoundError as err:
        raise DataError(f"{path}: depth file does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read depth map ({err})") from err
    return values.astype(np.float32) * np.float32(depth_scale)


def _depth_to_png(depth: np.ndarray, scale: float, name: str) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float64)
    known = np.isfinite(depth) & (depth > 0)
    steps = np.where(known, np.round(np.where(known, depth, 0) / scale), 0)
    if steps.max(initial=0) > PNG_DEPTH_MAX:
        raise ValueError(f"view {name}: depth up to {depth[known].max():.4g} does not fit a 16-bit PNG at "
                         f"depth_scale={scale}; pass a larger depth_scale or depth_format='npy'")
    return steps.astype(np.uint16)


def _check_png_depth_mode(mode: str, path: Path) -> None:
    if mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"{path}: depth PNG has mode {mode}; expected a 16-bit single-channel PNG "
                        "(or a float .npy file)")


def _relative(name: object, where: str) -> PurePosixPath:
    if not isinstance(name, str) or not name:
        raise DataError(f"{where} must be a file name, got {name!r}")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DataError(f"{where} = {name!r} must be relative to its folder, without '..'")
    return relative


def _depth_file(root: Path, frame: dict, where: str) -> Path:
    if "depth" in frame:
        return root / DEPTH_DIR / _relative(frame["depth"], f"{where}: field 'depth'")
    stem = PurePosixPath(frame["image"]).with_suffix("")
    for suffix in (".npy", ".png"):
        candidate = root / DEPTH_DIR / stem.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise DataError(f"{where}: image without depth: neither {root / DEPTH_DIR / stem}.npy nor .png exists (or name "
                    "the file in the frame's 'depth' field)")


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header."""
    try:
        with Image.open(path) as img:  # reads the header only
            return img.height, img.width
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from err


def _depth_size(path: Path, meta: dict, meta_file: Path) -> tuple[int, int]:
    """(H, W) of a depth map from its header (the .npy header, the PNG header)."""
    if not path.is_file():
        raise DataError(f"{path}: image without depth: the depth file does not exist")
    if path.suffix == ".npy":
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: cannot read depth map ({err})") from err
        return tuple(shape[:2]) if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else tuple(shape)
    if path.suffix != ".png":
        raise DataError(f"{path}: depth maps must be .npy (float) or .png (16-bit)")
    scale = meta.get("depth_scale")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise DataError(f"{meta_file}: field 'depth_scale' must be a number > 0 (scene units per PNG step, e.g. "
                        f"0.001 for millimetres) when depth maps are PNG ({path.name}); got {scale!r}")
    try:
        with Image.open(path) as img:
            _check_png_depth_mode(img.mode, path)
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read depth map ({err})") from err
