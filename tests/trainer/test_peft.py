"""LoRA prompter: only the adapter trains, and the reference policy rho_sft is the same model with its
adapter disabled (no second copy), so its log-probs equal those of the untouched base model."""

import pytest
import torch

from alignfast.trainer import AlignProConfig, AlignProTrainer
from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward, small_world

peft = pytest.importorskip("peft")


def test_lora_prompter_reference_is_the_disabled_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    tok, prompter_dir = small_world(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(prompter_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)  # non-zero B: the adapter changes the policy from step 0
    cfg = AlignProConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=2,
                         num_ppo_epochs=2, response_length=4, learning_rate=1e-2, save_steps=2,
                         rewrite_template="{prompt}")
    trainer = AlignProTrainer(cfg, AutoModelForCausalLM.from_pretrained(prompter_dir), tok,
                              FunctionTarget(lambda s: s, tok), reward_funcs=[keyword_reward],
                              train_dataset=TRAIN_PROMPTS, peft_config=lora)
    assert trainer.ref_model is None
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()

    rollout = trainer.last_rollout
    q, qm, r, rm = rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask
    with torch.no_grad():
        ref = trainer._ref_logprobs(q, qm, r, rm)
        # The same log-probs from the untouched base model, computed plainly from its logits.
        ids = torch.cat([q, r], 1)
        attn = torch.cat([qm, rm], 1).long()
        pos = (attn.cumsum(1) - 1).clamp_min(0)
        pos[:, q.size(1):] = pos[:, q.size(1) - 1: q.size(1)] + torch.arange(1, r.size(1) + 1)
        logits = base(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, q.size(1) - 1: -1]
        expected = torch.log_softmax(logits / cfg.temperature, -1).gather(-1, r[..., None]).squeeze(-1)
        current = trainer.policy.forward(q, qm, r, rm, temperature=cfg.temperature).logprobs
    torch.testing.assert_close(ref[rm], expected[rm], rtol=1e-5, atol=1e-5)
    assert (current[rm] - ref[rm]).abs().max() > 1e-3  # the adapter does change the policy

    # The base weights did not move; only the adapter did.
    base_params = dict(base.named_parameters())
    for name, p in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base_params[key]), name

    saved = trainer.save_model(tmp_path / "final")
    assert (saved / "adapter_config.json").exists()
    ckpt = torch.load(tmp_path / "out" / "checkpoint-2" / "trainable.pt", weights_only=True)
    assert all("lora_" in n for n in ckpt["policy"])
