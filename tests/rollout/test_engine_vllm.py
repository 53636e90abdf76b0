"""VLLMEngine's mapping onto vLLM's offline API, against a fake `vllm` module (vLLM is not installed
here), and its error when vLLM is missing. The fake is as strict as vLLM 0.33 (read from its wheel): SamplingParams
takes no truncate_prompt_tokens (removed in 0.17: a TypeError), refuses n > 1 at temperature 0, and an output may
end with finish_reason 'repetition', 'abort' or 'error'."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from alignfast.ops import AlignfastArgumentError
from alignfast.rollout import Completion


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None

    def __post_init__(self):
        if self.temperature == 0.0 and self.n > 1:  # vllm/sampling_params.py, _verify_greedy_sampling
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")


class FakeTokenizer:
    def encode(self, text):  # one id per character after a BOS (1), as the fake LLM reads text
        return [1] + [ord(c) for c in text]


@dataclass
class FakeCompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: str


@dataclass
class FakeRequestOutput:
    prompt: object
    outputs: list = field(default_factory=list)


class FakeLLM:
    """Answers deterministically from (prompt, seed, sample index); records every call."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        results = []
        for prompt, sp in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else [ord(c) for c in prompt]
            outs = []
            for i in reversed(range(sp.n)):  # out of order on purpose: the engine must sort by index
                length = 1 + (sum(ids) + i + (sp.seed or 0)) % sp.max_tokens
                toks = [(sum(ids) + 7 * i + (sp.seed or 0) + k) % 100 for k in range(length)]
                reason = "length" if length == sp.max_tokens else "stop"
                if isinstance(prompt, str) and prompt.startswith("reason:"):  # a reason chosen by the test
                    reason = prompt.split(":")[1]
                outs.append(FakeCompletionOutput(i, f"s{i}:{len(toks)}", toks, reason))
            results.append(FakeRequestOutput(prompt, outs))
        return results


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_engine_vllm_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    from alignfast.rollout import VLLMEngine

    with pytest.raises(ImportError, match=r"'vllm' package.*pip install 'alignfast\[vllm\]'"):
        VLLMEngine("some/model")


def test_engine_vllm_constructor_arguments(fake_vllm):
    from alignfast.rollout import VLLMEngine

    VLLMEngine("org/model", gpu_memory_utilization=0.5, tensor_parallel_size=2, seed=3, max_model_len=1024,
               llm_kwargs={"enforce_eager": True})
    kw = FakeLLM.instances[-1].kwargs
    assert kw["model"] == "org/model" and kw["gpu_memory_utilization"] == 0.5
    assert kw["tensor_parallel_size"] == 2 and kw["seed"] == 3 and kw["max_model_len"] == 1024
    assert kw["enforce_eager"] is True
    llm = FakeLLM(model="x")
    assert VLLMEngine(llm).llm is llm  # an existing LLM is used as is
    with pytest.raises(AlignfastArgumentError, match="'gpu_memory_utilization'"):
        VLLMEngine("m", gpu_memory_utilization=1.5)
    with pytest.raises(AlignfastArgumentError, match="'tensor_parallel_size'"):
        VLLMEngine("m", tensor_parallel_size=0)


def test_engine_vllm_maps_prompts_params_and_outputs(fake_vllm):
    from alignfast.rollout import VLLMEngine

    engine = VLLMEngine("m", max_prompt_length=64)
    prompts = ["hello", [5, 6, 7], "hello"]
    out = engine.generate(prompts, max_new_tokens=9, temperature=0.7, top_p=0.9, n=3, seed=1)
    (inputs, params), = FakeLLM.instances[-1].calls
    hello = {"prompt_token_ids": [1] + [ord(c) for c in "hello"]}  # max_prompt_length: encoded here, fits
    assert inputs == [hello, {"prompt_token_ids": [5, 6, 7]}, hello]
    assert all((p.n, p.temperature, p.top_p, p.max_tokens) == (3, 0.7, 0.9, 9) for p in params)
    seeds = [p.seed for p in params]
    assert len(set(seeds)) == 3  # the repeated prompt gets its own seed
    assert [len(r) for r in out] == [3, 3, 3]
    for r in out:
        assert all(isinstance(c, Completion) for c in r)
        assert [c.text.split(":")[0] for c in r] == ["s0", "s1", "s2"]  # sorted by output index
        assert all(c.finish_reason in ("stop", "length") for c in r)
        assert all(len(c.token_ids) == int(c.text.split(":")[1]) for c in r)
    # the same prompt keeps its seed whatever its neighbours and position
    engine.generate([[5, 6, 7]], max_new_tokens=9, temperature=0.7, seed=1)
    assert FakeLLM.instances[-1].calls[-1][1][0].seed == seeds[1]


