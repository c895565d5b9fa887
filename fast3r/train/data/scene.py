"""A scene with ground truth: per view an image, a depth map, pinhole intrinsics and a camera-to-world pose.

A ``Scene`` keeps only what is small (names, sizes, cameras) and reads images and depth maps when a
view is asked for: training sets hold thousands of views, and a sample needs 20 of them. Conventions,
as in ``fast3r.estimate_cameras``: OpenCV camera axes (x right, y down, z forward), pixel (x, y) is the
integer column and row (COLMAP's principal point less 0.5), depth is the z of the point in the camera's
frame, in the units of the poses' translations; depth 0 or NaN means unknown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

import numpy as np

RIGID_TOLERANCE = 1e-4  # |R^T R - I| and |det R - 1|: rotations written as float32 text pass, scaled ones fail


class DataError(ValueError):
    """Bad training data: the message names the scene, the file and the field, and what would fix it."""


@dataclass(frozen=True)
class Camera:
    """What is known of a view without reading its pixels."""

    name: str  # the image's file name, relative to the scene's images folder
    size: tuple[int, int]  # (H, W) of the image and of its depth map
    intrinsics: np.ndarray  # (3, 3) float64, pixel (x, y) = integer column and row
    cam2world: np.ndarray  # (4, 4) float64, rigid, OpenCV axes


class ViewReader(Protocol):
    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image (H, W, 3) uint8 and depth (H, W) float32 of view ``index``; DataError if unreadable."""
        ...


class Scene:
    """``name``, ``cameras`` (one ``Camera`` per view) and ``views``: dicts read from disk (or rendered) on access."""

    def __init__(self, name: str, cameras: Sequence[Camera], reader: ViewReader) -> None:
        self.name = name
        self.cameras = list(cameras)
        self.reader = reader

    @property
    def views(self) -> SceneViews:
        return SceneViews(self)

    def view(self, index: int) -> dict:
        """View ``index`` as a dict: image (H, W, 3) uint8, depth (H, W) float32, intrinsics, cam2world, name."""
        camera = self.cameras[index]
        image, depth = self.reader.read(index)
        return {"image": image, "depth": depth, "intrinsics": camera.intrinsics.copy(),
                "cam2world": camera.cam2world.copy(), "name": camera.name}

    def __len__(self) -> int:
        return len(self.cameras)

    def __repr__(self) -> str:
        return f"Scene({self.name!r}, {len(self)} views)"


class SceneViews(Sequence):
    """The views of a scene as a read-only sequence of dicts; each access reads the files again (keep the dict)."""

    def __init__(self, scene: Scene) -> None:
        self._scene = scene

    def __len__(self) -> int:
        return len(self._scene)

    @overload
    def __getitem__(self, index: int) -> dict: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._scene.view(i) for i in range(len(self))[index]]
        return self._scene.view(range(len(self))[index])  # negative indices, IndexError past the end

    def __iter__(self) -> Iterator[dict]:
        return (self._scene.view(i) for i in range(len(self)))


# ------------------------------------------------------------------------------ checks
def check_intrinsics(k: np.ndarray, where: str) -> np.ndarray:
    """A pinhole matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with finite, positive focals -> float64."""
    k = np.asarray(k, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0 \
            or k[0, 1] != 0 or k[1, 0] != 0 or (k[2] != (0, 0, 1)).any():
        raise DataError(f"{where}: intrinsics {k.tolist()} are not a pinhole camera with finite focals > 0 "
                        "(fx, fy > 0, no skew)")
    return k


def check_pose(cam2world: np.ndarray, where: str) -> np.ndarray:
    """A finite rigid (4, 4) camera-to-world: rotation orthonormal with det +1, last row (0, 0, 0, 1) -> float64."""
    pose = np.asarray(cam2world, dtype=np.float64)
    if pose.shape != (4, 4):
        raise DataError(f"{where}: cam2world has shape {pose.shape}; expected a 4x4 camera-to-world matrix")
    if not np.isfinite(pose).all():
        raise DataError(f"{where}: cam2world has non-finite entries ({pose.tolist()}); every entry must be a number")
    rotation = pose[:3, :3]
    error = max(np.abs(rotation.T @ rotation - np.eye(3)).max(), abs(np.linalg.det(rotation) - 1),
                np.abs(pose[3] - (0, 0, 0, 1)).max())
    if error > RIGID_TOLERANCE:
        raise DataError(f"{where}: cam2world is not rigid (rotation orthonormal with det +1, last row 0 0 0 1; off "
                        f"by {error:.2g}): {pose.tolist()}. Store the camera-to-world pose without scale or shear")
    return pose


def check_view_arrays(image: np.ndarray, depth: np.ndarray, camera: Camera, where: str, depth_file: str) -> None:
    """The image and depth map have the camera's size; the image is RGB uint8."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{where}: image has shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8 RGB")
    if image.shape[:2] != camera.size:
        raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[0]} but its camera says "
                        f"{camera.size[1]}x{camera.size[0]} (W x H)")
    if depth.shape != camera.size:
        raise DataError(f"{depth_file}: depth map is {_wxh(depth.shape)} but its image {camera.name} is "
                        f"{camera.size[1]}x{camera.size[0]} (W x H); depth and image must have the same size "
                        "(resize the depth map with nearest-neighbour sampling, or the image and intrinsics)")


def _wxh(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}" if len(shape) == 2 else f"of shape {shape}"
