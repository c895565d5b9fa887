"""Which change lets the learning run's model learn cameras? Short runs of variants, side by side, on one GPU.

    python benchmarks/learning_sweep.py                    # one H200: the variants below, ~1.6 minutes each
    python benchmarks/learning_sweep.py --steps 4 --cpu    # the same code on the CPU (logic, not the result)

Four learning runs (``learning_run.py``) learned depth and layout but no cameras: the training loss stalls
at ~0.45 from step ~100 and the held-out poses stay at what identity cameras score. Each variant here is
the learning run's config (bf16-mixed) with one or two things changed, trained the same number of steps
on the same scenes; the baseline is the unchanged config, so the comparison is within one run. Written:
``results/train/learning_sweep_<gpu>.json`` (each variant's changes, loss curve, the learning run's
summary and checks) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_run import config, summarize
from timing import gpu_name

from fast3r.train import loop, train
from fast3r.train.evaluate import identity_pose_metrics
from fast3r.train.logging import read_metrics

# name -> (changes to learning_run.config's arguments, changes to every training data entry)
VARIANTS = {
    "baseline": ({}, {}),
    "jitter per sample": ({}, {"jitter": "sample"}),
    "window 4": ({"window": 4}, {}),
    "lr 3e-4": ({"lr": 3e-4}, {}),
    "jitter per sample, window 4": ({"window": 4}, {"jitter": "sample"}),
}
SCENES = 2048  # ~2 epochs of 4 samples a scene in the default steps: no scene learned by heart


def run_variant(root: Path, name: str, steps: int, cpu: bool, scenes: int, val_every: int) -> dict:
    arguments, entry_changes = VARIANTS[name]
    base = config(root / name.replace(" ", "_").replace(",", ""), "bf16-mixed", steps, cpu, scenes=None if cpu
                  else scenes, **arguments)
    run = base.replace(data=[{**entry, **entry_changes} for entry in base.data], val_every=val_every or steps)
    identity = identity_pose_metrics(loop.build_val_set(run))
    summary = train(run)
    records = read_metrics(Path(run.out))
    return {"arguments": arguments, "entry_changes": entry_changes, "seconds": summary["seconds"],
            "curve": [{"step": r["step"], "loss": r["loss"], "regr": r["regr"]} for r in records
                      if r["kind"] == "train" and r["loss"] is not None],
            "validations": [{k: r[k] for k in ("step", "loss", "RRA@15", "RTA@15", "mAA@30", "accuracy")}
                            for r in records if r["kind"] == "val"],
            **summarize(Path(run.out), identity)}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for name, result in results.items():
        axes[0].plot([r["step"] for r in result["curve"]], [r["loss"] for r in result["curve"]], label=name)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    names = list(results)
    for ax, key in zip(axes[1:], ("RRA@15", "RTA@15")):
        trained = [results[n]["trained"][key] for n in names]
        identity = [results[n]["identity_poses"][key] for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], trained, 0.4, label="trained")
        ax.bar([i + 0.2 for i in x], identity, 0.4, label="identity poses")
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"held-out {key}")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=360, help="steps per variant (default 360: ~70 s on the H200)")
    parser.add_argument("--scenes", type=int, default=SCENES, help=f"training scenes (default {SCENES})")
    parser.add_argument("--val-every", type=int, default=0, help="validate every this many steps (default: at the "
                        "start and the end only)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (logic only)")
    parser.add_argument("--out", type=Path, help="results JSON (default results/train/learning_sweep_<gpu>.json)")
    args = parser.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    name = "cpu" if cpu else gpu_name()
    out = args.out or Path(__file__).resolve().parent / "results" / "train" / f"learning_sweep_{name}.json"
    started, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="fast3r_sweep_") as tmp:
        for variant in args.variants:
            results[variant] = run_variant(Path(tmp), variant, args.steps, cpu, args.scenes, args.val_every)
            kept = {k: results[variant][k] for k in ("loss_end", "trained", "identity_poses", "seconds")}
            print(json.dumps({variant: kept}), file=sys.stderr)
            document = {"gpu": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                        "steps": args.steps, "scenes": args.scenes, "total_seconds": time.perf_counter() - started,
                        "variants": results}
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(f".{out.name}.partial")  # after every variant: a cut-off call keeps the done ones
            partial.write_text(json.dumps(document, indent=1))
            partial.replace(out)
    plot(results, out.with_suffix(".png"), f"learning-run variants, {args.steps} steps each (bf16-mixed)")
    print(f"wrote {out} and {out.with_suffix('.png')} ({document['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
