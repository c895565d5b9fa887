"""Everything that needs the GPU, in one call: GPU tests, kernel benchmarks, the view-scaling sweep.

    python benchmarks/gpu_check.py [--sweep] [--skip tests kernels scale] [--scale-sizes 224 512]

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


def run_step(name: str, cmd: list[str], out: Path, timeout: float) -> dict:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "kernels", "scale"])
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel block configurations")
    parser.add_argument("--only-kernels", nargs="*", help="subset of bench_kernels.py benchmarks")
    parser.add_argument("--scale-sizes", nargs="*", default=["224"], help="image sizes for scale_views.py")
    parser.add_argument("--scale-args", default="", help="extra arguments for scale_views.py")
    parser.add_argument("--test-args", default="", help="extra pytest arguments, e.g. -k encoder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    steps = []
    if "tests" not in args.skip:
        steps.append(("gpu_tests", [py, "-m", "pytest", "-q", "-rA", "-m", "gpu", "tests/test_gpu.py",
                                    *args.test_args.split()], 1200))
    if "scale" not in args.skip:
        for size in args.scale_sizes:
            steps.append((f"scale_views_{size}", [py, "benchmarks/scale_views.py", "--size", size, "--out-dir",
                                                  str(args.out), *args.scale_args.split()], 3000))
    if "kernels" not in args.skip:
        cmd = [py, "benchmarks/bench_kernels.py", "--out", str(args.out / "kernels.json")]
        cmd += ["--sweep"] if args.sweep else []
        cmd += ["--only", *args.only_kernels] if args.only_kernels else []
        steps.append(("bench_kernels", cmd, 3000))
    results = [run_step(name, cmd, args.out, timeout) for name, cmd, timeout in steps]
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    sys.exit(int(any(r["returncode"] != 0 for r in results)))


if __name__ == "__main__":
    main()
