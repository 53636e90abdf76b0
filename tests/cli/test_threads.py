"""The oversubscription check of `alignfast train/eval`: free cores from affinity, cgroup quota and load; the
thread count it picks, or the warning it gives when OMP_NUM_THREADS was set by the user."""

import logging

import pytest
import torch

from alignfast.cli import threads
from alignfast.cli.threads import CpuBudget, cgroup_quota, plan_threads


@pytest.mark.parametrize("budget, free", [
    (CpuBudget(cpus=8, quota=None, load=None), 8),
    (CpuBudget(cpus=8, quota=None, load=1.0), 8),      # the load of this command alone
    (CpuBudget(cpus=8, quota=None, load=4.5), 4),      # 3.5 cores' worth of other jobs
    (CpuBudget(cpus=2, quota=None, load=6.5), 1),      # more runnable jobs than cores: one thread, never zero
    (CpuBudget(cpus=64, quota=2.0, load=0.0), 2),      # a container's quota on a big idle host
    (CpuBudget(cpus=64, quota=0.5, load=0.0), 1),      # a fractional quota still gets one thread
    (CpuBudget(cpus=16, quota=8.0, load=13.0), 4),     # the busier of the two limits wins
])
def test_free_cores(budget, free):
    assert budget.free == free


def test_plan_picks_the_free_cores_or_only_warns_when_the_user_chose():
    busy = CpuBudget(cpus=2, quota=None, load=6.5)
    assert plan_threads(1, busy, user_set=False) == (None, None)      # already fits: nothing said
    n, msg = plan_threads(2, busy, user_set=False)
    assert n == 1 and "using 1 CPU thread instead of torch's 2" in msg and "OMP_NUM_THREADS" in msg
    n, msg = plan_threads(2, busy, user_set=True)
    assert n is None and "OMP_NUM_THREADS=1 fits" in msg and "load average 6.5" in msg
    assert plan_threads(8, CpuBudget(cpus=8, quota=None, load=0.3), user_set=False) == (None, None)


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job\n")
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(v2, proc) == 1.5
    (v2 / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1, tmp_path / "missing") == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(v1, tmp_path / "missing") is None
    assert cgroup_quota(tmp_path / "nothing", tmp_path / "missing") is None


def test_fit_sets_torch_threads_and_says_so(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(3)
        with caplog.at_level(logging.WARNING, logger="alignfast.cli"):
            assert threads.fit_threads_to_machine(CpuBudget(cpus=3, quota=None, load=4.0)) == 1
        assert torch.get_num_threads() == 1
        assert any("the machine is busy" in r.getMessage() for r in caplog.records)
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads.fit_threads_to_machine(CpuBudget(cpus=3, quota=None, load=4.0)) is None
        assert torch.get_num_threads() == 3  # the user's choice stands
    finally:
        torch.set_num_threads(before)
