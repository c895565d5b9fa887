"""Export round trips: what we write, the readers of each format read back the same."""

import json
import re

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
    assert not (tmp_path / "sparse/0").exists()  # no empty model folder either


# ------------------------------------------------------------------------------ bad input
def export_all(scene, out, formats=export.FORMATS, **changes):
    kwargs = {"preds": scene["preds"], "images": scene["images"], "names": scene["names"], "cameras": scene["cameras"]}
    kwargs.update(changes)
    return export.export(out, formats, **kwargs)


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("bad, message", [
    ("../escape.png", "a file name, not a path"),
    ("/tmp/absolute.png", "a file name, not a path"),
    ("sub/dir.png", "a file name, not a path"),
    ("..", "a file name, not a path"),
    ("two words.png", "whitespace"),
    ("line\nbreak.png", "whitespace"),
    ("picture.jpg", "end in .png"),
    ("", "a file name, not a path"),
])
def test_view_names_must_be_plain_png_file_names(scene, tmp_path, bad, message):
    """A name is written as images/<name> and listed in COLMAP's text files: no path, no whitespace, a PNG."""
    names = [scene["names"][0], bad, scene["names"][2]]
    out = tmp_path / "out"
    with pytest.raises(export.ExportError, match=rf"names\[1\] = {re.escape(repr(bad))}.*{message}"):
        export_all(scene, out, names=names)
    assert files_under(tmp_path) == []  # nothing written, inside or outside the folder


@pytest.mark.parametrize("names", [["a.png", "b.png", "a.png"], ["a.png", "A.PNG", "b.png"]])
def test_duplicate_view_names_are_refused(scene, tmp_path, names):
    """Two views of one name would overwrite each other's image while COLMAP lists both (or collide on macOS)."""
    with pytest.raises(export.ExportError, match="duplicate view names"):
        export_all(scene, tmp_path / "out", names=names)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("change, message", [
    (lambda s: {"names": s["names"][:2]}, "3 preds, 3 images, 2 names and 3 cameras"),
    (lambda s: {"images": s["images"][:2]}, "3 preds, 2 images, 3 names and 3 cameras"),
    (lambda s: {"cameras": {k: v[:2] for k, v in s["cameras"].items()}}, "3 preds, 3 images, 3 names and 2 cameras"),
    (lambda s: {"cameras": {**s["cameras"], "intrinsics": s["cameras"]["intrinsics"][:1]}},
     r"cameras\['intrinsics'\] has shape \(1, 3, 3\)"),
    (lambda s: {"images": [s["images"][0], s["images"][1][:, :, :32], s["images"][2]]},
     r"images\[1\] has shape \(3, 48, 32\) but preds\[1\] is 48 x 64"),
    (lambda s: {"images": [s["images"][0], s["images"][1].float() / 255, s["images"][2]]}, r"images\[1\] is torch.float32"),
    (lambda s: {"preds": [s["preds"][0], {**s["preds"][1], "conf": s["preds"][1]["conf"][None]}, s["preds"][2]]},
     r"preds\[1\]"),
    (lambda s: {"cameras": {"cam2world": s["cameras"]["cam2world"]}}, r"cameras lacks \['intrinsics'\]"),
])
def test_mismatched_inputs_are_named_before_anything_is_written(scene, tmp_path, change, message):
    with pytest.raises(export.ExportError, match=message):
        export_all(scene, tmp_path / "out", **change(scene))
    assert files_under(tmp_path) == []


def test_formats_may_be_one_string(scene, tmp_path):
    written = export_all(scene, tmp_path / "a", formats="ply")
    assert [p.name for p in written if p.name != export.MANIFEST] == ["points.ply"]
    written = export_all(scene, tmp_path / "b", formats="npz, ply")
    assert {p.name for p in written} == {"points.ply", "reconstruction.npz", export.MANIFEST}
    for formats in ("ply,obj", "", []):
        with pytest.raises(export.ExportError, match="unknown export formats|no export format"):
            export_all(scene, tmp_path / "c", formats=formats)


