"""Fused per-token log-probabilities (and entropy) of sampled tokens, reading the logits once.

With z = logits / temperature over the vocabulary axis (see alignfast.reference.logprobs):

    logprob = z[token] - logsumexp(z)
    entropy = logsumexp(z) - sum_v softmax(z)_v * z_v        (-inf logits contribute 0)

Forward keeps O(N) per-row statistics (logprob, entropy, logsumexp); no [N, V] buffer. Backward
recomputes softmax from the logits and the saved logsumexp and writes dlogits once, in the logits'
dtype (a backward with create_graph=True, for second derivatives, goes through the reference instead):

    dlogits_v = (1/T) [ g_logprob (1[v = token] - p_v) + g_entropy p_v (E_p[z] - z_v) ]

Non-finite logits (every path: the C++ kernels, the Triton kernels and the reference agree):
  * -inf logits are tokens of probability 0: they contribute nothing; a -inf target gives logprob -inf.
  * a row with a +inf logit has no normalisable distribution. Its outputs are what torch.log_softmax gives:
    logprob -inf for a finite target and NaN for a +inf target, entropy NaN, logsumexp +inf, and a NaN
    gradient for the row (the fused kernels fill the row; the reference has NaN at the +inf entries).
  * a row of -inf only: logprob and entropy NaN.
Tiny temperatures stay finite wherever the float32 reference is: the kernels scale (x - max x) / T, which
is <= 0 exactly, rather than x / T - max(x / T) (tests/ops/test_logprobs_extremes.py).

Kernels: C++ on CPU (csrc/cpu/token_logprobs.cpp), Triton on CUDA (kernels/logprobs.py).
"""

from __future__ import annotations

import torch

from alignfast import reference
from alignfast.ops import _checks
from alignfast.ops._library import define_op, op, use_reference

NAME = "token_logprobs"
BACKWARD = "token_logprobs_backward"

define_op(
    NAME,
    "(Tensor logits, Tensor tokens, Tensor? mask, float temperature, bool with_entropy) -> (Tensor, Tensor, Tensor)",
    gpu_impl="triton",
    triton="logprobs:token_logprobs_cuda",
)
define_op(
    BACKWARD,
    "(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor tokens, Tensor? mask, Tensor logprobs, "
    "Tensor entropy, Tensor lse, float temperature, ScalarType? grad_dtype) -> Tensor",
    gpu_impl="triton",
    triton="logprobs:token_logprobs_backward_cuda",
    public=False,
)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-token outputs are float32, or float64 for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"alignfast::{NAME}")
def _fake(logits, tokens, mask, temperature, with_entropy):
    B, T, _ = logits.shape
    dtype = stats_dtype(logits.dtype)
    logprobs = logits.new_empty((B, T), dtype=dtype)
    entropy = logits.new_empty((B, T) if with_entropy else (0, 0), dtype=dtype)
    return logprobs, entropy, logits.new_empty((B, T), dtype=dtype)


@torch.library.register_fake(f"alignfast::{BACKWARD}")
def _fake_backward(grad_logprobs, grad_entropy, logits, tokens, mask, logprobs, entropy, lse, temperature, grad_dtype):
    return logits.new_empty(logits.shape, dtype=grad_dtype or logits.dtype)


def _setup_context(ctx, inputs, output):
    logits, tokens, mask, temperature, with_entropy = inputs
    logprobs, entropy, lse = output
    # The caller gets logprobs and entropy and may edit them in place (a clamp_, a masked_fill_): private copies
    # ([B, T], small beside the logits) keep backward working as it does on the reference path.
    ctx.save_for_backward(logits, tokens, mask, logprobs.clone(), entropy.clone(), lse)
    ctx.temperature = temperature
    ctx.with_entropy = with_entropy


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, tokens, mask, logprobs, entropy, lse = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(logprobs)
    if not ctx.with_entropy:
        grad_entropy = None
    if torch.is_grad_enabled():
        # backward(create_graph=True): the kernel's dlogits would be a constant to autograd (second derivatives
        # silently 0), so this rare path differentiates the reference instead, which autograd can differentiate
        # again. It materialises [N, V] like the reference does.
        grad = _grad_through_reference(logits, tokens, mask, ctx.temperature, grad_logprobs, grad_entropy)
        return grad, None, None, None, None
    grad = op(BACKWARD)(grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
                        logits, tokens, mask, logprobs, entropy, lse, ctx.temperature, None)
    return grad, None, None, None, None


