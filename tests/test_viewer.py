"""``fast3r view``: reading a scene folder, the point budget, the controls, bad input, and a real headless browser."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from scenes import synthetic_scene

from fast3r import cli, export
from fast3r.cameras import intrinsics_matrices
from fast3r.viewer import command as viewing
from fast3r.viewer.scene import (
    NotAReconstructionError,
    draw_pixels,
    global_points,
    local_points,
    open_scene,
)

viser = pytest.importorskip("viser")  # the [view] extra, in [dev]: installed in CI
from fast3r.viewer import frusta
from fast3r.viewer.app import SceneViewer, vertical_fov

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(48, 64)] * 5 + [(64, 48)]  # one portrait view: the npz pads it to 64 x 64 with NaN
MAGENTA = (255, 0, 255)


def write_scene(directory: Path, seed: int, *, sizes=SIZES, colour=None, nan_view: int | None = None) -> dict:
    """A reconstruction folder as `fast3r reconstruct` writes it (export.write_npz) from exact synthetic pointmaps."""
    scene = synthetic_scene(sizes=sizes, seed=seed)
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    if colour is not None:
        images = [torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, h, w).contiguous()
                  for h, w in sizes]
    if nan_view is not None:
        scene["preds"][nan_view]["pts3d_in_other_view"][:4] = float("nan")  # 4 rows without points
    cameras = {"cam2world": scene["cam2world"], "intrinsics": intrinsics_matrices(scene["focals"], sizes)}
    directory.mkdir(parents=True, exist_ok=True)
    export.write_npz(directory / "reconstruction.npz", scene["preds"], cameras, images,
                     [f"{i:05d}_view.png" for i in range(len(sizes))])
    return {**scene, "images": images}


@pytest.fixture
def scene_dir(tmp_path, fresh_seed):
    write_scene(tmp_path / "scene", fresh_seed)
    return tmp_path / "scene"


# ------------------------------------------------------------------------------ reading and the budget
def test_open_scene_maps_the_npz_without_reading_it(scene_dir):
    scene = open_scene(scene_dir)
    with np.load(scene_dir / "reconstruction.npz") as npz:
        for key in ("pts3d", "conf", "images", "pts3d_local", "conf_local"):
            assert isinstance(getattr(scene, key), np.memmap), key
            np.testing.assert_array_equal(getattr(scene, key), npz[key])
        np.testing.assert_array_equal(scene.sizes, npz["image_sizes"])
        assert scene.names == list(npz["names"])
    assert scene.n_views == 6 and scene.n_pixels == 6 * 48 * 64 and scene.has_local


@pytest.mark.parametrize("budget", [1, 997, 5000, 10**9])
def test_draw_pixels_is_a_uniform_budget_within_each_view(scene_dir, budget):
    scene = open_scene(scene_dir)
    pixels = draw_pixels(scene, budget, seed=3)
    total = scene.n_pixels
    assert len(pixels.view) <= max(budget, scene.n_views) and len(pixels.view) >= min(budget, total) - scene.n_views
    width = scene.conf.shape[2]
    for view, (h, w) in enumerate(scene.sizes):
        mine = pixels.index[pixels.view == view]
        y, x = mine // width, mine % width
        assert (y < h).all() and (x < w).all(), "a pixel in the padding"
        assert len(np.unique(mine)) == len(mine), "a pixel drawn twice"
        assert abs(len(mine) - min(h * w, budget * h * w / total)) <= 1
    assert (np.diff(pixels.view * width * width + pixels.index) > 0).all(), "not in file order"


def test_global_points_are_the_maps_at_the_drawn_pixels_with_per_view_percentiles(tmp_path, fresh_seed):
    write_scene(tmp_path / "s", fresh_seed, nan_view=2)
    scene = open_scene(tmp_path / "s")
    pixels = draw_pixels(scene, 6000, seed=fresh_seed)
    points = global_points(scene, pixels)
    with np.load(tmp_path / "s" / "reconstruction.npz") as npz:
        pts, conf, images = npz["pts3d"], npz["conf"], npz["images"]
    width = pts.shape[2]
    flat_pts, flat_conf = pts.reshape(6, -1, 3), conf.reshape(6, -1)
    finite = np.isfinite(flat_pts[pixels.view, pixels.index]).all(-1)
    assert len(points) == finite.sum() and finite.sum() < len(pixels.view), "the NaN rows of view 2 are dropped"
    kept = pixels.index[finite]
    np.testing.assert_array_equal(points.xyz, flat_pts[points.view, kept])
    np.testing.assert_array_equal(points.rgb, images.reshape(6, -1, 3)[points.view, kept])
    y = kept // width
    assert not ((points.view == 2) & (y < 4)).any()
    for view in range(6):
        mine = points.view == view
        c, p = flat_conf[view, kept[mine]], points.percentile[mine].astype(int)
        order = np.argsort(c)
        assert (np.diff(p[order]) >= 0).all(), "percentile does not follow confidence"
        for threshold in (10, 50, 90):  # the slider keeps (100 - P)% of each view's points
            assert abs((p >= threshold).mean() - (100 - threshold) / 100) <= 1 / mine.sum() + 1e-9


def test_local_points_are_fitted_onto_the_global_ones(scene_dir, fresh_seed):
    # Exact synthetic pointmaps: the local map is the camera-frame one at a random scale, so the
    # fitted similarity puts every local point onto its global point.
    scene = open_scene(scene_dir)
    pixels = draw_pixels(scene, 4000, seed=fresh_seed)
    world, local = global_points(scene, pixels), local_points(scene, pixels)
    np.testing.assert_array_equal(world.view, local.view)
    scale = np.abs(world.xyz).max()
    np.testing.assert_allclose(local.xyz, world.xyz, atol=1e-4 * scale, rtol=0)
    assert not np.array_equal(local.percentile, world.percentile), "local percentiles must rank conf_local"


# ------------------------------------------------------------------------------ bad input
def _npz_with(path: Path, **arrays) -> None:
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "reconstruction.npz", **arrays)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("empty", "it is empty"),
    ("ply_only", "holds points.ply"),
    ("corrupt", "not a readable npz"),
    ("keys", "lacks conf, images"),
    ("shapes", "pts3d has shape (2, 8, 8, 3), expected (3, 8, 8, 3) (N views of H x W)"),
])
def test_a_folder_that_is_not_a_reconstruction_is_named(tmp_path, case, message, capsys):
    folder = tmp_path / "scene"
    if case == "file":
        folder.write_text("x")
    elif case == "empty":
        folder.mkdir()
    elif case == "ply_only":
        folder.mkdir()
        (folder / "points.ply").write_bytes(b"ply\n")
    elif case == "corrupt":
        folder.mkdir()
        (folder / "reconstruction.npz").write_bytes(os.urandom(2000))
    elif case == "keys":
        _npz_with(folder, pts3d=np.random.rand(2, 8, 8, 3))
    elif case == "shapes":
        _npz_with(folder, pts3d=np.random.rand(2, 8, 8, 3), conf=np.random.rand(3, 8, 8),
                  images=np.zeros((2, 8, 8, 3), np.uint8), image_sizes=np.full((2, 2), 8),
                  cam2world=np.tile(np.eye(4), (2, 1, 1)), intrinsics=np.tile(np.eye(3), (2, 1, 1)))
    with pytest.raises(NotAReconstructionError, match=re.escape(message)):
        open_scene(folder)
    assert cli.main(["view", str(folder), "--port", "0"]) == 2
    assert f"fast3r view: error: {folder}" in capsys.readouterr().err


def test_the_extra_not_installed_is_named(scene_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "viser", None)  # import viser now raises ImportError
    with pytest.raises(viewing.ViewerNotInstalledError, match=r'pip install -e "\.\[view\]"'):
        viewing.require_viser()
    assert cli.main(["view", str(scene_dir)]) == 2
    assert "the viewer needs viser, from the [view] extra" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["reconstruct", "x.mp4", "--out", "o", "--random-weights", "--view"])
    assert cli.main(["reconstruct", "x.mp4", "--out", "o", "--random-weights", "--view"]) == 2
    assert viewing.check_before_reconstruct(args) == 2


def test_import_fast3r_does_not_need_viser():
    code = "import sys, fast3r, fast3r.cli, fast3r.viewer; assert 'viser' not in sys.modules, 'viser imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_reconstruct_view_needs_the_npz_and_serves_out_after_the_run(tmp_path, monkeypatch, capsys):
    argv = ["reconstruct", "x.mp4", "--out", str(tmp_path), "--random-weights", "--view", "--export", "ply,glb"]
    assert cli.main(argv) == 2
    assert "--view reads reconstruction.npz: add npz to --export" in capsys.readouterr().err
    served = []
    monkeypatch.setattr(cli, "find_sources", lambda inputs: [])
    monkeypatch.setattr(cli, "require_packages", lambda args, has_video: None)
    monkeypatch.setattr(cli, "count_work", lambda sources: 0)
    monkeypatch.setattr(cli, "reconstruct", lambda args, sources, work: cli.Summary())
    monkeypatch.setattr(cli, "print_summary", lambda summary, out: None)
    monkeypatch.setattr(viewing, "run", lambda args: served.append(args) or 0)
    assert cli.main(argv[:-2] + ["--port", "9123", "--host", "127.0.0.1", "--max-points", "5e4"]) == 0
    assert [(a.scene, a.port, a.host, a.max_points) for a in served] == [(tmp_path, 9123, "127.0.0.1", 50_000)]


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_port_in_use_is_an_error_when_asked_for_and_moves_on_by_default(scene_dir, monkeypatch):
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(viewing.PortInUseError, match=f"port {port} on 127.0.0.1 is in use.*--port 0"):
            viewing.start_server("127.0.0.1", port)
        # Without --port: viser's own behaviour, the next free port, and the printed line says so.
        monkeypatch.setattr(viewing, "DEFAULT_PORT", port)
        out, stop = io.StringIO(), threading.Event()
        thread = threading.Thread(target=viewing.serve, args=(scene_dir,),
                                  kwargs={"host": "127.0.0.1", "port": None, "stop": stop, "out": out,
                                          "first_frame_wait_s": 0})
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while "ready in" not in out.getvalue() and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(10)
    first = out.getvalue().splitlines()[0]
    served = int(first.split()[2].rsplit(":", 1)[1])
    assert served != port and f"(port {port} is taken)" in first, first


def test_a_host_that_is_not_this_machine_is_named():
    with pytest.raises(viewing.BadHostError, match="--host 192.0.2.1: no address of this machine"):
        viewing.check_host("192.0.2.1")  # TEST-NET-1: never local
    assert viewing.url("0.0.0.0", 8080) == f"http://{socket.gethostname()}:8080"
    assert viewing.url("::1", 8080) == "http://[::1]:8080"


# ------------------------------------------------------------------------------ the controls, without a browser
@pytest.fixture
def viewer(scene_dir):
    server = viewing.start_server("127.0.0.1", 0)
    viewer = SceneViewer(server, open_scene(scene_dir), max_points=8000)
    viewer.load(first_frame_wait_s=0)  # no browser here
    yield viewer
    server.stop()


def _clouds(viewer, kind):
    return viewer._clouds[kind]


def test_the_percentile_slider_switches_clouds_and_views_resend_points(viewer):
    points = viewer._points["global"]
    assert viewer.gui_percentile.value == 10 and len(viewer.frusta) == 2  # all cameras: lines and images
    for percentile in (10, 63, 0, 99):
        viewer.set_percentile(percentile)
        shown = [p for p, cloud in enumerate(_clouds(viewer, "global")) if cloud.visible]
        assert shown == list(range(percentile, 100))
        assert viewer.shown_points() == (points.percentile >= percentile).sum()
    viewer.set_percentile(0)
    viewer.set_views(1, 4, hidden={2})
    sent = np.concatenate([cloud.points for cloud in _clouds(viewer, "global")])
    expected = points.xyz[np.isin(points.view, [1, 3, 4])]
    assert len(sent) == len(expected) == viewer.shown_points()
    np.testing.assert_array_equal(np.unique(sent, axis=0), np.unique(expected, axis=0))
    viewer.all_views()
    assert viewer.shown_points() == len(points)


def test_the_local_map_is_read_on_first_use_and_replaces_the_global_clouds(viewer):
    assert "local" not in viewer._clouds
    viewer.set_map("local")
    assert not any(cloud.visible for cloud in _clouds(viewer, "global"))
    assert [p for p, c in enumerate(_clouds(viewer, "local")) if c.visible] == list(range(10, 100))
    viewer.set_views(0, 0)
    viewer.set_map("global")  # hidden views reach the other map too
    assert viewer.shown_points() == ((viewer._points["global"].view == 0)
                                     & (viewer._points["global"].percentile >= 10)).sum()


def test_frusta_corners_project_to_the_image_corners_and_atlas_holds_the_thumbnails(viewer):
    scene, corners = viewer.scene, viewer.corners
    np.testing.assert_array_equal(corners[:, 0], scene.cam2world[:, :3, 3])
    for i, (h, w) in enumerate(scene.sizes):
        cam = (corners[i, 1:] - scene.cam2world[i, :3, 3]) @ scene.cam2world[i, :3, :3]  # back to camera axes
        pixels = cam[:, :2] / cam[:, 2:] * scene.intrinsics[i, [0, 1], [0, 1]] + scene.intrinsics[i, :2, 2]
        np.testing.assert_allclose(pixels, [[0, 0], [w, 0], [w, h], [0, h]], atol=1e-6)
    assert frusta.wireframes(corners).shape == (6 * 8, 2, 3)
    image, boxes = frusta.atlas(scene, 16)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        np.testing.assert_array_equal(image[y0:y1, x0:x1], scene.images[i, : scene.sizes[i][0] : 4, : scene.sizes[i][1] : 4])
    mesh = frusta.image_mesh(corners, image, boxes)
    assert mesh.faces.shape == (12, 3) and mesh.visual.uv.shape == (24, 2)


def test_a_ray_through_a_camera_image_picks_that_camera(viewer):
    corners = viewer.corners
    for i in range(len(corners)):
        centre = corners[i, 1:].mean(0)
        direction = centre - corners[i, 0]
        direction /= np.linalg.norm(direction)
        assert frusta.pick(corners, centre - 1e-4 * direction, direction) == i
    assert frusta.pick(corners, corners[0, 0], -(corners[0, 1:].mean(0) - corners[0, 0])) in (None, *range(1, 6))


def test_clicking_a_camera_selects_it_and_looks_through_it(viewer):
    camera = types.SimpleNamespace(client=types.SimpleNamespace(atomic=nullcontext))
    centre = viewer.corners[5, 1:].mean(0)
    direction = (centre - viewer.corners[5, 0]) / np.linalg.norm(centre - viewer.corners[5, 0])
    viewer._clicked(types.SimpleNamespace(ray_origin=tuple(centre - 1e-4 * direction), ray_direction=tuple(direction),
                                          client=types.SimpleNamespace(camera=camera)))
    assert viewer.selected == 5
    c2w = viewer.scene.cam2world[5]
    np.testing.assert_allclose(viser.transforms.SO3(camera.wxyz).as_matrix(), c2w[:3, :3], atol=1e-9)
    np.testing.assert_array_equal(camera.position, c2w[:3, 3])
    h = viewer.scene.sizes[5][0]
    assert camera.fov == pytest.approx(2 * np.arctan2(h / 2, viewer.scene.intrinsics[5, 1, 1]))
    assert vertical_fov(viewer.scene.intrinsics[5], int(h)) == camera.fov
    viewer.select(5)
    assert "view 5" in viewer.gui_selected.content and "00005_view.png" in viewer.gui_selected.content
    viewer._show_selected(False)
    assert viewer.hidden_views == {5} and not viewer.shown_views[5]
    viewer.only_selected()
    assert viewer.shown_views.tolist() == [False] * 5 + [True]


# ------------------------------------------------------------------------------ a real browser
def test_the_page_draws_the_points_in_headless_chromium(tmp_path, fresh_seed):
    """Serve a magenta scene with the command itself, open it in Chromium, and count the points' pixels."""
    from browser import VIEWPORT, chromium_page, find_chromium, wait_for_pixels

    if find_chromium() is None or _no_playwright():
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium and Playwright: .ci/run installs them")
        pytest.skip("no Chromium (apt-get install -y chromium) or no playwright (pip install -e '.[dev]')")
    write_scene(tmp_path / "scene", fresh_seed, colour=MAGENTA)
    process = subprocess.Popen([sys.executable, "-m", "fast3r.cli", "view", str(tmp_path / "scene"), "--port", "0"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        first = process.stdout.readline()
        assert first.startswith("fast3r view: http://localhost:"), first
        viewport = VIEWPORT["width"] * VIEWPORT["height"]
        with chromium_page() as page:
            page.goto(first.split()[2], wait_until="commit")
            page.wait_for_function("() => document.body.innerText.includes('6 cameras')", timeout=60_000)
            _, drawn, png = wait_for_pixels(page, lambda n: n >= 0.02 * viewport, timeout=60)
            (tmp_path / "page.png").write_bytes(png)  # kept for a look when it fails
            assert "18,432" in page.inner_text("body")  # the status: 6 views x 48 x 64 points, all drawn
            thumb = page.locator('[role="slider"][aria-valuemax="99"]').first  # the confidence percentile
            thumb.focus()
            page.keyboard.press("End")  # 99: the top 1% of each view
            _, fewer, _ = wait_for_pixels(page, lambda n: n < 0.5 * drawn, timeout=60)
        assert fewer > 0, "no point left at the 99th percentile"
    finally:
        process.terminate()
        process.wait(10)


def _no_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return True
    return False