def test_all_nan_points_are_an_error_not_an_empty_file(scene, tmp_path):
    preds = [{**p, "pts3d_in_other_view": torch.full_like(p["pts3d_in_other_view"], float("nan"))}
             for p in scene["preds"]]
    with pytest.raises(export.ExportError, match="no view has a finite point"):
        export_all(scene, tmp_path / "out", formats=["ply", "npz"], preds=preds)
    assert files_under(tmp_path) == []


def test_a_view_without_finite_points_warns(scene, tmp_path):
    preds = list(scene["preds"])
    preds[1] = {**preds[1], "conf": torch.full_like(preds[1]["conf"], float("nan"))}
    with pytest.warns(UserWarning, match="view 1 has no finite point"):
        cloud = export.select_points(preds, scene["images"])
    assert set(np.unique(cloud.view)) == {0, 2}


def test_a_nan_camera_is_left_out_of_the_camera_formats_with_a_warning(scene, tmp_path):
    cam2world = scene["cameras"]["cam2world"].clone()
    cam2world[1] = float("nan")
    cameras = {**scene["cameras"], "cam2world": cam2world}
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"the camera of view 1 is not finite.*left out of scene.glb, sparse/0"):
        export_all(scene, out, cameras=cameras)
    meta = json.loads((out / "transforms.json").read_text())
    assert [f["file_path"] for f in meta["frames"]] == [f"images/{scene['names'][i]}" for i in (0, 2)]
    assert "NaN" not in (out / "transforms.json").read_text()
    model = pycolmap.Reconstruction(str(out / "sparse/0"))
    assert sorted(image.name for image in model.images.values()) == [scene["names"][0], scene["names"][2]]
    assert all(np.isfinite(p.xyz).all() and p.track.elements[0].image_id != 2 for p in model.points3D.values())
    for text in ("images.txt", "points3D.txt", "cameras.txt"):
        assert "nan" not in (out / "sparse/0" / text).read_text().lower()
    assert len(list((out / "images").iterdir())) == 3  # the view is still exported as an image


def test_a_non_rigid_camera_is_refused(scene, tmp_path):
    cam2world = scene["cameras"]["cam2world"].clone()
    cam2world[2, :3, :3] *= 1.5
    with pytest.raises(export.ExportError, match=r"cameras\['cam2world'\] of view 2 is not rigid"):
        export_all(scene, tmp_path / "out", cameras={**scene["cameras"], "cam2world": cam2world})


def test_points_behind_their_camera_stay_out_of_colmap(scene, tmp_path):
    """Such a point cannot be seen by the view it came from; COLMAP would get a reprojection error of ~1e154."""
    preds = [dict(p) for p in scene["preds"]]
    flipped = preds[1]["pts3d_in_other_view"].clone()
    centre = scene["cam2world"][1, :3, 3].float()
    flipped[:24] = 2 * centre - flipped[:24]  # the top half of view 1, mirrored through its camera centre
    preds[1]["pts3d_in_other_view"] = flipped
    cloud = export.select_points(preds, scene["images"], conf_percentile=0)
    with pytest.warns(UserWarning, match=r"lie behind the camera of their view.*left out of the COLMAP model"):
        export.write_colmap(tmp_path, scene["cameras"], scene["sizes"], scene["names"], cloud, max_points=10**6)
    model = pycolmap.Reconstruction(str(tmp_path))
    assert model.num_points3D() == len(cloud) - 24 * 64
    assert max(p.error for p in model.points3D.values()) < 1e-3
    with pytest.warns(UserWarning, match="lie behind the camera of their view"):  # export() says so too
        export_all({**scene, "preds": preds}, tmp_path / "out", formats=["colmap"])


