"""The ``fast3r`` command: images, folders or videos in; cameras, point clouds and models for other tools out.

    fast3r reconstruct INPUT... --out DIR [--checkpoint PATH_OR_HUB_ID | --random-weights]
        [--size 512|224] [--backend triton|torch] [--dtype bf16|fp32] [--fps F | --every K]
        [--max-views N] [--cameras pnp|procrustes] [--export ply,glb,colmap,nerfstudio,npz]
        [--conf-percentile P] [--view [--port P] [--host H] [--max-points N]]
    fast3r view SCENE_DIR [--port P] [--host H] [--max-points N]     (the browser viewer: fast3r.viewer)

Stages: decode (Pillow / PyAV) -> encoder -> fusion layers -> heads (one forward pass) ->
cameras (``fast3r.estimate_cameras``) -> export (``fast3r.export``). Each shows a tqdm bar;
the model's stages are followed through forward hooks, so the model is not changed. The
libraries of the ``[reconstruct]`` extra are imported only here, when needed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import export as exporting
from .cameras import METHODS, estimate_cameras
from .checkpoint import CheckpointError
from .images import SIZES
from .inputs import NoImagesFoundError, UnreadableImageError, Views, count_work, find_sources, load_views
from .model import BACKENDS, Fast3R
from .video import UnreadableVideoError
from .viewer import command as viewing

RELEASED_WEIGHTS = "jedyang97/Fast3R_ViT_Large_512"
RANDOM_WEIGHTS_PRESET = "tiny"  # what --random-weights builds (a Fast3RConfig or preset name)
EXTRA = "reconstruct"
INSTALL_EXTRA = f'pip install -e ".[{EXTRA}]"'
# import name -> pip package, all in the [reconstruct] extra
PACKAGES = {"tqdm": "tqdm", "av": "av", "cv2": "opencv-python-headless", "trimesh": "trimesh", "pycolmap": "pycolmap"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RANDOM_WEIGHTS_WARNING = (
    "*" * 78 + "\n"
    "*  --random-weights: the tiny model with RANDOM weights. The output is MEANINGLESS;\n"
    "*  it only exercises the pipeline. For real reconstructions pass\n"
    f"*  --checkpoint {RELEASED_WEIGHTS} (needs `pip install huggingface_hub`).\n" + "*" * 78
)


class CommandError(Exception):
    """A problem with the command line or its environment; printed as ``error: ...``, exit status 2."""


class MissingDependencyError(CommandError, ImportError):
    pass


class NoWeightsError(CommandError):
    pass


class OutputDirError(CommandError):
    pass


# Errors that name bad input; main() prints them without a traceback.
USER_ERRORS = (CommandError, NoImagesFoundError, UnreadableImageError, UnreadableVideoError, FileNotFoundError,
               CheckpointError)


@dataclass
class Summary:
    views: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None
    files: list[Path] = field(default_factory=list)
    random_weights: bool = False


# ------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast3r", description="Fast3R: 3-D reconstruction from many unposed images.")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser(
        "reconstruct", help="images, folders or videos -> cameras, point cloud, COLMAP / nerfstudio models",
        description="Reconstruct a scene from images, folders of images and videos in one forward pass, "
                    "estimate the cameras, and write the files other 3-D tools open.")
    rec.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, video files")
    rec.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created if needed)")
    weights = rec.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="PATH_OR_HUB_ID",
                         help=f"a directory with model.safetensors + config.json, or a hub id ({RELEASED_WEIGHTS})")
    weights.add_argument("--random-weights", action="store_true",
                         help="run the tiny model with random weights: tests the pipeline, output is meaningless")
    rec.add_argument("--size", type=int, choices=SIZES, default=512,
                     help="512 (default): long side 512, the released model's training size; 224: centre square")
    rec.add_argument("--backend", choices=BACKENDS, help="default: triton on a CUDA GPU, torch otherwise")
    rec.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on a CUDA GPU, fp32 otherwise")
    sampling = rec.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=_positive(float), metavar="F", help="video frames per second to keep (default 1)")
    sampling.add_argument("--every", type=_positive(int), metavar="K", help="keep every K-th video frame")
    rec.add_argument("--max-views", type=_positive(int), metavar="N", help="keep N views evenly spread over all inputs")
    rec.add_argument("--cameras", choices=METHODS, default="pnp",
                     help="pnp: the official RANSAC PnP (CPU threads); procrustes: closed form on the GPU")
    rec.add_argument("--export", type=_formats, default=list(exporting.FORMATS), metavar="FORMATS",
                     help=f"comma-separated, from {','.join(exporting.FORMATS)} (default: all)")
    rec.add_argument("--conf-percentile", type=_percentile, default=exporting.DEFAULT_CONF_PERCENTILE, metavar="P",
                     help="point clouds keep each view's points above this confidence percentile (default 10)")
    viewing.add_view_flags(rec)
    viewing.add_view_command(commands)
    return parser


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not > 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def _formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in exporting.FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format(s) {unknown or text!r}; choose from "
                                         f"{','.join(exporting.FORMATS)}")
    return formats


def _percentile(text: str) -> float:
    value = float(text)
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentile in [0, 100)")
    return value


# ------------------------------------------------------------------------------ running
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fast3r`` console command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "view":
        return viewing.run(args)
    if args.view and viewing.check_before_reconstruct(args):
        return 2
    try:
        summary = reconstruct(args)
    except USER_ERRORS as err:
        print(f"fast3r {args.command}: error: {err}", file=sys.stderr)
        return 2
    print_summary(summary, args.out)
    if args.view:
        return viewing.run(argparse.Namespace(scene=args.out, host=args.host, port=args.port, max_points=args.max_points))
    return 0


def reconstruct(args: argparse.Namespace) -> Summary:
    """Run the whole command; raises the named errors of this module, ``fast3r.inputs`` and ``fast3r.video``."""
    sources = find_sources(args.inputs)
    require_packages(args, has_video=any(s.kind == "video" for s in sources))
    from tqdm import tqdm

    work = count_work(sources)  # opens every video: an unreadable one fails here, before the model loads
    check_output(args.out)
    summary = Summary(random_weights=args.random_weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = choose_backend(args.backend, device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    with _timed(summary, "load model"):
        model = load_model(args, backend, device, dtype)

    with _timed(summary, "decode"), tqdm(total=work, desc="decode", unit="frame") as bar:
        views: Views = load_views(sources, size=args.size, fps=args.fps, every=args.every,
                                  max_views=args.max_views, on_decoded=bar.update)
        bar.total = bar.n  # containers may state a frame count the decoder does not reach
    summary.views, summary.image_sizes = len(views.images), [tuple(v.shape[1:]) for v in views.images]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with ForwardProgress(model, len(views.images), tqdm, device) as progress, torch.inference_mode():
        start = time.perf_counter()
        preds = model(views.images)
        _sync(device)
        summary.seconds["forward"] = time.perf_counter() - start
    summary.seconds.update(progress.seconds)

    with _timed(summary, "cameras"), tqdm(total=len(preds), desc=f"cameras ({args.cameras})", unit="view") as bar:
        cameras = estimate_cameras(preds, method=args.cameras, progress=bar.update)
    with _timed(summary, "export"), tqdm(total=exporting.export_steps(args.export), desc="export", unit="file") as bar:
        summary.files = exporting.export(make_output(args.out), args.export, preds=preds, images=views.images, names=views.names,
                                         cameras=cameras, conf_percentile=args.conf_percentile,
                                         on_step=lambda step: (bar.set_postfix_str(step), bar.update()))
    if device.type == "cuda":
        summary.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    return summary


def require_packages(args: argparse.Namespace, *, has_video: bool) -> None:
    """Fail before any work if a library of the [reconstruct] extra that this run needs is missing."""
    needed = ["tqdm"] + (["av"] if has_video else []) + (["cv2"] if args.cameras == "pnp" else [])
    needed += ["trimesh"] if {"ply", "glb"} & set(args.export) else []
    needed += ["pycolmap"] if "colmap" in args.export else []
    missing = []
    for module in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(PACKAGES[module])
    if missing:
        raise MissingDependencyError(
            f"this run needs {', '.join(missing)}, from the [{EXTRA}] extra: {INSTALL_EXTRA} in a checkout "
            f"(or pip install \"fast3r-kernels[{EXTRA}]\")")


def check_output(out: Path) -> None:
    """Refuse an output path that is a file before any work; the directory is made only when there is output."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file; pass a directory (it is created if missing)")


