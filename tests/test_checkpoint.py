"""Saving and strictly loading checkpoints in the official format."""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fast3r import CheckpointError, Fast3R, Fast3RConfig

ROOT = Path(__file__).resolve().parents[1]


def randomized_tiny() -> Fast3R:
    model = Fast3R("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def assert_same_weights(a: Fast3R, b: Fast3R) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_save_then_load_is_bit_exact(tmp_path):
    model = randomized_tiny()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    loaded = Fast3R.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(model(images)[1]["conf"], loaded(images)[1]["conf"], rtol=0, atol=0)


def test_saved_files_follow_the_official_layout(tmp_path):
    """config.json holds the official three arg dicts; shared DPT convs are stored once, as safetensors does."""
    model = randomized_tiny()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) == {"encoder_args", "decoder_args", "head_args"}
    assert Fast3RConfig.from_official_args(**config) == model.config
    stored = load_file(tmp_path / "model.safetensors")
    expected = set(model.state_dict()) - {k for k in model.state_dict() if ".scratch.layer_rn." in k}
    assert set(stored) == expected


def test_save_pretrained_keeps_head_widths_config_json_cannot_say_and_drops_a_stale_yaml(tmp_path):
    """The official config.json fixes the DPT heads' widths: before this, save_pretrained of a model with other
    widths wrote only config.json and the reload failed on the heads' shapes."""
    torch.manual_seed(0)
    narrow = dataclasses.replace(Fast3RConfig.preset("tiny"), head_feature_dim=32, head_layer_dims=(16, 32, 48, 64))
    model = Fast3R(narrow).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "fast3r_config.yaml").is_file()
    loaded = Fast3R.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == narrow
    assert_same_weights(model, loaded)
    randomized_tiny().save_pretrained(tmp_path / "ckpt")  # the same directory; config.json describes this one
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert Fast3R.from_pretrained(tmp_path / "ckpt").config == Fast3RConfig.preset("tiny")


def test_load_accepts_both_aliases_and_a_pth_state_dict(tmp_path):
    model = randomized_tiny()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_official_args()))
    assert_same_weights(model, Fast3R.from_pretrained(tmp_path))
    assert_same_weights(model, Fast3R.from_pretrained(tmp_path / "pytorch_model.bin"))


def test_nested_training_checkpoint_is_unwrapped(tmp_path):
    model = randomized_tiny()
    torch.save({"model": model.state_dict(), "epoch": torch.tensor(3)}, tmp_path / "model.pth")
    assert_same_weights(model, Fast3R.from_pretrained(tmp_path / "model.pth", config=model.config))


@pytest.mark.parametrize("change", ["missing", "extra", "misshaped"])
def test_bad_checkpoint_names_the_key(tmp_path, change):
    model = randomized_tiny()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "decoder.dec_blocks.3.attn.qkv.weight"
    if change == "missing":
        del state[key]
    elif change == "extra":
        state["decoder.dec_blocks.3.attn.q_norm.weight"] = torch.randn(4)
        key = "decoder.dec_blocks.3.attn.q_norm.weight"
    else:
        state[key] = torch.randn(5, 5)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
        Fast3R.from_pretrained(tmp_path)
    assert {"missing": "missing keys", "extra": "unexpected keys", "misshaped": "shape mismatches"}[change] in str(err.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_needing_code_execution_is_refused(tmp_path):
    model = randomized_tiny()
    state = dict(model.state_dict())
    state["evil"] = _Payload()
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="needs code execution"):
        Fast3R.from_pretrained(tmp_path / "model.pth", config=model.config)


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        Fast3R.from_pretrained(tmp_path)
    save_file({"x": torch.randn(2)}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Fast3R.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist' does not exist locally"):
        Fast3R.from_pretrained(tmp_path / "does-not-exist")


def test_hub_id_without_huggingface_hub_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(FileNotFoundError, match="pip install huggingface_hub"):
        Fast3R.from_pretrained("jedyang97/Fast3R_ViT_Large_512")


def test_loaded_model_moves_to_requested_dtype(tmp_path):
    model = randomized_tiny()
    model.save_pretrained(tmp_path)
    loaded = Fast3R.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not loaded.training


# ------------------------------------------------------------------- damaged, misplaced and missing files
def saved_tiny(directory):
    model = randomized_tiny()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("keep", [0, 5, 20, 0.5])
def test_empty_or_truncated_safetensors_names_the_file(tmp_path, keep):
    saved_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="model.safetensors") as err:
        Fast3R.from_pretrained(tmp_path)
    assert ("empty (0 bytes)" if keep == 0 else "damaged or truncated") in str(err.value)
    assert "download" in str(err.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_pth_names_the_file(tmp_path, legacy):
    model = randomized_tiny()
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.pth .*damaged or truncated"):
        Fast3R.from_pretrained(path, config=model.config)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"encoder_args": {', "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list; expected an object"),
        ('"large"', "holds a JSON str"),
        ('{"encoder_args": {}, "decoder_args": {}}', "lacks the object.* head_args"),
        ('{"encoder_args": [], "decoder_args": {}, "head_args": {}}', "lacks the object.* encoder_args"),
    ],
)
def test_bad_config_json_names_the_file(tmp_path, text, message):
    saved_tiny(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"config\.json .*{message}|config\.json {message}"):
        Fast3R.from_pretrained(tmp_path)


