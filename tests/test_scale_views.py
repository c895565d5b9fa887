"""The README's main job (benchmarks/scale_views.py) on a machine without a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
