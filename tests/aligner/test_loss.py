"""The SFT loss: the fused path (hidden states -> linear_token_logprobs) equals full logits + cross-entropy on
the correction tokens (the reference) in float64, loss and gradients; prompt tokens carry no loss."""

import pytest
import torch

from alignfast.aligner.data import CorrectionEncoder, collate
from alignfast.aligner.loss import CorrectionLoss
from tests.aligner.helpers import ROWS, TEMPLATE, tiny_corrector


def _batch(tok, rows=ROWS, **kw):
    enc = CorrectionEncoder(tok, TEMPLATE, **kw)
    return collate([enc.encode(r) for r in rows], tok.pad_token_id)


def _loss_and_grads(model, batch, backend):
    model.zero_grad(set_to_none=True)
    loss = CorrectionLoss(model, backend=backend)(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True], ids=["untied-head", "tied-embeddings"])
def test_fused_loss_and_gradients_match_the_reference_in_float64(tmp_path, tie):
    model, tok = tiny_corrector(tmp_path, tie=tie, seed=3)
    model = model.double()
    batch = _batch(tok)
    fast, g_fast = _loss_and_grads(model, batch, "fast")
    ref, g_ref = _loss_and_grads(model, batch, "reference")
    assert fast.dtype == torch.float64 and ref.dtype == torch.float64
    assert torch.allclose(fast, ref, rtol=1e-5, atol=0), (float(fast), float(ref))
    for name, g in g_ref.items():
        err = (g_fast[name] - g).norm() / g.norm().clamp_min(1e-30)
        assert err < 1e-5, (name, float(err))


def test_loss_is_the_token_mean_nll_of_the_correction_and_eos_only(tmp_path):
    """Computed by hand from the model's full logits over each row's exact [prompt | correction + EOS] ids."""
    model, tok = tiny_corrector(tmp_path, seed=1)
    model = model.double()
    enc = CorrectionEncoder(tok, TEMPLATE)
    total, count = 0.0, 0
    for row in ROWS:
        e = enc.encode(row)
        words = tok.convert_ids_to_tokens(e.target_ids)
        assert words == [*row["correction"].split(), tok.eos_token]  # the loss tokens: correction + EOS
        assert tok.convert_ids_to_tokens(e.prompt_ids) == TEMPLATE.replace("{question}", row["question"]) \
            .replace("{answer}", row["answer"]).split()
        ids = torch.tensor([e.prompt_ids + e.target_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        P = len(e.prompt_ids)
        for t, tok_id in enumerate(e.target_ids):
            total -= float(logp[P - 1 + t, tok_id])
            count += 1
    batch = collate([enc.encode(r) for r in ROWS], tok.pad_token_id)
    for backend in ("fast", "reference"):
        with torch.no_grad():
            loss = CorrectionLoss(model, backend=backend)(batch)
        assert abs(float(loss) - total / count) < 1e-9 * max(1.0, total / count), backend


def test_prompt_tokens_carry_no_loss(tmp_path):
    """Changing the question/answer changes the loss only through the context: the gradient of the loss with
    respect to the logits at prompt positions is zero (they are never scored)."""
    model, tok = tiny_corrector(tmp_path, seed=2)
    batch = _batch(tok)
    for backend in ("fast", "reference"):
        captured = {}

        def keep(module, args, output):
            output.retain_grad()
            captured["h"] = output

        norm = model.model.norm
        handle = norm.register_forward_hook(keep)
        CorrectionLoss(model, backend=backend)(batch).backward()
        handle.remove()
        g = captured["h"].grad  # [B, Q + R, H]: d loss / d last hidden state
        Q = batch.query_ids.size(1)
        scored = torch.zeros(g.shape[:2], dtype=torch.bool)
        scored[:, Q - 1: -1] = batch.response_mask[:, :]  # the state before each correction/EOS token
        assert g[~scored].abs().max() == 0, backend
        assert (g[scored].abs().sum(-1) > 0).all(), backend
        model.zero_grad(set_to_none=True)
