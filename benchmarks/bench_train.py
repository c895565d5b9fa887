"""One Fast3R training step timed whole, split into forward / backward / optimizer, with its peak memory.

    python benchmarks/bench_train.py --list                  # every item with its expected device time
    python benchmarks/bench_train.py                         # the issue's targets (--group targets)
    python benchmarks/bench_train.py step:triton:512:32:none forward:triton:512:256   # any subset

Items, each measured on its own (a fresh model and AdamW per item) and merged into
``benchmarks/results/train_<gpu>.json`` (earlier items of the file are kept):

- ``step:BACKEND:SIZE:VIEWS:CHECKPOINTING``: one sample of VIEWS views (SIZE 512 -> 512x384, 224 ->
  224x224), the large model with random weights, ``precision: bf16-mixed``, through the training loop's own
  ``train_step`` (``fast3r.train.loop``): one warm-up step, then one step timed whole (host clock around
  it, device-synchronized). CUDA events from hooks split it into forward (model), backward (loss +
  backward) and optimizer (AdamW) without synchronizing inside the step; the peak memory is
  ``torch.cuda.max_memory_allocated`` over the timed step, beside ``fast3r.train.memory_plan``'s estimate.
- ``forward:BACKEND:SIZE:VIEWS``: the inference forward as ``fast3r reconstruct`` runs it (bf16 weights,
  eval, inference_mode), one run timed after a warm-up run: the reference of "a 256-view step <= 4x a forward".
- ``maxviews:BACKEND:SIZE``: the most views per sample with ``checkpointing: full``, found cheaply: memory
  is affine in the views (every kept tensor and the flash attention's are linear in tokens), so two
  cheap probes (two steps each at 16 and 48 views at 512, 64 and 192 at 224) give the slope and the
  intercept, which predict the largest count under 92% of the GPU's memory. Then ONE step at the
  target (400 at 512, 1000 at 224; ``--verify-views max`` for the predicted maximum) proves it fits and is
  timed whole. That step is the item's cost (the fusion attention is quadratic: ~2 min at 400 views of
  512x384); it is the first at its shape, so its time includes any kernel autotuning at that shape
  (``--verify-warmup`` adds a warm-up step and doubles the cost).
- ``official:SIZE:VIEWS``: the official code's training step in a subprocess,
  ``benchmarks/official_train_step.py`` (written beside this one), which prints one JSON line with
  ``seconds`` and ``peak_gib`` (or ``peak_bytes``); ``--official-cmd`` changes the command template.

Without a GPU the same code runs a small model on the CPU in fp32 (a smoke run of the script, not a
measurement), and says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast3r import Fast3R
from fast3r.train import TrainConfig, loop
from fast3r.train.activation_checkpointing import apply_activation_checkpointing
from fast3r.train.config import architecture
from fast3r.train.distributed import World
from fast3r.train.logging import RunLog
from fast3r.train.memory_plan import StepShape, TrainingOutOfMemoryError, step_bytes
from fast3r.train.order import SampleOrder
from fast3r.train.precision import apply_precision

RESULTS = Path(__file__).resolve().parent / "results"
HW = {512: (384, 512), 224: (224, 224)}
SMALL_MODEL = {"enc_dim": 64, "enc_depth": 2, "enc_heads": 2, "fusion_dim": 64, "fusion_depth": 4, "fusion_heads": 2,
               "head_feature_dim": 32, "head_layer_dims": [16, 32, 64, 128]}  # the CPU smoke run's model
MAX_VIEWS_TARGET = {512: 400, 224: 1000}
WARMUP_STEPS, TIMED_STEPS = 2, 3  # per step item; the maxviews check is one step (see its docstring)
PROBES = {512: (16, 48), 224: (64, 192)}
MEMORY_FRACTION = 0.92  # of the GPU's memory, for the predicted maximum (allocator fragmentation, CUDA context)
OFFICIAL_CMD = "{python} benchmarks/official_train_step.py --official .peers/fast3r-official --views {views} --hw {height} {width} --reps 2"
GROUPS = {
    "targets": [f"step:{b}:512:{v}:{c}" for c in ("none", "blocks") for v in (32, 64) for b in ("triton", "torch")]
    + ["step:triton:512:256:blocks", "forward:triton:512:256", "maxviews:triton:512", "maxviews:triton:224",
       "official:512:32"],
}
GROUPS["all"] = GROUPS["targets"] + [f"step:{b}:224:{v}:{c}" for c in ("none", "blocks") for v in (32, 64)
                                     for b in ("triton", "torch")] + ["step:torch:512:256:blocks",
                                                                      "forward:torch:512:256"]


# ----------------------------------------------------------------------------------------- device time
def expected_seconds(item: str) -> float:
    """Rough device seconds of an item on the H200, from the measured steps (TRAINING.md) plus the fusion
    attention's quadratic FLOPs at ~350 TFLOP/s; model build ~5 s per item."""
    kind, *rest = item.split(":")
    if kind == "step":
        _, size, views, mode = rest
        return 5 + sum(step_counts(int(size), int(views), mode).values()) * step_seconds(int(size), int(views), mode)
    if kind == "forward":
        _, size, views = rest
        return 5 + 2 * forward_seconds(int(size), int(views))
    if kind == "maxviews":
        size = int(rest[1])
        probes = sum(2 * step_seconds(size, v, "full") + 5 for v in PROBES[size])
        return probes + 5 + step_seconds(size, MAX_VIEWS_TARGET[size], "full")
    if kind == "official":
        return 30 + 2 * 3.26 * int(rest[1]) / 32  # its startup, and 3.26 s per step at 32 views
    raise ValueError(item)


