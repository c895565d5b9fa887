"""Gradient parity: one training step of ours against the official model's (issue 20).

The fixture (tests/fixtures/, made by benchmarks/fixtures/make_official_train_step.py with the
official code) holds a batch of 2 scenes x 3 views of 48x64, the image indices the official
decoder drew, its train-mode predictions, its loss, and every parameter's gradient (whole, or for
the heads' big convolutions: spaced rows plus every row's and column's sum; the generator's
docstring gives the layout). Ours runs the same step: the tiny model with the recipe weights, in
train mode, fp32, then ``fast3r_loss`` and backward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden import OUTPUT_KEYS, max_relative_error, recipe_state_dict
from safetensors import safe_open

from fast3r import Fast3R, Fast3RConfig, fast3r_loss
from fast3r.checkpoint import load_strict

FIXTURE = Path(__file__).parent / "fixtures" / "official_train_step_tiny.safetensors"
GRAD_TOLERANCE = 1e-4  # per parameter (and per stored piece): max |ours - official| / max |official|
OUTPUT_TOLERANCE = 1e-4  # the golden forward tests' tolerance
LOSS_TOLERANCE = 1e-5  # relative, on the scalar loss and on each of its 2N terms


@pytest.fixture(scope="module")
def official():
    with safe_open(str(FIXTURE), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def train_step(metadata: dict[str, str], tensors: dict[str, torch.Tensor], backend: str):
    """Our model and its predictions, loss and loss details after one forward + backward on the fixture's batch."""
    model = Fast3R(Fast3RConfig.from_official_args(**json.loads(metadata["config"])), backend=backend)
    load_strict(model, recipe_state_dict(json.loads(metadata["state_dict_shapes"])), "recipe")
    assert model.training  # a new model trains: no fusion temperature, as in the official training step
    preds = model(tensors["images"], image_ids=tensors["image_ids"])
    gts = [
        {"pts3d": tensors[f"gt{i}.pts3d"], "valid_mask": tensors[f"gt{i}.valid_mask"].bool(),
         "camera_pose": tensors[f"gt{i}.camera_pose"]}
        for i in range(int(metadata["views"]))
    ]
    loss, details = fast3r_loss(preds, gts)
    loss.backward()
    return model, preds, loss, details


def gradient_errors(model: Fast3R, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of every stored gradient piece, keyed ``<parameter>`` or ``<parameter>:<piece>``.

    Elements: max |ours - official| / max |official|. Sums over an axis: max |ours - official| / max of
    the official sums of |grad| (a sum that cancels to ~0, as the patch embedding's over its output
    channels does exactly, holds only rounding noise: its own maximum is no scale).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    errors = {}
    for key, layout in json.loads(metadata["gradient_layout"]).items():
        grad = params[key].grad
        assert grad is not None, f"{key}: no gradient in ours, the official step has one"
        assert grad.shape == params[key].shape and torch.isfinite(grad).all(), key
        if layout == "full":
            errors[key] = max_relative_error(grad, tensors[f"grad.{key}"])
            continue
        rows = tensors[f"grad.{key}.row_index"]
        errors[f"{key}:rows"] = max_relative_error(grad[rows], tensors[f"grad.{key}.rows"])
        for axis, ours in (("row", grad.double().flatten(1).sum(1)), ("col", grad.double().sum(0))):
            ref, scale = tensors[f"grad.{key}.{axis}_sum"], tensors[f"grad.{key}.{axis}_abs_sum"]
            errors[f"{key}:{axis}_sum"] = ((ours - ref.double()).abs().max() / scale.double().max()).item()
    return errors


def check_step(metadata: dict[str, str], tensors: dict[str, torch.Tensor], backend: str) -> None:
    model, preds, loss, details = train_step(metadata, tensors, backend)

    for i, pred in enumerate(preds):  # the forward first: a mismatch here explains any below
        for key in OUTPUT_KEYS:
            err = max_relative_error(pred[key].detach(), tensors[f"pred{i}.{key}"])
            assert err <= OUTPUT_TOLERANCE, f"view {i} {key}: train-mode output relative error {err:.2e}"

    official_loss = tensors["loss"].item()
    assert abs(loss.item() - official_loss) <= LOSS_TOLERANCE * abs(official_loss), (loss.item(), official_loss)
    official_terms = json.loads(metadata["details"])
    for name, ours in details.items():  # conf_global/00 <-> ConfLossMultiviewV2_conf_loss_global/00, ...
        kind, term = name.split("_", 1)
        prefix = "ConfLossMultiviewV2_conf_loss_" if kind == "conf" else "Regr3DMultiviewV3_pts3d_loss_"
        ref = official_terms[prefix + term]
        assert abs(ours - ref) <= LOSS_TOLERANCE * abs(ref), f"{name}: ours {ours}, official {ref}"
    assert len(details) == len(official_terms)

    stored, no_grad = json.loads(metadata["gradient_layout"]), json.loads(metadata["no_grad"])
    assert sorted(k for k, _ in model.named_parameters()) == sorted([*stored, *no_grad])
    params = dict(model.named_parameters())
    for key in no_grad:  # the official loss never reaches them (refinenet4's unused residual unit)
        assert params[key].grad is None or not params[key].grad.any(), f"{key}: ours has a gradient, official none"
    for alias, key in json.loads(metadata["aliases"]).items():
        assert dict(model.named_parameters(remove_duplicate=False))[alias] is params[key], alias

    errors = gradient_errors(model, metadata, tensors)
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    print(f"{backend}: worst gradient errors", ", ".join(f"{k} {e:.2e}" for k, e in worst))
    bad = {k: e for k, e in errors.items() if e > GRAD_TOLERANCE}
    assert not bad, f"{len(bad)} gradients beyond {GRAD_TOLERANCE}: {sorted(bad.items(), key=lambda kv: -kv[1])[:10]}"


def test_fixture_is_the_official_tiny_training_step(official):
    """The fixture is what the issue asks for: official tiny config, B=2 x N=3 views, random ids, a real batch."""
    metadata, tensors = official
    config = json.loads(metadata["config"])
    enc, dec = config["encoder_args"], config["decoder_args"]
    assert (enc["embed_dim"], enc["num_heads"], enc["depth"]) == (128, 2, 2)
    assert (dec["embed_dim"], dec["num_heads"], dec["depth"], dec["random_image_idx_embedding"]) == (128, 2, 10, True)
    assert config["head_args"]["with_local_head"]
    assert tensors["images"].shape == (2, 3, 3, 48, 64)
    ids = tensors["image_ids"]
    assert ids.shape == (2, 3) and (ids[:, 0] == 0).all() and (ids[:, 1:] > 0).all()
    masks = torch.stack([tensors[f"gt{i}.valid_mask"] for i in range(3)]).bool()
    assert 0.5 < masks.float().mean() < 0.95  # some invalid pixels, most valid
    layout = json.loads(metadata["gradient_layout"])
    assert len(layout) + len(json.loads(metadata["no_grad"])) == 280


def test_torch_backend_gradients_match_official(official):
    check_step(*official, "torch")


def test_triton_backend_gradients_match_official(official):
    """The Triton kernels' forward and backward (the interpreter on a CPU) against the same fixture."""
    check_step(*official, "triton")
