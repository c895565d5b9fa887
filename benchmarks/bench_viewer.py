"""``fast3r view`` at 1500 views: command start to the first frame in a browser, and how fast the slider answers.

    python benchmarks/bench_viewer.py --out benchmarks/results/viewer_cpu_1500.json [--views 1500] [--size 224]
        [--scene /tmp/fast3r_view_1500] [--budgets 1000000 200000] [--repeats 2]

The scene: the folder ``fast3r reconstruct`` writes, reduced to what the viewer reads, a
reconstruction.npz of --views synthetic views at --size (2.9 GB at 1500 x 224, as the
export writes it: stored npz members, the same keys and shapes), streamed to disk so that
the benchmark needs little memory; cameras on a spiral around a unit sphere, each pixel's
point on the sphere, coloured magenta (the colour the browser check counts). Kept between
runs (--scene).

Per budget (--max-points) and run: a headless Chromium (Debian's, via Playwright) is
started first, as a user's browser is already open; the clock starts, ``python -m
fast3r.cli view SCENE --port 0`` is launched, the page is opened when the command prints
its URL, and screenshots are taken until the points are drawn (>= 2% of the viewport in
the point colour): that is the first frame, late by up to one screenshot (each takes
0.1-4 s in this browser while it draws). Runs are "warm" (npz in the page cache, as
right after ``fast3r reconstruct --view``) and, once per budget, "cold" (the npz dropped
from the page cache first with posix_fadvise). Then the slider: the confidence percentile
is moved by the keyboard (10 -> 99 -> 10) and screenshots are taken until the point pixels
change; and in this process, without a browser, the server's side of the same moves (the
callback until its messages are queued) and of hiding a view (which re-sends the points).

The browser here renders with SwiftShader (WebGL on the CPU, no GPU on this machine):
its cost per frame is measured too (a bare WebGL page drawing N points) so that the
browser's share of each time is known, and so is the first frame of a bare viser page
holding one cloud of the same number of points and nothing else (goto -> drawn): the floor
under the viewer. JSON first (--out); a table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import Error as PlaywrightError

from fast3r.viewer.scene import NPZ
from tests.browser import chromium_page, wait_for_pixels

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_FRAME_FRACTION = 0.02  # of the viewport's pixels in the point colour: the points are drawn
CHUNK_VIEWS = 50
# The "cameras" checkbox: the first of the panel's own (viser's settings use mantine ids).
CAMERAS_OFF = "() => Array.from(document.querySelectorAll('input[type=checkbox]')).filter(e => !e.id.startsWith('mantine'))[0].click()"
FRAME_TIMEOUT_S = 90  # a frame the software renderer has not drawn by then is recorded as an error


# ------------------------------------------------------------------------------ the scene
def write_scene(directory: Path, n_views: int, size: int, seed: int = 0) -> Path:
    """A reconstruction.npz as export.write_npz lays it out, streamed member by member in chunks of views."""
    path = directory / NPZ
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    focal = 0.8 * size
    cam2world = spiral_cameras(n_views)
    world0 = np.linalg.inv(cam2world[0])  # the world frame is view 0's camera
    cam2world = world0 @ cam2world
    centre = world0[:3, 3]  # the sphere's centre in view 0's frame
    local_scale = rng.uniform(0.5, 2.0, n_views)

    def chunks(kind):
        for start in range(0, n_views, CHUNK_VIEWS):
            views = np.arange(start, min(start + CHUNK_VIEWS, n_views))
            cam, world = sphere_points(cam2world[views], centre, focal, size)
            if kind == "pts3d":
                yield world.astype(np.float32)
            elif kind == "pts3d_local":
                yield (cam * local_scale[views, None, None, None]).astype(np.float32)
            elif kind == "depth":
                yield (cam[..., 2] * local_scale[views, None, None]).astype(np.float32)
            elif kind in ("conf", "conf_local"):
                yield rng.uniform(1.0, 20.0, (len(views), size, size)).astype(np.float32)
            else:  # images: magenta with a darker checker pattern of the sphere's longitude and latitude
                rel = world - centre
                lon = np.arctan2(rel[..., 0], rel[..., 2])
                lat = np.arcsin(np.clip(rel[..., 1], -1, 1))
                checker = ((np.floor(lon * 6 / math.pi) + np.floor(lat * 6 / math.pi)) % 2).astype(np.uint8)
                image = np.empty((*checker.shape, 3), dtype=np.uint8)
                image[..., 0], image[..., 1], image[..., 2] = 255 - 40 * checker, 30 * checker, 255 - 40 * checker
                yield image

    shapes = {"pts3d": (n_views, size, size, 3), "conf": (n_views, size, size),
              "pts3d_local": (n_views, size, size, 3), "conf_local": (n_views, size, size),
              "depth": (n_views, size, size), "images": (n_views, size, size, 3)}
    intrinsics = np.tile(np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]]), (n_views, 1, 1))
    small = {"image_sizes": np.full((n_views, 2), size, dtype=np.int64),
             "names": np.array([f"{i:05d}_synthetic.png" for i in range(n_views)]),
             "cam2world": cam2world, "intrinsics": intrinsics}
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, shape in shapes.items():
            dtype = np.uint8 if key == "images" else np.float32
            with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                        "shape": shape})
                for chunk in chunks(key):
                    f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        for key, value in small.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value)
    os.replace(tmp, path)
    return path


def spiral_cameras(n_views: int, radius: float = 1.6) -> np.ndarray:
    """Camera-to-world (N, 4, 4), OpenCV axes: a spiral over the sphere (Fibonacci), each looking at its centre."""
    i = np.arange(n_views) + 0.5
    z = 1 - 2 * i / n_views * 0.8 - 0.1  # stay off the poles
    phi = i * math.pi * (3 - math.sqrt(5))
    centres = radius * np.stack([np.sqrt(1 - z**2) * np.cos(phi), z, np.sqrt(1 - z**2) * np.sin(phi)], -1)
    forward = -centres / np.linalg.norm(centres, axis=-1, keepdims=True)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    down = np.cross(forward, right)
    c2w = np.tile(np.eye(4), (n_views, 1, 1))
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, forward, centres
    return c2w


def sphere_points(cam2world: np.ndarray, centre: np.ndarray, focal: float, size: int):
    """Each pixel's ray hits the unit sphere (the cameras are close enough): (n, S, S, 3) camera and world points."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    rays = np.stack([(x - size / 2) / focal, (y - size / 2) / focal, np.ones_like(x)], -1)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    origin = cam2world[:, :3, 3]
    directions = np.einsum("nij,hwj->nhwi", cam2world[:, :3, :3], rays)
    oc = (origin - centre)[:, None, None]
    b = (directions * oc).sum(-1)
    c = (oc**2).sum(-1) - 1.0
    t = -b - np.sqrt(np.maximum(b**2 - c, 0.0))
    world = origin[:, None, None] + t[..., None] * directions
    cam = rays[None] * t[..., None]
    return cam, world


