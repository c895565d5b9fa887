"""Training checkpoints: everything a resumed run needs to continue as if it had never stopped.

A checkpoint is a directory ``RUN_DIR/checkpoints/step_00001000/`` holding ``state.pt`` (model,
AdamW, learning-rate schedule, step, counters) and ``rng_rank<r>.pt`` (each rank's Python, NumPy,
torch CPU and CUDA generator states). It is written into a hidden staging directory and renamed
into place when complete, and ``checkpoints/LATEST`` (one line, replaced atomically) names the
newest one: a run killed while writing leaves the previous checkpoint as LATEST and no partial
directory under a real name. The data position needs no state of its own: it is a function of the
step (fast3r.train.order). Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed
from .distributed import World

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE = "state.pt"


class ResumeError(ValueError):
    """A run directory cannot be resumed; the message says what is missing or different."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step_{step:08d}"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = run_dir / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE).is_file():
            return named
    complete = sorted(p for p in root.glob("step_*") if (p / STATE).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def save(run_dir: Path, step: int, world: World, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, counters: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` (every rank calls this; rank 0 writes the shared state)."""
    target = checkpoint_dir(run_dir, step)
    staging = target.with_name(f".{target.name}.partial")
    if world.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier(world)
    _write(staging / f"rng_rank{world.rank}.pt", rng_state())
    if world.main:
        _write(staging / STATE, {"step": step, "world_size": world.size, "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "counters": dict(counters)})
    distributed.barrier(world)  # every rank's RNG file is in
    if world.main:
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        _write_text(run_dir / CHECKPOINTS / LATEST, target.name + "\n")
        older = sorted(p for p in (run_dir / CHECKPOINTS).glob("step_*") if p != target)
        for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest `keep`, this one included
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(world)
    return target


def load(path: Path, world: World, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint in place; -> (step, counters)."""
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: name it
        raise ResumeError(f"cannot read {path / STATE} ({err}); resume from an earlier checkpoint by deleting "
                          f"this one (and {path.parent / LATEST})") from err
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] != world.size:
        warnings.warn(f"{path} was written by {state['world_size']} ranks and is resumed on {world.size}: training "
                      "continues, but reads other samples than the uninterrupted run would have", stacklevel=2)
    rng = path / f"rng_rank{world.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return int(state["step"]), dict(state["counters"])


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
