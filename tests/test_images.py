"""Reading image files with the official preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from fast3r import Fast3R
from fast3r.images import load_images


def write(path, w, h):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    "w, h, size, expected_hw",
    [
        (640, 480, 512, (384, 512)),  # long side 512, both sides multiples of 16
        (480, 640, 512, (512, 384)),  # portrait stays portrait
        (500, 500, 512, (384, 512)),  # a square image becomes 4:3
        (1000, 563, 512, (288, 512)),  # 512 x 288.3 cropped to a multiple of 16
        (640, 480, 224, (224, 224)),  # short side 224, centre square
        (100, 300, 224, (224, 224)),  # upscaled
    ],
)
def test_official_resize_and_crop(tmp_path, w, h, size, expected_hw):
    (img,) = load_images([write(tmp_path / "a.png", w, h)], size=size)
    assert img.dtype == torch.uint8 and img.shape == (3, *expected_hw)
    assert img.float().std() > 10  # real pixels, not a blank canvas


def test_loaded_images_run_through_the_model(tmp_path):
    paths = [write(tmp_path / f"{i}.png", 320, 240) for i in range(2)]
    images = load_images(paths, size=224)
    with torch.inference_mode():
        out = Fast3R("tiny").eval()(images)
    assert out[1]["pts3d_local"].shape == (224, 224, 3)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        load_images([bad])
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        load_images([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="size=300"):
        load_images([], size=300)
