"""build_dataset / collate / to_model_inputs: determinism in (seed, i), batches of one resolution, the loss's inputs."""

import numpy as np
import pytest
import torch

import fast3r
from fast3r.train.data import DataError, build_dataset, collate, save_scene, synthetic_scene, to_model_inputs
from fast3r.train.data.dataset import SAMPLE_STREAM
from fast3r.train.data.sampling import RESOLUTIONS, color_jitter, crop_view

VIEWS = 3
SYNTHETIC = {"format": "synthetic", "scenes": 3, "seed": 1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The loss on a few 224 px views is small-op work: torch's threads only slow it on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset():
    return build_dataset([SYNTHETIC], views=VIEWS, size=224, batch_size=2, seed=3)


def same(a, b):
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_a_sample_has_the_contract_keys_types_and_shapes(dataset):
    sample = dataset[1]
    n, h, w = VIEWS, 224, 224
    expected = {"images": ((n, 3, h, w), torch.uint8), "pts3d": ((n, h, w, 3), torch.float32),
                "valid_mask": ((n, h, w), torch.bool), "camera_pose": ((n, 4, 4), torch.float32),
                "intrinsics": ((n, 3, 3), torch.float32), "masked_pixels": ((n,), torch.int64)}
    for key, (shape, dtype) in expected.items():
        assert sample[key].shape == shape and sample[key].dtype == dtype, key
    assert sample["scene"].startswith("synthetic-") and len(sample["names"]) == n
    assert sample["valid_mask"].all() and (sample["masked_pixels"] == 0).all()  # the synthetic room is closed
    assert sample["pts3d"].isfinite().all()


def test_samples_depend_on_seed_and_index_only(dataset):
    again = build_dataset([SYNTHETIC], views=VIEWS, size=224, batch_size=2, seed=3)
    order = [5, 0, 3]
    first = {i: dataset[i] for i in order}
    for i in reversed(order):  # another instance, another call order
        assert same(again[i], first[i])
    loader = torch.utils.data.DataLoader(again, batch_size=2, num_workers=2, collate_fn=collate)
    for b, batch in enumerate(loader):
        if b == 2:
            break
        for j in range(2):
            direct = dataset[2 * b + j]
            assert torch.equal(batch["images"][j], direct["images"]) and batch["names"][j] == direct["names"]
    other_seed = build_dataset([SYNTHETIC], views=VIEWS, size=224, batch_size=2, seed=4)
    assert not torch.equal(other_seed[0]["images"], first[0]["images"])


def test_indices_past_one_epoch_redraw_the_same_slots(dataset):
    later = dataset[len(dataset) + 1]
    assert later["scene"] == dataset[1]["scene"]
    assert not torch.equal(later["images"], dataset[1]["images"])
    with pytest.raises(IndexError):
        dataset[-1]


def test_samples_per_visit_puts_a_scenes_samples_one_after_another():
    entry = {"format": "synthetic", "scenes": 6, "views": 8, "size": [32, 32], "samples": 24}
    plain = build_dataset([entry], views=2, size=224, batch_size=4, seed=3)
    grouped = build_dataset([{**entry, "samples_per_visit": 4}], views=2, size=224, batch_size=4, seed=3)
    assert sorted(grouped.slots.tolist()) == sorted(plain.slots.tolist())  # the same slots, another order
    runs = grouped.slots.reshape(-1, 4)
    assert (runs == runs[:, :1]).all() and len(set(runs[:, 0].tolist())) == 6  # each batch: one scene, 4 samples
    assert not (plain.slots.reshape(-1, 4) == plain.slots.reshape(-1, 4)[:, :1]).all()
    # a scene's last run is shorter when its samples do not divide (5 = 2 + 2 + 1); none is lost
    odd = build_dataset([{**entry, "samples": 30, "samples_per_visit": 2}], views=2, size=224, seed=3)
    assert np.bincount(odd.slots).tolist() == [5] * 6
    with pytest.raises(ValueError, match="samples_per_visit"):
        build_dataset([{**entry, "samples_per_visit": 0}], views=2, size=224)


def test_jitter_none_keeps_the_colours_and_sample_gives_every_view_one_jitter():
    entry = {"format": "synthetic", "scenes": 2, "seed": 4, "views": 8, "size": [40, 48], "aug_crop": 0}
    index, views = 3, 3
    none = build_dataset([{**entry, "jitter": "none"}], views=views, size=224, seed=2)[index]
    shared = build_dataset([{**entry, "jitter": "sample"}], views=views, size=224, seed=2)[index]
    per_view = build_dataset([entry], views=views, size=224, seed=2)[index]
    scene = synthetic_scene(int(none["scene"].split("-")[1]), views=8, size=(40, 48))
    plain = [crop_view(scene.views[int(name[:5])], (224, 224), None)["image"] for name in none["names"]]
    for v in range(views):
        assert torch.equal(none["images"][v], torch.from_numpy(plain[v].copy()).permute(2, 0, 1))
    # "sample": the sample's generator draws the views, then one seed whose jitter every view gets
    rng = np.random.default_rng([2, SAMPLE_STREAM, index])
    rng.integers(0, 1), rng.choice(8, views, replace=False)
    seed = int(rng.integers(2**63))
    for v in range(views):
        expected = color_jitter(plain[v], np.random.default_rng(seed))
        assert torch.equal(shared["images"][v], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    assert shared["names"] == none["names"] == per_view["names"]  # the jitter changes colours, not the views
    assert not torch.equal(per_view["images"], shared["images"])


def test_a_block_of_batch_size_samples_shares_one_resolution():
    data = build_dataset([SYNTHETIC | {"size": [60, 80]}], views=2, size=512, batch_size=3, seed=0)
    resolutions = [data.resolution(i) for i in range(60)]
    for block in range(20):
        assert len(set(resolutions[3 * block: 3 * block + 3])) == 1
    assert len(set(resolutions)) >= 3 and set(resolutions) <= set(RESOLUTIONS[512])
    w, h = data.resolution(4)
    assert data[4]["images"].shape == (2, 3, h, w)
    val = build_dataset([SYNTHETIC | {"size": [60, 80]}], views=2, size=512, batch_size=3, split="val")
    assert {val.resolution(i) for i in range(30)} == {(512, 384)}


def test_validation_samples_are_plain_centre_crops():
    val = build_dataset([SYNTHETIC | {"size": [120, 160]}], views=2, size=224, split="val")[0]
    scene = synthetic_scene(int(val["scene"].split("-")[1]), views=24, size=(120, 160))
    plain = crop_view(scene.views[int(val["names"][0][:5])], (224, 224), None)  # no zoom, no jitter
    assert torch.equal(val["images"][0], torch.from_numpy(plain["image"].copy()).permute(2, 0, 1))


def test_the_world_frame_is_the_first_views_camera(dataset):
    sample = dataset[2]
    scene = synthetic_scene(int(sample["scene"].split("-")[1]), views=24, size=(224, 224))
    poses = [scene.cameras[int(name[:5])].cam2world for name in sample["names"]]
    for pose, got in zip(poses, sample["camera_pose"]):
        np.testing.assert_allclose(got.numpy(), np.linalg.inv(poses[0]) @ pose, atol=1e-5)


def test_collate_stacks_and_refuses_mixed_resolutions():
    data = build_dataset([SYNTHETIC | {"size": [60, 80]}], views=2, size=512, batch_size=1, seed=0)
    shapes = {}
    for i in range(40):
        shapes.setdefault(data.resolution(i), i)
        if len(shapes) == 2:
            break
    a, b = (data[i] for i in shapes.values())
    batch = collate([a, a])
    assert batch["pts3d"].shape == (2, *a["pts3d"].shape) and batch["scene"] == [a["scene"]] * 2
    assert batch["names"] == [a["names"], a["names"]] and batch["masked_pixels"].shape == (2, 2)
    with pytest.raises(ValueError, match=r"samples 0 and 1 of the batch differ in shape.*batch_size"):
        collate([a, b])


def test_ground_truth_as_prediction_is_the_loss_minimum(dataset):
    """With the prediction equal to the ground truth the distance terms are 0 and any perturbation costs more."""
    batch = collate([dataset[0], dataset[1]])
    images, gts = to_model_inputs(batch)
    assert images.shape == (2, VIEWS, 3, 224, 224) and images.dtype == torch.uint8
    assert len(gts) == VIEWS and set(gts[0]) == {"pts3d", "valid_mask", "camera_pose"}

    def predict(global_points, local_points):
        return [{"pts3d_in_other_view": g, "conf": torch.full(g.shape[:-1], 2.0), "pts3d_local": p,
                 "conf_local": torch.full(g.shape[:-1], 2.0)} for g, p in zip(global_points, local_points)]

    world = [gt["pts3d"] for gt in gts]  # the world frame is view 0's camera: the global head's frame
    local = [(gt["pts3d"] - gt["camera_pose"][:, None, None, :3, 3]) @ gt["camera_pose"][:, None, :3, :3]
             for gt in gts]
    best, details = fast3r.fast3r_loss(predict([3.0 * p for p in world], [0.5 * p for p in local]), gts)
    assert max(v for k, v in details.items() if k.startswith("regr_")) < 1e-5
    generator = torch.Generator().manual_seed(0)
    noise = [0.01 * torch.randn(p.shape, generator=generator) for p in world]
    turned = world[1] @ torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]).T
    perturbed = [
        predict([p + n for p, n in zip(world, noise)], local),
        predict(world, [p + n for p, n in zip(local, noise)]),
        predict([world[1], world[0], *world[2:]], local),
        predict([world[0], turned, *world[2:]], local),
    ]
    for preds in perturbed:
        assert fast3r.fast3r_loss(preds, gts)[0] > best + 1e-4


