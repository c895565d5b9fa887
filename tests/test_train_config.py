"""TrainConfig: YAML and --set parsing, the defaults of the official recipe, and errors that name key and fix."""

from pathlib import Path

import pytest
import train_cases  # noqa: F401
import yaml

from fast3r.config import Fast3RConfig
from fast3r.train import TrainConfig
from fast3r.train.config import ConfigError

DATA = [{"format": "synthetic", "scenes": 4}]


def write(tmp_path, values):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values) if isinstance(values, dict) else values)
    return path


def test_yaml_round_trip_and_numeric_strings(tmp_path):
    """PyYAML reads 1e-4 as a string (YAML 1.1 wants 1.0e-4); numeric keys accept it."""
    path = write(tmp_path, "model: tiny\ndata: [{format: synthetic, scenes: 8}]\nlr: 1e-4\nmin_lr: 1e-6\n"
                           "betas: [0.9, 0.95]\nfreeze: [encoder]\nsteps: 50\nclip: null\n")
    config = TrainConfig.from_yaml(path)
    assert config.lr == 1e-4 and config.min_lr == 1e-6 and config.betas == (0.9, 0.95)
    assert config.freeze == ("encoder",) and config.steps == 50 and config.clip is None
    assert config.data == ({"format": "synthetic", "scenes": 8},)
    config.to_yaml(tmp_path / "again.yaml")
    assert TrainConfig.from_yaml(tmp_path / "again.yaml") == config


def test_defaults_follow_the_official_recipe():
    config = TrainConfig(data=DATA)
    assert (config.lr, config.betas, config.weight_decay, config.min_lr) == (1e-4, (0.9, 0.95), 0.05, 1e-6)
    assert (config.views, config.val_views, config.image_ids, config.batch_size) == (20, 10, "random", 1)


def test_set_overrides_parse_yaml_values():
    config = TrainConfig(data=DATA).with_overrides(["lr=3e-5", "freeze=[encoder, head]", "checkpointing=full",
                                                    "clip=1", "data=[{format: synthetic, scenes: 2}]"])
    assert config.lr == 3e-5 and config.freeze == ("encoder", "head") and config.checkpointing == "full"
    assert config.clip == 1.0 and config.data == ({"format": "synthetic", "scenes": 2},)


@pytest.mark.parametrize(("key", "nearest"), [("lerning_rate", "lr"), ("learning_rate", "lr"), ("view", "views"),
                                              ("chekpointing", "checkpointing"), ("num_views", "views"),
                                              ("gradient_clip_val", "clip"), ("save_evry", "save_every")])
def test_unknown_key_names_the_nearest(tmp_path, key, nearest):
    with pytest.raises(ConfigError, match=rf"unknown training config key '{key}'; did you mean '{nearest}'\?"):
        TrainConfig.from_yaml(write(tmp_path, {"data": DATA, key: 1}))
    with pytest.raises(ConfigError, match=rf"did you mean '{nearest}'"):
        TrainConfig(data=DATA).with_overrides([f"{key}=1"])


def test_error_names_the_file(tmp_path):
    path = write(tmp_path, {"data": DATA, "stepz": 3})
    with pytest.raises(ConfigError, match=str(path)):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(write(tmp_path, "data: [unclosed"))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("views", 0, r"views=0 is not an integer >= 1"),
    ("views", 2.5, r"views=2.5 is not an integer"),
    ("steps", True, r"steps=True is not an integer"),
    ("lr", 0, r"lr=0 is not a number > 0"),
    ("lr", "fast", r"lr='fast' is not a number"),
    ("lr", float("nan"), r"lr=nan is not a number"),
    ("size", 384, r"size=384; choose one of 224, 512"),
    ("precision", "bf16", r"precision='bf16'; choose one of bf16-mixed, official, fp32"),
    ("checkpointing", "selective", r"checkpointing='selective'; choose one of none, blocks, full"),
    ("compile", "yes", r"compile='yes' is not true or false"),
    ("freeze", ["decoder"], r"freeze=\['decoder'\]; list parts to freeze from encoder, fusion, head, local_head"),
    ("betas", [0.9], r"betas=\[0.9\] is not a pair"),
    ("betas", [0.9, 1.5], r"both betas must be in \[0, 1\)"),
    ("data", [], r"data is empty"),
    ("data", [{"path": "x"}], r"data\[0\]=.* is not a dataset entry"),
    ("val_views", 1, r"val_views=1 is not an integer >= 2"),
    ("model", 3, r"model=3: give a preset"),
    ("model", {"preset": "huge"}, r"model: unknown preset 'huge'"),
    ("model", {"enc_dim": 100, "enc_heads": 3}, r"model: enc_dim=100 must split into enc_heads=3"),
    ("warmup", 10, r"warmup=10 must be below steps=10"),
    ("min_lr", 1.0, r"min_lr=1.0 is above lr"),
])
def test_bad_values_are_named(key, value, message):
    values = {"data": DATA, "steps": 10, key: value}
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_overrides_apply_before_the_file_is_checked(tmp_path):
    """A file that is only valid with its --set (steps below the file's warmup) reads."""
    path = write(tmp_path, {"data": DATA, "steps": 100, "warmup": 10})
    assert TrainConfig.from_yaml(path, ["steps=5", "warmup=0"]).steps == 5
    with pytest.raises(ConfigError, match=rf"{path}: unknown training config key 'stepz'"):
        TrainConfig.from_yaml(path, ["stepz=5"])


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        TrainConfig(data=DATA).with_overrides(["lr"])


def test_model_mapping_builds_the_architecture():
    config = TrainConfig(data=DATA, model={"preset": "tiny", "fusion_depth": 4})
    assert config.model_config() == Fast3RConfig(**{**Fast3RConfig.preset("tiny").to_dict(), "fusion_depth": 4})
    assert TrainConfig(data=DATA, model="large").model_config() == Fast3RConfig()
    assert TrainConfig(data=DATA, model="checkpoints/fast3r").model_config() is None  # fine-tune from a checkpoint



@pytest.mark.parametrize("name", ["finetune_official.yaml", "tiny_cpu.yaml"])
def test_shipped_configs_parse(name):
    config = TrainConfig.from_yaml(Path(__file__).parents[1] / "configs" / "train" / name)
    if name == "finetune_official.yaml":  # the official recipe, from a checkpoint
        assert config.model_config() is None and config.views == 20 and config.image_ids == "random"
        assert (config.lr, config.betas, config.weight_decay, config.min_lr) == (1e-4, (0.9, 0.95), 0.05, 1e-6)
        assert config.warmup == config.steps // 50 and config.precision == "official"
