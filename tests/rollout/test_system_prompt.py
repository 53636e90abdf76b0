"""target_system_prompt: the chat's system message before every request to a local target, in its tokenizer's
chat template; the same text an OpenAI-compatible target gets as the chat's system message.

Every place that formats the target's input puts it there (Align-Pro's environment, the Aligner's drafts and
pipeline, Proxy-RLHF's prompts, the Oracle's policy, which is the target), and every way it could be silently
lost (no chat template, the template switched off, a template that refuses or drops the system role, an
OpenAIEngine sent plain text, the completions API) is an error naming the setting.
"""

from __future__ import annotations

import pytest

from alignfast.ops import AlignfastArgumentError
from alignfast.rollout import templates
from alignfast.rollout.engine import Completion, TargetEngine

SYSTEM = "answer in one word"


@pytest.fixture(scope="module")
def world():
    from alignfast.toy import load_world

    return load_world()


@pytest.fixture(scope="module")
def toy_tok(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world.target_path)


def _with_template(tok, template):
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


def test_user_turn_puts_the_system_message_first(toy_tok):
    text, add_special = templates.user_turn(toy_tok, "hello there", system_prompt=SYSTEM)
    assert text == f"<|system|> {SYSTEM} <|user|> hello there <|assistant|>" and add_special is False
    assert templates.user_turn(toy_tok, "hello there")[0] == "<|user|> hello there <|assistant|>"
    with_system = templates.user_turn_ids(toy_tok, "hello there", system_prompt=SYSTEM)
    without = templates.user_turn_ids(toy_tok, "hello there")
    assert with_system[-len(without):] == without and len(with_system) > len(without)


@pytest.mark.parametrize("case, message", [
    ("no template", "has no chat template"),
    ("switched off", "chat template is switched off"),
    ("refused", "refused by the tokenizer's chat template (System role not supported)"),
    ("dropped", "dropped by the tokenizer's chat template"),
    ("empty", "must be a non-empty string"),
])
def test_every_way_to_lose_it_is_an_error(toy_tok, case, message):
    refusing = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    dropping = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    tok, use, system = toy_tok, True, SYSTEM
    if case == "no template":
        tok = _with_template(toy_tok, None)
    elif case == "switched off":
        use = False
    elif case == "refused":
        tok = _with_template(toy_tok, refusing)
    elif case == "dropped":
        tok = _with_template(toy_tok, dropping)
    else:
        system = "  "
    with pytest.raises(AlignfastArgumentError, match="argument 'target_system_prompt'") as err:
        templates.check_system_prompt(tok, system, use_chat_template=use, name="target_system_prompt")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_no_system_prompt_is_never_checked(toy_tok):
    templates.check_system_prompt(_with_template(toy_tok, None), None, use_chat_template=False, name="x")


class _RecordingEngine(TargetEngine):
    """A TargetEngine that records the token ids it is asked and answers 'ok'."""

    def __init__(self):
        self.calls, self._completion = [], Completion

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=None):
        self.calls.extend(prompts)
        return [[self._completion(text="ok", token_ids=[5])] * n for _ in prompts]


def test_align_pro_and_aligner_environments_send_it(toy_tok):
    from alignfast.trainer import AlignProConfig
    from alignfast.trainer.environments import AlignerEnvironment, AlignProEnvironment

    engine = _RecordingEngine()
    cfg = AlignProConfig(output_dir="unused", target_system_prompt=SYSTEM, report_to="none")
    env = AlignProEnvironment.from_config(cfg, engine, None, target_tokenizer=toy_tok)
    env.answer(["what is up"], seed=0)
    assert engine.calls[-1] == templates.user_turn_ids(toy_tok, "what is up", system_prompt=SYSTEM)

    drafts = AlignerEnvironment(engine, None, target_tokenizer=toy_tok, system_prompt=SYSTEM)
    drafts.policy_requests(["what is up"], {}, seed=0)
    assert engine.calls[-1] == templates.user_turn_ids(toy_tok, "what is up", system_prompt=SYSTEM)

    off = AlignProConfig(output_dir="unused", target_system_prompt=SYSTEM, target_use_chat_template=False,
                         report_to="none")
    with pytest.raises(AlignfastArgumentError, match="argument 'target_system_prompt'.*switched off"):
        AlignProEnvironment.from_config(off, engine, None, target_tokenizer=toy_tok)


