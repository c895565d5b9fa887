"""Bad input at the model and loss boundary: a named error or a warning, never a silent wrong answer."""

import warnings

import pytest
import torch

from fast3r import Fast3R, fast3r_loss
from fast3r.validation import check_float_images, check_image_ids


@pytest.fixture(scope="module")
def model():
    return Fast3R("tiny").eval()


def unit_range(*shape):
    """Fresh random images in [-1, 1] with both signs present."""
    return torch.rand(*shape) * 2 - 1


# ----------------------------------------------------------------------------------------- image values
@pytest.mark.parametrize("images", [torch.rand(2, 3, 16, 16), [torch.rand(3, 16, 32), torch.rand(3, 32, 16)]])
def test_zero_to_one_images_warn_with_the_fix(images):
    """torchvision's ToTensor convention: no negative value anywhere. A warning, not an error."""
    with pytest.warns(UserWarning, match=r"look like \[0, 1\] images .*x \* 2 - 1"):
        check_float_images(images)


def test_one_negative_view_is_enough_to_not_warn():
    images = torch.rand(3, 3, 16, 16)
    images[2, 0, 0, 0] = -0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_float_images(images)


@pytest.mark.parametrize("scale", [255.0, 2.0])
def test_images_outside_unit_range_are_refused_with_both_hints(model, scale):
    images = unit_range(3, 3, 32, 32)
    images[1] = torch.rand(3, 32, 32) * scale  # one view in [0, 255] (or [0, 2])
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\], but view 1 spans \[") as err:
        model(images)
    assert "x * 2 - 1" in str(err.value) and "x / 127.5 - 1" in str(err.value) and "uint8" in str(err.value)


def test_rounding_past_the_unit_range_is_accepted():
    images = unit_range(2, 3, 16, 16)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 1.0005, -1.0005
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_float_images(images)


def test_uint8_images_are_not_checked():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all uint8 values are >= 0, yet no [0, 1] warning
        check_float_images(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_pixel_names_its_view(model, bad):
    images = unit_range(4, 3, 32, 32)
    images[2, 1, int(torch.randint(0, 32, ())), 5] = bad
    with pytest.raises(ValueError, match=r"^view 2 holds NaN or Inf pixels") as err:
        model(images)
    assert "nan_to_num" in str(err.value)


def test_many_non_finite_views_are_listed_first_few():
    images = unit_range(9, 3, 16, 16)
    images[[1, 2, 4, 5, 6, 7, 8], 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^views 1, 2, 4, 5, 6 and 2 more hold NaN"):
        check_float_images(images)


def test_batched_and_list_inputs_name_the_view(model):
    scenes = unit_range(2, 3, 3, 32, 32)
    scenes[1, 2, 0, 3, 3] = float("nan")  # scene 1, view 2
    with pytest.raises(ValueError, match="^view 2 holds NaN"):
        model(scenes)
    mixed = [unit_range(3, 32, 48), unit_range(3, 32, 32), unit_range(3, 48, 32)]
    mixed[1][2, 7, 7] = float("inf")
    with pytest.raises(ValueError, match="^view 1 holds NaN"):
        model(mixed)
    mixed[1][2, 7, 7] = 300.0
    with pytest.raises(ValueError, match="view 1 spans"):
        model(mixed)


# ----------------------------------------------------------------------------------------- image shapes
@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(0, 3, 32, 32), "no view"),
        (torch.zeros(0, 2, 3, 32, 32), "no view"),
        (torch.zeros(1, 0, 3, 32, 32), "no view"),
        ([], "empty list"),
        (torch.zeros(2, 3, 0, 32), "not a positive multiple"),
        ([torch.zeros(3, 32, 0)], "not a positive multiple"),
    ],
)
def test_empty_inputs_raise_value_errors(model, images, message):
    with pytest.raises(ValueError, match=message):
        model(images)


# --------------------------------------------------------------------------------------------- image ids
@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.arange(3), ValueError, r"image_ids has shape \(3,\); expected \(2,\)"),  # was a RuntimeError of expand
        (torch.arange(4).view(2, 2), ValueError, r"expected \(2,\).* or \(1, 2\)"),
        (torch.tensor([0, -4]), ValueError, r"negative index \(-4\)"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer indices"),
        (torch.tensor([True, False]), TypeError, "integer indices"),
    ],
)
def test_bad_image_ids_are_refused_before_use(model, ids, error, message):
    with pytest.raises(error, match=message):
        model(unit_range(2, 3, 32, 32), image_ids=ids)