def _grad_through_reference(logits, tokens, mask, temperature, grad_logprobs, grad_entropy):
    """d(sum g_lp * logprob + g_ent * entropy)/dlogits with create_graph=True, from alignfast.reference."""
    with torch.enable_grad():
        x = logits if logits.requires_grad else logits.detach().requires_grad_()
        lp, ent = reference.token_logprobs(x, tokens, temperature=temperature, mask=mask, return_entropy=True)
        outs, grads = [lp], [grad_logprobs.to(lp.dtype)]
        if grad_entropy is not None:
            outs.append(ent)
            grads.append(grad_entropy.to(ent.dtype))
        (grad,) = torch.autograd.grad(outs, x, grads, create_graph=True)
    return grad


torch.library.register_autograd(f"alignfast::{NAME}", _backward, setup_context=_setup_context)


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of logits [..., V] with unit stride over V (a copy only when no view exists)."""
    V = logits.shape[-1]
    if V > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits.view(1, 1, V)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    try:
        return logits.view(-1, logits.shape[-2], V)
    except RuntimeError:
        return logits.reshape(-1, logits.shape[-2], V)


def check_args(logits, tokens, mask, temperature, *, logits_name: str = "logits"):
    """Validate the arguments shared by the log-prob ops; returns (mask as bool or None, temperature)."""
    _checks.tensor(logits_name, logits, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if logits.shape[-1] < 1:
        _checks.fail(logits_name, f"needs a vocabulary of at least one entry, got shape {tuple(logits.shape)}")
    _checks.tensor("tokens", tokens)
    _checks.same_shape(logits_name + "'s leading dims", logits, "tokens", tokens, shape=logits.shape[:-1])
    _checks.same_device(logits_name, logits, "tokens", tokens)
    temperature = _checks.temperature("temperature", temperature)
    if mask is not None:
        mask = _checks.mask("mask", mask, "tokens", tokens)
    check_token_ids(tokens, logits.shape[-1], mask)
    return mask, temperature


def check_token_ids(tokens, vocab_size: int, mask):
    """Ids in [0, vocab_size) at valid positions. Under torch.compile only the dtype is checked (the value
    check would break the graph); the CPU kernels still check every id they read, the Triton ones clamp."""
    if torch.compiler.is_compiling():
        if tokens.dtype not in (torch.int64, torch.int32):
            _checks.fail("tokens", f"must be an int64 or int32 tensor of token ids, got {tokens.dtype}")
        return
    _checks.token_ids("tokens", tokens, vocab_size, mask)


def run_rows(logits3d: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None, temperature: float,
             with_entropy: bool):
    """Call the op on [B, T, V] logits; tokens/mask of any shape with B*T elements."""
    B, T, _ = logits3d.shape
    tok = tokens.reshape(B, T).to(torch.int64).contiguous()
    m = None if mask is None else mask.reshape(B, T).contiguous()
    return op(NAME)(logits3d, tok, m, temperature, with_entropy)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """Log-probabilities of `tokens` under softmax(logits / temperature), without an [N, V] buffer.

    logits [..., V] (float32, bfloat16, float16 or float64), tokens [...] int64/int32, mask [...] bool
    (False = padding: output 0, gradient 0). Returns float32 logprobs [...] (float64 for float64
    logits), and entropy [...] too when return_entropy. Differentiable w.r.t. logits through both.
    """
    mask, temperature = check_args(logits, tokens, mask, temperature)
    if use_reference(NAME, logits):
        return reference.token_logprobs(logits, tokens, temperature=temperature, mask=mask,
                                        return_entropy=return_entropy)
    logprobs, entropy, _lse = run_rows(as_rows(logits), tokens, mask, temperature, return_entropy)
    shape = tokens.shape
    if return_entropy:
        return logprobs.view(shape), entropy.view(shape)
    return logprobs.view(shape)
