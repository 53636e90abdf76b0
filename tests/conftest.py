"""Test configuration shared by every test.

Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which must be set before triton is
imported; we set it here, first thing, unless this machine has an NVIDIA device.
"""

import glob
import os

# Any NVIDIA device node: a container given one GPU of a machine may see it as /dev/nvidia3, not /dev/nvidia0.
if "TRITON_INTERPRET" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def _triton_interpreter_problem() -> str | None:
    """None when Triton's interpreter runs a kernel whose loop bound is a runtime argument, else why it cannot.

    Triton 3.6's interpreter turns such a bound into a Python int with int() of a one-element numpy array, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"); Triton 3.8 squeezes the array first. With
    that pair every kernel here fails under the interpreter, whatever the kernel does, so its tests are skipped
    with this reason instead of failing by the dozen. Seen with triton 3.6.0 (the GPU image's) and numpy 2.4.6 and
    2.5.5; with numpy 2.3.5 the same tests pass. On a GPU the kernels are compiled and the interpreter is unused."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None  # the tests that need triton skip themselves

    @triton.jit
    def count_to(out_ptr, n):
        total = 0
        for i in range(0, n, 1):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to[(1,)](out, 3)
    except Exception as err:  # noqa: BLE001 - any failure of the interpreter itself
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run a kernel here ({type(err).__name__}: "
                f"{str(err)[:80]}); with numpy {numpy.__version__}: Triton 3.6 needs numpy < 2.4, Triton 3.8 works")
    return None if int(out) == 3 else "Triton's interpreter miscounts a loop with a runtime bound"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
    interpreted = [item for item in items if "interpret" in item.keywords]
    if interpreted and os.environ.get("TRITON_INTERPRET") == "1":
        problem = _triton_interpreter_problem()
        if problem:
            for item in interpreted:
                item.add_marker(pytest.mark.skip(reason=problem))


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
