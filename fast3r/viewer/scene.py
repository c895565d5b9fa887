"""A scene folder of ``fast3r reconstruct`` read for the viewer: its predictions, and a point budget drawn from them.

The viewer reads ``reconstruction.npz`` (pointmaps, confidences, views, cameras); the other
files of the folder hold less (points.ply has no confidences, no view per point). At 1500
views of 224 px that file is 2.9 GB, so nothing is read whole: ``np.savez`` stores its
members uncompressed, and each member is mapped from the file (``np.memmap`` at the array's
offset inside the zip). Only the pixels of the point budget are then read: a uniform draw
of ``max_points`` pixels over all views (each view's share in proportion to its pixels),
gathered in file order, ~2 x 12 bytes a point for points and confidence.

A point's confidence percentile is its rank among its view's drawn points (the export's
``--conf-percentile`` is per view too, over all of the view's pixels): the slider keeps the
points at or above it without looking at the data again.
"""

from __future__ import annotations

import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..export import FILE_NAMES

NPZ = FILE_NAMES["npz"]
REQUIRED = ("pts3d", "conf", "images", "image_sizes", "cam2world", "intrinsics")
LOCAL = ("pts3d_local", "conf_local")
DEFAULT_MAX_POINTS = 1_000_000  # Potree's default point budget: smooth on a laptop's integrated GPU
PERCENTILES = 100  # confidence-percentile steps: 0, 1, ..., 99
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # the 30 bytes before a member's name


class NotAReconstructionError(ValueError):
    """The folder given to ``fast3r view`` is not one that ``fast3r reconstruct`` wrote (or lacks its npz)."""


@dataclass
class Scene:
    """The arrays of one reconstruction.npz; the large ones are read-only memory maps of the file."""

    directory: Path
    pts3d: np.ndarray  # (N, H, W, 3) float32, world frame (view 0's camera); NaN where a smaller view is padded
    conf: np.ndarray  # (N, H, W)
    images: np.ndarray  # (N, H, W, 3) uint8
    sizes: np.ndarray  # (N, 2) int64, each view's (H, W)
    cam2world: np.ndarray  # (N, 4, 4) float64, OpenCV axes
    intrinsics: np.ndarray  # (N, 3, 3) float64
    names: list[str]
    pts3d_local: np.ndarray | None  # (N, H, W, 3), each view's own camera frame and scale
    conf_local: np.ndarray | None

    @property
    def n_views(self) -> int:
        return len(self.sizes)

    @property
    def n_pixels(self) -> int:
        """Points in all pointmaps (one per pixel), what the budget is drawn from."""
        return int(self.sizes.prod(1).sum())

    @property
    def has_local(self) -> bool:
        return self.pts3d_local is not None


@dataclass
class Pixels:
    """The pixels of the point budget: view and flat index into the (padded) H x W map, in file order."""

    view: np.ndarray  # (P,) int64
    index: np.ndarray  # (P,) int64, y * W_padded + x


@dataclass
class Points:
    """Points to draw: world xyz, colour, their view, and their confidence percentile within the view."""

    xyz: np.ndarray  # (P, 3) float32
    rgb: np.ndarray  # (P, 3) uint8
    view: np.ndarray  # (P,) int32
    percentile: np.ndarray  # (P,) uint8 in [0, PERCENTILES)

    def __len__(self) -> int:
        return len(self.xyz)


