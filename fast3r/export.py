"""Reconstructions to files other tools open: PLY, GLB, COLMAP, nerfstudio, NumPy.

All coordinates are in the world frame of the cameras (view 0's camera, OpenCV axes)
unless a format says otherwise: the GLB is turned to glTF's y-up axes, transforms.json holds
OpenGL camera axes. COLMAP and nerfstudio put pixel centres at +0.5 (the image's corner is
0), so their principal point is (W/2 + 0.5, H/2 + 0.5): the same camera as ours, whose
pixel (x, y) is the integer column and row.

Every file is written to a temporary file in its own directory and renamed into place
(``os.replace`` is atomic on one filesystem): an interrupted export (an exception, Ctrl-C, a
killed process) leaves the old file or none, never half a file. Files are not fsynced, so
this does not cover a power cut. trimesh writes PLY and GLB, pycolmap the COLMAP model,
Pillow the images; they are imported when used so that ``import fast3r`` works without them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

FORMATS = ("ply", "glb", "colmap", "nerfstudio", "npz")
FILE_NAMES = {"ply": "points.ply", "glb": "scene.glb", "colmap": "sparse/0", "nerfstudio": "transforms.json",
              "npz": "reconstruction.npz"}
IMAGES_DIR = "images"
DEFAULT_CONF_PERCENTILE = 10.0  # per view, as the official viewer's default
MAX_POINTS = 2_000_000  # PLY / GLB: more than viewers handle smoothly is of little use
MAX_COLMAP_POINTS = 200_000  # each point also adds an observation to images.txt
FRUSTUM_FRACTION = 0.05  # frustum depth as a fraction of the scene's extent
QUANTILE_ELEMENTS = 2**24  # torch.nanquantile's input limit: views per confidence-percentile call
DRAW_MARGIN = 1.01  # draw 1% more than the cap, then trim to exactly the cap
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # flips y and z


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
    """A temporary directory beside ``path``; its files are renamed into ``path`` one by one if the block succeeds."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for item in sorted(tmp.iterdir()):
            os.replace(item, path / item.name)
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
              sizes: Sequence[tuple[int, int]]) -> Path:
    """glTF binary: the coloured points and a wire frustum per camera (viridis, first to last), y up.

    The whole scene is turned from OpenCV axes to glTF's (y up, looking down -z), so view 0
    opens as a viewer's default camera would see it.
    """
    import trimesh
    from matplotlib import colormaps
    from trimesh.path import Path3D
    from trimesh.path.entities import Line

    flip = OPENCV_TO_OPENGL[:3, :3].astype(np.float32)
    scene = trimesh.Scene()
    if len(cloud):
        scene.add_geometry(trimesh.PointCloud(cloud.xyz @ flip, colors=cloud.rgb), geom_name="points")
    cam2world = cameras["cam2world"].numpy()
    k = cameras["intrinsics"].numpy()
    hw = np.array(sizes, dtype=np.float64)  # (N, 2) as (H, W)
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
    colors = (colormaps["viridis"](np.linspace(0, 1, len(hw))) * 255).astype(np.uint8)
    frusta = Path3D(entities=entities, vertices=corners.reshape(-1, 3) @ flip, colors=colors, process=False)
    scene.add_geometry(frusta, geom_name="cameras")
    data = scene.export(file_type="glb")
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_colmap(directory: str | os.PathLike, cameras: dict[str, torch.Tensor], sizes: Sequence[tuple[int, int]],
                 names: Sequence[str], cloud: PointCloud, *, max_points: int | None = None) -> Path:
    """A COLMAP model (cameras, images, points3D; text and binary) in ``directory``, e.g. ``out/sparse/0``.

    PINHOLE cameras (views with equal size and focal share one); images by ``names``
    (relative to the images folder) with their world-to-camera poses, as COLMAP stores
    them (quaternion w, x, y, z and translation); up to ``max_points`` points (default
    MAX_COLMAP_POINTS), each observed by the view it came from at its pixel centre, with its
    reprojection error. Written by pycolmap, so the rigs and frames files of COLMAP >= 3.12
    come along.
    """
    import pycolmap

    cloud = cloud.subset(MAX_COLMAP_POINTS if max_points is None else max_points)
    model = pycolmap.Reconstruction()
    camera_ids: dict[tuple, int] = {}
    order = np.argsort(cloud.view, kind="stable")
    starts = np.searchsorted(cloud.view[order], np.arange(len(names) + 1))
    point2d_idx = np.empty(len(cloud), dtype=np.int64)
    for i, ((h, w), k, pose, name) in enumerate(zip(sizes, cameras["intrinsics"].numpy(),
                                                    cameras["cam2world"].numpy(), names)):
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
        world_to_cam = np.linalg.inv(pose)[:3]
        model.add_image_with_trivial_frame(image, pycolmap.Rigid3d(world_to_cam))
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
                     image_paths: Sequence[str], ply_path: str | None = None) -> Path:
    """nerfstudio's transforms.json: per-frame pinhole intrinsics and camera-to-world in OpenGL axes.

    image_paths and ply_path are relative to the file's directory; ``ply_file_path`` lets
    splatfacto start from the point cloud.
    """
    frames = []
    for (h, w), k, pose, image in zip(sizes, cameras["intrinsics"].numpy(), cameras["cam2world"].numpy(),
                                      image_paths):
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
    formats: Sequence[str],
    *,
    preds: Sequence[dict[str, torch.Tensor]],
    images: Sequence[torch.Tensor],
    names: Sequence[str],
    cameras: dict[str, torch.Tensor],
    conf_percentile: float = DEFAULT_CONF_PERCENTILE,
    on_step: Callable[[str], object] | None = None,
) -> list[Path]:
    """Write the requested formats into ``out_dir`` (file names in FILE_NAMES; images in images/).

    names: one PNG file name per view (e.g. ``00000_frame.png``). on_step is called with
    each step's name as it finishes (for a progress bar). Returns the paths written.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; choose from {', '.join(FORMATS)}")
    out = Path(out_dir)
    sizes = [tuple(int(s) for s in view["conf"].shape) for view in preds]
    written: list[Path] = []

    def done(step: str, paths: Sequence[Path]) -> None:
        written.extend(paths)
        if on_step is not None:
            on_step(step)

    cloud = select_points(preds, images, conf_percentile=conf_percentile) if {"ply", "glb", "colmap"} & set(formats) \
        else None
    if {"colmap", "nerfstudio"} & set(formats):
        write_images(out / IMAGES_DIR, images, names)
        done("images", [out / IMAGES_DIR])
    if "ply" in formats:
        done("ply", [write_ply(out / FILE_NAMES["ply"], cloud)])
    if "glb" in formats:
        done("glb", [write_glb(out / FILE_NAMES["glb"], cloud, cameras, sizes)])
    if "colmap" in formats:
        done("colmap", [write_colmap(out / FILE_NAMES["colmap"], cameras, sizes, names, cloud)])
    if "nerfstudio" in formats:
        ply = FILE_NAMES["ply"] if "ply" in formats else None
        paths = [f"{IMAGES_DIR}/{n}" for n in names]
        done("nerfstudio", [write_nerfstudio(out / FILE_NAMES["nerfstudio"], cameras, sizes, paths, ply)])
    if "npz" in formats:
        done("npz", [write_npz(out / FILE_NAMES["npz"], preds, cameras, images, names)])
    return written


def export_steps(formats: Sequence[str]) -> int:
    """How many times ``export`` calls on_step for these formats."""
    return len(set(formats) & set(FORMATS)) + bool({"colmap", "nerfstudio"} & set(formats))


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
    low, high = np.percentile(points, [5, 95], axis=0)
    extent = float(np.linalg.norm(high - low))
    return FRUSTUM_FRACTION * extent if extent > 0 else 0.1
