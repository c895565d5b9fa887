"""Checks at the public boundary: bad input raises an error (or a warning) that names the view, key or
file and says how to fix it, instead of giving a plausible-looking wrong answer.

Each check runs once, where data enters (``Fast3R.forward``, ``fast3r_loss``). Checks of tensor values
reduce on the tensor's device and move the result to the host in one transfer (one synchronization);
they are skipped while a CUDA graph is being captured, where a synchronization is not allowed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

RANGE_TOLERANCE = 1e-3  # float images may exceed [-1, 1] by rounding, not more
SHOWN = 5  # offending views listed by name in a message
NORMALIZE_HINT = (
    "For [0, 1] images (torchvision ToTensor) pass x * 2 - 1; for [0, 255] images pass x / 127.5 - 1, or pass "
    "the uint8 RGB tensor itself (normalized inside the model, the fastest path)."
)
GT_SHAPES = {"pts3d": "(B, H, W, 3)", "valid_mask": "(B, H, W)", "camera_pose": "(B, 4, 4)"}


def describe_views(indices: Sequence[int], verb: str) -> str:
    """'view 3 holds' / 'views 0, 4, 9, 12, 13 and 7 more hold': names the first few offending views."""
    shown = ", ".join(str(i) for i in indices[:SHOWN])
    more = f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else ""
    return f"views {shown}{more} {verb}" if len(indices) > 1 else f"view {shown} {verb}s"


def capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured, or torch.compile / export trace: no synchronization allowed then."""
    return torch.compiler.is_compiling() or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


