"""The Aligner's SFT loss: token-mean negative log-likelihood of the correction tokens and EOS.

For a batch [prompt | target] with target tokens c_t (mask m_t: real correction tokens and the EOS),

    loss = - sum_{b,t} m_bt log p(c_bt | prompt_b, c_b,<t)  /  sum_{b,t} m_bt

Prompt tokens carry no loss. Two backends compute the same numbers:

    fast       backbone hidden states h -> only the target rows go through
               alignfast.ops.linear_token_logprobs(h, W, c) (the [N, V] logits never exist; models whose
               logits are not a plain linear map of h fall back to their logits and the fused
               token_logprobs op, as the PPO policy does)
    reference  model(...).logits over every position -> torch.nn.functional.cross_entropy on the target
               positions (ignore_index for the rest): the plain SFT step of TRL / transformers

`correction_nll_sum` returns the SUM and the token count, so gradient accumulation can divide every
micro-batch by the token count of the whole optimizer step (an exact token mean over the step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignfast.aligner.data import Batch
from alignfast.ops.linear import route_linear
from alignfast.rollout._pad_mask import pad_safe_attention
from alignfast.trainer.policy import backbone_of, join, plain_linear_head

IGNORE_INDEX = -100


class CorrectionLoss:
    def __init__(self, model, *, backend: str):
        self.model = model
        self.backend = backend
        self.head = plain_linear_head(model) if backend == "fast" else None
        self.backbone = backbone_of(model) if self.head is not None else None

    def nll_sum(self, batch: Batch) -> torch.Tensor:
        """Summed NLL (float32 scalar, or float64 for a float64 model) of the batch's target tokens."""
        if self.backend != "fast":
            return reference_nll_sum(self.model, batch)
        # The backbone's F.linear on oneDNN's GEMMs where the process chose them, unless the model checkpoints its
        # layers (ops/linear.py: route_linear). pad_safe_attention: the left-padded prompts would give NaN under a
        # float64 model's eager attention (alignfast.rollout._pad_mask).
        with route_linear(self.model), pad_safe_attention():
            return self._fast_nll_sum(batch)

    def _fast_nll_sum(self, batch: Batch) -> torch.Tensor:
        from alignfast.ops import linear_token_logprobs, token_logprobs

        ids, attention, positions = join(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
        Q, R = batch.query_ids.size(1), batch.response_ids.size(1)
        if self.head is not None:
            hidden = self.backbone(input_ids=ids, attention_mask=attention, position_ids=positions,
                                   use_cache=False).last_hidden_state[:, Q - 1: Q - 1 + R]
            logprobs = linear_token_logprobs(hidden, self.head.weight, batch.response_ids, bias=self.head.bias,
                                             mask=batch.response_mask)
        else:  # soft-capped or scaled logits: not a plain linear map of h
            logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                use_cache=False).logits[:, Q - 1: Q - 1 + R]
            logprobs = token_logprobs(logits, batch.response_ids, mask=batch.response_mask)
        return -logprobs.masked_fill(~batch.response_mask, 0.0).sum()

    def __call__(self, batch: Batch) -> torch.Tensor:
        """Token-mean NLL of one batch."""
        return self.nll_sum(batch) / max(1, batch.num_tokens)


class CorrectionNLL(torch.nn.Module):
    """The corrector and its loss as one module whose forward is the summed NLL of a batch: what DDP wraps
    under N processes (its gradient hooks are armed by the wrapper's forward, which must produce the loss)."""

    def __init__(self, model: torch.nn.Module, loss: CorrectionLoss):
        super().__init__()
        self.model = model
        self._loss = [loss]  # not a submodule: it holds references to the model above

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._loss[0].nll_sum(batch)


def reference_nll_sum(model, batch: Batch) -> torch.Tensor:
    """Full logits + cross-entropy on the target positions (the logits at position t predict token t+1)."""
    ids, attention, positions = join(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    Q, R = batch.query_ids.size(1), batch.response_ids.size(1)
    with pad_safe_attention():  # left-padded prompts: see alignfast.rollout._pad_mask
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
    logits = logits[:, Q - 1: Q - 1 + R]
    labels = batch.response_ids.masked_fill(~batch.response_mask, IGNORE_INDEX)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).to(dtype), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
