"""COLMAP workspaces and the folder format: round trips against the renderer, and every kind of bad data named."""

import json

import numpy as np
import pytest
from PIL import Image

from fast3r.train.data import DataError, build_dataset, load_scene, save_scene, synthetic_scene
from fast3r.train.data.sampling import world_points

pycolmap = pytest.importorskip("pycolmap")

SIZE = (36, 48)


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene(4, views=4, size=SIZE)


@pytest.fixture
def folder(scene, tmp_path):
    return save_scene(scene, tmp_path / "folder", "folder")


@pytest.fixture
def colmap(scene, tmp_path):
    return save_scene(scene, tmp_path / "colmap", "colmap")


@pytest.mark.parametrize("fmt", ["colmap", "folder"])
def test_round_trip_gives_the_renderers_world_points(scene, tmp_path, fmt):
    """COLMAP (pycolmap sparse model + binary depth maps) and folder: world points within 1e-5 of the renderer's."""
    loaded = load_scene(save_scene(scene, tmp_path / fmt, fmt), fmt)
    assert len(loaded) == len(scene) and loaded.name == str(tmp_path / fmt)
    assert load_scene(tmp_path / fmt).cameras[0].name == loaded.cameras[0].name  # format detected
    for i, view in enumerate(loaded.views):
        truth = scene.reader.render(i)
        assert view["name"] == scene.cameras[i].name
        assert np.array_equal(view["image"], truth.image) and view["depth"].dtype == np.float32
        points = world_points(view["depth"], view["intrinsics"], view["cam2world"])
        assert np.abs(points - truth.points).max() < 1e-5
        assert view["intrinsics"].dtype == np.float64 and view["cam2world"].dtype == np.float64


def test_colmap_principal_point_is_shifted_by_half_a_pixel(scene, colmap):
    model = pycolmap.Reconstruction(str(colmap / "sparse"))
    camera = next(iter(model.cameras.values()))
    assert camera.model.name == "PINHOLE"
    assert camera.principal_point_x == pytest.approx(scene.cameras[0].intrinsics[0, 2] + 0.5)


def test_png_depth_is_scaled_and_zero_is_unknown(scene, tmp_path):
    depth = scene.views[0]["depth"].copy()
    path = save_scene(scene, tmp_path / "png", "folder", depth_format="png", depth_scale=1e-3)
    loaded = load_scene(path, "folder").views[0]["depth"]
    assert np.abs(loaded - depth).max() <= 0.5e-3 + 1e-6
    meta = json.loads((path / "cameras.json").read_text())
    assert meta["depth_scale"] == 1e-3 and meta["frames"][0]["depth"] == "00000.png"
    with pytest.raises(ValueError, match="16-bit PNG"):
        save_scene(scene, tmp_path / "coarse", "folder", depth_format="png", depth_scale=1e-5)
    assert not (tmp_path / "coarse").exists()  # nothing half-written


def test_save_refuses_a_non_empty_directory(scene, folder):
    with pytest.raises(FileExistsError):
        save_scene(scene, folder, "folder")


# ------------------------------------------------------------------------------ bad data, folder
def edit_frames(folder, change):
    meta_file = folder / "cameras.json"
    meta = json.loads(meta_file.read_text())
    change(meta["frames"])
    meta_file.write_text(json.dumps(meta))


def test_image_without_depth_is_named(folder):
    (folder / "depth" / "00002.npy").unlink()
    with pytest.raises(DataError, match=r"00002.*image without depth"):
        load_scene(folder, "folder")


def test_image_without_depth_is_named_without_a_depth_field(folder):
    edit_frames(folder, lambda frames: [f.pop("depth") for f in frames])
    assert len(load_scene(folder, "folder")) == 4  # depth/<stem>.npy by default
    (folder / "depth" / "00001.npy").unlink()
    with pytest.raises(DataError, match=r"frames\[1\] \(00001.png\): image without depth"):
        load_scene(folder, "folder")


