"""Validation on held-out scenes, with the metrics the Fast3R paper reports.

Per validation sample (one scene, ``val_views`` views): the model runs in eval mode (as the
official validation: the fusion blocks' eval-mode softmax temperature applies), then
- ``loss``: ``fast3r_loss`` on the sample, and its point distances split as ``fast3r.train.distances``
  says (``regr``, ``regr_local``, ``regr_anchor``, ``regr_others``);
- ``RRA@15``, ``RTA@15``, ``mAA@30`` (fast3r.metrics.pose_metrics, fractions in [0, 1]) of the
  cameras ``fast3r.estimate_cameras`` recovers from the predicted pointmaps, against the ground
  truth poses;
- ``accuracy`` / ``completion`` (fast3r.metrics.pointmap_accuracy_completion, in the ground truth's
  units, lower is better): the global pointmap aligned to the ground truth (confidence-weighted
  similarity), then nearest-neighbour distances, on ``VAL_POINTS`` valid pixels drawn once per sample
  (the same pixels for every model, so numbers compare across checkpoints; exact nearest neighbours
  over all pixels of 10 views at 512 px would cost more than the step).
The numbers are means over the samples; the ranks split the samples and sum. Each phase of a sample
runs in a ``torch.profiler.record_function`` range (``validate/read``, ``/forward``, ``/loss``,
``/cameras``, ``/pointmap``) that benchmarks/profile_validation.py reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.data import Dataset

from ..cameras import estimate_cameras
from ..fusion import sample_image_indices
from ..loss import fast3r_loss
from ..metrics import pointmap_accuracy_completion, pose_metrics
from . import distributed
from .distances import PARTS, point_distances
from .distributed import World

VAL_POINTS = 10_000
METRICS = ("loss", "RRA@15", "RTA@15", "mAA@30", "accuracy", "completion")
POSE_METRICS = ("RRA@15", "RTA@15", "mAA@30")
VAL_SEED = 777  # the official validation sets seed=777


@torch.no_grad()
def validate(model: nn.Module, dataset: Dataset, world: World, *, autocast: Callable[[], AbstractContextManager],
             image_ids: str, cameras: str) -> dict[str, float]:
    """Mean metrics over ``dataset`` (every rank calls this with the same dataset)."""
    was_training = model.training
    model.eval()
    # A part of the point distance a model has no term for (regr_local without a local head) is left out: each
    # part counts the samples that had it, in totals summed over the ranks (a rank may have no sample).
    totals = dict.fromkeys((*METRICS, *PARTS, *(f"{part} samples" for part in PARTS), "samples"), 0.0)
    try:
        for index in range(world.rank, len(dataset), world.size):
            with record_function("validate/read"):
                sample = dataset[index]
            for key, value in evaluate_sample(model, sample, index, world.device, autocast=autocast,
                                              image_ids=image_ids, cameras=cameras).items():
                totals[key] += value
                if key in PARTS:
                    totals[f"{key} samples"] += 1
            totals["samples"] += 1
    finally:
        model.train(was_training)
    totals = distributed.sum_over_ranks(totals, world)
    count = max(totals.pop("samples"), 1)
    parts = {part: totals[part] / totals[f"{part} samples"] for part in PARTS if totals[f"{part} samples"]}
    return {**{key: totals[key] / count for key in METRICS}, **parts}


def evaluate_sample(model: nn.Module, sample: dict, index: int, device: torch.device, *,
                    autocast: Callable[[], AbstractContextManager], image_ids: str, cameras: str) -> dict[str, float]:
    images = sample["images"].to(device)
    views = images.shape[0]
    if image_ids == "random":
        ids = sample_image_indices(1, views, torch.Generator().manual_seed(VAL_SEED + index))
    else:
        ids = torch.arange(views)[None]
    with record_function("validate/forward"), autocast():
        preds = model(images[None], image_ids=ids)
    with record_function("validate/loss"):
        gts = [{"pts3d": sample["pts3d"][v][None].to(device), "valid_mask": sample["valid_mask"][v][None].to(device),
                "camera_pose": sample["camera_pose"][v][None].to(device)} for v in range(views)]
        loss, details = fast3r_loss(preds, gts)
        loss = float(loss)
    per_view = [{key: value[0].float() for key, value in view.items()} for view in preds]
    with record_function("validate/cameras"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="estimated focal out of")  # an untrained model's, every sample
        found = estimate_cameras(per_view, method=cameras)
        out = {"loss": loss, **_pose(found["cam2world"], sample["camera_pose"])}
    out.update({part: value for part, value in point_distances(details).items() if value is not None})
    with record_function("validate/pointmap"):
        out.update(_pointmap(per_view, sample, index))
    return out


def identity_pose_metrics(dataset: Dataset) -> dict[str, float]:
    """What cameras that never move score on ``dataset``: the floor a trained model must clear."""
    totals = dict.fromkeys(POSE_METRICS, 0.0)
    for index in range(len(dataset)):
        truth = dataset[index]["camera_pose"]
        for key, value in _pose(torch.eye(4).repeat(truth.shape[0], 1, 1), truth).items():
            totals[key] += value
    return {key: value / max(len(dataset), 1) for key, value in totals.items()}


def _pose(cam2world: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    metrics = pose_metrics(cam2world.double().cpu(), truth.double().cpu(), thresholds=(15,))
    return {key: metrics[key] for key in POSE_METRICS}


def _pointmap(preds: list[dict[str, torch.Tensor]], sample: dict, index: int) -> dict[str, float]:
    """On the predictions' device: the exact nearest neighbours of 10k points both ways take ~1.3 s on one CPU core,
    38 ms with the rest of this function on the H200."""
    points = torch.stack([view["pts3d_in_other_view"] for view in preds])
    conf = torch.stack([view["conf"] for view in preds])
    valid = sample["valid_mask"].bool()
    flat = valid.flatten().nonzero()[:, 0]
    if len(flat) > VAL_POINTS:
        chosen = torch.randperm(len(flat), generator=torch.Generator().manual_seed(VAL_SEED + index))[:VAL_POINTS]
        flat = flat[chosen]
    gt = sample["pts3d"].reshape(-1, 3)[flat].float().to(points.device)
    flat = flat.to(points.device)
    metrics = pointmap_accuracy_completion(points.reshape(-1, 3)[flat], gt, weights=conf.reshape(-1)[flat])
    return {"accuracy": metrics["accuracy"], "completion": metrics["completion"]}