def test_unsupported_config_value_names_the_file(tmp_path):
    model = saved_tiny(tmp_path)
    args = model.config.to_official_args()
    args["head_args"]["output_mode"] = "depth"
    (tmp_path / "config.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match=r"config\.json: output_mode='depth' is not supported"):
        Fast3R.from_pretrained(tmp_path)


def test_config_passed_as_weights_says_pass_the_directory(tmp_path):
    saved_tiny(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json is a config file, not weights; pass the checkpoint "
                                              rf"directory \({tmp_path}\)"):
        Fast3R.from_pretrained(tmp_path / "config.json")
    (tmp_path / "settings.txt").write_text('{"encoder_args": {}}')  # JSON under another name
    with pytest.raises(CheckpointError, match="is a config file, not weights"):
        Fast3R.from_pretrained(tmp_path / "settings.txt")


def test_other_non_weights_file_is_named(tmp_path):
    saved_tiny(tmp_path)
    (tmp_path / "notes.bin").write_text("these are not weights")
    with pytest.raises(CheckpointError, match=r"notes\.bin is neither safetensors nor a torch\.save checkpoint"):
        Fast3R.from_pretrained(tmp_path / "notes.bin")


def test_format_is_told_by_content_not_name(tmp_path):
    """A safetensors file under a pickle name loads (it used to be refused as 'a pickle that needs code execution')."""
    model = saved_tiny(tmp_path)
    os.replace(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    assert_same_weights(model, Fast3R.from_pretrained(tmp_path))


def test_missing_relative_path_is_not_mistaken_for_a_hub_id(tmp_path, monkeypatch):
    """'checkpoints/fast3r' has a hub id's form; when checkpoints/ exists here, the error shows what it holds."""
    monkeypatch.chdir(tmp_path)
    saved_tiny(tmp_path / "checkpoints" / "fast3r_v1")
    with pytest.raises(FileNotFoundError, match="'checkpoints/fast3r' is not a local file or directory") as err:
        Fast3R.from_pretrained("checkpoints/fast3r")
    assert f"{tmp_path / 'checkpoints' / 'fast3r'} does not exist" in str(err.value)
    assert "exists and holds: fast3r_v1" in str(err.value)


@pytest.mark.parametrize("path", ["./checkpoints/fast3r", "runs/ckpt/model.safetensors", "ckpt/config.json", "fast3r"])
def test_missing_local_path_says_it_does_not_exist(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist locally .*hub id of the form 'owner/name'"):
        Fast3R.from_pretrained(path)


def test_path_object_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist locally"):
        Fast3R.from_pretrained(Path("jedyang97/Fast3R_ViT_Large_512"))


def fake_hub(monkeypatch, snapshot_download):
    module = types.ModuleType("huggingface_hub")
    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_failed_hub_download_also_says_the_local_path_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def not_found(repo_id, **kwargs):
        raise OSError(f"404 Client Error: Repository Not Found for url: https://huggingface.co/{repo_id}")

    fake_hub(monkeypatch, not_found)
    with pytest.raises(FileNotFoundError, match="'owner/fast3r' is not a local file or directory .*does not exist.*"
                                                "downloading it as a Hugging Face hub id failed: 404"):
        Fast3R.from_pretrained("owner/fast3r")


def test_hub_id_downloads_and_loads(tmp_path, monkeypatch):
    model = saved_tiny(tmp_path / "snapshot")
    asked = {}

    def download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path / "snapshot")

    fake_hub(monkeypatch, download)
    monkeypatch.chdir(tmp_path)
    assert_same_weights(model, Fast3R.from_pretrained("jedyang97/Fast3R_ViT_Large_512"))
    assert asked["repo_id"] == "jedyang97/Fast3R_ViT_Large_512" and "model.safetensors" in asked["allow_patterns"]


def test_scale_views_records_the_checkpoint_preset_and_dtype(tmp_path):
    """--checkpoint on the CPU used to load bf16 weights and record 'tiny' / 'float32' whatever ran."""
    spec = importlib.util.spec_from_file_location("scale_views", ROOT / "benchmarks" / "scale_views.py")
    scale_views = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale_views)
    custom = dataclasses.replace(Fast3RConfig.preset("tiny"), fusion_depth=4)
    Fast3R(custom).save_pretrained(tmp_path / "ckpt")
    model = scale_views.build_model("torch", str(tmp_path / "ckpt"), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    scale_views.CPU_VIEWS = (1,)
    args = argparse.Namespace(checkpoint=str(tmp_path / "ckpt"), size="224", backend=["torch"], repeats=1,
                              single_run_above=10**9, points=None, views=1, cuda_graph_max_views=0,
                              official=None, outputs_to_cpu=False, context_parallel="auto")
    doc = scale_views.run(args)
    assert (doc["preset"], doc["dtype"]) == ("custom", "float32")
    assert doc["records"][0]["seconds"] > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_key(tmp_path, bad):
    """One NaN weight makes every output NaN: refused at load, naming the tensor."""
    model = randomized_tiny()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "encoder.blocks.0.mlp.fc1.weight" if "encoder.blocks.0.mlp.fc1.weight" in state else sorted(state)[5]
    state[key][0, 0] = bad
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"NaN or Inf in 1 tensor.*{key.replace('.', '[.]')}"):
        Fast3R.from_pretrained(tmp_path)


def test_load_state_dict_names_extra_missing_and_non_finite_keys():
    model, source = Fast3R("tiny"), randomized_tiny()
    state = dict(source.state_dict())
    state["decoder.extra.weight"] = torch.randn(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): decoder\.extra\.weight") as err:
        model.load_state_dict(state)
    assert isinstance(err.value, RuntimeError)  # what nn.Module.load_state_dict raises, for code that catches it
    del state["decoder.extra.weight"]
    key = next(iter(state))
    state[key] = state[key].clone().fill_(float("nan"))
    with pytest.raises(CheckpointError, match=rf"NaN or Inf.*{key.replace('.', '[.]')}"):
        model.load_state_dict(state)


def test_load_state_dict_takes_either_name_of_a_shared_weight():
    """safetensors keeps one name of the DPT weights shared under two; load_state_dict accepts that file's dict."""
    source, model = randomized_tiny(), Fast3R("tiny")
    state = {k: v for k, v in source.state_dict().items() if ".layer_rn." not in k}
    assert len(state) < len(source.state_dict())
    model.load_state_dict(state)
    assert_same_weights(model, source)
    result = Fast3R("tiny").load_state_dict({"decoder.extra.weight": torch.randn(3)}, strict=False)
    assert result.unexpected_keys == ["decoder.extra.weight"] and result.missing_keys