def _attention_seconds(size: int, views: int, passes: float) -> float:
    tokens = views * math.prod(HW[size]) // 256
    return passes * 24 * 4 * tokens**2 * 1024 / 350e12


def step_counts(size: int, views: int, mode: str) -> dict[str, int]:
    """Warm-up and timed steps of a step item: the median of three after two warm-ups, except where one step
    takes over ~10 s (the fusion attention's quadratic cost dominates, so steps vary little): one after one."""
    if step_seconds(size, views, mode) > 10:
        return {"warmup": 1, "timed": 1}
    return {"warmup": WARMUP_STEPS, "timed": TIMED_STEPS}


def step_seconds(size: int, views: int, mode: str) -> float:
    per_view = 1.0 / 32 * (1 if size == 512 else 0.27)  # 1.0 s at 32 views of 512x384, tokens 768 vs 196
    recompute = {"none": 1.0, "blocks": 1.3, "full": 1.45}[mode]
    return views * per_view * recompute + _attention_seconds(size, views, 3.5 + (mode != "none"))


def forward_seconds(size: int, views: int) -> float:
    return views * 0.33 / 32 * (1 if size == 512 else 0.27) / 2 + _attention_seconds(size, views, 1)


# ------------------------------------------------------------------------------------------- the step
class PhaseTimer:
    """CUDA events at the model's forward start and end and around ``optimizer.step``: no sync inside the step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.events: dict[str, torch.cuda.Event] = {}
        self.handles = [model.register_forward_pre_hook(lambda *_: self._mark("forward_start")),
                        model.register_forward_hook(lambda *_: self._mark("forward_end")),
                        optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer_start")),
                        optimizer.register_step_post_hook(lambda *_: self._mark("optimizer_end"))]

    def _mark(self, name: str) -> None:
        if torch.cuda.is_available():
            self.events[name] = torch.cuda.Event(enable_timing=True)
            self.events[name].record()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def seconds(self) -> dict[str, float]:
        if not self.events:
            return {}
        torch.cuda.synchronize()
        e = self.events
        return {"forward_s": e["forward_start"].elapsed_time(e["forward_end"]) / 1e3,
                "backward_s": e["forward_end"].elapsed_time(e["optimizer_start"]) / 1e3,
                "optimizer_s": e["optimizer_start"].elapsed_time(e["optimizer_end"]) / 1e3}


def random_batch(views: int, hw: tuple[int, int], pin: bool, seed: int = 0) -> dict:
    """One sample in the data package's collated layout: random images, rigid cameras, every pixel valid."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(views, 3, 3, generator=g))
    pose = torch.eye(4).repeat(views, 1, 1)
    pose[:, :3, :3] = q * torch.linalg.det(q)[:, None, None]
    pose[:, :3, 3] = torch.randn(views, 3, generator=g)
    batch = {"images": torch.randint(0, 256, (1, views, 3, *hw), dtype=torch.uint8, generator=g),
             "pts3d": 3 * torch.randn(1, views, *hw, 3, generator=g),
             "valid_mask": torch.ones(1, views, *hw, dtype=torch.bool), "camera_pose": pose[None],
             "intrinsics": torch.eye(3).repeat(1, views, 1, 1)}
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return {**batch, "scene": ["random"], "names": [[f"view_{i:04d}" for i in range(views)]]}


