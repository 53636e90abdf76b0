"""token_logprobs against the ways RLHF code computes per-token log-probs today.

    python -m bench.bench_logprobs [--device cpu|cuda] [--record] [--quick] [--backward] [--dtype bf16]
    python -m bench.bench_logprobs --policy-loss [...]     (ppo_policy_loss_from_logits, forward + backward)

Providers (each on the same logits, in the same run):
  torch eager            log_softmax(logits.float() / T).gather(tokens)          (materialises [N, V] fp32)
  trl selective_log_softmax   TRL's function: per-row logsumexp loop on CPU, its Triton kernel on CUDA
  trl triton logprob+entropy  trl.kernels.selective_log_softmax_and_entropy (CUDA)
  liger fused_selective_log_softmax  Liger-Kernel's Triton kernel (CUDA, forward only)
  torch.compile reference     torch.compile of alignfast.reference.token_logprobs
  alignfast / alignfast +entropy   this package's op (C++ on CPU, Triton on CUDA)

With --policy-loss (always forward + backward, entropy_coef 0.01, random masks):
  reference (eager)           alignfast.reference.ppo_policy_loss_from_logits (log_softmax-based)
  torch.compile reference     the same under torch.compile
  liger grpo_loss             Liger-Kernel's fused Triton GRPO loss, loss_type='dapo' (token mean), beta 0,
                              per-sequence advantages, inplace=True (dlogits overwrite the logits) (CUDA)
  alignfast                   ppo_policy_loss_from_logits (fused token_logprobs pass + O(N) terms)

Columns: median time, peak extra memory, speed-up vs TRL's selective_log_softmax (the goal's baseline),
extra memory as a fraction of the logits' size, and on CUDA the fraction of the measured copy
bandwidth achieved for the bytes that must move (logits read once forward; read twice and dlogits
written once forward+backward).
"""

from __future__ import annotations

import torch

from alignfast import reference
from alignfast.ops import token_logprobs
from bench import _vocab, harness

BASELINE = "trl selective_log_softmax"


def make_inputs(B, T, V, dtype, device, *, grad: bool):
    # Drawn on the device itself: at 16384 x 151936 a CPU draw takes ~10 s per provider of a GPU call
    # that must fit in 10 minutes. Seeded per device, so every provider times the same logits.
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)
    if grad:
        logits.requires_grad_()
    return logits, tokens


def _step(fn, logits, backward: bool):
    """fn(logits), timed forward only or forward + backward."""
    return _vocab.step(lambda: fn(logits), (logits,), backward)


