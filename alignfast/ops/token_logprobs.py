"""TEMPORARY during the founding sprint: delegates to the reference until the fused op lands.

The owner of this op replaces this file with: schema (define_op), fake impl, autograd, argument
checks, and the dispatch between torch.ops.alignfast.token_logprobs and the reference fallback.
"""

from alignfast.reference import token_logprobs  # noqa: F401
