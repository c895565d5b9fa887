"""Pose and pointmap metrics as the Fast3R paper reports them.

Poses (the paper's CO3D protocol, from PoseDiffusion): for every pair of views i < j,
compare the relative pose ``inv(cam2world_i) @ cam2world_j`` with the ground truth's.
- rotation error: the angle of ``R_gt^T R_pred``;
- translation error: the angle between the two relative translations, sign ignored
  (``acos |cos|``, as the paper's code does), so it is scale-free and at most 90 degrees;
- RRA@t / RTA@t: the fraction of pairs with rotation / translation error below t degrees;
- mAA@30 (pose AUC): the mean over t = 1..30 of the fraction of pairs whose larger error is
  below t degrees.
Two differences from the paper's code, both where it is off: the rotation angle comes from
atan2 (the code's acos clamps the cosine to 1 - 1e-4, so no error reads below 0.81 degrees),
and mAA uses unit bins as in its numpy version (its torch version bins [0, 30] into 31).

Pointmaps (the paper's 7-Scenes / NRGBD protocol): align the predicted points to the
ground-truth points of the same pixels with a weighted similarity (Umeyama), then
accuracy = distance from each predicted point to the nearest ground-truth point and
completion = distance from each ground-truth point to the nearest predicted point, each as
mean and median. Nearest neighbours are exact (blocked brute force in torch, on the
points' device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .cameras import umeyama

POSE_THRESHOLDS = (5, 15, 30)
AUC_THRESHOLD = 30
NEIGHBOR_BLOCK = 2**24  # query x reference distances held at once


def relative_pose_errors(pred_cam2world: torch.Tensor, gt_cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation and translation-direction errors, in degrees, of the relative poses of all pairs i < j.

    pred_cam2world, gt_cam2world: (N, 4, 4) camera-to-world; any world frame and scale.
    Returns two (N * (N - 1) / 2,) float64 tensors, pairs in ``torch.combinations`` order.
    """
    pred, gt = _poses(pred_cam2world, "pred_cam2world"), _poses(gt_cam2world, "gt_cam2world")
    if pred.shape != gt.shape:
        raise ValueError(f"pred_cam2world {tuple(pred.shape)} and gt_cam2world {tuple(gt.shape)} differ in shape")
    if pred.shape[0] < 2:
        raise ValueError("relative pose errors need at least 2 views")
    i, j = torch.combinations(torch.arange(pred.shape[0]), 2).unbind(-1)
    rel_pred, rel_gt = _relative(pred, i, j), _relative(gt, i, j)
    rotation = rotation_angle_deg(rel_gt[:, :3, :3].transpose(1, 2) @ rel_pred[:, :3, :3])
    t_pred, t_gt = rel_pred[:, :3, 3], rel_gt[:, :3, 3]
    cos = (t_pred * t_gt).sum(-1) / (t_pred.norm(dim=-1) * t_gt.norm(dim=-1)).clamp_min(1e-15)
    translation = torch.rad2deg(torch.acos(cos.abs().clamp(max=1.0)))
    return rotation, translation


def rotation_angle_deg(rotation: torch.Tensor) -> torch.Tensor:
    """Angle in degrees of (..., 3, 3) rotations, accurate near 0 and 180 (atan2 of sin and cos)."""
    cos = (rotation.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    skew = rotation - rotation.transpose(-2, -1)
    sin = torch.stack((skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]), dim=-1).norm(dim=-1) / 2
    return torch.rad2deg(torch.atan2(sin, cos))


def pose_auc(rotation_errors: torch.Tensor, translation_errors: torch.Tensor,
             max_threshold: int = AUC_THRESHOLD) -> float:
    """mAA@max_threshold: mean over t = 1..max_threshold of the fraction of pairs with max(errors) < t."""
    worst = torch.maximum(rotation_errors, translation_errors)
    thresholds = torch.arange(1, max_threshold + 1, dtype=worst.dtype, device=worst.device)
    return float((worst[None, :] < thresholds[:, None]).double().mean())


