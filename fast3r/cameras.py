"""Cameras from pointmaps: a focal length and a camera-to-world pose per view.

Fast3R predicts, per view, a global pointmap in view 0's camera frame (the world) and a
local pointmap in the view's own camera frame, each with a confidence. Two ways turn them
into cameras:

- ``"procrustes"`` (closed form, batched on the preds' device). Focal: the weighted least
  squares solution of ``pixel - c = f * (X/Z, Y/Z)`` over the local pointmap. Pose: the
  confidence-weighted Umeyama alignment (rotation, translation, scale) of the local
  pointmap onto the global one; the camera sits where the local origin lands. Both fit
  each view's more confident half. A few reductions and one batched 3x3 SVD per view.
- ``"pnp"`` (the official code's method). One focal for all views from view 0's global
  pointmap (which is view 0's camera frame) by Weiszfeld iteratively reweighted least
  squares; then, per view, OpenCV's RANSAC PnP (SQPnP) of integer pixel coordinates
  against the global points of the view's most confident pixels. Views run in a thread
  pool; OpenCV releases the GIL.

Conventions (as the official code): pixel (x, y) is the integer column and row, the
principal point is (W/2, H/2), cameras are OpenCV (x right, y down, z forward).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch

from .validation import name_views

METHODS = ("pnp", "procrustes")
# "pnp": the official values (100 Weiszfeld iterations; PnP on the 15% most confident points, the
# official code names the 85th percentile; 100 RANSAC iterations; 5 px inlier threshold) except
# the focal's confidence cut: the official code keeps points above the 10th percentile, which lets
# low-confidence outliers in once they exceed 10% of the view; the median cut keeps the focal
# within 2% on scenes with 30% such outliers (tests/test_cameras.py), where the 10th fails.
FOCAL_CONF_PERCENTILE = 50.0
WEISZFELD_ITERATIONS = 100
PNP_CONF_PERCENTILE = 85.0
PNP_MIN_POINTS = 64
PNP_ITERATIONS = 100
PNP_REPROJECTION_PX = 5.0
# An estimated focal outside [1/20, 20] x the long image side (fields of view of ~169 and ~3
# degrees) is a failed estimate; it is clamped and reported.
FOCAL_RANGE = (0.05, 20.0)
# "procrustes" fits each view's more confident half (by conf x conf_local; least squares is not
# robust to confident-enough outliers) and works on at most this many points (views x pixels)
# at a time, in float64.
PROCRUSTES_CONF_PERCENTILE = 50.0
PROCRUSTES_CHUNK_POINTS = 2**24
# A view needs this many finite points for a camera (PnP's minimum; Umeyama needs 3); with fewer its camera is NaN.
MIN_POINTS = 4

Preds = Sequence[dict[str, torch.Tensor]]
Progress = Callable[[int], object] | None


def estimate_cameras(
    preds: Preds,
    *,
    method: str = "pnp",
    focal: float | Sequence[float] | torch.Tensor | None = None,
    progress: Progress = None,
) -> dict[str, torch.Tensor]:
    """Cameras of every view of one scene from ``model(...)``'s output.

    preds: one dict per view with ``pts3d_in_other_view`` (H, W, 3) and ``conf`` (H, W);
        "procrustes" also needs ``pts3d_local`` and ``conf_local``. Views may differ in size.
    method: "pnp" (official: RANSAC PnP against the global pointmap) or "procrustes"
        (closed form, batched on the preds' device).
    focal: known focal length in pixels, one for all views or one per view; estimated if None.
    progress: called with the number of views just finished (e.g. ``tqdm.update``).

    Returns ``cam2world`` (N, 4, 4), OpenCV camera-to-world in view 0's camera frame, and
    ``intrinsics`` (N, 3, 3) with the principal point at (W/2, H/2); float64 on the CPU.
    A view with fewer than MIN_POINTS finite points gets a NaN camera (pose; focal too for
    "procrustes"), with a warning naming it; every warning names views by their index in ``preds``.
    Confidences must be >= 0; where a view's are zero everywhere, "procrustes" weighs its points
    equally, with a warning.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    sizes = check_preds(preds, needs_local=method == "procrustes")
    focals = _given_focals(focal, len(preds))
    usable = _usable_views(preds, needs_local=method == "procrustes")
    unusable = [i for i in range(len(preds)) if i not in usable]
    if method == "pnp" and focals is None and 0 in unusable:
        raise ValueError(f"view 0 has fewer than {MIN_POINTS} finite points in pts3d_in_other_view, and 'pnp' takes "
                         "the focal from it; pass focal= if you know it (fast3r reconstruct: --focal), or use "
                         "method='procrustes' (--cameras procrustes), which takes each view's focal from the view")
    if unusable:
        warnings.warn(f"{name_views(unusable)} {'have' if len(unusable) > 1 else 'has'} fewer than {MIN_POINTS} finite points (NaN everywhere?): "
                      "their cameras are NaN (pose" + (" and focal" if method == "procrustes" else "") + ")",
                      UserWarning, stacklevel=2)
    groups = _groups_by_size({i: sizes[i] for i in usable})
    if method == "procrustes":
        focals, cam2world = procrustes_cameras(preds, groups, focals, progress)
    else:
        if focals is None:
            focals = torch.full((len(preds),), pnp_focal(preds[0]), dtype=torch.float64)
        cam2world = pnp_poses(preds, groups, focals, progress)
    if progress is not None and unusable:
        progress(len(unusable))
    return {"cam2world": cam2world, "intrinsics": intrinsics_matrices(focals, sizes)}


def intrinsics_matrices(focals: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(N,) focals and (H, W) sizes -> (N, 3, 3) pinhole matrices with the principal point at (W/2, H/2)."""
    k = torch.zeros(len(sizes), 3, 3, dtype=torch.float64)
    k[:, 0, 0] = k[:, 1, 1] = focals.to(torch.float64)
    k[:, 0, 2] = torch.tensor([w / 2 for _, w in sizes], dtype=torch.float64)
    k[:, 1, 2] = torch.tensor([h / 2 for h, _ in sizes], dtype=torch.float64)
    k[:, 2, 2] = 1.0
    return k


# ---------------------------------------------------------------------------- procrustes
def umeyama(
    src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted similarity ``dst ~ s * R @ src + t`` in closed form (Umeyama 1991), batched.

    src, dst: (n, P, 3); weights: (n, P), non-negative (all ones if None).
    Returns scale (n,), rotation (n, 3, 3) with det +1, translation (n, 3).
    """
    if weights is None:
        weights = torch.ones(src.shape[:2], dtype=src.dtype, device=src.device)
    total = weights.sum(1).clamp_min(torch.finfo(weights.dtype).tiny)
    mean_src = torch.einsum("np,npi->ni", weights, src) / total[:, None]
    mean_dst = torch.einsum("np,npi->ni", weights, dst) / total[:, None]
    src_c, dst_c = src - mean_src[:, None], dst - mean_dst[:, None]
    cov = torch.einsum("np,npi,npj->nij", weights, dst_c, src_c) / total[:, None, None]
    var_src = torch.einsum("np,np->n", weights, src_c.square().sum(-1)) / total
    u, sigma, vh = torch.linalg.svd(cov)
    # Flip the weakest axis when the best orthogonal map is a reflection.
    sign = torch.where(torch.linalg.det(u @ vh) < 0, -1.0, 1.0).to(src.dtype)
    flip = torch.ones_like(sigma)
    flip[:, 2] = sign
    rotation = u @ (flip[:, :, None] * vh)
    scale = (sigma * flip).sum(-1) / var_src.clamp_min(torch.finfo(src.dtype).tiny)
    translation = mean_dst - scale[:, None] * torch.einsum("nij,nj->ni", rotation, mean_src)
    return scale, rotation, translation


def procrustes_cameras(
    preds: Preds, groups: dict[tuple[int, int], list[int]], focals: torch.Tensor | None, progress: Progress = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> focals (N,) and cam2world (N, 4, 4), float64 CPU, for the views in ``groups`` (NaN for the others).

    Views are named by their index in ``preds`` everywhere, warnings included. The work stays on the
    preds' device; one host transfer per chunk of views.
    """
    n_views = len(preds)
    cam2world = torch.full((n_views, 4, 4), math.nan, dtype=torch.float64)
    estimated = torch.full((n_views,), math.nan, dtype=torch.float64)
    unweighted: list[int] = []
    for (h, w), indices in groups.items():
        per_chunk = max(1, PROCRUSTES_CHUNK_POINTS // (h * w))
        for start in range(0, len(indices), per_chunk):
            chunk = indices[start : start + per_chunk]
            local, conf_local = _stack(preds, chunk, "pts3d_local", "conf_local")
            world, conf = _stack(preds, chunk, "pts3d_in_other_view", "conf")
            usable = torch.isfinite(local).all(-1) & torch.isfinite(world).all(-1)
            local, world = local.nan_to_num(0.0, 0.0, 0.0), world.nan_to_num(0.0, 0.0, 0.0)
            weights = _finite_or_zero(conf_local * conf) * usable
            zero = weights.sum(1) == 0  # no confidence anywhere: equal weights over the finite points
            weights = _most_confident_weights(torch.where(zero[:, None], usable.to(weights.dtype), weights))
            if focals is None:
                pixels = _centred_pixels(h, w, local.device).view(1, h * w, 2)
                focal_weights = _finite_or_zero(conf_local) * usable
                focal_weights = torch.where((focal_weights.sum(1) == 0)[:, None], usable.to(weights.dtype),
                                            focal_weights)
                estimated[chunk] = least_squares_focal(local, pixels, _most_confident_weights(focal_weights)).cpu()
            _, rotation, translation = umeyama(local, world, weights)
            too_few = usable.sum(1) < MIN_POINTS  # possible for the PnP fallback, whose views were checked for pnp
            poses = torch.where(too_few[:, None, None], math.nan, _pose_matrices(rotation, translation))
            cam2world[chunk] = poses.cpu()
            unweighted += [i for i, flag, few in zip(chunk, zero.tolist(), too_few.tolist()) if flag and not few]
            if progress is not None:
                progress(len(chunk))
    if unweighted:
        unweighted.sort()
        warnings.warn(f"the confidence is zero at every finite point of {name_views(unweighted)}: their poses are "
                      "fitted with equal weights (pass the model's conf and conf_local)", UserWarning, stacklevel=3)
    if focals is None:
        sizes = {i: hw for hw, idx in groups.items() for i in idx}
        focals = estimated
        if sizes:
            chosen = sorted(sizes)
            focals[chosen] = _clamped(estimated[chosen], [sizes[i] for i in chosen], chosen)
    return focals, cam2world


def least_squares_focal(points: torch.Tensor, pixels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """argmin_f sum w |pixel - f * (X/Z, Y/Z)|^2 = sum w a.p / sum w a.a, batched; points (n, P, 3) in the camera frame.

    pixels: (n or 1, P, 2) centred on the principal point; points behind the camera are ignored.
    """
    ray, weights = _rays(points, weights)
    num = torch.einsum("np,npi,npi->n", weights, ray, pixels.expand_as(ray))
    den = torch.einsum("np,npi,npi->n", weights, ray, ray)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


# ------------------------------------------------------------------------------- pnp
def pnp_focal(view: dict[str, torch.Tensor]) -> float:
    """The official focal: Weiszfeld IRLS on view 0's global points (its camera frame) above a confidence percentile."""
    points, conf = view["pts3d_in_other_view"], view["conf"]
    h, w = conf.shape
    points = points.reshape(1, h * w, 3).double()
    conf = conf.reshape(1, h * w).double()
    keep = torch.isfinite(points).all(-1) & torch.isfinite(conf)
    if keep.any():
        keep &= conf >= torch.quantile(conf[keep], FOCAL_CONF_PERCENTILE / 100)
    pixels = _centred_pixels(h, w, points.device).view(h * w, 2)
    ray, weights = _rays(points.nan_to_num(0.0, 0.0, 0.0)[0], keep[0].double())
    # Per-point dot products once; then |p - f a|^2 = pp - 2 f ap + f^2 aa costs three flops a point.
    ray, pixels, weights = ray[weights > 0], pixels[weights > 0], weights[weights > 0]
    ap, aa, pp = (ray * pixels).sum(-1), ray.square().sum(-1), pixels.square().sum(-1)
    focal = (weights * ap).sum() / (weights * aa).sum().clamp_min(torch.finfo(aa.dtype).tiny)
    for _ in range(WEISZFELD_ITERATIONS):  # reweight by 1 / residual: an L1 (median-like) fit
        residual = (pp - 2 * focal * ap + focal.square() * aa).clamp_min(1e-16).sqrt()
        reweighted = weights / residual
        focal = (reweighted * ap).sum() / (reweighted * aa).sum().clamp_min(torch.finfo(aa.dtype).tiny)
    return float(_clamped(focal.reshape(1).cpu(), [(h, w)], [0])[0])


def pnp_poses(
    preds: Preds, groups: dict[tuple[int, int], list[int]], focals: torch.Tensor, progress: Progress = None
) -> torch.Tensor:
    """RANSAC PnP per view in a thread pool -> cam2world (N, 4, 4) float64 CPU (NaN for views not in ``groups``).

    Views where PnP fails take the Procrustes pose (if the preds have local pointmaps; with the
    focals given) or the identity (as the official code does), with a warning naming them.
    """
    import cv2  # the [reconstruct] extra; imported here so that `import fast3r` works without it

    cam2world = torch.full((len(preds), 4, 4), math.nan, dtype=torch.float64)
    jobs = []
    for (h, w), indices in groups.items():
        points, pixels = _most_confident(preds, indices, h, w)
        jobs += [(i, points[j], pixels[j]) for j, i in enumerate(indices)]
    failed = []
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        futures = {pool.submit(_solve_pnp, cv2, pts, px, float(focals[i]), preds[i]["conf"].shape): i
                   for i, pts, px in jobs}
        for future in as_completed(futures):
            i, pose = futures[future], future.result()
            if pose is None:
                failed.append(i)
            else:
                cam2world[i] = torch.from_numpy(pose)
            if progress is not None:
                progress(1)
    if failed:
        failed.sort()
        how = "the identity"
        cam2world[failed] = torch.eye(4, dtype=torch.float64)
        if all("pts3d_local" in preds[i] for i in failed):
            fallback = procrustes_cameras(preds, _groups_by_size({i: _size(preds[i]) for i in failed}), focals)[1]
            cam2world[failed] = fallback[failed]
            how = "the Procrustes alignment"
            lost = [i for i in failed if not bool(torch.isfinite(cam2world[i]).all())]
            if lost:
                how += f" (NaN for {name_views(lost)}: too few finite points in its local pointmap)"
        warnings.warn(f"PnP failed for views {failed}; their poses come from {how}", stacklevel=3)
    return cam2world


def _most_confident(preds: Preds, indices: list[int], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Global points (n, k, 3) and integer pixels (n, k, 2) of each view's most confident pixels, as numpy."""
    points, conf = _stack(preds, indices, "pts3d_in_other_view", "conf", dtype=torch.float32)
    k = min(h * w, max(PNP_MIN_POINTS, math.ceil(h * w * (100 - PNP_CONF_PERCENTILE) / 100)))
    top = conf.nan_to_num(-math.inf).topk(k, dim=1).indices  # (n, k)
    chosen = points.gather(1, top[..., None].expand(-1, -1, 3))
    pixels = torch.stack((top % w, top // w), dim=-1)
    return chosen.double().cpu().numpy(), pixels.double().cpu().numpy()


def _solve_pnp(cv2, points: np.ndarray, pixels: np.ndarray, focal: float, hw: tuple[int, int]) -> np.ndarray | None:
    finite = np.isfinite(points).all(-1)
    points, pixels = np.ascontiguousarray(points[finite]), np.ascontiguousarray(pixels[finite])
    if len(points) < 4:
        return None
    h, w = hw
    k = np.array([[focal, 0, w / 2], [0, focal, h / 2], [0, 0, 1]], dtype=np.float64)
    try:
        ok, rvec, tvec, inliers = cv2.solvePnPRansac(
            points, pixels, k, None, iterationsCount=PNP_ITERATIONS, reprojectionError=PNP_REPROJECTION_PX,
            flags=cv2.SOLVEPNP_SQPNP,
        )
    except cv2.error:
        return None
    if not ok or inliers is None or len(inliers) < 4:
        return None
    rotation = cv2.Rodrigues(rvec)[0]  # world -> camera
    pose = np.eye(4)
    pose[:3, :3] = rotation.T
    pose[:3, 3] = -rotation.T @ tvec.ravel()
    return pose


# --------------------------------------------------------------------------- helpers
def check_preds(preds: Preds, *, needs_local: bool) -> list[tuple[int, int]]:
    """Validate one scene's preds -> (H, W) of every view."""
    if isinstance(preds, dict) or not isinstance(preds, Sequence) or not preds:
        raise TypeError("preds must be the non-empty list of per-view dicts that model(...) returns")
    keys = ("pts3d_in_other_view", "conf") + (("pts3d_local", "conf_local") if needs_local else ())
    sizes = []
    for i, view in enumerate(preds):
        missing = [k for k in keys if k not in view]
        if missing:
            hint = " ('procrustes' needs the local head; use method='pnp')" if "pts3d_local" in missing else ""
            raise KeyError(f"preds[{i}] lacks {missing}{hint}")
        points = view["pts3d_in_other_view"]
        if points.dim() == 4:
            raise ValueError("preds hold a batch of scenes (leading dim B); pass one scene: "
                             "[{k: v[b] for k, v in p.items()} for p in preds]")
        if points.dim() != 3 or points.shape[-1] != 3 or view["conf"].shape != points.shape[:2]:
            raise ValueError(f"preds[{i}]: expected pts3d_in_other_view (H, W, 3) and conf (H, W), got "
                             f"{tuple(points.shape)} and {tuple(view['conf'].shape)}")
        if "pts3d_local" in view and view["pts3d_local"].shape != points.shape:
            raise ValueError(f"preds[{i}]: pts3d_local {tuple(view['pts3d_local'].shape)} differs from "
                             f"pts3d_in_other_view {tuple(points.shape)}")
        if "conf_local" in view and view["conf_local"].shape != view["conf"].shape:
            shape = tuple(view["conf_local"].shape)
            hint = " (transposed? pass it as (H, W), like conf)" if shape == tuple(view["conf"].shape)[::-1] else ""
            raise ValueError(f"preds[{i}]: conf_local has shape {shape}, expected (H, W) = "
                             f"{tuple(view['conf'].shape)}{hint}")
        if any(view[k].device != points.device for k in keys):
            raise ValueError(f"preds[{i}] holds tensors on several devices; move the view's tensors to one device")
        sizes.append(_size(view))
    return sizes


def _usable_views(preds: Preds, *, needs_local: bool) -> list[int]:
    """Views with at least MIN_POINTS finite points (in both pointmaps when ``needs_local``); one host transfer.

    Raises for a negative confidence: confidences weigh and rank points, and the model's are >= 1.
    """
    conf_keys = ("conf", "conf_local") if "conf_local" in preds[0] else ("conf",)
    stats = []
    for view in preds:
        finite = torch.isfinite(view["pts3d_in_other_view"]).all(-1)
        if needs_local:
            finite &= torch.isfinite(view["pts3d_local"]).all(-1)
        negative = [(view[k] < 0).any() for k in conf_keys if k in view]
        stats.append(torch.stack([finite.sum(), *negative]).to(preds[0]["conf"].device))
    stats = torch.stack(stats).cpu().tolist()
    for i, (_, *negative) in enumerate(stats):
        for key, bad in zip(conf_keys, negative):
            if bad:
                raise ValueError(f"preds[{i}]: {key} holds negative values; confidences are >= 0 (the model's are "
                                 ">= 1): pass the model's output")
    return [i for i, (count, *_) in enumerate(stats) if count >= MIN_POINTS]


def _size(view: dict[str, torch.Tensor]) -> tuple[int, int]:
    h, w = view["conf"].shape
    return int(h), int(w)


def _groups_by_size(sizes: dict[int, tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """{view index: (H, W)} -> {(H, W): view indices}."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in sizes.items():
        groups.setdefault(hw, []).append(i)
    return groups


def _given_focals(focal: float | Sequence[float] | torch.Tensor | None, n_views: int) -> torch.Tensor | None:
    if focal is None:
        return None
    focals = torch.as_tensor(focal, dtype=torch.float64).flatten().cpu()
    if focals.numel() == 1:
        focals = focals.expand(n_views).clone()
    if focals.numel() != n_views or not bool(torch.isfinite(focals).all() and (focals > 0).all()):
        raise ValueError(f"focal must be one positive number or {n_views} (one per view), in pixels; got {focal!r}")
    return focals


def _stack(preds: Preds, indices: list[int], points_key: str, conf_key: str,
           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """-> points (n, H*W, 3) and confidence (n, H*W) of the given views, on their device."""
    points = torch.stack([preds[i][points_key].reshape(-1, 3) for i in indices]).to(dtype)
    conf = torch.stack([preds[i][conf_key].reshape(-1) for i in indices]).to(dtype)
    return points, conf


def _centred_pixels(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(H, W, 2) integer pixel coordinates (x, y) minus the principal point (W/2, H/2), float64."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                          torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    return torch.stack((x - w / 2, y - h / 2), dim=-1)


def _rays(points: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X/Z, Y/Z) and the weights with points at or behind the camera dropped."""
    z = points[..., 2:]
    in_front = z[..., 0] > 0
    ray = torch.where(in_front[..., None], points[..., :2] / z.clamp_min(torch.finfo(points.dtype).tiny), 0.0)
    return ray, weights * in_front


def _most_confident_weights(weights: torch.Tensor) -> torch.Tensor:
    """(n, P) weights with all but each row's top (100 - PROCRUSTES_CONF_PERCENTILE)% set to zero."""
    keep = max(1, math.ceil(weights.shape[1] * (100 - PROCRUSTES_CONF_PERCENTILE) / 100))
    threshold = weights.kthvalue(weights.shape[1] - keep + 1, dim=1, keepdim=True).values
    return torch.where(weights >= threshold, weights, 0.0)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _pose_matrices(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    pose = torch.zeros(rotation.shape[0], 4, 4, dtype=rotation.dtype, device=rotation.device)
    pose[:, :3, :3] = rotation
    pose[:, :3, 3] = translation
    pose[:, 3, 3] = 1.0
    return pose


def _clamped(focals: torch.Tensor, sizes: Sequence[tuple[int, int]], views: Sequence[int]) -> torch.Tensor:
    """Clamp focals into FOCAL_RANGE x the long side; warn about those that were out of it, by their view index."""
    long_side = torch.tensor([max(hw) for hw in sizes], dtype=torch.float64)
    low, high = FOCAL_RANGE[0] * long_side, FOCAL_RANGE[1] * long_side
    bad = ~(torch.isfinite(focals) & (focals >= low) & (focals <= high))
    if bad.any():
        named = [views[i] for i in bad.nonzero().flatten().tolist()]
        warnings.warn(f"estimated focal out of [{FOCAL_RANGE[0]}, {FOCAL_RANGE[1]}] x image long side for views "
                      f"{named}; clamped, so their cameras are unreliable (untrained weights, or too little depth "
                      "in view). If you know the focal in pixels of the model's views, pass focal= "
                      "(fast3r reconstruct: --focal)", stacklevel=3)
    return torch.where(torch.isfinite(focals), focals, high).clamp(low, high)
