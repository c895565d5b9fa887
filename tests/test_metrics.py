"""Pose and pointmap metrics on hand-computed cases."""

import math

import pytest
import torch
from scenes import random_rotation

from fast3r import metrics


def pose(rotation=None, centre=(0.0, 0.0, 0.0)):
    out = torch.eye(4, dtype=torch.float64)
    if rotation is not None:
        out[:3, :3] = rotation
    out[:3, 3] = torch.tensor(centre, dtype=torch.float64)
    return out


def rot_y(degrees):
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]],
                        dtype=torch.float64)


def three_cameras():
    return torch.stack([pose(), pose(rot_y(20), (1.0, 0.0, 0.0)), pose(rot_y(-30), (0.0, 0.5, 2.0))])


def test_rotating_one_camera_about_its_centre():
    gt = three_cameras()
    pred = gt.clone()
    pred[2, :3, :3] = gt[2, :3, :3] @ rot_y(10)  # camera 2 turned 10 degrees about its own y axis
    rotation, translation = metrics.relative_pose_errors(pred, gt)
    torch.testing.assert_close(rotation, torch.tensor([0.0, 10.0, 10.0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(translation, torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    result = metrics.pose_metrics(pred, gt)
    assert result["RRA@5"] == pytest.approx(1 / 3) and result["RRA@15"] == 1.0 and result["RTA@5"] == 1.0
    # max errors 0, 10, 10: below t for t = 1..10 only the first pair, for t = 11..30 all three
    assert result["mAA@30"] == pytest.approx((10 * (1 / 3) + 20 * 1.0) / 30)


def test_translation_direction_error_ignores_scale_and_sign():
    gt = torch.stack([pose(), pose(centre=(1.0, 0.0, 0.0))])
    moved = torch.stack([pose(), pose(centre=(1.0, 1.0, 0.0))])
    _, translation = metrics.relative_pose_errors(moved, gt)
    assert float(translation[0]) == pytest.approx(45.0)
    scaled_and_flipped = torch.stack([pose(), pose(centre=(-7.0, 0.0, 0.0))])
    rotation, translation = metrics.relative_pose_errors(scaled_and_flipped, gt)
    assert float(translation[0]) == pytest.approx(0.0, abs=1e-6) and float(rotation[0]) == 0.0


def test_errors_do_not_depend_on_the_world_frame(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    gt = torch.stack([pose(random_rotation(180, g), torch.randn(3, generator=g).tolist()) for _ in range(5)])
    world = pose(random_rotation(180, g), torch.randn(3, generator=g).tolist())
    pred = world @ gt  # a rigid change of world frame, then a global scale of the positions
    pred[:, :3, 3] *= 3.0
    rotation, translation = metrics.relative_pose_errors(pred, gt)
    assert float(rotation.max()) < 1e-5 and float(translation.max()) < 1e-5
    assert metrics.pose_metrics(pred, gt) == {"RRA@5": 1.0, "RTA@5": 1.0, "RRA@15": 1.0, "RTA@15": 1.0,
                                              "RRA@30": 1.0, "RTA@30": 1.0, "mAA@30": 1.0}


def test_rotation_angle_is_accurate_near_zero_and_180():
    for degrees in (1e-4, 0.01, 37.0, 179.9, 180.0):
        assert float(metrics.rotation_angle_deg(rot_y(degrees))) == pytest.approx(degrees, rel=1e-6, abs=1e-9)


def test_pose_auc_by_hand():
    rotation = torch.tensor([0.5, 3.0, 40.0, 12.0], dtype=torch.float64)
    translation = torch.tensor([2.5, 1.0, 0.0, 29.5], dtype=torch.float64)
    # max errors 2.5, 3, 40, 29.5 -> below t: t=1,2: 0; t=3: 1; t=4..29: 2; t=30: 3 (of 4 pairs)
    expected = (0 + 0 + 1 + 26 * 2 + 3) / 4 / 30
    assert metrics.pose_auc(rotation, translation) == pytest.approx(expected)


def test_accuracy_and_completion_by_hand():
    gt = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], dtype=torch.float64)
    pred = torch.tensor([[0, 0, 0], [0, 0, 0], [2, 0, 0], [3, 0, 0.5]], dtype=torch.float64)
    result = metrics.pointmap_accuracy_completion(pred, gt, align=False)
    # accuracy: pred -> nearest gt: 0, 0, 0, 0.5; completion: gt -> nearest pred: 0, 1, 0, 0.5
    assert result == pytest.approx({"accuracy": 0.125, "accuracy_median": 0.0,
                                    "completion": 0.375, "completion_median": 0.25})


def test_alignment_removes_a_similarity(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    gt = torch.randn(4, 6, 5, 3, generator=g, dtype=torch.float64)
    pred = 2.5 * gt @ random_rotation(180, g).T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    pred[0, 0, 0] = float("nan")  # left out, with its ground truth
    aligned = metrics.pointmap_accuracy_completion(pred.float(), gt.float(), weights=torch.rand(4, 6, 5, generator=g))
    assert max(aligned.values()) < 1e-5
    raw = metrics.pointmap_accuracy_completion(pred, gt, align=False)
    assert raw["accuracy"] > 0.1


def test_nearest_neighbours_match_brute_force_across_blocks(monkeypatch, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    query, reference = torch.randn(103, 3, generator=g), torch.randn(61, 3, generator=g)
    expected = (query[:, None] - reference[None]).norm(dim=-1).min(dim=1).values
    monkeypatch.setattr(metrics, "NEIGHBOR_BLOCK", 200)  # forces several query and reference blocks
    torch.testing.assert_close(metrics.nearest_neighbor_distances(query, reference), expected)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2 views"):
        metrics.relative_pose_errors(torch.eye(4)[None], torch.eye(4)[None])
    with pytest.raises(ValueError, match=r"expected \(N, 4, 4\)"):
        metrics.pose_metrics(torch.eye(4), torch.eye(4))
    with pytest.raises(ValueError, match="same pixels"):
        metrics.pointmap_accuracy_completion(torch.zeros(5, 3), torch.zeros(4, 3))


def rotations_about_one_centre():
    """Three cameras turning about one point (a tripod pan): no ground-truth baseline at all."""
    return torch.stack([pose(rot_y(0), (1.0, 2.0, 3.0)), pose(rot_y(25), (1.0, 2.0, 3.0)),
                        pose(rot_y(-40), (1.0, 2.0, 3.0))])


def test_a_perfect_prediction_of_coincident_cameras_scores_perfectly(fresh_seed):
    """No baseline in the ground truth and none predicted: the translations agree (error 0), with a warning."""
    g = torch.Generator().manual_seed(fresh_seed)
    gt = rotations_about_one_centre()
    pred = pose(random_rotation(180, g), torch.randn(3, generator=g).tolist()) @ gt  # another world frame
    with pytest.warns(UserWarning, match="3 of 3 pairs have coincident ground-truth camera centres"):
        result = metrics.pose_metrics(pred, gt)
    assert result == {"RRA@5": 1.0, "RTA@5": 1.0, "RRA@15": 1.0, "RTA@15": 1.0, "RRA@30": 1.0, "RTA@30": 1.0,
                      "mAA@30": 1.0}


def test_a_predicted_baseline_where_the_ground_truth_has_none_is_a_miss():
    gt = rotations_about_one_centre()
    pred = gt.clone()
    pred[1, :3, 3] += torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)  # camera 1 moved away
    with pytest.warns(UserWarning, match="coincident ground-truth camera centres"):
        _, translation = metrics.relative_pose_errors(pred, gt)
    torch.testing.assert_close(translation, torch.tensor([90.0, 0.0, 90.0], dtype=torch.float64))


def test_non_finite_predicted_poses_warn_and_count_as_misses():
    gt = three_cameras()
    pred = gt.clone()
    pred[1] = float("nan")
    with pytest.warns(UserWarning, match=r"pred_cam2world of view 1 is not finite.*misses"):
        result = metrics.pose_metrics(pred, gt)
    assert result["RRA@30"] == pytest.approx(1 / 3) and result["RTA@30"] == pytest.approx(1 / 3)
    assert result["mAA@30"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("which", ["gt_cam2world", "pred_cam2world"])
@pytest.mark.parametrize("defect, message", [
    (lambda p: p.__setitem__((0, 1), 0.4), "not a rotation"),
    (lambda p: p.__setitem__((slice(0, 3), slice(0, 3)), 3 * p[:3, :3]), "not a rotation"),
    (lambda p: p.__setitem__((3, 0), 1.0), r"last row other than \[0, 0, 0, 1\]"),
])
def test_non_rigid_poses_are_refused(which, defect, message):
    poses = {"gt_cam2world": three_cameras(), "pred_cam2world": three_cameras()}
    defect(poses[which][2])
    with pytest.raises(ValueError, match=rf"{which} of view 2 is not rigid.*{message}"):
        metrics.pose_metrics(poses["pred_cam2world"], poses["gt_cam2world"])


def test_non_finite_ground_truth_poses_are_refused():
    gt = three_cameras()
    gt[0, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="gt_cam2world of view 0 is not finite"):
        metrics.pose_metrics(three_cameras(), gt)


def test_pose_auc_refuses_mismatched_errors_and_empty_thresholds():
    with pytest.raises(ValueError, match="one translation error per rotation error"):
        metrics.pose_auc(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="max_threshold=0"):
        metrics.pose_auc(torch.zeros(3), torch.zeros(3), max_threshold=0)


def cloud(fresh_seed, n=50):
    g = torch.Generator().manual_seed(fresh_seed)
    gt = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return 2.0 * gt + 1.0, gt


@pytest.mark.parametrize("weights, message", [
    (lambda n: torch.zeros(n), "weights are zero at every point"),
    (lambda n: -torch.ones(n), "negative"),
    (lambda n: torch.ones(n + 1), r"weights have shape \(51,\)"),
    (lambda n: torch.eye(n)[0] + torch.eye(n)[1], "only 2 points have a positive weight"),
])
def test_degenerate_alignment_weights_are_refused(fresh_seed, weights, message):
    pred, gt = cloud(fresh_seed)
    with pytest.raises(ValueError, match=message):
        metrics.pointmap_accuracy_completion(pred, gt, weights=weights(len(gt)))


def test_collinear_points_cannot_be_aligned(fresh_seed):
    line = torch.linspace(0, 1, 20, dtype=torch.float64)[:, None] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="collinear"):
        metrics.pointmap_accuracy_completion(line * 2, line)
    assert metrics.pointmap_accuracy_completion(line * 2, line, align=False)["accuracy"] > 0
