"""Test configuration shared by every test.

Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which must be set before triton is
imported; we set it here, first thing, unless this machine has an NVIDIA device.
"""

import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _idle_machine_for_cli(monkeypatch):
    """In-process `alignfast train/eval` calls see an idle machine: the busy-machine check would otherwise add a
    load-dependent warning to their stderr and lower torch's thread count for every later test in this process.
    The check itself is tested with explicit budgets (tests/cli/test_threads.py)."""
    try:
        from alignfast.cli import threads
    except ImportError:
        yield
        return
    monkeypatch.setattr(threads, "cpu_budget",
                        lambda: threads.CpuBudget(cpus=torch.get_num_threads(), quota=None, load=None))
    yield
