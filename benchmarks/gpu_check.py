"""Everything that needs one GPU, in one call: GPU tests, environment report, benchmarks, scaling sweeps.

    python benchmarks/gpu_check.py [--steps tests environment kernels ...] [--sweep]
    (multi-GPU runs: benchmarks/gpu_parallel.sh)

Each step's log and JSON land in ``--out`` (default: $OUT if set, else benchmarks/results);
copy the JSON files into benchmarks/results/ and commit them. A failing step is reported
and the next one still runs; the exit code is non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_step(name: str, cmd: list[str], timeout: float, out: Path) -> dict:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {"step": name, "returncode": proc.returncode, "seconds": round(time.time() - start, 1)}
    print(f"=== {name}: {result}", flush=True)
    return result


STEPS = ("tests", "environment", "kernels", "pytest_benchmarks", "scale224", "scale512", "cameras")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    parser.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS)
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel block configurations")
    parser.add_argument("--only-kernels", nargs="*", help="subset of bench_kernels.py benchmarks")
    parser.add_argument("--official", default=".peers", help="copy of shared/peers for the official model's timings")
    parser.add_argument("--scale-args", default="", help="extra arguments for scale_views.py")
    parser.add_argument("--test-args", default="", help="extra pytest arguments, e.g. -k encoder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    official = ["--official", args.official] if (ROOT / args.official / "run_official.py").exists() else []
    scale = [py, "benchmarks/scale_views.py", "--out-dir", str(args.out), "--repeats", "2", *official,
             *args.scale_args.split()]
    kernels = [py, "benchmarks/bench_kernels.py", "--out", str(args.out / "kernels.json")]
    kernels += ["--sweep"] if args.sweep else []
    kernels += ["--only", *args.only_kernels] if args.only_kernels else []
    commands = {
        "tests": ([py, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "--continue-on-collection-errors", "tests/", *args.test_args.split()], 1200),
        "environment": ([py, "-m", "fast3r_kernels", "--json"], 600),
        "kernels": (kernels, 3000),
        "pytest_benchmarks": ([py, "-m", "pytest", "-q", "benchmarks/", "--benchmark-only",
                               f"--benchmark-json={args.out / 'pytest_benchmark.json'}"], 1200),
        "scale224": ([*scale, "--size", "224", "--single-run-above", "1001"], 3000),
        "scale512": ([*scale, "--size", "512", "--views", "500", "--single-run-above", "400"], 3000),
        # decoding and export run on the host (PyAV, pycolmap, trimesh are not on the GPU machine): measured on the CPU
        "cameras": ([py, "benchmarks/bench_cameras.py", "--out", str(args.out / "cameras.json"), "--skip", "export",
                     "decode"], 900),
    }
    results = [run_step(name, *commands[name], args.out) for name in args.steps]
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    sys.exit(int(any(r["returncode"] != 0 for r in results)))


if __name__ == "__main__":
    main()