# --------------------------------------------------------------------------------------------- images
def check_float_images(views: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Float images must be finite and in [-1, 1]; all-non-negative ones look like [0, 1] and get a warning.

    views: one tensor whose first dimension indexes the views (a copy-free transpose of a batch is fine),
    or one tensor per view. uint8 images are not checked: every uint8 value is a valid pixel. One
    NaN or Inf pixel would spread through the fusion attention to every view's output, so it is an error.
    """
    first = views if isinstance(views, torch.Tensor) else views[0]
    if not first.dtype.is_floating_point or first.numel() == 0 or capturing(first):
        return
    with torch.no_grad():
        if isinstance(views, torch.Tensor):
            dims = tuple(range(1, views.dim()))
            extremes = torch.stack([views.amin(dim=dims).float(), views.amax(dim=dims).float()], 1)
        else:
            extremes = torch.stack([torch.stack([v.amin(), v.amax()]).float().to(first.device) for v in views])
        lows, highs = extremes.cpu().unbind(1)  # amin/amax propagate NaN, and Inf is an extreme: one transfer
    nonfinite = (~torch.isfinite(lows) | ~torch.isfinite(highs)).nonzero()[:, 0].tolist()
    if nonfinite:
        raise ValueError(
            f"{describe_views(nonfinite, 'hold')} NaN or Inf pixels; a single one spreads through the "
            "fusion attention to every view's output. Repair them (e.g. torch.nan_to_num) or leave those views out."
        )
    outside = ((lows < -1 - RANGE_TOLERANCE) | (highs > 1 + RANGE_TOLERANCE)).nonzero()[:, 0].tolist()
    if outside:
        raise ValueError(
            f"float images must be in [-1, 1], but {describe_views(outside, 'span')} "
            f"[{lows[outside].min().item():.4g}, {highs[outside].max().item():.4g}]. {NORMALIZE_HINT}"
        )
    if lows.min() >= 0:
        warnings.warn(
            "the float images have no negative value: they look like [0, 1] images (torchvision ToTensor), while "
            "Fast3R expects [-1, 1] and would return a wrong reconstruction. Pass x * 2 - 1 (or uint8 RGB); if the "
            "images really are in [-1, 1] and simply bright, ignore this warning.",
            UserWarning,
            stacklevel=2,
        )


def check_image_ids(ids: torch.Tensor, batch: int, num_views: int) -> torch.Tensor:
    """Explicit image indices -> (B, N) int64; dtype, shape and sign are checked before any use."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"image_ids has dtype {ids.dtype}; pass integer indices, e.g. torch.arange({num_views})")
    if tuple(ids.shape) not in ((num_views,), (batch, num_views)):
        raise ValueError(
            f"image_ids has shape {tuple(ids.shape)}; expected ({num_views},), one index per view for every "
            f"scene, or ({batch}, {num_views}), one row per scene"
        )
    if ids.numel() and not capturing(ids) and bool((ids < 0).any()):
        raise ValueError(
            f"image_ids holds a negative index ({ids.min().item()}); the image-index embedding takes indices "
            ">= 0 (view 0 is conventionally 0; image_ids='sequential' uses 0..N-1)"
        )
    return ids.long().expand(batch, num_views)


# ----------------------------------------------------------------------------------------------- loss
def check_loss_inputs(preds: Sequence[Mapping[str, torch.Tensor]], gts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Keys and per-view shapes of ``fast3r_loss``'s inputs, then the ground-truth values (one transfer)."""
    if len(preds) != len(gts) or not preds:
        raise ValueError(f"got {len(preds)} predictions and {len(gts)} ground truths; need one of each per view")
    pred_keys = ("pts3d_in_other_view", "conf") + (("pts3d_local", "conf_local") if "pts3d_local" in preds[0] else ())
    batch = None
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        _require_keys(pred, pred_keys, f"prediction of view {i}", "the model's output for that view")
        _require_keys(gt, tuple(GT_SHAPES), f"ground truth of view {i}",
                      ", ".join(f"{k} {s}" for k, s in GT_SHAPES.items()))
        points = pred["pts3d_in_other_view"]
        if points.dim() != 4 or points.shape[-1] != 3:
            raise ValueError(f"prediction of view {i}: pts3d_in_other_view has shape {tuple(points.shape)}; "
                             "expected (B, H, W, 3), as the model returns for batched input (B, N, 3, H, W)")
        b, h, w = points.shape[:3]
        if batch is not None and b != batch:
            raise ValueError(f"view {i} has a batch of {b} scenes but view 0 has {batch}; every view needs B = {batch}")
        batch = b
        expected = {"conf": (b, h, w), "pts3d_local": (b, h, w, 3), "conf_local": (b, h, w)}
        for key in pred_keys[1:]:
            _require_shape(pred[key], expected[key], f"prediction of view {i}", key)
        for key, shape in (("pts3d", (b, h, w, 3)), ("valid_mask", (b, h, w)), ("camera_pose", (b, 4, 4))):
            _require_shape(gt[key], shape, f"ground truth of view {i}", key)
    check_ground_truth_values(gts)


def check_ground_truth_values(gts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Points finite at every valid pixel, camera poses finite and invertible; one host transfer for all views."""
    first = gts[0]["pts3d"]
    if capturing(first):
        return
    with torch.no_grad():
        flags = []
        for gt in gts:
            points_ok = torch.isfinite(gt["pts3d"]).all(-1) | ~gt["valid_mask"].bool()
            pose = gt["camera_pose"].float()
            inverse, info = torch.linalg.inv_ex(pose)
            flags.append(torch.stack([(~points_ok).sum(), (~torch.isfinite(pose)).sum(),
                                      ((info != 0) | ~torch.isfinite(inverse).flatten(1).all(1)).sum()]).to(first.device))
        bad_points, bad_poses, singular = torch.stack(flags).cpu().T.tolist()
    for i, count in enumerate(bad_points):
        if count:
            raise ValueError(f"ground truth of view {i}: pts3d holds NaN or Inf at {count} valid pixel(s); "
                             "mark them invalid in valid_mask (the loss ignores invalid pixels) or repair them")
    for i, (nonfinite, singular_count) in enumerate(zip(bad_poses, singular)):
        if nonfinite:
            raise ValueError(f"ground truth of view {i}: camera_pose holds NaN or Inf; pass finite camera-to-world "
                             "poses (B, 4, 4)")
        if singular_count:
            raise ValueError(f"ground truth of view {i}: camera_pose is singular in {singular_count} scene(s) and "
                             "cannot be inverted; pass rigid camera-to-world poses (rotation, translation, last row "
                             "[0, 0, 0, 1])")


def _require_keys(entry: Mapping[str, torch.Tensor], keys: Sequence[str], what: str, expected: str) -> None:
    if not isinstance(entry, Mapping):
        raise TypeError(f"{what} is a {type(entry).__name__}; expected a dict with {expected}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(map(repr, missing))}; expected {expected}")
    for key in keys:
        if not isinstance(entry[key], torch.Tensor):
            raise TypeError(f"{what}: {key} is a {type(entry[key]).__name__}; expected a tensor")


def _require_shape(tensor: torch.Tensor, shape: tuple[int, ...], what: str, key: str) -> None:
    if tuple(tensor.shape) == shape:
        return
    hint = ""
    if tuple(tensor.shape) == shape[1:]:
        hint = f"; it lacks the batch dimension: pass {key}[None] for one scene"
    raise ValueError(f"{what}: {key} has shape {tuple(tensor.shape)}, expected {shape} "
                     f"(B, H, W from the prediction of that view){hint}")
