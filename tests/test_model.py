"""The reference model against the official implementation's golden outputs."""

import json
import math

import pytest
import torch
from golden import (
    FIXTURES,
    MODEL_FIXTURES,
    OUTPUT_KEYS,
    fixture_model_args,
    fixture_path,
    fixture_views,
    load_fixture,
    max_relative_error,
    recipe_state_dict,
)

from fast3r import Fast3R, Fast3RConfig
from fast3r.checkpoint import load_strict
from fast3r.fusion import image_index_embedding

GOLDEN_TOLERANCE = 1e-4  # fp32, max |ours - official| / max |official| per output and view


def golden_model(metadata: dict[str, str], backend: str = "torch") -> Fast3R:
    cfg = Fast3RConfig.from_official_args(**fixture_model_args(metadata))
    model = Fast3R(cfg, backend=backend)
    load_strict(model, recipe_state_dict(json.loads(metadata["state_dict_shapes"])), "recipe")
    return model.eval()


def test_every_model_fixture_is_covered():
    found = sorted(p.stem for p in FIXTURES.glob("official_*.safetensors") if p.stem != "official_loss_3v")
    if not found:
        pytest.skip(f"no fixtures under {FIXTURES}")
    assert found == sorted(MODEL_FIXTURES)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_golden_parity(name, backend):
    """Both backends reproduce the official outputs (the Triton kernels run in the interpreter here)."""
    metadata, tensors = load_fixture(name)
    model = golden_model(metadata, backend)
    views = fixture_views(tensors, metadata)
    with torch.inference_mode():
        out = model(views)
    assert len(out) == len(views)
    for i, view in enumerate(views):
        h, w = view.shape[-2:]
        for key in OUTPUT_KEYS:
            ref = tensors[f"view{i}.{key}"]
            assert out[i][key].shape == ref.shape == ((h, w, 3) if key.startswith("pts3d") else (h, w))
            assert out[i][key].dtype == torch.float32
            err = max_relative_error(out[i][key], ref)
            assert err <= GOLDEN_TOLERANCE, f"view {i} {key}: relative error {err:.2e}"


def test_tensor_and_list_inputs_agree():
    """(N, 3, H, W), a list of views and a batch of one scene give the same outputs."""
    model = Fast3R("tiny").eval()
    images = torch.rand(3, 3, 32, 48) * 2 - 1
    with torch.inference_mode():
        as_tensor = model(images)
        as_list = model(list(images), encoder_chunk=1, head_chunk=2)
        as_batch = model(images[None])
    for a, b, c in zip(as_tensor, as_list, as_batch):
        for key in OUTPUT_KEYS:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a[key], c[key][0], rtol=1e-5, atol=1e-5)


def test_uint8_images_are_normalized_to_unit_range():
    model = Fast3R("tiny").eval()
    rgb = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        from_uint8 = model(rgb)
        from_float = model(rgb.float() / 255 * 2 - 1)
    torch.testing.assert_close(from_uint8[1]["pts3d_local"], from_float[1]["pts3d_local"], rtol=1e-5, atol=1e-5)


def test_large_preset_matches_official_state_dict():
    with open(fixture_path("official_large_state_dict.json")) as f:
        official = json.load(f)
    cfg = Fast3RConfig.from_official_args(**official["config"])
    assert cfg == Fast3RConfig.preset("large")
    with torch.device("meta"):
        model = Fast3R("large")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == official["params"]


def test_image_index_embedding_extends_past_the_official_table():
    """Rows 0..999 are the official table; index 1000+ follows the same sin-cos formula."""
    dim = 16
    emb = image_index_embedding(torch.arange(1500), dim)
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    expected = torch.cat([torch.sin(1234.0 * omega), torch.cos(1234.0 * omega)]).float()
    torch.testing.assert_close(emb[1234], expected, rtol=0, atol=0)
    assert emb.shape == (1500, dim) and len(torch.unique(emb, dim=0)) == 1500


def test_more_than_a_thousand_views():
    model = Fast3R("tiny").eval()
    images = torch.rand(1100, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        out = model(images)
    assert len(out) == 1100
    last = out[-1]
    assert last["pts3d_in_other_view"].shape == (32, 32, 3)
    assert all(torch.isfinite(last[k]).all() for k in OUTPUT_KEYS)
    assert (last["conf"] > 1).all()


def test_random_image_ids_follow_official_scheme_and_seed():
    model = Fast3R("tiny").eval()
    ids = model._image_ids("random", seed=7, batch=2, num_views=5)
    assert (ids[:, 0] == 0).all() and ((ids[:, 1:] >= 1) & (ids[:, 1:] <= 999)).all()
    assert all(len(set(row.tolist())) == 5 for row in ids)
    assert torch.equal(ids, model._image_ids("random", seed=7, batch=2, num_views=5))
    many = model._image_ids("random", seed=1, batch=1, num_views=1200)
    assert len(set(many[0].tolist())) == 1200
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        a = model(images, image_ids="random", seed=3)
        b = model(images, image_ids=model._image_ids("random", 3, 1, 3)[0].clone())
        c = model(images)
    torch.testing.assert_close(a[2]["conf"], b[2]["conf"], rtol=0, atol=0)
    assert not torch.allclose(a[2]["conf"], c[2]["conf"])


def test_fusion_temperature_applies_in_eval_mode_only():
    model = Fast3R("tiny")  # head dim 64 in both encoder and fusion
    fusion_attn, encoder_attn = model.decoder.dec_blocks[0].attn, model.encoder.enc_blocks[0].attn
    assert fusion_attn.softmax_scale() == pytest.approx(64**-0.5)
    model.eval()
    assert fusion_attn.softmax_scale() == pytest.approx(64**-0.5 * math.sqrt(math.log(137) / math.log(20)))
    assert encoder_attn.softmax_scale() == pytest.approx(64**-0.5)


def test_gradients_flow_in_training_mode():
    model = Fast3R("tiny").train()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    sum(o["pts3d_in_other_view"].mean() + o["conf_local"].mean() for o in out).backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    # refinenet4 has no skip input, so its first residual unit is never used (as in the official model).
    assert unused and all(".refinenet4.resConfUnit1." in n for n in unused)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(2, 3, 30, 32), "multiple of the patch size"),
        (torch.rand(2, 4, 32, 32), "channels"),
        (torch.rand(3, 32, 32), "expected"),
        (torch.randint(0, 9, (2, 3, 32, 32), dtype=torch.int32), "dtype"),
        ([], "non-empty list"),
    ],
)
def test_bad_images_raise_clear_errors(bad, message):
    model = Fast3R("tiny").eval()
    with pytest.raises((ValueError, TypeError), match=message):
        model(bad)