def test_points_just_in_front_of_their_camera_plane_stay_out_of_colmap(scene, tmp_path):
    """In front, but projecting far outside the image: with random weights they gave reprojection errors > 1e3."""
    preds = [dict(p) for p in scene["preds"]]
    moved = preds[1]["pts3d_in_other_view"].clone()
    cam2world = scene["cam2world"][1].float()
    cam = (moved[:24] - cam2world[:3, 3]) @ cam2world[:3, :3]  # the top half of view 1 in its camera frame
    cam[..., 2] = 1e-4 * cam[..., 2].abs()  # pushed onto the camera plane, still in front of it
    moved[:24] = cam @ cam2world[:3, :3].T + cam2world[:3, 3]
    preds[1]["pts3d_in_other_view"] = moved
    cloud = export.select_points(preds, scene["images"], conf_percentile=0)
    with pytest.warns(UserWarning, match=r"project far outside its image"):
        export.write_colmap(tmp_path, scene["cameras"], scene["sizes"], scene["names"], cloud, max_points=10**6)
    model = pycolmap.Reconstruction(str(tmp_path))
    assert len(cloud) - 24 * 64 <= model.num_points3D() < len(cloud)
    assert max(p.error for p in model.points3D.values()) < 1e3


# ------------------------------------------------------------------------------ output folders
def test_a_folder_holding_a_previous_export_is_refused_unless_overwrite(scene, tmp_path):
    out = tmp_path / "out"
    export_all(scene, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(export.ExportError, match=r"holds a previous export.*overwrite=True.*--overwrite"):
        export_all(scene, out, formats=["ply"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_overwrite_replaces_the_whole_set(scene, tmp_path):
    """A second export with fewer views and formats leaves nothing of the first: no stale images or files."""
    out = tmp_path / "out"
    export_all(scene, out)
    two = {"preds": scene["preds"][:2], "images": scene["images"][:2], "names": ["00000_new.png", "00001_new.png"],
           "cameras": {k: v[:2] for k, v in scene["cameras"].items()}}
    written = export.export(out, ["nerfstudio"], **two, overwrite=True)
    assert files_under(out) == ["fast3r.json", "images", "images/00000_new.png", "images/00001_new.png",
                                "transforms.json"]
    assert sorted(written) == sorted(out / name for name in ("images", "transforms.json", "fast3r.json"))
    manifest = json.loads((out / "fast3r.json").read_text())
    assert manifest["files"] == ["images", "transforms.json"] and manifest["views"] == 2


def test_foreign_files_are_never_replaced(scene, tmp_path):
    """A folder holding files export did not write (say, the photos themselves) is refused, --overwrite or not."""
    out = tmp_path / "scene"
    (out / "images").mkdir(parents=True)
    (out / "images" / "IMG_0001.jpg").write_bytes(b"a photo")
    for overwrite in (False, True):
        with pytest.raises(export.ExportError, match=r"holds files that fast3r did not write \(images\)"):
            export_all(scene, out, overwrite=overwrite)
    assert files_under(out) == ["images", "images/IMG_0001.jpg"]
    (out / ".DS_Store").write_bytes(b"finder")  # hidden files are neither counted nor touched
    (out / "images" / "IMG_0001.jpg").unlink()
    (out / "images").rmdir()
    export_all(scene, out, formats=["ply"])
    assert (out / ".DS_Store").read_bytes() == b"finder"


def test_an_interrupted_export_leaves_the_folder_as_it_was(scene, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_all(scene, out, formats=["ply", "npz"])
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_nerfstudio", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_all(scene, out, overwrite=True)
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(KeyboardInterrupt):
        export_all(scene, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_failed_swap_puts_the_previous_set_back(scene, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_all(scene, out, formats=["ply", "npz"])
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    replace, calls = export.os.replace, []

    def fail_on_the_fourth_move(src, dst):
        calls.append(dst)
        if len(calls) == 4:
            raise OSError("disk gone")
        replace(src, dst)

    monkeypatch.setattr(export.os, "replace", fail_on_the_fourth_move)
    with pytest.raises(OSError, match="disk gone"):
        export.export(out, ["glb"], preds=scene["preds"], images=scene["images"], names=scene["names"],
                      cameras=scene["cameras"], overwrite=True)
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
