"""How Fast3R's time and memory grow with the number of views, per backend, on one GPU or several.

    python benchmarks/scale_views.py --views 1500 [--size 224|512] [--backend triton torch]
        [--cuda-graph-max-views 100] [--official .peers] [--memory fast lean]
        [--fusion-layers K] [--memory-cap-gib 22]
    torchrun --nproc-per-node P benchmarks/scale_views.py --views 1500 --size 224   # context parallel

Sweeps 1, 2, 10, 16, 32, 100, 500, 1000, 1500 views (those up to --views, plus --views
itself) on the ``large`` preset in bf16 with random weights (or --checkpoint), random uint8
images, under torch.inference_mode. For each point: seconds per forward (median of
--repeats after a warm-up, device-synchronized) split into encoder / fusion / heads, views
per second, peak memory from torch.cuda.max_memory_allocated (over the forward and per stage:
``peak_gib_encoder`` / ``_fusion`` / ``_heads``, each counting everything alive then) and device
memory in use from NVML. ``triton+graph`` is the Triton backend replaying a CUDA graph
(``cuda_graph=True``), timed up to --cuda-graph-max-views. --memory runs each point under each
memory plan (``Fast3R.forward(memory=...)``; ``memory_plan`` says what "auto" chose).

Scenes too slow to run whole: --fusion-layers K runs only the first K of the fusion blocks (the
others' weights stay on the GPU, so the peak counts them) with the heads reading layers 0, K-2, K-1
and K in place of 0, 12, 18, 24. Every fusion block has the same peak, so with the lean plan any K
gives the full model's peak, and with the fast plan K >= 3 does (the last block then holds three
distinct hook layers, as block 24 does); ``peak_is_full_depth`` says which. ``seconds`` is then
extrapolated: the measured time plus (24 - K) times the measured time per fusion block (CUDA events
around each block, ``seconds_fusion_blocks``; the fusion's one-off work is not multiplied), with
``time_extrapolated``: true and ``seconds_measured`` and ``seconds_per_fusion_layer`` beside it.
--memory-cap-gib X caps this process at X GiB (``torch.cuda.set_per_process_memory_fraction``) to
show what fits on a smaller card. With --official DIR (a copy of shared/peers) the
official model runs at the same points in a subprocess, bf16 weights, in the same run. A
point that runs out of memory is recorded with ``oom: true``.

Under torchrun each rank takes its shard of the scene (``fast3r.parallel.split_views``)
and runs ``model(shard, process_group=...)``: records carry ``"gpus": P``, the slowest
rank's stage times, the largest per-rank peak memory, and the time spent gathering the
scene layout; with --outputs-to-cpu the outputs move to the CPU as they are produced.

Writes ``benchmarks/results/scale_views_<gpu>_<size>[_p<P>].json`` and a PNG plot beside
it, then prints a table. Without a GPU it runs the ``tiny`` preset on a few views on the
CPU (a smoke run of the same code path) and says so first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import gpu_name

from fast3r import Fast3R, Fast3RConfig, memory, parallel

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_VIEWS = (1, 2, 10, 16, 32, 100, 500, 1000, 1500)
CPU_VIEWS = (1, 2, 4)
SIZES = {"224": (224, 224), "512": (384, 512)}  # (H, W): 224 crops square, 512 gives 512x384 landscape
STAGES = {"encoder": "encoder", "fusion": "decoder", "heads": ("downstream_head", "downstream_head_local")}
MEMORY_MODES = ("fast", "lean", "auto")


class StageTimer:
    """GPU time (CUDA events) and peak allocated memory of the encoder, fusion and head modules.

    The allocator's peak is reset as each stage's module starts and read as it ends, so a stage's peak
    counts everything alive during it; readings at every boundary keep the forward's overall peak.
    """

    def __init__(self, model: Fast3R, per_block: bool = True):
        self.pairs: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {s: [] for s in STAGES}
        self.peaks: dict[str, int] = {s: 0 for s in STAGES}
        self.overall = self.overall_reserved = 0
        self.blocks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # each fusion block on its own
        for block in model.decoder.dec_blocks if per_block else ():  # hooks of a compiled block would be traced
            block.register_forward_pre_hook(self._start_block)
            block.register_forward_hook(self._stop_block)
        for stage, names in STAGES.items():
            for name in (names,) if isinstance(names, str) else names:
                module = getattr(model, name)
                if module is not None:
                    module.register_forward_pre_hook(lambda *_, s=stage: self._start(s))
                    module.register_forward_hook(lambda *_, s=stage: self._stop(s))

    def _start(self, stage: str) -> None:
        self._read()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self.pairs[stage].append((start, None))

    def _stop(self, stage: str) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pairs[stage][-1] = (self.pairs[stage][-1][0], end)
        self.peaks[stage] = max(self.peaks[stage], torch.cuda.max_memory_allocated())
        self._read()

    def _start_block(self, *_) -> None:
        self.blocks.append((_event(), None))

    def _stop_block(self, *_) -> None:
        self.blocks[-1] = (self.blocks[-1][0], _event())

    def _read(self) -> None:
        self.overall = max(self.overall, torch.cuda.max_memory_allocated())
        self.overall_reserved = max(self.overall_reserved, torch.cuda.max_memory_reserved())

    def reset(self) -> None:
        for pairs in self.pairs.values():
            pairs.clear()
        self.blocks.clear()
        self.peaks = {s: 0 for s in STAGES}
        self.overall = self.overall_reserved = 0

    def seconds(self) -> dict[str, float]:
        """Seconds per stage, and in ``fusion_blocks`` those of the fusion blocks alone."""
        torch.cuda.synchronize()
        return {s: sum(a.elapsed_time(b) for a, b in pairs) / 1e3
                for s, pairs in (*self.pairs.items(), ("fusion_blocks", self.blocks))}

    def peak_gib(self) -> dict[str, float]:
        """Peaks of the last forward: overall, reserved, and per stage (call after it finished)."""
        self._read()
        return {"peak_gib": self.overall / 2**30, "peak_reserved_gib": self.overall_reserved / 2**30,
                **{f"peak_gib_{s}": p / 2**30 for s, p in self.peaks.items()}}


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def run_fewer_fusion_layers(model: Fast3R, layers: int) -> list[nn.Module]:
    """Run only the first ``layers`` fusion blocks, the heads reading layers (0, K-2, K-1, K) (at least 1).

    Returns the blocks left out: keep them referenced, so their weights stay on the device and count in
    the peak as in the whole model. Every block (``layers`` = the depth) leaves the model as it is.
    """
    blocks = list(model.decoder.dec_blocks)
    if not 1 <= layers <= len(blocks):
        raise SystemExit(f"--fusion-layers {layers}: the model has {len(blocks)} fusion blocks; pass 1..{len(blocks)}")
    if layers == len(blocks):
        return []
    model.decoder.dec_blocks = nn.ModuleList(blocks[:layers])
    model.decoder.hooks = (0, max(1, layers - 2), max(1, layers - 1), layers)
    return blocks[layers:]


def nvml_used_gib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
    except Exception:  # noqa: BLE001 - NVML is optional information; its absence is recorded as null
        return None


def build_model(backend: str, checkpoint: str | None, device: str) -> Fast3R:
    torch.manual_seed(0)  # same random weights for every backend
    if checkpoint:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as for random weights
        return Fast3R.from_pretrained(checkpoint, backend=backend, device=device, dtype=dtype)
    preset = "large" if device == "cuda" else "tiny"
    model = Fast3R(preset, backend=backend.split("+")[0])
    model = model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    return model.compile() if "+compile" in backend else model  # Fast3R.compile(): regional, default mode


class Scene:
    """This process's views of the scene and how to call the model on them (one GPU, or a torchrun rank)."""

    def __init__(self, views: int, hw: tuple[int, int], device: str, outputs_to_cpu: bool, context_parallel: str):
        self.hw = hw
        generator = torch.Generator().manual_seed(views)  # the same scene on every rank
        images = torch.randint(0, 256, (views, 3, *hw), dtype=torch.uint8, generator=generator)
        self.group = dist.group.WORLD if dist.is_initialized() else None
        if self.group is not None:
            images = torch.stack(parallel.shard_for_rank(list(images), self.group))
        self.images = images.to(device)
        self.kwargs = {"output_device": "cpu"} if outputs_to_cpu else {}
        if self.group is not None:
            self.kwargs.update(process_group=self.group, context_parallel=context_parallel)

    def forward(self, model: Fast3R, graph: bool, memory_mode: str) -> list:
        if graph:
            return model(self.images, cuda_graph=True)
        return model(self.images, memory=memory_mode, **self.kwargs)

    def memory_plan(self, model: Fast3R, memory_mode: str) -> str:
        """What ``memory=memory_mode`` resolves to for this scene now ("fast" or "lean")."""
        h, w = self.hw
        patch = model.config.patch_size
        tokens = (h // patch) * (w // patch)
        work = memory.Workload(batch=1, views=len(self.images), tokens=tokens * len(self.images), view_tokens=tokens,
                               view_pixels=h * w, elem_bytes=next(model.parameters()).element_size(),
                               outputs_on_device="output_device" not in self.kwargs)
        return memory.choose(model.config, memory_mode, self.images.device, work)


def measure_point(model: Fast3R, timer: StageTimer | None, scene: Scene, repeats: int, warmup: bool, device: str,
                  graph: bool, memory_mode: str = "auto") -> dict:
    seconds, stages = [], []
    cache_before = inductor_cache_counts()
    for i in range(int(not warmup), repeats + 1):  # run 0 warms up (kernel compilation, allocator, graph capture)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            timer.reset()
        _barrier()
        start = time.perf_counter()
        with torch.inference_mode():
            out = scene.forward(model, graph, memory_mode)
        if device == "cuda":
            torch.cuda.synchronize()
        _barrier()
        if i:
            seconds.append(time.perf_counter() - start)
            if timer:
                stages.append(timer.seconds())
        else:
            first_call = time.perf_counter() - start  # includes compilation (kernels, torch.compile, graphs)
        peaks = timer.peak_gib() if timer else {}
        used = nvml_used_gib() if device == "cuda" else None
        del out
    record = {"seconds": statistics.median(seconds), "all_seconds": [round(s, 4) for s in seconds],
              "views_per_second": len(scene.images) * _world() / statistics.median(seconds), "warmup": warmup}
    if warmup:
        record["first_call_seconds"] = round(first_call, 3)
    cache = {key: count - cache_before[key] for key, count in inductor_cache_counts().items()}
    if any(cache.values()):  # compiled: hits mean this process reused graphs an earlier run compiled
        record["inductor_cache"] = cache
    if device == "cuda" and not graph:  # a replayed graph runs no module hooks: no stage split
        record.update({f"seconds_{s}": _max_over_ranks(statistics.median(x[s] for x in stages))
                       for s in (*STAGES, "fusion_blocks")})
        if not timer.blocks:
            record["seconds_fusion_blocks"] = None  # compiled blocks are not timed one by one
        record.update({key: _max_over_ranks(value) for key, value in peaks.items()})
    elif device == "cuda":
        record["peak_gib"] = _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30)
    if device == "cuda":
        record["nvml_used_gib"] = used
    return record


