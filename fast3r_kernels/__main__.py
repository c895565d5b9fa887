"""``python -m fast3r_kernels [--json]``: the environment report (``fast3r_kernels.environment``).

Without a usable GPU the kernels can only run in Triton's interpreter, which must be chosen
before they are decorated, that is before this package was imported; so the process then
starts itself again with TRITON_INTERPRET=1.
"""

import os
import sys

import torch

from ._config import interpreting
from .environment import main

if __name__ == "__main__":
    if not torch.cuda.is_available() and not interpreting():
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "TRITON_INTERPRET": "1"})
    sys.exit(main())
