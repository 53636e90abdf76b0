"""OracleTrainer: the paper's "RLHF / Oracle" arm — the same PPO engine trains the target model itself.

    max_pi  E[x~D, y~pi(.|x)] r(x, y)  -  lambda * KL(pi(.|x) || pi_sft(.|x))

No prompter and no frozen model: the policy answers the prompt (in its chat template, after
config.target_system_prompt as the system message when set, as the frozen target would) and the reward
scores its answer. With the same config, reward and data it is the upper-bound comparison for
Align-Pro, which leaves the target's weights untouched.
"""

from __future__ import annotations

from alignfast.rollout import templates
from alignfast.rollout.context import check_vocabulary
from alignfast.trainer.base import PPOEngineTrainer, build_rewards, load_causal_lm, load_tokenizer
from alignfast.trainer.config import AlignProConfig, coerce_config
from alignfast.trainer.environments import DirectEnvironment


# What a user can do when the Oracle's tokenizer cannot take the system message (it has no prompt template).
ORACLE_SYSTEM_PROMPT_HINT = ("leave it unset for the Oracle arm (its policy, the target, is trained on the prompt "
                             "as it is)")


class OracleTrainer(PPOEngineTrainer):
    """PPO directly on `model` (the target); arguments as AlignProTrainer's, minus the prompter/target split.

    rollout(...).rewrites holds the prompts unchanged (there is no rewrite); answers are the model's.
    """

    arm = "oracle"
    policy_role = "target"

    def __init__(self, config: AlignProConfig, model, tokenizer=None, *, reward_model=None, reward_tokenizer=None,
                 reward_funcs=None, reward_weights=None, train_dataset, eval_dataset=None, ref_model=None,
                 value_model=None, peft_config=None, callbacks=None):
        config = coerce_config(config)
        tokenizer = load_tokenizer(tokenizer, model, "tokenizer")
        model = load_causal_lm(model, "model")
        check_vocabulary(model, tokenizer, "tokenizer", "target", "target.tokenizer")
        device = config.device or next(model.parameters()).device
        self.rewards = build_rewards(config, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                                     reward_funcs=reward_funcs, reward_weights=reward_weights, device=device)
        env = DirectEnvironment(self.rewards)
        templates.check_system_prompt(tokenizer, config.target_system_prompt, use_chat_template=True,
                                      name="target_system_prompt", instead=ORACLE_SYSTEM_PROMPT_HINT)
        self.policy_system_prompt = config.target_system_prompt
        self._setup(config, model, tokenizer, env, train_dataset=train_dataset, eval_dataset=eval_dataset,
                    ref_model=ref_model, value_model=value_model, peft_config=peft_config, callbacks=callbacks)

    def _rewrites_for_result(self, prompts, outputs):
        return list(prompts)
