"""The training loop, top to bottom: set up (or resume) a run, then step, log, validate, save.

    run = setup(config, resume)           # run directory, model, optimizer, schedule, data, state
    validate (step 0)                     # the starting model, the reference for what follows
    for step in steps: train_step -> log -> validate every val_every -> save every save_every
    final checkpoint, save_pretrained(RUN_DIR/model), curves.png

A step is ``grad_accum`` micro-batches of ``batch_size`` samples on each rank, their losses
(``fast3r_loss``, in fp32, outside autocast) averaged into one AdamW update, then the schedule
(linear warm-up to ``lr``, cosine to ``min_lr``) advances.

Bad ground truth: a batch with NaN or Inf at a valid pixel, or in a camera pose, is skipped as a
whole step on every rank (no update; the schedule and the data position still advance, so the run
stays reproducible) and counted; a warning names the scene and the view files. After more than
``max_bad_batches`` such batches the run stops with the same names (``max_bad_batches: 0`` stops at
the first). The data package masks what it knows to be invalid; reaching this means a mask is wrong.
A sample with another number of views than ``views`` stops the run with the scene named.

Each phase of a step runs in a ``torch.profiler.record_function`` range (``train/copy``, ``/check``,
``/forward``, ``/loss``, ``/backward``, ``/clip``, ``/optimizer``): benchmarks/profile_train_step.py
``--loop-steps`` reads them to show where the loop's host time goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset

from .. import checkpoint
from ..config import Fast3RConfig
from ..fusion import sample_image_indices
from ..loss import fast3r_loss
from ..model import Fast3R
from . import distributed, state
from .activation_checkpointing import apply_activation_checkpointing
from .config import KEYS, RESUMABLE_KEYS, ConfigError, TrainConfig
from .data import DataError, build_dataset, collate, to_model_inputs
from .distances import PARTS, point_distances
from .distributed import World
from .evaluate import validate
from .logging import CURVES, RunLog, plot_curves
from .memory_plan import StepShape, TrainingOutOfMemoryError, out_of_memory_message
from .order import RankSampler, SampleOrder, position
from .precision import apply_precision

CONFIG_FILE = "config.yaml"
WEIGHTS_DIR = "model"
FREEZABLE_PARTS = {"encoder": "encoder", "fusion": "decoder", "head": "downstream_head",
                   "local_head": "downstream_head_local"}


class BadGroundTruthError(ValueError):
    """Too many batches held NaN/Inf ground truth; the message names the last scene and files."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf."""


@dataclass
class Run:
    """Everything a running training holds."""

    config: TrainConfig
    world: World
    run_dir: Path
    model: Fast3R  # the module itself (saved, validated)
    module: nn.Module  # what the step calls: the model, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Callable[[], AbstractContextManager]
    train_set: Dataset
    val_set: Dataset | None
    order: SampleOrder
    step: int
    counters: dict[str, Any]


def train(config: TrainConfig | None = None, *, resume: str | Path | None = None) -> dict[str, Any]:
    """Train (or resume training) as ``config`` says; -> a summary (steps, losses, where the weights are).

    resume: a run directory written by an earlier ``train``; the run continues from its latest
    checkpoint with its saved config (``config`` may then be None, or may change only the keys in
    ``fast3r.train.config.RESUMABLE_KEYS``). Under torchrun every rank calls this.
    """
    if config is None and resume is None:
        raise ValueError("pass a TrainConfig, or resume=RUN_DIR to continue a run")
    saved = Path(resume) / CONFIG_FILE if resume is not None else None
    device = config.device if config is not None else \
        TrainConfig.from_yaml(saved).device if saved.is_file() else "auto"
    world = distributed.setup(device)
    restore = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        run = setup(config, resume, world)
        if run.config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.use_deterministic_algorithms(True, warn_only=True)  # warn where CUDA has no deterministic op
        return _train(run)
    finally:
        torch.use_deterministic_algorithms(restore[0], warn_only=restore[1])
        distributed.teardown(world)


