"""HFEngine: batched generation from a transformers causal LM, with its own decode loop.

Why not `model.generate` on padded batches: a padded batch computes every row until the slowest one
ends, pads every prompt to the longest in the batch, recomputes identical prompts, and prefills each
of n samples separately. This engine

  1. tokenizes, truncates over-long prompts (or rejects them), and de-duplicates identical prompts;
  2. sorts prompts by length and cuts batches to a KV-cache token budget (little padding);
  3. prefills each unique prompt once, copies its cache rows for the n samples;
  4. decodes with a KV cache, retiring rows at EOS so the batch shrinks as rows finish;
  5. draws samples from per-row random streams keyed by (seed, prompt, occurrence, sample), so the
     output does not depend on how requests were batched (up to floating-point rounding of the
     logits, which another batch layout can move: see _sampling).

Greedy output equals per-prompt `model.generate(do_sample=False)` (tested). Temperature and top-p
are the only logits transforms applied; other generation_config settings (repetition penalty, top_k)
are not.

The model is used as given: never copied or cast. A model object that is being trained elsewhere can
be passed in; each call switches it to eval mode under no_grad and restores its training flag after.
"""

from __future__ import annotations

import contextlib

import warnings
from collections.abc import Sequence

import torch

from alignfast.ops._checks import choice, fail, in_range
from alignfast.rollout._batching import build_units, plan_batches
from alignfast.rollout._decode import decode_batch, make_runner
from alignfast.rollout._pad_mask import pad_safe_attention
from alignfast.rollout.context import max_positions
from alignfast.rollout.engine import Completion, Prompt, TargetEngine, _is_int, check_call

DEFAULT_MAX_BATCH_TOKENS = 32768  # on CPU, and the floor on a GPU
GPU_KV_MEMORY_FRACTION = 0.4  # of the free GPU memory, for the KV cache of one batch by default


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V cache one token takes over all layers: 2 * layers * kv_heads * head_dim * itemsize."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize


