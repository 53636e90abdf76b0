"""A persistent gradient buffer for a trained embedding matrix on the CPU (the critic's token embeddings).

An embedding's backward on the CPU (ATen's `embedding_dense_backward_cpu`) allocates the whole [V, H] gradient
and zero-fills it on every call, then adds each looked-up position's gradient into its row:

    G = 0 (V x H);   for i = 0 .. n-1 in order:   G[idx_i] += g_i          (idx_i != padding_idx)

For the SmolLM2-135M shape that is a 113 MB block per micro-batch. It is above glibc's largest mmap threshold
(32 MiB), so each one is a fresh mapping: zero-filling it page-faults every 4 KiB page in (~107 ms per call
measured on the 2-core CPU, 215 ms of a 2.9 s LoRA update), and freeing it (the optimizer's
zero_grad(set_to_none=True)) unmaps it again (~25 ms) — while the batch touched ~90 of its 49,152 rows.

`install_embedding_grad_buffer(embedding)` keeps one [V, H] buffer for the weight's gradient across steps and
gives the module a forward whose backward writes into it:

- the rows the last gradient touched are set back to exact zeros (the rest already are: only touched rows
  are ever written), then `buffer.index_add_(0, idx, g)` adds the positions in order, which is the loop above
  term for term (the same adds in the same order from the same zeros: bit for bit, tested);
- when the weight already holds that buffer as its gradient (a second micro-batch of the same optimizer step),
  the micro-batch's own contribution C is built the same way in a second buffer and added to the touched
  rows of the gradient: G + C is what AccumulateGrad's in-place add computes (untouched rows add +0 to values
  that are never -0: a sum that starts at +0 cannot become -0 in round-to-nearest);
- a gradient of another tensor (set by someone else) gets the contribution added densely, as AccumulateGrad.

The backward returns None for the weight: autograd's AccumulateGrad does not run for it, so gradient hooks on
that weight (DDP's reducer, post-accumulate hooks) would not see it. The trainer installs it only where none
exist: the fast backend, one process, the CPU, an embedding whose weight nothing else in the trained modules
uses (a critic's own token embeddings), no max_norm, no scale_grad_by_freq, no sparse gradient.
Memory: the buffer (and, after a step with several micro-batches, the second one) stays allocated between
steps, where the per-call blocks were freed; the update's peak, which holds the gradient anyway, is unchanged.

A policy's token embeddings tied to its LM head (SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B) also get the LM head's
dense dW_head. Autograd adds the two into a fresh [V, H] tensor, so the lookup's zero-filled block costs the same
there. `install_tied_lookup(embedding)`, for runs with one micro-batch per optimizer step (each backward starts
from weight.grad = None), adds the lookup's rows into weight.grad in place instead: autograd's engine runs the
weight's AccumulateGrad as soon as dW_head arrives (it has the highest priority in the ready queue), which
sets weight.grad = dW_head, and the lookup's backward, the last node of the graph, adds its rows with
`index_add_` over unique rows, one add per element: dW_head + G_lookup, bit for bit (x + 0 = x for the rest).
Should the lookup's backward come first, it makes weight.grad = G_lookup (dense) and AccumulateGrad adds dW_head
into it in place: the same sum. With several micro-batches per step the engine's order would add dW_head to
the accumulated gradient before G_lookup, so the trainer does not install it then.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignfast.ops import weight_grad_buffer
from alignfast.trainer.instance_forward import InstanceForward


def _positions(indices: torch.Tensor, grad: torch.Tensor, padding_idx: int | None):
    """(token ids [n], their output gradients [n, H]) in position order, padding_idx's dropped as
    embedding_dense_backward drops them."""
    idx = indices.reshape(-1)
    g = grad.reshape(idx.numel(), grad.size(-1))
    if padding_idx is not None:
        keep = idx != padding_idx
        idx, g = idx[keep], g[keep]
    return idx, g


class EmbeddingGradBuffer:
    """The gradient buffer of one embedding weight and the rows of it that may be nonzero."""

    def __init__(self, weight: nn.Parameter, padding_idx: int | None):
        self.weight = weight
        self.padding_idx = padding_idx
        self.buffer = torch.zeros_like(weight)
        self.dirty: torch.Tensor | None = None      # rows of `buffer` written since it was last all zeros
        self.scratch: torch.Tensor | None = None    # a micro-batch's contribution, when it is accumulated
        self.scratch_dirty: torch.Tensor | None = None

    def _rows(self, indices: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, g = _positions(indices, grad, self.padding_idx)
        return idx, g.to(self.buffer.dtype)

    @staticmethod
    def _clear(buffer: torch.Tensor, dirty: torch.Tensor | None) -> None:
        if dirty is not None and dirty.numel():
            buffer.index_fill_(0, dirty, 0.0)

    def accumulate(self, indices: torch.Tensor, grad: torch.Tensor) -> None:
        """Adds d loss / d weight of one lookup into weight.grad (see the module docstring)."""
        idx, g = self._rows(indices, grad)
        w = self.weight
        if w.grad is None:
            self._clear(self.buffer, self.dirty)
            self.buffer.index_add_(0, idx, g)
            self.dirty = torch.unique(idx)
            w.grad = self.buffer
            return
        if self.scratch is None:
            self.scratch = torch.zeros_like(self.buffer)
        self._clear(self.scratch, self.scratch_dirty)
        self.scratch.index_add_(0, idx, g)
        rows = torch.unique(idx)
        self.scratch_dirty = rows
        if w.grad is self.buffer:
            self.buffer.index_add_(0, rows, self.scratch.index_select(0, rows))  # one add per element
            self.dirty = torch.unique(torch.cat([self.dirty, rows])) if self.dirty is not None else rows
        else:  # a gradient tensor this buffer does not own: AccumulateGrad's dense in-place add
            with torch.no_grad():
                w.grad += self.scratch


class _BufferedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weight, owner):
        ctx.save_for_backward(indices)
        ctx.owner = owner
        return F.embedding(indices, weight, owner.padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        ctx.owner.accumulate(indices, grad_output)
        return None, None, None


class _TiedLookup(torch.autograd.Function):
    """F.embedding whose backward adds G_lookup's rows into weight.grad (see the module docstring).

    The weight is not an input of this node (the module is): an input edge would make the weight's
    AccumulateGrad wait for this node, the last of the graph, so dW_head could not land first. The node's
    output requires grad through `anchor`, a scalar leaf that never receives a gradient."""

    dense_fallbacks = 0  # backwards that found no gradient yet (tests check the engine's order holds)

    @staticmethod
    def forward(ctx, indices, anchor, module):
        ctx.save_for_backward(indices)
        ctx.module = module
        return F.embedding(indices, module.weight, module.padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        w = ctx.module.weight
        idx, g = _positions(indices, grad_output, ctx.module.padding_idx)
        rows, slot = torch.unique(idx, return_inverse=True)
        values = torch.zeros(rows.numel(), g.size(1), dtype=w.dtype, device=g.device)
        values.index_add_(0, slot, g.to(w.dtype))  # each row: 0 + g_i + g_j + ... in position order
        if w.grad is None:  # the head's gradient did not come first: G_lookup densely, as nn.Embedding's
            _TiedLookup.dense_fallbacks += 1
            w.grad = torch.zeros_like(w)
        w.grad.index_add_(0, rows, values)
        return None, None, None


class _ModuleForward(InstanceForward):
    """An embedding's instance-level `forward`: nn.Embedding's lookup without grad, `_lookup` with it."""

    __slots__ = ()

    def __call__(self, input_ids):
        m = self.module
        if not (m.weight.requires_grad and torch.is_grad_enabled()):
            return F.embedding(input_ids, m.weight, m.padding_idx)
        return self._lookup(m, input_ids)


class _TiedForward(_ModuleForward):
    __slots__ = ()

    @staticmethod
    def _lookup(m, input_ids):
        return _TiedLookup.apply(input_ids, m._alignfast_tied, m)


class _BufferedForward(_ModuleForward):
    __slots__ = ()

    @staticmethod
    def _lookup(m, input_ids):
        owner = m._alignfast_grad_buffer
        if owner.weight is not m.weight:  # the weight was replaced since installation: nn.Embedding's own path
            return type(m).forward(m, input_ids)
        return _BufferedLookup.apply(input_ids, m.weight, owner)


# glibc's largest mmap threshold (weight_grad_buffer.py): below it a long-running process reuses heap blocks, and the
# per-row Python of the lookups below would cost more than the zero-fill it saves (the demo's 51 x 64 embeddings).
MIN_GRADIENT_BYTES = weight_grad_buffer.MIN_GRADIENT_BYTES


def buffer_applies(embedding: nn.Module) -> bool:
    """A plain nn.Embedding on the CPU whose backward is the dense loop above (no max_norm, no
    scale_grad_by_freq, no sparse gradient), with a weight larger than MIN_GRADIENT_BYTES."""
    return (type(embedding) is nn.Embedding and embedding.weight.device.type == "cpu"
            and embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse
            and embedding.weight.dtype in (torch.float32, torch.float64)
            and embedding.weight.numel() * embedding.weight.element_size() > MIN_GRADIENT_BYTES)


def install_embedding_grad_buffer(embedding: nn.Embedding) -> EmbeddingGradBuffer:
    """Give `embedding` the buffered backward; the caller has checked buffer_applies() and that nothing else
    uses its weight."""
    owner = EmbeddingGradBuffer(embedding.weight, embedding.padding_idx)
    embedding._alignfast_grad_buffer = owner
    embedding.forward = _BufferedForward(embedding)
    return owner


def install_tied_lookup(embedding: nn.Embedding) -> None:
    """Give `embedding` (tied to a dense use, one micro-batch per step; buffer_applies()) the in-place backward."""
    embedding._alignfast_tied = torch.zeros((), requires_grad=True)  # the anchor (see _TiedLookup)
    embedding.forward = _TiedForward(embedding)


def remove_embedding_grad_buffer(embedding: nn.Module) -> bool:
    """nn.Embedding's own forward and backward again; True if the module had the buffered or tied one."""
    if "_alignfast_grad_buffer" in embedding.__dict__:
        del embedding.__dict__["_alignfast_grad_buffer"]
    elif "_alignfast_tied" in embedding.__dict__:
        del embedding.__dict__["_alignfast_tied"]
    else:
        return False
    embedding.__dict__.pop("forward", None)
    return True


