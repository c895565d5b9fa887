"""Validation's metrics at their two ends: a model that returns the ground truth scores perfectly, one whose
cameras never move scores what identity poses score. So a run whose held-out metrics do not move has not
learned; the evaluation is not what holds them down."""

import contextlib

import pytest
import torch
import train_cases
from torch import nn

from fast3r.train.data import build_dataset
from fast3r.train.evaluate import evaluate_sample, identity_pose_metrics


@pytest.fixture(autouse=True)
def one_thread():
    yield from train_cases.one_cpu_thread()


@pytest.fixture(scope="module")
def held_out():
    return build_dataset([{"format": "synthetic", "scenes": 2, "seed": 100_000}], views=4, size=224, seed=0)


class GroundTruthModel(nn.Module):
    """Returns a sample's ground truth as its prediction, at arbitrary scales (the metrics align scale)."""

    def __init__(self, sample: dict, same_frame_for_every_view: bool = False):
        super().__init__()
        self.sample, self.same_frame = sample, same_frame_for_every_view

    def forward(self, images, image_ids=None):
        points, poses = self.sample["pts3d"].float(), self.sample["camera_pose"].float()
        to_view0 = torch.linalg.inv(poses[0])
        views = []
        for v in range(points.shape[0]):
            to_camera = to_view0 if self.same_frame else torch.linalg.inv(poses[v])
            valid = self.sample["valid_mask"][v][..., None].bool()
            in_view0 = torch.where(valid, points[v] @ to_view0[:3, :3].T + to_view0[:3, 3], 1.0)
            own = torch.where(valid, points[v] @ to_camera[:3, :3].T + to_camera[:3, 3], 1.0)
            conf = torch.full(points.shape[1:3], 5.0)[None]
            views.append({"pts3d_in_other_view": 2.0 * in_view0[None], "conf": conf,
                          "pts3d_local": 3.0 * own[None], "conf_local": conf})
        return views


def evaluate(model, sample, index):
    return evaluate_sample(model, sample, index, torch.device("cpu"), autocast=contextlib.nullcontext,
                           image_ids="random", cameras="procrustes")


def test_the_ground_truth_scores_perfectly(held_out):
    for index in range(len(held_out)):
        sample = held_out[index]
        metrics = evaluate(GroundTruthModel(sample), sample, index)
        assert metrics["RRA@15"] == metrics["RTA@15"] == metrics["mAA@30"] == 1.0, metrics
        assert metrics["accuracy"] < 1e-5 and metrics["completion"] < 1e-5, metrics


def test_cameras_that_never_move_score_the_identity_floor(held_out):
    """Local pointmaps in view 0's frame for every view: the recovered cameras are the identity."""
    floor = identity_pose_metrics(held_out)
    found = [evaluate(GroundTruthModel(held_out[i], same_frame_for_every_view=True), held_out[i], i)
             for i in range(len(held_out))]
    mean = {key: sum(m[key] for m in found) / len(found) for key in ("RRA@15", "RTA@15")}
    assert mean["RRA@15"] == pytest.approx(floor["RRA@15"], abs=1e-9) and floor["RRA@15"] < 1.0
    # The recovered translations are rounding noise around 0 (the floor's are exactly 0, no direction at
    # all), so a few of their random directions land within 15 degrees.
    assert floor["RTA@15"] == 0.0 and mean["RTA@15"] <= 0.2
