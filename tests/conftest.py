import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the Triton kernels run in the interpreter; it must be chosen before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (`bash benchmarks/gpu_one.sh tests` runs them on the H200)")
    config.addinivalue_line("markers", "interpreter: a case-table instance for the Triton interpreter (CPU)")


def pytest_collection_modifyitems(config, items):
    """gpu tests skip without a GPU; the interpreter instances of the case tables skip on a GPU machine."""
    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="interpreter case: runs in CI (no GPU); this machine runs the gpu cases")
        for item in items:
            if "interpreter" in item.keywords:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here; `bash benchmarks/gpu_one.sh tests` runs these on the H200")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs for every test; the seed is printed with any failure to reproduce it."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.add_report_section("setup", "seed", f"torch.manual_seed({seed})")
    return seed


@pytest.fixture
def default_device(device):
    """Tensors created in the test body land on the case's device (the case tables run on CPU and GPU)."""
    with torch.device(device):
        yield device
