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
    logged: dict[str, torch.Tensor] = {}

    gt_global = [_transform(world_to_anchor, points) for points in gt_points]
    pred_global = [_masked(p["pts3d_in_other_view"].float(), v, fill=1.0) for p, v in zip(preds, valid)]
    gt_scale, pred_scale = _mean_distance(gt_global, valid), _mean_distance(pred_global, valid)
    for i in range(len(preds)):
        dist = _distances(pred_global[i], gt_global[i], pred_scale, gt_scale)
        terms.append(_term(dist, preds[i]["conf"], valid[i], alpha, logged, f"global/{i:02d}"))

    if "pts3d_local" in preds[0]:
        for i, (pred, gt) in enumerate(zip(preds, gts)):
            gt_local = _transform(torch.linalg.inv(gt["camera_pose"].float()), gt_points[i])
            pred_local = _masked(pred["pts3d_local"].float(), valid[i], fill=1.0)
            scales = _mean_distance([pred_local], [valid[i]]), _mean_distance([gt_local], [valid[i]])
            dist = _distances(pred_local, gt_local, *scales)
            terms.append(_term(dist, pred["conf_local"], valid[i], alpha, logged, f"local/{i:02d}"))
    # One device-to-host copy for every logged number (not two synchronizations per term).
    details = dict(zip(logged, torch.stack(list(logged.values())).tolist()))
    return torch.stack(terms).mean(), details


# Every term is computed densely over all pixels and masked, never by boolean indexing: indexing syncs with
# the host for each view and its backward scatters through a sort (index_put with accumulate), which cost
# more than the model's backward at 32 views of 512x384.
def _masked(points: torch.Tensor, valid: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``fill`` at invalid pixels before any arithmetic, so NaN/Inf there cannot reach the loss (nor, for a
    prediction filled with 1, the norm's gradient at a zero vector)."""
    return torch.where(valid[..., None], points, fill)


def _transform(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply (B, 4, 4) rigid transforms to (B, H, W, 3) points."""
    return points @ matrix[:, None, :3, :3].transpose(-1, -2) + matrix[:, None, None, :3, 3]


def _mean_distance(points: list[torch.Tensor], valid: list[torch.Tensor]) -> torch.Tensor:
    """Per scene, mean distance to the origin over the valid pixels of all given views: (B,)."""
    total = sum(torch.where(v, p.norm(dim=-1), 0.0).flatten(1).sum(1) for p, v in zip(points, valid))
    count = sum(v.flatten(1).sum(1) for v in valid)
    return (total / count.clamp(min=1)).clamp(min=MIN_SCALE)


def _distances(pred: torch.Tensor, gt: torch.Tensor, pred_scale: torch.Tensor, gt_scale: torch.Tensor) -> torch.Tensor:
    """(B, H, W) Euclidean distance between the prediction and the ground truth, each over its scene's scale."""
    return (pred / pred_scale[:, None, None, None] - gt / gt_scale[:, None, None, None]).norm(dim=-1)


def _term(dist: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor, alpha: float,
          logged: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Mean over the valid pixels of the batch of conf * d - alpha * log(conf); 0 (still attached to the
    graph) for a view without a valid pixel, as in the official code."""
    count = valid.sum().clamp(min=1)
    c = torch.where(valid, conf.float(), 1.0)
    d = torch.where(valid, dist, 0.0)
    term = (c * d - alpha * c.log()).sum() / count
    logged[f"regr_{name}"] = d.detach().sum() / count
    logged[f"conf_{name}"] = term.detach()
    return term