def test_depth_of_another_size_is_named(folder):
    np.save(folder / "depth" / "00003.npy", np.ones((SIZE[0] - 1, SIZE[1]), np.float32))
    with pytest.raises(DataError, match=r"00003.npy: depth map is 48x35 but image .*00003.png is 48x36"):
        load_scene(folder, "folder")


def test_depth_that_changes_size_after_loading_is_named(folder):
    scene = load_scene(folder, "folder")
    np.save(folder / "depth" / "00000.npy", np.ones((5, 5), np.float32))
    with pytest.raises(DataError, match=r"00000.npy: depth map is 5x5 but its image 00000.png is 48x36"):
        scene.views[0]


@pytest.mark.parametrize("pose, message", [
    (lambda p: np.diag([2.0, 2, 2, 1]) @ p, "not rigid"),
    (lambda p: p @ np.diag([1.0, 1, -1, 1]), "not rigid"),  # a mirror: det -1
    (lambda p: np.where(np.eye(4) == 1, p, p + 0.01), "not rigid"),
    (lambda p: p * np.where(np.arange(16).reshape(4, 4) == 3, np.nan, 1), "non-finite"),
])
def test_bad_poses_are_named(folder, pose, message):
    edit_frames(folder, lambda frames: frames[1].update(
        cam2world=[[float(x) if np.isfinite(x) else "NaN" for x in row] for row in pose(np.array(frames[1]["cam2world"]))]))
    text = (folder / "cameras.json").read_text().replace('"NaN"', "NaN")
    (folder / "cameras.json").write_text(text)
    with pytest.raises(DataError, match=rf"frames\[1\] \(00001.png\): field 'cam2world'.*{message}"):
        load_scene(folder, "folder")


