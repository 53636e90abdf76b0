"""Outputs a caller edits in place (a clamp_ of log-probs, stats scaled for gradient accumulation) must not break
the backward: the reference path allows it, and the fused ops saved those very tensors for their backward
("one of the variables needed for gradient computation has been modified by an inplace operation")."""

from __future__ import annotations

import pytest
import torch

from alignfast import ops
from alignfast.ops import force_backend


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_edited_outputs_leave_the_gradient_as_it_was(backend):
    torch.manual_seed(0)
    B, T, V, H = 2, 3, 7, 4
    logits, tokens, mask = torch.randn(B, T, V), torch.randint(0, V, (B, T)), torch.rand(B, T) > 0.3
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)

    def grads(edit):
        with force_backend(backend):
            x = logits.clone().requires_grad_()
            lp, ent = ops.token_logprobs(x, tokens, mask=mask, return_entropy=True)
            w = weight.clone().requires_grad_()
            llp, lent = ops.linear_token_logprobs(hidden, w, tokens, return_entropy=True)
            p, v = torch.randn(B, T, generator=torch.Generator().manual_seed(1)).requires_grad_(), \
                torch.randn(B, T, generator=torch.Generator().manual_seed(2)).requires_grad_()
            fixed = [torch.randn(B, T, generator=torch.Generator().manual_seed(k)) for k in range(3, 7)]
            loss, stats = ops.ppo_loss(p, fixed[0], fixed[1], v, fixed[2], fixed[3], mask)
            total = lp.sum() + ent.sum() + llp.sum() + lent.sum() + loss
            if edit:
                for t in (lp, ent, llp, lent, stats["pg_loss"]):
                    t.mul_(0.5)
            total.backward()
            return x.grad, w.grad, p.grad, v.grad

    for plain, edited in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(edited, plain, rtol=0, atol=0)
