"""Fast3R training objective: confidence-weighted, scale-normalized pointmap regression.

For every view there is a global term (points in view 0's camera frame, normalized over
all views of a scene) and a local term (points in the view's own frame, normalized per
view). Each term is the mean over valid pixels of ``conf * d - alpha * log(conf)``, with
``d`` the Euclidean distance between normalized prediction and ground truth; the loss is
the average of the 2N terms (N without the local head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .validation import check_loss_inputs

DEFAULT_ALPHA = 0.2
MIN_SCALE = 1e-8


def fast3r_loss(
    preds: Sequence[dict[str, torch.Tensor]],
    gts: Sequence[dict[str, torch.Tensor]],
    alpha: float = DEFAULT_ALPHA,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch of B scenes with N views each.

    preds: per view, ``pts3d_in_other_view`` (B, H, W, 3) and ``conf`` (B, H, W), plus
        ``pts3d_local`` / ``conf_local`` when the model has a local head.
    gts: per view, ``pts3d`` (B, H, W, 3) world points, ``valid_mask`` (B, H, W) and
        ``camera_pose`` (B, 4, 4) camera-to-world. Points at invalid pixels are never read
        (NaN there is fine); at valid pixels they must be finite, and poses rigid (rotation,
        translation, last row [0, 0, 0, 1]).
    Returns the scalar loss and per-term values: ``conf_global/ii`` and ``regr_global/ii``
    (the conf-weighted term and the plain mean distance), and likewise ``*_local/ii``.
    Raises ValueError naming the view and key for missing keys, mismatched shapes,
    non-finite ground truth at a valid pixel, a pose that is not rigid, or a confidence
    <= 0 at a valid pixel (its log would be infinite).
    """
    check_loss_inputs(preds, gts)
    valid = [gt["valid_mask"].bool() for gt in gts]
    gt_points = [_masked(gt["pts3d"].float(), v) for gt, v in zip(gts, valid)]
    world_to_anchor = torch.linalg.inv(gts[0]["camera_pose"].float())
    terms: list[torch.Tensor] = []
    details: dict[str, float] = {}

    gt_global = [_transform(world_to_anchor, points) for points in gt_points]
    pred_global = [p["pts3d_in_other_view"].float() for p in preds]
    gt_scale, pred_scale = _mean_distance(gt_global, valid), _mean_distance(pred_global, valid)
    for i in range(len(preds)):
        dist = _distances(pred_global[i], gt_global[i], valid[i], pred_scale, gt_scale)
        terms.append(_term(dist, preds[i]["conf"], valid[i], alpha, details, f"global/{i:02d}"))

    if "pts3d_local" in preds[0]:
        for i, (pred, gt) in enumerate(zip(preds, gts)):
            gt_local = _transform(torch.linalg.inv(gt["camera_pose"].float()), gt_points[i])
            pred_local = pred["pts3d_local"].float()
            scales = _mean_distance([pred_local], [valid[i]]), _mean_distance([gt_local], [valid[i]])
            dist = _distances(pred_local, gt_local, valid[i], *scales)
            terms.append(_term(dist, pred["conf_local"], valid[i], alpha, details, f"local/{i:02d}"))
    return torch.stack(terms).mean(), details


def _masked(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the points of invalid pixels before any arithmetic, so NaN/Inf there cannot reach the loss."""
    return torch.where(valid[..., None], points, 0.0)


def _transform(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply (B, 4, 4) rigid transforms to (B, H, W, 3) points."""
    return points @ matrix[:, None, :3, :3].transpose(-1, -2) + matrix[:, None, None, :3, 3]


def _mean_distance(points: list[torch.Tensor], valid: list[torch.Tensor]) -> torch.Tensor:
    """Per scene, mean distance to the origin over the valid pixels of all given views: (B,)."""
    batch = valid[0].shape[0]
    total = torch.zeros(batch, device=points[0].device)
    for p, v in zip(points, valid):  # only valid pixels enter, so NaN/inf elsewhere cannot leak in
        total = total.index_add(0, v.nonzero()[:, 0], p[v].norm(dim=-1))
    count = sum(v.flatten(1).sum(1) for v in valid)
    return (total / count.clamp(min=1)).clamp(min=MIN_SCALE)


def _distances(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, pred_scale: torch.Tensor, gt_scale: torch.Tensor
) -> torch.Tensor:
    """Euclidean distance between normalized prediction and ground truth at each valid pixel."""
    scene = valid.nonzero()[:, 0]
    return (pred[valid] / pred_scale[scene, None] - gt[valid] / gt_scale[scene, None]).norm(dim=-1)


def _term(
    dist: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor, alpha: float, details: dict[str, float], name: str
) -> torch.Tensor:
    c = conf.float()[valid]
    if dist.numel() == 0:  # no valid pixel in this view: the term contributes 0, as in the official code
        details[f"regr_{name}"] = details[f"conf_{name}"] = 0.0
        return dist.sum()  # 0, still attached to the graph
    term = (c * dist - alpha * c.log()).mean()
    details[f"regr_{name}"] = dist.detach().mean().item()
    details[f"conf_{name}"] = term.detach().item()
    return term
