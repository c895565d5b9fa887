"""The Triton version check on import, and the environment report of ``python -m fast3r_kernels``."""

import importlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton

from fast3r_kernels import environment, versions
from fast3r_kernels.environment import Case

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository root (``env`` None: this process's environment)."""
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("version, minor, tested", [
    ("3.6.0", "3.6", True),
    ("3.7.1", "3.7", True),
    ("3.7.0+git1a2b3c4", "3.7", True),
    ("3.10.0", "3.10", False),  # not mistaken for 3.1
    ("3.8.0", "3.8", False),
    ("4.0", "4.0", False),
    ("main", None, False),
])
def test_versions_are_read_as_major_minor(version, minor, tested):
    assert versions.major_minor(version) == minor
    assert versions.is_tested(version) is tested


def reimport_versions(monkeypatch, version: str) -> list[warnings.WarningMessage]:
    """Import fast3r_kernels.versions again with Triton claiming ``version``; the warnings it gave."""
    monkeypatch.setattr(triton, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(versions)
    return caught


def test_an_untested_triton_gets_one_warning_naming_the_tested_versions(monkeypatch):
    caught = reimport_versions(monkeypatch, "3.9.0")
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert issubclass(caught[0].category, versions.UntestedTritonWarning)
    assert issubclass(caught[0].category, UserWarning)
    message = str(caught[0].message)
    assert "Triton 3.9.0 is installed" in message
    assert "tested on Triton 3.6 and 3.7" in message and versions.TESTED_TRITON == ("3.6", "3.7")


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1"])
def test_a_tested_triton_imports_silently(monkeypatch, version):
    assert reimport_versions(monkeypatch, version) == []


def test_importing_the_package_warns_once_about_an_untested_triton():
    """Through the real import (all kernel modules included), with every repeat of a warning shown."""
    code = "import triton; triton.__version__ = '3.9.0'; import fast3r_kernels"
    result = run_module("-W", "always", "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("UntestedTritonWarning") == 1, result.stderr
    assert "3.6 and 3.7" in result.stderr


def test_a_cpu_build_of_torch_imports_silently_with_any_triton():
    """`pip install torch==2.13.0 -e .` with a CPU build of torch resolves the newest Triton (3.9.0 on the registry):
    the kernels cannot run there except in the interpreter, so no import warns; the report still says untested."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, triton; torch.version.cuda = torch.version.hip = None; triton.__version__ = '3.9.0'; "
            "import fast3r_kernels, fast3r; print(fast3r_kernels.versions.is_tested(triton.__version__))")
    result = run_module("-W", "always", "-c", code, env=env)
    assert result.returncode == 0, result.stderr
    assert "UntestedTritonWarning" not in result.stderr and result.stdout.strip() == "False"


@pytest.mark.parametrize("how", ["cuda build", "interpreter"])
def test_an_untested_triton_warns_where_the_kernels_run(how):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    setup = "torch.version.cuda = '12.8'" if how == "cuda build" else "torch.version.cuda = torch.version.hip = None"
    if how == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    result = run_module("-W", "always", "-c", f"import torch, triton; {setup}; triton.__version__ = '3.9.0'; "
                        "import fast3r_kernels", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("UntestedTritonWarning") == 1, result.stderr


def test_report_runs_every_kernel_and_each_passes_here():
    """As a user runs it: on a machine without a GPU the report must restart itself in the interpreter."""
    env = os.environ.copy()
    if not torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    result = run_module("-m", "fast3r_kernels", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"  triton   {triton.__version__} (tested)" in lines
    assert any(line.startswith(f"  torch    {torch.__version__} ") for line in lines)
    for name in environment.CASES:
        line = next((line for line in lines if re.match(rf"  {re.escape(name)} +(passed|FAILED) ", line)), None)
        assert line is not None, f"no line for {name} in:\n{result.stdout}"
        assert re.search(r" passed +torch\.\w+, relative error \S+ <= ", line), line
    assert lines[-1] == f"all {len(environment.CASES)} kernel checks passed"


def test_json_report_describes_this_machine(capsys):
    assert environment.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == {"version": torch.__version__, "cuda_build": torch.version.cuda}
    assert report["triton"] == {"version": triton.__version__, "tested": True, "tested_versions": ["3.6", "3.7"]}
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert len(report["gpus"]) == torch.cuda.device_count()
    assert all(re.fullmatch(r"\d+\.\d+", gpu["compute_capability"]) for gpu in report["gpus"])
    assert isinstance(report["nvml"]["available"], bool)
    assert [k["name"] for k in report["kernels"]] == list(environment.CASES)
    for check in report["kernels"]:
        assert check["passed"] and check["failure"] is None, check
        assert 0 <= check["error"] <= check["tolerance"], check
    assert report["passed"] is True


def test_failed_checks_are_reported_with_their_error_and_exit_code_1(monkeypatch, capsys):
    def broken(device, dtype):
        def kernel(x):
            raise RuntimeError("CompilationError: no such instruction on this GPU")
        return Case({"x": torch.randn(4, 8, dtype=dtype)}, kernel, lambda x: x, ("x",))

    def wrong(device, dtype):
        return Case({"x": torch.randn(4, 8, dtype=dtype)}, lambda x: x * 1.5, lambda x: x, ("x",))

    def right(device, dtype):
        return Case({"x": torch.randn(4, 8, dtype=dtype)}, lambda x: x * 2, lambda x: x * 2, ("x",))

    monkeypatch.setattr(environment, "CASES", {"broken": broken, "wrong": wrong, "right": right})
    assert environment.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"  broken +FAILED +torch\.\w+: RuntimeError: CompilationError: no such instruction", out), out
    assert re.search(r"  wrong +FAILED +torch\.\w+: relative error 5.0e-01 is above the tolerance 1e-02", out), out
    assert re.search(r"  right +passed ", out), out
    assert out.rstrip().endswith("2 of 3 kernel checks FAILED")


def markdown_tables(text: str) -> list[list[str]]:
    """Each markdown table in ``text`` as its lines."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_readme_lists_the_tested_tritons_and_ci_installs_its_way():
    """The tested set is defined once (versions.TESTED_TRITON); README's matrix, its first command and CI follow it."""
    readme = (ROOT / "README.md").read_text()
    matrix = next((t for t in markdown_tables(readme) if all(w in t[0].lower() for w in ("torch", "triton", "device"))),
                  None)
    assert matrix is not None, "README.md has no tested matrix (a table with torch, triton and device columns)"
    column = [cell.strip().lower() for cell in matrix[0].strip("|").split("|")].index("triton")
    tritons = {versions.major_minor(row.strip("|").split("|")[column].strip()) for row in matrix[2:]}
    assert tritons == set(versions.TESTED_TRITON), matrix

    first_command = readme.split("```bash\n", 1)[1].splitlines()[0]
    install = next(part.strip() for part in first_command.split("&&") if part.strip().startswith("pip install"))
    low, high = versions.TESTED_TRITON[0], versions.TESTED_TRITON[-1]
    major, minor = high.split(".")
    assert f'"triton>={low},<{major}.{int(minor) + 1}"' in install.split(), install
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.replace("pip install", "pip install -q") in ci, f".ci/run does not run README's {install!r}"
