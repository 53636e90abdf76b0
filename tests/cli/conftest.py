"""CLI tests run whatever the machine's load: the oversubscription check (alignfast.cli.threads) sees an idle
machine here, so no test's output depends on what else runs (tests/cli/test_threads.py checks the check)."""

import os

import pytest


@pytest.fixture(autouse=True)
def _idle_machine(monkeypatch):
    from alignfast.cli import threads

    monkeypatch.setattr(threads, "cpu_budget", lambda: threads.CpuBudget(cpus=os.cpu_count() or 1, quota=None,
                                                                         load=0.0))
