"""Aligner tests run tiny models: one thread is fastest and keeps 2-core machines responsive."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _quiet_single_thread():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