def providers(B, T, V, dtype, device, temperature, backward):
    def eager():
        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        return _step(lambda x: torch.log_softmax(x.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                     logits, backward)

    def trl_selective():
        from trl.trainer.utils import selective_log_softmax

        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        return _step(lambda x: selective_log_softmax(x, tokens, temperature=temperature), logits, backward)

    def trl_triton_entropy():
        if device != "cuda":
            raise RuntimeError("CUDA only")
        from trl.kernels import selective_log_softmax_and_entropy

        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        return _step(lambda x: selective_log_softmax_and_entropy(x, tokens, temperature=temperature), logits, backward)

    def liger():
        if device != "cuda":
            raise RuntimeError("CUDA only")
        if backward:
            raise RuntimeError("forward only (no autograd)")
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        # Liger takes [B, T+1, V] (the prompt's last position included) and scores the first T.
        logits, tokens = make_inputs(B, T + 1, V, dtype, device, grad=False)
        return _step(lambda x: fused_selective_log_softmax(x, tokens[:, 1:].contiguous(), temperature), logits, False)

    def compiled_reference():
        logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
        fn = torch.compile(reference.token_logprobs)
        return _step(lambda x: fn(x, tokens, temperature=temperature), logits, backward)

    def alignfast(entropy: bool):
        def factory():
            logits, tokens = make_inputs(B, T, V, dtype, device, grad=backward)
            return _step(lambda x: token_logprobs(x, tokens, temperature=temperature, return_entropy=entropy),
                         logits, backward)
        return factory

    table = {
        "torch eager": eager,
        BASELINE: trl_selective,
        "torch.compile reference": compiled_reference,
        "alignfast": alignfast(False),
        "alignfast +entropy": alignfast(True),
    }
    if device == "cuda":
        table["trl triton logprob+entropy"] = trl_triton_entropy
        table["liger fused_selective_log_softmax"] = liger
    return table


def policy_loss_providers(B, T, V, dtype, device, temperature):
    from alignfast.ops import ppo_policy_loss_from_logits

    def inputs(extra_row=False):
        logits, tokens = make_inputs(B, T + int(extra_row), V, dtype, device, grad=True)
        g = torch.Generator(device="cpu").manual_seed(1)
        old = (torch.randn(B, T, generator=g) * 0.1 - 8).to(device)
        adv = torch.randn(B, generator=g).to(device)
        mask = torch.rand(B, T, generator=g).to(device) > 0.1
        return logits, tokens[:, :T], old, adv, mask

    def ours(fn):
        def factory():
            logits, tokens, old, adv, mask = inputs()
            adv_tok = adv[:, None].expand(B, T).contiguous()
            return _vocab.step(lambda: fn(logits, tokens, old, adv_tok, mask, temperature=temperature,
                                          entropy_coef=0.01)[0], (logits,), True)
        return factory

    def liger():
        if device != "cuda":
            raise RuntimeError("CUDA only")
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        logits, tokens, old, adv, mask = inputs(extra_row=True)
        return _vocab.step(lambda: triton_grpo_loss(logits, old, None, tokens.contiguous(), adv, mask.contiguous(),
                                                    temperature=temperature, beta=0.0, eps_low=0.2, eps_high=0.2,
                                                    inplace=True, loss_type="dapo", reduce=True)[0],
                           (logits,), True)

    table = {
        "reference (eager)": ours(reference.ppo_policy_loss_from_logits),
        "torch.compile reference": ours(torch.compile(reference.ppo_policy_loss_from_logits)),
        "alignfast": ours(ppo_policy_loss_from_logits),
    }
    if device == "cuda":
        table["liger grpo_loss"] = liger
    return table


def main(argv=None):
    def extra(parser):
        parser.add_argument("--temperature", type=float, default=1.0)
        parser.add_argument("--policy-loss", action="store_true", help="time ppo_policy_loss_from_logits fwd+bwd")

    args, device, dtype = _vocab.parse_args(__doc__, argv, extra)
    if args.policy_loss:
        args.backward = True
    if device == "cuda":
        shapes = [(1, 2048, 32000), (8, 2048, 151936)] if not args.quick else [(1, 2048, 32000)]
    else:
        shapes = [(8, 256, 32000)] if not args.quick else [(2, 64, 32000)]
    bandwidth = harness.measured_copy_bandwidth(device) if device == "cuda" else None
    elt = torch.empty((), dtype=dtype).element_size()
    logits_bytes = lambda s: s[0] * s[1] * s[2] * elt  # noqa: E731
    moved = 3 if args.backward else 1  # logits read once; + read again and dlogits written in the backward
    _vocab.run(
        shapes,
        providers=(lambda s: policy_loss_providers(*s, dtype, device, args.temperature)) if args.policy_loss else
                  (lambda s: providers(*s, dtype, device, args.temperature, args.backward)),
        label=lambda s: f"{s[0]}x{s[1]}x{s[2]} {str(dtype).replace('torch.', '')}",
        logits_bytes=logits_bytes,
        floor=(lambda s, sec: moved * logits_bytes(s) / sec / bandwidth) if bandwidth else None,
        floor_column="% copy BW",
        baseline="reference (eager)" if args.policy_loss else BASELINE,
        title=(f"ppo_policy_loss_from_logits, forward + backward, temperature {args.temperature}" if args.policy_loss
               else f"token_logprobs, {'forward + backward' if args.backward else 'forward'}, "
                    f"temperature {args.temperature}"),
        device=device, reps=5 if args.quick else 10, warmup=2, record=args.record,
        notes=f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else "")


if __name__ == "__main__":
    main()
