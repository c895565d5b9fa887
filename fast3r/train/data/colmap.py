"""COLMAP dense workspaces: the undistorted sparse model, its images and the MVS depth maps, through pycolmap.

    workspace/                  what `colmap image_undistorter` writes, then `colmap patch_match_stereo`
      images/<name>             undistorted images
      sparse/                   cameras, images, points3D (.bin or .txt; sparse/0/ is accepted too)
      stereo/depth_maps/<name>.geometric.bin   (or .photometric.bin): COLMAP's float depth maps

pycolmap reads the model (``pycolmap.Reconstruction``) and the depth maps (``pycolmap.DepthMap``)
and writes both (``save_colmap``); the one thing read by hand is a depth map's text header
("width&height&channels&"), so that ``load_colmap`` checks every map's size without reading its
pixels (pycolmap reads whole maps only). Only PINHOLE and SIMPLE_PINHOLE cameras are accepted: any
other model has distortion, which the image undistorter removes (the error gives the command).
COLMAP's pixel centres are at +0.5, so our cx, cy are COLMAP's less 0.5. Registered images only
(those with a pose), in name order. Per scene, geometric depth maps when every image has one, else
photometric ones when every image has one; any image without either is an error naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .folder import IMAGES_DIR, image_size, new_scene_directory, read_image, write_image
from .scene import Camera, DataError, Scene, check_intrinsics, check_pose, check_view_arrays

PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
DEPTH_DIR = Path("stereo") / "depth_maps"
DEPTH_KINDS = ("geometric", "photometric")
MODEL_FILES = ("cameras.bin", "cameras.txt")


def load_colmap(path: str | os.PathLike) -> Scene:
    """A scene from a COLMAP dense workspace (see the module docstring); DataError naming file and field."""
    pycolmap = _pycolmap()
    root = Path(path)
    model_dir = _model_dir(root)
    try:
        model = pycolmap.Reconstruction(str(model_dir))
    except Exception as err:  # pycolmap raises ValueError / RuntimeError with COLMAP's own message
        raise DataError(f"{model_dir}: pycolmap cannot read the sparse model ({err})") from err
    images = sorted((image for image in model.images.values() if image.has_pose), key=lambda image: image.name)
    if not images:
        raise DataError(f"{model_dir}: the sparse model has no registered images")
    kind = _depth_kind(root, [image.name for image in images])
    cameras = []
    for image in images:
        camera = model.cameras[image.camera_id]
        where = f"{model_dir}: image {image.name} (camera {image.camera_id})"
        if camera.model.name not in PINHOLE_MODELS:
            raise DataError(
                f"{where}: camera model {camera.model.name} is not a pinhole camera; training needs PINHOLE or "
                f"SIMPLE_PINHOLE images without distortion. Undistort the model first:\n"
                f"  colmap image_undistorter --image_path <your images> --input_path {model_dir} "
                f"--output_path <workspace> --output_type COLMAP\n"
                f"  colmap patch_match_stereo --workspace_path <workspace>\n"
                f"and load <workspace>")
        k = check_intrinsics(camera.calibration_matrix() - np.array([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]]),
                             f"{where}: camera params {list(camera.params)}")
        world_to_cam = np.eye(4)
        world_to_cam[:3] = image.cam_from_world().matrix()
        if not np.isfinite(world_to_cam).all():
            raise DataError(f"{where}: the pose (cam_from_world) has non-finite entries: {world_to_cam[:3].tolist()}")
        pose = check_pose(np.linalg.inv(world_to_cam), f"{where}: pose (cam_from_world)")
        size = (int(camera.height), int(camera.width))
        image_file = root / IMAGES_DIR / image.name
        stored = image_size(image_file)
        if stored != size:
            raise DataError(f"{image_file}: image is {stored[1]}x{stored[0]} but its camera {image.camera_id} "
                            f"in {model_dir} is {size[1]}x{size[0]} (W x H)")
        depth_file = depth_path(root, image.name, kind)
        depth_size = _depth_size(depth_file)
        if depth_size != size:
            raise DataError(f"{depth_file}: depth map is {depth_size[1]}x{depth_size[0]} but image {image_file} is "
                            f"{size[1]}x{size[0]} (W x H); depth and image must have the same size (run "
                            "patch_match_stereo with --PatchMatchStereo.max_image_size -1, or resize the images and "
                            "cameras to the depth maps)")
        cameras.append(Camera(image.name, size, k, pose))
    return Scene(str(root), cameras, ColmapReader(root, cameras, kind))


class ColmapReader:
    """Reads one view's undistorted image and its COLMAP depth map (pycolmap.DepthMap)."""

    def __init__(self, root: Path, cameras: list[Camera], kind: str) -> None:
        self.root, self.cameras, self.kind = root, cameras, kind

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        camera = self.cameras[index]
        image_file = self.root / IMAGES_DIR / camera.name
        depth_file = depth_path(self.root, camera.name, self.kind)
        image = read_image(image_file)
        _check_depth_file(depth_file)
        depth_map = _pycolmap().DepthMap()
        try:
            depth_map.read(str(depth_file))
        except Exception as err:  # COLMAP's checks raise ValueError / RuntimeError
            raise DataError(f"{depth_file}: pycolmap cannot read the depth map ({err})") from err
        depth = depth_map.to_array()
        check_view_arrays(image, depth, camera, str(image_file), str(depth_file))
        return image, depth


