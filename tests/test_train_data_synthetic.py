"""Synthetic scenes: exact depth (against a float64 brute-force caster), determinism, texture, camera motion."""

import pickle

import numpy as np
import pytest
import torch

from fast3r.metrics import relative_pose_errors
from fast3r.train.data import synthetic_scene
from fast3r.train.data.synthetic import make_world, render


def brute_force_depth(world, k, cam2world, size):
    """Depth by testing every ray against every surface in float64, no culling: the reference."""
    h, w = size
    xs, ys = np.meshgrid((np.arange(w) - k[0, 2]) / k[0, 0], (np.arange(h) - k[1, 2]) / k[1, 1])
    d = np.stack([xs, ys, np.ones_like(xs)], -1) @ cam2world[:3, :3].T  # camera z = 1: t is the depth
    o = cam2world[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(d > 0, (world.room_hi - o) / d, (world.room_lo - o) / d).min(-1)
        for centre, halves, rotation, sphere in zip(world.centres, world.halves, world.rotations, world.is_sphere):
            local_o = rotation.T @ (o - centre) / halves
            local_d = d @ rotation / halves
            if sphere:
                a, b = (local_d**2).sum(-1), local_d @ local_o
                disc = b**2 - a * (local_o @ local_o - 1)
                t = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
            else:
                t1, t2 = (-1 - local_o) / local_d, (1 - local_o) / local_d
                near, far = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
                t = np.where(near < far, near, np.inf)
            depth = np.where((t > 0) & (t < depth), t, depth)
    return depth


@pytest.mark.parametrize("seed", [3, 11, 12])
def test_depth_matches_a_float64_brute_force_caster(seed):
    scene = synthetic_scene(seed, views=24, size=(60, 80))
    world = make_world(seed)
    for i in (0, 7, 19):
        camera = scene.cameras[i]
        frame = scene.reader.render(i)
        reference = brute_force_depth(world, camera.intrinsics, camera.cam2world, camera.size)
        relative = np.abs(frame.depth - reference) / reference
        # float32 against float64: a grazing ray may pick the other surface at a silhouette pixel
        assert (relative > 1e-4).mean() <= 0.002, (seed, i, (relative > 1e-4).sum())
        assert np.median(relative) < 1e-6
        # the world points are the camera-frame points (x/z, y/z from the intrinsics) at that depth
        camera_points = (frame.points - camera.cam2world[:3, 3]) @ camera.cam2world[:3, :3]
        np.testing.assert_allclose(camera_points[..., 2], frame.depth, rtol=1e-5, atol=1e-5)
        u = camera.intrinsics[0, 0] * camera_points[..., 0] / camera_points[..., 2] + camera.intrinsics[0, 2]
        np.testing.assert_allclose(u, np.broadcast_to(np.arange(80.0), (60, 80)), atol=1e-3)


def test_same_seed_same_scene_other_seed_other_scene():
    a, b = synthetic_scene(5, views=6, size=(48, 64)), synthetic_scene(5, views=6, size=(48, 64))
    make_world.cache_clear()  # a fresh world, as in another DataLoader worker
    c = synthetic_scene(5, views=6, size=(48, 64))
    other = synthetic_scene(6, views=6, size=(48, 64))
    for i in (0, 5):
        views = [s.views[i] for s in (a, b, c)]
        for view in views[1:]:
            assert np.array_equal(view["image"], views[0]["image"]) and np.array_equal(view["depth"], views[0]["depth"])
            assert np.array_equal(view["cam2world"], views[0]["cam2world"])
        assert not np.array_equal(other.views[i]["image"], views[0]["image"])
    restored = pickle.loads(pickle.dumps(a))  # DataLoader workers under spawn
    assert np.array_equal(restored.views[3]["image"], a.views[3]["image"])


def test_laying_out_cameras_builds_no_texture_and_the_texture_is_drawn_from_the_seed():
    """Cameras of thousands of scenes must cost their geometry only; the atlas, built later, is the seed's."""
    make_world.cache_clear()
    scene = synthetic_scene(21, views=6, size=(48, 64))
    assert "atlas" not in make_world(21).__dict__  # the cameras needed only the room and the objects
    image = scene.views[2]["image"]
    first = make_world(21).atlas
    make_world.cache_clear()
    again = make_world(21).atlas
    assert torch.equal(first, again) and first.dtype == torch.int32
    assert not torch.equal(first, make_world(22).atlas)
    assert np.array_equal(synthetic_scene(21, views=6, size=(48, 64)).views[2]["image"], image)


def test_views_have_contract_types_and_positive_depth():
    scene = synthetic_scene(1, views=3, size=(30, 40))
    view = scene.views[-1]
    assert view["image"].shape == (30, 40, 3) and view["image"].dtype == np.uint8
    assert view["depth"].shape == (30, 40) and view["depth"].dtype == np.float32 and (view["depth"] > 0).all()
    assert view["intrinsics"].dtype == np.float64 and view["cam2world"].shape == (4, 4)
    assert view["name"] == "00002.png" and len(scene.views[0:2]) == 2
    rotation = view["cam2world"][:3, :3]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
    with pytest.raises(IndexError):
        scene.views[3]
    with pytest.raises(ValueError, match="views"):
        synthetic_scene(0, views=0)


def test_textures_are_rich_enough_to_match():
    """Not flat colours: nearly every 8x8 block has contrast, and the image has many distinct colours."""
    for seed in range(4):
        image = synthetic_scene(seed, views=4, size=(96, 128)).views[2]["image"].astype(np.float64)
        gray = image.mean(-1)
        blocks = gray.reshape(12, 8, 16, 8).transpose(0, 2, 1, 3).reshape(-1, 64)
        assert (blocks.std(1) > 3).mean() > 0.9, seed
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1000


def test_cameras_rotate_enough_that_identity_poses_score_badly():
    """RRA@15 / RTA@15 of identity poses over random 8-view subsets stay low: the learning run has to learn poses."""
    rng = np.random.default_rng(0)
    rra, rta = [], []
    for seed in range(12):
        poses = torch.from_numpy(np.stack([c.cam2world for c in synthetic_scene(seed, views=24, size=(8, 8)).cameras]))
        subset = poses[torch.from_numpy(rng.choice(24, 8, replace=False))]
        rotation, translation = relative_pose_errors(torch.eye(4, dtype=torch.float64).repeat(8, 1, 1), subset)
        rra.append((rotation < 15).double().mean())
        rta.append((translation < 15).double().mean())
    assert np.mean(rra) < 0.35 and np.mean(rta) < 0.05


def test_render_accepts_any_size_and_intrinsics():
    world = make_world(2)
    camera = synthetic_scene(2, views=2, size=(10, 10)).cameras[1]
    k = np.array([[30.0, 0, 20.3], [0, 35.0, 9.7], [0, 0, 1]])
    frame = render(world, k, camera.cam2world, (21, 37))
    assert frame.image.shape == (21, 37, 3) and frame.depth.shape == (21, 37) and frame.points.shape == (21, 37, 3)
    reference = brute_force_depth(world, k, camera.cam2world, (21, 37))
    assert np.median(np.abs(frame.depth - reference) / reference) < 1e-6
