"""``Fast3RConfig.fusion_positions``: each token's patch row and column embedded before the fusion blocks.

Off in the released model; the opt-in for from-scratch models (the learning run). Checked: the embedding's values
against the sin-cos formula written out, that the fusion's input is exactly encoder projection + image index +
position (fast and lean plans), and that a checkpoint keeps the setting.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fast3r import Fast3R, Fast3RConfig
from fast3r.fusion import image_index_embedding, patch_position_embedding
from fast3r.layers import InPlace

TINY_POSITIONS = dataclasses.replace(Fast3RConfig.preset("tiny"), fusion_positions=True)


def _sincos(value: int, dim: int) -> list[float]:
    freqs = [1.0 / 10000 ** (i / (dim / 2)) for i in range(dim // 2)]
    return [math.sin(value * f) for f in freqs] + [math.cos(value * f) for f in freqs]


def test_the_embedding_holds_row_then_column_of_each_views_grid():
    grids, dim = [(2, 3), (3, 1)], 8
    emb = patch_position_embedding(grids, dim, torch.device("cpu"))
    expected = [_sincos(r, dim // 2) + _sincos(c, dim // 2) for gh, gw in grids for r in range(gh) for c in range(gw)]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lean", [False, True])
def test_the_fusion_input_is_projection_plus_index_plus_position(lean):
    torch.manual_seed(0)
    model = Fast3R(TINY_POSITIONS).eval()
    grids = [(2, 3), (2, 3), (3, 2)]
    sizes = [gh * gw for gh, gw in grids]
    tokens, ids = torch.randn(2, sum(sizes), 128), torch.tensor([[0, 5, 9], [0, 2, 7]])
    seen = []
    model.decoder.dec_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))  # -> None
    with torch.inference_mode():
        expected = model.decoder.decoder_embed(tokens)
        index = image_index_embedding(ids, 128).repeat_interleave(torch.tensor(sizes), dim=1)
        expected = expected + index + patch_position_embedding(grids, 128, tokens.device)
        plan = InPlace(queries=4, mlp=4) if lean else None
        model.decoder(tokens.clone(), sizes, ids, None, plan, grids)
    torch.testing.assert_close(seen[0], expected, rtol=1e-6, atol=1e-6)


def test_a_model_with_positions_needs_the_grids_and_they_change_its_output():
    torch.manual_seed(0)
    model = Fast3R(TINY_POSITIONS).eval()
    tokens, ids = torch.randn(1, 12, 128), torch.arange(2)[None]
    with pytest.raises(ValueError, match="pass grids"):
        model.decoder(tokens, [6, 6], ids)
    with pytest.raises(ValueError, match="pass grids"):
        model.decoder(tokens, [6, 6], ids, grids=[(2, 2), (2, 2)])
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    plain = Fast3R("tiny").eval()
    plain.load_state_dict(model.state_dict())  # no new parameters: the same weights load either way
    with torch.inference_mode():
        with_positions, without = model(images)[1]["pts3d_in_other_view"], plain(images)[1]["pts3d_in_other_view"]
    assert (with_positions - without).abs().max() > 1e-3


def test_save_pretrained_keeps_fusion_positions_and_a_later_official_save_drops_the_yaml(tmp_path):
    torch.manual_seed(0)
    model = Fast3R(TINY_POSITIONS).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "fast3r_config.yaml").is_file()
    loaded = Fast3R.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.fusion_positions
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images)[1]["conf"], model(images)[1]["conf"], rtol=0, atol=0)
    Fast3R("tiny").save_pretrained(tmp_path / "ckpt")  # the same directory, an architecture config.json describes
    assert not (tmp_path / "ckpt" / "fast3r_config.yaml").exists()
    assert not Fast3R.from_pretrained(tmp_path / "ckpt").config.fusion_positions