def test_the_aligner_pipeline_asks_its_upstream_after_it(toy_tok, tmp_path):
    from alignfast.aligner import AlignerPipeline, Corrector
    from tests.aligner.helpers import TEMPLATE, tiny_corrector

    model, tok = tiny_corrector(tmp_path)
    engine = _RecordingEngine()
    pipeline = AlignerPipeline(engine, Corrector(model, tok, template=TEMPLATE), upstream_tokenizer=toy_tok,
                               upstream_system_prompt=SYSTEM, upstream_max_new_tokens=2)
    assert pipeline.answer(["what is up"]) == ["ok"]
    assert engine.calls == [templates.user_turn_ids(toy_tok, "what is up", system_prompt=SYSTEM)]
    with pytest.raises(AlignfastArgumentError, match="argument 'upstream_system_prompt'.*switched off"):
        AlignerPipeline(engine, Corrector(model, tok, template=TEMPLATE), upstream_tokenizer=toy_tok,
                        upstream_use_chat_template=False, upstream_system_prompt=SYSTEM)


def test_an_openai_target_carries_its_own():
    pytest.importorskip("openai")
    from alignfast.rollout import OpenAIEngine
    from alignfast.trainer.environments import AlignProEnvironment

    engine = OpenAIEngine("http://127.0.0.1:9/v1", "m")
    with pytest.raises(AlignfastArgumentError, match=r"OpenAIEngine\(system_prompt=\.\.\.\)"):
        AlignProEnvironment(engine, None, rewrite_template="{prompt}", system_prompt=SYSTEM)
    with pytest.raises(AlignfastArgumentError, match="argument 'system_prompt'.*only with api='chat'"):
        OpenAIEngine("http://127.0.0.1:9/v1", "m", api="completions", system_prompt=SYSTEM)
    engine.close()


def test_config_refuses_an_empty_one():
    from alignfast.trainer import AlignProConfig

    with pytest.raises(AlignfastArgumentError, match="argument 'target_system_prompt' must be a non-empty string"):
        AlignProConfig(output_dir="unused", target_system_prompt="", report_to="none")


def test_the_oracle_policy_and_the_proxy_prompts_get_it(world, toy_tok, tmp_path):
    """The Oracle's policy is the target: its sampled queries start with the system message. Proxy-RLHF's
    prompts to the target do too, and it now follows target_use_chat_template (it always used the template)."""
    from transformers import AutoModelForCausalLM

    from alignfast.trainer import AlignProConfig, OracleTrainer
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig, ProxyRLHFTrainer

    common = dict(seed=0, save_strategy="no", report_to="none", per_device_train_batch_size=4,
                  num_mini_batches=1, max_steps=1, target_system_prompt=SYSTEM)
    target = AutoModelForCausalLM.from_pretrained(world.target_path)
    oracle = OracleTrainer(AlignProConfig(output_dir=str(tmp_path / "o"), response_length=4, **common), target,
                           toy_tok, reward_funcs=world.reward_funcs, train_dataset=world.train_prompts[:8])
    batch = oracle._sample(["hello"], {}, greedy=True, seed=0)
    ids = [int(t) for t, m in zip(batch.query_ids[0], batch.query_mask[0]) if m]
    assert ids == templates.user_turn_ids(toy_tok, "hello", system_prompt=SYSTEM)

    proxy = ProxyRLHFTrainer(ProxyRLHFConfig(output_dir=str(tmp_path / "p"), proxy_hidden_size=8,
                                             target_max_new_tokens=4, **common),
                             target, toy_tok, reward_funcs=world.reward_funcs, train_dataset=world.train_prompts[:8])
    assert proxy._prompt_ids(["hello"]) == [templates.user_turn_ids(toy_tok, "hello", system_prompt=SYSTEM)]
    plain = ProxyRLHFTrainer(ProxyRLHFConfig(output_dir=str(tmp_path / "q"), proxy_hidden_size=8,
                                             target_max_new_tokens=4, target_use_chat_template=False,
                                             **{**common, "target_system_prompt": None}),
                             target, toy_tok, reward_funcs=world.reward_funcs, train_dataset=world.train_prompts[:8])
    assert plain._prompt_ids(["hello"]) == [toy_tok("hello")["input_ids"]]