def install_for_policy(model: nn.Module, *, micro_batches_per_step: int) -> str | None:
    """The policy's input embeddings, when they train on the CPU: "buffer" where nothing else uses the weight,
    "tied" where the LM head is its only other use and every optimizer step has one micro-batch; else None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not buffer_applies(emb) or not emb.weight.requires_grad:
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    users = _holders(model, emb.weight)
    if users == 1:
        install_embedding_grad_buffer(emb)
        return "buffer"
    if users == 2 and out is not None and out.weight is emb.weight and micro_batches_per_step == 1:
        install_tied_lookup(emb)
        return "tied"
    return None


def _holders(root: nn.Module, weight: torch.Tensor) -> int:
    """How many modules under `root` hold `weight` as their own parameter (2 for tied embeddings)."""
    return sum(1 for m in root.modules() for p in m.parameters(recurse=False) if p is weight)


def install_for_critic(value_model: nn.Module, other_params: list[nn.Parameter]) -> int:
    """Buffers for the critic's embeddings whose weight no other module of the critic and none of
    `other_params` (the policy's) uses; returns how many were installed."""
    other = {id(p) for p in other_params}
    n = 0
    for m in value_model.modules():
        if (buffer_applies(m) and m.weight.requires_grad and _holders(value_model, m.weight) == 1
                and id(m.weight) not in other):
            install_embedding_grad_buffer(m)
            n += 1
    return n
