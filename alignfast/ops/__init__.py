"""Public fused ops. Each is one torch.library op in the `alignfast` namespace (schema, fake impl,
autograd) with kernels per device: C++ on CPU (alignfast._C), CUDA C++ or Triton on GPU, and the
plain-PyTorch reference (alignfast.reference) as the documented fallback. `python -m alignfast.info`
prints which implementation each op uses on each device, and why.
"""

from alignfast.ops._checks import AlignfastArgumentError
from alignfast.ops._library import force_backend
from alignfast.ops import cpu_gemm
from alignfast.ops.advantages import compute_advantages
from alignfast.ops.linear import linear
from alignfast.ops.linear_token_logprobs import linear_token_logprobs
from alignfast.ops.policy_loss import ppo_policy_loss_from_logits
from alignfast.ops.ppo_loss import ppo_loss
from alignfast.ops.propose_token import propose_token
from alignfast.ops.token_logprobs import token_logprobs
from alignfast import _ext

# Schemas are defined by the imports above; now let the extension register its kernels for them.
_ext.load()
# ...and choose the library of the CPU GEMMs (ALIGNFAST_CPU_GEMM; ops/cpu_gemm.py) before any kernel runs.
cpu_gemm.apply_environment()

__all__ = [
    "AlignfastArgumentError",
    "compute_advantages",
    "force_backend",
    "linear",
    "linear_token_logprobs",
    "ppo_loss",
    "ppo_policy_loss_from_logits",
    "propose_token",
    "token_logprobs",
]
