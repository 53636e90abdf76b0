"""The Proxy-RLHF row of `alignfast demo`: a 3 k-parameter proxy oversees the frozen toy target's decoding.

The toy target misreads terse commands: for `sort 4 8 5 1` its most likely first answer token starts the
descending list. Its second choice usually starts the right one, and once the first token is right the
target completes the answer correctly. So a proxy that rejects the right first tokens, from the target's
hidden state and the proposal, recovers much of the headroom without touching the target, and its greedy
decisions with greedy proposals are compared with No fine-tuning on the same held-out prompts.

PROXY_CONFIG was chosen with short runs on this world (numbers in README.md, section Proxy-RLHF):
greedy proposals (what No fine-tuning answers with), at most 2 rejections per token, a proxy of width 16
(0.93 % of the target), 50 PPO steps of 64 episodes at learning rate 1e-2 (3e-3 had not moved after 25
steps), KL 0.02 to a Bernoulli(0.9) "accept" prior.
"""

from __future__ import annotations

from pathlib import Path

PROXY_ARM = "Proxy-RLHF (proxy on the target's decoding)"

PROXY_CONFIG: dict = {
    "learning_rate": 1e-2,
    "temperature": 1.0,
    "num_ppo_epochs": 4,
    "num_mini_batches": 2,
    "per_device_train_batch_size": 32,
    "total_episodes": 3200,
    "kl_coef": 0.02,
    "accept_prior": 0.9,
    "gamma": 1.0,
    "lam": 0.95,
    "vf_coef": 0.1,
    "missing_eos_penalty": 1.0,
    "target_max_new_tokens": 8,
    "target_temperature": 0.0,
    "max_rejections_per_token": 2,
    "proxy_hidden_size": 16,
    "per_device_eval_batch_size": 250,
}


def proxy_config(world, out: Path, *, seed: int, backend: str, episodes: int | None):
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig

    cfg = dict(PROXY_CONFIG, seed=seed, backend=backend, output_dir=str(out / "proxy_rlhf"), save_strategy="no",
               logging_steps=5, report_to="none", overwrite_output_dir=True)
    if episodes is not None:
        cfg["total_episodes"] = episodes
    return ProxyRLHFConfig.from_dict(cfg)


def run_proxy_arm(world, target_path: str, tokenizer, prompts: list[str], columns: dict, out: Path, *, seed: int,
                  backend: str, episodes: int | None, callbacks=None):
    """Train the proxy on the world's training prompts; return (ArmResult on the held-out prompts, trainer)."""
    from transformers import AutoModelForCausalLM

    from alignfast.eval.arms import ArmResult
    from alignfast.trainer.proxy_rlhf import ProxyRLHFTrainer

    target = AutoModelForCausalLM.from_pretrained(target_path)
    trainer = ProxyRLHFTrainer(proxy_config(world, out, seed=seed, backend=backend, episodes=episodes), target,
                               tokenizer, reward_funcs=world.reward_funcs, reward_weights=world.reward_weights,
                               train_dataset=world.train_prompts, callbacks=callbacks)
    trainer.train()
    res = trainer.rollout(prompts, greedy=True, seed=seed, columns=columns)
    trainer.save_model(out / "proxy_rlhf" / "final")
    return ArmResult(PROXY_ARM, list(prompts), list(prompts), list(res.answers), [float(s) for s in res.scores],
                     dict(res.reward_components)), trainer