def inductor_cache_counts() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses so far in this process (its on-disk cache outlives the process)."""
    from torch._dynamo.utils import counters

    return {"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}


def extrapolate_depth(record: dict, layers_run: int, depth: int, memory_plan: str) -> None:
    """A run of ``layers_run`` of ``depth`` fusion blocks: full-depth times from the blocks' own time.

    Only the blocks' time scales with the depth: what the fusion stage does once (the embedding, the
    final norm, allocating host memory for the hook layers on a first call) is counted once.
    """
    record.update({"fusion_layers_run": layers_run, "fusion_layers": depth,
                   "peak_is_full_depth": memory_plan == "lean" or layers_run >= 3})
    if layers_run == depth or record.get("seconds_fusion_blocks") is None:
        record["time_extrapolated"] = False
        return
    per_layer = record["seconds_fusion_blocks"] / layers_run
    added = (depth - layers_run) * per_layer
    record.update({"time_extrapolated": True, "seconds_measured": record["seconds"], "seconds_per_fusion_layer":
                   per_layer, "seconds_fusion_measured": record["seconds_fusion"],
                   "seconds": record["seconds"] + added, "seconds_fusion": record["seconds_fusion"] + added,
                   "seconds_fusion_blocks": record["seconds_fusion_blocks"] + added})
    record["views_per_second"] = record["views_per_second"] * record["seconds_measured"] / record["seconds"]


def official_point(peers: Path, views: int, size: str, repeats: int) -> dict:
    """The official model at one point, in its own process (its package is also named fast3r).

    One warm-up forward, then ``repeats`` timed ones (the model is built per point, which dominates).
    """
    h, w = SIZES[size]
    cmd = [sys.executable, str(peers / "run_official.py"), "--config", "large", "--views", str(views), "--hw", str(h),
           str(w), "--device", "cuda", "--dtype", "bf16w", "--reps", str(repeats + 1)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        oom = "OutOfMemoryError" in run.stderr
        return {"oom": oom, "seconds": None, "peak_gib": None, "error": run.stderr.strip().splitlines()[-1][:300]
                if run.stderr.strip() else f"exit {run.returncode}"}
    info = json.loads(lines[-1])
    timed = info["seconds"][1:]  # the first run compiles and warms up
    return {"oom": False, "seconds": statistics.median(timed), "all_seconds": [round(t, 4) for t in timed],
            "views_per_second": views / statistics.median(timed), "peak_gib": info["peak_gib"], "warmup": True}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _max_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run(args: argparse.Namespace) -> dict:
    args = argparse.Namespace(**{**vars(parser().parse_args([])), **vars(args)})  # defaults for options not given
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    if device == "cpu":
        views = CPU_VIEWS
    else:
        views = sorted(set(args.points) if args.points else {v for v in DEFAULT_VIEWS if v <= args.views} | {args.views})
    backends = args.backend if device == "cuda" else ["torch"]
    if device == "cuda" and args.compile:
        backends = [*backends, *(f"{b}+compile" for b in args.backend)]
    if device == "cuda" and _world() == 1 and args.cuda_graph_max_views and "triton" in backends:
        backends = [*backends, "triton+graph", *(["triton+compile+graph"] if args.compile else [])]
    if device == "cpu":
        what = f"checkpoint {args.checkpoint}" if args.checkpoint else "tiny preset"
        print(f"No CUDA GPU: running the {what} on the CPU with {list(views)} views and the torch backend "
              "(a smoke run of the benchmark; the large-model numbers need an H100).", flush=True)
    doc = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "gpus": _world(), "size": args.size, "image_hw": SIZES[args.size],
           "preset": "large" if device == "cuda" else "tiny", "dtype": "bfloat16" if device == "cuda" else "float32",
           "checkpoint": args.checkpoint, "outputs_to_cpu": args.outputs_to_cpu,
           "context_parallel": args.context_parallel if _world() > 1 else None,
           "memory_cap_gib": args.memory_cap_gib, "fusion_layers_run": args.fusion_layers, "records": []}
    for backend in backends:
        graph = backend.endswith("+graph")
        model = build_model(backend, args.checkpoint, device)
        # What actually ran: a checkpoint brings its own architecture.
        doc["preset"] = next((p for p in ("large", "tiny") if Fast3RConfig.preset(p) == model.config), "custom")
        doc["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        depth = len(model.decoder.dec_blocks)
        layers_run = args.fusion_layers or depth
        spare = run_fewer_fusion_layers(model, layers_run)  # held: the other blocks' weights stay resident
        timer = StageTimer(model, per_block="+compile" not in backend) if device == "cuda" else None
        for n in views:
            if graph and n > args.cuda_graph_max_views:
                continue
            scene = None
            modes = ("fast",) if graph else [m for m in args.memory if m != "fast" or n <= args.fast_max_views]
            for memory_mode in modes:
                record = {"views": n, "size": args.size, "backend": backend, "gpus": _world(), "memory": memory_mode,
                          "oom": False}
                single = n >= args.single_run_above
                try:
                    scene = scene or Scene(n, SIZES[args.size], device, args.outputs_to_cpu, args.context_parallel)
                    record["memory_plan"] = scene.memory_plan(model, memory_mode)
                    record.update(measure_point(model, timer, scene, 1 if single else args.repeats, not single,
                                                device, graph, memory_mode))
                    extrapolate_depth(record, layers_run, depth, record["memory_plan"])
                except torch.cuda.OutOfMemoryError as err:
                    record.update({"oom": True, "error": str(err).splitlines()[0][:200], "seconds": None,
                                   "peak_gib": None})
                if device == "cuda":
                    model.__dict__.pop("_graph_cache", None)  # a captured graph holds its activations
                    torch.cuda.empty_cache()
                doc["records"].append(record)
                if not dist.is_initialized() or dist.get_rank() == 0:
                    print(json.dumps(record), flush=True)
            del scene
        del model, timer, spare
    if args.official and device == "cuda" and _world() == 1:
        for n in views:
            record = {"views": n, "size": args.size, "backend": "official", "gpus": 1,
                      **official_point(args.official, n, args.size, 1 if n >= args.single_run_above else args.repeats)}
            doc["records"].append(record)
            print(json.dumps(record), flush=True)
    return doc


def merge(paths: list[Path]) -> dict:
    docs = [json.loads(p.read_text()) for p in paths]
    keys = {(d["gpu"], d["size"], d["preset"], d["dtype"]) for d in docs}
    if len(keys) != 1:
        raise SystemExit(f"--merge needs runs of one GPU kind, size, preset and dtype; got {sorted(keys)}")
    gpus = max(d.get("gpus", 1) for d in docs)
    return {**docs[0], "gpus": gpus, "records": [r for d in docs for r in d["records"]],
            "merged_from": [p.name for p in paths]}


def table(doc: dict) -> str:
    rows = [("| views | backend | memory | GPUs | s / forward | encoder | fusion | heads | views/s | peak GiB "
             "| encoder / fusion / heads GiB | NVML GiB |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["records"]:
        memory_cell = _memory_cell(r)
        if r["oom"] or r["seconds"] is None:
            rows.append(f"| {r['views']} | {r['backend']} | {memory_cell} | {r.get('gpus', 1)} | "
                        f"{'OOM' if r['oom'] else 'failed'} | | | | | | | |")
            continue
        seconds = _cell(r, "seconds") + ("*" if r.get("time_extrapolated") else "")
        stage_peaks = " / ".join(_cell(r, f"peak_gib_{s}", "{:.2f}") for s in STAGES)
        cells = [seconds, _cell(r, "seconds_encoder"), _cell(r, "seconds_fusion"),
                 _cell(r, "seconds_heads"), _cell(r, "views_per_second", "{:.0f}"), _cell(r, "peak_gib", "{:.2f}"),
                 stage_peaks, _cell(r, "nvml_used_gib", "{:.1f}")]
        rows.append(f"| {r['views']} | {r['backend']} | {memory_cell} | {r.get('gpus', 1)} | " + " | ".join(cells)
                    + " |")
    if any(r.get("time_extrapolated") for r in doc["records"]):
        rows.append("\n\\* extrapolated to the full depth from the per-block fusion time of a run with fewer "
                    "fusion blocks (--fusion-layers)")
    return "\n".join(rows)


def _memory_cell(record: dict) -> str:
    asked, plan = record.get("memory", "auto"), record.get("memory_plan")
    return f"{asked} ({plan})" if plan and plan != asked else asked


def _cell(record: dict, key: str, fmt: str = "{:.3f}") -> str:
    return fmt.format(record[key]) if record.get(key) is not None else "-"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, gpus, mem in dict.fromkeys((r["backend"], r.get("gpus", 1), r.get("memory_plan"))
                                            for r in doc["records"]):
        ok = sorted((r for r in doc["records"] if r["backend"] == backend and r.get("gpus", 1) == gpus
                     and r.get("memory_plan") == mem and not r["oom"] and r["seconds"] is not None),
                    key=lambda r: r["views"])
        label = "official code (bf16 weights)" if backend == "official" else f"Fast3R, {backend} backend"
        label += f", {mem} memory" if mem else ""
        label += f", {gpus} GPUs" if gpus > 1 else ""
        style = "kx--" if backend == "official" else "o-"
        ax_t.plot([r["views"] for r in ok], [r["seconds"] for r in ok], style, label=label)
        if ok and all(r.get("peak_gib") is not None for r in ok):
            ax_m.plot([r["views"] for r in ok], [r["peak_gib"] for r in ok], style,
                      label=label + (" (largest per GPU)" if gpus > 1 else ""))
    h, w = doc["image_hw"]
    for ax, ylabel in ((ax_t, "seconds per forward"), (ax_m, "peak GiB (max_memory_allocated)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("views")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"Fast3R {doc['preset']} ({doc['dtype']}) on {doc['gpu']}, {w}x{h} images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=1500, help="largest view count of the sweep")
    parser.add_argument("--size", choices=sorted(SIZES), default="224")
    parser.add_argument("--backend", nargs="+", choices=["triton", "torch"], default=["triton", "torch"])
    parser.add_argument("--checkpoint", help="weights to load instead of random ones (directory, file or hub id)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point after one warm-up")
    parser.add_argument("--single-run-above", type=int, default=10**9,
                        help="from this many views on, time a single run without warm-up (the smaller points of "
                             "the sweep have compiled the kernels); for forwards that take minutes")
    parser.add_argument("--points", type=int, nargs="+", help="explicit view counts instead of the default sweep")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="combine the records of earlier runs (same GPU and size) into one JSON, plot and table")
    parser.add_argument("--cuda-graph-max-views", type=int, default=100,
                        help="also time the triton backend replaying a CUDA graph up to this many views (0: never)")
    parser.add_argument("--official", type=Path, metavar="PEERS_DIR",
                        help="a copy of shared/peers: time the official model at the same points (bf16 weights)")
    parser.add_argument("--outputs-to-cpu", action="store_true", help="move each view's outputs to the CPU as produced")
    parser.add_argument("--context-parallel", choices=["auto", "ulysses", "ring"], default="auto",
                        help="how the fusion attention spans the ranks under torchrun")
    parser.add_argument("--memory", nargs="+", choices=MEMORY_MODES, default=["auto"],
                        help="memory plans to run each point under (Fast3R.forward(memory=...))")
    parser.add_argument("--fast-max-views", type=int, default=10**9,
                        help="run memory='fast' only up to this many views (the other plans at every point)")
    parser.add_argument("--fusion-layers", type=int, metavar="K",
                        help="run only the first K fusion blocks and extrapolate the time (see above)")
    parser.add_argument("--memory-cap-gib", type=float, metavar="GIB",
                        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each backend after Fast3R.compile() (+compile rows; first_call_seconds "
                             "holds the compile time), and the compiled triton model replayed as a CUDA graph")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser


def main() -> None:
    cli = parser()
    args = cli.parse_args()
    if args.views < 1 or any(p < 1 for p in args.points or ()):
        cli.error("view counts must be at least 1")
    if args.memory_cap_gib is not None and not (args.memory_cap_gib > 0 and math.isfinite(args.memory_cap_gib)):
        cli.error(f"--memory-cap-gib {args.memory_cap_gib}: pass a positive number of GiB")
    if "LOCAL_RANK" in os.environ and not args.merge:  # started by torchrun: one scene across the ranks
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=timedelta(minutes=20))
    doc = merge(args.merge) if args.merge else run(args)
    if dist.is_initialized():
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return
    counts = sorted({r.get("gpus", 1) for r in doc["records"]})
    suffix = f"_gpus{'-'.join(map(str, counts))}" if len(counts) > 1 else f"_p{counts[0]}" if counts[0] > 1 else ""
    name = f"scale_views_{'cpu' if doc['gpu'] == 'cpu' else gpu_name(doc['gpu'])}_{doc['size']}{suffix}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1))
    plot(doc, args.out_dir / f"{name}.png")
    print(table(doc))
    print(f"wrote {args.out_dir / name}.json and .png")


if __name__ == "__main__":
    main()
