"""The ``fast3r reconstruct`` command end to end on a random model, and its errors on bad input."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fast3r import Fast3RConfig, cli, export, load_images
from fast3r.images import preprocess_image
from fast3r.video import read_frames, upright

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
    assert model.num_reg_images() == 3 and model.num_points3D() == 2_000
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
    assert sorted(p.name for p in out_dir.iterdir()) == ["images", "reconstruction.npz", "sparse"]


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
    assert code == 2 and f"--out {a_file} is a file; pass a directory" in err

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
    (["--export", "ply,obj"], "unknown format(s) ['obj']"),
    (["--conf-percentile", "100"], "not a percentile"),
    (["--max-views", "0"], "0 is not > 0"),
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
