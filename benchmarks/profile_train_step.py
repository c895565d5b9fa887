"""Where a training step's time goes: each phase device-synchronized, then the kernels of one step.

    python benchmarks/profile_train_step.py --backend triton --views 32 --size 512 [--checkpointing none]
    python benchmarks/profile_train_step.py --model learning-run [--compile]   # the learning run's step

``--model learning-run``: the learning run's small model and step (benchmarks/learning_run.py: its
batch of 4-view samples of 224 x 224, its precision and backend) on random data, to see whether that
step is bound by the GPU's work or by the host's launches (compare step_s with the profiled device
time). ``--compile``: ``Fast3R.compile()`` first (as ``compile: true`` in a training config).
``--loop-steps N`` (with ``--model learning-run``): then N steps of ``fast3r.train.train`` itself on the
synthetic scenes, and the median ``step_s`` and ``data_s`` of its records after the first 5: what the
training loop adds to the step timed here (host-to-device copies, checks, the DataLoader's workers); and
the host seconds per step in each ``train/*`` range of the loop (a profile of a second run of up to 10
steps), to show where that difference goes. ``--workers``: the loop's DataLoader workers.

Phases (a warm-up step first, then each phase timed with a synchronize on both sides, median of
--reps): the model's forward under the step's autocast, ``fast3r_loss``, the backward, AdamW. Then
one step under ``torch.profiler``: the --top CUDA kernels by total device time, and the share of
the step per kernel family. Writes ``--out`` (JSON) when given. Without a GPU the same code profiles
the small CPU model's operators (a check of the script, not a measurement), and says so.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning_run
from bench_train import HW, _sync, random_batch, training_config

from fast3r.loss import fast3r_loss
from fast3r.train import loop, train
from fast3r.train.activation_checkpointing import apply_activation_checkpointing
from fast3r.train.data import to_model_inputs
from fast3r.train.logging import read_metrics
from fast3r.train.precision import apply_precision

FAMILIES = {  # substring of a kernel name -> family (first match wins)
    "attention": ("flash", "fmha", "attn", "cudnn", "sdpa"),
    "matmul": ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "wgmma"),
    "convolution": ("conv", "implicit", "dgrad", "wgrad"),
    "layer norm": ("layer_norm", "layernorm", "_ln_"),
    "upsampling": ("upsample", "bilinear"),
    "optimizer": ("adam", "multi_tensor"),
    "reduction": ("reduce",),
    "copy": ("copy", "cat", "fill"),
    "element-wise": ("elementwise", "vectorized", "unrolled"),
}


def family(name: str) -> str:
    lower = name.lower()
    return next((fam for fam, keys in FAMILIES.items() if any(k in lower for k in keys)), "other")


def timed(fn, reps: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def samples(count: int, views: int, hw: tuple[int, int]) -> dict:
    """``count`` random samples batched as the DataLoader batches them (bench_train.random_batch's layout)."""
    parts = [random_batch(views, hw, pin=False, seed=i) for i in range(count)]
    return {key: torch.cat([p[key] for p in parts]) if isinstance(parts[0][key], torch.Tensor)
            else [item for p in parts for item in p[key]] for key in parts[0]}


def loop_rate(config, steps: int) -> dict:
    """Median step_s and data_s of ``steps`` steps of the training loop on the config's own data (after 5),
    then, from a profile of a second, shorter run, the host time per step in each of the loop's ``train/*``
    ranges (the profiler slows the step, so the rate comes from the run without it)."""
    with tempfile.TemporaryDirectory(prefix="fast3r_loop_") as tmp:
        def run(name: str, count: int) -> list[dict]:
            train(config.replace(steps=count, warmup=min(config.warmup, count - 1), val_data=[],
                                 out=str(Path(tmp) / name), log_every=1, save_every=count))
            return [r for r in read_metrics(Path(tmp) / name) if r["kind"] == "train" and r["step"] > 5]

        records = run("plain", steps)
        profiled_steps = min(steps, 10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = run("profiled", profiled_steps)
    ranges = {e.key: e.cpu_time_total / 1e6 / profiled_steps for e in prof.key_averages()
              if e.key.startswith("train/")}
    return {"loop_step_s": statistics.median(r["step_s"] for r in records),
            "loop_data_s": statistics.median(r["data_s"] for r in records), "loop_steps": float(len(records)),
            "loop_workers": float(config.workers),
            "loop_step_s_profiled": statistics.median(r["step_s"] for r in profiled) if profiled else None,
            "loop_host_s_per_step": dict(sorted(ranges.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="triton", choices=("triton", "torch"))
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, choices=(224, 512))
    parser.add_argument("--checkpointing", default="none", choices=("none", "blocks", "full"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--model", default="large", choices=("large", "learning-run"))
    parser.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "official"),
                        help="with --model learning-run (the large model profiles bf16-mixed)")
    parser.add_argument("--compile", action="store_true", help="Fast3R.compile() before the warm-up step")
    parser.add_argument("--loop-steps", type=int, default=0, help="with --model learning-run: then time this many "
                        "steps of the training loop itself (fast3r.train.train)")
    parser.add_argument("--workers", type=int, help="with --loop-steps: DataLoader workers of the loop (default the "
                        "learning run's: all cores but 2)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA GPU: profiling the small model's CPU operators (a check of the script, not a measurement)",
              file=sys.stderr)
    device = torch.device("cuda" if cuda else "cpu")
    backend = args.backend if cuda else "torch"  # the CPU model's head dim 32 runs on the torch backend only
    if args.model == "learning-run":
        config = learning_run.config(Path(tempfile.gettempdir()), args.precision, 100, cpu=not cuda)
        config = config.replace(checkpointing=args.checkpointing)
        args.views, args.size, args.backend = config.views, config.size, "auto"
    else:
        config = training_config(backend, args.size, args.views, args.checkpointing, cuda)
    model = loop.build_model(config, device)
    autocast = apply_precision(model, config.precision)
    apply_activation_checkpointing(model, args.checkpointing)
    if args.compile:
        model.compile()
    optimizer = loop.build_optimizer(config, model)
    images, gts = to_model_inputs(samples(config.batch_size, args.views, HW[args.size]))
    images = images.to(device)
    gts = [{k: v.to(device) for k, v in gt.items()} for gt in gts]

    def forward():
        with autocast():
            return model(images)

    def step():
        loss, _ = fast3r_loss(forward(), gts)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernel tuning at this shape, AdamW's state
    phases = {}
    phases["step_s"], _ = timed(step, args.reps)
    phases["forward_s"], _ = timed(forward, args.reps)
    loss_runs, backward_runs = [], []
    for _ in range(args.reps):
        preds = forward()
        seconds, (loss, _) = timed(functools.partial(fast3r_loss, preds, gts), 1)
        loss_runs.append(seconds)
        backward_runs.append(timed(loss.backward, 1)[0])
        del preds, loss
    phases["loss_s"] = statistics.median(loss_runs)
    phases["backward_s"] = statistics.median(backward_runs)
    phases["optimizer_s"], _ = timed(optimizer.step, args.reps)
    optimizer.zero_grad(set_to_none=True)

    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        step()
        _sync()
    if cuda:
        kernels = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
                   if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # self time of the operators, so that nested calls are not counted twice
        kernels = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    total_ms = sum(k[1] for k in kernels)
    families: dict[str, float] = {}
    for name, ms, _ in kernels:
        families[family(name)] = families.get(family(name), 0.0) + ms
    print(json.dumps({k: round(v, 4) for k, v in phases.items()}))
    print(f"device time in the profiled step: {total_ms:.1f} ms over {sum(k[2] for k in kernels)} launches")
    for fam, ms in sorted(families.items(), key=lambda f: -f[1]):
        print(f"  {fam:<14} {ms:9.1f} ms  {100 * ms / total_ms:5.1f}%")
    for name, ms, count in kernels[:args.top]:
        print(f"{ms:9.2f} ms {count:6d}x  {name[:140]}")
    if args.loop_steps and args.model == "learning-run":
        del model, optimizer, images, gts
        loop_config = config.replace(compile=args.compile, **({} if args.workers is None else {"workers": args.workers}))
        phases.update(loop_rate(loop_config, args.loop_steps))
        print(json.dumps({k: v for k, v in phases.items() if k.startswith("loop_")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps({
            "model": args.model, "backend": args.backend, "precision": config.precision, "compile": args.compile,
            "samples": config.batch_size, "views": args.views, "size": args.size, "checkpointing": args.checkpointing,
            "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, **phases,
            "profiled_device_ms": total_ms, "families_ms": families,
            "kernels": [{"name": n, "ms": ms, "count": c} for n, ms, c in kernels[:100]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
