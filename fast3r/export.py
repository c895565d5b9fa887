"""Reconstructions to files other tools open: PLY, GLB, COLMAP, nerfstudio, NumPy.

All coordinates are in the world frame of the cameras (view 0's camera, OpenCV axes)
unless a format says otherwise: the GLB is turned to glTF's y-up axes, transforms.json holds
OpenGL camera axes. COLMAP and nerfstudio put pixel centres at +0.5 (the image's corner is
0), so their principal point is (W/2 + 0.5, H/2 + 0.5): the same camera as ours, whose
pixel (x, y) is the integer column and row.

``export`` writes a whole set into an output folder: every file is first written into a hidden
staging folder inside it, and only a complete set is moved into place, with ``fast3r.json``
(which files belong to the set) last. A folder holding a previous set is refused unless
``overwrite=True``, which replaces that whole set, never mixes two; a folder holding files that
no export wrote is always refused. An interrupted export (an exception, Ctrl-C) leaves the
folder as it was. The writers on their own write each file to a temporary file beside it and
rename it into place (``os.replace`` is atomic on one filesystem): the old file or none, never
half a file. Files are not fsynced, so this does not cover a power cut. trimesh writes PLY and
GLB, pycolmap the COLMAP model, Pillow the images; they are imported when used so that
``import fast3r`` works without them.

Inputs are checked before anything is written (``ExportError`` names the view, key or name and
the fix). Cameras that are not finite (views ``estimate_cameras`` could not place) are left out
of scene.glb, sparse/0 and transforms.json with a warning; COLMAP gets only the points in front
of the camera of the view they came from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from .cameras import check_preds
from .validation import NONFINITE, POSE_DEFECTS, RIGID_HINT, name_views, pose_defects

FORMATS = ("ply", "glb", "colmap", "nerfstudio", "npz")
FILE_NAMES = {"ply": "points.ply", "glb": "scene.glb", "colmap": "sparse/0", "nerfstudio": "transforms.json",
              "npz": "reconstruction.npz"}
IMAGES_DIR = "images"
MANIFEST = "fast3r.json"  # which entries of the folder the last export wrote; written last
STAGING_PREFIX, TRASH_PREFIX = ".fast3r-new-", ".fast3r-old-"
CAMERA_FORMATS = ("glb", "colmap", "nerfstudio")
BEHIND_WARNING_FRACTION = 0.01  # warn when more of the COLMAP points than this lie behind their camera
DEFAULT_CONF_PERCENTILE = 10.0  # per view, as the official viewer's default
MAX_POINTS = 2_000_000  # PLY / GLB: more than viewers handle smoothly is of little use
MAX_COLMAP_POINTS = 200_000  # each point also adds an observation to images.txt
FRUSTUM_FRACTION = 0.05  # frustum depth as a fraction of the scene's extent
QUANTILE_ELEMENTS = 2**24  # torch.nanquantile's input limit: views per confidence-percentile call
DRAW_MARGIN = 1.01  # draw 1% more than the cap, then trim to exactly the cap
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # flips y and z


class ExportError(ValueError):
    """Inputs that cannot be exported as given, or an output folder that cannot take the set."""


@dataclass
class PointCloud:
    """Points picked from the global pointmaps: world xyz, colour, and where they came from."""

    xyz: np.ndarray  # (P, 3) float32, world frame
    rgb: np.ndarray  # (P, 3) uint8
    view: np.ndarray  # (P,) int64, index of the view
    pixel: np.ndarray  # (P, 2) int64, integer (x, y) in that view

    def __len__(self) -> int:
        return len(self.xyz)

    def subset(self, max_points: int, seed: int = 0) -> PointCloud:
        if len(self) <= max_points:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), max_points, replace=False))
        return PointCloud(self.xyz[keep], self.rgb[keep], self.view[keep], self.pixel[keep])


# ------------------------------------------------------------------------------ atomic
@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the usual permissions, less the umask
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``path``, renamed to ``path`` if the block succeeds (into it, file by file, if
    ``path`` exists); a failed block leaves no ``path`` behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.is_dir():
            for item in sorted(tmp.iterdir()):
                os.replace(item, path / item.name)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ points
def select_points(
    preds: Sequence[dict[str, torch.Tensor]],
    images: Sequence[torch.Tensor],
    *,
    conf_percentile: float = DEFAULT_CONF_PERCENTILE,
    max_points: int | None = None,
    seed: int = 0,
) -> PointCloud:
    """The global points above each view's confidence percentile, at most ``max_points`` of them (a uniform draw).

    images: the uint8 (3, H, W) views the model saw, for colour. max_points: default MAX_POINTS.
    Views of one size are handled together, on the preds' device; only the kept points move.
    """
    max_points = MAX_POINTS if max_points is None else max_points
    if max_points < 1:
        raise ExportError(f"max_points={max_points}; pass at least 1 (or None for {MAX_POINTS})")
    if not 0 <= conf_percentile < 100:
        raise ValueError(f"conf_percentile={conf_percentile}; pass a percentile in [0, 100)")
    chunks = []  # (view indices, (n, H*W, 3) points, (n, H*W) mask of kept pixels)
    for (h, w), indices in _groups_by_size(preds).items():
        rows = max(1, QUANTILE_ELEMENTS // (h * w))
        for start in range(0, len(indices), rows):
            chunk = indices[start : start + rows]
            points = torch.stack([preds[i]["pts3d_in_other_view"].reshape(-1, 3) for i in chunk])
            conf = torch.stack([preds[i]["conf"].reshape(-1) for i in chunk]).float()
            finite = torch.isfinite(points).all(-1) & torch.isfinite(conf)
            conf = torch.where(finite, conf, torch.nan)
            threshold = torch.nanquantile(conf, conf_percentile / 100, dim=1, keepdim=True)  # NaN: no finite point
            chunks.append((chunk, points, finite & (conf >= threshold)))
    total = sum(int(mask.sum()) for _, _, mask in chunks)
    generator = None
    parts = []
    for chunk, points, mask in chunks:
        if total > max_points:  # a uniform draw of about max_points; subset() trims the excess
            if generator is None:
                generator = torch.Generator(device=mask.device).manual_seed(seed)
            draw = torch.rand(mask.shape, generator=generator, device=mask.device)
            mask &= draw < max_points / total * DRAW_MARGIN
        view, pixel = mask.nonzero().unbind(-1)
        w = preds[chunk[0]]["conf"].shape[1]
        xyz = points[view, pixel]
        view, pixel = view.cpu(), pixel.cpu()
        colours = torch.stack([images[i].reshape(3, -1) for i in chunk])[view, :, pixel]
        parts.append((xyz.float().cpu().numpy(), colours.numpy(), torch.tensor(chunk)[view].numpy(),
                      torch.stack((pixel % w, pixel // w), dim=-1).numpy()))
    xyz, rgb, views, pixels = (np.concatenate(p) for p in zip(*parts))
    empty = sorted(set(range(len(preds))) - set(np.unique(views).tolist()))
    if empty and len(empty) < len(preds):
        warnings.warn(f"{name_views(empty)} {'have' if len(empty) > 1 else 'has'} no finite point with a finite "
                      "confidence: nothing of it reaches the point cloud", UserWarning, stacklevel=2)
    order = np.argsort(views, kind="stable")
    cloud = PointCloud(xyz[order], rgb[order].astype(np.uint8), views[order].astype(np.int64),
                       pixels[order].astype(np.int64))
    return cloud.subset(max_points, seed)


# ------------------------------------------------------------------------------ writers
def write_ply(path: str | os.PathLike, cloud: PointCloud) -> Path:
    """Binary PLY: float x, y, z and uchar red, green, blue (trimesh adds alpha)."""
    import trimesh

    data = trimesh.PointCloud(cloud.xyz, colors=cloud.rgb).export(file_type="ply")
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_glb(path: str | os.PathLike, cloud: PointCloud, cameras: dict[str, torch.Tensor],
              sizes: Sequence[tuple[int, int]], *, warn_left_out: bool = True) -> Path:
    """glTF binary: the coloured points and a wire frustum per camera (viridis, first to last), y up.

    The whole scene is turned from OpenCV axes to glTF's (y up, looking down -z), so view 0
    opens as a viewer's default camera would see it. Cameras that are not finite get no frustum.
    """
    import trimesh
    from matplotlib import colormaps
    from trimesh.path import Path3D
    from trimesh.path.entities import Line

    flip = OPENCV_TO_OPENGL[:3, :3].astype(np.float32)
    scene = trimesh.Scene()
    if len(cloud):
        scene.add_geometry(trimesh.PointCloud(cloud.xyz @ flip, colors=cloud.rgb), geom_name="points")
    shown = _finite_cameras(cameras, Path(path).name if warn_left_out else None)
    cam2world = cameras["cam2world"].numpy()[shown]
    k = cameras["intrinsics"].numpy()[shown]
    hw = np.array(sizes, dtype=np.float64).reshape(-1, 2)[shown]  # (N, 2) as (H, W)
    # Apex and image corners (0,0), (W,0), (W,H), (0,H) at the frustum depth, in each camera frame.
    wh = hw[:, ::-1]
    corner_px = np.stack([np.zeros_like(wh), wh * [1, 0], wh, wh * [0, 1]], axis=1)  # (N, 4, 2)
    rays = (corner_px - k[:, None, :2, 2]) / k[:, None, [0, 1], [0, 1]]
    local = np.concatenate([np.zeros((len(hw), 1, 3)), np.concatenate([rays, np.ones((len(hw), 4, 1))], -1)], 1)
    local *= _frustum_depth(cloud, cam2world)
    corners = np.einsum("nij,nkj->nki", cam2world[:, :3, :3], local) + cam2world[:, None, :3, 3]  # (N, 5, 3)
    # One polyline a camera walks all 8 edges (c1-c2 twice): c4 c1 apex c2 c3 apex c4 c3 c2 c1.
    walk = np.array([4, 1, 0, 2, 3, 0, 4, 3, 2, 1])
    entities = [Line(5 * i + walk) for i in range(len(hw))]
    colors = (colormaps["viridis"](np.linspace(0, 1, len(shown)))[shown] * 255).astype(np.uint8)
    if len(hw):
        frusta = Path3D(entities=entities, vertices=corners.reshape(-1, 3) @ flip, colors=colors, process=False)
        scene.add_geometry(frusta, geom_name="cameras")
    data = scene.export(file_type="glb")
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_colmap(directory: str | os.PathLike, cameras: dict[str, torch.Tensor], sizes: Sequence[tuple[int, int]],
                 names: Sequence[str], cloud: PointCloud, *, max_points: int | None = None,
                 warn_left_out: bool = True) -> Path:
    """A COLMAP model (cameras, images, points3D; text and binary) in ``directory``, e.g. ``out/sparse/0``.

    PINHOLE cameras (views with equal size and focal share one); images by ``names``
    (relative to the images folder) with their world-to-camera poses, as COLMAP stores
    them (quaternion w, x, y, z and translation); up to ``max_points`` points (default
    MAX_COLMAP_POINTS), each observed by the view it came from at its pixel centre, with its
    reprojection error. Views whose camera is not finite are left out (COLMAP's unregistered
    images), and so are points behind the camera of their view (no camera could see them; with a
    warning when they are more than 1%). Written by pycolmap, so the rigs and frames files of
    COLMAP >= 3.12 come along.
    """
    import pycolmap

    check_names(names)
    registered = _finite_cameras(cameras, "sparse/0" if warn_left_out else None)
    cam2world = cameras["cam2world"].numpy()
    world_to_cam = np.full_like(cam2world, np.nan)
    world_to_cam[registered] = np.linalg.inv(cam2world[registered])
    cloud = _in_front(cloud, world_to_cam, cameras["intrinsics"].numpy(), sizes)
    cloud = cloud.subset(MAX_COLMAP_POINTS if max_points is None else max_points)
    model = pycolmap.Reconstruction()
    camera_ids: dict[tuple, int] = {}
    order = np.argsort(cloud.view, kind="stable")
    starts = np.searchsorted(cloud.view[order], np.arange(len(names) + 1))
    point2d_idx = np.empty(len(cloud), dtype=np.int64)
    for i, ((h, w), k, name) in enumerate(zip(sizes, cameras["intrinsics"].numpy(), names)):
        if not registered[i]:
            continue
        key = (w, h, float(k[0, 0]), float(k[0, 2]), float(k[1, 2]))
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            model.add_camera_with_trivial_rig(pycolmap.Camera(
                model="PINHOLE", width=w, height=h, camera_id=camera_ids[key],
                params=[k[0, 0], k[1, 1], k[0, 2] + 0.5, k[1, 2] + 0.5]))
        mine = order[starts[i] : starts[i + 1]]
        point2d_idx[mine] = np.arange(len(mine))
        image = pycolmap.Image(name=name, keypoints=cloud.pixel[mine].astype(np.float64) + 0.5,
                               camera_id=camera_ids[key], image_id=i + 1)
        model.add_image_with_trivial_frame(image, pycolmap.Rigid3d(world_to_cam[i, :3]))
    for p in range(len(cloud)):
        track = pycolmap.Track()
        track.add_element(int(cloud.view[p]) + 1, int(point2d_idx[p]))
        model.add_point3D(cloud.xyz[p].astype(np.float64), track, cloud.rgb[p])
    model.update_point_3d_errors()  # each point's reprojection error: how well cameras and points agree
    with atomic_directory(directory) as tmp:
        model.write_text(str(tmp))
        model.write_binary(str(tmp))
    return Path(directory)


def write_nerfstudio(path: str | os.PathLike, cameras: dict[str, torch.Tensor], sizes: Sequence[tuple[int, int]],
                     image_paths: Sequence[str], ply_path: str | None = None, *, warn_left_out: bool = True) -> Path:
    """nerfstudio's transforms.json: per-frame pinhole intrinsics and camera-to-world in OpenGL axes.

    image_paths and ply_path are relative to the file's directory; ``ply_file_path`` lets
    splatfacto start from the point cloud. Views whose camera is not finite get no frame.
    """
    frames = []
    listed = _finite_cameras(cameras, Path(path).name if warn_left_out else None)
    for (h, w), k, pose, image, keep in zip(sizes, cameras["intrinsics"].numpy(), cameras["cam2world"].numpy(),
                                            image_paths, listed):
        if not keep:
            continue
        frames.append({
            "file_path": image, "w": w, "h": h, "fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]),
            "cx": float(k[0, 2]) + 0.5, "cy": float(k[1, 2]) + 0.5,
            "transform_matrix": (pose @ OPENCV_TO_OPENGL).tolist(),
        })
    meta: dict = {"camera_model": "OPENCV", "frames": frames}
    if ply_path is not None:
        meta["ply_file_path"] = ply_path
    with atomic_write(path) as f:
        f.write(json.dumps(meta, indent=2).encode())
    return Path(path)


def write_npz(path: str | os.PathLike, preds: Sequence[dict[str, torch.Tensor]], cameras: dict[str, torch.Tensor],
              images: Sequence[torch.Tensor], names: Sequence[str]) -> Path:
    """The raw outputs, stacked: pts3d, conf, pts3d_local, conf_local, depth (z of pts3d_local), images, cameras.

    Views of different sizes are padded to the largest (NaN for floats, 0 for images);
    ``image_sizes`` (N, 2) holds each view's (H, W).
    """
    sizes = np.array([tuple(view["conf"].shape) for view in preds], dtype=np.int64)
    arrays = {name: _stacked([view[key] for view in preds], sizes, np.nan)
              for name, key in (("pts3d", "pts3d_in_other_view"), ("conf", "conf"), ("pts3d_local", "pts3d_local"),
                                ("conf_local", "conf_local")) if key in preds[0]}
    if "pts3d_local" in arrays:
        arrays["depth"] = arrays["pts3d_local"][..., 2].copy()
    pixels = _stacked([image.permute(1, 2, 0) for image in images], sizes, 0)
    arrays.update(images=pixels, image_sizes=sizes, names=np.array(names),
                  cam2world=cameras["cam2world"].numpy(), intrinsics=cameras["intrinsics"].numpy())
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def write_images(directory: str | os.PathLike, images: Sequence[torch.Tensor], names: Sequence[str]) -> list[Path]:
    """The views as the model saw them, PNG (the cameras' intrinsics refer to these pixels), in parallel."""
    from PIL import Image

    check_names(names)
    directory = Path(directory)

    def save(i: int) -> Path:
        with atomic_write(directory / names[i]) as f:
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(f, format="PNG", compress_level=1)
        return directory / names[i]

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(save, range(len(images))))


