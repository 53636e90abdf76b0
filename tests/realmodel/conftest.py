"""The real-model tier: a session-wide converted SmolLM2-135M-Instruct and the measurements the tests record.

Every test here is marked `slow` (outside the default run); scripts/test_realmodel.sh installs what they
need and runs them. Peak memory and wall time are recorded and printed at the end of the run, and written
as JSON to $ALIGNFAST_REALMODEL_REPORT when set; they are never asserted.
"""

import json
import os

import pytest

MEASURED: list[dict] = []


@pytest.fixture(scope="session")
def smollm2_dir():
    from tests.realmodel.smollm2 import ModelUnavailable, model_dir

    try:
        return model_dir()
    except ModelUnavailable as err:
        pytest.skip(f"the real-model tier needs its model package: {err} (or run bash scripts/test_realmodel.sh)")


@pytest.fixture
def record():
    """record(what=..., wall_s=..., peak_rss_gib=...) adds one row to the tier's measurements."""
    return lambda **row: MEASURED.append(row)


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("real-model tier: measured (not asserted)")
    for row in MEASURED:
        terminalreporter.write_line("  ".join(f"{k}={v}" for k, v in row.items()))
    path = os.environ.get("ALIGNFAST_REALMODEL_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(MEASURED, f, indent=1)
        terminalreporter.write_line(f"written to {path}")
