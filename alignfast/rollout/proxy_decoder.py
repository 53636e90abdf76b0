"""Proxy-RLHF decoding: the frozen target proposes, a small proxy accepts or rejects, batched.

For each row and each position t, with the target's logits l_t and last hidden state h_t (one forward
per position, through the KV cache):

    excluded <- the tokens outside the target's top-k (when top_k > 0); rejections <- 0
    repeat
        y, lp   <- propose_token(l_t, excluded, u, temperature, top_p)    (the fused step, alignfast.ops)
        forced  <- rejections == max_rejections_per_token  or  y is the last allowed token
        if rejections == max_rejections_per_token: y <- the most likely token not yet rejected
        if forced: accept y (no decision: the proxy had no choice)
        else: the proxy judges (h_t, embedding(y), log pi_F(y | ...)) -> P(accept); a decision is drawn
        accept: y is appended, the cache advances by one token
        reject: excluded[y] <- True, rejections += 1; the cache does NOT advance (same l_t, h_t)

Choices the paper leaves open (Proxy-RLHF, arXiv 2403.04283), made here:
  * the nucleus (top_p) and top-k set are those of the target's distribution at the position before any
    rejection, so rejections shrink the candidate set and never widen it (see alignfast.reference.proposal);
  * at the rejection bound the most likely remaining token is taken without asking the proxy; forced
    acceptances are not actions (no log-prob, no advantage);
  * the proxy's third input is the target's own log-prob of the proposal at temperature 1 before any
    exclusion (log softmax(l_t)[y]), which stays informative when proposals are greedy;
  * randomness is keyed per row (alignfast.rollout._sampling): the first proposal at position t uses
    the HF engine's uniform for (row key, t), so a proxy that always accepts reproduces HFEngine.generate
    under the same seed; re-proposals and decisions draw from two other keyed streams. A row's draws do
    not depend on the batch it is decoded in.

A NaN or +inf logit in a live row stops the decoding with an error naming the target's dtype (float16 logits
overflow): propose_token has no distribution for such a row (token -1, log-prob NaN), and even where a greedy
proposal exists the proxy's third input would be NaN.

Finished rows (EOS) keep their cache slot and stop asking the proxy; the batch is not compacted
(the proxy's decisions, not the retired rows, dominate the cost at these batch sizes).

Batches: the rows are cut into batches as the HF engine cuts them (alignfast.rollout._batching.plan_batches:
longest prompts first, rows * (longest prompt + max_new_tokens) KV-cache positions within max_batch_tokens,
at most max_batch_size rows), so a long eval set neither holds one cache for every row nor pads short prompts
to the longest one. Rows keep the order of the call within a batch; when everything fits in one batch the
decoding is the unbatched one, bit for bit. Since every draw is keyed by its row, a row decodes the same
tokens in whichever batch it lands (up to the rounding of a differently padded forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from alignfast.rollout._batching import Unit, plan_batches
from alignfast.rollout._cache_api import cache_keyword
from alignfast.rollout._kv_cache import new_dynamic_cache, new_packed_cache, packed_cache_layers
from alignfast.rollout._pad_mask import pad_safe_attention
from alignfast.rollout._sampling import row_key, step_uniforms

# Salts that separate the re-proposal and decision streams from the first-proposal stream of a row key.
_REPROPOSE_SALT = np.uint64(0x5EED_0F_0BE5_7A11)
_DECIDE_SALT = np.uint64(0xDEC1_51_0A_CCE9_7ED)

# judge(features [N, F], proposals [N]) -> (accept logits [N], values [N] or None)
Judge = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class ProxyDecodeOutput:
    """tokens[i]: row i's generated ids (ending with its EOS id if it stopped).

    Decisions, left-aligned per row, [R, D] (D >= 1): features [R, D, F] (float32: the proxy's input),
    proposals (the judged token), actions (1 accept, 0 reject), logprobs (log-prob of the action under
    the proxy when it was drawn), values (the proxy's value estimate), mask (a real decision).
    rejections / forced [R]: how many proposals the proxy rejected / how many tokens were forced.
    """

    tokens: list[list[int]]
    ended: torch.Tensor
    features: torch.Tensor
    proposals: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    rejections: torch.Tensor
    forced: torch.Tensor


def row_keys(prompt_ids: list[list[int]], seed: int) -> np.ndarray:
    """The HF engine's row keys for n=1 (occurrence-counted, so duplicate prompts get distinct streams)."""
    seen: dict[tuple[int, ...], int] = {}
    keys = []
    for ids in prompt_ids:
        occ = seen.get(tuple(ids), 0)
        seen[tuple(ids)] = occ + 1
        keys.append(row_key(seed, ids, occ, 0))
    return np.array(keys, dtype=np.uint64)


class ProxyDecoder:
    """Batched proposal-judge-resample decoding of a frozen causal LM (see the module docstring).

    model: a transformers causal LM (kept frozen); max_rejections_per_token >= 1; temperature >= 0 (0:
    greedy proposals), top_p in (0, 1], top_k >= 0 (0: off): the target's proposal distribution.
    max_batch_tokens / max_batch_size: the batch limits (None: the HF engine's defaults for this model and
    device, alignfast.rollout.hf_engine.default_batch_limits).
    """

    def __init__(self, model, *, eos_ids: list[int], pad_id: int, max_new_tokens: int,
                 max_rejections_per_token: int = 3, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_batch_tokens: int | None = None, max_batch_size: int | None = None):
        from alignfast.ops import _checks
        from alignfast.ops._checks import fail
        from alignfast.rollout.hf_engine import default_batch_limits

        if max_rejections_per_token < 1:
            fail("max_rejections_per_token", f"must be >= 1 (0 would leave the proxy no decision), got "
                 f"{max_rejections_per_token!r}")
        if max_new_tokens < 1:
            fail("max_new_tokens", f"must be >= 1, got {max_new_tokens!r}")
        temperature = _checks.temperature("temperature", temperature, zero_is_greedy=True)
        if not 0 < top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {top_p!r}")
        if top_k < 0:
            fail("top_k", f"must be >= 0 (0: off), got {top_k!r}")
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_batch_size", max_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                fail(name, f"must be None or an integer >= 1, got {value!r}")
        default_tokens, default_rows = default_batch_limits(model, next(model.parameters()).device)
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else default_tokens
        self.max_batch_size = max_batch_size if max_batch_size is not None else default_rows
        self.model = model
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.pad_id = int(pad_id)
        self.max_new_tokens = int(max_new_tokens)
        self.max_rejections = int(max_rejections_per_token)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.embed = model.get_input_embeddings()
        self._packed_layers = packed_cache_layers(model)
        from alignfast.trainer.policy import backbone_of, plain_linear_head

        self._head = plain_linear_head(model)
        self._backbone = backbone_of(model) if self._head is not None else None
        # transformers 5 names the cache keyword `cache` (the old name logs a deprecation warning every call)
        self._cache_kw = cache_keyword(self._backbone if self._backbone is not None else model)

    @property
    def feature_size(self) -> int:
        cfg = self.model.config.get_text_config()
        return cfg.hidden_size + self.embed.embedding_dim + 1

    # ------------------------------------------------------------------------------------------
    def _forward(self, ids, attention, positions, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [R, V] float32, last hidden state [R, H] float32) of the last position."""
        if self._head is not None:
            hidden = self._backbone(input_ids=ids, attention_mask=attention, position_ids=positions,
                                    use_cache=True, **{self._cache_kw: cache}).last_hidden_state[:, -1]
            return self._head(hidden).float(), hidden.float()
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                         output_hidden_states=True, **{self._cache_kw: cache})
        return out.logits[:, -1].float(), out.hidden_states[-1][:, -1].float()

    def _features(self, hidden: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor,
                  logits: torch.Tensor) -> torch.Tensor:
        target_lp = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
        return torch.cat([hidden, self.embed(tokens).float(), target_lp[:, None]], dim=-1)

    @torch.no_grad()
    @pad_safe_attention()  # left-padded prompts: see _pad_mask
    def decode(self, prompt_ids: list[list[int]], judge: Judge, *, seed: int, greedy_decisions: bool = False,
               decision_temperature: float = 1.0, rows: tuple[int, int] | None = None) -> ProxyDecodeOutput:
        """Decode every prompt (token ids) under `judge`. greedy_decisions: accept iff P(accept) >= 1/2;
        otherwise accept with probability sigmoid(logit / decision_temperature). rows=(lo, hi): decode only
        prompts lo..hi-1, with the draws they get in the whole call (one process's share of a batch)."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            from alignfast.ops._checks import fail

            fail("prompt_ids", "must be a non-empty list of non-empty token id lists")
        device = self.embed.weight.device
        keys = row_keys(prompt_ids, seed)  # over the whole call: duplicates get distinct streams in any batch
        if rows is not None:
            lo, hi = rows
            if not 0 <= lo < hi <= len(prompt_ids):
                from alignfast.ops._checks import fail

                fail("rows", f"must be (lo, hi) with 0 <= lo < hi <= {len(prompt_ids)}, got {rows!r}")
            prompt_ids, keys = prompt_ids[lo:hi], keys[lo:hi]
        R = len(prompt_ids)
        out = torch.full((R, self.max_new_tokens), -1, dtype=torch.long, device=device)
        alive = torch.ones(R, dtype=torch.bool, device=device)
        n_dec, rejections, forced = (torch.zeros(R, dtype=torch.long, device=device) for _ in range(3))
        records = []
        for rows in self.batches(prompt_ids):
            index = torch.tensor(rows, dtype=torch.long, device=device)
            b_out, b_alive, b_records, b_n_dec, b_rej, b_forced = self._decode_batch(
                [prompt_ids[i] for i in rows], keys[rows], judge, greedy_decisions, decision_temperature)
            out[index], alive[index], n_dec[index] = b_out, b_alive, b_n_dec
            rejections[index], forced[index] = b_rej, b_forced
            records += [(index[r], *rest) for r, *rest in b_records]
        return self._assemble(out, alive, records, n_dec, rejections, forced)

    def batches(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """The row indices of each decoding batch (ascending within a batch): plan_batches' cut."""
        units = [Unit(ids, [[(i, 0)]], [0]) for i, ids in enumerate(prompt_ids)]
        plan = plan_batches(units, max_new_tokens=self.max_new_tokens, max_batch_tokens=self.max_batch_tokens,
                            max_batch_size=self.max_batch_size)
        return [sorted(u.row_slots[0][0][0] for u in batch) for batch in plan]

    def _bound_token(self, logits: torch.Tensor, excluded: torch.Tensor, zeros: torch.Tensor):
        """The forced token at the rejection bound: the most likely token of the nucleus the proposals were drawn
        from, N(target temperature, top_p), that was not rejected. A temperature-0 call alone would take the
        nucleus at tau = 1, which for a temperature above 1 is a strict subset of N that the rejections can
        exhaust. |N| comes from the op (num_allowed with nothing excluded), and N is then the |N| largest logits
        (ties are in or out together, so N = {k : l_k >= the |N|-th largest})."""
        from alignfast.ops import propose_token

        _, _, size = propose_token(logits, torch.zeros_like(excluded), zeros, temperature=self.temperature,
                                   top_p=self.top_p)
        kth = logits.topk(int(size.max()), dim=-1).values.gather(-1, (size - 1).clamp(min=0)[:, None])
        return propose_token(logits, excluded | (logits < kth), zeros, temperature=0.0, top_p=1.0)

    def _decode_batch(self, prompt_ids: list[list[int]], keys: np.ndarray, judge: Judge, greedy_decisions: bool,
                      decision_temperature: float):
        """decode() on one batch: (tokens [R, max_new_tokens] (-1 after the end), alive [R], decision records
        with batch row indices, decisions [R], rejections [R], forced [R])."""
        from alignfast.ops import propose_token

        device = self.embed.weight.device
        R = len(prompt_ids)
        lengths = [len(p) for p in prompt_ids]
        width = max(lengths)
        capacity = width + self.max_new_tokens
        sampling = self.temperature > 0.0
        K = self.max_rejections

        ids = torch.full((R, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((R, capacity), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[:, width:] = 1
        for i, n in enumerate(lengths):
            attn[i, width - n:width] = 1
        ids, attn = ids.to(device), attn.to(device)
        positions = (attn[:, :width].cumsum(-1) - 1).clamp(min=0)
        packed = self._packed_layers > 0
        if packed:
            cache = new_packed_cache(self._packed_layers, R, capacity)
            logits, hidden = self._forward(ids, attn[:, :width], positions, cache.prefill_view(0, R, 0, None))
            cache.finish_prefill(width)
        else:
            cache = new_dynamic_cache(self.model)
            logits, hidden = self._forward(ids, attn[:, :width], positions, cache)
        next_pos = torch.tensor(lengths, device=device)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)

        alive = torch.ones(R, dtype=torch.bool, device=device)
        out = torch.full((R, self.max_new_tokens), -1, dtype=torch.long, device=device)
        n_dec = torch.zeros(R, dtype=torch.long, device=device)
        rejections = torch.zeros(R, dtype=torch.long, device=device)
        forced_count = torch.zeros(R, dtype=torch.long, device=device)
        records = []  # (rows, slots, features, proposals, actions, logprobs, values) per attempt
        for t in range(self.max_new_tokens):
            lse = torch.logsumexp(logits, dim=-1)
            # NaN where a row has a NaN logit, +inf where it has a +inf one (an all -inf row's is -inf)
            not_finite = torch.isnan(lse) | torch.isposinf(lse)
            excluded = torch.zeros_like(logits, dtype=torch.bool)
            if self.top_k and self.top_k < logits.size(1):
                kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
                excluded = logits < kth
            chosen = torch.full((R,), -1, dtype=torch.long, device=device)
            n_rej = torch.zeros(R, dtype=torch.long, device=device)
            pending = alive.clone()
            for attempt in range(K + 1):
                rows = pending.nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                rows_host = rows.cpu().numpy()
                at_bound = attempt == K  # every pending row has been rejected K times here
                if at_bound:
                    u = torch.zeros(rows.numel(), device=device)
                elif attempt == 0:
                    u = torch.from_numpy(step_uniforms(keys[rows_host], t)).to(device)
                else:
                    u = torch.from_numpy(step_uniforms(keys[rows_host] ^ _REPROPOSE_SALT, t * (K + 1) + attempt)).to(device)
                if at_bound and sampling and self.top_p < 1.0:
                    tok, _lp, n_allowed = self._bound_token(logits[rows], excluded[rows], u)
                else:
                    temp = 0.0 if at_bound or not sampling else self.temperature
                    tok, _lp, n_allowed = propose_token(logits[rows], excluded[rows], u, temperature=temp,
                                                        top_p=self.top_p)
                stop = (tok < 0).any()
                if attempt == 0:  # the logits do not change between attempts; one sync for both checks
                    stop = stop | not_finite[rows].any()
                if bool(stop):
                    if bool(not_finite[rows].any()):
                        self._raise_not_finite(t, int(not_finite[rows].sum()))
                    # cannot happen: the last allowed token is forced, never rejected
                    raise RuntimeError("alignfast: the proxy decoder ran out of allowed tokens")
                forced = torch.full_like(tok, at_bound, dtype=torch.bool) | (n_allowed <= 1)
                accept = forced.clone()
                judged = (~forced).nonzero().squeeze(1)
                if judged.numel():
                    jrows = rows[judged]
                    feats = self._features(hidden[jrows], tok[judged], lse[jrows], logits[jrows])
                    logit, value = judge(feats, tok[judged])
                    logit = logit.float().reshape(-1)
                    p_accept = torch.sigmoid(logit / decision_temperature)
                    if greedy_decisions:
                        act = p_accept >= 0.5
                    else:
                        ud = step_uniforms(keys[rows_host[judged.cpu().numpy()]] ^ _DECIDE_SALT, t * (K + 1) + attempt)
                        act = torch.from_numpy(ud).to(device) < p_accept
                    scaled = logit / decision_temperature
                    act_lp = torch.where(act, torch.nn.functional.logsigmoid(scaled),
                                         torch.nn.functional.logsigmoid(-scaled))
                    values = value.float().reshape(-1) if value is not None else torch.zeros_like(logit)
                    records.append((jrows, n_dec[jrows].clone(), feats.float(), tok[judged], act.long(), act_lp, values))
                    n_dec[jrows] += 1
                    accept[judged] = act
                acc_rows = rows[accept]
                chosen[acc_rows] = tok[accept]
                forced_count[rows[forced]] += 1
                rej = ~accept
                rej_rows = rows[rej]
                excluded[rej_rows, tok[rej]] = True
                n_rej[rej_rows] += 1
                rejections[rej_rows] += 1
                pending[acc_rows] = False
            tokens = torch.where(alive, chosen, torch.full_like(chosen, self.pad_id))
            out[alive, t] = chosen[alive]
            alive &= ~torch.isin(tokens, eos)
            if t + 1 == self.max_new_tokens or not bool(alive.any()):
                break
            logits, hidden = self._forward(tokens[:, None], attn[:, :width + t + 1], next_pos[:, None], cache)
            next_pos = next_pos + 1
        return out, alive, records, n_dec, rejections, forced_count

    def _raise_not_finite(self, t: int, n_rows: int):
        from alignfast.ops._checks import AlignfastArgumentError

        dtype = self.embed.weight.dtype
        if dtype == torch.float16:
            cause = ("the likely cause is the target's dtype, float16, whose range (+-65504) its activations "
                     "overflow: load the target in bfloat16 or float32 (target.dtype in a run file)")
        else:
            cause = (f"the target runs in {str(dtype).removeprefix('torch.')}; the usual cause is a float16 target "
                     "overflowing (its range ends at +-65504): check target.dtype in the run file, and the target's "
                     "weights")
        raise AlignfastArgumentError(
            f"alignfast: the frozen target's logits are not finite (NaN or +inf) at new token {t + 1} "
            f"({n_rows} prompt(s)), so no token can be proposed from them; {cause}")

    def _assemble(self, out, alive, records, n_dec, rejections, forced_count) -> ProxyDecodeOutput:
        R = out.size(0)
        device = out.device
        D = max(1, int(n_dec.max()) if R else 1)
        F = self.feature_size
        features = torch.zeros((R, D, F), dtype=torch.float32, device=device)
        proposals = torch.zeros((R, D), dtype=torch.long, device=device)
        actions = torch.zeros((R, D), dtype=torch.long, device=device)
        logprobs = torch.zeros((R, D), dtype=torch.float32, device=device)
        values = torch.zeros((R, D), dtype=torch.float32, device=device)
        mask = torch.zeros((R, D), dtype=torch.bool, device=device)
        for rows, slots, feats, tok, act, lp, val in records:
            features[rows, slots] = feats
            proposals[rows, slots] = tok
            actions[rows, slots] = act
            logprobs[rows, slots] = lp
            values[rows, slots] = val
            mask[rows, slots] = True
        eos = set(self.eos_ids)
        tokens = []
        ended = torch.zeros(R, dtype=torch.bool)
        for i, row in enumerate(out.cpu().tolist()):
            seq = []
            for tok in row:
                if tok < 0:
                    break
                seq.append(tok)
                if tok in eos:
                    ended[i] = True
                    break
            tokens.append(seq)
        return ProxyDecodeOutput(tokens=tokens, ended=ended.to(device), features=features, proposals=proposals,
                                 actions=actions, logprobs=logprobs, values=values, mask=mask,
                                 rejections=rejections, forced=forced_count)
