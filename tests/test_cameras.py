"""Cameras from pointmaps: synthetic scenes with known cameras, both methods."""

import math
import warnings

import pytest
import torch
from scenes import pose_errors, random_rotation, synthetic_scene

import fast3r
from fast3r import cameras

METHODS = ("pnp", "procrustes")
# Exact pointmaps: the bounds.
EXACT_DEGREES, EXACT_BASELINE, EXACT_FOCAL = 0.05, 1e-3, 5e-3
# 1% depth noise on both pointmaps and 10% low-confidence outliers, 6 views of 48x64: the worst
# over 150 seeds was 0.47 deg / 3.1% of the baseline / 1.4% focal (procrustes; pnp 0.5% focal).
NOISY_DEGREES, NOISY_BASELINE, NOISY_FOCAL = 1.5, 0.08, 0.04
# 2% noise and 30% outliers: worst over 150 seeds 1.5 deg (pnp) and focal 1.6% (pnp) / 5.2% (procrustes).
HEAVY_DEGREES, HEAVY_FOCAL = {"pnp": 4.0, "procrustes": 2.5}, {"pnp": 0.04, "procrustes": 0.12}


def errors(result, scene):
    rotation, centre = pose_errors(result["cam2world"], scene["cam2world"])
    focal = (result["intrinsics"][:, 0, 0] / scene["focals"] - 1).abs()
    return float(rotation.max()), float(centre.max()) / scene["baseline"], float(focal.max())


