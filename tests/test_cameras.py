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


def caught_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def test_procrustes_with_zero_confidence_fits_with_equal_weights_and_warns(fresh_seed):
    """All-zero weights leave the alignment undetermined: equal weights, named views, true poses."""
    scene = synthetic_scene(n_views=4, seed=fresh_seed)
    for key in ("conf", "conf_local"):
        scene["preds"][2][key] = torch.zeros_like(scene["preds"][2][key])
    scene["preds"][3]["conf_local"] = torch.zeros_like(scene["preds"][3]["conf_local"])
    result, messages = caught_warnings(lambda: fast3r.estimate_cameras(scene["preds"], method="procrustes"))
    assert any("confidence is zero at every finite point of views 2, 3" in m and "equal weights" in m
               for m in messages), messages
    rotation, centre, focal = errors(result, scene)
    assert rotation <= EXACT_DEGREES and centre <= EXACT_BASELINE and focal <= EXACT_FOCAL, (rotation, centre, focal)


@pytest.mark.parametrize("method", METHODS)
def test_a_view_without_finite_points_gets_a_nan_camera_and_a_warning(method, fresh_seed):
    scene = synthetic_scene(n_views=4, seed=fresh_seed)
    for key in ("pts3d_in_other_view", "pts3d_local"):
        scene["preds"][2][key] = torch.full_like(scene["preds"][2][key], float("nan"))
    result, messages = caught_warnings(lambda: fast3r.estimate_cameras(scene["preds"], method=method))
    assert any("view 2 has fewer than 4 finite points" in m and "NaN" in m for m in messages), messages
    assert not any("PnP failed" in m for m in messages), messages
    assert torch.isnan(result["cam2world"][2]).all()
    others = [0, 1, 3]
    rotation, centre = pose_errors(result["cam2world"][others], scene["cam2world"][others])
    assert float(rotation.max()) <= EXACT_DEGREES and float(centre.max()) <= EXACT_BASELINE * scene["baseline"]
    if method == "procrustes":  # its focal comes from the view itself
        assert torch.isnan(result["intrinsics"][2, 0, 0])


def test_pnp_without_a_usable_view_zero_says_what_to_pass(fresh_seed):
    scene = synthetic_scene(n_views=3, seed=fresh_seed)
    scene["preds"][0]["pts3d_in_other_view"] = torch.full_like(scene["preds"][0]["pts3d_in_other_view"], float("nan"))
    with pytest.raises(ValueError, match=r"view 0 has fewer than 4 finite points.*focal=.*--cameras procrustes"):
        fast3r.estimate_cameras(scene["preds"], method="pnp")
    with pytest.warns(UserWarning, match="view 0 has fewer than 4 finite points"):
        given = fast3r.estimate_cameras(scene["preds"], method="pnp", focal=float(scene["focals"][0]))
    assert torch.isnan(given["cam2world"][0]).all() and torch.isfinite(given["cam2world"][1:]).all()


def test_a_transposed_confidence_is_refused(fresh_seed):
    scene = synthetic_scene(n_views=2, seed=fresh_seed)  # 48 x 64 views
    scene["preds"][1]["conf_local"] = scene["preds"][1]["conf_local"].T.contiguous()
    with pytest.raises(ValueError, match=r"preds\[1\]: conf_local has shape \(64, 48\).*transposed"):
        fast3r.estimate_cameras(scene["preds"], method="procrustes")


@pytest.mark.parametrize("key", ["conf", "conf_local"])
def test_negative_confidence_is_refused(fresh_seed, key):
    scene = synthetic_scene(n_views=2, seed=fresh_seed)
    scene["preds"][1][key][3, 4] = -2.0
    with pytest.raises(ValueError, match=rf"preds\[1\]: {key} holds negative values"):
        fast3r.estimate_cameras(scene["preds"], method="procrustes")


def test_pnp_fallback_warnings_name_the_views_of_the_scene(monkeypatch, fresh_seed):
    """The fallback runs on the failed views alone; what it reports must still use the scene's view numbers."""
    scene = synthetic_scene(n_views=4, seed=fresh_seed)
    scene["preds"][3]["conf_local"] = torch.zeros_like(scene["preds"][3]["conf_local"])
    solve = cameras._solve_pnp
    monkeypatch.setattr(cameras, "_solve_pnp", lambda cv2, points, pixels, focal, hw: None if
                        float(points[0, 0]) in failing else solve(cv2, points, pixels, focal, hw))
    top = cameras._most_confident(scene["preds"], [2, 3], 48, 64)[0]
    failing = {float(top[0, 0, 0]), float(top[1, 0, 0])}  # views 2 and 3, recognised by their points
    result, messages = caught_warnings(lambda: fast3r.estimate_cameras(scene["preds"], method="pnp"))
    assert any("PnP failed for views [2, 3]" in m for m in messages), messages
    assert any("views 3" in m or "view 3" in m for m in messages if "equal weights" in m), messages
    assert not any("[0]" in m or "[1]" in m or "view 0 " in m or "view 1 " in m for m in messages), messages
    rotation, centre, _ = errors(result, scene)
    assert rotation <= EXACT_DEGREES and centre <= EXACT_BASELINE


def test_focal_clamp_warning_says_how_to_give_the_focal_in_python_and_on_the_command_line(fresh_seed):
    scene = synthetic_scene(n_views=2, seed=fresh_seed)
    flat = [{**p, "pts3d_in_other_view": p["pts3d_in_other_view"] * torch.tensor([1e-6, 1e-6, 1.0])}
            for p in scene["preds"]]
    _, messages = caught_warnings(lambda: fast3r.estimate_cameras(flat, method="pnp"))
    assert any("focal=" in m and "--focal" in m for m in messages), messages