# ------------------------------------------------------------------------------ reading
def open_scene(directory: str | Path) -> Scene:
    """Map the reconstruction.npz of a ``fast3r reconstruct`` folder; raises NotAReconstructionError naming what is wrong."""
    directory = Path(directory)
    if not directory.exists():
        raise NotAReconstructionError(f"{directory} does not exist; pass the --out folder of `fast3r reconstruct`")
    if not directory.is_dir():
        raise NotAReconstructionError(f"{directory} is a file; pass the --out folder of `fast3r reconstruct`")
    path = directory / NPZ
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:8]
        has = f"it holds {', '.join(present)}" if present else "it is empty"
        raise NotAReconstructionError(
            f"{directory} has no {NPZ} ({has}); the viewer reads the predictions from it. Write it with "
            f"`fast3r reconstruct INPUT... --out {directory}` (npz is in the default --export)")
    arrays = _map_npz(path)
    missing = [key for key in REQUIRED if key not in arrays]
    if missing:
        raise NotAReconstructionError(f"{path} lacks {', '.join(missing)}: not a file `fast3r reconstruct` wrote")
    pts3d, conf, images = arrays["pts3d"], arrays["conf"], arrays["images"]
    n, h, w = conf.shape if conf.ndim == 3 else (0, 0, 0)
    expected = {"pts3d": (n, h, w, 3), "conf": (n, h, w), "images": (n, h, w, 3), "image_sizes": (n, 2),
                "cam2world": (n, 4, 4), "intrinsics": (n, 3, 3)}
    if "pts3d_local" in arrays:
        expected.update(pts3d_local=(n, h, w, 3), conf_local=(n, h, w))
    for key, shape in expected.items():
        if key not in arrays or arrays[key].shape != shape:
            got = arrays[key].shape if key in arrays else "missing"
            raise NotAReconstructionError(f"{path}: {key} has shape {got}, expected {shape} (N views of H x W)")
    if n == 0:
        raise NotAReconstructionError(f"{path} holds no views")
    sizes = np.asarray(arrays["image_sizes"], dtype=np.int64)
    if (sizes < 1).any() or (sizes > [h, w]).any():
        raise NotAReconstructionError(f"{path}: image_sizes must lie within the stored {h} x {w} maps")
    names = [str(s) for s in arrays["names"]] if "names" in arrays else [f"view {i}" for i in range(n)]
    return Scene(directory=directory, pts3d=pts3d, conf=conf, images=images, sizes=sizes,
                 cam2world=np.asarray(arrays["cam2world"], dtype=np.float64),
                 intrinsics=np.asarray(arrays["intrinsics"], dtype=np.float64), names=names,
                 pts3d_local=arrays.get("pts3d_local"), conf_local=arrays.get("conf_local"))


def _map_npz(path: Path) -> dict[str, np.ndarray]:
    """Each member of an npz as a read-only memory map (stored members) or an array (compressed ones)."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            arrays = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                if info.compress_type != zipfile.ZIP_STORED:  # np.savez_compressed: read it whole
                    arrays[key] = np.load(archive.open(info), allow_pickle=False)
                    continue
                f.seek(info.header_offset)
                fields = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
                f.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10])
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                if dtype.hasobject:
                    raise NotAReconstructionError(f"{path}: {key} holds Python objects; not a file fast3r wrote")
                if math.prod(shape) == 0:
                    arrays[key] = np.empty(shape, dtype)
                    continue
                arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                        order="F" if fortran else "C")
            return arrays
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        if isinstance(err, NotAReconstructionError):
            raise
        raise NotAReconstructionError(f"{path} is not a readable npz ({err}); write it again with "
                                      "`fast3r reconstruct`") from err


# ------------------------------------------------------------------------------ the budget
def draw_pixels(scene: Scene, max_points: int = DEFAULT_MAX_POINTS, seed: int = 0) -> Pixels:
    """A uniform draw of at most ``max_points`` pixels, each view's share in proportion to its pixel count.

    Views of one size share a random permutation of their pixels; view j takes the j-th
    window of it, so views see different pixels and no pixel twice. Sorted by view and
    pixel, so gathering them reads the file front to back.
    """
    if max_points < 1:
        raise ValueError(f"max_points={max_points}; pass a point budget of at least 1")
    rng = np.random.default_rng(seed)
    width = scene.conf.shape[2]
    fraction = min(1.0, max_points / scene.n_pixels)
    views, indices = [], []
    for (h, w), members in _groups_by_size(scene.sizes).items():
        per_view = max(1, math.floor(h * w * fraction))
        if per_view >= h * w:
            chosen = np.broadcast_to(np.arange(h * w), (len(members), h * w))
        else:
            permutation = rng.permutation(h * w)
            windows = np.arange(len(members))[:, None] * per_view + np.arange(per_view)
            chosen = np.sort(permutation[windows % (h * w)], axis=1)
        views.append(np.repeat(members, chosen.shape[1]))
        indices.append(((chosen // w) * width + chosen % w).reshape(-1))
    view, index = np.concatenate(views), np.concatenate(indices)
    order = np.lexsort((index, view))
    return Pixels(view=view[order], index=index[order])


def global_points(scene: Scene, pixels: Pixels) -> Points:
    """The global pointmaps at the drawn pixels: world points, colours, confidence percentiles."""
    xyz = _gather(scene.pts3d, pixels).astype(np.float32, copy=False)
    conf = _gather(scene.conf, pixels)
    return _finite_points(xyz, conf, _gather(scene.images, pixels), pixels.view)


def local_points(scene: Scene, pixels: Pixels) -> Points:
    """The local pointmaps at the drawn pixels, each view's placed in the world by a similarity fit to its global one.

    The same fit as the official viewer's local-to-global alignment: per view, the Umeyama
    similarity (scale, rotation, translation) of the local points onto the global ones,
    weighted by conf x conf_local (``fast3r.cameras.umeyama``, as the procrustes cameras).
    Fitted on the drawn pixels only. Percentiles rank ``conf_local``.
    """
    import torch

    from ..cameras import umeyama

    if not scene.has_local:
        raise NotAReconstructionError(f"{scene.directory / NPZ} has no local pointmaps (pts3d_local)")
    local = _gather(scene.pts3d_local, pixels).astype(np.float64)
    world = _gather(scene.pts3d, pixels).astype(np.float64)
    conf_local = _gather(scene.conf_local, pixels)
    weights = np.nan_to_num(_gather(scene.conf, pixels).astype(np.float64) * conf_local, nan=0.0, posinf=0.0,
                            neginf=0.0)
    weights *= np.isfinite(local).all(-1) & np.isfinite(world).all(-1)
    placed = np.full_like(local, np.nan)
    counts = np.bincount(pixels.view, minlength=scene.n_views)
    first = np.cumsum(counts) - counts
    for k in np.unique(counts[counts > 0]):  # views with as many samples fit in one batch
        rows = first[counts == k][:, None] + np.arange(k)  # (n, k) sample indices
        src, dst = (torch.from_numpy(np.nan_to_num(a[rows], nan=0.0, posinf=0.0, neginf=0.0)) for a in (local, world))
        scale, rotation, translation = umeyama(src, dst, torch.from_numpy(weights[rows]))
        moved = scale[:, None, None] * torch.einsum("nij,npj->npi", rotation, src) + translation[:, None]
        placed[rows] = np.where(np.isfinite(local[rows]), moved.numpy(), np.nan)
    return _finite_points(placed.astype(np.float32), conf_local, _gather(scene.images, pixels), pixels.view)


def thumbnail(scene: Scene, view: int, long_side: int) -> np.ndarray:
    """View ``view``'s image with its long side at most ``long_side`` pixels (every k-th pixel), (h, w, 3) uint8."""
    h, w = scene.sizes[view]
    step = max(1, math.ceil(max(h, w) / long_side))
    return np.ascontiguousarray(scene.images[view, :h:step, :w:step])


