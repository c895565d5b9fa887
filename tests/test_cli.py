"""The ``fast3r reconstruct`` command end to end on a random model, and its errors on bad input."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fast3r import Fast3RConfig, cli, export, inputs, load_images
from fast3r.images import preprocess_image
from fast3r.video import UnreadableVideoError, read_frames, upright

# The [reconstruct] extra: installed in CI; skipped with the reason where it is not (the GPU machine).
av = pytest.importorskip("av")
pycolmap = pytest.importorskip("pycolmap")

ROOT = Path(__file__).resolve().parents[1]
# The tiny preset with slimmer DPT heads: the heads at 224 px dominate a CPU run of `tiny`.
SMALL = dataclasses.replace(Fast3RConfig.preset("tiny"), head_feature_dim=32, head_layer_dims=(16, 32, 64, 128))


@pytest.fixture
def small_random_model(monkeypatch):
    """Slim heads, and fewer exported points: the formats themselves are checked in test_export.py."""
    monkeypatch.setattr(cli, "RANDOM_WEIGHTS_PRESET", SMALL)
    monkeypatch.setattr(export, "MAX_POINTS", 20_000)
    monkeypatch.setattr(export, "MAX_COLMAP_POINTS", 2_000)


def random_pixels(h, w, generator):
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator).numpy()


def write_video(path, frames=12, rate=4, size=(96, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(random_pixels(size[1], size[0], g), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def image_folder(tmp_path, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(random_pixels(240, 320, g)).save(folder / "img10.png")
    Image.fromarray(random_pixels(240, 320, g)).save(folder / "img2.jpg", quality=90)
    Image.fromarray(random_pixels(300, 260, g)).save(folder / "img1.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.filterwarnings("ignore:estimated focal out of")  # random weights give no sensible focal
def test_folder_of_images_end_to_end(small_random_model, image_folder, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(["reconstruct", image_folder, "--out", out_dir, "--random-weights", "--size", "224",
                          "--cameras", "procrustes"], capsys)
    assert code == 0, err
    assert "MEANINGLESS" in err
    for bar in ("decode", "encoder", "fusion", "heads", "cameras (procrustes)", "export"):
        assert f"{bar}: 100%" in err, bar
    assert "fusion: 100%|" in err and f"{SMALL.fusion_depth}/{SMALL.fusion_depth}" in err
    assert "3 views (224x224)" in out and "forward" in out and "cameras" in out
    data = np.load(out_dir / "reconstruction.npz")
    assert list(data["names"]) == ["00000_img1.png", "00001_img2.png", "00002_img10.png"]  # natural order
    np.testing.assert_array_equal(data["images"][1], load_images([image_folder / "img2.jpg"], size=224)[0]
                                  .permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(data["depth"], data["pts3d_local"][..., 2])
    assert data["cam2world"].shape == (3, 4, 4)
    transforms = json.loads((out_dir / "transforms.json").read_text())
    assert [f["file_path"] for f in transforms["frames"]] == [f"images/{n}" for n in data["names"]]
    assert all((out_dir / f["file_path"]).is_file() for f in transforms["frames"])
    model = pycolmap.Reconstruction(str(out_dir / "sparse/0"))
    # Random weights: the points in front of their camera, up to the cap (how many are in front varies with the seed).
    assert model.num_reg_images() == 3 and model.num_points3D() <= 2_000
    assert all(0 <= point.error < 1e3 for point in model.points3D.values())
    for name in ("points.ply", "scene.glb", "sparse/0", "transforms.json", "reconstruction.npz", "images"):
        assert str(out_dir / name) in out


@pytest.mark.filterwarnings("ignore:estimated focal out of")
def test_video_end_to_end(small_random_model, tmp_path, capsys):
    video = write_video(tmp_path / "clip.mp4")
    out_dir = tmp_path / "out"
    code, _, err = run(["reconstruct", video, "--out", out_dir, "--random-weights", "--size", "224", "--fps", "2",
                        "--max-views", "3", "--export", "npz,colmap"], capsys)
    assert code == 0, err
    assert "cameras (pnp): 100%" in err
    data = np.load(out_dir / "reconstruction.npz")
    names = list(data["names"])
    assert len(names) == 3 and names[0] == "00000_clip_f000000.png" and names[-1] == "00002_clip_f000010.png"
    assert sorted(p.name for p in out_dir.iterdir()) == ["fast3r.json", "images", "reconstruction.npz", "sparse"]


@pytest.mark.parametrize("options, expected", [
    ({"every": 5}, [0, 5, 10]),
    ({"fps": 1.0}, [0, 4, 8]),
    ({}, [0, 4, 8]),  # default: one frame per second, as the official demo
    ({"fps": 2.0}, [0, 2, 4, 6, 8, 10]),
    ({"fps": 3.0}, [0, 2, 3, 4, 6, 7, 8, 10, 11]),  # one frame once 1/3 s has passed since the last kept
])
def test_video_frame_selection(tmp_path, options, expected):
    video = write_video(tmp_path / "clip.mp4")
    frames = read_frames(video, size=224, **options)
    assert [index for index, _ in frames] == expected
    assert all(image.shape == (3, 224, 224) and image.dtype == torch.uint8 for _, image in frames)


def test_video_frames_are_preprocessed_as_image_files(tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames=3, size=(160, 96))
    with av.open(str(video)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    decoded[2].save(tmp_path / "frame2.png")
    (_, frame), = [f for f in read_frames(video, size=512, every=1) if f[0] == 2]
    torch.testing.assert_close(frame, load_images([tmp_path / "frame2.png"], size=512)[0], rtol=0, atol=0)
    torch.testing.assert_close(frame, preprocess_image(decoded[2], 512), rtol=0, atol=0)


def test_display_rotation_turns_frames_upright():
    pixels = np.arange(6, dtype=np.uint8).reshape(2, 3)  # 2 rows, 3 columns
    turned = np.asarray(upright(Image.fromarray(pixels), 90))  # 90 degrees counterclockwise
    np.testing.assert_array_equal(turned, np.rot90(pixels))
    np.testing.assert_array_equal(np.asarray(upright(Image.fromarray(pixels), -90)), np.rot90(pixels, -1))
    assert upright(Image.fromarray(pixels), 0).size == (3, 2)


def test_bad_input_gives_named_errors(tmp_path, image_folder, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    out_dir = tmp_path / "out"
    code, _, err = run(["reconstruct", empty, "--out", out_dir, "--random-weights"], capsys)
    assert code == 2 and f"no images found in folder {empty}" in err
    assert not out_dir.exists()  # nothing is written for a failed run

    bad_video = tmp_path / "broken.mp4"
    bad_video.write_text("this is not a video")
    code, _, err = run(["reconstruct", bad_video, "--out", out_dir], capsys)  # found before the weights are missed
    assert code == 2 and f"cannot open video {bad_video}" in err

    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"\xff\xd8 not really a jpeg")
    code, _, err = run(["reconstruct", bad_image, "--out", out_dir, "--random-weights", "--size", "224"], capsys)
    assert code == 2 and "cannot read image" in err and "broken.jpg" in err

    code, _, err = run(["reconstruct", tmp_path / "missing.png", "--out", out_dir, "--random-weights"], capsys)
    assert code == 2 and "missing.png does not exist" in err

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    code, _, err = run(["reconstruct", image_folder, "--out", a_file, "--random-weights"], capsys)
    assert code == 2 and f"output folder {a_file} is a file; pass a directory" in err

    code, _, err = run(["reconstruct", image_folder, "--out", out_dir], capsys)
    assert code == 2 and cli.RELEASED_WEIGHTS in err and "huggingface_hub" in err and "model.safetensors" in err
    assert not out_dir.exists()

    monkeypatch.setitem(sys.modules, "pycolmap", None)  # as if the extra were not installed
    code, _, err = run(["reconstruct", image_folder, "--out", out_dir, "--random-weights"], capsys)
    assert code == 2 and "needs pycolmap" in err and 'pip install -e ".[reconstruct]"' in err


def test_triton_backend_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(cli.CommandError, match="--backend triton needs a CUDA GPU"):
        cli.choose_backend("triton", torch.device("cpu"))
    assert cli.choose_backend(None, torch.device("cpu")) == "torch"
    assert cli.choose_backend(None, torch.device("cuda")) == "triton"


@pytest.mark.parametrize("argv, message", [
    (["--fps", "1", "--every", "2"], "not allowed with argument"),
    (["--export", "ply,obj"], "unknown export formats ['obj']"),
    (["--conf-percentile", "100"], "not a percentile"),
    (["--max-views", "0"], "0 is not a finite number > 0"),
    (["--checkpoint", "x", "--random-weights"], "not allowed with argument"),
])
def test_bad_options_are_refused_by_the_parser(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reconstruct", str(tmp_path), "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_python_m_fast3r_cli_without_the_extra_names_it(image_folder, tmp_path):
    """`python -m fast3r.cli` with the [reconstruct] libraries hidden: fast3r imports, the command names the extra."""
    script = (
        "import runpy, sys\n"
        "for name in ('cv2', 'trimesh', 'pycolmap', 'av', 'tqdm'): sys.modules[name] = None\n"
        "import fast3r, fast3r.export, fast3r.metrics, fast3r.video\n"
        f"sys.argv = ['fast3r', 'reconstruct', {str(image_folder)!r}, '--out', {str(tmp_path / 'o')!r},"
        " '--random-weights']\n"
        "runpy.run_module('fast3r.cli', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "needs tqdm, opencv-python-headless, trimesh, pycolmap" in proc.stderr and "[reconstruct]" in proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ round 2: bad input, re-runs, Ctrl-C
TINIER = dataclasses.replace(SMALL, fusion_depth=4, head_feature_dim=16, head_layer_dims=(8, 16, 32, 64))


@pytest.fixture
def tinier_random_model(monkeypatch):
    """The cheapest model that runs the whole command: these tests are about files and messages."""
    monkeypatch.setattr(cli, "RANDOM_WEIGHTS_PRESET", TINIER)
    monkeypatch.setattr(export, "MAX_POINTS", 2_000)
    monkeypatch.setattr(export, "MAX_COLMAP_POINTS", 500)


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def reconstruct_args(inputs, out, *extra):
    return ["reconstruct", *inputs, "--out", out, "--random-weights", "--cameras", "procrustes", *extra]


def test_a_rerun_into_a_previous_output_is_refused_until_overwrite(tinier_random_model, tmp_path, capsys):
    """224 px then 512 px with --export nerfstudio: before, a 224x224 COLMAP camera stayed beside 512x384 images."""
    video = write_video(tmp_path / "clip.mp4", frames=12, rate=4, size=(96, 64))
    out = tmp_path / "out"
    code, _, err = run(reconstruct_args([video], out, "--size", "224", "--every", "1", "--max-views", "6",
                                        "--export", "colmap,nerfstudio"), capsys)
    assert code == 0, err
    first = snapshot(out)
    assert sum(name.startswith("images/") for name in first) == 6

    second = reconstruct_args([video], out, "--size", "512", "--export", "nerfstudio", "--every", "1", "--max-views", "4")
    code, _, err = run(second, capsys)
    assert code == 2 and "holds a previous export" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(out) == first  # refused before any work: nothing changed

    code, stdout, err = run([*second, "--overwrite"], capsys)
    assert code == 0, err
    assert files_under(out) == ["fast3r.json", "images", *[f"images/0000{i}_clip_f0000{j:02d}.png"
                                                            for i, j in enumerate((0, 4, 7, 11))], "transforms.json"]
    meta = json.loads((out / "transforms.json").read_text())
    for frame in meta["frames"]:
        assert Image.open(out / frame["file_path"]).size == (frame["w"], frame["h"]) == (512, 336)
    assert f"{out / 'images'}  (4 files" in stdout
    manifest = json.loads((out / "fast3r.json").read_text())
    assert manifest["files"] == ["images", "transforms.json"] and manifest["views"] == 4
    assert manifest["run"]["random_weights"] is True and "--overwrite" in manifest["run"]["command"]


def test_an_output_folder_of_other_files_is_refused(tinier_random_model, image_folder, tmp_path, capsys):
    code, _, err = run(reconstruct_args([image_folder], image_folder, "--overwrite"), capsys)
    assert code == 2 and "holds files that fast3r did not write" in err
    assert sorted(p.name for p in image_folder.iterdir()) == ["img1.png", "img10.png", "img2.jpg", "notes.txt"]


def test_an_output_folder_that_cannot_be_created_fails_before_the_model_loads(image_folder, tmp_path, capsys,
                                                                             monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    code, _, err = run(reconstruct_args([image_folder], a_file / "sub"), capsys)
    assert code == 2 and f"cannot create output folder {a_file / 'sub'}" in err


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("stage", ["estimate_cameras", "write_nerfstudio"])
def test_ctrl_c_exits_130_without_a_traceback_and_leaves_nothing(tinier_random_model, image_folder, tmp_path, capsys,
                                                                 monkeypatch, stage):
    out = tmp_path / "new" / "out"
    monkeypatch.setattr(cli if stage == "estimate_cameras" else export, stage, interrupt)
    code, _, err = run(reconstruct_args([image_folder], out, "--size", "224"), capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # no empty sparse/0, no empty output folder


def test_ctrl_c_during_an_overwrite_keeps_the_previous_set(tinier_random_model, image_folder, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "out"
    assert run(reconstruct_args([image_folder], out, "--size", "224", "--export", "ply,npz"), capsys)[0] == 0
    before = snapshot(out)
    monkeypatch.setattr(cli, "estimate_cameras", interrupt)
    code, _, err = run(reconstruct_args([image_folder], out, "--size", "224", "--overwrite"), capsys)
    assert code == 130 and "Traceback" not in err and snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_unexpected_errors_are_one_line_with_the_traceback_on_request(image_folder, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "load_model", boom)
    code, _, err = run(reconstruct_args([image_folder], tmp_path / "out"), capsys)
    assert code == 1 and "fast3r reconstruct: error: unexpected RuntimeError: boom" in err
    assert "Traceback" not in err and "FAST3R_TRACEBACK=1" in err and not (tmp_path / "out").exists()
    monkeypatch.setenv("FAST3R_TRACEBACK", "1")
    code, _, err = run(reconstruct_args([image_folder], tmp_path / "out"), capsys)
    assert code == 1 and "Traceback" in err


def test_out_of_memory_says_what_to_reduce(image_folder, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cli, "load_model", oom)
    code, _, err = run(reconstruct_args([image_folder], tmp_path / "out"), capsys)
    assert code == 1 and "out of memory" in err and "--max-views" in err and "--size 224" in err
    assert "Traceback" not in err


def test_warnings_print_as_one_line_each(tinier_random_model, image_folder, tmp_path, capsys):
    code, _, err = run(reconstruct_args([image_folder], tmp_path / "out", "--size", "224", "--export", "npz"), capsys)
    assert code == 0, err
    assert "fast3r reconstruct: warning: estimated focal out of" in err and "--focal" in err
    assert "UserWarning" not in err and "warnings.warn" not in err


def test_a_known_focal_is_used_for_every_view(tinier_random_model, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(reconstruct_args([image_folder], out, "--size", "224", "--export", "nerfstudio",
                                        "--focal", "180.5"), capsys)
    assert code == 0, err
    assert "estimated focal" not in err
    assert {(f["fl_x"], f["fl_y"]) for f in json.loads((out / "transforms.json").read_text())["frames"]} == {
        (180.5, 180.5)}


@pytest.mark.parametrize("argv, message", [
    (["--fps", "inf"], "inf is not a finite number > 0"),
    (["--fps", "nan"], "nan is not a finite number > 0"),
    (["--focal", "inf"], "inf is not a finite number > 0"),
    (["--focal", "-3"], "-3 is not a finite number > 0"),
    (["--export", ""], "no export format given"),
])
def test_non_finite_and_empty_options_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reconstruct", str(tmp_path), "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_any_finite_fps_terminates(tmp_path):
    """--fps inf used to hang (1/fps is 0 in the frame loop); a huge finite fps must keep every frame, not loop."""
    video = write_video(tmp_path / "clip.mp4", frames=6)
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        read_frames(video, size=224, fps=float("inf"))
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        read_frames(video, size=224, every=2.5)
    result = []
    worker = threading.Thread(target=lambda: result.append(read_frames(video, size=224, fps=1e300)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "read_frames(fps=1e300) hangs"
    assert [index for index, _ in result[0]] == list(range(6))


def test_a_truncated_video_warns_how_many_frames_it_lost(tmp_path):
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:  # the index first, as phones do
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            frame = av.VideoFrame.from_ndarray(random_pixels(64, 96, g), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"cut\.mp4: decoded \d+ of the 30 frames.*truncated"):
        frames = read_frames(cut, size=224, every=1)
    assert 0 < len(frames) < 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_frames(whole, size=224, every=1)) == 30


def test_missing_weights_suggest_the_current_hub_command(image_folder, tmp_path, capsys):
    code, _, err = run(["reconstruct", image_folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"hf download {cli.RELEASED_WEIGHTS} --local-dir DIR" in err and "huggingface-cli" not in err


def test_an_input_given_twice_is_read_once_with_a_warning(image_folder):
    with pytest.warns(UserWarning, match=r"img2\.jpg is given 2 times"):
        sources = inputs.find_sources([image_folder, image_folder / "img2.jpg"])
    assert [s.path.name for s in sources] == ["img1.png", "img2.jpg", "img10.png"]


def test_a_folder_of_folders_says_subfolders_are_not_searched(tmp_path):
    (tmp_path / "scene" / "images").mkdir(parents=True)
    with pytest.raises(inputs.NoImagesFoundError, match=r"subfolders are not searched.*images"):
        inputs.find_sources([tmp_path / "scene"])


def test_a_new_subcommand_takes_a_few_lines_and_shares_the_error_handling(monkeypatch, capsys):
    def add_hello(commands):
        hello = commands.add_parser("hello", help="say hello")
        hello.add_argument("--fail", action="store_true")
        hello.set_defaults(run=lambda args: (_ for _ in ()).throw(cli.CommandError("no")) if args.fail else 0)

    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, add_hello))
    assert cli.main(["hello"]) == 0
    assert cli.main(["hello", "--fail"]) == 2 and "fast3r hello: error: no" in capsys.readouterr().err


def test_an_image_over_the_decompression_bomb_limit_is_one_error_line(tinier_random_model, image_folder, tmp_path,
                                                                      capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # img1.png (260 x 300) is over twice this
    code, _, err = run(reconstruct_args([image_folder / "img1.png"], tmp_path / "out", "--size", "224"), capsys)
    assert code == 2 and "img1.png has 78000 pixels" in err and "decompression-bomb" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_video_too_elongated_for_512_names_the_video(tmp_path):
    video = write_video(tmp_path / "strip.mp4", frames=2, size=(640, 16))
    with pytest.raises(UnreadableVideoError, match=r"video .*strip\.mp4: a 640x16 image .*--size 224"):
        read_frames(video, size=512, every=1)
