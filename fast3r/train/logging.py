"""What a person sees of a run: a progress bar, ``metrics.jsonl``, TensorBoard events and a plot.

Only rank 0 logs. ``RUN_DIR/metrics.jsonl`` holds one JSON object per line: ``{"kind": "train",
"step": ..., "loss": ..., "lr": ...}`` every ``log_every`` steps and ``{"kind": "val", "step": ...,
"RRA@15": ...}`` after each validation. It is the record the plot and the README tables are made
from. TensorBoard event files (``RUN_DIR/tensorboard``) are written when ``tensorboard`` is
installed (the ``[train]`` extra); the bar (tqdm, also in that extra) falls back to printed lines.
On resume both drop what the interrupted run logged after its checkpoint, so curves have no repeats.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CURVES = "curves.png"
# The training panel: the loss and the point distance, split as fast3r.train.distances says (a gap between the
# last two is what the unknown cameras cost).
TRAINING_CURVES = (("loss", "-", "loss"), ("regr", "--", "mean point distance"),
                   ("regr_anchor", ":", "distance, view 0"), ("regr_others", "-.", "distance, views 1.. in view 0's frame"))
SHOWN_ON_BAR = {"loss": "{:.4f}", "lr": "{:.2e}", "views/s": "{:.1f}", "data_s": "{:.2f}", "gpu_mem_gib": "{:.1f}"}


class RunLog:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool, log_every: int):
        self.run_dir, self.enabled, self.log_every, self.total = run_dir, enabled, log_every, total_steps
        self._bar = self._writer = None
        if not enabled:
            return
        keep_until(run_dir / METRICS, start_step)
        self._writer = _tensorboard(run_dir / TENSORBOARD, start_step)
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         file=sys.stderr)

    def train_step(self, step: int, record: dict[str, Any]) -> None:
        """After optimizer step ``step`` (1-based): the bar every step, the files every ``log_every``."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str("  ".join(f"{k} {fmt.format(record[k])}" for k, fmt in SHOWN_ON_BAR.items()
                                                if record.get(k) is not None), refresh=False)
            self._bar.update(step - self._bar.n)
        if step % self.log_every == 0 or step == 1 or step == self.total:
            self._record("train", step, record)
            if self._bar is None:
                self.message(f"step {step}/{self.total}  " + "  ".join(
                    f"{k} {fmt.format(record[k])}" for k, fmt in SHOWN_ON_BAR.items() if record.get(k) is not None))

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record("val", step, metrics)
        shown = ("loss", "RRA@15", "RTA@15", "mAA@30", "accuracy")
        self.message(f"validation at step {step}: " + "  ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        for handle in (self._bar, self._writer):
            if handle is not None:
                handle.close()
        self._bar = self._writer = None

    def _record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS, "a") as f:  # one line per write: a killed run leaves whole lines
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
            self._writer.flush()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` in order ([] before the first); a str or a Path."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_until(path: Path, step: int) -> None:
    """Drop the records after ``step`` (those of an interrupted run past its last checkpoint), atomically."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)


def plot_curves(run_dir: Path, title: str | None = None) -> Path:
    """RUN_DIR/curves.png: the training loss (and the point distances), and each validation metric, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    val_keys = [k for k in ("loss", "RRA@15", "RTA@15", "mAA@30", "accuracy") if any(k in r for r in val)]
    fig, axes = plt.subplots(1, 1 + len(val_keys), figsize=(4.5 * (1 + len(val_keys)), 3.6), squeeze=False)
    ax = axes[0, 0]
    for key, style, label in TRAINING_CURVES:
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_title("training")
    ax.legend()
    for ax, key in zip(axes[0, 1:], val_keys):
        points = [(r["step"], r[key]) for r in val if key in r]
        ax.plot(*zip(*points), "o-")
        ax.set_xlabel("step")
        ax.set_title(f"validation {key}" + (" (lower is better)" if key in ("loss", "accuracy") else ""))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = run_dir / CURVES
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tensorboard(directory: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (the [train] extra)
        return None
    return SummaryWriter(str(directory), purge_step=start_step + 1 if start_step else None)
