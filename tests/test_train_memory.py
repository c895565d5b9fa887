"""The training memory estimate behind the out-of-memory message: against the H200's measured peaks, against
the bytes autograd really keeps in our layers on the CPU, and the advice it gives."""

import re

import pytest
import torch
import train_cases

from fast3r import Fast3R, fast3r_loss
from fast3r.config import Fast3RConfig
from fast3r.train.memory_plan import StepShape, most_views, out_of_memory_message, step_bytes


@pytest.fixture(autouse=True)
def one_thread():
    yield from train_cases.one_cpu_thread()


LARGE_PARAMS = 647_550_000
GIB = 2**30


def shape(views, mode="none", hw=(384, 512), params=LARGE_PARAMS, precision="bf16-mixed", **extra):
    return StepShape(views, *hw, 1, mode, precision, params, params, **extra)


@pytest.mark.parametrize(("views", "measured_gib"), [(8, 22), (16, 36), (32, 63), (64, 117)])
def test_estimate_matches_the_measured_h200_peaks(views, measured_gib):
    """TRAINING.md: ours, bf16 autocast, large, 512x384, one AdamW step, no checkpointing; within 12%."""
    assert step_bytes(Fast3RConfig(), shape(views)) / GIB == pytest.approx(measured_gib, rel=0.12)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32"])
def test_per_view_bytes_match_what_autograd_keeps(precision):
    """The tiny preset (other widths than the large model the constants came from), 224 px: the bytes kept for
    backward per added view, counted by saved_tensors_hooks, within 25% of the estimate's."""
    torch.manual_seed(0)
    config = Fast3RConfig.preset("tiny")
    model = Fast3R(config).train()
    counted = {}
    for views in (1, 2):
        seen = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        images = torch.randint(0, 256, (1, views, 3, 224, 224), dtype=torch.uint8)
        gts = [{"pts3d": torch.randn(1, 224, 224, 3), "valid_mask": torch.ones(1, 224, 224, dtype=torch.bool),
                "camera_pose": torch.eye(4)[None]} for _ in range(views)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                preds = model(images, encoder_chunk=views, head_chunk=views)
            fast3r_loss(preds, gts)
        counted[views] = sum(seen.values())
    params = sum(p.numel() for p in model.parameters())
    estimated = [step_bytes(config, shape(v, hw=(224, 224), params=params, precision=precision)) for v in (1, 2)]
    assert (counted[2] - counted[1]) == pytest.approx(estimated[1] - estimated[0], rel=0.25)


def test_checkpointing_lowers_the_estimate_and_most_views_is_exact():
    cfg = Fast3RConfig()
    needs = [step_bytes(cfg, shape(256, mode)) for mode in ("none", "blocks", "full")]
    assert needs[0] > 4 * needs[1] > 4 * needs[2]
    for mode in ("none", "blocks", "full"):
        limit = 120 * GIB
        most = most_views(cfg, shape(1, mode), limit)
        assert step_bytes(cfg, shape(most, mode)) <= limit < step_bytes(cfg, shape(most + 1, mode))
    assert most_views(cfg, shape(1, "full"), 120 * GIB) > most_views(cfg, shape(1, "blocks"), 120 * GIB)


def test_message_names_the_setting_that_fits():
    text = out_of_memory_message(Fast3RConfig(), shape(128), 141 * GIB, 512)
    assert text.startswith("out of GPU memory in a training step: views=128 at size=512 (384x512), batch_size=1, "
                           "checkpointing=none, precision=bf16-mixed, on a 141.0 GiB GPU.")
    assert "Set checkpointing: blocks (estimated" in text
    assert re.search(r"views <= 6\d with checkpointing: none", text)  # about 70 views fit without checkpointing
    hopeless = out_of_memory_message(Fast3RConfig(), shape(5000, "full"), 141 * GIB, 512)
    assert "Set checkpointing" not in hopeless and "Fewer views would fit" in hopeless