def check_scene(path: Path, n_views: int, size: int) -> None:
    """The streamed file is what np.load reads: every key, its shape, and finite points in the last view."""
    with np.load(path, mmap_mode="r") as npz:
        assert npz["cam2world"].shape == (n_views, 4, 4) and npz["image_sizes"].shape == (n_views, 2)
        assert set(npz.files) >= {"pts3d", "conf", "pts3d_local", "conf_local", "images", "image_sizes",
                                  "cam2world", "intrinsics", "names"}


def evict(path: Path) -> None:
    """Drop the file from the page cache (this file only): the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ browser runs
def browser_run(page, scene: Path, budget: int, *, viewport_pixels: int, slider: bool) -> dict:
    """One command start -> first frame; then (slider=True) the percentile slider moved by the keyboard."""
    lines: list[tuple[float, str]] = []
    url_seen = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "fast3r.cli", "view", str(scene), "--port", "0", "--max-points", str(budget)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})

    def read():
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
            if "http://" in line:
                url_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not url_seen.wait(60):
            raise RuntimeError(f"no URL from fast3r view: {lines}")
        url_s, url_line = next((t, text) for t, text in lines if "http://" in text)
        url = url_line.split()[2]
        page.goto(url, wait_until="commit")
        first_s, first_pixels, _ = wait_for_pixels(page, lambda n: n >= FIRST_FRAME_FRACTION * viewport_pixels,
                                                   timeout=FRAME_TIMEOUT_S, start=start)
        while not any("ready in" in text for _, text in lines):
            time.sleep(0.05)
        ready_s = next(t for t, text in lines if "ready in" in text)
        page.wait_for_function("() => document.body.innerText.match(/\\d+ cameras/)", timeout=120_000)
        settled_s, settled_pixels, _ = wait_for_pixels(page, lambda n: True, timeout=FRAME_TIMEOUT_S, start=start)
        result = {"budget": budget, "url_printed_s": url_s, "first_frame_s": first_s,
                  "first_frame_point_pixels": first_pixels, "server_ready_s": ready_s,
                  "cameras_in_page_s": settled_s, "point_pixels": settled_pixels,
                  "output": [text for _, text in lines]}
        if slider:
            result["slider"] = slider_run(page)
        return result
    finally:
        process.terminate()
        process.wait(10)


def slider_run(page) -> dict:
    """Percentile 10 -> 99 (End key) and 99 -> 0 (Home); seconds until the point pixels change.

    The cameras are switched off first (their images have the points' colour), and the
    seconds that takes are kept too.
    """
    start = time.perf_counter()
    page.evaluate(CAMERAS_OFF)
    times = {"cameras_off_s": time.perf_counter() - start}
    time.sleep(1.0)
    times["cameras_off_s"], pixels, _ = wait_for_pixels(page, lambda n: True, timeout=FRAME_TIMEOUT_S, start=start)
    times["points_only_pixels"] = pixels
    thumb = page.locator('[role="slider"][aria-valuemax="99"]').first
    thumb.focus()
    for key, label, done in (("End", "10_to_99", lambda n: n < 0.5 * pixels),
                             ("Home", "99_to_0", lambda n: n > 0.8 * pixels)):
        start = time.perf_counter()
        page.keyboard.press(key)
        times[label], count, _ = wait_for_pixels(page, done, timeout=FRAME_TIMEOUT_S, start=start)
        times[f"{label}_point_pixels"] = count
    return times


def bare_viser_first_frame_s(page, budget: int) -> float:
    """The floor under the viewer: a viser page with one cloud of ``budget`` points and nothing else, goto -> drawn."""
    from fast3r.viewer.command import start_server

    server = start_server("localhost", 0)
    try:
        rng = np.random.default_rng(0)
        server.scene.add_point_cloud("/points", rng.normal(size=(budget, 3)).astype(np.float32),
                                     np.tile(np.array([255, 0, 255], np.uint8), (budget, 1)), point_size=0.01,
                                     point_shading="flat", precision="float32")
        start = time.perf_counter()
        page.goto(f"http://localhost:{server.get_port()}", wait_until="commit")
        return wait_for_pixels(page, lambda n: n >= FIRST_FRAME_FRACTION * 800 * 600, timeout=FRAME_TIMEOUT_S,
                               start=start)[0]
    finally:
        server.stop()


def software_gl_frame_ms(page, counts: list[int]) -> dict[str, float]:
    """ms per frame of a bare WebGL2 page drawing N one-pixel points (no viser): the browser's floor here."""
    page.set_content("<canvas id=c width=800 height=600></canvas>")
    script = """n => { const gl = document.getElementById('c').getContext('webgl2');
      const sh = (t, s) => { const x = gl.createShader(t); gl.shaderSource(x, s); gl.compileShader(x); return x; };
      const p = gl.createProgram();
      gl.attachShader(p, sh(gl.VERTEX_SHADER, `#version 300 es
        in vec3 a; void main() { gl_Position = vec4(a, 1.0); gl_PointSize = 1.0; }`));
      gl.attachShader(p, sh(gl.FRAGMENT_SHADER, `#version 300 es
        precision mediump float; out vec4 o; void main() { o = vec4(1.0, 0.0, 1.0, 1.0); }`));
      gl.linkProgram(p); gl.useProgram(p);
      const v = new Float32Array(3 * n); for (let i = 0; i < v.length; i++) v[i] = Math.random() * 2 - 1;
      gl.bindBuffer(gl.ARRAY_BUFFER, gl.createBuffer()); gl.bufferData(gl.ARRAY_BUFFER, v, gl.STATIC_DRAW);
      gl.enableVertexAttribArray(0); gl.vertexAttribPointer(0, 3, gl.FLOAT, false, 0, 0);
      const px = new Uint8Array(4); const frame = () => { gl.clear(gl.COLOR_BUFFER_BIT);
        gl.drawArrays(gl.POINTS, 0, n); gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, px); };
      frame(); const t = performance.now(); for (let k = 0; k < 3; k++) frame();
      return (performance.now() - t) / 3; }"""
    return {str(n): page.evaluate(script, n) for n in counts}


# ------------------------------------------------------------------------------ server side
def server_side(scene_dir: Path, budget: int, repeats: int = 5) -> dict:
    """The viewer's own time for a slider move and a hidden view, in this process (no browser connected)."""
    from fast3r.viewer.app import SceneViewer
    from fast3r.viewer.command import start_server
    from fast3r.viewer.scene import open_scene

    server = start_server("localhost", 0)
    try:
        start = time.perf_counter()
        viewer = SceneViewer(server, open_scene(scene_dir), max_points=budget)
        viewer.load(first_frame_wait_s=0)  # no browser
        load_s = time.perf_counter() - start
        percentile, views = [], []
        for r in range(repeats):
            for value in (99, 10):
                t = time.perf_counter()
                viewer.set_percentile(value)
                server.flush()
                percentile.append(time.perf_counter() - t)
            t = time.perf_counter()
            viewer.set_views(0, viewer.scene.n_views - 1, hidden={r})
            server.flush()
            views.append(time.perf_counter() - t)
        assert viewer.shown_points() > 0
        return {"budget": budget, "load_in_process_s": load_s, "percentile_move_s": statistics.median(percentile),
                "hide_view_s": statistics.median(views)}
    finally:
        server.stop()


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "viewer_cpu_1500.json")
    parser.add_argument("--views", type=int, default=1500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--scene", type=Path, default=Path("/tmp/fast3r_view_1500"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per budget (plus one cold run)")
    args = parser.parse_args()

    path = args.scene / NPZ
    start = time.perf_counter()
    if not path.exists():
        write_scene(args.scene, args.views, args.size)
    check_scene(path, args.views, args.size)
    print(f"scene: {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - start:.0f} s)", flush=True)

    result = {"views": args.views, "size": args.size, "npz_bytes": path.stat().st_size,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_start": os.getloadavg()}, "runs": [], "server_side": []}
    viewport = 800 * 600
    for budget in args.budgets:
        result["server_side"].append(server_side(args.scene, budget))
        print(json.dumps(result["server_side"][-1]), flush=True)
        for run in ["cold"] + ["warm"] * args.repeats:
            if run == "cold":
                evict(path)
            try:
                with chromium_page() as page:
                    record = browser_run(page, args.scene, budget, viewport_pixels=viewport, slider=run == "warm")
            except (TimeoutError, PlaywrightError) as err:  # a result too: the browser did not draw it in time
                record = {"budget": budget, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
            record.update(cache=run, load_average=os.getloadavg())
            result["runs"].append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "output"}), flush=True)
            write(args.out, result)
    result["bare_viser_first_frame_s"] = {}
    for budget in args.budgets:
        with chromium_page() as page:
            result["bare_viser_first_frame_s"][str(budget)] = bare_viser_first_frame_s(page, budget)
    with chromium_page() as page:
        result["software_gl_ms_per_frame"] = software_gl_frame_ms(page, [200_000, 1_000_000])
    result["machine"]["load_average_at_end"] = os.getloadavg()
    write(args.out, result)
    print(f"wrote {args.out}")
    print(f"{'budget':>9} {'cache':>5} {'URL s':>6} {'first frame s':>13} {'ready s':>7} {'cameras s':>9} "
          f"{'slider 10->99 s':>15} {'99->0 s':>7}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['budget']:>9} {r['cache']:>5} {r['error']}")
            continue
        s = r.get("slider", {})
        print(f"{r['budget']:>9} {r['cache']:>5} {r['url_printed_s']:6.2f} {r['first_frame_s']:13.2f} "
              f"{r['server_ready_s']:7.2f} {r['cameras_in_page_s']:9.2f} {s.get('10_to_99', float('nan')):15.2f} "
              f"{s.get('99_to_0', float('nan')):7.2f}")
    print("bare viser page, first frame s:", result["bare_viser_first_frame_s"])
    print("software GL ms/frame:", result["software_gl_ms_per_frame"])


if __name__ == "__main__":
    main()
