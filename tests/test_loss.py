"""The training objective against the official value and hand-computed cases."""

import json
import math

import pytest
import torch
from golden import load_fixture

from fast3r import fast3r_loss

OFFICIAL_NAMES = {
    "regr_global/": "Regr3DMultiviewV3_pts3d_loss_global/",
    "regr_local/": "Regr3DMultiviewV3_pts3d_loss_local/",
    "conf_global/": "ConfLossMultiviewV2_conf_loss_global/",
    "conf_local/": "ConfLossMultiviewV2_conf_loss_local/",
}


def split_fixture(tensors, views):
    preds = [{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"pred{i}.")} for i in range(views)]
    gts = [{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"gt{i}.")} for i in range(views)]
    return preds, gts


def test_matches_official_fixture():
    metadata, tensors = load_fixture("official_loss_3v")
    preds, gts = split_fixture(tensors, 3)
    loss, details = fast3r_loss(preds, gts)
    official = float(metadata["loss"])
    assert abs(loss.item() - official) <= 1e-5 * abs(official)
    for name, value in json.loads(metadata["details"]).items():
        ours = next(k + name[-2:] for k, v in OFFICIAL_NAMES.items() if name.startswith(v))
        assert details[ours] == pytest.approx(value, rel=1e-5), name


def random_scene(batch=2, views=3, h=6, w=7):
    """Ground truth with random rigid camera poses, and predictions near it."""
    gts, preds = [], []
    for _ in range(views):
        pose = torch.eye(4).repeat(batch, 1, 1)
        q, _ = torch.linalg.qr(torch.randn(batch, 3, 3))
        pose[:, :3, :3] = q * torch.linalg.det(q)[:, None, None]  # proper rotation
        pose[:, :3, 3] = torch.randn(batch, 3)
        gts.append({"pts3d": torch.randn(batch, h, w, 3) * 3, "camera_pose": pose,
                    "valid_mask": torch.rand(batch, h, w) > 0.3})
        preds.append({"pts3d_in_other_view": torch.randn(batch, h, w, 3), "conf": 1 + torch.rand(batch, h, w) * 3,
                      "pts3d_local": torch.randn(batch, h, w, 3), "conf_local": 1 + torch.rand(batch, h, w) * 3})
    return preds, gts


def test_hand_computed_single_view_single_pixel_pair():
    """One view, identity pose, two valid pixels: every step can be written out by hand."""
    gt_pts = torch.tensor([[[[3.0, 0, 0], [0, 4.0, 0]]]])  # mean distance 3.5
    pred_pts = torch.tensor([[[[1.0, 0, 0], [0, 0, 2.0]]]])  # mean distance 1.5
    conf = torch.tensor([[[2.0, 3.0]]])
    gts = [{"pts3d": gt_pts, "valid_mask": torch.ones(1, 1, 2, dtype=torch.bool), "camera_pose": torch.eye(4)[None]}]
    preds = [{"pts3d_in_other_view": pred_pts, "conf": conf}]
    d0 = math.dist([1 / 1.5, 0, 0], [3 / 3.5, 0, 0])
    d1 = math.dist([0, 0, 2 / 1.5], [0, 4 / 3.5, 0])
    expected = ((2 * d0 - 0.2 * math.log(2)) + (3 * d1 - 0.2 * math.log(3))) / 2
    loss, details = fast3r_loss(preds, gts)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert details["regr_global/00"] == pytest.approx((d0 + d1) / 2, rel=1e-6)


def test_global_term_uses_view_zero_camera_frame():
    """Moving the whole world by a rigid transform (and all poses with it) changes nothing."""
    preds, gts = random_scene()
    base, _ = fast3r_loss(preds, gts)
    move = torch.eye(4)
    q, _ = torch.linalg.qr(torch.randn(3, 3))
    move[:3, :3], move[:3, 3] = q * torch.linalg.det(q), torch.randn(3)
    moved = [{**g, "pts3d": g["pts3d"] @ move[:3, :3].T + move[:3, 3], "camera_pose": move @ g["camera_pose"]} for g in gts]
    again, _ = fast3r_loss(preds, moved)
    assert again.item() == pytest.approx(base.item(), rel=1e-4)


def test_invariant_to_scale_of_ground_truth_and_prediction():
    preds, gts = random_scene()
    base, _ = fast3r_loss(preds, gts)
    scaled_gt = [{**g, "pts3d": g["pts3d"] * 7.5,
                  "camera_pose": torch.cat([torch.cat([g["camera_pose"][:, :3, :3], g["camera_pose"][:, :3, 3:] * 7.5], -1),
                                            g["camera_pose"][:, 3:]], 1)} for g in gts]
    scaled_pred = [{**p, "pts3d_in_other_view": p["pts3d_in_other_view"] * 0.01, "pts3d_local": p["pts3d_local"] * 40}
                   for p in preds]
    for p, g in ((preds, scaled_gt), (scaled_pred, gts), (scaled_pred, scaled_gt)):
        assert fast3r_loss(p, g)[0].item() == pytest.approx(base.item(), rel=1e-5)


def test_invalid_pixels_are_ignored():
    preds, gts = random_scene()
    base, _ = fast3r_loss(preds, gts)
    corrupted = [{k: v.clone() for k, v in p.items()} for p in preds]
    for p, g in zip(corrupted, gts):
        invalid = ~g["valid_mask"]
        p["pts3d_in_other_view"][invalid] = 1e6
        p["pts3d_local"][invalid] = float("nan")
        p["conf"][invalid] = 1e9
    assert fast3r_loss(corrupted, gts)[0].item() == pytest.approx(base.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_ground_truth_at_invalid_pixels_is_ignored_with_finite_gradients(bad):
    """Missing depth is commonly stored as NaN/Inf; masked out, it must not reach the loss or its gradients."""
    preds, gts = random_scene()
    base, _ = fast3r_loss(preds, gts)
    holes = [{**g, "pts3d": g["pts3d"].clone()} for g in gts]
    for g in holes:
        g["pts3d"][~g["valid_mask"]] = bad
    leaves = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in preds]
    loss, details = fast3r_loss(leaves, holes)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    assert all(math.isfinite(v) for v in details.values())
    loss.backward()
    assert all(torch.isfinite(v.grad).all() for p in leaves for v in p.values())


def test_view_without_valid_pixels_contributes_zero():
    preds, gts = random_scene(views=2)
    gts[1]["valid_mask"][:] = False
    loss, details = fast3r_loss(preds, gts)
    assert details["conf_global/01"] == 0.0 and details["conf_local/01"] == 0.0
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((details["conf_global/00"] + details["conf_local/00"]) / 4, rel=1e-6)


def test_gradients_are_finite():
    preds, gts = random_scene()
    leaves = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in preds]
    loss, _ = fast3r_loss(leaves, gts)
    loss.backward()
    for p in leaves:
        for key, v in p.items():
            assert torch.isfinite(v.grad).all(), key
            assert v.grad.abs().sum() > 0, key


def test_mismatched_inputs_are_rejected():
    preds, gts = random_scene(views=2)
    with pytest.raises(ValueError, match="one of each per view"):
        fast3r_loss(preds, gts[:1])
