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

from .validation import check_loss_inputs, check_loss_values

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
    local = "pts3d_local" in preds[0]
    groups = [_Views(preds, gts, views, local) for views in _by_size(preds)]  # one, unless sizes differ
    for group in groups:
        check_loss_values(group.valid, group.gt_points, group.poses, group.confidences, group.views)
        group.gt_points = _masked(group.gt_points, group.valid)  # NaN / Inf at invalid pixels never reach a term
    stacked = [v for group in groups for v in group.views]
    order = sorted(range(len(stacked)), key=stacked.__getitem__)  # stacked position of each view, in view order

    anchor = _rigid_inverse(gts[0]["camera_pose"].float())[:, None]  # (B, 1, 3, 4): view 0's camera frame
    gt_global = [_transform(anchor, group.gt_points) for group in groups]
    pred_global = [group.prediction("pts3d_in_other_view") for group in groups]
    scales = _scene_scale(pred_global, groups), _scene_scale(gt_global, groups)  # over all views of a scene
    terms, distances = _per_view([_terms(_distances(p, g, *scales), group.confidences["conf"], group.valid, alpha)
                                  for p, g, group in zip(pred_global, gt_global, groups)], order)
    names = [f"{kind}_global/{i:02d}" for kind in ("regr", "conf") for i in range(len(preds))]
    logged = [distances, terms.detach()]
    if local:
        local_terms, local_distances = _per_view([_local_terms(group, alpha) for group in groups], order)
        names += [f"{kind}_local/{i:02d}" for kind in ("regr", "conf") for i in range(len(preds))]
        logged += [local_distances, local_terms.detach()]
        terms = torch.cat([terms, local_terms])
    # One device-to-host copy for every logged number (not two synchronizations per term).
    details = dict(zip(names, torch.cat(logged).tolist()))
    return terms.mean(), details


# The views are stacked into (B, N, ...) tensors (one stack per image size) and every term is computed for
# all of them at once, densely over all pixels and masked: per-view Python issued ~300 small kernels a view
# (and a host synchronization per view for linalg.inv's error check), 0.12 s at 32 views of 512x384 on an
# H200; boolean indexing, before that, synchronized per view and scattered its backward through a sort.
class _Views:
    """Views of one image size, stacked: valid (B, n, H, W), gt_points (B, n, H, W, 3), poses (B, n, 4, 4) and
    the confidences by key; ``prediction(key)`` stacks a predicted pointmap, masked."""

    def __init__(self, preds, gts, views: list[int], local: bool):
        self.views, self._preds = views, [preds[v] for v in views]
        chosen = [gts[v] for v in views]
        self.valid = _stack(chosen, "valid_mask").bool()
        self.poses = _stack(chosen, "camera_pose").float()
        self.gt_points = _stack(chosen, "pts3d").float()
        self.confidences = {key: _stack(self._preds, key) for key in (("conf", "conf_local") if local else ("conf",))}

    def prediction(self, key: str) -> torch.Tensor:
        return _masked(_stack(self._preds, key).float(), self.valid, fill=1.0)


def _by_size(preds: Sequence[dict[str, torch.Tensor]]) -> list[list[int]]:
    sizes: dict[tuple[int, ...], list[int]] = {}
    for v, pred in enumerate(preds):
        sizes.setdefault(tuple(pred["conf"].shape[1:]), []).append(v)
    return list(sizes.values())


def _stack(entries: Sequence[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([entry[key] for entry in entries], 1)


def _per_view(results: list[tuple[torch.Tensor, torch.Tensor]], order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (terms, distances) concatenated and put back in view order."""
    terms, distances = (torch.cat(parts) for parts in zip(*results))
    return (terms, distances) if order == sorted(order) else (terms[order], distances[order])


def _local_terms(group: _Views, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view in its own camera frame, each normalized by its own mean distance."""
    gt_local = _transform(_rigid_inverse(group.poses), group.gt_points)
    pred_local = group.prediction("pts3d_local")
    scales = [_mean_distance(points, group.valid) for points in (pred_local, gt_local)]
    return _terms(_distances(pred_local, gt_local, *scales), group.confidences["conf_local"], group.valid, alpha)


def _masked(points: torch.Tensor, valid: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``fill`` at invalid pixels before any arithmetic, so NaN/Inf there cannot reach the loss (nor, for a
    prediction filled with 1, the norm's gradient at a zero vector)."""
    return torch.where(valid[..., None], points, fill)


def _rigid_inverse(poses: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) rigid camera-to-world -> (..., 3, 4) world-to-camera [R^T | -R^T t] (the poses are checked
    rigid; no solver, so no host synchronization for its error check)."""
    rotation = poses[..., :3, :3].transpose(-1, -2)
    return torch.cat([rotation, -(rotation @ poses[..., :3, 3:])], -1)


def _transform(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply (B, N or 1, 3, 4) rigid transforms to (B, N, H, W, 3) points, one per view (or one for all)."""
    return points @ matrix[:, :, None, :3, :3].transpose(-1, -2) + matrix[:, :, None, None, :3, 3]


def _norm_sums(points: torch.Tensor, valid: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the distances to the origin over the valid pixels of ``dims`` and their count (dims kept)."""
    return (torch.where(valid, points.norm(dim=-1), 0.0).sum(dims, keepdim=True), valid.sum(dims, keepdim=True))


def _mean_distance(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, n, 1, 1) per view: mean distance to the origin over its valid pixels."""
    return _scale([_norm_sums(points, valid, (2, 3))])


def _scene_scale(points: list[torch.Tensor], groups: list[_Views]) -> torch.Tensor:
    """(B, 1, 1, 1) per scene: mean distance to the origin over the valid pixels of all its views."""
    return _scale([_norm_sums(p, group.valid, (1, 2, 3)) for p, group in zip(points, groups)])


def _scale(sums: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The mean of (total, count) pairs summed, at least MIN_SCALE (a scene or view without a valid pixel)."""
    total, count = sum(t for t, _ in sums), sum(c for _, c in sums)
    return (total / count.clamp(min=1)).clamp(min=MIN_SCALE)


def _distances(pred: torch.Tensor, gt: torch.Tensor, pred_scale: torch.Tensor, gt_scale: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) Euclidean distance between the prediction and the ground truth, each over its scale."""
    return (pred / pred_scale[..., None] - gt / gt_scale[..., None]).norm(dim=-1)


def _terms(dist: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view (N,): the mean over its valid pixels in the batch of conf * d - alpha * log(conf) (0, still
    attached to the graph, for a view without a valid pixel, as in the official code), and of d (detached)."""
    pixels = (0, 2, 3)
    count = valid.sum(pixels).clamp(min=1)
    c = torch.where(valid, conf.float(), 1.0)
    d = torch.where(valid, dist, 0.0)
    return (c * d - alpha * c.log()).sum(pixels) / count, d.detach().sum(pixels) / count
