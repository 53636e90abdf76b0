"""token_logprobs against the ways RLHF code computes per-token log-probs today.

    python -m bench.bench_logprobs [--device cpu|cuda] [--record] [--quick] [--backward] [--dtype bf16]
    python -m bench.bench_logprobs --threads 1 --clock cpu [...]   (CPU seconds of one thread: the kernels'
        own cost, which a loaded machine does not inflate; bench/harness.py)
    python -m bench.bench_logprobs --policy-loss [...]     (ppo_policy_loss_from_logits, forward + backward)

Providers (each on the same logits, in the same run):
  torch eager            log_softmax(logits.float() / T).gather(tokens)          (materialises [N, V] fp32)
  trl selective_log_softmax   TRL's function: per-row logsumexp loop on CPU, its Triton kernel on CUDA
  trl triton logprob+entropy  trl.kernels.selective_log_softmax_and_entropy (CUDA)
  liger fused_selective_log_softmax  Liger-Kernel's Triton kernel (CUDA, forward only)
  torch.compile reference     torch.compile of alignfast.reference.token_logprobs
  torch.compile reference +entropy   the same with return_entropy=True (what "alignfast +entropy" competes with)
  alignfast / alignfast +entropy   this package's op (C++ on CPU, Triton on CUDA)

With --policy-loss (always forward + backward, entropy_coef 0.01, random masks):
  reference (eager)           alignfast.reference.ppo_policy_loss_from_logits (log_softmax-based)
  torch.compile reference     the same under torch.compile
  liger grpo_loss             Liger-Kernel's fused Triton GRPO loss, loss_type='dapo' (token mean), beta 0,
                              per-sequence advantages, inplace=False (CUDA; inplace=True would write dlogits over
                              the logits, so every later call, the warm-up's and the reps', would score those)
  alignfast                   ppo_policy_loss_from_logits (fused token_logprobs pass + O(N) terms)

Timing: bench/harness.py's interleaved rounds (--rounds, default 5), a fresh logits draw each round, so every
time is a median over rounds with its IQR and every speed-up a median of per-round ratios with its IQR.
Columns: median time, peak extra memory, speed-up vs TRL's selective_log_softmax (the goal's baseline) and vs
the two torch.compile rows,
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
COMPILED = "torch.compile reference"
COMPILED_ENTROPY = "torch.compile reference +entropy"


def make_inputs(B, T, V, dtype, device, *, grad: bool, seed: int = 0):
    # Drawn on the device itself: at 16384 x 151936 a CPU draw takes ~10 s per provider of a GPU call
    # that must fit in 10 minutes. One draw per round (seed = round), shared by every provider.
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)
    if grad:
        logits.requires_grad_()
    return logits, tokens


def _step(fn, logits, backward: bool):
    """fn(logits), timed forward only or forward + backward."""
    return _vocab.step(lambda: fn(logits), (logits,), backward)


def providers(B, T, V, dtype, device, temperature, backward):
    """name -> factory((logits, tokens)) -> the timed call."""
    def eager(inp):
        logits, tokens = inp
        return _step(lambda x: torch.log_softmax(x.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                     logits, backward)

    def trl_selective(inp):
        from trl.trainer.utils import selective_log_softmax

        logits, tokens = inp
        return _step(lambda x: selective_log_softmax(x, tokens, temperature=temperature), logits, backward)

    def trl_triton_entropy(inp):
        if device != "cuda":
            raise RuntimeError("CUDA only")
        from trl.kernels import selective_log_softmax_and_entropy

        logits, tokens = inp
        return _step(lambda x: selective_log_softmax_and_entropy(x, tokens, temperature=temperature), logits, backward)

    def liger(inp):
        if device != "cuda":
            raise RuntimeError("CUDA only")
        if backward:
            raise RuntimeError("forward only (no autograd)")
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        # Liger takes [B, T+1, V] (the prompt's last position included) and scores the first T.
        logits, tokens = make_inputs(B, T + 1, V, dtype, device, grad=False, seed=int(inp[1][0, 0]))
        return _step(lambda x: fused_selective_log_softmax(x, tokens[:, 1:].contiguous(), temperature), logits, False)

    # Static shapes: the second shape in the same process would otherwise recompile it with dynamic shapes,
    # slower code than a fresh compile gets (dynamo's automatic dynamic). Compiled in the first warm-up.
    compiled = torch.compile(reference.token_logprobs, dynamic=False)

    def compiled_reference(entropy: bool):
        def factory(inp):
            logits, tokens = inp
            return _step(lambda x: compiled(x, tokens, temperature=temperature, return_entropy=entropy), logits,
                         backward)
        return factory

    def alignfast(entropy: bool):
        def factory(inp):
            logits, tokens = inp
            return _step(lambda x: token_logprobs(x, tokens, temperature=temperature, return_entropy=entropy),
                         logits, backward)
        return factory

    table = {
        "torch eager": eager,
        BASELINE: trl_selective,
        COMPILED: compiled_reference(False),
        COMPILED_ENTROPY: compiled_reference(True),
        "alignfast": alignfast(False),
        "alignfast +entropy": alignfast(True),
    }
    if device == "cuda":
        table["trl triton logprob+entropy"] = trl_triton_entropy
        table["liger fused_selective_log_softmax"] = liger
    return table


def policy_loss_providers(B, T, V, dtype, device, temperature):
    from alignfast.ops import ppo_policy_loss_from_logits

    def extras(logits):
        g = torch.Generator(device="cpu").manual_seed(1)
        old = (torch.randn(B, T, generator=g) * 0.1 - 8).to(device)
        adv = torch.randn(B, generator=g).to(device)
        mask = torch.rand(B, T, generator=g).to(device) > 0.1
        return old, adv, mask

    def ours(fn):
        def factory(inp):
            logits, tokens = inp
            old, adv, mask = extras(logits)
            adv_tok = adv[:, None].expand(B, T).contiguous()
            return _vocab.step(lambda: fn(logits, tokens, old, adv_tok, mask, temperature=temperature,
                                          entropy_coef=0.01)[0], (logits,), True)
        return factory

    def liger(inp):
        if device != "cuda":
            raise RuntimeError("CUDA only")
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        logits, tokens = make_inputs(B, T + 1, V, dtype, device, grad=True, seed=int(inp[1][0, 0]))
        old, adv, mask = extras(logits)
        return _vocab.step(lambda: triton_grpo_loss(logits, old, None, tokens[:, :T].contiguous(), adv,
                                                    mask.contiguous(), temperature=temperature, beta=0.0,
                                                    eps_low=0.2, eps_high=0.2, inplace=False, loss_type="dapo",
                                                    reduce=True)[0],
                           (logits,), True)

    table = {
        "reference (eager)": ours(reference.ppo_policy_loss_from_logits),
        COMPILED: ours(torch.compile(reference.ppo_policy_loss_from_logits, dynamic=False)),
        "alignfast": ours(ppo_policy_loss_from_logits),
    }
    if device == "cuda":
        table["liger grpo_loss"] = liger
    return table


def main(argv=None):
    def extra(parser):
        parser.add_argument("--temperature", type=float, default=1.0)
        parser.add_argument("--policy-loss", action="store_true", help="time ppo_policy_loss_from_logits fwd+bwd")
        parser.add_argument("--shapes", choices=["all", "small", "large"], default="all",
                            help="the first shape, the second, or both (the second needs several GB on CPU)")

    args, device, dtype = _vocab.parse_args(__doc__, argv, extra)
    if args.policy_loss:
        args.backward = True
    if device == "cuda":
        shapes = [(1, 2048, 32000), (8, 2048, 151936)] if not args.quick else [(1, 2048, 32000)]
    else:
        shapes = [(8, 256, 32000), (4, 512, 151936)] if not args.quick else [(2, 64, 32000)]
    if args.policy_loss or args.shapes == "small":
        shapes = shapes[:1]
    elif args.shapes == "large" and len(shapes) > 1:
        shapes = shapes[1:]
    bandwidth = harness.measured_copy_bandwidth(device) if device == "cuda" else None
    elt = torch.empty((), dtype=dtype).element_size()
    logits_bytes = lambda s: s[0] * s[1] * s[2] * elt  # noqa: E731
    moved = 3 if args.backward else 1  # logits read once; + read again and dlogits written in the backward
    _vocab.run(
        shapes,
        inputs=lambda s: (lambda r: make_inputs(*s, dtype, device, grad=args.backward, seed=r)),
        providers=(lambda s: policy_loss_providers(*s, dtype, device, args.temperature)) if args.policy_loss else
                  (lambda s: providers(*s, dtype, device, args.temperature, args.backward)),
        label=lambda s: f"{s[0]}x{s[1]}x{s[2]} {str(dtype).replace('torch.', '')}",
        logits_bytes=logits_bytes,
        floor=(lambda s, sec: moved * logits_bytes(s) / sec / bandwidth) if bandwidth else None,
        floor_column="% copy BW",
        baseline="reference (eager)" if args.policy_loss else BASELINE,
        also_vs=(COMPILED,) if args.policy_loss else (COMPILED, COMPILED_ENTROPY),
        title=(f"ppo_policy_loss_from_logits, forward + backward, temperature {args.temperature}" if args.policy_loss
               else f"token_logprobs, {'forward + backward' if args.backward else 'forward'}, "
                    f"temperature {args.temperature}"),
        device=device, rounds=args.rounds, reps=1 if args.quick or device == "cpu" else 3, warmup=1,
        record=args.record, clock=args.clock,
        check=harness.Check(_vocab.TOLERANCES, dtype=dtype, groups={  # a backward of logprobs + entropy
            name: "entropy" for name in (COMPILED_ENTROPY, "alignfast +entropy", "trl triton logprob+entropy")
        } if args.backward else {}, skip={
            "liger fused_selective_log_softmax": "scores its own [B, T+1, V] draw",
            "liger grpo_loss": "its own [B, T+1, V] draw and DAPO's per-sequence loss"}),
        notes=f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else "")


if __name__ == "__main__":
    main()