def pose_metrics(pred_cam2world: torch.Tensor, gt_cam2world: torch.Tensor, *,
                 thresholds: Sequence[float] = POSE_THRESHOLDS, auc_threshold: int = AUC_THRESHOLD) -> dict[str, float]:
    """RRA@t, RTA@t for each threshold (fractions in [0, 1]) and mAA@auc_threshold of one scene."""
    rotation, translation = relative_pose_errors(pred_cam2world, gt_cam2world)
    out = {}
    for t in thresholds:
        out[f"RRA@{t}"] = float((rotation < t).double().mean())
        out[f"RTA@{t}"] = float((translation < t).double().mean())
    out[f"mAA@{auc_threshold}"] = pose_auc(rotation, translation, auc_threshold)
    return out


def pointmap_accuracy_completion(pred_points: torch.Tensor, gt_points: torch.Tensor, *,
                                 weights: torch.Tensor | None = None, align: bool = True) -> dict[str, float]:
    """Accuracy and completion (mean and median distances) of predicted against ground-truth points.

    pred_points, gt_points: (..., 3), the same pixels in both (e.g. stacked (N, H, W, 3)
        pointmaps); points that are not finite in either are left out.
    weights: (...) alignment weights (e.g. confidence); align=False compares the points as given.
    """
    if pred_points.shape != gt_points.shape or pred_points.shape[-1] != 3:
        raise ValueError(f"pred_points {tuple(pred_points.shape)} and gt_points {tuple(gt_points.shape)} must "
                         "both be (..., 3) pointmaps of the same pixels")
    pred, gt = pred_points.reshape(-1, 3).double(), gt_points.reshape(-1, 3).double()
    keep = torch.isfinite(pred).all(-1) & torch.isfinite(gt).all(-1)
    if weights is not None:
        weights = weights.reshape(-1).double().to(pred.device)
        keep &= torch.isfinite(weights)
        weights = weights[keep]
    pred, gt = pred[keep], gt[keep]
    if len(pred) == 0:
        raise ValueError("no point is finite in both pointmaps")
    if align:
        scale, rotation, translation = umeyama(pred[None], gt[None], None if weights is None else weights[None])
        pred = scale[0] * pred @ rotation[0].T + translation[0]
    accuracy = nearest_neighbor_distances(pred, gt)
    completion = nearest_neighbor_distances(gt, pred)
    return {"accuracy": float(accuracy.mean()), "accuracy_median": _median(accuracy),
            "completion": float(completion.mean()), "completion_median": _median(completion)}


def nearest_neighbor_distances(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(M, 3), (K, 3) -> (M,) Euclidean distance from each query point to its nearest reference point.

    Exact: differences, not the |a|^2 + |b|^2 - 2ab expansion (which cancels for close points).
    """
    rows = max(1, NEIGHBOR_BLOCK // max(len(reference), 1))
    cols = max(1, NEIGHBOR_BLOCK // rows)
    out = torch.empty(len(query), dtype=query.dtype, device=query.device)
    for a in range(0, len(query), rows):
        block = torch.full((min(rows, len(query) - a),), math.inf, dtype=query.dtype, device=query.device)
        for b in range(0, len(reference), cols):
            d = torch.cdist(query[a : a + rows], reference[b : b + cols], compute_mode="donot_use_mm_for_euclid_dist")
            block = torch.minimum(block, d.min(dim=1).values)
        out[a : a + rows] = block
    return out


def _median(x: torch.Tensor) -> float:
    """The median as numpy (and the paper's code) takes it: the mean of the two middle values for even counts."""
    s = x.sort().values
    n = len(s)
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


def _poses(cam2world: torch.Tensor, name: str) -> torch.Tensor:
    cam2world = torch.as_tensor(cam2world, dtype=torch.float64)
    if cam2world.dim() != 3 or cam2world.shape[1:] != (4, 4):
        raise ValueError(f"{name} has shape {tuple(cam2world.shape)}; expected (N, 4, 4) camera-to-world matrices")
    return cam2world


def _relative(cam2world: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """inv(cam2world_i) @ cam2world_j, inverting the rigid transform in closed form."""
    rotation, translation = cam2world[i, :3, :3], cam2world[i, :3, 3]
    inverse = torch.eye(4, dtype=cam2world.dtype, device=cam2world.device).repeat(len(i), 1, 1)
    inverse[:, :3, :3] = rotation.transpose(1, 2)
    inverse[:, :3, 3] = -(rotation.transpose(1, 2) @ translation[..., None])[..., 0]
    return inverse @ cam2world[j]
