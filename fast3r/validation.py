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
# A pose is rigid when R^T R = I and its last row is [0, 0, 0, 1] to this tolerance: float32 rounding and poses
# read from 6-digit text files pass; a shear, a scale or a projective row does not.
RIGID_TOLERANCE = 1e-3
NONFINITE = 1
POSE_DEFECTS = {
    NONFINITE: "holds NaN or Inf",
    2: "has a last row other than [0, 0, 0, 1]",
    3: "has a 3x3 block that is not a rotation (R^T R != I: a shear, a scale or a lost axis)",
    4: "has a 3x3 block of determinant -1 (a reflection: one axis flipped)",
}
RIGID_HINT = ("Pass rigid camera-to-world poses: a rotation R (R^T R = I, det R = +1), a translation, and the last "
              "row [0, 0, 0, 1]; divide out a scale, and change axis conventions by a rotation, not a flip.")


def describe_views(indices: Sequence[int], verb: str) -> str:
    """'view 3 holds' / 'views 0, 4, 9, 12, 13 and 7 more hold': names the first few offending views."""
    return f"{name_views(indices)} {verb}" if len(indices) > 1 else f"{name_views(indices)} {verb}s"


def name_views(indices: Sequence[int]) -> str:
    """'view 3' / 'views 0, 4, 9, 12, 13 and 7 more'."""
    shown = ", ".join(str(i) for i in indices[:SHOWN])
    more = f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else ""
    return f"views {shown}{more}" if len(indices) > 1 else f"view {shown}"


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
    """Keys and per-view shapes of ``fast3r_loss``'s inputs (host-side only; ``check_loss_values`` reads values)."""
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


def check_loss_values(valid: torch.Tensor, gt_points: torch.Tensor, poses: torch.Tensor,
                      confidences: Mapping[str, torch.Tensor], views: Sequence[int]) -> None:
    """Points finite at every valid pixel, poses rigid, confidences > 0 at valid pixels; one host transfer for all.

    The views ``views`` stacked: valid (B, n, H, W), gt_points (B, n, H, W, 3), poses (B, n, 4, 4), each
    confidence (B, n, H, W). A confidence <= 0 makes ``log(conf)`` infinite: the loss inf and its gradients NaN.
    """
    if capturing(gt_points):
        return
    with torch.no_grad():
        pixels = (0, 2, 3)  # per view
        defects = pose_defects(poses)  # (B, N)
        counts = [(~torch.isfinite(gt_points).all(-1) & valid).sum(pixels),
                  *[((conf <= 0) & valid).sum(pixels) for conf in confidences.values()],
                  *[(defects == code).sum(0) for code in POSE_DEFECTS]]
        counts = torch.stack(counts, 1).cpu().tolist()  # (N, checks)
    for i, (bad_points, *rest) in zip(views, counts):
        if bad_points:
            raise ValueError(f"ground truth of view {i}: pts3d holds NaN or Inf at {bad_points} valid pixel(s); "
                             "mark them invalid in valid_mask (the loss ignores invalid pixels) or repair them")
        for key, count in zip(confidences, rest):
            if count:
                raise ValueError(f"prediction of view {i}: {key} is <= 0 at {count} valid pixel(s), where the loss "
                                 f"takes log({key}); confidences must be > 0 (the model's are 1 + exp(x) >= 1)")
        for defect, count in zip(POSE_DEFECTS.values(), rest[len(confidences):]):
            if count:
                what = f"camera_pose {defect}" if defect == POSE_DEFECTS[NONFINITE] else \
                    f"camera_pose is not rigid in {count} scene(s): it {defect}"
                raise ValueError(f"ground truth of view {i}: {what}. {RIGID_HINT}")


# ---------------------------------------------------------------------------------------------- poses
def pose_defects(poses: torch.Tensor, tolerance: float = RIGID_TOLERANCE) -> torch.Tensor:
    """(..., 4, 4) poses -> (...) int64: 0 for a rigid pose, else the first key of POSE_DEFECTS that applies.

    Rigid: finite, last row [0, 0, 0, 1] and a 3x3 block R with R^T R = I and det R = +1, each within
    ``tolerance``. Computed on the poses' device; no host transfer.
    """
    poses = poses.to(torch.float64)
    finite = torch.isfinite(poses).flatten(-2).all(-1)
    poses = torch.where(finite[..., None, None], poses, 0.0)
    last_row = torch.maximum(poses[..., 3, :3].abs().amax(-1), (poses[..., 3, 3] - 1).abs()) > tolerance
    rotation = poses[..., :3, :3]
    eye = torch.eye(3, dtype=poses.dtype, device=poses.device)
    not_orthonormal = (rotation.transpose(-1, -2) @ rotation - eye).abs().flatten(-2).amax(-1) > tolerance
    reflection = torch.linalg.det(rotation) < 0
    codes = torch.zeros(finite.shape, dtype=torch.int64, device=poses.device)
    for code, bad in reversed(list(zip(POSE_DEFECTS, (~finite, last_row, not_orthonormal, reflection)))):
        codes = torch.where(bad, code, codes)
    return codes


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
