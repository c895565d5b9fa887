"""The training objective against the official value and hand-computed cases."""

import json
import math

import pytest
import torch
from golden import load_fixture
from op_log import OpLog

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


def per_view_reference(preds, gts, alpha=0.2):
    """The objective written view by view, as in the official code (any size per view): the reference the
    stacked implementation is checked against."""
    def frame(matrix, points):
        return points @ matrix[:, None, :3, :3].transpose(-1, -2) + matrix[:, None, None, :3, 3]

    def mean_norm(points, masks):
        total = sum((p.norm(dim=-1) * m).flatten(1).sum(1) for p, m in zip(points, masks))
        return total / sum(m.flatten(1).sum(1) for m in masks)

    def term(pred, gt, pred_scale, gt_scale, conf, mask):
        d = (pred / pred_scale[:, None, None, None] - gt / gt_scale[:, None, None, None]).norm(dim=-1)
        return ((conf * d - alpha * conf.log()) * mask).sum() / mask.sum()

    masks = [gt["valid_mask"].double() for gt in gts]
    anchor = torch.linalg.inv(gts[0]["camera_pose"].double())
    gt_global = [frame(anchor, gt["pts3d"].double()) for gt in gts]
    pred_global = [p["pts3d_in_other_view"].double() for p in preds]
    scales = mean_norm(pred_global, masks), mean_norm(gt_global, masks)
    terms = [term(p, g, *scales, pred["conf"].double(), m) for p, g, pred, m in zip(pred_global, gt_global, preds, masks)]
    for pred, gt, m in zip(preds, gts, masks):
        local_gt = frame(torch.linalg.inv(gt["camera_pose"].double()), gt["pts3d"].double())
        local_pred = pred["pts3d_local"].double()
        terms.append(term(local_pred, local_gt, mean_norm([local_pred], [m]), mean_norm([local_gt], [m]),
                          pred["conf_local"].double(), m))
    return torch.stack(terms).mean()


def test_views_of_different_sizes_match_the_per_view_definition(fresh_seed):
    """Views are stacked per image size: a scene whose views differ in size gives the per-view value."""
    torch.manual_seed(fresh_seed)
    small, large = random_scene(views=3, h=6, w=7), random_scene(views=2, h=9, w=5)
    preds = [small[0][0], large[0][0], small[0][1], large[0][1], small[0][2]]
    gts = [small[1][0], large[1][0], small[1][1], large[1][1], small[1][2]]
    loss, details = fast3r_loss(preds, gts)
    assert loss.item() == pytest.approx(per_view_reference(preds, gts).item(), rel=1e-5)
    same, _ = fast3r_loss(*random_scene(views=5))
    assert same.item() > 0 and len(details) == 4 * 5


def test_kernels_launched_do_not_grow_with_the_views():
    """The loss issues the same ops at 4 and 16 views, its backward a few more per view (splitting the stacked
    gradients): per-view Python cost ~300 kernels a view, 0.12 s of a 32-view step on an H200."""
    counts = []
    for views in (4, 16):
        preds, gts = random_scene(views=views)
        for pred in preds:
            for tensor in pred.values():
                tensor.requires_grad_()
        with OpLog() as forward:
            loss, _ = fast3r_loss(preds, gts)
        with OpLog() as backward:
            loss.backward()
        counts.append((len(forward.ops), len(backward.ops)))
    (forward_4, backward_4), (forward_16, backward_16) = counts
    assert forward_4 == forward_16 and backward_16 - backward_4 <= 16 * 12, counts
