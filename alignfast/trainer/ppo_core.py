"""The PPO engine: rollout statistics, KL-shaped advantages, clipped updates. Method-agnostic.

Per PPO step, over a batch of B episodes with response mask m [B, R]:

  1. old log-probs pi_old(a_t), reference log-probs pi_ref(a_t), values V(s_t)        (no grad)
  2. rewards_t = -lambda * kl_t (+ score at the last action), GAE(gamma, lam) -> A_t, returns_t;
     A whitened over the batch                                                      (compute_advantages)
  3. num_ppo_epochs x num_mini_batches optimizer steps, each accumulating gradient_accumulation_steps
     micro-batches k of   l_k = ppo_loss(...) - entropy_coef * mean entropy   (token means over the
     micro-batch), scaled by n_k / n_m (response tokens of the micro- and mini-batch) so the step follows
     the token-mean loss of the whole mini-batch; the gradient norm clipped to max_grad_norm. Under N
     processes each runs G/N of the micro-batches and the scale is N n_k / n_m (trainer.distributed).

On the fast backend with a separate critic and one process, step 1 computes the critic's values of epoch 0's
first micro-batch with their graph, and step 3 takes them from there (CarriedValues): before the first
optimizer step the critic is unchanged, so that forward is the one the update would run again.

The numerics come from an OpSet: alignfast.ops (fused kernels) or alignfast.reference (the spec);
everything else is identical, which is what makes the fast-vs-reference parity test meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch

from alignfast import reference
from alignfast.trainer.policy import CausalLMPolicy


@dataclass
class OpSet:
    compute_advantages: Callable
    ppo_loss: Callable
    token_logprobs: Callable
    name: str


def make_opset(backend: str) -> OpSet:
    if backend == "reference":
        return OpSet(reference.compute_advantages, reference.ppo_loss, reference.token_logprobs, "reference")
    from alignfast import ops

    return OpSet(ops.compute_advantages, ops.ppo_loss, ops.token_logprobs, "fast")


@dataclass
class Rollout:
    """One PPO batch, on the training device. Token tensors [B, Q] / [B, R]; scores [B] float32."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    # Per-action inputs of a policy that is not a causal LM over the query, [B, R, F] (Proxy-RLHF: the frozen
    # target's hidden state and the proposal per decision); passed to policy.forward as `features`.
    features: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                          for f in fields(self)})


@dataclass
class Advantages:
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor


@dataclass
class CarriedValues:
    """The critic's values of epoch 0's first micro-batch, computed with their graph while the rollout is
    scored (PPOUpdater.carry_values) and used by that micro-batch's loss instead of a second critic forward.

    Exact by construction: until the first optimizer step the critic's weights are those of the scoring
    pass, so V_new(s_t) of that micro-batch is V_old(s_t) and the first micro-batch's clipped value loss
    starts at its unclipped value; the forward it saves is one critic forward over pdbs episodes per step.
    order: epoch 0's permutation of the B episodes (drawn from the update's generator, which the update
    then continues); rows: its first micro-batch; values: [len(rows), r1] with grad, r1 the micro-batch's
    trimmed response width."""

    order: torch.Tensor
    rows: torch.Tensor
    values: torch.Tensor


def micro_batch_inputs(query_ids, query_mask, response_ids, response_mask, rows: torch.Tensor):
    """(query_ids, query_mask, response_ids, response_mask) of episodes `rows`, their all-padding margins
    trimmed (trim_columns): the tensors every micro-batch forward of the update runs on."""
    q_mask, r_mask = query_mask[rows], response_mask[rows]
    q0, r1 = trim_columns(q_mask, r_mask)
    return query_ids[rows][:, q0:], q_mask[:, q0:], response_ids[rows][:, :r1], r_mask[:, :r1]


