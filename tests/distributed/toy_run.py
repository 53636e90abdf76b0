"""Trains the trainer tests' small world under whatever launched it (torchrun with N processes, or plain
python for one) and writes, from the main process, what the distributed tests compare:

    python tests/distributed/toy_run.py WORLD_DIR OUT_DIR SCENARIO [SCENARIO ...]

WORLD_DIR holds tok/ and prompter/ (tests.trainer.tiny.small_world). Each scenario writes
OUT_DIR/<scenario>.pt = {"params": {name: tensor}, "history": [metrics without timings], "kl_coef": float}
or OUT_DIR/<scenario>.error = the one-line error it ended with. Scenarios:

    align_pro        AlignProTrainer, echo target, 3 PPO steps
    align_pro_8bit   the same with optim adamw_torch_8bit (torchao's AdamW8bit: block-quantised m and v) and
                     WORLD_DIR/prompter_wide (hidden 64: its projections are large enough to be quantised)
    oracle           OracleTrainer, 3 PPO steps
    killed           align_pro saving every step; every process exits (code 17) right after checkpoint-2
    resumed          continues `killed` from its latest checkpoint to step 3
    resumed_copy     the same from OUT_DIR/killed_copy (a copy made before `resumed` ran)
    stopped_sharded  align_pro with accelerate's sharded-state checkpoints (ALIGNFAST_SHARDED_CHECKPOINTS=1),
                     stopped after checkpoint-2
    resumed_sharded  continues `stopped_sharded` to step 3; resumed_sharded_copy: from OUT_DIR/sharded_copy
    hf_target        align_pro with a real tiny HF target (greedy), each process holding its own HFEngine
    openai_target    the same target served by $ALIGNFAST_TEST_STUB_URL (an OpenAI-compatible stub)
    bad_accumulation gradient_accumulation_steps 3 (not a multiple of 2 processes)
    resume_fails_one_rank / resume_differs_one_rank  resume OUT_DIR/killed_probe (a copy of `killed`) where RANK 1
                     alone finds no whole checkpoint / falls back to checkpoint-1 (its disk read the newest as
                     damaged): every process must end with one line, none wait for the other in a collective
    bad_env_one_rank align_pro whose environment leaves one episode of RANK 1's share unscored (None) in step 1:
                     every process must end with the one-line error, not wait in the gather for the one that raised
    aligner          AlignerTrainer (SFT) of WORLD_DIR/aligner/corrector, 3 steps of 2 x 2 rows, eval/loss at the end
    aligner_stopped  the same saving every step, stopped after checkpoint-2; aligner_resumed continues it to step 3
    aligner_bad_accumulation  gradient_accumulation_steps 3 (not a multiple of 2 processes)
    proxy            ProxyRLHFTrainer on the embedded toy world's target (alignfast.toy), 3 PPO steps of 8 episodes
    signal_one_rank  align_pro in which only the process of RANK 1 gets SIGTERM, at the end of step 1: every process
                     must stop after that step with checkpoint-1 (OUT_DIR/signal_one_rank.stopped: step, signal,
                     checkpoint), not wait forever in the signalled one's checkpoint barrier
    signal_during_save  the same, but the signal reaches RANK 1 while checkpoint-1 is being saved (after the
                     processes agreed on step 1): every process stops after step 2, with checkpoint-2
    callback_one_rank  align_pro in which a callback on RANK 1 only sets control.should_training_stop at the end of
                     step 1: every process must stop after that step, with checkpoint-1 (not wait forever in it)
    fsdp_generation  the prompter sharded with torch FSDP2 (fully_shard, gloo) samples inside
                     gathered_for_generation exactly what the unsharded model samples
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable under torchrun

from transformers import AutoModelForCausalLM  # noqa: E402

from alignfast.ops._checks import AlignfastArgumentError  # noqa: E402
from alignfast.trainer.checkpoint import resume_point as REAL_RESUME_POINT  # noqa: E402
from alignfast.trainer.distributed import end_processes  # noqa: E402
from alignfast.trainer.stop_signals import TrainingInterrupted  # noqa: E402
from tests.trainer.tiny import TRAIN_PROMPTS, FunctionTarget, keyword_reward  # noqa: E402

STEPS = 3
CONFIG = dict(seed=5, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2,
              num_ppo_epochs=2, max_steps=STEPS, response_length=4, temperature=1.0, learning_rate=5e-3,
              logging_steps=1, rewrite_template="{prompt}", adap_kl_ctrl=True, kl_target=0.5, kl_horizon=20,
              save_steps=STEPS, device="cpu", target_max_new_tokens=4, target_batch_size=2)


class StopAfterCheckpoint:
    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            control.should_training_stop = True


class ExitAfterCheckpoint:
    """Every process dies right after the checkpoint of step `at` is on disk (no clean shutdown)."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            sys.stdout.flush()
            os._exit(17)


