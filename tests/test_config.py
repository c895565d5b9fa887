"""Presets and the three ways a configuration is read: YAML, official config.json, dicts."""

import dataclasses

import pytest

from fast3r import Fast3RConfig


def test_presets():
    large, tiny = Fast3RConfig.preset("large"), Fast3RConfig.preset("tiny")
    assert (large.enc_dim, large.enc_depth, large.fusion_depth, large.head_hooks) == (1024, 24, 24, (0, 12, 18, 24))
    assert (tiny.enc_dim, tiny.enc_heads, tiny.fusion_depth, tiny.head_hooks) == (128, 2, 10, (0, 5, 7, 10))
    with pytest.raises(ValueError, match="unknown preset"):
        Fast3RConfig.preset("huge")


@pytest.mark.parametrize("name", ["large", "tiny"])
def test_official_args_round_trip(name):
    cfg = Fast3RConfig.preset(name)
    assert Fast3RConfig.from_official_args(**cfg.to_official_args()) == cfg


def test_yaml_round_trip_and_preset_overrides(tmp_path):
    cfg = dataclasses.replace(Fast3RConfig.preset("tiny"), fusion_depth=12, random_image_index=True)
    cfg.to_yaml(tmp_path / "a.yaml")
    assert Fast3RConfig.from_yaml(tmp_path / "a.yaml") == cfg
    (tmp_path / "b.yaml").write_text("preset: tiny\nfusion_depth: 12\nrandom_image_index: true\n")
    assert Fast3RConfig.from_yaml(tmp_path / "b.yaml") == cfg


def test_bad_configs_are_rejected(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: tiny\nfusion_layers: 3\n")
    with pytest.raises(ValueError, match="unknown Fast3RConfig fields"):
        Fast3RConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="heads"):
        Fast3RConfig(enc_dim=100, enc_heads=3)
    args = Fast3RConfig.preset("tiny").to_official_args()
    args["encoder_args"]["encoder_type"] = "dino_v2"
    with pytest.raises(ValueError, match="encoder_type"):
        Fast3RConfig.from_official_args(**args)