def trim_columns(query_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[int, int]:
    """(first query column holding a real token in some row, response columns up to the last action):
    the all-padding margins of a micro-batch need no compute."""
    q_any = query_mask.any(dim=0)
    q_start = int(q_any.nonzero()[0]) if bool(q_any.any()) else query_mask.size(1) - 1
    # Keep at least one query column: the logits of its last position predict the first action.
    q_start = min(q_start, query_mask.size(1) - 1)
    r_any = response_mask.any(dim=0)
    r_end = int(r_any.nonzero()[-1]) + 1 if bool(r_any.any()) else 1
    return q_start, r_end


def compute_advantages(rollout: Rollout, ops: OpSet, *, kl_coef: float, kl_estimator: str, gamma: float,
                       lam: float, whiten_rewards: bool, whiten_advantages: bool) -> Advantages:
    """KL-shaped rewards and GAE through the op set.

    whiten_rewards (TRL): rewards are rescaled to unit variance over valid tokens, keeping their mean,
    before GAE. The op takes (logprobs, ref_logprobs) rather than rewards, so the second call feeds
    the whitened rewards r as k1 estimator inputs with kl_coef = 1: -(0 - r) = r.
    """
    m = rollout.response_mask
    rewards, advantages, returns, kl = ops.compute_advantages(
        rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.scores, m, kl_coef=kl_coef,
        kl_estimator=kl_estimator, gamma=gamma, lam=lam, whiten=whiten_advantages)
    if whiten_rewards:
        rewards = whiten_keep_mean(rewards, m)
        zeros = torch.zeros_like(rewards)
        _, advantages, returns, _ = ops.compute_advantages(
            zeros, rewards, rollout.values, torch.zeros_like(rollout.scores), m, kl_coef=1.0, kl_estimator="k1",
            gamma=gamma, lam=lam, whiten=whiten_advantages)
    return Advantages(rewards=rewards, advantages=advantages, returns=returns, kl=kl)


def whiten_keep_mean(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """TRL's masked_whiten(shift_mean=False): (x - mean) / std + mean over the mask, 0 off it."""
    mean = reference.masked_mean(x, mask)
    return torch.where(mask, reference.masked_whiten(x, mask, eps) + mean, torch.zeros_like(x))


def bounded_param_groups(params: list[torch.nn.Parameter], max_numel: int = 1 << 24,
                         no_decay: set[int] | None = None) -> list[dict]:
    """The parameters, in their order, as consecutive optimizer param groups of at most max_numel elements each
    (a larger tensor alone in its group); with no_decay (parameter ids), a group also ends where a parameter's
    decay changes, and the no-decay groups get weight_decay 0.

    Why: torch's foreach AdamW computes sqrt(v) for a whole group into one temporary list, a full extra
    copy of the trainable parameters at the peak of the step (1 GB for a 135M policy and its critic in
    float32). AdamW is elementwise, so the split changes no value; the groups share every hyperparameter.
    """
    no_decay = no_decay or set()
    groups, current, size = [], [], 0

    def close():
        group = {"params": current}
        if id(current[0]) in no_decay:
            group["weight_decay"] = 0.0
        groups.append(group)

    for p in params:
        if current and (size + p.numel() > max_numel or (id(p) in no_decay) != (id(current[0]) in no_decay)):
            close()
            current, size = [], 0
        current.append(p)
        size += p.numel()
    if current:
        close()
    return groups


class UpdateStats:
    """Per micro-batch statistics of one PPO step (TRL averages them for its metrics).

    Kept as 0-d tensors while the step runs (no host sync per micro-batch on a GPU); read once at the end.
    """

    KEYS = ("loss", "pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approxkl", "ratio", "entropy")

    def __init__(self):
        self._values: dict[str, list[torch.Tensor]] = {k: [] for k in self.KEYS}
        self.optimizer_steps = 0  # mini-batches that stepped the optimizer (0: the step had no action to learn from)

    def add(self, **values: torch.Tensor) -> None:
        for k in self.KEYS:
            self._values[k].append(values[k].detach().float().reshape(()))

    def gather(self, processes, steps: int) -> None:
        """Every process's micro-batch statistics, in the order one process records them: process r holds
        micro-batches [r G/N, (r+1) G/N) of each mini-batch, so the gathered [N, steps, G/N] is transposed
        to [steps, N, G/N]. steps: the mini-batches that ran (the same on every process); 0: nothing to gather."""
        if steps == 0:
            return
        n = processes.num_processes
        for k in self.KEYS:
            mine = torch.stack(self._values[k])
            every = processes.gather_rows(mine[None].to(processes.accelerator.device)).cpu()
            self._values[k] = list(every.reshape(n, -1, mine.numel() // steps).transpose(0, 1)
                                   .reshape(-1).unbind()) if mine.numel() else []

    def series(self, key: str) -> list[float]:
        v = self._values[key]
        return torch.stack(v).tolist() if v else []

    @property
    def losses(self) -> list[float]:
        return self.series("loss")

    def averages(self) -> dict[str, float]:
        """Means over the step's micro-batches; NaN for a step that updated nothing (Proxy-RLHF with every token
        forced: no action, no loss), which a 0.0 would report as a loss of zero."""
        def mean(key):
            v = self.series(key)
            return sum(v) / len(v) if v else math.nan

        ratio = torch.tensor(self.series("ratio"), dtype=torch.float64)
        return {
            "policy/approxkl_avg": mean("approxkl"),
            "policy/clipfrac_avg": mean("clipfrac"),
            "loss/policy_avg": mean("pg_loss"),
            "loss/value_avg": mean("vf_loss"),
            "val/clipfrac_avg": mean("vf_clipfrac"),
            "policy/entropy_avg": mean("entropy"),
            "val/ratio": mean("ratio"),
            "val/ratio_var": float(ratio.var()) if ratio.numel() > 1 else (0.0 if ratio.numel() else math.nan),
        }


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, mini_batch: int, micro_batch: int, value: float):
        super().__init__(f"loss is {value} (PPO epoch {epoch}, mini-batch {mini_batch}, micro-batch {micro_batch})")


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, *, skip_unit_scale: bool,
                   optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True): with n = ||(g_1, ..., g_k)||_2 over every
    gradient, each g <- g * c, c = min(1, max_norm / (n + 1e-6)); returns n.

    skip_unit_scale (the fast backend), when every gradient is on the CPU:
    - c == 1: the multiply is skipped. g * 1.0 == g bit for bit, so this is torch's result; torch multiplies
      anyway only to avoid reading c on the host, a device sync the CPU does not have.
    - c < 1 and `optimizer` given (a fused AdamW, see fused_grad_scale): c is not multiplied into the gradients
      but set as the optimizer's grad_scale = 1 / c, which torch's fused kernel divides each gradient by as it
      reads it (the path torch's GradScaler unscales through): g / (1 / c) instead of g * c, equal to within
      one float32 rounding (<= 1.2e-7 relative; the fast path's parity tolerance is 1e-4). The caller steps
      next and then clears it (optimizer_step).
    Each saves a read and a write of every gradient per optimizer step (~50 ms for 134.5M on this machine).
    """
    if not skip_unit_scale:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    on_cpu = bool(grads) and all(g.device.type == "cpu" for g in grads)
    coef = max_norm / (total + 1e-6)  # torch's, the same float32 expression
    if on_cpu and bool(coef >= 1.0):  # NaN compares False and goes on to torch's multiply
        return total
    if on_cpu and fused_grad_scale(optimizer) and bool(coef > 0):  # 0 < c < 1 (an infinite norm: torch's way)
        optimizer.grad_scale = torch.reciprocal(coef.float())  # float32 whatever the gradients: the kernel needs it
        return total
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def fused_grad_scale(optimizer) -> bool:
    """The optimizer is torch's fused AdamW, whose kernel divides the gradients by `optimizer.grad_scale`."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step(), then drop the grad_scale clip_grad_norm may have handed it (valid for this step only)."""
    try:
        optimizer.step()
    finally:
        optimizer.__dict__.pop("grad_scale", None)


class PPOUpdater:
    """Runs the clipped PPO updates of one step. value_model is None for a shared value head."""

    def __init__(self, policy: CausalLMPolicy, value_model, optimizer: torch.optim.Optimizer,
                 params: list[torch.nn.Parameter], ops: OpSet, config, *, processes=None, forward_module=None):
        self.processes = processes
        self.forward_module = forward_module  # the accelerate-wrapped TrainableModules under N processes
        self.policy = policy
        self.value_model = value_model
        self.optimizer = optimizer
        self.params = params
        self.ops = ops
        self.config = config

    def carries_values(self) -> bool:
        """Whether carry_values applies: the fast backend, a separate critic that trains, one process (under
        a launcher the forward must run through the DDP/FSDP wrapper's hooks, in the update)."""
        return (self.config.backend == "fast" and self.value_model is not None and self.forward_module is None
                and (self.processes is None or self.processes.num_processes == 1)
                and any(p.requires_grad for p in self.value_model.parameters()))

    def carry_values(self, query_ids, query_mask, response_ids, response_mask,
                     generator: torch.Generator) -> CarriedValues | None:
        """Draws epoch 0's order from `generator` (as update() would) and runs the critic, with grad, on that
        epoch's first micro-batch; None where carries_values() is False (nothing drawn then)."""
        if not self.carries_values():
            return None
        order = torch.randperm(response_ids.size(0), generator=generator).to(response_ids.device)
        rows = self._micro_rows(order, 0, self._micros()[0])
        with torch.enable_grad():
            values = self.value_model(*micro_batch_inputs(query_ids, query_mask, response_ids, response_mask, rows))
        return CarriedValues(order=order, rows=rows, values=values)

    @torch.no_grad()
    def scoring_values(self, carried: CarriedValues, query_ids, query_mask, response_ids, response_mask, *,
                       chunk: int) -> torch.Tensor:
        """Values [B, R] (float32, 0 past each response) of every episode for the advantages: the carried
        rows from their forward, the others from no-grad forwards in chunks of `chunk` episodes."""
        B, R = response_ids.size()
        out = torch.zeros(B, R, dtype=torch.float32, device=response_ids.device)
        mask = torch.ones(B, dtype=torch.bool, device=response_ids.device)
        mask[carried.rows] = False
        others = mask.nonzero().squeeze(1)
        parts = [(carried.rows, carried.values.detach())]
        for start in range(0, others.numel(), chunk):
            rows = others[start: start + chunk]
            parts.append((rows, self.value_model(*micro_batch_inputs(query_ids, query_mask, response_ids,
                                                                      response_mask, rows))))
        for rows, v in parts:
            r_mask = response_mask[rows, :v.size(1)]
            out[rows, :v.size(1)] = torch.where(r_mask, v.float(), torch.zeros_like(v, dtype=torch.float32))
        return out

    def _micros(self) -> list[int]:
        cfg = self.config
        procs = self.processes
        return list(procs.micro_batches(cfg.gradient_accumulation_steps) if procs is not None else
                    range(cfg.gradient_accumulation_steps))

    def _micro_rows(self, order: torch.Tensor, mb: int, micro: int) -> torch.Tensor:
        mbs, pdbs = self.config.mini_batch_size, self.config.per_device_train_batch_size
        mb_idx = order[mb * mbs: (mb + 1) * mbs]
        return mb_idx[micro * pdbs: (micro + 1) * pdbs]

    def forward(self, batch: Rollout, *, temperature: float, return_entropy: bool,
                values: torch.Tensor | None = None):
        """New log-probs and values of a micro-batch (with gradient); the entropy carries a gradient
        only when the loss has an entropy bonus. `values` given (CarriedValues): the critic does not run."""
        extra = {} if batch.features is None else {"features": batch.features}
        if self.forward_module is not None:  # through DDP/FSDP2/ZeRO's forward, so their gradient hooks run
            return self.forward_module(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask,
                                       temperature=temperature, entropy_grad=self.config.entropy_coef > 0, **extra)
        out = self.policy.forward(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask,
                                  temperature=temperature, return_entropy=return_entropy,
                                  entropy_grad=self.config.entropy_coef > 0, **extra)
        if values is None:
            values = out.values
        if values is None:
            values = self.value_model(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
        return out.logprobs, out.entropy, values

    def update(self, rollout: Rollout, adv: Advantages, generator: torch.Generator,
               carried: CarriedValues | None = None) -> UpdateStats:
        """carried (from carry_values with this generator): epoch 0's order was drawn there, and its first
        micro-batch's values come from there."""
        cfg = self.config
        B = rollout.response_ids.size(0)
        mbs = cfg.mini_batch_size
        stats = UpdateStats()
        procs = self.processes
        n_procs = procs.num_processes if procs is not None else 1
        micros = self._micros()
        tokens = rollout.response_mask.sum(1).tolist()  # response tokens per episode (exact integers)
        ran = 0  # mini-batches with at least one action
        for epoch in range(cfg.num_ppo_epochs):
            if epoch == 0 and carried is not None:
                order = carried.order
            else:
                order = torch.randperm(B, generator=generator).to(rollout.response_ids.device)
            for mb in range(cfg.num_mini_batches):
                mb_idx = order[mb * mbs: (mb + 1) * mbs]
                n_mb = sum(tokens[i] for i in mb_idx.tolist())
                if n_mb == 0:
                    # No action in the mini-batch (Proxy-RLHF: every token forced by target_top_p / top_k, so the
                    # proxy decided nothing): no loss to take, and no optimizer step, which would still move the
                    # weights by AdamW's momentum and decay. Every process holds the whole rollout and draws the
                    # same order, so all skip the same mini-batches.
                    continue
                ran += 1
                self.optimizer.zero_grad(set_to_none=True)
                bad = None
                for j, micro in enumerate(micros):
                    idx = self._micro_rows(order, mb, micro)
                    values = None
                    if carried is not None and epoch == 0 and mb == 0 and j == 0:
                        if not torch.equal(idx, carried.rows):  # an internal error, not a user's
                            raise RuntimeError("alignfast: the carried values belong to other episodes")
                        values, carried = carried.values, None  # its graph is freed with this backward
                    # n_k N / n_m: exactly 1.0 with one process and one micro-batch per mini-batch.
                    scale = sum(tokens[i] for i in idx.tolist()) * n_procs / n_mb
                    with (procs.no_sync(self.forward_module, last=j == len(micros) - 1) if procs is not None
                          else nullcontext()):
                        loss = self._micro_step(rollout, adv, idx, stats, values=values)
                        if not torch.isfinite(loss):
                            bad = bad or NonFiniteLoss(epoch, mb, micro, float(loss.detach()))
                            if n_procs == 1:
                                raise bad
                        self._backward(loss * scale)
                if n_procs > 1 and procs.sum(float(bad is not None)) > 0:  # every process stops, none waits
                    raise bad or NonFiniteLoss(epoch, mb, -1, float("nan"))
                self._clip_grad_norm()
                optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        stats.optimizer_steps = ran
        if n_procs > 1:
            stats.gather(procs, steps=ran)
        return stats

    def _backward(self, loss: torch.Tensor) -> None:
        if self.forward_module is not None:
            self.processes.accelerator.backward(loss * self.processes.backward_scale)
        else:
            loss.backward()

    def _clip_grad_norm(self) -> None:
        cfg = self.config
        if cfg.max_grad_norm is None:
            return
        if self.forward_module is not None:  # accelerate's: the global norm of sharded (FSDP2/ZeRO) gradients
            self.processes.accelerator.clip_grad_norm_(self.forward_module.parameters(), cfg.max_grad_norm)
        else:
            fast = cfg.backend == "fast"
            clip_grad_norm(self.params, cfg.max_grad_norm, skip_unit_scale=fast, optimizer=self.optimizer if fast else None)

    def _micro_step(self, rollout: Rollout, adv: Advantages, idx: torch.Tensor, stats: UpdateStats,
                    values: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        batch = rollout.select(idx)
        q0, r1 = trim_columns(batch.query_mask, batch.response_mask)
        batch.query_ids, batch.query_mask = batch.query_ids[:, q0:], batch.query_mask[:, q0:]
        mask = batch.response_mask[:, :r1]
        batch.response_ids, batch.response_mask = batch.response_ids[:, :r1], mask
        logprobs, entropy, values = self.forward(batch, temperature=cfg.temperature, return_entropy=True,
                                                 values=values)
        loss, s = self.ops.ppo_loss(
            logprobs, batch.logprobs[:, :r1], adv.advantages[idx, :r1], values, batch.values[:, :r1],
            adv.returns[idx, :r1], mask, cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
            vf_coef=cfg.vf_coef)
        mean_entropy = reference.masked_mean(entropy.detach(), mask)
        if cfg.entropy_coef > 0 and entropy is not None:
            loss = loss - cfg.entropy_coef * reference.masked_mean(entropy, mask)
        stats.add(loss=loss, pg_loss=s["pg_loss"], vf_loss=s["vf_loss"], clipfrac=s["clipfrac"],
                  vf_clipfrac=s["vf_clipfrac"], approxkl=s["approxkl"], ratio=s["ratio"], entropy=mean_entropy)
        return loss


@torch.no_grad()
def score_rollout(policy: CausalLMPolicy, ref_logprobs_fn: Callable, value_model, query_ids, query_mask,
                  response_ids, response_mask, *, temperature: float, chunk: int,
                  logprobs: torch.Tensor | None = None,
                  values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old log-probs, reference log-probs, values), each [B, R] float32, in chunks of `chunk` rows.

    `logprobs` given (taken from the sampler) skips the policy's own forward, unless the values of a
    shared value head are still needed from it: with a shared head the sampler gives `values` too, and
    then only the reference policy (and nothing else) runs here.
    """
    B = response_ids.size(0)
    out_lp, out_ref, out_v = [], [], []
    for start in range(0, B, chunk):
        sl = slice(start, start + chunk)
        q_ids, q_mask, r_ids, r_mask = query_ids[sl], query_mask[sl], response_ids[sl], response_mask[sl]
        q0, r1 = trim_columns(q_mask, r_mask)
        R = r_ids.size(1)
        q_ids, q_mask, r_ids, r_mask = q_ids[:, q0:], q_mask[:, q0:], r_ids[:, :r1], r_mask[:, :r1]
        v = values[sl, :r1] if values is not None else None
        if logprobs is None or (v is None and value_model is None):
            pol = policy.forward(q_ids, q_mask, r_ids, r_mask, temperature=temperature)
            lp, v = pol.logprobs, (v if v is not None else pol.values)
        else:
            lp = logprobs[sl, :r1]
        if v is None:
            v = value_model(q_ids, q_mask, r_ids, r_mask)
        ref = ref_logprobs_fn(q_ids, q_mask, r_ids, r_mask)
        out_lp.append(_pad_right(lp, R))
        out_ref.append(_pad_right(ref, R))
        out_v.append(_pad_right(torch.where(r_mask, v, torch.zeros_like(v)), R))
    return torch.cat(out_lp), torch.cat(out_ref), torch.cat(out_v)


def _pad_right(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.size(1) == width:
        return x.float()
    return torch.nn.functional.pad(x.float(), (0, width - x.size(1)))
