"""Export round trips: what we write, the readers of each format read back the same."""

import json

import numpy as np
import pytest
import torch
from scenes import synthetic_scene

from fast3r import export
from fast3r.cameras import intrinsics_matrices

# The [reconstruct] extra: installed in CI; skipped with the reason where it is not (the GPU machine).
pycolmap = pytest.importorskip("pycolmap")
trimesh = pytest.importorskip("trimesh")

OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


@pytest.fixture
def scene(fresh_seed):
    """Three exact views with their true cameras and random pixels."""
    s = synthetic_scene(n_views=3, seed=fresh_seed, sizes=[(48, 64), (48, 64), (64, 48)])
    sizes = [tuple(p["conf"].shape) for p in s["preds"]]
    s["cameras"] = {"cam2world": s["cam2world"], "intrinsics": intrinsics_matrices(s["focals"], sizes)}
    s["images"] = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    s["names"] = [f"{i:05d}_view.png" for i in range(3)]
    s["sizes"] = sizes
    return s


def test_points_keep_the_confident_and_respect_the_cap(scene):
    cloud = export.select_points(scene["preds"], scene["images"], conf_percentile=50)
    assert abs(len(cloud) - 3 * 48 * 64 // 2) <= 3  # each view's upper half
    for p in range(0, len(cloud), 97):
        view, (x, y) = cloud.view[p], cloud.pixel[p]
        pred = scene["preds"][view]
        assert float(pred["conf"][y, x]) >= float(torch.quantile(pred["conf"].flatten(), 0.5))
        np.testing.assert_array_equal(cloud.xyz[p], pred["pts3d_in_other_view"][y, x].numpy())
        np.testing.assert_array_equal(cloud.rgb[p], scene["images"][view][:, y, x].numpy())
    capped = export.select_points(scene["preds"], scene["images"], conf_percentile=0, max_points=1000)
    assert 900 <= len(capped) <= 1000 and set(np.unique(capped.view)) == {0, 1, 2}
    assert (np.diff(capped.view) >= 0).all()  # grouped by view


def test_ply_round_trip(scene, tmp_path):
    cloud = export.select_points(scene["preds"], scene["images"])
    export.write_ply(tmp_path / "points.ply", cloud)
    loaded = trimesh.load(tmp_path / "points.ply")
    np.testing.assert_array_equal(loaded.vertices, cloud.xyz)
    np.testing.assert_array_equal(loaded.colors[:, :3], cloud.rgb)
    assert (tmp_path / "points.ply").read_bytes().startswith(b"ply\nformat binary_little_endian")


def test_glb_holds_points_and_frusta_in_gltf_axes(scene, tmp_path):
    cloud = export.select_points(scene["preds"], scene["images"], max_points=500)
    export.write_glb(tmp_path / "scene.glb", cloud, scene["cameras"], scene["sizes"])
    loaded = trimesh.load(tmp_path / "scene.glb")
    np.testing.assert_allclose(loaded.geometry["points"].vertices, cloud.xyz * [1, -1, -1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(loaded.geometry["points"].colors[:, :3], cloud.rgb)
    frusta = loaded.geometry["cameras"].vertices * [1, -1, -1]  # back to OpenCV axes
    for pose, k, (h, w) in zip(scene["cam2world"].numpy(), scene["cameras"]["intrinsics"].numpy(), scene["sizes"]):
        apex = pose[:3, 3]  # each camera centre is a frustum's apex ...
        assert np.linalg.norm(frusta - apex, axis=1).min() < 1e-5
        edges = frusta - apex
        edges = edges[np.linalg.norm(edges, axis=1) > 1e-6]
        edges /= np.linalg.norm(edges, axis=1, keepdims=True)
        for x, y in ((0, 0), (w, 0), (w, h), (0, h)):  # ... with edges along the rays of the image corners
            ray = pose[:3, :3] @ np.linalg.solve(k, [x, y, 1.0])
            assert (edges @ (ray / np.linalg.norm(ray))).max() > 1 - 1e-6


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_colmap_round_trip_with_pycolmap(scene, tmp_path, kind):
    cloud = export.select_points(scene["preds"], scene["images"])
    export.write_colmap(tmp_path / "sparse/0", scene["cameras"], scene["sizes"], scene["names"], cloud,
                        max_points=2000)
    model = pycolmap.Reconstruction()
    (model.read_text if kind == "text" else model.read_binary)(str(tmp_path / "sparse/0"))
    assert model.num_reg_images() == 3 and model.num_points3D() == 2000
    assert model.num_cameras() == 2  # the two landscape views share a camera
    assert model.compute_mean_reprojection_error() < 1e-3  # exact pointmaps, true cameras
    for image_id, image in model.images.items():
        i = image_id - 1
        assert image.name == scene["names"][i]
        world_to_cam = np.linalg.inv(scene["cam2world"][i].numpy())
        np.testing.assert_allclose(image.cam_from_world().matrix(), world_to_cam[:3], atol=1e-9)
        h, w = scene["sizes"][i]
        f = float(scene["focals"][i])
        np.testing.assert_allclose(image.camera.params, [f, f, w / 2 + 0.5, h / 2 + 0.5])
        assert (image.camera.width, image.camera.height) == (w, h)
    # Exact pointmaps: every point projects onto its observation (COLMAP's pixel centres are at +0.5).
    for point in list(model.points3D.values())[::50]:
        (element,) = point.track.elements
        image = model.images[element.image_id]
        observed = image.points2D[element.point2D_idx].xy
        np.testing.assert_allclose(image.project_point(point.xyz), observed, atol=1e-3)
        x, y = (observed - 0.5).round().astype(int)
        np.testing.assert_array_equal(point.color, scene["images"][element.image_id - 1][:, y, x].numpy())


def test_colmap_points_carry_their_reprojection_error(scene, tmp_path):
    cloud = export.select_points(scene["preds"], scene["images"], max_points=300)
    wrong = {**scene["cameras"], "intrinsics": scene["cameras"]["intrinsics"] * torch.tensor([1.1, 1.1, 1.0])[:, None]}
    export.write_colmap(tmp_path, wrong, scene["sizes"], scene["names"], cloud)  # focal 10% too long
    model = pycolmap.Reconstruction(str(tmp_path))
    assert model.compute_mean_reprojection_error() > 0.1
    assert all(point.error > 0 for point in model.points3D.values())


def test_colmap_text_stores_world_to_camera_quaternions(scene, tmp_path):
    cloud = export.select_points(scene["preds"], scene["images"], max_points=10)
    export.write_colmap(tmp_path, scene["cameras"], scene["sizes"], scene["names"], cloud)
    lines = [line for line in (tmp_path / "images.txt").read_text().splitlines() if not line.startswith("#")]
    fields = lines[2].split()  # image 2: IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME
    qw, qx, qy, qz = map(float, fields[1:5])
    rotation = np.array([
        [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qz * qw), 2 * (qx * qz + qy * qw)],
        [2 * (qx * qy + qz * qw), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qx * qw)],
        [2 * (qx * qz - qy * qw), 2 * (qy * qz + qx * qw), 1 - 2 * (qx * qx + qy * qy)]])
    world_to_cam = np.linalg.inv(scene["cam2world"][1].numpy())
    np.testing.assert_allclose(rotation, world_to_cam[:3, :3], atol=1e-6)
    np.testing.assert_allclose(list(map(float, fields[5:8])), world_to_cam[:3, 3], atol=1e-6)


def test_nerfstudio_transforms(scene, tmp_path):
    paths = [f"images/{n}" for n in scene["names"]]
    export.write_nerfstudio(tmp_path / "transforms.json", scene["cameras"], scene["sizes"], paths, "points.ply")
    meta = json.loads((tmp_path / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV" and meta["ply_file_path"] == "points.ply"
    for i, frame in enumerate(meta["frames"]):
        h, w = scene["sizes"][i]
        assert frame["file_path"] == paths[i] and (frame["w"], frame["h"]) == (w, h)
        assert frame["fl_x"] == frame["fl_y"] == pytest.approx(float(scene["focals"][i]))
        assert (frame["cx"], frame["cy"]) == (w / 2 + 0.5, h / 2 + 0.5)
        opengl = np.array(frame["transform_matrix"])
        np.testing.assert_allclose(opengl, scene["cam2world"][i].numpy() @ OPENGL)
        np.testing.assert_allclose(opengl[:3, 2], -scene["cam2world"][i, :3, 2].numpy())  # looks down -z


def test_npz_holds_raw_outputs_depth_and_cameras(scene, tmp_path):
    export.write_npz(tmp_path / "r.npz", scene["preds"], scene["cameras"], scene["images"], scene["names"])
    data = np.load(tmp_path / "r.npz")
    assert data["pts3d"].shape == (3, 64, 64, 3)  # padded to the largest height and width
    np.testing.assert_array_equal(data["image_sizes"], scene["sizes"])
    for i, pred in enumerate(scene["preds"]):
        h, w = scene["sizes"][i]
        np.testing.assert_array_equal(data["depth"][i, :h, :w], pred["pts3d_local"][..., 2].numpy())
        np.testing.assert_array_equal(data["pts3d"][i, :h, :w], pred["pts3d_in_other_view"].numpy())
        np.testing.assert_array_equal(data["conf_local"][i, :h, :w], pred["conf_local"].numpy())
        np.testing.assert_array_equal(data["images"][i, :h, :w], scene["images"][i].permute(1, 2, 0).numpy())
        assert np.isnan(data["depth"][i, h:, :]).all() and np.isnan(data["depth"][i, :, w:]).all()
    np.testing.assert_array_equal(data["cam2world"], scene["cam2world"].numpy())
    np.testing.assert_array_equal(data["intrinsics"], scene["cameras"]["intrinsics"].numpy())
    assert list(data["names"]) == scene["names"]


def test_export_writes_every_format(scene, tmp_path):
    steps = []
    written = export.export(tmp_path, export.FORMATS, preds=scene["preds"], images=scene["images"],
                            names=scene["names"], cameras=scene["cameras"], on_step=steps.append)
    assert len(steps) == export.export_steps(export.FORMATS) == 6
    for name in ("images", "points.ply", "scene.glb", "sparse/0", "transforms.json", "reconstruction.npz"):
        assert tmp_path / name in written and (tmp_path / name).exists()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == scene["names"]
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="unknown export formats \\['obj'\\]"):
        export.export(tmp_path, ["obj"], preds=scene["preds"], images=scene["images"], names=scene["names"],
                      cameras=scene["cameras"])


def test_an_interrupted_write_leaves_the_old_file_or_none(scene, tmp_path, monkeypatch):
    target = tmp_path / "reconstruction.npz"

    def savez_then_fail(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(KeyboardInterrupt):
        export.write_npz(target, scene["preds"], scene["cameras"], scene["images"], scene["names"])
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"the previous export")
    with pytest.raises(KeyboardInterrupt):
        export.write_npz(target, scene["preds"], scene["cameras"], scene["images"], scene["names"])
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"the previous export"


def test_an_interrupted_colmap_export_leaves_no_partial_model(scene, tmp_path, monkeypatch):
    cloud = export.select_points(scene["preds"], scene["images"], max_points=50)

    def fail(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(pycolmap.Reconstruction, "write_binary", fail)
    with pytest.raises(OSError, match="disk full"):
        export.write_colmap(tmp_path / "sparse/0", scene["cameras"], scene["sizes"], scene["names"], cloud)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the text files written first are gone too
    assert list((tmp_path / "sparse").iterdir()) == [tmp_path / "sparse/0"]