def training_config(backend: str, size: int, views: int, checkpointing: str, cuda: bool) -> TrainConfig:
    return TrainConfig(model="large" if cuda else SMALL_MODEL, backend=backend, device="cuda" if cuda else "cpu",
                       data=[{"format": "synthetic"}], views=views, size=size, checkpointing=checkpointing,
                       precision="bf16-mixed" if cuda else "fp32", steps=100, workers=0, out=tempfile.gettempdir())


def measure_step(backend: str, size: int, views: int, checkpointing: str, *, warmup: int = WARMUP_STEPS,
                 timed: int = TIMED_STEPS) -> dict:
    """Build the model and AdamW, run ``warmup`` steps of ``train_step``, then time ``timed`` steps whole (median).

    Two warm-up steps: the first tunes kernels at this shape and allocates AdamW's state, and the second still
    grows the allocator's cache around that state (the second step alone measured 2.43 s at 32 views of 512x384 on
    the H200, the median of steps 3-5 1.07 s).
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = training_config(backend, size, views, checkpointing, cuda)
    record = {"backend": backend, "size": size, "hw": list(HW[size]), "views": views, "checkpointing": checkpointing,
              "precision": config.precision, "model": "large" if cuda else "small (CPU smoke run)"}
    model = loop.build_model(config, device)
    autocast = apply_precision(model, config.precision)
    apply_activation_checkpointing(model, checkpointing)
    optimizer = loop.build_optimizer(config, model)
    run = loop.Run(config, World(0, 1, device, False), Path(config.out), model, model, optimizer,
                   loop.build_schedule(config, optimizer), autocast, None, None, SampleOrder(1, 1, 0), 0,
                   {"bad_batches": 0})
    log = RunLog(run.run_dir, total_steps=config.steps, start_step=0, enabled=False, log_every=1)
    batch = random_batch(views, HW[size], pin=cuda)
    params = sum(p.numel() for p in model.parameters())
    shape = StepShape(views, *HW[size], 1, checkpointing, config.precision, params,
                      sum(p.numel() for p in loop.trainable(model)))
    record["estimate_gib"] = step_bytes(model.config, shape) / 2**30
    try:
        for _ in range(warmup):
            loop.train_step(run, [batch], log)
            run.step += 1
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for _ in range(timed):
            timer = PhaseTimer(model, optimizer)
            _sync()
            start = time.perf_counter()
            out = loop.train_step(run, [batch], log)
            _sync()
            runs.append({"step_s": time.perf_counter() - start, **timer.seconds()})
            timer.remove()
            run.step += 1
        record.update({key: statistics.median(r[key] for r in runs) for key in runs[0]})
        record["steps_s"] = [r["step_s"] for r in runs]
        record["views_per_s"] = views / record["step_s"]
        record["loss"] = out["loss"]
        record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        record["warmup_steps"] = warmup
    except TrainingOutOfMemoryError as err:
        record.update(oom=True, message=str(err))
    except torch.cuda.OutOfMemoryError as err:  # outside the step (the batch's copy to the GPU)
        record.update(oom=True, message=str(err).splitlines()[0])
    finally:
        del run, model, optimizer, batch
        _free()
    return record


def measure_forward(backend: str, size: int, views: int) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Fast3R("large" if cuda else architecture(SMALL_MODEL), backend=backend)
    model = model.to(torch.bfloat16 if cuda else torch.float32).eval()
    images = torch.randint(0, 256, (views, 3, *HW[size]), dtype=torch.uint8, device=device)
    record = {"backend": backend, "size": size, "hw": list(HW[size]), "views": views,
              "dtype": "bf16" if cuda else "fp32"}
    try:
        seconds = []
        for _ in range(2):  # the first run warms up (kernel compilation and tuning at this shape), the second is timed
            _sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.inference_mode():
                model(images)
            _sync()
            seconds.append(time.perf_counter() - start)
        record.update(forward_s=seconds[1], warmup_s=seconds[0],
                      peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    except torch.cuda.OutOfMemoryError as err:
        record.update(oom=True, message=str(err).splitlines()[0])
    finally:
        del model, images
        _free()
    return record


def measure_max_views(backend: str, size: int, verify: str, verify_warmup: bool) -> dict:
    """Two cheap probes -> affine memory model -> predicted maximum; one step at the target proves the fit."""
    cuda = torch.cuda.is_available()
    probes = [measure_step(backend, size, views, "full", warmup=1, timed=1)  # memory only: two steps each
              for views in (PROBES[size] if cuda else (2, 3))]
    record = {"backend": backend, "size": size, "hw": list(HW[size]), "checkpointing": "full",
              "probes": [{k: p.get(k) for k in ("views", "peak_gib", "step_s", "oom")} for p in probes]}
    if any(p.get("oom") for p in probes) or not cuda:
        return record
    (n1, m1), (n2, m2) = ((p["views"], p["peak_gib"]) for p in probes)
    slope = (m2 - m1) / (n2 - n1)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    predicted = int((MEMORY_FRACTION * total - (m1 - slope * n1)) / slope)
    views = predicted if verify == "max" else int(verify) if verify else MAX_VIEWS_TARGET[size]
    record.update(gib_per_view=slope, intercept_gib=m1 - slope * n1, gpu_gib=total, predicted_max_views=predicted,
                  target_views=MAX_VIEWS_TARGET[size])
    check = measure_step(backend, size, views, "full", warmup=int(verify_warmup), timed=1)
    record["verified"] = {k: check.get(k) for k in ("views", "step_s", "forward_s", "backward_s", "optimizer_s",
                                                   "peak_gib", "estimate_gib", "oom", "message", "warmup_steps")}
    record["fits"] = not check.get("oom", False)
    return record


def measure_official(size: int, views: int, template: str) -> dict:
    script = Path(__file__).resolve().parent / "official_train_step.py"
    record = {"size": size, "hw": list(HW[size]), "views": views, "command": None}
    official = Path(__file__).resolve().parents[1] / ".peers" / "fast3r-official"
    if template == OFFICIAL_CMD and not torch.cuda.is_available():
        return {**record, "skipped": "the official step is timed on a GPU only (its attention is CUDA bf16)"}
    if template == OFFICIAL_CMD and not (script.is_file() and official.is_dir()):
        return {**record, "skipped": f"needs {script.name} and a copy of shared/peers at .peers (the official code "
                                     "is not shipped)"}
    command = template.format(python=shlex.quote(sys.executable), views=views, size=size, height=HW[size][0],
                              width=HW[size][1])
    record["command"] = command
    done = subprocess.run(shlex.split(command), check=False, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    if done.returncode or not lines:
        return {**record, "failed": done.returncode, "stderr_tail": done.stderr[-2000:]}
    result = json.loads(lines[-1])
    if "peak_bytes" in result and "peak_gib" not in result:
        result["peak_gib"] = result["peak_bytes"] / 2**30
    return {**record, **result, "step_s": result.get("seconds")}


def run_item(item: str, args: argparse.Namespace) -> dict:
    kind, *rest = item.split(":")
    if kind == "step":
        backend, size, views, mode = rest
        return measure_step(backend, int(size), int(views), mode, **step_counts(int(size), int(views), mode))
    if kind == "forward":
        backend, size, views = rest
        return measure_forward(backend, int(size), int(views))
    if kind == "maxviews":
        backend, size = rest
        return measure_max_views(backend, int(size), args.verify_views, args.verify_warmup)
    if kind == "official":
        size, views = rest
        return measure_official(int(size), int(views), args.official_cmd)
    raise ValueError(item)


# ------------------------------------------------------------------------------------------- reporting
def check_item(item: str) -> None:
    """Refuse a malformed item before any device time is spent."""
    kind, *rest = item.split(":")
    shapes = {"step": 4, "forward": 3, "maxviews": 2, "official": 2}
    ok = kind in shapes and len(rest) == shapes[kind]
    if ok and kind in ("step", "forward", "maxviews"):
        ok = rest[0] in ("torch", "triton") and rest[1] in ("224", "512")
    if ok and kind == "step":
        ok = rest[2].isdigit() and rest[3] in ("none", "blocks", "full")
    if ok and kind == "forward":
        ok = rest[2].isdigit()
    if ok and kind == "official":
        ok = rest[0] in ("224", "512") and rest[1].isdigit()
    if not ok:
        raise SystemExit(f"bad item {item!r}; items: step:BACKEND:SIZE:VIEWS:CHECKPOINTING, forward:BACKEND:SIZE:VIEWS,"
                         " maxviews:BACKEND:SIZE, official:SIZE:VIEWS (BACKEND torch|triton, SIZE 224|512)")


def targets(items: dict[str, dict]) -> list[str]:
    """The issue's targets, judged from whatever items the file holds."""
    def get(name: str, key: str = "step_s"):
        value = items.get(name, {}).get(key)
        return value if isinstance(value, (int, float)) else None

    lines = []
    for mode, limit in (("none", 0.85), ("blocks", 1.25)):
        t = get(f"step:triton:512:32:{mode}")
        if t is not None:
            lines.append(f"step at 32 views, checkpointing {mode}: {t:.3f} s (target <= {limit}) "
                         f"{'met' if t <= limit else 'MISSED'}")
    for views in (32, 64):
        a, b = get(f"step:triton:512:{views}:none"), get(f"step:torch:512:{views}:none")
        if a and b:
            lines.append(f"triton vs torch at {views} views: {b / a:.2f}x (target >= 1.15) {'met' if b / a >= 1.15 else 'MISSED'}")
    step, forward = get("step:triton:512:256:blocks"), get("forward:triton:512:256", "forward_s")
    if step and forward:
        lines.append(f"256-view step / inference forward: {step / forward:.2f}x (target <= 4) "
                     f"{'met' if step / forward <= 4 else 'MISSED'}")
    for size in (512, 224):
        found = items.get(f"maxviews:triton:{size}")
        if found and "fits" in found:
            lines.append(f"most views with full at {size}: verified {found['verified']['views']} "
                         f"({'fits' if found['fits'] else 'OUT OF MEMORY'}), predicted max {found['predicted_max_views']}"
                         f" (target >= {MAX_VIEWS_TARGET[size]})")
    return lines


