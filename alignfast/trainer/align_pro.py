"""AlignProTrainer: PPO on a small prompter that rewrites prompts for a frozen target (arXiv 2501.03486).

    max_rho  E[x~D, x'~rho(.|x), y~piF(.|x')] r(x, y)  -  lambda * KL(rho(.|x) || rho_sft(.|x))

Only the prompter's tokens are actions; the target answers with no gradient (environment dynamics)
and the reward judges the answer against the ORIGINAL prompt x. lambda is config.kl_coef.
"""

from __future__ import annotations

import os

import torch

from alignfast.ops._checks import fail
from alignfast.rollout.engine import TargetEngine
from alignfast.rollout.context import check_vocabulary, max_positions
from alignfast.trainer.base import PPOEngineTrainer, build_rewards, load_causal_lm, load_tokenizer
from alignfast.trainer.config import AlignProConfig, coerce_config
from alignfast.trainer.environments import AlignProEnvironment


def make_target_engine(target, target_tokenizer):
    """(engine, tokenizer for the target's chat format) from an engine, a causal LM object, or a path.

    Models and paths are wrapped in alignfast.rollout.HFEngine (which loads the tokenizer of a path)."""
    if isinstance(target, TargetEngine):
        return target, target_tokenizer if target_tokenizer is not None else target.chat_tokenizer
    if isinstance(target, torch.nn.Module) and target_tokenizer is None:
        fail("target_tokenizer", "is required when 'target' is a model object")
    if isinstance(target, (str, os.PathLike, torch.nn.Module)):
        from alignfast.rollout import HFEngine

        engine = HFEngine(target if isinstance(target, torch.nn.Module) else str(target), target_tokenizer)
        return engine, target_tokenizer if target_tokenizer is not None else engine.tokenizer
    fail("target", f"must be a TargetEngine, a transformers causal LM or a path, got {type(target).__name__}")


def check_target_room(model, max_new_tokens: int, name: str = "target_max_new_tokens") -> int | None:
    """Up front, in the caller's terms (name: its setting): a target with a position limit (an HF model) needs room
    for at least one prompt token beside max_new_tokens (the engine would otherwise stop the first step, naming
    its own 'max_new_tokens' argument). Returns the room left for a prompt (None: no limit known)."""
    max_pos = max_positions(model)  # a multimodal model's is its text config's
    if max_pos is None:
        return None
    if max_new_tokens >= max_pos:
        fail(name, f"({max_new_tokens}) leaves no room for a prompt: the model's max_position_embeddings is "
             f"{max_pos}")
    return max_pos - max_new_tokens


class AlignProTrainer(PPOEngineTrainer):
    """Train `prompter` with PPO so that the frozen `target`'s answers to its rewrites score higher.

    prompter: a transformers causal LM (or path) — the trained policy rho_theta, its initial weights
        being rho_sft; prompter_tokenizer: its tokenizer (loaded from the path when omitted).
    target: a TargetEngine (alignfast.rollout.HFEngine, VLLMEngine, ...), or a transformers causal LM
        / path, wrapped in HFEngine; target_tokenizer formats its chat input (default: the engine's).
    reward_model (+ reward_tokenizer): a sequence classifier (or path, or alignfast RewardModel);
    reward_funcs: callables f(prompts, completions, **columns) -> list[float]; reward_weights: one per
        reward, the reward model first. train_dataset / eval_dataset: prompts (see trainer.data).
    ref_model: the frozen rho_sft (default: a copy of the prompter; with peft_config, the prompter
        with its adapter disabled). value_model: the critic (default per config.value_head).
    callbacks: TrainerCallback-style objects (see trainer.callbacks).
    """

    arm = "align_pro"
    policy_role = "prompter"
    policy_cut_note = ("the start of the rewrite instruction is lost: set trainer.max_prompt_length, or shorten the "
                       "prompts or trainer.rewrite_template")

    def __init__(self, config: AlignProConfig, prompter, prompter_tokenizer, target, *, target_tokenizer=None,
                 reward_model=None, reward_tokenizer=None, reward_funcs=None, reward_weights=None, train_dataset,
                 eval_dataset=None, ref_model=None, value_model=None, peft_config=None, callbacks=None):
        config = coerce_config(config)
        prompter_tokenizer = load_tokenizer(prompter_tokenizer, prompter, "prompter_tokenizer")
        prompter = load_causal_lm(prompter, "prompter")
        engine, target_tokenizer = make_target_engine(target, target_tokenizer)
        check_target_room(getattr(engine, "model", None), config.target_max_new_tokens)
        check_vocabulary(prompter, prompter_tokenizer, "prompter_tokenizer", "prompter")
        check_vocabulary(getattr(engine, "model", None), target_tokenizer, "target_tokenizer", "target")
        self.target = engine
        self.target_tokenizer = target_tokenizer
        device = config.device or next(prompter.parameters()).device
        rewards = build_rewards(config, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                                reward_funcs=reward_funcs, reward_weights=reward_weights, device=device)
        self.rewards = rewards
        env = AlignProEnvironment.from_config(config, engine, rewards, target_tokenizer=target_tokenizer)
        self._setup(config, prompter, prompter_tokenizer, env, train_dataset=train_dataset, eval_dataset=eval_dataset,
                    ref_model=ref_model, value_model=value_model, peft_config=peft_config, callbacks=callbacks)

    @property
    def prompter(self):
        return self.model
