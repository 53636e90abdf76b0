import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny matmuls gain nothing from a second thread, and on a shared machine the
    thread hand-off of a busy core costs milliseconds per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
