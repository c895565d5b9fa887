"""Why is the compiled triton forward slower than eager at 32 views? Each variant timed and profiled, one run.

    python benchmarks/profile_compiled_forward.py --views 32        # one H200: ~3 minutes

The large model (random weights, bf16, eval, ``torch.inference_mode``) on ``--views`` views of 224 x 224,
as ``scale_views.py`` runs it, in these variants: eager and ``Fast3R.compile()`` on both backends, and the
compiled triton backend with some of its ops swapped for the torch backend's (which op Inductor does
better with than with our custom op). Per variant: the median wall time of ``--reps``
forwards (synchronized; after ``--warm-views``, as a sweep runs them), then one forward under ``torch.profiler``: the device time (the sum of its
kernels), the kernel count, the device time per kernel family (profile_train_step.FAMILIES) and the top
kernels. Wall time well above device time means the host's launches bound it; device time above eager's
means the compiled kernels are slower. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_train_step import family

from fast3r import Fast3R
from fast3r.backends import TORCH, Ops

# variant -> (backend, Fast3R.compile's arguments or None for eager, the ops taken from the torch backend)
VARIANTS = {
    "triton eager": ("triton", None, ()),
    "triton compiled": ("triton", {}, ()),
    "triton compiled, dynamic=False": ("triton", {"dynamic": False}, ()),
    "triton compiled, torch upsample": ("triton", {}, ("upsample",)),
    "triton compiled, torch upsample + layer norm": ("triton", {}, ("upsample", "layer_norm")),
    "torch eager": ("torch", None, ()),
    "torch compiled": ("torch", {}, ()),
    "torch compiled, dynamic=False": ("torch", {"dynamic": False}, ()),
}


def build(backend: str, compiled: dict | None, swapped: tuple[str, ...], weights: dict, preset: str = "large",
          device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Fast3R:
    model = Fast3R(preset, backend=backend).to(device).eval().to(dtype)
    model.load_state_dict(weights)
    if swapped:
        changes = {op: getattr(TORCH, op) for op in swapped}
        for module in model.modules():
            if isinstance(getattr(module, "ops", None), Ops):
                module.ops = dataclasses.replace(module.ops, **changes)
    return model if compiled is None else model.compile(**compiled)


def measure(model: Fast3R, images: torch.Tensor, reps: int, warm_views: list[int]) -> dict:
    started = time.perf_counter()
    with torch.inference_mode():
        for views in warm_views:  # as a sweep does: a second view count recompiles with symbolic sizes
            model(images[:views])
        model(images)
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        for _ in range(2):
            model(images)
        seconds = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(images)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(images)
            torch.cuda.synchronize()
    kernels = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
                      if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda k: -k[1])
    families: dict[str, float] = {}
    for name, ms, _ in kernels:
        families[family(name)] = families.get(family(name), 0.0) + ms
    return {"first_calls_s": first, "median_ms": 1e3 * statistics.median(seconds),
            "all_ms": [round(1e3 * s, 3) for s in seconds], "device_ms": sum(families.values()),
            "kernels": sum(count for _, _, count in kernels),
            "device_ms_by_family": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:120], "calls": count, "ms": ms} for n, ms, count in kernels[:12]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, nargs="+", default=[32])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warm-views", type=int, nargs="*", default=[], help="run these view counts first "
                        "(e.g. 1 2: what scale_views.py's sweep has run before 32 views)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    weights = Fast3R("large").state_dict()
    generator = torch.Generator().manual_seed(0)
    document = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": 224,
                "warm_views": args.warm_views, "results": {}}
    for views in args.views:
        images = torch.randint(0, 256, (views, 3, 224, 224), dtype=torch.uint8, generator=generator).cuda()
        for name in args.variants:
            torch.compiler.reset()
            result = measure(build(*VARIANTS[name], weights), images, args.reps, args.warm_views)
            key = f"{views} views, {name}" + (f", after {args.warm_views} views" if args.warm_views else "")
            document["results"][key] = result
            print(f"{key}: {result['median_ms']:.2f} ms wall, {result['device_ms']:.2f} ms device, "
                  f"{result['kernels']} kernels, first calls {result['first_calls_s']:.1f} s", file=sys.stderr)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
