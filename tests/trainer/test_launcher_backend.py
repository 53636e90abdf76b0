"""A launch that asks for sharding (an FSDP or DeepSpeed accelerate config) and would get none: one line."""

import importlib.util

import pytest

from alignfast.ops._checks import AlignfastArgumentError
from alignfast.trainer import AlignProConfig
from alignfast.trainer import distributed


class _FakeAccelerator:
    """What accelerate gives an FSDP launch on CPU: a plain data-parallel MULTI_CPU group."""

    def __init__(self, cpu=False):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.MULTI_CPU
        self.num_processes, self.process_index = 2, 0


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharded_launch_that_runs_unsharded_is_refused(monkeypatch, flag):
    import accelerate

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(flag, "true")
    monkeypatch.setattr(accelerate, "Accelerator", _FakeAccelerator)
    with pytest.raises(AlignfastArgumentError, match=rf"argument 'device' is cpu, where accelerate runs this .* launch "
                                                     rf"\({flag}=true: the launcher's config\) as MULTI_CPU, without "
                                                     "sharding"):
        distributed.make_processes(AlignProConfig(device="cpu", gradient_accumulation_steps=2))
    monkeypatch.delenv(flag)
    assert distributed.make_processes(AlignProConfig(device="cpu", gradient_accumulation_steps=2)).num_processes == 2


def test_a_deepspeed_launch_without_deepspeed_is_one_line_before_models_load(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    distributed.check_launcher_backend()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(AlignfastArgumentError, match="ACCELERATE_USE_DEEPSPEED' is set .* deepspeed is not installed"):
        distributed.check_launcher_backend()