def test_bad_intrinsics_and_fields_are_named(folder):
    edit_frames(folder, lambda frames: frames[0].update(fx=-3.0))
    with pytest.raises(DataError, match=r"frames\[0\].*fx, fy, cx, cy.*focals > 0"):
        load_scene(folder, "folder")
    edit_frames(folder, lambda frames: frames[0].pop("cy"))
    with pytest.raises(DataError, match=r"frames\[0\]: missing field\(s\) \['cy'\]"):
        load_scene(folder, "folder")
    (folder / "cameras.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_scene(folder, "folder")


def test_png_depth_without_scale_and_8_bit_png_are_named(scene, tmp_path):
    path = save_scene(scene, tmp_path / "png", "folder", depth_format="png")
    meta = json.loads((path / "cameras.json").read_text())
    (path / "cameras.json").write_text(json.dumps({"frames": meta["frames"]}))
    with pytest.raises(DataError, match="'depth_scale' must be a number > 0"):
        load_scene(path, "folder")
    (path / "cameras.json").write_text(json.dumps(meta))
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(path / "depth" / "00000.png")
    with pytest.raises(DataError, match="00000.png: depth PNG has mode L; expected a 16-bit"):
        load_scene(path, "folder")


def test_nan_depth_is_masked_and_counted(folder):
    depth = np.load(folder / "depth" / "00000.npy")
    depth[:5, :7] = np.nan
    depth[10, 10] = -1.0
    np.save(folder / "depth" / "00000.npy", depth)
    dataset = build_dataset([{"format": "folder", "path": str(folder), "samples": 6}], views=4, size=224,
                            split="val")
    sample = dataset[0]
    first = sample["names"].index("00000.png")
    others = [i for i in range(4) if i != first]
    # val crop of a 48x36 view: the square window around the centre, enlarged to 224; NaN and -1 pixels masked
    assert sample["masked_pixels"][first] > 0 and (sample["masked_pixels"][others] == 0).all()
    assert torch_isfinite(sample["pts3d"]) and not sample["valid_mask"][first].all()
    assert sample["valid_mask"][others].all()


def torch_isfinite(x):
    return bool(x.isfinite().all())


def test_fewer_views_than_asked_is_named(folder):
    with pytest.raises(DataError, match=r"folder: has 4 views, fewer than the 5 a sample asks for"):
        build_dataset([{"format": "folder", "path": str(folder)}], views=5, size=224)


def test_missing_or_unknown_scene_is_named(tmp_path):
    with pytest.raises(DataError, match="neither a folder-format scene"):
        load_scene(tmp_path)
    with pytest.raises(DataError, match="no cameras.json"):
        load_scene(tmp_path, "folder")
    with pytest.raises(DataError, match="no sparse model"):
        load_scene(tmp_path, "colmap")
    with pytest.raises(ValueError, match="format='ply'"):
        load_scene(tmp_path, "ply")


# ------------------------------------------------------------------------------ bad data, COLMAP
def test_colmap_image_without_depth_is_named(colmap):
    (colmap / "stereo" / "depth_maps" / "00001.png.geometric.bin").unlink()
    with pytest.raises(DataError, match=r"00001.png: image without depth: .*00001.png.geometric.bin"):
        load_scene(colmap, "colmap")


def test_colmap_photometric_maps_are_used_when_every_image_has_one(scene, tmp_path):
    path = save_scene(scene, tmp_path / "photometric", "colmap", kind="photometric")
    assert np.array_equal(load_scene(path, "colmap").views[2]["depth"], scene.views[2]["depth"])


def test_colmap_depth_of_another_size_is_named(colmap):
    depth = pycolmap.DepthMap.from_array(np.ones((SIZE[0] // 2, SIZE[1] // 2), np.float32), 1.0, 1.0)
    depth.write(str(colmap / "stereo" / "depth_maps" / "00002.png.geometric.bin"))
    with pytest.raises(DataError, match=r"00002.png.geometric.bin: depth map is 24x18 but image .* is 48x36.*"
                                        r"max_image_size"):
        load_scene(colmap, "colmap")


def test_colmap_non_pinhole_camera_is_refused_with_the_undistort_command(colmap):
    model = pycolmap.Reconstruction(str(colmap / "sparse"))
    camera = model.cameras[1]
    distorted = pycolmap.Camera(model="OPENCV", width=camera.width, height=camera.height, camera_id=1,
                                params=[*camera.params, 0.01, 0.0, 0.0, 0.0])
    model.cameras[1] = distorted
    model.write_binary(str(colmap / "sparse"))
    with pytest.raises(DataError, match=r"(?s)camera model OPENCV is not a pinhole.*colmap image_undistorter"):
        load_scene(colmap, "colmap")


def test_colmap_image_of_another_size_is_named(colmap):
    Image.fromarray(np.zeros((SIZE[0], SIZE[1] + 2, 3), np.uint8)).save(colmap / "images" / "00003.png")
    with pytest.raises(DataError, match=r"00003.png: image is 50x36 but its camera 1 .* is 48x36"):
        load_scene(colmap, "colmap")


def test_colmap_unreadable_depth_map_is_named(colmap):
    scene = load_scene(colmap, "colmap")
    (colmap / "stereo" / "depth_maps" / "00000.png.geometric.bin").write_bytes(b"48&36&1&" + b"\0" * 10)
    with pytest.raises(DataError, match=r"00000.png.geometric.bin: pycolmap cannot read the depth map"):
        scene.views[0]


def test_colmap_non_finite_pose_is_named(colmap):
    model = pycolmap.Reconstruction(str(colmap / "sparse"))
    frame = model.frames[model.images[2].frame_id]
    rig_from_world = frame.rig_from_world.matrix()
    rig_from_world[0, 3] = np.nan
    frame.rig_from_world = pycolmap.Rigid3d(rig_from_world)
    model.write_binary(str(colmap / "sparse"))
    with pytest.raises(DataError, match=r"image 00001.png \(camera 1\): the pose \(cam_from_world\) has non-finite"):
        load_scene(colmap, "colmap")
