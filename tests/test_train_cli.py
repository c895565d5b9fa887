"""``fast3r train`` end to end on the CPU: config file, --set, --resume, and every file a run leaves."""

import json
from pathlib import Path

import pytest
import torch
import train_cases
import yaml

from fast3r import Fast3R, Fast3RConfig
from fast3r.cli import main
from fast3r.train.state import latest


@pytest.fixture(autouse=True)
def one_thread():
    yield from train_cases.one_cpu_thread()


TINY_CPU = Path(__file__).parents[1] / "configs" / "train" / "tiny_cpu.yaml"  # the README's example


@pytest.fixture
def config_file(tmp_path):
    """The shipped CPU config, shortened: 3 steps, validation at 0, 2 and 3, checkpoints at 2 and 3."""
    path = tmp_path / "tiny.yaml"
    values = {**yaml.safe_load(TINY_CPU.read_text()), "out": str(tmp_path / "run"), "steps": 3, "warmup": 1, "val_every": 2,
              "save_every": 2, "log_every": 1, "val_data": train_cases.HELD_OUT[:1]}
    path.write_text(yaml.safe_dump(values))
    return path


def test_train_writes_every_output_and_resumes(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--set", "steps=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["weights"] == str(run / "model")

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    validations = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in validations] == [0, 2, 3]
    assert {"loss", "RRA@15", "RTA@15", "mAA@30", "accuracy", "completion"} <= validations[-1].keys()
    assert all(0 <= r["RRA@15"] <= 1 and r["accuracy"] > 0 and r["val_s"] > 0 for r in validations)
    assert all(r["data_s"] >= 0 and r["views/s"] > 0 for r in records if r["kind"] == "train")
    assert latest(run).name == "step_00000003"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pytest.importorskip("tensorboard")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # The final weights load and are the trained ones. This small model's head widths are not in the official
    # config.json (the official code fixes them), so the run wrote fast3r_config.yaml beside it, which
    # from_pretrained reads.
    assert Fast3RConfig.from_yaml(run / "model" / "fast3r_config.yaml").head_feature_dim != 256
    model = Fast3R.from_pretrained(run / "model")
    trained = torch.load(latest(run) / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    assert model.config.random_image_index  # trained with image_ids: random, so inference draws them too

    # Resume with more steps: the saved config is used, steps 4-5 are appended, nothing repeated.
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "steps=5"]) == 0
    assert "fast3r train: warning: steps changed from 3 to 5" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "stepz=3"], "unknown training config key 'stepz'; did you mean 'steps'?"),
    (["--set", "precision=half"], "precision='half'; choose one of bf16-mixed, official, fp32"),
    (["--set", "model=missing/checkpoint/dir.safetensors"], "does not exist locally"),
])
def test_errors_are_one_line_and_exit_2(config_file, capsys, args, message):
    assert main(["train", str(config_file), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fast3r train: error: ") and message in err


def test_needs_a_config_or_a_run(capsys):
    assert main(["train"]) == 2
    assert "pass a CONFIG.yaml, or --resume RUN_DIR" in capsys.readouterr().err
