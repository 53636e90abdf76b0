"""The trained causal LM seen as a policy: log-probs (and entropy) of response tokens, two ways.

For a sequence [query (Q tokens, left-padded) | response (R tokens)], the logits at positions
Q-1 .. Q+R-2 predict the response tokens. With h the backbone's last hidden states and W, b the
LM head:

    logprob_t = log softmax((W h_{Q-1+t} + b) / temperature)[response_t]

backend 'fast':      h = backbone(...) once; only the R response rows go through
                     alignfast.ops.linear_token_logprobs (fused, the [B, R, V] logits never exist).
backend 'reference': logits = model(...).logits over all Q+R positions, sliced, then
                     alignfast.reference.token_logprobs: TRL's PPO trainer, written plainly.

Models whose logits are not a plain linear map of the last hidden state (final soft-capping, a
logit scale) use model(...).logits with the fast token_logprobs op instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from alignfast import reference
from alignfast.rollout._pad_mask import pad_safe_attention
from alignfast.trainer.sampling import position_ids_from_mask


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if is_peft_model(model) else model


def backbone_of(model) -> nn.Module:
    """The decoder stack that returns last_hidden_state (LlamaModel for LlamaForCausalLM, ...)."""
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", "model")
    backbone = getattr(base, prefix, None)
    if backbone is None or backbone is base:
        raise ValueError(f"alignfast: cannot find the backbone of {type(base).__name__} (base_model_prefix={prefix!r})")
    return backbone


def plain_linear_head(model) -> nn.Linear | None:
    """The LM head when logits = head(last_hidden_state) exactly; None otherwise."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None
    cfg = getattr(base, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        value = getattr(text_cfg, attr, None)
        if value not in (None, 1, 1.0):
            return None
    return head


def enable_activation_checkpointing(model) -> list[nn.Module]:
    """Turn on transformers' activation checkpointing of `model`'s decoder layers (non-reentrant
    torch.utils.checkpoint: a layer keeps its input, its activations are recomputed in the backward).

    Returns the modules whose `training` flag gates it: transformers checkpoints only modules in training
    mode, while the trainer keeps every module in eval mode (no dropout, so the rollout's and the update's
    log-probs agree). `layers_in_training_mode` flips those flags alone, never their children's, so
    dropout stays off; the recompute runs the same ops on the same inputs, so values and gradients are
    those without checkpointing.
    """
    base = unwrap(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"alignfast: gradient_checkpointing: {type(base).__name__} does not support activation "
                         "checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def layers_in_training_mode(modules: list[nn.Module]):
    """Set `training` on these modules only (not recursively) while grad is enabled; restore after."""
    if not modules or not torch.is_grad_enabled():
        yield
        return
    before = [m.training for m in modules]
    for m in modules:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(modules, before):
            m.training = flag


def compiled_layers_on(compiled):
    """compiled.active() (regional compilation, trainer/compiled_layers.py), or nothing when None."""
    return compiled.active() if compiled is not None else contextlib.nullcontext()


def fast_gemms_on(owner):
    """Around a full-sequence forward of the fast backend: every F.linear inside runs alignfast.ops.linear, whose
    float32 CPU GEMMs use oneDNN where it is the faster library (AMD CPUs with AVX-512; ops/cpu_gemm.py), else
    nothing. Not with regional compilation (inductor owns those layers) nor with activation checkpointing (the
    backward's recompute runs outside this block, and would round differently from the forward it replays).
    The sampler's decode never enters it, so rollouts are the reference path's, bit for bit."""
    if not owner.route_gemms or owner.compiled is not None or owner.checkpointed:
        return contextlib.nullcontext()
    from alignfast.ops.linear import route_linear

    return route_linear(owner.model if isinstance(owner, CausalLMPolicy) else owner)


@dataclass
class PolicyOutput:
    """Per response token, [B, R]: logprobs (float32, 0 off mask), entropy (or None), values (or None)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None


class CausalLMPolicy:
    """Computes response log-probs of `model` with the configured backend.

    value_head (optional): a module mapping hidden states [.., H] -> [.., 1] applied to the same
    backbone pass ("shared" value head); the policy then also returns values.
    """

    def __init__(self, model, *, backend: str, value_head: nn.Module | None = None):
        self.model = model
        self.backend = backend
        self.value_head = value_head
        self.backbone = backbone_of(model)
        self.head = plain_linear_head(model)
        self.fused = backend == "fast" and self.head is not None
        self.checkpointed: list[nn.Module] = []  # set by enable_activation_checkpointing
        self.compiled = None  # a CompiledLayers (config.torch_compile): switched on around this forward
        self.route_gemms = backend == "fast"  # fast_gemms_on: F.linear through alignfast.ops.linear

    def forward(self, query_ids, query_mask, response_ids, response_mask, *, temperature: float,
                return_entropy: bool = False, entropy_grad: bool = False) -> PolicyOutput:
        """Log-probs [B, R] of the response tokens (and entropy, values). entropy_grad=False returns the
        entropy detached (a statistic, as TRL computes it under no_grad); True keeps it in the graph
        for an entropy bonus."""
        # pad_safe_attention: the left-padded query would give NaN under a float64 model's eager attention
        with layers_in_training_mode(self.checkpointed), compiled_layers_on(self.compiled), fast_gemms_on(self), \
                pad_safe_attention():
            return self._forward(query_ids, query_mask, response_ids, response_mask, temperature=temperature,
                                 return_entropy=return_entropy, entropy_grad=entropy_grad)

    def _forward(self, query_ids, query_mask, response_ids, response_mask, *, temperature: float,
                 return_entropy: bool, entropy_grad: bool) -> PolicyOutput:
        ids, attention, positions = join(query_ids, query_mask, response_ids, response_mask)
        Q, R = query_ids.size(1), response_ids.size(1)
        if self.fused:
            from alignfast.ops import linear_token_logprobs

            hidden = self.backbone(input_ids=ids, attention_mask=attention, position_ids=positions,
                                   use_cache=False).last_hidden_state
            hidden = hidden[:, Q - 1: Q - 1 + R]
            out = linear_token_logprobs(hidden, self.head.weight, response_ids, bias=self.head.bias,
                                        temperature=temperature, mask=response_mask, return_entropy=return_entropy)
            return _policy_output(out, return_entropy, entropy_grad, self._values(hidden))
        if self.backend == "fast":
            from alignfast.ops import token_logprobs as logprob_op
        else:
            logprob_op = reference.token_logprobs
        if self.value_head is not None:
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                             output_hidden_states=True)
            values = self._values(out.hidden_states[-1][:, Q - 1: Q - 1 + R])
        else:
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
            values = None
        logits = out.logits[:, Q - 1: Q - 1 + R]
        if return_entropy and not entropy_grad:
            # TRL: log-probs in the graph, the entropy statistic from the same logits under no_grad.
            logprobs = logprob_op(logits, response_ids, temperature=temperature, mask=response_mask)
            with torch.no_grad():
                _, entropy = logprob_op(logits, response_ids, temperature=temperature, mask=response_mask,
                                        return_entropy=True)
            return _policy_output((logprobs, entropy), True, False, values)
        res = logprob_op(logits, response_ids, temperature=temperature, mask=response_mask,
                         return_entropy=return_entropy)
        return _policy_output(res, return_entropy, entropy_grad, values)

    def _values(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.value_head is None:
            return None
        return self.value_head(hidden).squeeze(-1).float()


def _policy_output(out, return_entropy: bool, entropy_grad: bool, values) -> PolicyOutput:
    if return_entropy:
        logprobs, entropy = out
        entropy = entropy.float() if entropy_grad else entropy.detach().float()
        return PolicyOutput(logprobs=logprobs.float(), entropy=entropy, values=values)
    return PolicyOutput(logprobs=out.float(), values=values)


def join(query_ids, query_mask, response_ids, response_mask):
    """[query | response] ids, attention mask and positions. Response positions after the stop token
    are attended as padding; causal attention keeps them from touching any earlier position."""
    ids = torch.cat([query_ids, response_ids], dim=1)
    attention = torch.cat([query_mask, response_mask], dim=1)
    # Positions continue from the query's last real token through the whole response block.
    q_pos = position_ids_from_mask(query_mask)
    r_pos = q_pos[:, -1:] + torch.arange(1, response_ids.size(1) + 1, device=ids.device)
    positions = torch.cat([q_pos, r_pos], dim=1)
    return ids, attention.long(), positions


class ValueModel(nn.Module):
    """A critic: backbone -> Linear(H, 1) on the last hidden state, one value per position.

    TRL's PPO uses a separate critic the size of the policy; `from_causal_lm` builds one from a copy
    of the policy's backbone (the head starts at zero, so initial values are 0).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.checkpointed: list[nn.Module] = []  # set by enable_activation_checkpointing
        self.compiled = None  # a CompiledLayers (config.torch_compile): switched on around this forward
        self.route_gemms = False  # set by the fast backend's trainers: see fast_gemms_on

    @classmethod
    def from_causal_lm(cls, model) -> ValueModel:
        import copy

        backbone = copy.deepcopy(backbone_of(model))
        hidden = unwrap(model).config.get_text_config().hidden_size
        head = nn.Linear(hidden, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        p = next(backbone.parameters())
        return cls(backbone, head.to(device=p.device, dtype=p.dtype))

    @classmethod
    def from_sequence_classifier(cls, model) -> ValueModel:
        """An AutoModelForSequenceClassification-like model (backbone + `score`), as TRL's value models."""
        head = getattr(model, "score", None)
        if head is None:
            raise ValueError("alignfast: argument 'value_model' must be a ValueModel or a sequence classifier with a "
                             "`score` head")
        return cls(backbone_of(model), head)

    def forward(self, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        """Values [B, R] (float32) of the states before each response token."""
        ids, attention, positions = join(query_ids, query_mask, response_ids, response_mask)
        Q, R = query_ids.size(1), response_ids.size(1)
        # pad_safe_attention: the left-padded query would give NaN under a float64 model's eager attention
        with layers_in_training_mode(self.checkpointed), compiled_layers_on(self.compiled), fast_gemms_on(self), \
                pad_safe_attention():
            hidden = self.backbone(input_ids=ids, attention_mask=attention, position_ids=positions,
                                   use_cache=False).last_hidden_state[:, Q - 1: Q - 1 + R]
            return self.head(hidden).squeeze(-1).float()


def value_head_for(model) -> nn.Linear:
    """A zero-initialised Linear(H, 1) for the shared-backbone value head, on the model's device/dtype."""
    base = unwrap(model)
    hidden = base.config.get_text_config().hidden_size
    p = next(base.parameters())
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head.to(device=p.device, dtype=p.dtype)


def with_lora(model, peft_config, setting: str):
    """get_peft_model, with peft's own errors (target_modules that match no module, a bad rank) as one line naming
    peft_config and the run file's `setting` (prompter.lora, target.lora, aligner.lora)."""
    from peft import get_peft_model

    from alignfast.ops._checks import fail

    try:
        return get_peft_model(model, peft_config)
    except (ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        wanted = getattr(peft_config, "target_modules", None)
        about = (f"target_modules ({', '.join(sorted(map(str, wanted)))}) " if "target modules" in first.lower()
                 and wanted and not isinstance(wanted, str) else "")
        fail("peft_config", f"{about}cannot be applied: {first} ({setting}"
             + (".target_modules" if about else "") + " in a run file)")