def _train(run: Run) -> dict[str, Any]:
    config, world = run.config, run.world
    log = RunLog(run.run_dir, total_steps=config.steps, start_step=run.step, enabled=world.main,
                 log_every=config.log_every)
    started, first_loss, record = time.perf_counter(), None, {}
    batches = iter(data_loader(run))
    try:
        if run.val_set is not None and run.step == 0:
            log.validation(0, run_validation(run))
        while run.step < config.steps:
            waited = time.perf_counter()
            micro_batches = [next(batches) for _ in range(config.grad_accum)]
            data_s = time.perf_counter() - waited
            record = throughput(train_step(run, micro_batches, log), config, world, data_s)
            run.step += 1
            first_loss = record["loss"] if first_loss is None else first_loss
            log.train_step(run.step, record)
            last = run.step == config.steps
            if run.val_set is not None and (last or (config.val_every and run.step % config.val_every == 0)):
                log.validation(run.step, run_validation(run))
            if last or run.step % config.save_every == 0:
                state.save(run.run_dir, run.step, world, model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, counters=run.counters, keep=config.keep_checkpoints)
    finally:
        log.close()
    weights = run.run_dir / WEIGHTS_DIR
    if world.main:
        save_weights(run.model, dataclasses.replace(run.model.config, random_image_index=config.image_ids == "random"),
                     weights, log)
        plot_curves(run.run_dir, title=f"fast3r train: {run.run_dir.name}")
    distributed.barrier(world)
    return {"steps": run.step, "first_loss": first_loss, "final_loss": record.get("loss"),
            "skipped_batches": run.counters["bad_batches"], "seconds": time.perf_counter() - started,
            "run_dir": str(run.run_dir), "weights": str(weights), "checkpoint": str(state.latest(run.run_dir)),
            "curves": str(run.run_dir / CURVES)}


def save_weights(model: Fast3R, architecture: Fast3RConfig, directory: Path, log: RunLog) -> None:
    """``save_pretrained``'s official layout, and a note where config.json cannot describe the architecture."""
    checkpoint.save(model, architecture, directory)
    if not checkpoint.official_form_describes(architecture):
        log.message(f"{directory}: config.json cannot describe this architecture (the official format fixes the "
                    f"heads' widths); {checkpoint.ARCHITECTURE_NAME} beside it does, and "
                    "Fast3R.from_pretrained reads it (the official loader cannot load these weights)")