# ------------------------------------------------------------------------------ all
def export(
    out_dir: str | os.PathLike,
    formats: str | Sequence[str],
    *,
    preds: Sequence[dict[str, torch.Tensor]],
    images: Sequence[torch.Tensor],
    names: Sequence[str],
    cameras: dict[str, torch.Tensor],
    conf_percentile: float = DEFAULT_CONF_PERCENTILE,
    overwrite: bool = False,
    metadata: dict | None = None,
    on_step: Callable[[str], object] | None = None,
) -> list[Path]:
    """Write the requested formats into ``out_dir`` as one set (file names in FILE_NAMES; images in images/).

    formats: a list, or one comma-separated string ("ply,colmap"). names: one PNG file name per
    view (e.g. ``00000_frame.png``). out_dir must be missing or empty, or hold a previous set and
    ``overwrite=True``: the new set then replaces the old one whole (see ``check_output_dir``).
    metadata: JSON-ready facts about the run, kept in ``fast3r.json`` under "run". on_step is called
    with each step's name as it finishes (for a progress bar). Returns the paths written.
    """
    formats = parse_formats(formats)
    preds, images, cameras = _checked_inputs(preds, images, names, cameras)
    out = Path(out_dir)
    previous = check_output_dir(out, overwrite=overwrite)
    sizes = [tuple(int(s) for s in view["conf"].shape) for view in preds]
    steps: list[tuple[str, list[str]]] = []

    def done(step: str, entries: list[str]) -> None:
        steps.append((step, entries))
        if on_step is not None:
            on_step(step)

    cloud = None
    if {"ply", "glb", "colmap"} & set(formats):
        cloud = select_points(preds, images, conf_percentile=conf_percentile)
        if not len(cloud):
            raise ExportError("no view has a finite point with a finite confidence: nothing to write to "
                              f"{', '.join(FILE_NAMES[f] for f in formats if f in ('ply', 'glb', 'colmap'))}; the "
                              "predictions are NaN (check the model's inputs and weights)")
    if set(CAMERA_FORMATS) & set(formats):
        shown = _finite_cameras(cameras, ", ".join(FILE_NAMES[f] for f in formats if f in CAMERA_FORMATS))
        if not shown.any() and {"colmap", "nerfstudio"} & set(formats):
            raise ExportError("no view has a finite camera: nothing to write to sparse/0 or transforms.json")
    created = make_output_dir(out)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    try:
        if {"colmap", "nerfstudio"} & set(formats):
            write_images(staging / IMAGES_DIR, images, names)
            done("images", [IMAGES_DIR])
        if "ply" in formats:
            write_ply(staging / FILE_NAMES["ply"], cloud)
            done("ply", [FILE_NAMES["ply"]])
        if "glb" in formats:
            write_glb(staging / FILE_NAMES["glb"], cloud, cameras, sizes, warn_left_out=False)
            done("glb", [FILE_NAMES["glb"]])
        if "colmap" in formats:
            write_colmap(staging / FILE_NAMES["colmap"], cameras, sizes, names, cloud, warn_left_out=False)
            done("colmap", [FILE_NAMES["colmap"]])
        if "nerfstudio" in formats:
            ply = FILE_NAMES["ply"] if "ply" in formats else None
            paths = [f"{IMAGES_DIR}/{n}" for n in names]
            write_nerfstudio(staging / FILE_NAMES["nerfstudio"], cameras, sizes, paths, ply, warn_left_out=False)
            done("nerfstudio", [FILE_NAMES["nerfstudio"]])
        if "npz" in formats:
            write_npz(staging / FILE_NAMES["npz"], preds, cameras, images, names)
            done("npz", [FILE_NAMES["npz"]])
        entries = list(dict.fromkeys(name.split("/")[0] for _, written in steps for name in written))
        manifest = {"written_by": "fast3r.export", "formats": formats, "views": len(preds), "files": entries,
                    **({"run": metadata} if metadata else {})}
        with atomic_write(staging / MANIFEST) as f:
            f.write(json.dumps(manifest, indent=2).encode())
        _install(staging, out, entries, previous)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return [out / name for _, written in steps for name in written] + [out / MANIFEST]


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """"ply,colmap" or ["ply", "colmap"] -> ["ply", "colmap"] (lower case, duplicates dropped); unknown ones refused."""
    if isinstance(formats, str):
        formats = formats.split(",")
    formats = list(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    if not formats:
        raise ExportError(f"no export format given; choose from {', '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export formats {unknown}; choose from {', '.join(FORMATS)}")
    return formats


def export_steps(formats: str | Sequence[str]) -> int:
    """How many times ``export`` calls on_step for these formats."""
    formats = parse_formats(formats)
    return len(formats) + bool({"colmap", "nerfstudio"} & set(formats))


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
    """Whether ``out_dir`` can take a new set; returns the entries of the previous set there (replaced whole).

    Accepted: a missing or empty folder (hidden entries such as ``.DS_Store`` are ignored and left
    alone), or, with ``overwrite``, one whose visible entries all belong to a previous set (as its
    fast3r.json lists them). Anything else raises ExportError before any work: a previous set without
    ``overwrite``, and, always, entries that no export wrote, since replacing them could destroy a
    user's files (the photos themselves, say).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output folder {out} is a file; pass a directory (it is created if missing)")
    if not out.exists():
        return []
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)))
    if leftovers:
        warnings.warn(f"{out} holds {', '.join(leftovers)}, left by an export that was killed; remove them to "
                      "free the space", UserWarning, stacklevel=2)
    if not entries:
        return []
    previous = _previous_set(out)
    foreign = [name for name in entries if name not in previous]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"output folder {out} holds files that fast3r did not write ({shown}); pass an empty or "
                          "new folder (a set is only replaced where its fast3r.json lists every file)")
    if not overwrite:
        raise ExportError(f"output folder {out} holds a previous export ({', '.join(entries)}); pass "
                          "overwrite=True (fast3r reconstruct: --overwrite) to replace that whole set, or a new folder")
    return previous


def check_names(names: Sequence[str]) -> None:
    """View names are PNG file names: no path, no whitespace (COLMAP's text files split on it), none twice."""
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ExportError(f"names[{i}] is a {type(name).__name__}; pass one str file name per view")
        problem = None
        if name in ("", ".", "..") or "/" in name or "\\" in name or os.path.isabs(name) or Path(name).name != name:
            problem = "it must be a file name, not a path (it is written as images/<name>)"
        elif any(c.isspace() or not c.isprintable() for c in name):
            problem = "it holds whitespace or control characters, which COLMAP's text files cannot hold"
        elif not name.lower().endswith(".png"):
            problem = "view images are written as PNG: the name must end in .png"
        if problem:
            raise ExportError(f"names[{i}] = {name!r}: {problem}; e.g. {i:05d}_view.png")
    seen: dict[str, int] = {}
    duplicates = []
    for i, name in enumerate(names):
        key = name.casefold()  # case-insensitive file systems (macOS, Windows) would collide too
        if key in seen:
            duplicates.append(f"{names[seen[key]]!r} (view {seen[key]}) and {name!r} (view {i})")
        seen.setdefault(key, i)
    if duplicates:
        raise ExportError(f"duplicate view names: {'; '.join(duplicates[:3])}: each view's image would overwrite "
                          "the other's; give every view its own name (e.g. prefix its index)")


def _checked_inputs(preds, images, names, cameras) -> tuple[list, list[torch.Tensor], dict]:
    """One view each in preds, images, names and cameras, of agreeing sizes -> (preds, CPU images, CPU float64
    cameras); every problem is an ExportError naming the view and the fix."""
    try:
        sizes = check_preds(preds, needs_local=False)
    except (KeyError, ValueError, TypeError) as err:
        raise ExportError(err.args[0]) from err
    if not isinstance(cameras, dict) or any(k not in cameras for k in ("cam2world", "intrinsics")):
        missing = [k for k in ("cam2world", "intrinsics") if not isinstance(cameras, dict) or k not in cameras]
        raise ExportError(f"cameras lacks {missing}; pass what fast3r.estimate_cameras returns")
    counts = (len(preds), len(images), len(names), len(cameras["cam2world"]))
    if len(set(counts)) > 1:
        raise ExportError(f"got {counts[0]} preds, {counts[1]} images, {counts[2]} names and {counts[3]} cameras; "
                          "pass one of each per view, in the same order")
    n = counts[0]
    for key, shape in (("cam2world", (n, 4, 4)), ("intrinsics", (n, 3, 3))):
        if tuple(cameras[key].shape) != shape:
            raise ExportError(f"cameras[{key!r}] has shape {tuple(cameras[key].shape)}; expected {shape}")
    checked = []
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
            what = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
            raise ExportError(f"images[{i}] is {what}; pass the uint8 (3, H, W) views the model saw (from [-1, 1] "
                              "floats: ((x + 1) * 127.5).round().to(torch.uint8))")
        if tuple(image.shape) != (3, h, w):
            raise ExportError(f"images[{i}] has shape {tuple(image.shape)} but preds[{i}] is {h} x {w}; pass the "
                              "(3, H, W) views exactly as the model saw them (their colours are read per pixel)")
        checked.append(image.cpu())
    check_names(names)
    cameras = {k: torch.as_tensor(cameras[k]).detach().to("cpu", torch.float64) for k in ("cam2world", "intrinsics")}
    defects = pose_defects(cameras["cam2world"])
    for code, defect in POSE_DEFECTS.items():
        bad = (defects == code).nonzero()[:, 0].tolist()
        if code != NONFINITE and bad:
            raise ExportError(f"cameras['cam2world'] of {name_views(bad)} is not rigid: it {defect}. {RIGID_HINT}")
    k = cameras["intrinsics"]
    focal = torch.stack((k[:, 0, 0], k[:, 1, 1]), -1)
    bad = (torch.isfinite(focal) & (focal <= 0)).any(-1).nonzero()[:, 0].tolist()
    if bad:
        raise ExportError(f"cameras['intrinsics'] of {name_views(bad)} has a focal length <= 0; pass positive focals "
                          "in pixels")
    return list(preds), checked, cameras


def _finite_cameras(cameras: dict[str, torch.Tensor], where: str | None) -> np.ndarray:
    """(N,) bool: cameras whose pose and intrinsics are finite; a warning names the others and ``where`` they miss."""
    finite = (torch.isfinite(cameras["cam2world"]).flatten(1).all(1)
              & torch.isfinite(cameras["intrinsics"]).flatten(1).all(1)).numpy()
    missing = np.flatnonzero(~finite).tolist()
    if missing and where is not None:
        warnings.warn(f"the camera of {name_views(missing)} is not finite (estimate_cameras could not place it): "
                      f"left out of {where}", UserWarning, stacklevel=3)
    return finite


def _in_front(cloud: PointCloud, world_to_cam: np.ndarray, intrinsics: np.ndarray,
              sizes: Sequence[tuple[int, int]]) -> PointCloud:
    """The points of registered views that their view's camera could see: in front of it (z > 0 in its
    frame) and projecting within the image grown by its own size on every side. A point just in front of
    the camera plane projects arbitrarily far out (its reprojection error would be huge)."""
    cam = np.einsum("pij,pj->pi", world_to_cam[cloud.view, :3, :3], cloud.xyz.astype(np.float64)) \
        + world_to_cam[cloud.view, :3, 3]
    k = intrinsics[cloud.view].astype(np.float64)
    hw = np.asarray(sizes, dtype=np.float64)[cloud.view]
    with np.errstate(invalid="ignore", divide="ignore"):
        u = k[:, 0, 0] * cam[:, 0] / cam[:, 2] + k[:, 0, 2]
        v = k[:, 1, 1] * cam[:, 1] / cam[:, 2] + k[:, 1, 2]
        keep = (cam[:, 2] > 0) & (np.abs(u - hw[:, 1] / 2) < 1.5 * hw[:, 1]) & (np.abs(v - hw[:, 0] / 2) < 1.5 * hw[:, 0])
    registered = np.isfinite(cam[:, 2])  # NaN: an unregistered view
    behind = int((registered & ~keep).sum())
    if behind > BEHIND_WARNING_FRACTION * max(int(registered.sum()), 1):
        warnings.warn(f"{behind} of {int(registered.sum())} points lie behind the camera of their view, or project far "
                      "outside its image: left out of the COLMAP model (cameras and points disagree: untrained "
                      "weights, or a failed pose)", UserWarning, stacklevel=3)
    return PointCloud(cloud.xyz[keep], cloud.rgb[keep], cloud.view[keep], cloud.pixel[keep])


def _previous_set(out: Path) -> list[str]:
    """The entries a previous export wrote into ``out`` (from its fast3r.json), the manifest included; [] if none."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f for f in files):
        return []
    return [*files, MANIFEST]


def _install(staging: Path, out: Path, entries: list[str], previous: list[str]) -> None:
    """Move the previous set aside, the new one in (its manifest last), then drop the old; undone on any failure."""
    trash = Path(tempfile.mkdtemp(dir=out, prefix=TRASH_PREFIX))
    old = [name for name in dict.fromkeys([MANIFEST, *previous]) if name in previous and (out / name).exists()]
    moved_old, moved_new = [], []
    try:
        for name in old:  # the manifest first: a folder never claims a set it does not fully hold
            os.replace(out / name, trash / name)
            moved_old.append(name)
        for name in [*entries, MANIFEST]:
            os.replace(staging / name, out / name)
            moved_new.append(name)
    except BaseException:
        for name in reversed(moved_new):
            os.replace(out / name, staging / name)
        for name in reversed(moved_old):
            os.replace(trash / name, out / name)
        _remove_if_empty(trash)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def make_output_dir(path: str | os.PathLike) -> list[Path]:
    """mkdir -p, refusing a folder that cannot be made or written to (ExportError); returns the directories it
    created, outermost first, for ``remove_created`` after a failure."""
    path = Path(path)
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create output folder {path}: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {path} is not writable; pass a folder you can write to")
    return missing[::-1]


def remove_created(directories: Sequence[Path]) -> None:
    """Remove what ``make_output_dir`` created, innermost first, where it is still empty."""
    for directory in reversed(directories):
        _remove_if_empty(directory)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _stacked(tensors: Sequence[torch.Tensor], sizes: np.ndarray, fill: float) -> np.ndarray:
    """(H_i, W_i, ...) tensors -> one (N, H, W, ...) array, padded with ``fill``; one device transfer if sizes agree."""
    floating = tensors[0].is_floating_point()
    if (sizes == sizes[0]).all():
        stacked = torch.stack(list(tensors))
        return (stacked.float() if floating else stacked).cpu().numpy()
    h, w = sizes.max(0)
    out = np.full((len(tensors), h, w, *tensors[0].shape[2:]), fill, dtype=np.float32 if floating else np.uint8)
    for i, tensor in enumerate(tensors):
        out[i, : sizes[i, 0], : sizes[i, 1]] = (tensor.float() if floating else tensor).cpu().numpy()
    return out


def _groups_by_size(preds: Sequence[dict[str, torch.Tensor]]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, view in enumerate(preds):
        groups.setdefault(tuple(int(s) for s in view["conf"].shape), []).append(i)
    return groups


def _frustum_depth(cloud: PointCloud, cam2world: np.ndarray) -> float:
    """FRUSTUM_FRACTION of the scene's extent: the 5-95 percentile box of the points (or the cameras)."""
    points = cloud.xyz if len(cloud) else cam2world[:, :3, 3]
    if not len(points):
        return 0.1
    low, high = np.percentile(points, [5, 95], axis=0)
    extent = float(np.linalg.norm(high - low))
    return FRUSTUM_FRACTION * extent if extent > 0 else 0.1
