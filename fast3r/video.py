"""Video files -> frames preprocessed exactly as ``load_images`` preprocesses image files.

PyAV (FFmpeg) decodes, in its own threads; frames are kept by time (``fps``) or by count
(``every``) and turned upright by the stream's display rotation (phone videos); a thread
pool then runs the official resize and centre-crop (Pillow releases the GIL while
resampling), so decoding and preprocessing overlap.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .images import preprocess_image

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts")
DEFAULT_FPS = 1.0  # the official demo samples videos at one frame per second
MAX_FPS = 1e6  # any fps above a video's frame rate keeps every frame; bounds the grid arithmetic
TIME_TOLERANCE = 1e-6  # seconds: frame times are rounded to the stream's time base
# Containers may state a frame or two more than decode (an edit list); more missing than this is a truncated file.
MISSING_FRAMES, MISSING_FRACTION = 2, 0.02


class UnreadableVideoError(ValueError):
    """A video file FFmpeg cannot open or decode, or one with no video frames."""


@dataclass
class VideoInfo:
    frames: int | None  # as the container states it; None if it does not
    fps: float | None
    width: int
    height: int


def probe(path: str | os.PathLike) -> VideoInfo:
    """Open the video's first video stream without decoding; raises UnreadableVideoError naming the file."""
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(stream.frames or None, float(rate) if rate else None,
                         stream.codec_context.width, stream.codec_context.height)


def read_frames(
    path: str | os.PathLike,
    *,
    size: int,
    fps: float | None = None,
    every: int | None = None,
    on_decoded: Callable[[int], object] | None = None,
) -> list[tuple[int, torch.Tensor]]:
    """Decode a video and keep one frame per 1/fps seconds or every ``every``-th frame (default: 1 fps).

    Returns (frame index, uint8 (3, H, W) tensor) pairs, preprocessed for ``size`` (512 or 224).
    on_decoded is called with 1 for every decoded frame (for a progress bar).
    """
    if fps is not None and every is not None:
        raise ValueError("pass fps or every, not both")
    if fps is None and every is None:
        fps = DEFAULT_FPS
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0; got fps={fps!r}")
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(f"every must be an integer >= 1; got every={every!r}")
    workers = os.cpu_count() or 1
    frames, pending = [], deque()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for index, frame in _kept_frames(path, fps, every, on_decoded):
                pending.append((index, pool.submit(_prepare, frame, size)))
                if len(pending) > 2 * workers:  # bound the decoded full-size frames held in memory
                    index, job = pending.popleft()
                    frames.append((index, job.result()))
            frames += [(index, job.result()) for index, job in pending]
    except UnreadableVideoError:
        raise
    except ValueError as err:  # the preprocessing's (an aspect ratio too extreme): name the video
        raise UnreadableVideoError(f"video {path}: {err}") from err
    if not frames:
        raise UnreadableVideoError(f"video {path} has no decodable frames")
    return frames


def _kept_frames(path: str | os.PathLike, fps: float | None, every: int | None,
                 on_decoded: Callable[[int], object] | None) -> Iterator[tuple[int, object]]:
    """Decoded ``av.VideoFrame`` objects that the fps / every rule keeps, with their index in the stream.

    By time, frames are kept on a grid of 1/fps seconds from the first: a frame is kept once the
    next grid point is reached, and the grid point after it is computed, not stepped to (any finite
    fps ends; one above the video's frame rate keeps every frame). A stream that ends well before
    the frame count its container states (a truncated file) gets a warning.
    """
    import av

    fps = None if fps is None else min(fps, MAX_FPS)
    start = next_time = None
    decoded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded += 1
                if on_decoded is not None:
                    on_decoded(1)
                if every is not None:
                    keep = index % every == 0
                else:
                    time = frame.time if frame.time is not None else index / rate
                    keep = next_time is None or time >= next_time - TIME_TOLERANCE
                    if keep:
                        start = time if start is None else start
                        next_time = start + (math.floor((time - start + TIME_TOLERANCE) * fps) + 1) / fps
                if keep:
                    yield index, frame
        except av.error.FFmpegError as err:
            raise UnreadableVideoError(f"cannot decode video {path} ({err})") from err
        stated = stream.frames
    if stated and stated - decoded > max(MISSING_FRAMES, MISSING_FRACTION * stated):
        warnings.warn(f"video {path}: decoded {decoded} of the {stated} frames its container states; the file looks "
                      f"truncated (an interrupted copy or download?): only its first {decoded} frames are used",
                      UserWarning, stacklevel=4)


def _prepare(frame, size: int) -> torch.Tensor:
    """RGB conversion, display rotation and the official resize / crop of one decoded frame."""
    return preprocess_image(upright(frame.to_image(), frame.rotation), size)


def upright(image: Image.Image, rotation: float) -> Image.Image:
    """Apply a display rotation (degrees counterclockwise, PyAV's ``frame.rotation``) in multiples of 90."""
    turns = round(rotation / 90) % 4
    return image.rotate(90 * turns, expand=True) if turns else image


def _open(path: str | os.PathLike):
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise UnreadableVideoError(f"cannot open video {path} ({err}); pass a file FFmpeg can decode "
                                   "(mp4, mov, mkv, webm, ...)") from err
    if not container.streams.video:
        container.close()
        raise UnreadableVideoError(f"{path} has no video stream")
    return container
