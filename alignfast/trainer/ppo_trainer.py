"""PPOTrainer: the PPO engine around any Environment, for methods beyond Align-Pro and the Oracle arm.

    trainer = PPOTrainer(config, model, tokenizer, environment, train_dataset=...)

`environment` decides what the policy is asked (`policy_requests`) and how its outputs are scored
(`step`); the engine samples the policy, takes log-probs, KL-shaped rewards, GAE and the PPO update
exactly as for AlignProTrainer. For example Aligner's corrector in front of a frozen target:

    env = AlignerEnvironment(target_engine, WeightedRewards([my_reward]), target_tokenizer=tok)
    PPOTrainer(config, corrector, corrector_tok, env, train_dataset=prompts).train()
"""

from __future__ import annotations

from alignfast.ops._checks import fail
from alignfast.trainer.base import PPOEngineTrainer, load_causal_lm, load_tokenizer
from alignfast.trainer.config import AlignProConfig, coerce_config
from alignfast.trainer.environments import Environment


class PPOTrainer(PPOEngineTrainer):
    """PPO on `model` (a causal LM or path) inside `environment`; other arguments as AlignProTrainer's."""

    arm = "ppo"

    def __init__(self, config: AlignProConfig, model, tokenizer=None, environment: Environment | None = None, *,
                 train_dataset, eval_dataset=None, ref_model=None, value_model=None, peft_config=None,
                 callbacks=None):
        if not isinstance(environment, Environment):
            fail("environment", f"must be an alignfast.trainer.Environment, got {type(environment).__name__}")
        config = coerce_config(config)
        tokenizer = load_tokenizer(tokenizer, model, "tokenizer")
        model = load_causal_lm(model, "model")
        self.rewards = getattr(environment, "rewards", None)
        self._setup(config, model, tokenizer, environment, train_dataset=train_dataset, eval_dataset=eval_dataset,
                    ref_model=ref_model, value_model=value_model, peft_config=peft_config, callbacks=callbacks)
