"""ProxyRLHFTrainer: Proxy-RLHF (arXiv 2403.04283) on the shared PPO engine.

The frozen target generates; a small proxy (alignfast.trainer.proxy_model) accepts or rejects each token
it proposes (alignfast.rollout.ProxyDecoder). The MDP PPO solves:

    state   s = (prompt x, the tokens accepted so far, the tokens rejected at this position, the proposal y)
    action  a in {accept, reject}           (forced acceptances at the stabiliser's bounds are no actions)
    transition: accept appends y and the target moves on; reject excludes y and the target re-proposes
    reward  r(x, answer) at the last decision of the episode,
            - kl_coef * (log pi(a|s) - log pi_ref(a))  at every decision (pi_ref = Bernoulli(accept_prior)),
            - rejection_cost at every rejection (optional)

GAE(gamma, lam) runs over each episode's decisions, in order, through the same fused ops
(compute_advantages, ppo_loss) and the same PPOUpdater as Align-Pro and the Oracle arm.

KL choice: the paper trains its proxy with PPO on the reward and keeps it in check with the stabiliser
alone. Here the KL term is kept, against a fixed "let the target speak" Bernoulli(accept_prior)
reference rather than a copy of the initial proxy: it prices a rejection (log((1-p)/(1-prior)) > 0 when
the proxy rejects more than the prior), which is the deviation from the target we want to pay for, and
it is exactly zero-cost to compute. kl_coef = 0 recovers the paper's reward-only objective.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from alignfast.ops._checks import AlignfastArgumentError, fail
from alignfast.rollout import templates
from alignfast.rollout.context import CutCounter, check_vocabulary
from alignfast.rollout.proxy_decoder import ProxyDecoder, ProxyDecodeOutput
from alignfast.trainer.align_pro import check_target_room
from alignfast.trainer.base import PPOEngineTrainer, _special_ids, build_rewards, load_causal_lm, load_tokenizer
from alignfast.trainer.config import AlignProConfig, _opt
from alignfast.trainer.data import PromptDataset, batch_indices, derive_seed
from alignfast.trainer.distributed import gather_env_output, gather_rollout, make_processes
from alignfast.trainer.env_checks import check_env_output
from alignfast.trainer.environments import DirectEnvironment
from alignfast.trainer.optimizers import no_weight_decay
from alignfast.trainer.ppo_core import Advantages, Rollout, compute_advantages, make_opset
from alignfast.trainer.proxy_model import ProxyModel, ProxyPolicy
from alignfast.trainer.resume_checks import reference_fingerprint

_log = logging.getLogger("alignfast.trainer")


@dataclass
class ProxyRLHFConfig(AlignProConfig):
    """AlignProConfig plus the proxy's knobs. The target's proposals use target_temperature, target_top_p
    and target_max_new_tokens; `temperature` scales the proxy's decision logits; response_length,
    value_head and the rewrite templates are not used."""

    temperature: float = _opt(1.0, "Temperature of the proxy's accept/reject logits (sampling and log-probs).")
    kl_coef: float = _opt(0.02, "Weight of the per-decision KL to the Bernoulli(accept_prior) reference.")
    proxy_hidden_size: int = _opt(64, "Width of the proxy's hidden layer (parameters ~ (2H + 1) * width).")
    max_rejections_per_token: int = _opt(3,
        "Stabiliser: after this many rejections at one position the most likely remaining token is taken.")
    target_top_k: int = _opt(0, "Stabiliser: proposals only from the target's top-k tokens at the position (0: off).")
    accept_prior: float = _opt(0.9, "P(accept) of the KL reference policy.")
    rejection_cost: float = _opt(0.0, "Optional reward subtracted at every rejection.")

    def _validate(self) -> None:
        super()._validate()
        for name in ("proxy_hidden_size", "max_rejections_per_token"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(name, f"must be a positive integer, got {v!r}")
        if isinstance(self.target_top_k, bool) or not isinstance(self.target_top_k, int) or self.target_top_k < 0:
            fail("target_top_k", f"must be a non-negative integer (0: off), got {self.target_top_k!r}")
        v = self.accept_prior
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            fail("accept_prior", f"must be in (0, 1), got {v!r}")
        v = self.rejection_cost
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            fail("rejection_cost", f"must be a finite number >= 0, got {v!r}")


# AlignProConfig fields that look as if they steered Proxy-RLHF's decoding but belong to a policy that writes text
# (the prompter): a run file shared with Align-Pro may set them, so they are named, not refused.
_UNUSED_HERE = {"top_p": "the target's proposals use target_top_p", "top_k": "the target's proposals use target_top_k",
                "target_num_samples": "the target gives one answer per prompt, decoded under the proxy"}


def _warn_unused_settings(config: ProxyRLHFConfig) -> None:
    import dataclasses
    import warnings

    defaults = {f.name: f.default for f in dataclasses.fields(AlignProConfig)}
    for name, where in _UNUSED_HERE.items():
        if getattr(config, name) != defaults[name]:
            warnings.warn(f"ProxyRLHFTrainer: {name}={getattr(config, name)!r} is not used by Proxy-RLHF ({where})",
                          stacklevel=3)


def accept_every_proposal(features: torch.Tensor, proposals: torch.Tensor):
    """A judge (ProxyDecoder's interface) that accepts every proposal: the decoder then gives the target's own
    answers, with the draws a proxy's decoding gets (P(accept) = 1, so sampled decisions accept too)."""
    return torch.full((proposals.shape[0],), math.inf, device=proposals.device), None


def coerce_proxy_config(config) -> ProxyRLHFConfig:
    if isinstance(config, dict):
        return ProxyRLHFConfig.from_dict(config)
    if isinstance(config, ProxyRLHFConfig):
        return config
    if isinstance(config, AlignProConfig):  # an AlignProConfig's fields, proxy knobs at their defaults
        return ProxyRLHFConfig.from_dict(config.to_dict())
    fail("config", f"must be a ProxyRLHFConfig or a dict, got {type(config).__name__}")


class ProxyRLHFTrainer(PPOEngineTrainer):
    """PPO on a proxy that oversees the frozen `target`'s decoding.

        trainer = ProxyRLHFTrainer(ProxyRLHFConfig(output_dir="out"), target, tokenizer,
                                   reward_funcs=[my_reward], train_dataset=[{"prompt": ...}, ...])
        trainer.train(); trainer.rollout(prompts)      # answers decoded under the trained proxy

    target: a causal LM or a path (frozen here); proxy: a ProxyModel (default: a new one sized by
    config.proxy_hidden_size). Checkpoints, resume, metrics and evaluation are the engine's.
    """

    arm = "proxy"
    policy_role = "proxy"

    def __init__(self, config, target, tokenizer=None, *, proxy: ProxyModel | None = None, reward_model=None,
                 reward_tokenizer=None, reward_funcs=None, reward_weights=None, train_dataset, eval_dataset=None,
                 callbacks=None):
        from alignfast.trainer.metrics_logger import check_reporters

        config = coerce_proxy_config(config)
        check_reporters(config.report_to)
        self.processes = make_processes(config)
        if self.processes.sharded_state:  # the proxy is a few thousand parameters: nothing to shard
            raise AlignfastArgumentError(
                "alignfast: ProxyRLHFTrainer trains a replicated proxy (DDP); FSDP / DeepSpeed sharding is not "
                "supported for it: launch with configs/accelerate/ddp.yaml (or torchrun) instead")
        tokenizer = load_tokenizer(tokenizer, target, "tokenizer")
        target = load_causal_lm(target, "target")
        check_vocabulary(target, tokenizer, "tokenizer", "target", "target.tokenizer")
        if config.device is not None:
            target = target.to(config.device)
        if self.processes.distributed:  # the launcher's device for this process (cuda:LOCAL_RANK, or cpu)
            target = target.to(self.processes.accelerator.device)
        target.eval().requires_grad_(False)
        self.config = config
        self.target = target
        self.device = next(target.parameters()).device
        self.ops = make_opset(config.backend)
        self.train_dataset = PromptDataset(train_dataset, name="train_dataset")
        self.eval_dataset = PromptDataset(eval_dataset, name="eval_dataset") if eval_dataset is not None else None
        if config.eval_steps and self.eval_dataset is None:  # as the PPO engine's _setup: never a silent skip
            fail("eval_steps", f"is {config.eval_steps} but there is no eval_dataset to evaluate on: pass one "
                 "(`data.eval` in a run file) or leave eval_steps unset")
        _warn_unused_settings(config)
        self.num_steps = config.num_steps(len(self.train_dataset))
        from transformers import set_seed

        set_seed(config.seed)
        self.tokenizer = tokenizer
        # Positions the target can take: the prompt's tokens plus target_max_new_tokens.
        room = check_target_room(target, config.target_max_new_tokens)
        if config.max_prompt_length is not None and room is not None and config.max_prompt_length > room:
            fail("max_prompt_length", f"({config.max_prompt_length}) plus target_max_new_tokens "
                 f"({config.target_max_new_tokens}) exceeds the target's max_position_embeddings "
                 f"({room + config.target_max_new_tokens})")
        self.prompt_limit = config.max_prompt_length if config.max_prompt_length is not None else room
        self._cut_prompts = CutCounter("target's inputs", self.prompt_limit, "max_prompt_length, or the target's "
                                       "max_position_embeddings - target_max_new_tokens; the end holds the "
                                       "generation prompt")
        templates.check_system_prompt(tokenizer, config.target_system_prompt,
                                      use_chat_template=config.target_use_chat_template, name="target_system_prompt",
                                      instead="put the text in the prompts instead")
        self.pad_id, self.stop_ids = _special_ids(tokenizer, target, config.stop_token_id)
        self.rewards = build_rewards(config, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                                     reward_funcs=reward_funcs, reward_weights=reward_weights, device=self.device)
        self.environment = DirectEnvironment(self.rewards)
        self.decoder = ProxyDecoder(target, eos_ids=self.stop_ids, pad_id=self.pad_id,
                                    max_new_tokens=config.target_max_new_tokens,
                                    max_rejections_per_token=config.max_rejections_per_token,
                                    temperature=config.target_temperature, top_p=config.target_top_p,
                                    top_k=config.target_top_k)
        text_cfg = target.config.get_text_config()
        if proxy is None:
            proxy = ProxyModel(text_cfg.hidden_size, target.get_input_embeddings().embedding_dim,
                               config.proxy_hidden_size)
        if not isinstance(proxy, ProxyModel):
            fail("proxy", f"must be an alignfast ProxyModel, got {type(proxy).__name__}")
        if proxy.feature_size != self.decoder.feature_size:
            fail("proxy", f"reads {proxy.feature_size} features but this target gives {self.decoder.feature_size}")
        self._check_trained_on(proxy.trained_on)
        self.model = proxy.to(self.device).eval()
        self.policy = ProxyPolicy(self.model, accept_prior=config.accept_prior)
        self.value_model = None
        self.shared_value_head = None
        self.ref_model = None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.no_decay = no_weight_decay([self.model])
        self._setup_optimization(callbacks)

    reference_weights_text = "the frozen target's weights differ from this run's target (target.model)"
    # The proxy's input width comes from the target (its hidden size and vocabulary), its own width from the config.
    resume_shape_hint = "another target, whose hidden size sets the proxy's input (target.model), or another " \
                        "proxy_hidden_size?"

    def _reference_fingerprint(self) -> str:
        """Proxy-RLHF's reference is the frozen target's own distribution (accept_prior over its tokens): its
        weights are the run's frozen weights (the engine's default fingerprinted the proxy's frozen parameters,
        of which it has none)."""
        if getattr(self, "_target_reference_fp", None) is None:
            self._target_reference_fp = reference_fingerprint(self.target.named_parameters())
        return self._target_reference_fp

    def _target_record(self) -> dict:
        """{name, weights, vocab_size} of this run's target, which the saved proxy records (proxy_config.json)."""
        name = getattr(self.target.config, "_name_or_path", "") or type(self.target).__name__
        return {"name": str(name), "weights": self._reference_fingerprint(),
                "vocab_size": int(self.target.get_input_embeddings().num_embeddings)}

    def _check_trained_on(self, saved: dict | None) -> None:
        """A proxy trained on a target with another vocabulary is refused: it judged other tokens' embeddings,
        and the feature width check passes whenever the hidden sizes agree. Other weights under the same vocabulary
        are a warning, as a resume from another target is (trainer/resume_checks.warn_other_inputs): a retrained
        or differently quantized target may be meant, but never silently. A proxy without a record (saved before
        it was kept) is not checked."""
        if not saved:
            return
        now = self._target_record()
        vocab = saved.get("vocab_size")
        if vocab is not None and vocab != now["vocab_size"]:
            fail("proxy", f"was trained on a target with a vocabulary of {vocab} tokens ({saved.get('name')!r}) and "
                 f"this target ({now['name']!r}) has {now['vocab_size']}: decode it with the target it was trained "
                 "on (target.model in a run file)")
        if saved.get("weights") not in (None, now["weights"]):
            _log.warning(
                "the proxy was trained on target %r (weights %s) and this target is %r (weights %s): its decisions "
                "were learned on another model's hidden states (target.model / target.dtype in a run file)",
                saved.get("name"), saved.get("weights"), now["name"], now["weights"])

    def _write_model(self, folder, extra: dict) -> None:
        self.model.trained_on = self._target_record()  # the target it was trained on, checked where it decodes
        super()._write_model(folder, extra)

    def _save_checkpoint(self):
        self.model.trained_on = self._target_record()  # a checkpoint's policy/ is a saved proxy too
        return super()._save_checkpoint()

    @property
    def proxy_fraction(self) -> float:
        """Trainable proxy parameters / target parameters."""
        return sum(p.numel() for p in self.params) / sum(p.numel() for p in self.target.parameters())

    # ------------------------------------------------------------------------------------------
    def _prompt_ids(self, prompts) -> list[list[int]]:
        """The target's input per prompt, its last prompt_limit tokens (the end holds the generation prompt); the
        first cut is said once with its count (rollout/context.CutCounter, as the other trainers' inputs)."""
        rows = [templates.user_turn_ids(self.tokenizer, p, use_chat_template=self.config.target_use_chat_template,
                                        system_prompt=self.config.target_system_prompt) or [self.pad_id]
                for p in prompts]
        return self._cut_prompts(rows)

    def _decode_text(self, res: ProxyDecodeOutput) -> list[str]:
        stop = set(self.stop_ids)
        return [self.tokenizer.decode([t for t in row if t not in stop], skip_special_tokens=True).strip()
                for row in res.tokens]

    def proxy_decode(self, prompts, *, greedy: bool, seed: int, rows: tuple[int, int] | None = None,
                     judge=None) -> tuple[ProxyDecodeOutput, list[str]]:
        """Decode prompts under the proxy: greedy decisions (P(accept) >= 1/2) or sampled ones; rows=(lo, hi):
        only those prompts, with the draws they get in the whole call (a process's share of a batch). judge: another
        judge than the proxy's (accept_every_proposal decodes the untouched target with the same draws)."""
        from alignfast.ops import force_backend

        # backend="reference": the proposal step runs on its spec too (the fast-vs-reference parity test)
        with force_backend("reference" if self.config.backend == "reference" else "auto"):
            res = self.decoder.decode(self._prompt_ids(prompts), judge or self.model.judge, seed=seed, rows=rows,
                                      greedy_decisions=greedy, decision_temperature=self.config.temperature)
        return res, self._decode_text(res)

    def _rollout_plan(self, seed: int):
        """The target's draws of AlignProEnvironment.answer (the No fine-tuning arm's): chunks of target_batch_size,
        seed + chunk. The decoder keys each row by (seed, its prompt) as the HF engine does, so under one seed a
        proxy that accepts every proposal gives the HF engine's answers when top_p = 1 and target_top_k = 0. Below
        that the decoder's nucleus (inverse CDF on its uniforms) and top-k are not the HF engine's sampling rule:
        the arm a proxy's answers pair with is target_rollout(), this decoder under a judge that accepts every
        proposal, so that wins and losses come from the proxy's decisions alone at every top_p/top_k/temperature."""
        return self.config.target_batch_size, lambda chunk: seed + chunk

    def _rollout_outputs(self, prompts, columns, *, greedy: bool, seed: int) -> list[str]:
        """rollout(): the target's answers under the proxy (greedy decisions by default); the engine scores them."""
        return self.proxy_decode(prompts, greedy=greedy, seed=seed % (2**31), judge=self._rollout_judge)[1]

    _rollout_judge = None  # rollout()'s judge: None is the proxy's; target_rollout() swaps in accept_every_proposal

    def target_rollout(self, prompts, *, seed: int | None = None, columns: dict[str, list] | None = None):
        """The untouched target's answers, scored: rollout() with a judge that accepts every proposal, so the same
        decoder, settings (target_temperature, target_top_p, target_top_k, target_max_new_tokens), chunks and seeds
        as the proxy's rollout(prompts, seed=seed). This is the No fine-tuning arm the proxy's answers pair with:
        the two differ only where the proxy rejected a proposal."""
        self._rollout_judge = accept_every_proposal
        try:
            return self.rollout(prompts, greedy=True, seed=seed, columns=columns)
        finally:
            del self._rollout_judge  # back to the class default (the proxy's judge)

    def _rewrites_for_result(self, prompts, outputs):
        return list(prompts)  # no rewrite: the target answers the prompt itself

    # ------------------------------------------------------------------------------------------
    def build_rollout(self, res: ProxyDecodeOutput, scores: torch.Tensor) -> Rollout:
        """The PPO batch of one decoding: decisions as actions, old log-probs and values recomputed by the
        proxy (equal to the decoder's, which the tests check), reference log-probs from the prior."""
        m = res.mask
        with torch.no_grad():
            out = self.policy.forward(res.proposals, m, res.actions, m, temperature=self.config.temperature,
                                      features=res.features)
        return Rollout(query_ids=res.proposals, query_mask=m, response_ids=res.actions, response_mask=m,
                       ended=res.ended, logprobs=out.logprobs, ref_logprobs=self.policy.reference_logprobs(res.actions, m),
                       values=out.values, scores=scores, features=res.features)

    def advantages(self, rollout: Rollout) -> Advantages:
        cfg = self.config
        adv = compute_advantages(rollout, self.ops, kl_coef=self.kl_ctl.value, kl_estimator=cfg.kl_estimator,
                                 gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
                                 whiten_advantages=cfg.whiten_advantages)
        if cfg.rejection_cost > 0:
            # A cost at each rejection, where it happened: rewards are fed to the GAE op as k1 inputs with
            # kl_coef = 1 (-(0 - r) = r), as ppo_core.compute_advantages does for whitened rewards.
            m = rollout.response_mask
            rewards = adv.rewards - cfg.rejection_cost * ((rollout.response_ids == 0) & m).float()
            _, a, ret, _ = self.ops.compute_advantages(
                torch.zeros_like(rewards), rewards, rollout.values, torch.zeros_like(rollout.scores), m, kl_coef=1.0,
                kl_estimator="k1", gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages)
            adv = Advantages(rewards=rewards, advantages=a, returns=ret, kl=adv.kl)
        return adv

    def _train_step(self, step: int, last_good) -> tuple[dict, list[dict]]:
        cfg = self.config
        B = cfg.rollout_batch_size
        batch = self.train_dataset.select(batch_indices(len(self.train_dataset), B, step, cfg.seed))
        # Under N processes this one decodes, answers and scores rows [lo, hi) of the global batch, with the
        # draws those rows get in one process (the decoder keys every draw by its row); after the gathers every
        # process holds the global rollout, and the update splits its micro-batches (trainer/distributed.py).
        procs = self.processes
        lo, hi = procs.rows(B)
        rows = (lo, hi) if procs.distributed else None
        t_start = time.perf_counter()
        res, outputs = self.proxy_decode(batch.prompts, greedy=False, rows=rows,
                                         seed=derive_seed(cfg.seed, step, stream=2) % (2**31))
        t_gen = time.perf_counter()
        env_out = self.environment.step(batch.prompts[lo:hi], outputs, {k: v[lo:hi] for k, v in batch.columns.items()},
                                        seed=self._env_seed(derive_seed(cfg.seed, step, stream=3) % (2**31), lo))
        procs.agreed(check_env_output, self.environment, env_out, batch.prompts[lo:hi], first_episode=lo)
        if procs.distributed:
            outputs, env_out = procs.gather_objects(outputs), gather_env_output(procs, env_out)
        self._check_scores(env_out.scores, env_out.per_func, step, last_good, batch.prompts)
        scores = torch.tensor(env_out.scores, dtype=torch.float32, device=self.device)
        ended = procs.gather_rows(res.ended)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~ended).float()
        t_env = time.perf_counter()
        rollout = self.build_rollout(res, scores[lo:hi])
        if procs.distributed:
            # decisions are left-aligned in [R, D]: every tensor right-padded to the widest D (pad id 0)
            rollout = gather_rollout(procs, rollout, 0, left_padded_queries=False)
            rollout.scores = scores
        with torch.no_grad():
            adv = self.advantages(rollout)
        self.last_rollout = rollout
        self.last_decode = res  # this process's share
        t_lp = time.perf_counter()
        stats, lr_used = self._ppo_update(step, rollout, adv, last_good)
        t_end = time.perf_counter()

        m = rollout.response_mask
        n_dec = int(m.sum())
        n_tok = int(procs.sum(sum(len(t) for t in res.tokens)))
        if n_dec == 0:
            self._warn_no_decision(step, B)
        step_time = t_end - t_start
        metrics = {
            **self._ppo_step_metrics(rollout, adv, scores, stats, lr_used=lr_used, num_eos=int(ended.sum()),
                                     batch_size=B, per_func=env_out.per_func),
            "completions/mean_length": n_tok / B,
            "proxy/decisions_per_episode": n_dec / B,
            # NaN, not 0.0, without a decision: the proxy rejected nothing, it was never asked
            "proxy/accept_rate": float(((rollout.response_ids == 1) & m).sum()) / n_dec if n_dec else math.nan,
            "proxy/rejections_per_token": procs.sum(float(res.rejections.sum())) / max(n_tok, 1),
            "proxy/forced_per_token": procs.sum(float(res.forced.sum())) / max(n_tok, 1),
            "timing_s/prompter_gen": 0.0,
            "timing_s/target_gen": t_gen - t_start,
            "timing_s/reward": env_out.timings.get("reward", t_env - t_gen),
            "timing_s/logprobs": t_lp - t_env,
            "timing_s/update": t_end - t_lp,
            "timing_s/step": step_time,
            "tokens/s": n_tok / step_time if step_time > 0 else 0.0,
        }
        samples = [{"prompt": p, "output": o, "answer": o, "score": s}
                   for p, o, s in zip(batch.prompts, outputs, scores.tolist())]
        return metrics, samples

    _said_no_decision = False

    def _warn_no_decision(self, step: int, episodes: int) -> None:
        """A step whose every token was forced gave the proxy no decision: nothing to learn from, so no update (and
        the LR schedule waits, base._ppo_update). Said once per run, on the first such step; the step's metrics say
        the rest (proxy/decisions_per_episode 0, proxy/accept_rate NaN). Not an error: a later batch may leave the
        proxy choices (an early EOS, a flatter position), and a run meant to leave the target alone is legitimate;
        but a run that trains as a silent no-op was a review's finding."""
        if self._said_no_decision:
            return
        self._said_no_decision = True
        if not self.processes.is_main:  # every process holds the whole rollout: the main one says it for all
            return
        cfg = self.config
        _log.warning(
            "step %d: the proxy had no decision to make in any of its %d episodes: every token was forced, the "
            "target's proposal set holding one token at each position (target_top_p=%s, target_top_k=%s, "
            "target_temperature=%s), so the proxy is not trained by such steps: raise target_top_p / target_top_k "
            "(said once per run)", step + 1, episodes, cfg.target_top_p, cfg.target_top_k, cfg.target_temperature)

    def _ref_logprobs(self, *args, **kwargs):
        raise AlignfastArgumentError("alignfast: the proxy's reference is the Bernoulli prior (ProxyPolicy)")