# ------------------------------------------------------------------------------------------ the step
def train_step(run: Run, micro_batches: list[dict], log: RunLog) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; -> the numbers to log."""
    config, world = run.config, run.world
    start = time.perf_counter()
    lr = run.scheduler.get_last_lr()[0]
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    losses, distances = [], []  # per micro-batch: the loss, point_distances
    for micro, batch in enumerate(micro_batches):
        with record_function("train/copy"):
            images, gts = to_model_inputs(batch, world.device)
        with record_function("train/check"):
            bad = skip_bad_batch(run, batch, gts, log)
        if bad:
            run.optimizer.zero_grad(set_to_none=True)  # earlier micro-batches of this step count for nothing
            with warnings.catch_warnings():  # the schedule advances without an update, on purpose
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
                run.scheduler.step()
            return {"loss": None, **dict.fromkeys(PARTS), "lr": lr, "skipped_batches": run.counters["bad_batches"]}
        slots = run.order.slots(position(run.step, micro, config.grad_accum, world.rank, world.size))
        last = micro == len(micro_batches) - 1
        sync = run.module.no_sync() if world.distributed and not last else contextlib.nullcontext()
        try:
            with sync:
                with record_function("train/forward"), run.autocast():
                    preds = run.module(images, image_ids=image_ids(config, slots, images.shape[1]),
                                       encoder_chunk=config.encoder_chunk, head_chunk=config.head_chunk)
                with record_function("train/loss"):
                    loss, details = fast3r_loss(preds, gts)
                with record_function("train/backward"):
                    (loss / len(micro_batches)).backward()
        except torch.cuda.OutOfMemoryError as err:
            run.optimizer.zero_grad(set_to_none=True)
            raise TrainingOutOfMemoryError(oom_message(run, images)) from err
        losses.append(loss.item())
        distances.append(point_distances(details))
    grad_norm = None
    if config.clip is not None:
        with record_function("train/clip"):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable(run.model), config.clip))
    parts = [key for key in PARTS if distances[0][key] is not None]  # the same keys on every rank: one model, one view count
    totals = distributed.sum_over_ranks({"loss": sum(losses) / len(losses),
                                         **{key: sum(d[key] for d in distances) / len(distances) for key in parts}},
                                        world)
    loss = totals["loss"] / world.size
    if not math.isfinite(loss):
        raise TrainingDivergedError(f"the loss is {loss} at step {run.step + 1} (lr {lr:.3g}): lower lr, "
                                    "raise warmup, or set clip (e.g. clip: 1.0)")
    try:
        with record_function("train/optimizer"):
            run.optimizer.step()  # the first step allocates AdamW's moments: 8 bytes per parameter
    except torch.cuda.OutOfMemoryError as err:
        raise TrainingOutOfMemoryError(oom_message(run, images)) from err
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, **{key: totals[key] / world.size if key in totals else None for key in PARTS},
            "lr": lr, "grad_norm": grad_norm,
            "step_s": time.perf_counter() - start,
            "gpu_mem_gib": torch.cuda.max_memory_allocated(world.device) / 2**30
            if world.device.type == "cuda" else None,
            "skipped_batches": run.counters["bad_batches"]}


def image_ids(config: TrainConfig, slots: list[int], views: int) -> torch.Tensor:
    """(B, views) image indices; "random" draws per sample from its slot in the stream, so a sample's ids do
    not depend on the rank that reads it or on the batch around it."""
    if config.image_ids == "sequential":
        return torch.arange(views).expand(len(slots), views)
    return torch.cat([sample_image_indices(1, views, torch.Generator().manual_seed(config.seed * 2**32 + slot))
                      for slot in slots])


def skip_bad_batch(run: Run, batch: dict, gts: list[dict[str, torch.Tensor]], log: RunLog) -> bool:
    """Whether any rank's micro-batch holds non-finite ground truth; then count it, warn, or stop past the limit."""
    found = nonfinite_ground_truth(batch, gts)
    if not distributed.any_rank(bool(found), run.world):
        return False
    named = "; ".join(text for texts in distributed.gather_objects(found, run.world) for text in texts)
    run.counters["bad_batches"] += 1
    if run.counters["bad_batches"] > run.config.max_bad_batches:
        raise BadGroundTruthError(
            f"step {run.step + 1}: ground truth holds NaN or Inf ({named}); that is batch "
            f"{run.counters['bad_batches']} with bad ground truth, more than max_bad_batches="
            f"{run.config.max_bad_batches}. Repair those files or the masks that should exclude them "
            "(fast3r.train.data marks 0 and NaN depth invalid), or raise max_bad_batches to skip more")
    log.message(f"warning: step {run.step + 1} skipped, ground truth holds NaN or Inf ({named}); "
                f"{run.counters['bad_batches']} of at most {run.config.max_bad_batches} skipped so far")
    return True


def nonfinite_ground_truth(batch: dict, gts: list[dict[str, torch.Tensor]]) -> list[str]:
    """'scene S: points at valid pixels of a.png, b.png' per sample with non-finite ground truth.

    Reduced where the tensors are (the GPU), one transfer of a (B, N, 2) flag tensor.
    """
    flags = torch.stack([torch.stack([(~torch.isfinite(gt["pts3d"]).all(-1) & gt["valid_mask"].bool()).flatten(1).any(1),
                                      ~torch.isfinite(gt["camera_pose"]).flatten(1).all(1)], -1) for gt in gts], 1)
    flags = flags.cpu()
    out = []
    for b in flags.flatten(1).any(1).nonzero()[:, 0].tolist():
        names = batch["names"][b]
        parts = [f"{what} of {', '.join(names[v] for v in flags[b, :, k].nonzero()[:, 0].tolist())}"
                 for k, what in enumerate(("points at valid pixels", "camera_pose")) if flags[b, :, k].any()]
        out.append(f"scene {batch['scene'][b]}: " + " and ".join(parts))
    return out


