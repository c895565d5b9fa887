"""Crops: geometry exact against the renderer, pixels reprojected through the new intrinsics, portrait turns, jitter."""

import dataclasses

import numpy as np
import pytest

from fast3r.train.data import Scene, synthetic_scene
from fast3r.train.data.sampling import RESOLUTIONS, camera_points, color_jitter, crop_view, world_points
from fast3r.train.data.synthetic import SyntheticReader, make_world, render


def centred_scene(seed, size, views=3):
    """A synthetic scene whose principal point is the exact image centre ((W - 1) / 2, (H - 1) / 2)."""
    cameras = []
    for camera in synthetic_scene(seed, views=views, size=size).cameras:
        k = camera.intrinsics.copy()
        k[0, 2], k[1, 2] = (size[1] - 1) / 2, (size[0] - 1) / 2
        cameras.append(dataclasses.replace(camera, intrinsics=k))
    return Scene("centred", cameras, SyntheticReader(seed, cameras))


def project(points, k, cam2world):
    """World points (..., 3) -> pixel (x, y) through a pinhole camera."""
    local = (points - cam2world[:3, 3]) @ cam2world[:3, :3]
    return np.stack([k[0, 0] * local[..., 0] / local[..., 2] + k[0, 2],
                     k[1, 1] * local[..., 1] / local[..., 2] + k[1, 2]], -1)


@pytest.mark.parametrize("resolution", [(224, 224), (128, 96)])
def test_a_3x_shrink_takes_the_middle_source_pixel_exactly(resolution):
    """Source 3x the crop, centred principal point, no zoom: crop pixel (x, y) is source pixel (3x + 1, 3y + 1)."""
    w, h = resolution
    scene = centred_scene(7, (3 * h, 3 * w))
    crop = crop_view(scene.views[1], resolution, None)
    assert crop["box"].scale == pytest.approx(1 / 3) and crop["box"].x0 == pytest.approx(0)
    source = scene.reader.render(1)
    points = world_points(crop["depth"], crop["intrinsics"], crop["cam2world"])
    assert np.abs(points - source.points[1::3, 1::3]).max() < 1e-5
    # the source pixel's world point, reprojected through the crop's intrinsics, lands on the crop pixel
    pixels = project(source.points[1::3, 1::3].astype(np.float64), crop["intrinsics"], crop["cam2world"])
    grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1)
    assert np.abs(pixels - grid).max() < 1e-3
    # and the colours are the scene seen by that camera: closer to a direct render than to it shifted by 1 px
    direct = render(make_world(7), crop["intrinsics"], crop["cam2world"], (h, w)).image.astype(float)
    image = crop["image"].astype(float)
    error = np.abs(image - direct).mean()
    assert error < 0.7 * np.abs(image[:, 1:] - direct[:, :-1]).mean()
    assert error < 0.7 * np.abs(image[1:] - direct[:-1]).mean()


@pytest.mark.parametrize("size, resolution", [((150, 200), (512, 384)), ((150, 200), (512, 160)),
                                              ((300, 260), (224, 224)), ((400, 240), (512, 288))])
def test_random_crops_reproject_within_a_thousandth_of_a_pixel(size, resolution):
    """Zoomed crops (and a portrait view turned to landscape): pixels and their depth's source agree."""
    scene = synthetic_scene(9, views=4, size=size)
    rng = np.random.default_rng(0)
    for i in range(4):
        view = scene.views[i]
        crop = crop_view(view, resolution, rng, aug_crop=64)
        w, h = resolution
        assert crop["image"].shape == (h, w, 3) and crop["depth"].shape == (h, w)
        k = crop["intrinsics"]
        assert (k[0, 2], k[1, 2]) == pytest.approx(((w - 1) / 2, (h - 1) / 2))
        rotation = crop["cam2world"][:3, :3]
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
        assert np.linalg.det(rotation) == pytest.approx(1)
        points = world_points(crop["depth"], k, crop["cam2world"])
        grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1)
        assert np.abs(project(points, k, crop["cam2world"]) - grid).max() < 1e-3
        # each crop pixel's ray meets the source image inside the source pixel whose depth it took
        source = project(points, view["intrinsics"], view["cam2world"])
        nearest = np.floor(source + 0.5).astype(int)
        assert np.abs(source - nearest).max() <= 0.5 + 1e-3
        clear = (0.5 - np.abs(source - nearest) > 1e-3).all(-1)  # not on a pixel border, where rounding may differ
        assert clear.mean() > 0.9
        source_local = (points - view["cam2world"][:3, 3]) @ view["cam2world"][:3, :3]
        source_depth = view["depth"][nearest[..., 1], nearest[..., 0]]
        np.testing.assert_allclose(source_local[..., 2][clear], source_depth[clear], rtol=1e-5)


def test_portrait_views_turn_with_their_camera():
    scene = synthetic_scene(3, views=2, size=(240, 150))
    crop = crop_view(scene.views[0], (512, 384), None)
    assert crop["image"].shape == (384, 512, 3)
    k = crop["intrinsics"]
    direct = render(make_world(3), k, crop["cam2world"], (384, 512))
    local = camera_points(crop["depth"], k)
    assert np.abs(local[..., 2] - direct.depth).mean() < 0.02 * direct.depth.mean()
    image = crop["image"].astype(float)
    assert np.abs(image - direct.image).mean() < 0.7 * np.abs(image[:, 2:] - direct.image[:, :-2]).mean()


def test_square_and_landscape_views_are_not_turned():
    scene = synthetic_scene(3, views=1, size=(100, 100))
    crop = crop_view(scene.views[0], (512, 384), None)
    np.testing.assert_array_equal(crop["cam2world"], scene.cameras[0].cam2world)


def test_zoom_and_jitter_are_random_but_reproducible():
    view = synthetic_scene(2, views=1, size=(120, 160)).views[0]
    a = crop_view(view, (224, 224), np.random.default_rng(5))
    b = crop_view(view, (224, 224), np.random.default_rng(5))
    c = crop_view(view, (224, 224), np.random.default_rng(6))
    plain = crop_view(view, (224, 224), None)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["intrinsics"], b["intrinsics"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["intrinsics"][0, 0] >= plain["intrinsics"][0, 0]  # the zoom only enlarges
    unjittered = crop_view(view, (224, 224), np.random.default_rng(5), jitter=False)
    assert np.array_equal(unjittered["depth"], a["depth"]) and not np.array_equal(unjittered["image"], a["image"])


def test_color_jitter_stays_within_its_ranges():
    rng = np.random.default_rng(0)
    image = synthetic_scene(1, views=1, size=(64, 64)).views[0]["image"]
    means = [color_jitter(image, rng).mean() for _ in range(40)]
    assert 0.3 * image.mean() < min(means) < image.mean() < max(means) < 2.0 * image.mean()
    gray = np.repeat(np.full((8, 8, 1), 128, np.uint8), 3, -1)
    for _ in range(10):  # no saturation, hue or contrast on a flat gray image: only brightness moves it
        out = color_jitter(gray, rng)
        assert (out == out[0, 0]).all() and 0.45 * 128 <= out[0, 0, 0] <= 1.55 * 128


def test_resolutions_are_the_official_ones():
    assert RESOLUTIONS[512] == ((512, 384), (512, 336), (512, 288), (512, 256), (512, 160))
    assert RESOLUTIONS[224] == ((224, 224),)
