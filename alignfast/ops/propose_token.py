"""propose_token: the fused step of Proxy-RLHF decoding (mask, temperature, top-p, sample, log-prob).

At every decoding position the frozen target proposes a token, the proxy accepts or rejects it, and a
rejected token is excluded before the target proposes again from the same logits. This op is one such
proposal for a batch of rows:

    logits [B, V], excluded [B, V] bool, uniforms [B] in [0, 1), temperature >= 0, top_p in (0, 1]
    -> tokens [B] int64, logprobs [B] (float32; float64 for float64 logits), num_allowed [B] int64

The math (nucleus on the target's own distribution, inverse-CDF sampling in index order) is in
alignfast.reference.proposal, the spec. The kernels never build a softmax copy of [B, V]: per row
they make one online pass for (max, sum of exp), find the top-p threshold by bisection on the
ordered bit patterns of the logits (each step a masked sum over the row; no sort), then one pass for
the allowed set's (max, sum) and one inverse-CDF pass. CPU: csrc/cpu/propose_token.cpp; CUDA:
kernels/proposal.py (Triton). Sampling has no gradient. Non-finite logits (a NaN, or +inf at a temperature
above 0) give token -1 with a NaN log-prob, found in the pass that takes the row's max (see the spec).
"""

from __future__ import annotations

import torch

from alignfast import reference
from alignfast.ops import _checks
from alignfast.ops._library import define_op, op, use_reference

NAME = "propose_token"
define_op(
    NAME,
    "(Tensor logits, Tensor excluded, Tensor uniforms, float temperature, float top_p) -> "
    "(Tensor tokens, Tensor logprobs, Tensor num_allowed)",
    gpu_impl="triton",
    triton="proposal:propose_token_triton",
)


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"alignfast::{NAME}")
def _fake(logits, excluded, uniforms, temperature, top_p):
    B = logits.shape[0]
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=output_dtype(logits.dtype)),
            logits.new_empty((B,), dtype=torch.int64))


def check_args(logits, excluded, uniforms, temperature, top_p):
    _checks.tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if logits.shape[1] < 1:
        _checks.fail("logits", f"needs a vocabulary of at least one entry, got shape {tuple(logits.shape)}")
    _checks.tensor("excluded", excluded, ndim=2, dtypes=(torch.bool,))
    _checks.same_shape("logits", logits, "excluded", excluded)
    _checks.same_device("logits", logits, "excluded", excluded)
    _checks.tensor("uniforms", uniforms, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_shape("logits", logits, "uniforms", uniforms, shape=(logits.shape[0],))
    _checks.same_device("logits", logits, "uniforms", uniforms)
    temperature = _checks.temperature("temperature", temperature, zero_is_greedy=True)
    top_p = _checks.in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    return temperature, top_p


def propose_token(logits: torch.Tensor, excluded: torch.Tensor, uniforms: torch.Tensor, *, temperature: float,
                  top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next proposal per row and its log-prob under the target's temperature-scaled distribution
    restricted to its top-p nucleus minus the excluded tokens (see the module docstring).

    A row with no allowed token gets token -1 and log-prob -inf; temperature 0 proposes the most likely
    allowed token with log-prob 0. A row with a NaN logit, or a +inf one when temperature > 0, has no
    distribution: token -1, log-prob NaN, num_allowed 0 (at temperature 0 a +inf logit is the most likely
    token). Uniforms must lie in [0, 1) (they are not checked: a sync per step).
    """
    temperature, top_p = check_args(logits, excluded, uniforms, temperature, top_p)
    if use_reference(NAME, logits):
        tokens, logprobs, n = reference.propose_token(logits, excluded, uniforms, temperature=temperature,
                                                      top_p=top_p)
        return tokens, logprobs.to(output_dtype(logits.dtype)), n
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    # uniforms in the accumulation type: float64 logits keep the caller's float64 uniform (as the spec does)
    u_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return op(NAME)(logits, excluded.contiguous(), uniforms.to(u_dtype).contiguous(), temperature, top_p)
