"""The engine serves methods beyond Align-Pro: Aligner's corrector (a small policy after a frozen target)
through AlignerEnvironment + PPOTrainer. The target drafts before the policy acts; the policy sees the
draft in its request; the reward sees the draft column and scores the corrected answer; learning works."""

import json

import pytest

from alignfast.ops import AlignfastArgumentError
from alignfast.rollout.rewards import WeightedRewards
from alignfast.trainer import AlignerEnvironment, AlignProConfig, PPOTrainer
from tests.trainer.tiny import WORDS, FunctionTarget, make_causal_lm, make_tokenizer

PROMPTS = [f"what is the {w}" for w in ("cat", "dog", "bird", "fish")] * 4


def corrected(prompts, completions, draft, **columns):
    """+1 when the answer names the prompt's last word (the draft never does), -0.05 per word."""
    assert len(draft) == len(prompts) and all(d == "a dog" for d in draft)
    return [float(x.split()[-1] in y.split()) - 0.05 * len(y.split()) for x, y in zip(prompts, completions)]


def _trainer(tmp_path, env_settings=None, **overrides):
    tok = make_tokenizer(tmp_path / "tok", WORDS)
    policy = make_causal_lm(tmp_path / "policy", len(tok), seed=3, hidden=32, layers=1)
    target = FunctionTarget(lambda request: "a dog", tok)
    env = AlignerEnvironment(target, WeightedRewards([corrected]), target_tokenizer=tok,
                             **{"correction_template": "{prompt} answer {draft} rewrite", "max_new_tokens": 4,
                                **(env_settings or {})})
    cfg = AlignProConfig(**{"output_dir": str(tmp_path / "out"), "seed": 0, "learning_rate": 1e-2,
                            "response_length": 4, "temperature": 1.0, "per_device_train_batch_size": 16,
                            "num_mini_batches": 1, "num_ppo_epochs": 4, "kl_coef": 0.01, "save_strategy": "no",
                            "logging_steps": 1, **overrides})
    return PPOTrainer(cfg, policy, tok, env, train_dataset=[{"prompt": p} for p in PROMPTS]), env, target


def test_aligner_corrector_sees_the_draft_and_learns(tmp_path):
    trainer, env, target = _trainer(tmp_path, max_steps=40)  # seed 0: 0.26 -> 0.82 (ceiling 0.95)
    columns: dict = {}
    requests = env.policy_requests(PROMPTS[:2], columns, seed=1)
    assert requests == ["what is the cat answer a dog rewrite", "what is the dog answer a dog rewrite"]
    assert columns["draft"] == ["a dog", "a dog"]
    before = trainer.rollout(PROMPTS, greedy=False, seed=5).mean_score
    trainer.train()
    after = trainer.rollout(PROMPTS, greedy=False, seed=5).mean_score
    assert target.calls > 40  # the target drafted for every rollout batch
    assert after > before + 0.3, (before, after)


def test_bad_environment_and_template(tmp_path):
    with pytest.raises(AlignfastArgumentError, match="'correction_template' must contain {draft}"):
        AlignerEnvironment(FunctionTarget(str), WeightedRewards([corrected]), correction_template="{prompt}")
    tok = make_tokenizer(tmp_path / "tok", WORDS)
    with pytest.raises(AlignfastArgumentError, match="'environment' must be an alignfast.trainer.Environment"):
        PPOTrainer(AlignProConfig(output_dir=str(tmp_path / "o")), make_causal_lm(tmp_path / "m", len(tok)), tok,
                   object(), train_dataset=["a"])


def test_the_saved_corrector_records_its_environment(tmp_path):
    """The checkpoint recorded nothing of the environment, so `alignfast eval` rebuilt it from its own defaults (a
    forgotten --aligner-ppo-template scored 0.492 instead of 0.965, silently). describe() is now recorded beside the
    model (alignfast_arm.json) and in each checkpoint's trainer_state.json."""
    trainer, env, _ = _trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    described = {"correction_template": "{prompt} answer {draft} rewrite", "max_new_tokens": 4, "temperature": 0.0,
                 "top_p": 1.0, "use_chat_template": True, "system_prompt": None}
    assert env.describe() == described
    trainer.train()
    final = trainer.save_model()
    assert json.loads((final / "alignfast_arm.json").read_text()) == {
        "arm": "ppo", "environment": "AlignerEnvironment", "environment_settings": described}
    state = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["environment"] == "AlignerEnvironment" and state["environment_settings"] == described