@pytest.mark.parametrize("method", METHODS)
def test_exact_pointmaps_give_the_true_cameras(method, fresh_seed):
    scene = synthetic_scene(n_views=6, seed=fresh_seed)
    result = fast3r.estimate_cameras(scene["preds"], method=method)
    assert result["cam2world"].dtype == result["intrinsics"].dtype == torch.float64
    assert result["cam2world"].device.type == "cpu" and result["cam2world"].shape == (6, 4, 4)
    rotation, centre, focal = errors(result, scene)
    assert rotation <= EXACT_DEGREES and centre <= EXACT_BASELINE and focal <= EXACT_FOCAL, (rotation, centre, focal)
    # The world is view 0's camera; the principal point is (W/2, H/2).
    torch.testing.assert_close(result["cam2world"][0], torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (result["intrinsics"][:, 0, 2] == 32).all() and (result["intrinsics"][:, 1, 2] == 24).all()
    assert (result["cam2world"][:, 3] == torch.tensor([0, 0, 0, 1.0], dtype=torch.float64)).all()


@pytest.mark.parametrize("method", METHODS)
def test_views_of_different_sizes(method, fresh_seed):
    scene = synthetic_scene(seed=fresh_seed, sizes=[(48, 64), (64, 48), (48, 64), (32, 32), (64, 48)])
    result = fast3r.estimate_cameras(scene["preds"], method=method)
    rotation, centre, focal = errors(result, scene)
    assert rotation <= EXACT_DEGREES and centre <= EXACT_BASELINE and focal <= EXACT_FOCAL, (rotation, centre, focal)
    assert result["intrinsics"][:, 0, 2].tolist() == [32, 24, 32, 16, 24]
    assert result["intrinsics"][:, 1, 2].tolist() == [24, 32, 24, 16, 32]


@pytest.mark.parametrize("method", METHODS)
def test_noise_and_low_confidence_outliers_stay_bounded(method, fresh_seed):
    scene = synthetic_scene(n_views=6, seed=fresh_seed, noise=0.01, outliers=0.1)
    rotation, centre, focal = errors(fast3r.estimate_cameras(scene["preds"], method=method), scene)
    assert rotation <= NOISY_DEGREES and centre <= NOISY_BASELINE and focal <= NOISY_FOCAL, (rotation, centre, focal)


@pytest.mark.parametrize("method", METHODS)
def test_heavy_noise_and_many_outliers(method, fresh_seed):
    scene = synthetic_scene(n_views=6, seed=fresh_seed, noise=0.02, outliers=0.3)
    rotation, _, focal = errors(fast3r.estimate_cameras(scene["preds"], method=method), scene)
    assert rotation <= HEAVY_DEGREES[method] and focal <= HEAVY_FOCAL[method], (rotation, focal)


@pytest.mark.parametrize("method", METHODS)
def test_known_focal_is_used_as_given(method, fresh_seed):
    scene = synthetic_scene(n_views=4, seed=fresh_seed, noise=0.01)
    given = [float(scene["focals"][0])] * 3 + [float(scene["focals"][0]) * 1.001]
    result = fast3r.estimate_cameras(scene["preds"], method=method, focal=given)
    torch.testing.assert_close(result["intrinsics"][:, 0, 0], torch.tensor(given, dtype=torch.float64))
    torch.testing.assert_close(result["intrinsics"][:, 1, 1], torch.tensor(given, dtype=torch.float64))
    one = fast3r.estimate_cameras(scene["preds"], method=method, focal=given[0])
    assert (one["intrinsics"][:, 0, 0] == given[0]).all()


def test_pnp_failures_fall_back_to_procrustes(monkeypatch, fresh_seed):
    scene = synthetic_scene(n_views=4, seed=fresh_seed)
    solve = cameras._solve_pnp
    calls = []

    def fail_on_view_two(cv2, points, pixels, focal, hw):
        calls.append(1)
        return None if len(calls) == 3 else solve(cv2, points, pixels, focal, hw)

    monkeypatch.setattr(cameras, "_solve_pnp", fail_on_view_two)
    with pytest.warns(UserWarning, match=r"PnP failed for views \[\d\]; .* Procrustes"):
        result = fast3r.estimate_cameras(scene["preds"], method="pnp")
    rotation, centre, _ = errors(result, scene)
    assert rotation <= EXACT_DEGREES and centre <= EXACT_BASELINE


def test_progress_counts_every_view(fresh_seed):
    scene = synthetic_scene(n_views=5, seed=fresh_seed)
    for method in METHODS:
        done = []
        fast3r.estimate_cameras(scene["preds"], method=method, progress=done.append)
        assert sum(done) == 5


def test_umeyama_recovers_a_similarity_batched(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    src = torch.randn(3, 200, 3, generator=g, dtype=torch.float64)
    rotation = torch.stack([random_rotation(180.0, g) for _ in range(3)])
    scale = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    shift = torch.randn(3, 3, generator=g, dtype=torch.float64)
    dst = scale[:, None, None] * src @ rotation.transpose(1, 2) + shift[:, None]
    weights = torch.rand(3, 200, generator=g, dtype=torch.float64)
    s, r, t = cameras.umeyama(src, dst, weights)
    torch.testing.assert_close(s, scale)
    torch.testing.assert_close(r, rotation)
    torch.testing.assert_close(t, shift)
    # A mirrored target still gives a proper rotation (det +1), never a reflection.
    _, r, _ = cameras.umeyama(src, dst * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(3, dtype=torch.float64))


def test_least_squares_focal_ignores_points_behind_the_camera(fresh_seed):
    scene = synthetic_scene(n_views=1, seed=fresh_seed)
    points = scene["preds"][0]["pts3d_local"].double().reshape(1, -1, 3)
    points[0, :100, 2] *= -1  # behind the camera: no information about f
    pixels = cameras._centred_pixels(48, 64, points.device).view(1, -1, 2)
    focal = cameras.least_squares_focal(points, pixels, torch.ones(points.shape[:2], dtype=torch.float64))
    assert math.isclose(float(focal), float(scene["focals"][0]), rel_tol=1e-6)


def test_bad_input_is_named(fresh_seed):
    scene = synthetic_scene(n_views=2, seed=fresh_seed)
    with pytest.raises(ValueError, match="method='ransac'"):
        fast3r.estimate_cameras(scene["preds"], method="ransac")
    with pytest.raises(KeyError, match="'procrustes' needs the local head"):
        fast3r.estimate_cameras([{k: v for k, v in p.items() if "local" not in k} for p in scene["preds"]],
                                method="procrustes")
    batched = [{k: v[None] for k, v in p.items()} for p in scene["preds"]]
    with pytest.raises(ValueError, match="batch of scenes"):
        fast3r.estimate_cameras(batched)
    with pytest.raises(ValueError, match="focal must be one positive number or 2"):
        fast3r.estimate_cameras(scene["preds"], focal=[100.0, -1.0])
    with pytest.raises(TypeError, match="non-empty list"):
        fast3r.estimate_cameras([])


def test_degenerate_pointmaps_warn_and_clamp_the_focal(fresh_seed):
    scene = synthetic_scene(n_views=2, seed=fresh_seed)
    flat = [{**p, "pts3d_in_other_view": p["pts3d_in_other_view"] * torch.tensor([1e-6, 1e-6, 1.0])}
            for p in scene["preds"]]  # every point on the optical axis: focal -> infinity
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fast3r.estimate_cameras(flat, method="pnp")
    assert any("clamped" in str(w.message) for w in caught)
    assert float(result["intrinsics"][0, 0, 0]) == cameras.FOCAL_RANGE[1] * 64


@pytest.mark.gpu
def test_procrustes_on_the_gpu_matches_the_cpu(fresh_seed):
    scene = synthetic_scene(n_views=8, seed=fresh_seed, noise=0.01, outliers=0.1)
    on_gpu = [{k: v.cuda() for k, v in p.items()} for p in scene["preds"]]
    gpu = fast3r.estimate_cameras(on_gpu, method="procrustes")
    cpu = fast3r.estimate_cameras(scene["preds"], method="procrustes")
    assert gpu["cam2world"].device.type == "cpu"
    torch.testing.assert_close(gpu["cam2world"], cpu["cam2world"], atol=1e-6, rtol=0)
    torch.testing.assert_close(gpu["intrinsics"], cpu["intrinsics"], atol=1e-6, rtol=1e-9)