def print_table(items: dict[str, dict]) -> None:
    print(f"{'item':<30} {'step s':>8} {'fwd':>7} {'bwd':>7} {'opt':>7} {'peak GiB':>9} {'est GiB':>8}")
    for name, r in items.items():
        if "step_s" in r or "forward_s" in r:
            cells = [r.get(k) for k in ("step_s", "forward_s", "backward_s", "optimizer_s", "peak_gib", "estimate_gib")]
            if name.startswith("forward:"):
                cells = [None, r.get("forward_s"), None, None, r.get("peak_gib"), None]
            print(f"{name:<30} " + " ".join(f"{c:>{w}.3f}" if isinstance(c, float) else f"{'-':>{w}}"
                                             for c, w in zip(cells, (8, 7, 7, 7, 9, 8))))
        elif r.get("oom"):
            print(f"{name:<30} out of memory")
        elif "skipped" in r:
            print(f"{name:<30} skipped: {r['skipped']}")
    for line in targets(items):
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("items", nargs="*", help="items to measure (default: --group)")
    parser.add_argument("--group", choices=sorted(GROUPS), default="targets")
    parser.add_argument("--list", action="store_true", help="print the items of --group with expected seconds")
    parser.add_argument("--out", type=Path, help="results JSON (default: results/train_<gpu>.json)")
    parser.add_argument("--verify-views", default="", help="maxviews: views of the verifying step (a number, or "
                        "'max' for the predicted maximum; default the target: 400 at 512, 1000 at 224)")
    parser.add_argument("--verify-warmup", action="store_true", help="maxviews: warm up before the verifying step")
    parser.add_argument("--official-cmd", default=OFFICIAL_CMD,
                        help="command of the official step, with {python} {views} {size} {height} {width}")
    args = parser.parse_args(argv)
    items = args.items or GROUPS[args.group]
    for item in items:
        check_item(item)
    if args.list:
        for item in items:
            print(f"{item:<32} ~{expected_seconds(item):6.0f} s")
        print(f"{'total':<32} ~{sum(map(expected_seconds, items)):6.0f} s")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA GPU: a smoke run of the script on the CPU (small model, fp32); not a measurement",
              file=sys.stderr)
    name = _gpu_name() if cuda else "cpu"
    out = args.out or RESULTS / f"train_{name}.json"
    results = json.loads(out.read_text()) if out.is_file() else {"items": {}}
    results.update(gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   triton=_triton_version())
    for item in items:
        print(f"{item} (expected ~{expected_seconds(item):.0f} s on an H200) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            record = run_item(item, args)
        except Exception as err:  # noqa: BLE001 - one broken item must not cost the items after it their device time
            record = {"failed": f"{type(err).__name__}: {err}"[:2000]}
            traceback.print_exc()
            _free()
        record["item_wall_s"] = time.perf_counter() - start
        results["items"][item] = record
        _write(out, results)  # after every item: a later failure keeps what was measured
        print(json.dumps({item: record}), flush=True)
    print_table(results["items"])
    print(f"wrote {out}")
    return 0


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, path)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gpu_name() -> str:
    from timing import gpu_name

    return gpu_name()


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
