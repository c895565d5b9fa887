"""Where a validation pass goes: the learning run's held-out samples, phase by phase.

    python benchmarks/profile_validation.py [--precision official] [--samples 8] [--out profile.json]

The learning run's small model (random weights) and held-out set (benchmarks/learning_run.py), in
eval mode, as ``fast3r.train.evaluate.validate`` runs them: one pass to warm up (kernel compilation,
caches), then ``--samples`` samples under ``torch.profiler``. Each phase of a sample is a
``record_function`` range in evaluate.py (read, forward, loss, cameras, pointmap). GPU work runs
ahead of the host, so a range's host time would also hold the waits for earlier phases' kernels:
``CUDA_LAUNCH_BLOCKING=1`` (set here before CUDA starts) makes every launch wait for its kernel,
so a range's time is what its phase costs, host and device together. That slows launch-bound
phases somewhat; the unprofiled seconds per sample are reported beside it. On the H200 it found
the pointmap accuracy's nearest neighbours holding 282 of 359 ms a sample (``torch.cdist``), and
0.137 s a sample after their fix (results/train/profile_validation_h200*.json). Without a GPU it
profiles the CPU run.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # before torch starts CUDA: the imports below come after it

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning_run
from torch.utils.data import Subset

from fast3r.train import distributed, loop
from fast3r.train.evaluate import validate
from fast3r.train.precision import apply_precision

PHASES = ("read", "forward", "loss", "cameras", "pointmap")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="official", choices=learning_run.PRECISIONS)
    parser.add_argument("--samples", type=int, default=8, help="held-out samples profiled (after a warm-up pass)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    config = learning_run.config(Path(tempfile.gettempdir()), args.precision, 100, cpu=not cuda)
    world = distributed.setup(config.device)
    _, held_out = loop.build_datasets(config)
    samples = Subset(held_out, range(min(args.samples, len(held_out))))
    model = loop.build_model(config, world.device)
    autocast = apply_precision(model, config.precision)

    def one_pass() -> float:
        start = time.perf_counter()
        validate(model, samples, world, autocast=autocast, image_ids=config.image_ids, cameras=config.val_cameras)
        return time.perf_counter() - start

    warm_up_s = one_pass()
    unprofiled_s = one_pass()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_s = one_pass()
    ranges = {e.key.removeprefix("validate/"): e.cpu_time_total / 1e3 / len(samples) for e in prof.key_averages()
              if e.key.startswith("validate/")}
    document = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "launch_blocking": os.environ["CUDA_LAUNCH_BLOCKING"] == "1", "precision": config.precision,
        "backend": model.backend, "samples": len(samples), "views": config.val_views, "size": config.size,
        "first_pass_s_per_sample": warm_up_s / len(samples), "s_per_sample": unprofiled_s / len(samples),
        "profiled_s_per_sample": profiled_s / len(samples),
        "phase_ms_per_sample": {phase: ranges.get(phase, 0.0) for phase in PHASES},
        "top_ops_ms_per_sample": sorted(
            ({"name": e.key, "ms": e.self_cpu_time_total / 1e3 / len(samples), "count": e.count / len(samples)}
             for e in prof.key_averages() if not e.key.startswith("validate/")), key=lambda r: -r["ms"])[:25],
    }
    print(f"{len(samples)} held-out samples, {config.val_views} views of {config.size} px, {config.precision}, "
          f"{document['backend']}: first pass {document['first_pass_s_per_sample']:.3f} s a sample, then "
          f"{document['s_per_sample']:.3f} s ({document['profiled_s_per_sample']:.3f} s profiled)")
    for phase, ms in document["phase_ms_per_sample"].items():
        print(f"  {phase:<9} {ms:9.1f} ms a sample")
    for op in document["top_ops_ms_per_sample"][:12]:
        print(f"    {op['ms']:9.2f} ms {op['count']:7.1f}x  {op['name'][:100]}")
    if args.out:
        args.out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
