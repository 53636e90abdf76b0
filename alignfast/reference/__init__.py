"""Plain-PyTorch implementations of every alignfast op: the specification.

No fusion, no tricks, float64-capable: computed in the inputs' dtype (pass float64 to get the
ground truth). The fast paths in alignfast.ops are tested against these; they never call them,
except as the documented fallback when no kernel exists for a device.
"""

from alignfast.reference.advantages import compute_advantages, kl_estimate, masked_mean, masked_whiten
from alignfast.reference.logprobs import linear_token_logprobs, token_logprobs
from alignfast.reference.ppo_loss import ppo_loss, ppo_policy_loss_from_logits
from alignfast.reference.proposal import propose_token

__all__ = [
    "compute_advantages",
    "kl_estimate",
    "linear_token_logprobs",
    "masked_mean",
    "masked_whiten",
    "ppo_loss",
    "ppo_policy_loss_from_logits",
    "propose_token",
    "token_logprobs",
]
