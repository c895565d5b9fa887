"""``load_scene`` / ``save_scene``: one entry point for the on-disk formats."""

from __future__ import annotations

import os
from pathlib import Path

from .colmap import load_colmap, save_colmap
from .folder import CAMERAS_FILE, load_folder, save_folder
from .scene import DataError, Scene

FORMATS = ("colmap", "folder")


def load_scene(path: str | os.PathLike, format: str | None = None) -> Scene:
    """A scene from a COLMAP dense workspace or a folder-format scene (README, "Training data").

    format: "colmap" or "folder"; None picks "folder" if ``path/cameras.json`` exists, else "colmap"
    if ``path/sparse`` does. The scene is checked from the files' headers (every image has a depth
    map of its size, cameras are pinholes, poses rigid); pixels are read when a view is asked for.
    """
    path = Path(path)
    if format is None:
        if (path / CAMERAS_FILE).is_file():
            format = "folder"
        elif (path / "sparse").is_dir():
            format = "colmap"
        else:
            raise DataError(f"{path}: neither a folder-format scene ({CAMERAS_FILE}) nor a COLMAP workspace "
                            "(sparse/); pass format= or see README, 'Training data'")
    if format == "colmap":
        return load_colmap(path)
    if format == "folder":
        return load_folder(path)
    raise ValueError(f"format={format!r}; choose one of {FORMATS}")


def save_scene(scene: Scene, path: str | os.PathLike, format: str, **options) -> Path:
    """Write ``scene`` to the new directory ``path``: "folder" (options: depth_format, depth_scale) or "colmap"
    (option: kind, "geometric" or "photometric"). All or nothing: a temporary directory renamed into place."""
    if format == "colmap":
        return save_colmap(scene, path, **options)
    if format == "folder":
        return save_folder(scene, path, **options)
    raise ValueError(f"format={format!r}; choose one of {FORMATS}")
