"""benchmarks/bench_train.py on a machine without a GPU: every item kind runs through the script's code (a small
model, fp32), the JSON merges item by item, and malformed items are refused before any work."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import train_cases


@pytest.fixture(autouse=True)
def one_thread():
    yield from train_cases.one_cpu_thread()


ROOT = Path(__file__).resolve().parents[1]


def benchmark_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_train = benchmark_script("bench_train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU smoke run; on a GPU the script is the benchmark")
def test_cpu_smoke_run_writes_every_item(tmp_path, capsys):
    out = tmp_path / "train_cpu.json"
    items = ["step:torch:224:2:blocks", "forward:torch:224:2", "maxviews:torch:224", "official:224:2"]
    assert bench_train.main([*items, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    step = doc["items"]["step:torch:224:2:blocks"]
    assert step["step_s"] > 0 and step["views_per_s"] > 0 and step["estimate_gib"] > 0
    assert step["loss"] == step["loss"] and step["warmup_steps"] == bench_train.WARMUP_STEPS  # finite, after warm-up
    assert len(step["steps_s"]) == bench_train.TIMED_STEPS and step["step_s"] == sorted(step["steps_s"])[1]  # median
    assert doc["items"]["forward:torch:224:2"]["forward_s"] > 0
    assert [p["views"] for p in doc["items"]["maxviews:torch:224"]["probes"]] == [2, 3]
    assert "skipped" in doc["items"]["official:224:2"] or "step_s" in doc["items"]["official:224:2"]
    # A second call adds its items and keeps the others.
    assert bench_train.main(["step:torch:224:2:none", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["items"]) == {*items, "step:torch:224:2:none"}
    assert "step:torch:224:2:none" in capsys.readouterr().out


def test_list_and_bad_items(capsys):
    assert bench_train.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "maxviews:triton:512" in listed and "total" in listed
    for bad in ("step:triton:512:32", "step:cuda:512:32:none", "forward:triton:384:8", "maxviews:torch:512:full"):
        with pytest.raises(SystemExit, match="bad item"):
            bench_train.main([bad, "--list"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU smoke run; on a GPU the script is the profile")
def test_profile_script_splits_a_step_on_the_cpu(tmp_path):
    profile = benchmark_script("profile_train_step")
    out = tmp_path / "profile.json"
    assert profile.main(["--views", "2", "--size", "224", "--reps", "1", "--top", "5", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert all(doc[k] > 0 for k in ("step_s", "forward_s", "loss_s", "backward_s", "optimizer_s"))
    assert sum(doc["families_ms"].values()) == pytest.approx(doc["profiled_device_ms"], rel=1e-9)
    assert doc["kernels"] and doc["kernels"][0]["ms"] >= doc["kernels"][-1]["ms"]
    assert profile.family("void cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU smoke run; on a GPU the script is the profile")
def test_profile_script_takes_the_learning_runs_step(tmp_path):
    profile = benchmark_script("profile_train_step")
    out = tmp_path / "profile.json"
    assert profile.main(["--model", "learning-run", "--precision", "official", "--reps", "1", "--top", "3",
                         "--loop-steps", "7", "--workers", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    # the CPU check of learning_run.py runs 1 sample a step; the GPU's run 32
    assert (doc["model"], doc["precision"], doc["samples"], doc["views"], doc["size"]) == \
        ("learning-run", "official", 1, 4, 224)
    assert all(doc[k] > 0 for k in ("step_s", "forward_s", "backward_s", "loop_step_s"))
    assert doc["loop_steps"] == 2 and doc["loop_data_s"] >= 0  # the records after the first 5 of 7
    assert doc["loop_workers"] == 1 and doc["loop_step_s_profiled"] > 0  # the profiled run's 7 steps: 2 after 5
    host = doc["loop_host_s_per_step"]
    assert {"train/forward", "train/backward", "train/optimizer", "train/copy"} <= set(host)
    assert all(seconds > 0 for seconds in host.values())


def test_validation_profile_splits_a_pass_into_its_phases(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")  # what the script sets when imported; unset again afterwards
    profile = benchmark_script("profile_validation")
    out = tmp_path / "validation.json"
    assert profile.main(["--samples", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["samples"] == 1 and doc["views"] == 4
    phases = doc["phase_ms_per_sample"]
    assert set(phases) == set(profile.PHASES) and all(ms > 0 for ms in phases.values())
    # the phases are the sample's work: together within the profiled pass, and most of it
    assert 0.5 * doc["profiled_s_per_sample"] <= sum(phases.values()) / 1e3 <= doc["profiled_s_per_sample"]


def test_learning_sweep_runs_each_variant_on_the_same_scenes(tmp_path, monkeypatch):
    learning_run = benchmark_script("learning_run")
    monkeypatch.setitem(__import__("sys").modules, "learning_run", learning_run)
    monkeypatch.setattr(learning_run, "CPU_SCENES", 3)
    monkeypatch.setattr(learning_run, "HELD_OUT", [{"format": "synthetic", "scenes": 1, "seed": 100_000, "samples": 1}])
    sweep = benchmark_script("learning_sweep")
    out = tmp_path / "sweep.json"
    assert sweep.main(["--cpu", "--steps", "3", "--variants", "baseline", "jitter per sample", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["variants"]) == ["baseline", "jitter per sample"]
    baseline, jittered = doc["variants"].values()
    assert jittered["entry_changes"] == {"jitter": "sample"} and baseline["entry_changes"] == {}
    for result in (baseline, jittered):
        assert [r["step"] for r in result["curve"]] == [1, 2, 3]
        assert [v["step"] for v in result["validations"]] == [0, 3]  # before training and at the end
        assert result["identity_poses"] == baseline["identity_poses"]  # the same held-out scenes
        assert set(result["checks"]) >= {"loss_down_3x", "accuracy_2x_untrained"}
        assert set(result["distance_parts_end"]) == {"regr_local", "regr_anchor", "regr_others"}
    # the same first batch (same seed, same scenes), coloured differently: the first losses differ
    assert baseline["curve"][0]["loss"] != jittered["curve"][0]["loss"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_pose_study_trains_validates_and_reads_its_floors(tmp_path):
    """A smoke run of benchmarks/pose_study_cpu.py: 64 px, 2 scenes, 4 steps (window 2, then 4)."""
    study = benchmark_script("pose_study_cpu")
    assert study.curriculum("2:400,3:300") == [(2, 400), (3, 700)]
    out = tmp_path / "study.json"
    assert study.main(["--res", "64", "--scenes", "2", "--steps", "4", "--val-every", "2", "--curriculum", "2:2",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [v["step"] for v in doc["validations"]] == [0, 2, 4]
    for validation in doc["validations"]:
        for split in ("held_out", "training_samples"):
            metrics = validation[split]
            assert all(0 <= metrics[k] <= 1 for k in ("RRA@15", "RTA@15", "mAA@30"))
            assert metrics["regr_others"] > 0 and 0 <= metrics["median_rotation_error_deg"] <= 180
    floors = doc["floors"]
    assert 0 < floors["identity_poses"]["RRA@15"] < 1 and floors["identity_poses"]["RTA@15"] == 0  # cameras that move
    assert 0.2 < floors["flat_depth_local_distance"] < 1
    shares = [floors["visible_share_by_gap"][str(gap)]["median"] for gap in range(1, 8)]
    assert shares[0] > 0.5 and shares == sorted(shares, reverse=True)  # farther along the path, less in common
    assert out.with_suffix(".png").stat().st_size > 0


def test_compiled_forward_profile_swaps_the_named_ops_only():
    profile = benchmark_script("profile_compiled_forward")
    from fast3r import Fast3R
    from fast3r.backends import TORCH, TRITON, Ops

    weights = Fast3R("tiny").state_dict()
    plain = profile.build("triton", None, (), weights, preset="tiny", device="cpu", dtype=torch.float32)
    swapped = profile.build("triton", None, ("upsample",), weights, preset="tiny", device="cpu", dtype=torch.float32)
    holders = [m for m in swapped.modules() if isinstance(getattr(m, "ops", None), Ops)]
    assert holders and all(m.ops.upsample is TORCH.upsample and m.ops.layer_norm is TRITON.layer_norm for m in holders)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for a, b in zip(plain(images), swapped(images)):
            torch.testing.assert_close(b["pts3d_in_other_view"], a["pts3d_in_other_view"], rtol=1e-4, atol=1e-5)
    assert profile.family("void cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert profile.family("triton_poi_fused_add_0") == "other"
