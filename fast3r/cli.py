"""The ``fast3r`` command: images, folders or videos in; cameras, point clouds and models for other tools out.

    fast3r reconstruct INPUT... --out DIR [--overwrite] [--checkpoint PATH_OR_HUB_ID | --random-weights]
        [--size 512|224] [--backend triton|torch] [--dtype bf16|fp32] [--fps F | --every K]
        [--max-views N] [--cameras pnp|procrustes] [--focal F] [--export ply,glb,colmap,nerfstudio,npz]
        [--conf-percentile P] [--overwrite] [--view [--port P] [--host H] [--max-points N]]
    fast3r view SCENE_DIR [--port P] [--host H] [--max-points N]     (the browser viewer: fast3r.viewer)
    fast3r train CONFIG.yaml [--resume RUN_DIR] [--set key=value ...]  (fine-tuning: fast3r.train)

Stages: decode (Pillow / PyAV) -> encoder -> fusion layers -> heads (one forward pass) ->
cameras (``fast3r.estimate_cameras``) -> export (``fast3r.export``). Each shows a tqdm bar;
the model's stages are followed through forward hooks, so the model is not changed. The
libraries of the ``[reconstruct]`` extra are imported only here, when needed.

Every subcommand is one ``add_*`` function in SUBCOMMANDS that adds its parser and sets
``run`` (args -> exit status); ``main`` gives them all the same handling: errors print as one
``fast3r CMD: error: ...`` line (status 2 for bad input, 1 for anything unexpected; the traceback
with FAST3R_TRACEBACK=1), warnings as ``fast3r CMD: warning: ...`` lines, Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import export as exporting
from .cameras import METHODS, estimate_cameras
from .checkpoint import CheckpointError
from .images import SIZES
from .inputs import NoImagesFoundError, Source, UnreadableImageError, Views, count_work, find_sources, load_views
from .model import BACKENDS, Fast3R
from .train import command as train_command
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
TRACEBACK_VARIABLE = "FAST3R_TRACEBACK"
INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


class CommandError(Exception):
    """A problem with the command line or its environment; printed as ``error: ...``, exit status 2."""


class MissingDependencyError(CommandError, ImportError):
    pass


class NoWeightsError(CommandError):
    pass


# Errors that name bad input or a bad environment (a full disk, a missing file); main() prints them, status 2.
USER_ERRORS = (CommandError, NoImagesFoundError, UnreadableImageError, UnreadableVideoError, CheckpointError,
               exporting.ExportError, ValueError, OSError)


@dataclass
class Summary:
    views: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None
    files: list[Path] = field(default_factory=list)
    random_weights: bool = False


# ------------------------------------------------------------------------------ parsing
def add_reconstruct(commands: argparse._SubParsersAction) -> None:
    rec = commands.add_parser(
        "reconstruct", help="images, folders or videos -> cameras, point cloud, COLMAP / nerfstudio models",
        description="Reconstruct a scene from images, folders of images and videos in one forward pass, "
                    "estimate the cameras, and write the files other 3-D tools open.")
    rec.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, video files")
    rec.add_argument("--out", required=True, type=Path, metavar="DIR",
                     help="output directory: new or empty, or a previous run's with --overwrite")
    rec.add_argument("--overwrite", action="store_true",
                     help="replace the previous run's whole set of files in --out (never files it did not write)")
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
    rec.add_argument("--focal", type=_positive(float), metavar="F",
                     help="known focal length in pixels of the views as the model sees them (images/ in --out), "
                          "for every view; estimated if not given")
    rec.add_argument("--export", type=_formats, default=list(exporting.FORMATS), metavar="FORMATS",
                     help=f"comma-separated, from {','.join(exporting.FORMATS)} (default: all)")
    rec.add_argument("--conf-percentile", type=_percentile, default=exporting.DEFAULT_CONF_PERCENTILE, metavar="P",
                     help="point clouds keep each view's points above this confidence percentile (default 10)")
    viewing.add_view_flags(rec)
    rec.set_defaults(run=run_reconstruct)


def add_train(commands: argparse._SubParsersAction) -> None:
    """``fast3r train`` (fast3r.train.command: its parser, and its own error messages)."""
    train_command.add_parser(commands)
    commands.choices["train"].set_defaults(run=train_command.run)


def add_view(commands: argparse._SubParsersAction) -> None:
    """``fast3r view`` (fast3r.viewer.command; viser is imported only when it runs)."""
    viewing.add_view_command(commands).set_defaults(run=viewing.run)


# `fast3r view`, `fast3r train`, ...: one add_* function each, like add_reconstruct.
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_reconstruct, add_view, add_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast3r", description="Fast3R: 3-D reconstruction from many unposed images.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def _formats(text: str) -> list[str]:
    try:
        return exporting.parse_formats(text)
    except exporting.ExportError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _percentile(text: str) -> float:
    value = float(text)
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentile in [0, 100)")
    return value


# ------------------------------------------------------------------------------ running
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fast3r`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    prog = f"fast3r {args.command}"
    with _warnings_as_lines(prog):
        try:
            return args.run(args)
        except KeyboardInterrupt:
            _print(f"{prog}: interrupted")
            return INTERRUPTED
        except USER_ERRORS as err:
            _print(f"{prog}: error: {err}")
            return 2
        except (torch.OutOfMemoryError, MemoryError) as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            _print(f"{prog}: error: out of memory ({first_line}); pass fewer views (--max-views N), smaller ones "
                   "(--size 224), or use a device with more memory")
            _traceback_on_request()
            return 1
        except Exception as err:  # noqa: BLE001 - a bug: one line by default, the traceback on request
            _print(f"{prog}: error: unexpected {type(err).__name__}: {err} (set {TRACEBACK_VARIABLE}=1 to see "
                   "where; please report it)")
            _traceback_on_request()
            return 1


def run_reconstruct(args: argparse.Namespace) -> int:
    """``fast3r reconstruct``: every check that needs no model first, then the work; prints the summary."""
    if args.view and viewing.check_before_reconstruct(args):
        return 2
    sources = find_sources(args.inputs)
    require_packages(args, has_video=any(s.kind == "video" for s in sources))
    work = count_work(sources)  # opens every video: an unreadable one fails here, before the model loads
    exporting.check_output_dir(args.out, overwrite=args.overwrite)  # a previous run or foreign files: refused now
    created = exporting.make_output_dir(args.out)  # a folder that cannot be made fails now, not after the forward
    try:
        summary = reconstruct(args, sources, work)
    except BaseException:
        exporting.remove_created(created)
        raise
    print_summary(summary, args.out)
    if args.view:
        return viewing.run(argparse.Namespace(scene=args.out, host=args.host, port=args.port, max_points=args.max_points))
    return 0


def reconstruct(args: argparse.Namespace, sources: Sequence[Source], work: int | None) -> Summary:
    """Decode, forward, cameras, export; raises the named errors of this module and the ones it calls."""
    from tqdm import tqdm

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
        bar.total = bar.n  # containers may state a frame more than decodes; a truncated video is warned about
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
        cameras = estimate_cameras(preds, method=args.cameras, focal=args.focal, progress=bar.update)
    run_info = {"command": shlex.join(["fast3r", *args.argv]), "random_weights": args.random_weights,
                "checkpoint": args.checkpoint, "size": args.size, "cameras": args.cameras}
    with _timed(summary, "export"), tqdm(total=exporting.export_steps(args.export), desc="export", unit="file") as bar:
        summary.files = exporting.export(args.out, args.export, preds=preds, images=views.images, names=views.names,
                                         cameras=cameras, conf_percentile=args.conf_percentile,
                                         overwrite=args.overwrite, metadata=run_info,
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
            f"`hf download {RELEASED_WEIGHTS} --local-dir DIR`, hf comes with huggingface_hub); or "
            "--random-weights to test the pipeline with an untrained tiny model")
    return Fast3R.from_pretrained(args.checkpoint, backend=backend, device=device, dtype=dtype)


def _print(line: str) -> None:
    """A line on stderr that does not break a tqdm bar drawn there."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, file=sys.stderr)
    else:
        tqdm.write(line, file=sys.stderr)


@contextlib.contextmanager
def _warnings_as_lines(prog: str) -> Iterator[None]:
    """Show each warning as one ``PROG: warning: ...`` line (no file, line number or source)."""
    def show(message, category, filename, lineno, file=None, line=None):
        _print(f"{prog}: warning: {message}")

    with warnings.catch_warnings():
        warnings.filterwarnings("default", category=UserWarning)  # each once per place, even if shown before
        warnings.showwarning = show
        yield


def _traceback_on_request() -> None:
    if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        traceback.print_exc()


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
