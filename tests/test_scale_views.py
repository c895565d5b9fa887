"""The README's main job (benchmarks/scale_views.py) on a machine without a GPU."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fast3r import Fast3R

ROOT = Path(__file__).resolve().parents[1]


def scale_views():
    spec = importlib.util.spec_from_file_location("scale_views", ROOT / "benchmarks" / "scale_views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU smoke run; the GPU run is benchmarks/")
def test_cpu_smoke_run_says_so_and_writes_json_and_plot(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/scale_views.py", "--out-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True)
    assert run.stdout.splitlines()[0].startswith("No CUDA GPU: running the tiny preset")
    doc = json.loads((tmp_path / "scale_views_cpu_224.json").read_text())
    assert [r["views"] for r in doc["records"]] == [1, 2, 4]
    assert all(not r["oom"] and r["seconds"] > 0 for r in doc["records"])
    assert (tmp_path / "scale_views_cpu_224.png").stat().st_size > 10_000


def test_merge_combines_runs_of_one_gpu_and_size(tmp_path):
    doc = {"gpu": "NVIDIA H100 80GB HBM3", "size": "512", "preset": "large", "dtype": "bfloat16", "image_hw": [384, 512],
           "records": [{"views": 10, "size": "512", "backend": "triton", "oom": False, "seconds": 1.0, "peak_gib": 2.0}]}
    other = {**doc, "records": [{**doc["records"][0], "backend": "torch", "seconds": 1.2}]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, d in zip(paths, (doc, other)):
        path.write_text(json.dumps(d))
    subprocess.run([sys.executable, "benchmarks/scale_views.py", "--merge", *map(str, paths), "--out-dir",
                    str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    merged = json.loads((tmp_path / "out" / "scale_views_h100_512.json").read_text())
    assert [r["backend"] for r in merged["records"]] == ["triton", "torch"]


def test_fewer_fusion_layers_keep_every_weight_and_four_hook_layers():
    bench = scale_views()
    model = Fast3R("tiny").eval()  # 10 fusion blocks
    weights = sum(p.numel() for p in model.parameters())
    assert bench.run_fewer_fusion_layers(model, 10) == [] and model.decoder.hooks == model.config.head_hooks
    spare = bench.run_fewer_fusion_layers(model, 3)
    assert len(model.decoder.dec_blocks) == 3 and len(spare) == 7
    assert model.decoder.hooks == (0, 1, 2, 3)
    assert sum(p.numel() for p in model.parameters()) + sum(p.numel() for b in spare for p in b.parameters()) == weights
    bench.run_fewer_fusion_layers(model, 1)
    assert model.decoder.hooks == (0, 1, 1, 1)
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 32, 32) * 2 - 1, memory="lean")
    assert len(out) == 2 and torch.isfinite(out[1]["conf"]).all()
    with pytest.raises(SystemExit, match="--fusion-layers 11"):
        bench.run_fewer_fusion_layers(Fast3R("tiny"), 11)


def test_the_time_of_fewer_layers_is_extrapolated_and_says_so():
    bench = scale_views()
    # 2 of 24 blocks: 5 s of blocks, 1 s of one-off fusion work (embedding, host memory), 4 s of the rest.
    record = {"seconds": 10.0, "seconds_fusion": 6.0, "seconds_fusion_blocks": 5.0, "views_per_second": 100.0}
    bench.extrapolate_depth(record, 2, 24, "fast")
    assert record["seconds"] == pytest.approx(10.0 + 22 * 2.5) and record["seconds_fusion"] == pytest.approx(61.0)
    assert record["seconds_measured"] == 10.0 and record["seconds_per_fusion_layer"] == 2.5
    assert record["time_extrapolated"] and not record["peak_is_full_depth"]  # fast needs 3 blocks for its peak
    assert record["views_per_second"] == pytest.approx(100.0 * 10.0 / 65.0)
    lean = {"seconds": 10.0, "seconds_fusion": 6.0, "seconds_fusion_blocks": 5.0, "views_per_second": 100.0}
    bench.extrapolate_depth(lean, 1, 24, "lean")
    assert lean["peak_is_full_depth"]
    whole = {"seconds": 10.0, "seconds_fusion": 6.0, "seconds_fusion_blocks": 5.0, "views_per_second": 100.0}
    bench.extrapolate_depth(whole, 24, 24, "fast")
    assert whole["seconds"] == 10.0 and not whole["time_extrapolated"]
    table = bench.table({"records": [{**record, "views": 5, "backend": "triton", "memory": "auto",
                                      "memory_plan": "lean", "oom": False}]})
    assert "auto (lean)" in table and "extrapolated" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the memory options")
def test_memory_plans_and_fewer_layers_on_the_cpu():
    bench = scale_views()
    bench.CPU_VIEWS = (1,)
    doc = bench.run(argparse.Namespace(memory=["fast", "lean"], fusion_layers=3, single_run_above=1))
    assert [(r["memory"], r["memory_plan"]) for r in doc["records"]] == [("fast", "fast"), ("lean", "lean")]
    doc = bench.run(argparse.Namespace(memory=["fast", "auto"], fast_max_views=0, fusion_layers=3, single_run_above=1))
    assert [(r["memory"], r["memory_plan"]) for r in doc["records"]] == [("auto", "fast")]  # "auto" is fast on a CPU
    assert all(r["fusion_layers_run"] == 3 and r["fusion_layers"] == 10 and r["seconds"] > 0 for r in doc["records"])
    assert doc["fusion_layers_run"] == 3