def test_to_model_inputs_moves_to_a_device(dataset):
    images, gts = to_model_inputs(collate([dataset[0]]), device="cpu")
    assert images.device.type == "cpu" and gts[-1]["camera_pose"].shape == (1, 4, 4)


def test_file_entries_glob_scenes_and_count_samples(tmp_path):
    for k in range(3):
        save_scene(synthetic_scene(k, views=6, size=(24, 32)), tmp_path / "set" / f"s{k}", "folder")
    (tmp_path / "set" / "notes.txt").write_text("not a scene")
    data = build_dataset([{"format": "folder", "path": str(tmp_path / "set"), "scenes": "*"}], views=3, size=224)
    assert len(data) == 3 * 2  # each scene: 6 views // 3
    assert {data[i]["scene"] for i in range(len(data))} == {str(tmp_path / "set" / f"s{k}") for k in range(3)}
    sized = build_dataset([{"format": "folder", "path": str(tmp_path / "set"), "scenes": ["s0", "s2"], "samples": 5,
                            "window": 4}], views=3, size=224)
    assert len(sized) == 5
    picks = [sorted(int(n[:5]) for n in sized[i]["names"]) for i in range(5)]
    assert all(p[-1] - p[0] < 4 for p in picks)  # views from a run of 4 consecutive ones