def make_output(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot create output directory {out}: {err}") from err
    if not os.access(out, os.W_OK):
        raise OutputDirError(f"output directory {out} is not writable")
    return out


def choose_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CommandError("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1, very slow); "
                           "use --backend torch on the CPU")
    return backend


def load_model(args: argparse.Namespace, backend: str, device: torch.device, dtype: torch.dtype) -> Fast3R:
    if args.random_weights:
        return Fast3R(RANDOM_WEIGHTS_PRESET, backend=backend).to(device=device, dtype=dtype).eval()
    if args.checkpoint is None:
        raise NoWeightsError(
            "no model weights: pass --checkpoint with the released weights, either the hub id "
            f"{RELEASED_WEIGHTS} (downloaded on first use; needs `pip install huggingface_hub`) or a local "
            "directory holding model.safetensors and config.json (e.g. from "
            f"`huggingface-cli download {RELEASED_WEIGHTS} --local-dir DIR`); or --random-weights to test "
            "the pipeline with an untrained tiny model")
    return Fast3R.from_pretrained(args.checkpoint, backend=backend, device=device, dtype=dtype)


# ------------------------------------------------------------------------------ progress
class ForwardProgress:
    """tqdm bars and seconds for the encoder, the fusion layers and the heads, from forward hooks.

    Hooks on ``model.encoder`` (views per call), each of ``model.decoder.dec_blocks`` and the
    two DPT heads (views per call). On a GPU each hook synchronizes, so bars and seconds
    follow the work itself rather than the launch queue; that costs ~30 syncs per pass.
    """

    def __init__(self, model: Fast3R, n_views: int, tqdm, device: torch.device):
        heads = [h for h in (model.downstream_head, model.downstream_head_local) if h is not None]
        self._stages = {
            "encoder": ([model.encoder], n_views, "view", lambda args: args[0].shape[0]),
            "fusion": (list(model.decoder.dec_blocks), len(model.decoder.dec_blocks), "layer", lambda args: 1),
            "heads": (heads, n_views * len(heads), "view", lambda args: args[0][0].shape[0]),
        }
        self._tqdm, self._device = tqdm, device
        self._bars: dict = {}
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}
        self._handles: list = []

    def __enter__(self):
        for stage, (modules, _, _, count) in self._stages.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._before(stage)))
                self._handles.append(module.register_forward_hook(self._after(stage, count)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for bar in self._bars.values():
            bar.close()

    @property
    def seconds(self) -> dict[str, float]:
        return {stage: self._end[stage] - self._start[stage] for stage in self._start if stage in self._end}

    def _before(self, stage: str):
        def hook(module, args):
            if stage not in self._bars:
                _sync(self._device)
                _, total, unit, _ = self._stages[stage]
                self._start[stage] = time.perf_counter()
                self._bars[stage] = self._tqdm(total=total, desc=stage, unit=unit)

        return hook

    def _after(self, stage: str, count):
        def hook(module, args, output):
            _sync(self._device)
            self._end[stage] = time.perf_counter()
            bar = self._bars[stage]
            bar.update(count(args))
            if bar.n >= bar.total:
                bar.close()

        return hook


# ------------------------------------------------------------------------------ summary
def print_summary(summary: Summary, out: Path) -> None:
    sizes = sorted(set(summary.image_sizes))
    lines = [f"fast3r reconstruct: {summary.views} views ({', '.join(f'{h}x{w}' for h, w in sizes)}) -> {out}"]
    for stage in ("load model", "decode", "encoder", "fusion", "heads", "forward", "cameras", "export"):
        if stage in summary.seconds:
            lines.append(f"  {stage:<11} {summary.seconds[stage]:8.2f} s")
    if summary.peak_gpu_bytes is not None:
        lines.append(f"  peak GPU memory {summary.peak_gpu_bytes / 2**30:.2f} GiB")
    lines.append("  files written:")
    for path in summary.files:
        lines.append(f"    {path}  ({_describe(path)})")
    print("\n".join(lines))
    if summary.random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)


def _describe(path: Path) -> str:
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        return f"{len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB"
    return f"{path.stat().st_size / 2**20:.1f} MiB"


class _timed:
    def __init__(self, summary: Summary, stage: str):
        self.summary, self.stage = summary, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.summary.seconds[self.stage] = time.perf_counter() - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