class SignalOneRank:
    """SIGTERM to this process at the end of step `at` (or in its checkpoint's on_save), on RANK `rank` only."""

    def __init__(self, at: int, rank: int, event: str = "on_step_end"):
        self.at, self.rank = at, rank
        setattr(self, event, self._maybe_signal)

    def _maybe_signal(self, args, state, control, **kwargs):
        if state.global_step == self.at and int(os.environ.get("RANK", "0")) == self.rank:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


class StopOnOneRank:
    """control.should_training_stop at the end of step `at`, on RANK `rank` only (a per-process decision)."""

    def __init__(self, at: int, rank: int):
        self.at, self.rank = at, rank

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at and int(os.environ.get("RANK", "0")) == self.rank:
            control.should_training_stop = True


def make_trainer(world: Path, out: Path, scenario: str, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.trainer import AlignProConfig, AlignProTrainer, OracleTrainer

    tok = AutoTokenizer.from_pretrained(str(world / "tok"))
    cfg = dict(CONFIG, output_dir=str(out / scenario), overwrite_output_dir=True)
    cfg.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(str(world / ("prompter_wide" if "8bit" in scenario else "prompter")))
    common = dict(reward_funcs=[keyword_reward], train_dataset=TRAIN_PROMPTS)
    if scenario == "oracle":
        return OracleTrainer(AlignProConfig(**cfg), model, tok, **common)
    callbacks = [ExitAfterCheckpoint(2)] if scenario == "killed" else \
        [StopAfterCheckpoint(2)] if scenario == "stopped_sharded" else \
        [SignalOneRank(at=1, rank=1)] if scenario == "signal_one_rank" else \
        [SignalOneRank(at=1, rank=1, event="on_save")] if scenario == "signal_during_save" else \
        [StopOnOneRank(at=1, rank=1)] if scenario == "callback_one_rank" else None
    if scenario == "hf_target":
        target = str(world / "prompter")  # a real causal LM answers (greedy): HFEngine in every process
    elif scenario == "openai_target":
        from alignfast.rollout import OpenAIEngine

        target = OpenAIEngine(os.environ["ALIGNFAST_TEST_STUB_URL"], "tiny", max_concurrency=2)
    else:
        target = FunctionTarget(lambda s: s, tok)
    return AlignProTrainer(AlignProConfig(**cfg), model, tok, target, target_tokenizer=tok, callbacks=callbacks,
                           **common)


class Root(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def fsdp_generation(world: Path, out: Path) -> None:
    """The Oracle arm's generation from a sharded policy, on CPU: accelerate runs FSDP2 on GPUs only, so the
    policy is sharded with torch's fully_shard directly (one unit per decoder layer and the root, as
    configs/accelerate/fsdp2.yaml does) and sampled through the trainer's context and sampler."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from alignfast.trainer.distributed import gathered_for_generation
    from alignfast.trainer.sampling import left_pad, sample

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = AutoModelForCausalLM.from_pretrained(str(world / "prompter")).eval()
    sharded = AutoModelForCausalLM.from_pretrained(str(world / "prompter")).eval()
    # As the trainer's TrainableModules: the policy is a child of the sharded root, so the embeddings, final
    # norm and LM head belong to the root's unit, which calling the policy directly does not unshard.
    root = Root(sharded)
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    q_ids, q_mask = left_pad([[6, 7, 8], [9, 10], [11, 12, 13, 14]], 0)

    def draw(model):
        g = torch.Generator().manual_seed(3)
        return sample(model, q_ids, q_mask, max_new_tokens=6, stop_ids=[2], pad_id=0, temperature=1.0, generator=g,
                      logprob_fn=lambda logits, tokens, t: torch.log_softmax(logits / t, -1).gather(
                          -1, tokens[:, None]).squeeze(-1))

    expected = draw(full)
    try:
        draw(sharded)
        unsharded_call_failed = False
    except Exception:  # noqa: BLE001 - a DTensor mixed with plain tensors, whatever torch calls it
        unsharded_call_failed = True
    with gathered_for_generation(root):
        got = draw(sharded)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())  # sharded again afterwards
    if dist.get_rank() == 0:
        torch.save({"expected": expected.response_ids, "got": got.response_ids,
                    "logprob_diff": (expected.logprobs - got.logprobs).abs().max().item(),
                    "unsharded_call_failed": unsharded_call_failed},
                   out / "fsdp_generation.pt")


def aligner(world: Path, out: Path, scenario: str) -> None:
    from alignfast.aligner import AlignerTrainer
    from tests.aligner.helpers import ROWS, TEMPLATE

    folder = out / ("aligner_stopped" if scenario in ("aligner_stopped", "aligner_resumed") else scenario)
    cfg = dict(output_dir=str(folder), overwrite_output_dir=scenario != "aligner_resumed", seed=5, device="cpu",
               template=TEMPLATE, max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
               learning_rate=5e-3, lr_scheduler_type="linear", warmup_ratio=0.0, logging_steps=1,
               save_steps=1 if folder.name == "aligner_stopped" else STEPS, max_length=32)
    if scenario == "aligner_bad_accumulation":
        cfg["gradient_accumulation_steps"] = 3
    try:
        trainer = AlignerTrainer(cfg, str(world / "aligner" / "corrector"), train_dataset=ROWS, eval_dataset=ROWS[:5],
                                 callbacks=[StopAfterCheckpoint(2)] if scenario == "aligner_stopped" else None)
        result = trainer.train(resume_from_checkpoint=True if scenario == "aligner_resumed" else None)
    except AlignfastArgumentError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            (out / f"{scenario}.error").write_text(str(err))
        return
    final = trainer.save_model(folder / "final")
    if trainer.processes.is_main:
        history = [{k: v for k, v in m.items() if not k.startswith(("timing_s", "tokens/s"))} for m in result.history]
        torch.save({"params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                    "history": history, "num_processes": trainer.processes.num_processes,
                    "replicas_differ_by": max_difference_between_processes(trainer),
                    "saved": {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(str(final)).named_parameters()},
                    "checkpoints": sorted(p.name for p in folder.glob("checkpoint-*"))}, out / f"{scenario}.pt")
    else:
        max_difference_between_processes(trainer)  # the collective's other half


def proxy(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.toy import load_world
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig, ProxyRLHFTrainer

    toy = load_world()
    cfg = ProxyRLHFConfig(output_dir=str(out / "proxy"), overwrite_output_dir=True, seed=3, device="cpu",
                          save_strategy="no", logging_steps=1, learning_rate=1e-2, num_ppo_epochs=2, num_mini_batches=2,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS,
                          target_max_new_tokens=6, target_temperature=1.0, proxy_hidden_size=16,
                          max_rejections_per_token=2, accept_prior=0.8, rejection_cost=0.05)
    torch.manual_seed(0)  # the proxy's initial weights
    trainer = ProxyRLHFTrainer(cfg, AutoModelForCausalLM.from_pretrained(toy.target_path),
                               AutoTokenizer.from_pretrained(toy.target_path), reward_funcs=toy.reward_funcs,
                               train_dataset=toy.train_prompts[:64])
    result = trainer.train()
    if trainer.processes.is_main:
        history = [{k: v for k, v in m.items() if not k.startswith(("timing_s", "tokens/s"))} for m in result.history]
        torch.save({"params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                    "history": history, "kl_coef": trainer.kl_ctl.value,
                    "num_processes": trainer.processes.num_processes,
                    "replicas_differ_by": max_difference_between_processes(trainer)}, out / "proxy.pt")
    else:
        max_difference_between_processes(trainer)  # the collective's other half


def run(world: Path, out: Path, scenario: str) -> None:
    if scenario == "fsdp_generation":
        return fsdp_generation(world, out)
    os.environ["ALIGNFAST_SHARDED_CHECKPOINTS"] = "1" if "sharded" in scenario else "0"
    if scenario.startswith("aligner"):
        return aligner(world, out, scenario)
    if scenario == "proxy":
        return proxy(out)
    overrides = {}
    if scenario in ("killed", "resumed", "resumed_copy"):
        folder = "killed_copy" if scenario == "resumed_copy" else "killed"
        overrides = dict(save_steps=1, output_dir=str(out / folder), overwrite_output_dir=scenario == "killed")
    if "sharded" in scenario:
        folder = "sharded_copy" if scenario == "resumed_sharded_copy" else "stopped_sharded"
        overrides = dict(save_steps=1, output_dir=str(out / folder), overwrite_output_dir=scenario == "stopped_sharded")
    if scenario == "bad_accumulation":
        overrides = dict(gradient_accumulation_steps=3)
    if scenario.startswith("resume_") and scenario.endswith("_one_rank"):
        overrides = dict(save_steps=1, output_dir=str(out / "killed_probe"), overwrite_output_dir=False)
    if scenario == "align_pro_8bit":
        overrides = dict(optim="adamw_torch_8bit")
    if scenario in ("signal_one_rank", "callback_one_rank"):
        overrides = dict(output_dir=str(out / scenario), overwrite_output_dir=True, save_steps=100)
    if scenario == "signal_during_save":
        overrides = dict(output_dir=str(out / scenario), overwrite_output_dir=True, save_steps=1)
    os.environ["ALIGNFAST_SHARDED_CHECKPOINTS"] = "1" if "sharded" in scenario else "0"
    try:
        if scenario.startswith("resume_") and scenario.endswith("_one_rank"):
            damage_resume_on_rank(scenario, rank=1)
        trainer = make_trainer(world, out, scenario, **overrides)
        if scenario == "bad_env_one_rank":
            unscore_on_rank(trainer.environment, rank=1)
        result = trainer.train(resume_from_checkpoint=True if scenario.startswith("resume") else None)
    except TrainingInterrupted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            (out / f"{scenario}.stopped").write_text(f"{stopped.step} {stopped.signal_name} {stopped.checkpoint}")
        return
    except AlignfastArgumentError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            (out / f"{scenario}.error").write_text(str(err))
        return
    finally:
        from alignfast.trainer import checkpoint as ckpt

        ckpt.resume_point = REAL_RESUME_POINT  # the next scenario's processes find checkpoints alike
    # the user-facing model of a sharded run: the gathered full weights (a collective call)
    final = trainer.save_model(out / scenario / "final") if "sharded" in scenario else None
    replicas_differ_by = max_difference_between_processes(trainer)
    if trainer.processes.is_main:
        params = {f"policy.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
        params.update({f"value.{n}": p.detach().clone() for n, p in trainer.value_model.named_parameters()})
        history = [{k: v for k, v in m.items() if not k.startswith(("timing_s", "tokens/s"))}
                   for m in result.history]
        saved = {} if final is None else \
            {f"policy.{n}": p.detach() for n, p in AutoModelForCausalLM.from_pretrained(str(final)).named_parameters()}
        torch.save({"params": params, "history": history, "kl_coef": trainer.kl_ctl.value, "saved": saved,
                    "num_processes": trainer.processes.num_processes, "replicas_differ_by": replicas_differ_by,
                    "quantised_states": quantised_optimizer_states(trainer)}, out / f"{scenario}.pt")


def damage_resume_on_rank(scenario: str, rank: int) -> None:
    """On process `rank` only, the checkpoint search finds none whole, or reads the newest as damaged."""
    from alignfast.trainer import checkpoint as ckpt

    if int(os.environ.get("RANK", "0")) != rank:
        return
    found = REAL_RESUME_POINT

    def damaged(output_dir, requested, **kwargs):
        if scenario == "resume_fails_one_rank":
            raise ckpt.CorruptCheckpointError(Path(output_dir), "no checkpoint in it passes verification (probe)")
        return found(output_dir, Path(output_dir) / "checkpoint-1", **kwargs)

    ckpt.resume_point = damaged


def unscore_on_rank(environment, rank: int) -> None:
    """The environment's step leaves its first episode unscored (None) on process `rank` only."""
    step = environment.step

    def unscored(*args, **kwargs):
        out = step(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) == rank:
            out.scores[0] = None
        return out

    environment.step = unscored


def max_difference_between_processes(trainer) -> float:
    """The largest |difference| between any process's policy + critic parameters and the main process's: 0.0
    when DDP keeps the replicas identical (a collective call; 0.0 for one process)."""
    import torch.distributed as dist

    models = (trainer.model, getattr(trainer, "value_model", None))
    flat = torch.cat([p.detach().reshape(-1) for m in models if m is not None for p in m.parameters()])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return max((other - every[0]).abs().max().item() for other in every)


def quantised_optimizer_states(trainer) -> int:
    """How many optimizer state tensors are not plain tensors (torchao's quantised subclasses)."""
    return sum(type(v) is not torch.Tensor and isinstance(v, torch.Tensor)
               for state in trainer.optimizer.state.values() for v in state.values())


def main(argv: list[str]) -> None:
    world, out, scenarios = Path(argv[0]), Path(argv[1]), argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        run(world, out, scenario)
    end_processes()  # as the CLI does: no gloo group left for the interpreter's teardown


if __name__ == "__main__":
    main(sys.argv[1:])
