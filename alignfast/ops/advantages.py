"""TEMPORARY during the founding sprint: delegates to the reference until the fused op lands.

The owner of this op replaces this file with: schema (define_op), fake impl, autograd, argument
checks, and the dispatch between torch.ops.alignfast.compute_advantages and the reference fallback.
"""

from alignfast.reference import compute_advantages  # noqa: F401
