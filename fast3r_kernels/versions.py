"""The Triton releases the kernels are tested on, and one warning on import for any other.

Each torch release pins its own Triton on Linux (torch 2.11 -> 3.6.0, 2.12 and 2.13 -> 3.7.1,
2.14 -> 3.8), so the Triton a user has is the one their torch brought. CI runs the kernel
suite in Triton's interpreter on every release listed here, and README.md's tested matrix
lists the same ones (tests/test_environment.py holds the two together). Triton's kernel
language changes between minor releases, so anything else gets a warning, not a refusal:
``python -m fast3r_kernels`` then tells whether the kernels work on that machine.

The warning is given where the kernels can run: with a CUDA (or ROCm) build of torch, or in
Triton's interpreter (TRITON_INTERPRET=1). A CPU build of torch pins no Triton, so
``pip install torch==2.13.0 -e .`` there resolves the newest one (3.9.0 today); the kernels
cannot run on such a machine outside the interpreter, so importing stays silent, and the
environment report still names the Triton untested.

``fast3r_kernels/__init__.py`` imports this module first, so the check runs once, before the
kernel modules import Triton's APIs (an incompatible Triton may fail right there).
"""

from __future__ import annotations

import os
import re
import warnings

import torch

TESTED_TRITON = ("3.6", "3.7")  # major.minor

try:
    import triton
except ImportError as error:
    raise ImportError(
        f"fast3r_kernels needs Triton (tested: {', '.join(TESTED_TRITON)}), which is not installed. On Linux "
        "`pip install torch` brings the Triton its CUDA build pins; with a CPU build of torch, "
        "`pip install 'triton>=3.6'`. Triton publishes Linux wheels only."
    ) from error


class UntestedTritonWarning(UserWarning):
    """The installed Triton's major.minor is not one the kernels were tested on."""


def major_minor(version: str) -> str | None:
    """'3.7' for '3.7.1' or '3.7.0+git1a2b3c'; None when ``version`` does not start with major.minor."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match[1]}.{match[2]}" if match else None


def is_tested(version: str) -> bool:
    return major_minor(version) in TESTED_TRITON


def kernels_can_run() -> bool:
    """A GPU build of torch (CUDA or ROCm), or Triton's interpreter: where the kernels would compile and run."""
    interpreter = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
    return interpreter or torch.version.cuda is not None or torch.version.hip is not None


def warn_if_untested(version: str) -> None:
    """One UntestedTritonWarning naming the tested releases when Triton ``version`` is not among them and the
    kernels can run here (``kernels_can_run``)."""
    if is_tested(version) or not kernels_can_run():
        return
    warnings.warn(
        f"fast3r_kernels is tested on Triton {' and '.join(TESTED_TRITON)}, but Triton {version} is installed: "
        "its kernels may fail to compile or compute wrong results. Install a torch whose Triton is tested "
        "(README.md, tested matrix), or run `python -m fast3r_kernels` to check the kernels on this machine.",
        UntestedTritonWarning,
        stacklevel=2,
    )


warn_if_untested(triton.__version__)