@pytest.mark.parametrize("entry, error, message", [
    ({"format": "ply", "path": "x"}, ValueError, "'format' must be one of"),
    ({"format": "synthetic", "scenes": 2, "colour": 1}, ValueError, r"unknown key\(s\) \['colour'\]"),
    ({"format": "synthetic", "scenes": 0}, ValueError, "'scenes' must be an integer >= 1"),
    ({"format": "synthetic", "scenes": 2, "views": 2}, DataError, "has 2 views, fewer than the 3"),
    ({"format": "synthetic", "scenes": 2, "size": [10]}, ValueError, r"'size' must be \[H, W\]"),
    ({"format": "synthetic", "scenes": 2, "jitter": "views"}, ValueError, "'jitter' must be one of 'view', 'sample'"),
    ({"format": "folder"}, ValueError, "needs 'path'"),
    ({"format": "folder", "path": "/nonexistent/x"}, DataError, "is not a directory"),
])
def test_bad_entries_are_named(entry, error, message):
    with pytest.raises(error, match=message):
        build_dataset([entry], views=3, size=224)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="size=300"):
        build_dataset([SYNTHETIC], size=300)
    with pytest.raises(ValueError, match="split='test'"):
        build_dataset([SYNTHETIC], split="test")
    with pytest.raises(ValueError, match="batch_size=0"):
        build_dataset([SYNTHETIC], batch_size=0)
    with pytest.raises(DataError, match="no scene directories match"):
        build_dataset([{"format": "folder", "path": "/tmp", "scenes": "no-such-*"}], views=2)