def default_batch_limits(model, device: torch.device) -> tuple[int, int | None]:
    """(max_batch_tokens, max_batch_size) when not given.

    CPU: DEFAULT_MAX_BATCH_TOKENS, no row cap. GPU: the tokens whose KV cache fills
    GPU_KV_MEMORY_FRACTION of the memory free now (at least the CPU default), and as many rows as keep
    one step's sampling buffers (logits, fp32 probabilities, cumulative sums, sort indices: ~24 bytes
    per vocabulary entry and row) within a tenth of it (at least 64).
    """
    if device.type != "cuda":
        return DEFAULT_MAX_BATCH_TOKENS, None
    try:
        free, _ = torch.cuda.mem_get_info(device)
        per_token = kv_bytes_per_token(model)
        vocab = int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, TypeError, RuntimeError):
        return DEFAULT_MAX_BATCH_TOKENS, None
    tokens = max(DEFAULT_MAX_BATCH_TOKENS, int(GPU_KV_MEMORY_FRACTION * free) // per_token)
    return tokens, max(64, int(0.1 * free) // (24 * vocab))


def _flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


@contextlib.contextmanager
def _attn_errors(attn_implementation):
    """transformers' refusal of an attention implementation (an unknown name: ValueError; flash_attention_2 without
    its package: ImportError) as one line naming attn_implementation."""
    if attn_implementation is None:
        yield
        return
    try:
        yield
    except (ValueError, ImportError) as err:
        text = str(err).strip()
        if "attn" not in text.lower() and "attention" not in text.lower():
            raise
        fail("attn_implementation", f"{attn_implementation!r} cannot be used: {text.splitlines()[0]}")


class HFEngine(TargetEngine):
    """Frozen-target generation with a transformers model.

    model: a loaded causal LM (used in place: not copied, cast or moved) or a local path / hub name,
        loaded with AutoModelForCausalLM (offline by default: `local_files_only`), set to eval and
        frozen.
    tokenizer: needed for text prompts and for the completions' text; loaded from the model path when
        not given. Text prompts are encoded with `add_special_tokens` (BOS for Llama-style tokenizers).
    device, dtype: for a path only (defaults: cuda if available, else cpu; bf16 on cuda, fp32 on cpu).
    max_batch_tokens: KV-cache positions one batch may hold: rows * (longest prompt + max_new_tokens).
        Default: 32768 on CPU; on a GPU as many as fill 40% of the free memory (at least 32768).
    max_batch_size: cap on rows per batch. Default: none on CPU; on a GPU as many rows as keep one
        step's sampling buffers within a tenth of the free memory.
    max_prompt_length: prompts longer than this are truncated (their last tokens kept: the end of the
        prompt is what the model continues) with a warning, or rejected when on_long_prompt="error".
        Default: the model's max_position_embeddings minus max_new_tokens, when the config has it.
    attn_implementation: for a path: transformers' choice by default (sdpa where the model supports it,
        else eager), "flash_attention_2" when flash-attn is installed and the model goes to a GPU in half
        precision. For a model object: switched when given.
    dedupe: prefill identical prompts once (and n samples of one prompt share its prefill).
    prefill_chunk_tokens: padded prompt tokens per prefill forward (prompts of similar length are
        prefilled together, so little of it is padding).
    packed_cache: use the preallocated KV cache (written in place; needs transformers >= 5 and a
        model whose layers all use full attention, else DynamicCache is used).
    compact_fraction: finished rows are dropped from the batch (a copy of its KV cache) once they are
        this fraction of it; until then they keep decoding, their extra tokens discarded.
    compile: run decode steps through torch.compile(dynamic=True); the first call pays the compilation
        (minutes), later calls reuse it. Worth it for long training runs on a GPU.
    eos_token_id: ids that end a completion; default generation_config.eos_token_id, else the
        tokenizer's eos. [] switches EOS off: every completion runs to max_new_tokens.
    pad_token_id: the filler of left-padded prompts, masked out (its value never reaches the outputs);
        default the first token id among generation_config.pad_token_id, the tokenizer's pad and the EOS
        ids (an id outside the vocabulary, such as -1, is skipped), else 0.
    """

    def __init__(self, model, tokenizer=None, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_batch_tokens: int | None = None,
                 max_batch_size: int | None = None, max_prompt_length: int | None = None,
                 on_long_prompt: str = "truncate", attn_implementation: str | None = None,
                 dedupe: bool = True, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, add_special_tokens: bool = True,
                 prefill_chunk_tokens: int = 8192, packed_cache: bool = True, compact_fraction: float = 0.125,
                 compile: bool = False,
                 local_files_only: bool = True, trust_remote_code: bool = False):
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
            fail("max_batch_tokens", f"must be None or an integer >= 1, got {max_batch_tokens!r}")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            fail("max_batch_size", f"must be None or an integer >= 1, got {max_batch_size!r}")
        if not isinstance(prefill_chunk_tokens, int) or prefill_chunk_tokens < 1:
            fail("prefill_chunk_tokens", f"must be an integer >= 1, got {prefill_chunk_tokens!r}")
        if max_prompt_length is not None and (not isinstance(max_prompt_length, int) or max_prompt_length < 1):
            fail("max_prompt_length", f"must be None or an integer >= 1, got {max_prompt_length!r}")
        self.on_long_prompt = choice("on_long_prompt", on_long_prompt, ("truncate", "error"))
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_prompt_length = max_prompt_length
        self.dedupe = bool(dedupe)
        self.add_special_tokens = add_special_tokens

        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            model, tokenizer = self._load(str(model), tokenizer, device, dtype, attn_implementation,
                                          local_files_only, trust_remote_code)
        else:
            if not isinstance(model, torch.nn.Module):
                fail("model", f"must be a transformers model or a path, got {type(model).__name__}")
            if dtype is not None and dtype != next(model.parameters()).dtype:
                fail("dtype", "cannot be changed for a model object (the engine never copies or casts weights)")
            if device is not None and torch.device(device) != next(model.parameters()).device:
                fail("device", f"is {device} but the model object is on {next(model.parameters()).device}; "
                     "move the model yourself (the engine never copies weights)")
            if attn_implementation is not None:
                with _attn_errors(attn_implementation):
                    model.set_attn_implementation(attn_implementation)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        default_tokens, default_rows = default_batch_limits(model, self.device)
        if self.max_batch_tokens is None:
            self.max_batch_tokens = default_tokens
        if self.max_batch_size is None:
            self.max_batch_size = default_rows
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)

        gen_cfg = getattr(model, "generation_config", None)
        # a given eos_token_id is used as is (`is not None`, not `or`): [] switches EOS off
        eos = _as_id_list(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None))
        if not eos and eos_token_id is None and tokenizer is not None:
            eos = _as_id_list(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self._eos = torch.tensor(eos, dtype=torch.long, device=self.device)
        # The pad id is only filler under the attention mask, but it still goes through the embedding: it must
        # be a token id. Configs with pad_token_id = -1 (early Llama conversions) are skipped, not fatal.
        def token_id(v) -> bool:
            return _is_int(v) and 0 <= v < self.vocab_size

        if pad_token_id is None:
            pad_token_id = next((v for v in (getattr(gen_cfg, "pad_token_id", None),
                                             getattr(tokenizer, "pad_token_id", None), *eos) if token_id(v)), 0)
        elif not token_id(pad_token_id):
            fail("pad_token_id", f"must be a token id in [0, {self.vocab_size}) (it fills the masked left padding), "
                 f"got {pad_token_id!r}")
        self.pad_token_id = int(pad_token_id)
        self._runner = make_runner(model, use_packed_cache=packed_cache, prefill_chunk_tokens=prefill_chunk_tokens,
                                   compact_fraction=in_range("compact_fraction", compact_fraction, 0.0, 1.0),
                                   compile=bool(compile))

    @staticmethod
    def _load(path, tokenizer, device, dtype, attn_implementation, local_files_only, trust_remote_code):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if attn_implementation is None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) \
                and _flash_attn_available():
            attn_implementation = "flash_attention_2"
        # None lets transformers choose: sdpa where the model supports it, eager where it does not (Gemma-2),
        # which forcing "sdpa" turned into a load error
        with _attn_errors(attn_implementation):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                         local_files_only=local_files_only,
                                                         trust_remote_code=trust_remote_code)
        model.to(device).eval().requires_grad_(False)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only,
                                                      trust_remote_code=trust_remote_code)
        return model, tokenizer

    # --- prompts ------------------------------------------------------------------------------

    def _prompt_limit(self, max_new_tokens: int) -> int | None:
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        max_pos = max_positions(self.model)  # a multimodal model's is its text config's
        if max_pos is None:
            return None
        if max_pos - max_new_tokens < 1:
            fail("max_new_tokens", f"leaves no room for a prompt: the model's max_position_embeddings is {max_pos}")
        return max_pos - max_new_tokens

    def _encode(self, prompts: list[str | list[int]], max_new_tokens: int) -> list[list[int]]:
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        encoded: list[list[int]] = [p if not isinstance(p, str) else [] for p in prompts]
        if texts:
            if self.tokenizer is None:
                fail("prompts", "holds text but the engine has no tokenizer: pass one or give token ids")
            batch = self.tokenizer([prompts[i] for i in texts], add_special_tokens=self.add_special_tokens)
            for i, ids in zip(texts, batch["input_ids"]):
                encoded[i] = list(ids)
        limit = self._prompt_limit(max_new_tokens)
        truncated = []
        for i, ids in enumerate(encoded):
            if not ids:
                fail(f"prompts[{i}]", "has no tokens: a completion needs at least one prompt token")
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= self.vocab_size:
                fail(f"prompts[{i}]", f"holds token id {lo if lo < 0 else hi} outside [0, {self.vocab_size})")
            if limit is not None and len(ids) > limit:
                if self.on_long_prompt == "error":
                    fail(f"prompts[{i}]", f"has {len(ids)} tokens, more than the limit of {limit} "
                         "(max_prompt_length, or max_position_embeddings - max_new_tokens)")
                encoded[i] = ids[-limit:]
                truncated.append(i)
        if truncated:
            warnings.warn(f"HFEngine: {len(truncated)} prompt(s) longer than {limit} tokens were truncated to their "
                          f"last {limit} tokens (first: prompts[{truncated[0]}])", stacklevel=3)
        return encoded

    @property
    def chat_tokenizer(self):
        return self.tokenizer

    # --- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int | None = None) -> list[list[Completion]]:
        args, prompt_list = check_call(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, n=n, seed=seed)
        if not prompt_list:
            return []
        prompt_ids = self._encode(prompt_list, args.max_new_tokens)
        units = build_units(prompt_ids, n=args.n, greedy=args.greedy, seed=args.base_seed(), dedupe=self.dedupe)
        batches = plan_batches(units, max_new_tokens=args.max_new_tokens, max_batch_tokens=self.max_batch_tokens,
                               max_batch_size=self.max_batch_size)

        results: list[list[Completion | None]] = [[None] * args.n for _ in prompt_list]
        was_training = self.model.training
        self.model.eval()
        try:
            # pad_safe_attention: left pads would give NaN under a float64 model's eager attention
            with torch.no_grad(), pad_safe_attention():
                for batch in batches:
                    rows = decode_batch(self._runner, batch, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_p=args.top_p, eos_ids=self._eos,
                                        pad_id=self.pad_token_id, device=self.device)
                    slots = [s for u in batch for s in u.row_slots]
                    for row, row_slots in zip(self._completions(rows), slots):
                        for req, sample in row_slots:
                            results[req][sample] = Completion(row.text, list(row.token_ids), row.finish_reason)
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _completions(self, rows: list[list[int]]) -> list[Completion]:
        eos = set(self.eos_token_ids)
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        else:
            texts = [""] * len(rows)
        return [Completion(text, ids, "stop" if ids and ids[-1] in eos else "length") for text, ids in zip(texts, rows)]