def oom_message(run: Run, images: torch.Tensor) -> str:
    config = run.config
    shape = StepShape(views=images.shape[1], height=images.shape[-2], width=images.shape[-1], batch=images.shape[0],
                      checkpointing=config.checkpointing, precision=config.precision,
                      params=sum(p.numel() for p in run.model.parameters()),
                      trainable=sum(p.numel() for p in trainable(run.model)),
                      encoder_chunk=config.encoder_chunk, head_chunk=config.head_chunk)
    total = torch.cuda.get_device_properties(run.world.device).total_memory
    return out_of_memory_message(run.model.config, shape, total, config.size)


def run_validation(run: Run) -> dict[str, float]:
    """The held-out metrics, and ``val_s``: how long the pass took (it is a share of the run's time too)."""
    start = time.perf_counter()
    metrics = validate(run.model, run.val_set, run.world, autocast=run.autocast, image_ids=run.config.image_ids,
                       cameras=run.config.val_cameras)
    return {**metrics, "val_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------- set up
def setup(config: TrainConfig | None, resume: str | Path | None, world: World) -> Run:
    """Run directory, model, optimizer, schedule and data; the latest checkpoint's state when resuming."""
    config, run_dir, resume_from = prepare_run_dir(config, resume, world)
    model = build_model(config, world.device)
    if config.val_data and config.val_cameras == "procrustes" and model.downstream_head_local is None:
        raise ConfigError("val_cameras: procrustes aligns each view's local pointmap, and this model has no local "
                          "head (with_local_head: false); set val_cameras: pnp")
    autocast = apply_precision(model, config.precision)
    apply_activation_checkpointing(model, config.checkpointing)
    if config.compile:
        # After checkpointing: each compiled region holds its checkpointed forward. Static shapes: on the CPU
        # (torch 2.13) Inductor fails on the heads' training graph with symbolic sizes (a stride comparison it cannot
        # decide), and a training run has few shapes (one per resolution, and a last, smaller head chunk).
        model.compile(dynamic=False)
    optimizer = build_optimizer(config, model)
    scheduler = build_schedule(config, optimizer)
    train_set, val_set = build_datasets(config)
    step, counters = 0, {"bad_batches": 0}
    if resume_from is not None:
        step, counters = state.load(resume_from, world, model=model, optimizer=optimizer, scheduler=scheduler)
    try:
        order = SampleOrder(len(train_set), config.batch_size, config.seed, config.shuffle)
    except ValueError as err:
        raise DataError(str(err)) from err
    if resume_from is None:
        start_run_dir(config, run_dir, world)
    return Run(config, world, run_dir, model, distributed.wrap(model, world), optimizer, scheduler, autocast,
               train_set, val_set, order, step, counters)


def prepare_run_dir(config: TrainConfig | None, resume: str | Path | None,
                    world: World) -> tuple[TrainConfig, Path, Path | None]:
    """-> (the config to run, the run directory, the checkpoint to resume from or None); writes nothing."""
    if resume is None:
        run_dir = Path(config.out)
        if (run_dir / CONFIG_FILE).exists() or state.latest(run_dir) is not None:
            raise state.ResumeError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                                    "(train(config, resume=...)), or set out to a new directory")
        return config, run_dir, None
    run_dir = Path(resume)
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        raise state.ResumeError(f"{run_dir} is not a training run directory (no {CONFIG_FILE}); pass the out "
                                "directory of an earlier fast3r train")
    saved = TrainConfig.from_yaml(saved_file)
    latest = state.latest(run_dir)
    if latest is None:
        raise state.ResumeError(f"{run_dir} has no complete checkpoint yet (the run stopped before its first save, "
                                "save_every steps); start it again without --resume, in a new out directory")
    config = saved.replace(out=str(run_dir)) if config is None else config.replace(out=str(run_dir))
    changed = [f"{key}: {getattr(saved, key)!r} -> {getattr(config, key)!r}" for key in KEYS
               if key not in RESUMABLE_KEYS and getattr(saved, key) != getattr(config, key)]
    if changed:
        raise state.ResumeError(f"the config differs from the one {run_dir} was started with in keys a resumed run "
                                f"cannot change ({'; '.join(changed)}); only {', '.join(RESUMABLE_KEYS)} may change. "
                                "Start a new run (fine-tune from its weights) for the others")
    if config.steps != saved.steps:
        warnings.warn(f"steps changed from {saved.steps} to {config.steps}: the cosine schedule is stretched from "
                      "here, so the run no longer equals an uninterrupted one", stacklevel=3)
    if world.main:
        _write_config(config, saved_file)
    return config, run_dir, latest


