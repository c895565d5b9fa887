"""The point distance split by what each part needs learned (fast3r.train.distances), in the loss and in a run."""

import pytest
import torch
import train_cases
from train_cases import ONE_HELD_OUT_SAMPLE, small_config

from fast3r import fast3r_loss
from fast3r.train import train
from fast3r.train.distances import PARTS, point_distances
from fast3r.train.logging import read_metrics


@pytest.fixture(autouse=True)
def one_thread():
    yield from train_cases.one_cpu_thread()


def rigid(batch):
    pose = torch.eye(4).repeat(batch, 1, 1)
    q, _ = torch.linalg.qr(torch.randn(batch, 3, 3, dtype=torch.float64))
    pose[:, :3, :3] = (q * torch.linalg.det(q)[:, None, None]).float()
    pose[:, :3, 3] = torch.randn(batch, 3)
    return pose


def exact_predictions(batch=2, views=3, h=5, w=6):
    """Ground truth of random cameras, and the predictions that match it: global in view 0's frame, local in each own."""
    gts, preds = [], []
    poses = [rigid(batch) for _ in range(views)]
    to_anchor = torch.linalg.inv(poses[0])
    for pose in poses:
        world = torch.randn(batch, h, w, 3) * 3
        gts.append({"pts3d": world, "camera_pose": pose, "valid_mask": torch.rand(batch, h, w) > 0.3})
        in_frame = [torch.linalg.inv(pose), to_anchor]
        local, global_ = ((world @ m[:, None, :3, :3].transpose(-1, -2) + m[:, None, None, :3, 3]) for m in in_frame)
        preds.append({"pts3d_in_other_view": global_, "conf": 1 + torch.rand(batch, h, w),
                      "pts3d_local": local, "conf_local": 1 + torch.rand(batch, h, w)})
    return preds, gts


def test_wrong_cameras_show_in_the_other_views_part_alone():
    """Views 1.. turned about view 0's centre (norms kept, so the scene's scale too): only regr_others moves."""
    torch.manual_seed(0)
    preds, gts = exact_predictions()
    turn = rigid(1)[0, :3, :3]
    for view in preds[1:]:
        view["pts3d_in_other_view"] = view["pts3d_in_other_view"] @ turn.T
    _, details = fast3r_loss(preds, gts)
    parts = point_distances(details)
    assert parts["regr_anchor"] < 1e-5 and parts["regr_local"] < 1e-5
    assert parts["regr_others"] > 0.1
    regr = [v for k, v in details.items() if k.startswith("regr_")]
    assert parts["regr"] == pytest.approx(sum(regr) / len(regr), rel=1e-12)
    assert parts["regr"] == pytest.approx((parts["regr_anchor"] + 2 * parts["regr_others"] + 3 * parts["regr_local"]) / 6)


def test_a_wrong_shape_shows_in_every_part():
    torch.manual_seed(1)
    preds, gts = exact_predictions()
    for view in preds:
        for key in ("pts3d_in_other_view", "pts3d_local"):
            view[key] = view[key] + torch.randn_like(view[key])
    parts = point_distances(fast3r_loss(preds, gts)[1])
    assert all(parts[key] > 0.05 for key in PARTS), parts


def test_parts_without_a_term_are_none():
    torch.manual_seed(2)
    preds, gts = exact_predictions(views=1)
    one_view = point_distances(fast3r_loss(preds, gts)[1])
    assert one_view["regr_others"] is None and one_view["regr_anchor"] is not None
    no_local = [{key: v[key] for key in ("pts3d_in_other_view", "conf")} for v in preds]
    parts = point_distances(fast3r_loss(no_local, gts)[1])
    assert parts["regr_local"] is None and parts["regr"] == parts["regr_anchor"]


@pytest.mark.parametrize("local_head", [True, False])
def test_a_run_logs_the_parts_in_training_and_validation(tmp_path, local_head):
    """4 views: regr is the mean of the 8 (or 4) terms; a part with no term is null in training, absent in validation."""
    model = {**train_cases.SMALL_MODEL, "with_local_head": local_head}
    train(small_config(tmp_path, model=model, steps=2, val_data=ONE_HELD_OUT_SAMPLE, val_views=2, val_every=2,
                       val_cameras="procrustes" if local_head else "pnp"))
    records = read_metrics(tmp_path)
    steps = [r for r in records if r["kind"] == "train"]
    vals = [r for r in records if r["kind"] == "val"]
    assert len(steps) == 2 and len(vals) == 2
    for r in steps:
        terms = r["regr_anchor"] + 3 * r["regr_others"] + (4 * r["regr_local"] if local_head else 0)
        assert r["regr"] == pytest.approx(terms / (8 if local_head else 4), rel=1e-9)
        assert (r["regr_local"] is None) is not local_head
    for r in vals:
        assert all(r[key] > 0 for key in ("regr", "regr_anchor", "regr_others"))
        assert ("regr_local" in r) is local_head