def scene_extent(points: np.ndarray, cam2world: np.ndarray) -> float:
    """Diagonal of the 5-95 percentile box of the points (of the camera centres if there are none)."""
    box = points if len(points) else cam2world[:, :3, 3]
    low, high = np.percentile(box, [5, 95], axis=0)
    extent = float(np.linalg.norm(high - low))
    return extent if extent > 0 else 1.0


# ------------------------------------------------------------------------------ helpers
def _gather(array: np.ndarray, pixels: Pixels) -> np.ndarray:
    """array (N, H, W, ...) at the pixels -> (P, ...); reads only the pages that hold them."""
    n, h, w = array.shape[:3]
    return array.reshape(n, h * w, *array.shape[3:])[pixels.view, pixels.index]


def _finite_points(xyz: np.ndarray, conf: np.ndarray, rgb: np.ndarray, view: np.ndarray) -> Points:
    """Drop non-finite points; rank each point's confidence among its view's finite points, in percent."""
    keep = np.isfinite(xyz).all(-1) & np.isfinite(conf)
    xyz, conf, rgb, view = xyz[keep], conf[keep], rgb[keep], view[keep]
    order = np.lexsort((conf, view))  # by view, then confidence
    counts = np.bincount(view, minlength=int(view.max(initial=-1)) + 1)
    first = np.cumsum(counts) - counts
    rank = np.empty(len(view), dtype=np.int64)
    rank[order] = np.arange(len(view)) - first[view[order]]
    percentile = (rank * PERCENTILES) // counts[view]
    return Points(xyz=np.ascontiguousarray(xyz), rgb=np.ascontiguousarray(rgb), view=view.astype(np.int32),
                  percentile=percentile.astype(np.uint8))


def _groups_by_size(sizes: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault((int(h), int(w)), []).append(i)
    return {size: np.array(members) for size, members in groups.items()}

