"""Saving and strictly loading checkpoints in the official format."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fast3r import CheckpointError, Fast3R, Fast3RConfig


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
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
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
