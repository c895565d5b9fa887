"""Reading image files with the official preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from fast3r import Fast3R
from fast3r.images import load_images, preprocess_image


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


def random_rgb(w, h):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
                                                    (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied_like_the_official_loader(tmp_path, orientation, transpose):
    """A phone portrait is stored landscape with an EXIF rotation; it must load upright."""
    stored = random_rgb(640, 480)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    stored.save(tmp_path / "phone.png", exif=exif)
    stored.transpose(transpose).save(tmp_path / "upright.png")
    (got,) = load_images(tmp_path / "phone.png")
    (want,) = load_images(tmp_path / "upright.png")
    assert got.shape == want.shape == ((3, 384, 512) if orientation == 3 else (3, 512, 384))
    assert torch.equal(got, want)


def test_a_single_path_is_accepted(tmp_path):
    path = write(tmp_path / "one.png", 320, 240)
    (as_list,) = load_images([path])
    for single in (path, str(path)):
        (got,) = load_images(single)
        assert torch.equal(got, as_list)


@pytest.mark.parametrize("w, h", [(1000, 10), (10, 1000), (1000, 15)])
def test_extreme_aspect_ratio_is_refused_at_512(tmp_path, w, h):
    path = write(tmp_path / "strip.png", w, h)
    with pytest.raises(ValueError, match=rf"strip\.png: a {w}x{h} image .* less than one 16-pixel patch.*size=224"):
        load_images([path], size=512)
    (square,) = load_images([path], size=224)  # the square crop of size 224 still works
    assert square.shape == (3, 224, 224)


def test_narrowest_accepted_strip_gives_one_patch(tmp_path):
    (img,) = load_images([write(tmp_path / "strip.png", 1000, 32)], size=512)  # 512 x 16.4
    assert img.shape == (3, 16, 512)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, mode):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    pixels = rng.integers(0, 65536, (384, 512), dtype=np.uint16)
    image = Image.fromarray(pixels) if mode == "I;16" else Image.fromarray(pixels.astype(np.int32))
    assert image.mode == mode
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    image.save(path)
    (img,) = load_images(path)  # 512x384 needs no resize: pixels compare exactly
    expected = torch.from_numpy((pixels >> 8).astype(np.uint8))
    assert img.shape == (3, 384, 512)
    assert all(torch.equal(img[c], expected) for c in range(3))
    assert img.float().mean() < 200  # clipping would have made nearly every pixel 255


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.random.default_rng().random((32, 32), dtype=np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=r"depth\.tif: floating-point \(mode F\)"):
        load_images(tmp_path / "depth.tif")


def test_preprocess_image_matches_load_images(tmp_path):
    """The entry point for frames decoded elsewhere (video) gives the same tensor as reading the file."""
    image = random_rgb(700, 400)
    image.save(tmp_path / "frame.png")
    for size in (224, 512):
        (from_file,) = load_images(tmp_path / "frame.png", size=size)
        assert torch.equal(preprocess_image(image, size), from_file)
    with pytest.raises(ValueError, match="size=300"):
        preprocess_image(image, 300)


def test_directory_and_truncated_files_name_the_problem(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; pass its image files"):
        load_images(tmp_path)
    write(tmp_path / "whole.png", 64, 48)
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.png"):
        load_images(tmp_path / "cut.png")


def test_aspect_error_names_the_command_line_option_too(tmp_path):
    with pytest.raises(ValueError, match=r"size=224 \(fast3r reconstruct: --size 224\)"):
        load_images([write(tmp_path / "strip.png", 1000, 10)], size=512)


def test_an_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    """Pillow refuses images of more than 2x MAX_IMAGE_PIXELS with its own exception type: a traceback before."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # above what the preprocessing itself makes at 224
    path = write(tmp_path / "huge.png", 500, 500)  # over twice the limit
    with pytest.raises(ValueError, match=r"huge\.png has 250000 pixels.*decompression-bomb limit.*MAX_IMAGE_PIXELS"):
        load_images([path], size=224)


def test_an_image_near_the_limit_warns_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    path = write(tmp_path / "large.png", 400, 300)  # between the limit and twice it
    with pytest.warns(UserWarning, match=r"large\.png has 120000 pixels") as caught:
        (img,) = load_images([path], size=224)
    assert img.shape == (3, 224, 224)
    assert not any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