def save_colmap(scene: Scene, path: str | os.PathLike, *, kind: str = "geometric") -> Path:
    """Write ``scene`` as a COLMAP dense workspace into the new directory ``path`` (all or nothing).

    One PINHOLE camera per distinct (size, intrinsics), images under their names, the sparse model
    in binary (pycolmap, no 3-D points), and each depth map as ``<name>.<kind>.bin`` (pycolmap).
    """
    if kind not in DEPTH_KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {DEPTH_KINDS}")
    pycolmap = _pycolmap()
    out = Path(path)
    with new_scene_directory(out) as tmp:
        model = pycolmap.Reconstruction()
        camera_ids: dict[tuple, int] = {}
        for i, view in enumerate(scene.views):
            h, w = np.asarray(view["depth"]).shape
            k = np.asarray(view["intrinsics"], dtype=np.float64)
            params = (float(k[0, 0]), float(k[1, 1]), float(k[0, 2]) + 0.5, float(k[1, 2]) + 0.5)
            key = (w, h, *params)
            if key not in camera_ids:
                camera_ids[key] = len(camera_ids) + 1
                model.add_camera_with_trivial_rig(pycolmap.Camera(model="PINHOLE", width=w, height=h,
                                                                  camera_id=camera_ids[key], params=list(params)))
            world_to_cam = np.linalg.inv(np.asarray(view["cam2world"], dtype=np.float64))[:3]
            model.add_image_with_trivial_frame(pycolmap.Image(name=view["name"], camera_id=camera_ids[key],
                                                              image_id=i + 1), pycolmap.Rigid3d(world_to_cam))
            write_image(tmp / IMAGES_DIR / view["name"], view["image"])
            depth = np.nan_to_num(np.asarray(view["depth"], dtype=np.float32), nan=0.0)
            depth_file = depth_path(tmp, view["name"], kind)
            depth_file.parent.mkdir(parents=True, exist_ok=True)
            known = depth[depth > 0]
            low, high = (float(known.min()), float(known.max())) if known.size else (0.0, 0.0)
            pycolmap.DepthMap.from_array(depth, low, high).write(str(depth_file))
        (tmp / "sparse").mkdir()
        model.write_binary(str(tmp / "sparse"))
    return out


def depth_path(root: Path, name: str, kind: str) -> Path:
    return root / DEPTH_DIR / f"{name}.{kind}.bin"


def _pycolmap():
    try:
        import pycolmap
    except ImportError as err:
        raise ImportError("COLMAP scenes need pycolmap: pip install pycolmap (in the [train] extra)") from err
    return pycolmap


def _model_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass a COLMAP dense workspace (images/, sparse/, stereo/)")
    for candidate in (root / "sparse", root / "sparse" / "0"):
        if any((candidate / f).is_file() for f in MODEL_FILES):
            return candidate
    raise DataError(f"{root}: no sparse model in sparse/ or sparse/0/ (cameras.bin or cameras.txt); pass the "
                    "workspace that `colmap image_undistorter` wrote")


def _depth_kind(root: Path, names: list[str]) -> str:
    for kind in DEPTH_KINDS:
        if all(depth_path(root, name, kind).is_file() for name in names):
            return kind
    name = next(name for name in names if not depth_path(root, name, "geometric").is_file())
    mixed = " (photometric maps are used only when every image has one)" \
        if depth_path(root, name, "photometric").is_file() else ""
    raise DataError(f"{root / IMAGES_DIR / name}: image without depth: {depth_path(root, name, 'geometric')} does "
                    f"not exist{mixed}; run `colmap patch_match_stereo` on the workspace, or delete the image from "
                    "the model")


def _depth_header(path: Path) -> tuple[int, int, int]:
    """(H, W, header bytes) from the text header 'width&height&channels&' that starts a COLMAP depth map."""
    with open(path, "rb") as f:
        header = f.read(64).split(b"&")
    try:
        width, height, channels = (int(x) for x in header[:3])
    except ValueError as err:
        raise DataError(f"{path}: not a COLMAP depth map (its header should read 'width&height&1&')") from err
    if channels != 1 or width < 1 or height < 1:
        raise DataError(f"{path}: header says {width}x{height} with {channels} channels; a depth map has 1")
    return height, width, sum(len(x) + 1 for x in header[:3])


def _depth_size(path: Path) -> tuple[int, int]:
    return _depth_header(path)[:2]


def _check_depth_file(path: Path) -> None:
    """The file holds header + H * W floats: pycolmap reads a truncated map without complaint (measured)."""
    if not path.is_file():
        raise DataError(f"{path}: depth file does not exist")
    height, width, header = _depth_header(path)
    size, expected = path.stat().st_size, header + 4 * height * width
    if size != expected:
        raise DataError(f"{path}: pycolmap cannot read the depth map: {size} bytes, but a {width}x{height} map "
                        f"takes {expected}; the file is truncated or not a COLMAP depth map")