def test_engine_vllm_greedy_empty_and_bad_arguments(fake_vllm):
    from alignfast.rollout import VLLMEngine

    engine = VLLMEngine("m")
    assert engine.generate([], max_new_tokens=4) == []
    engine.generate(["a"], max_new_tokens=4, top_p=0.5)
    p = FakeLLM.instances[-1].calls[-1][1][0]
    assert p.temperature == 0.0 and p.top_p == 1.0
    with pytest.raises(AlignfastArgumentError, match="'max_new_tokens'"):
        engine.generate(["a"], max_new_tokens=0)
    with pytest.raises(AlignfastArgumentError, match=r"prompts\[0\]"):
        engine.generate([[1, "x"]], max_new_tokens=2)
    engine.close()
    engine.close()  # idempotent
    assert engine.llm is None


def test_engine_vllm_cuts_long_prompts_itself(fake_vllm):
    """SamplingParams(truncate_prompt_tokens=) is an error since vLLM 0.17 (and was ignored for a list of params
    before): a prompt over max_prompt_length keeps its last tokens, cut here. Text is encoded once, here, with the
    LLM's tokenizer (special tokens added, as vLLM adds them)."""
    from alignfast.rollout import VLLMEngine

    engine = VLLMEngine("m", max_prompt_length=4)
    engine.generate(["abc", "abcdefg", list(range(10, 20)), [1, 2]], max_new_tokens=3, temperature=0.5)
    inputs = FakeLLM.instances[-1].calls[-1][0]
    assert inputs == [{"prompt_token_ids": [1] + [ord(c) for c in "abc"]},
                      {"prompt_token_ids": [ord(c) for c in "defg"]},
                      {"prompt_token_ids": [16, 17, 18, 19]}, {"prompt_token_ids": [1, 2]}]


def test_engine_vllm_greedy_asks_once_and_repeats_the_answer(fake_vllm):
    """vLLM refuses n > 1 at temperature 0 ('n must be 1 when using greedy sampling'): a greedy call with n=3 asks
    for one answer per prompt and returns it three times."""
    from alignfast.rollout import VLLMEngine

    out = VLLMEngine("m").generate(["a", [3, 4]], max_new_tokens=5, n=3)
    assert [p.n for p in FakeLLM.instances[-1].calls[-1][1]] == [1, 1]
    assert [len(r) for r in out] == [3, 3] and all(r[0] == r[1] == r[2] for r in out)


@pytest.mark.parametrize("reason,expected", [("repetition", "stop"), ("abort", None), ("error", None)])
def test_engine_vllm_finish_reasons(fake_vllm, reason, expected):
    """'repetition' (vLLM's repetition detection) is a stop; 'abort' and 'error' (a request vLLM rejected: empty
    token_ids) are not answers and were returned as empty finished ones."""
    from alignfast.rollout import VLLMEngine
    from alignfast.rollout.engine import EngineRequestError

    engine = VLLMEngine("m")
    if expected is None:
        with pytest.raises(EngineRequestError, match=rf"prompts\[1\] with finish_reason '{reason}' and no answer"):
            engine.generate(["fine", f"reason:{reason}"], max_new_tokens=3)
    else:
        assert engine.generate([f"reason:{reason}"], max_new_tokens=3)[0][0].finish_reason == expected