def test_a_resume_with_other_environment_settings_says_which(tmp_path, caplog):
    """Aligner-PPO's correction template and draft budget live in the environment, not in the trainer's config, so a
    resume with others was silent; it now says which settings differ, and says nothing when none does."""
    import logging

    constant = dict(lr_scheduler_type="constant")  # a resume over more steps says nothing of its schedule
    trainer, _, _ = _trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, **constant)
    trainer.train()

    def resume(config=None, **env_settings):
        t, _, _ = _trainer(tmp_path, env_settings, max_steps=2, save_strategy="no", **constant, **(config or {}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignfast.trainer"):
            t.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
        return [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]

    assert resume() == []
    lines = resume(correction_template="{draft} fix {prompt}", max_new_tokens=3)
    assert len(lines) == 1 and "with environment settings (AlignerEnvironment.describe()) that differ from the " \
        "checkpoint's (correction_template: '{prompt} answer {draft} rewrite' -> '{draft} fix {prompt}'; " \
        "max_new_tokens: 4 -> 3)" in lines[0], lines
    # a config setting that changed alike (4 -> 3) under another name does not hide the environment's change
    lines = resume({"response_length": 3}, max_new_tokens=3)
    assert len(lines) == 2 and "(response_length: 4 -> 3)" in lines[0] and "(max_new_tokens: 4 -> 3)" in lines[1]


def test_the_aligner_target_is_the_engines_target(tmp_path):
    """The target was held as env._drafter.target, where the engine does not look (it reads environment.target):
    a corrector initialised from the target held its weights twice under share_frozen_weights, and checkpoints
    recorded no target (a resume on another one did not warn)."""
    from transformers import AutoModelForCausalLM

    from alignfast.rollout import HFEngine

    tok = make_tokenizer(tmp_path / "tok", WORDS)
    make_causal_lm(tmp_path / "target", len(tok), seed=3, hidden=32, layers=1)
    frozen_target = AutoModelForCausalLM.from_pretrained(str(tmp_path / "target")).eval().requires_grad_(False)
    engine = HFEngine(frozen_target, tok)
    env = AlignerEnvironment(engine, WeightedRewards([corrected]), target_tokenizer=tok, max_new_tokens=2)
    assert env.target is engine
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), response_length=2, per_device_train_batch_size=4,
                         max_steps=1, save_strategy="no", share_frozen_weights=True)
    trainer = PPOTrainer(cfg, str(tmp_path / "target"), tok, env, train_dataset=[{"prompt": p} for p in PROMPTS])
    assert trainer.shared_frozen == "reference = target" and trainer.ref_model is frozen_target
    identity = trainer._target_identity()
    assert identity is not None and identity["weights"]


def test_a_lora_policy_from_a_relative_folder_records_its_base_absolutely(tmp_path, monkeypatch):
    """A LoRA policy loaded from `models/policy` (relative to the working directory) saved that path as its
    adapter's base_model_name_or_path, so the adapter loaded only from that directory."""
    peft = pytest.importorskip("peft")
    tok = make_tokenizer(tmp_path / "tok", WORDS)
    make_causal_lm(tmp_path / "models" / "policy", len(tok), seed=3, hidden=32, layers=1)
    tok.save_pretrained(str(tmp_path / "models" / "policy"))
    monkeypatch.chdir(tmp_path)
    env = AlignerEnvironment(FunctionTarget(lambda request: "a dog", tok), WeightedRewards([corrected]),
                             target_tokenizer=tok, max_new_tokens=2)
    cfg = AlignProConfig(output_dir="out", response_length=2, per_device_train_batch_size=4, max_steps=1,
                         save_steps=1)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = PPOTrainer(cfg, "models/policy", None, env, train_dataset=[{"prompt": p} for p in PROMPTS],
                         peft_config=lora)
    trainer.train()
    trainer.save_model()
    for folder in ("out/final", "out/checkpoint-1/policy"):
        base = json.loads((tmp_path / folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == str((tmp_path / "models" / "policy").resolve()), folder
