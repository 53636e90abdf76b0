"""The trainer on a CUDA device (skipped without one): fast-vs-reference parity and the optimum, with the
CUDA/Triton kernels, plus a bf16 prompter (which recomputes old log-probs instead of reusing the
sampler's). Tolerances as on CPU for float32; bf16 only has to train without a non-finite value."""

import math

import pytest
import torch

from tests.trainer.tiny import echo_trainer, small_world
from tests.utils import relative_error

pytestmark = pytest.mark.gpu


def test_parity_on_cuda(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    runs = {}
    for backend in ("fast", "reference"):
        trainer, rec = echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / backend), backend=backend,
                                    device="cuda", seed=3, per_device_train_batch_size=4, num_mini_batches=2,
                                    num_ppo_epochs=2, max_steps=3, response_length=5, temperature=0.9,
                                    learning_rate=3e-3, save_strategy="no", rewrite_template="rewrite {prompt}")
        trainer.train()
        runs[backend] = rec
    for step in range(3):
        assert torch.equal(runs["fast"].responses[step], runs["reference"].responses[step])
        err = relative_error(torch.tensor(runs["fast"].losses[step]), torch.tensor(runs["reference"].losses[step]))
        assert err <= 1e-4, f"step {step + 1}: {err:.2e}"


def test_bf16_prompter_trains_on_cuda(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignfast.trainer import AlignProConfig, AlignProTrainer
    from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward

    tok, prompter_dir = small_world(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(prompter_dir, dtype=torch.bfloat16).cuda()
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3,
                         response_length=6, learning_rate=1e-3, save_strategy="no")
    trainer = AlignProTrainer(cfg, model, tok, FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                              train_dataset=TRAIN_PROMPTS)
    assert not trainer._reuse_sampler_logprobs()
    out = trainer.train()
    assert all(math.isfinite(out.metrics[k]) for k in ("objective/kl", "loss/policy_avg", "loss/value_avg"))