def start_run_dir(config: TrainConfig, run_dir: Path, world: World) -> None:
    """Write a new run's config once its setup has succeeded: a config, model or data error leaves no run
    directory behind that would refuse the corrected run ("already holds a training run")."""
    distributed.barrier(world)  # every rank has looked (prepare_run_dir) before rank 0 writes
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(config, run_dir / CONFIG_FILE)
    distributed.barrier(world)


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """The training samples (random crops, jitter) and the held-out ones (deterministic), or None without val_data."""
    train_set = build_dataset(list(config.data), views=config.views, size=config.size, batch_size=config.batch_size,
                              seed=config.seed, split="train")
    return train_set, build_val_set(config) if config.val_data else None


def build_val_set(config: TrainConfig) -> Dataset:
    """The held-out samples of ``config.val_data`` alone (deterministic crops, no jitter)."""
    return build_dataset(list(config.val_data), views=config.val_views, size=config.size, batch_size=1,
                         seed=config.seed, split="val")


def build_model(config: TrainConfig, device: torch.device) -> Fast3R:
    """A preset or config built from scratch (seeded), or a checkpoint to fine-tune; fp32, in train mode."""
    backend = config.backend if config.backend != "auto" else ("triton" if device.type == "cuda" else "torch")
    architecture = config.model_config()
    if architecture is not None:
        torch.manual_seed(config.seed)
        with torch.device(device):  # initialized where it trains: the large model in ~1 s on a GPU, not 10 s on the CPU
            model = Fast3R(architecture, backend=backend)
    else:
        model = Fast3R.from_pretrained(config.model, backend=backend, device=device, dtype=torch.float32)
    model.train()
    for part in config.freeze:
        module = getattr(model, FREEZABLE_PARTS[part])
        if module is None:
            raise ConfigError(f"freeze lists {part!r}, but this model has no local head")
        module.requires_grad_(False)
    # The DPT heads' coarsest fusion block has no skip input, so its first residual unit (present in the released
    # state dict) never runs and never gets a gradient; frozen, so that DDP does not wait for one.
    for head in (model.downstream_head, model.downstream_head_local):
        if head is not None:
            head.dpt.scratch.refinenet4.resConfUnit1.requires_grad_(False)
    return model


def throughput(record: dict[str, Any], config: TrainConfig, world: World, data_s: float) -> dict[str, Any]:
    """data_s: how long the step waited for its batches; views/s: over the wait and the step together.

    A ``data_s`` that is a large part of ``step_s + data_s`` means the DataLoader workers starve the
    GPU: raise ``workers``, or make the data cheaper. A skipped batch has no step time and no rate.
    """
    if record.get("step_s") is None:
        return {**record, "data_s": data_s}
    views = config.views * config.batch_size * config.grad_accum * world.size
    return {**record, "data_s": data_s, "views/s": views / (record["step_s"] + data_s)}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter, weight decay on all of them (as the official training)."""
    params = trainable(model)
    if not params:
        raise ConfigError(f"freeze={list(config.freeze)} leaves no parameter to train")
    fused = next(iter(params)).device.type == "cuda"
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=fused)


def build_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Step s (0-based) runs at lr * (s + 1) / warmup during warm-up, then cosine from lr to min_lr at the last step."""
    warmup, steps, floor = config.warmup, config.steps, config.min_lr / config.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def data_loader(run: Run) -> DataLoader:
    """This rank's micro-batches from the run's step on, read by ``workers`` processes."""
    config = run.config
    sampler = RankSampler(run.order, start_step=run.step, grad_accum=config.grad_accum, rank=run.world.rank,
                          world_size=run.world.size)
    return DataLoader(run.train_set, batch_sampler=sampler, collate_fn=collate, num_workers=config.workers,
                      pin_memory=run.world.device.type == "cuda", persistent_workers=config.workers > 0)


def _write_config(config: TrainConfig, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    config.to_yaml(partial)
    partial.replace(path)