def test_explicit_image_ids_expand_to_every_scene():
    ids = torch.randint(0, 1000, (4,), dtype=torch.int32)
    expanded = check_image_ids(ids, batch=3, num_views=4)
    assert expanded.dtype == torch.int64 and expanded.shape == (3, 4)
    assert torch.equal(expanded, ids.long().expand(3, 4))
    per_scene = torch.randint(0, 1000, (3, 4))
    assert torch.equal(check_image_ids(per_scene, batch=3, num_views=4), per_scene)


@pytest.mark.gpu
def test_float_check_is_skipped_inside_cuda_graph_capture():
    """A synchronization would break the capture; the check must stand aside while one runs."""
    images = unit_range(2, 3, 32, 32).cuda()
    negative_ids = torch.tensor([0, -1], device="cuda")
    check_float_images(images)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        check_float_images(images)
        check_float_images(images * 300)  # would raise if it ran
        check_image_ids(negative_ids, 1, 2)
    graph.replay()
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------- loss
def scene(batch=2, views=3, h=5, w=6):
    preds, gts = [], []
    for _ in range(views):
        pose = torch.eye(4).repeat(batch, 1, 1)
        q, _ = torch.linalg.qr(torch.randn(batch, 3, 3))
        pose[:, :3, :3], pose[:, :3, 3] = q * torch.linalg.det(q)[:, None, None], torch.randn(batch, 3)
        gts.append({"pts3d": torch.randn(batch, h, w, 3), "valid_mask": torch.rand(batch, h, w) > 0.3,
                    "camera_pose": pose})
        preds.append({"pts3d_in_other_view": torch.randn(batch, h, w, 3), "conf": 1 + torch.rand(batch, h, w),
                      "pts3d_local": torch.randn(batch, h, w, 3), "conf_local": 1 + torch.rand(batch, h, w)})
    return preds, gts


def test_missing_ground_truth_key_names_view_and_key():
    preds, gts = scene()
    del gts[1]["valid_mask"]
    with pytest.raises(ValueError, match=r"ground truth of view 1 lacks 'valid_mask'; expected pts3d \(B, H, W, 3\)"):
        fast3r_loss(preds, gts)


def test_missing_prediction_key_names_view_and_key():
    preds, gts = scene()
    del preds[2]["conf_local"]
    with pytest.raises(ValueError, match="prediction of view 2 lacks 'conf_local'"):
        fast3r_loss(preds, gts)


def test_ground_truth_that_is_not_a_dict_is_a_type_error():
    preds, gts = scene(views=2)
    gts[1] = list(gts[1].values())
    with pytest.raises(TypeError, match="ground truth of view 1 is a list"):
        fast3r_loss(preds, gts)


def test_pose_without_batch_dimension_says_so():
    preds, gts = scene(batch=1)
    gts[0]["camera_pose"] = gts[0]["camera_pose"][0]
    with pytest.raises(ValueError, match=r"view 0: camera_pose has shape \(4, 4\), expected \(1, 4, 4\).*\[None\]"):
        fast3r_loss(preds, gts)


@pytest.mark.parametrize(
    "key, change, message",
    [
        ("pts3d", lambda t: t[:, :-1], r"view 1: pts3d has shape \(2, 4, 6, 3\), expected \(2, 5, 6, 3\)"),
        ("valid_mask", lambda t: t[..., None], r"view 1: valid_mask has shape \(2, 5, 6, 1\)"),
        ("valid_mask", lambda t: t[0], r"valid_mask has shape \(5, 6\).*batch dimension"),
    ],
)
def test_mismatched_ground_truth_shapes_name_view_and_key(key, change, message):
    preds, gts = scene()
    gts[1][key] = change(gts[1][key])
    with pytest.raises(ValueError, match=message):
        fast3r_loss(preds, gts)


def test_views_with_different_batch_sizes_are_refused():
    preds, gts = scene(batch=2)
    preds[2] = {k: v[:1] for k, v in preds[2].items()}
    gts[2] = {k: v[:1] for k, v in gts[2].items()}
    with pytest.raises(ValueError, match="view 2 has a batch of 1 scenes but view 0 has 2"):
        fast3r_loss(preds, gts)


def test_prediction_shape_mismatch_names_the_key():
    preds, gts = scene()
    preds[0]["conf"] = preds[0]["conf"][..., None]
    with pytest.raises(ValueError, match=r"prediction of view 0: conf has shape \(2, 5, 6, 1\)"):
        fast3r_loss(preds, gts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_ground_truth_at_a_valid_pixel_names_view_and_key(bad):
    preds, gts = scene()
    gts[2]["valid_mask"][1, 3, 4] = True
    gts[2]["pts3d"][1, 3, 4, 0] = bad
    with pytest.raises(ValueError, match=r"ground truth of view 2: pts3d holds NaN or Inf at 1 valid pixel"):
        fast3r_loss(preds, gts)


def test_non_finite_pose_names_the_view():
    preds, gts = scene()
    gts[1]["camera_pose"][0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="ground truth of view 1: camera_pose holds NaN or Inf"):
        fast3r_loss(preds, gts)


@pytest.mark.parametrize("view", [0, 2])
def test_singular_pose_is_a_named_value_error_not_linalg_error(view):
    preds, gts = scene()
    gts[view]["camera_pose"][1, :3, 2] = 0  # a rotation column lost: no inverse
    with pytest.raises(ValueError, match=rf"view {view}: camera_pose is not rigid in 1 scene.*not a rotation") as err:
        fast3r_loss(preds, gts)
    assert not isinstance(err.value, torch.linalg.LinAlgError)


def sheared(pose):
    pose = pose.clone()
    pose[..., 0, 1] += 0.3
    return pose


def scaled(pose):
    pose = pose.clone()
    pose[..., :3, :3] *= 2.0
    return pose


def reflected(pose):
    pose = pose.clone()
    pose[..., :3, 0] *= -1
    return pose


def projective_last_row(pose):
    pose = pose.clone()
    pose[..., 3, 2] = 0.5
    return pose


@pytest.mark.parametrize("change, message", [
    (sheared, "not a rotation"),
    (scaled, "not a rotation"),
    (reflected, "determinant -1"),
    (projective_last_row, r"last row other than \[0, 0, 0, 1\]"),
])
def test_non_rigid_pose_names_view_and_defect(change, message):
    """The docs say rigid: an invertible but sheared, scaled, mirrored or projective pose is refused, not used."""
    preds, gts = scene()
    gts[1]["camera_pose"][1] = change(gts[1]["camera_pose"][1])
    with pytest.raises(ValueError, match=rf"ground truth of view 1: camera_pose is not rigid in 1 scene.*{message}"):
        fast3r_loss(preds, gts)


def test_rounded_rigid_pose_is_accepted():
    """Poses read from 6-digit text files are rigid to about 1e-6: accepted."""
    preds, gts = scene()
    for gt in gts:
        gt["camera_pose"] = (gt["camera_pose"] * 1e5).round() / 1e5
    assert torch.isfinite(fast3r_loss(preds, gts)[0])


@pytest.mark.parametrize("key", ["conf", "conf_local"])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_confidence_at_a_valid_pixel_names_view_and_key(key, bad):
    """conf <= 0 would make log(conf) infinite: the loss inf and the gradients NaN."""
    preds, gts = scene()
    gts[2]["valid_mask"][0, 1, 2] = True
    preds[2][key][0, 1, 2] = bad
    with pytest.raises(ValueError, match=rf"prediction of view 2: {key} is <= 0 at 1 valid pixel"):
        fast3r_loss(preds, gts)


def test_non_positive_confidence_at_an_invalid_pixel_is_ignored():
    preds, gts = scene()
    gts[0]["valid_mask"][1, 0, 0] = False
    preds[0]["conf"][1, 0, 0] = 0.0
    loss, _ = fast3r_loss([{k: v.requires_grad_() for k, v in p.items()} for p in preds], gts)
    loss.backward()
    assert torch.isfinite(loss)
