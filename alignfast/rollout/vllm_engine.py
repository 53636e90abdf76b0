"""VLLMEngine: the frozen target on vLLM's offline engine (`LLM.generate` with `SamplingParams`).

vLLM does its own continuous batching, paged KV cache and prefix caching, so this engine only maps
the TargetEngine call onto it:

    prompts     text -> as is;  token ids -> {"prompt_token_ids": ids}
    truncation  max_prompt_length keeps a prompt's last tokens, done here (text is encoded with the LLM's
                tokenizer, special tokens added as vLLM adds them): SamplingParams' truncate_prompt_tokens
                was removed in vLLM 0.17 (an error there) and ignored for a list of params before
    sampling    SamplingParams(n, temperature (0 = greedy), top_p, max_tokens=max_new_tokens,
                seed per request); a greedy call asks for n=1 and repeats the answer (vLLM refuses
                n > 1 with temperature 0)
    results     one RequestOutput per prompt, in order; its `outputs` sorted by `index` become the
                n Completions (text, token_ids, finish_reason 'length', or 'stop' for 'stop' and
                'repetition'); 'abort' and 'error' (a request vLLM rejected) raise EngineRequestError

Seeds are per request and derived from (seed, prompt, occurrence) as in HFEngine, so a prompt's
samples do not depend on its neighbours in the call. vLLM is optional: asking for this engine
without it installed raises an ImportError that says how to install it.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from alignfast.rollout._sampling import request_seeds
from alignfast.rollout.engine import Completion, EngineRequestError, Prompt, TargetEngine, check_call, repeat_greedy

# finish_reason values of a vLLM output that are an answer; 'abort' and 'error' are not (vllm/v1/engine)
_ANSWERED = {"stop": "stop", "repetition": "stop", "length": "length"}


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError("VLLMEngine needs the 'vllm' package, which is not installed: "
                          "pip install 'alignfast[vllm]' (or pip install vllm); "
                          "HFEngine needs no extra package") from err
    return vllm


class VLLMEngine(TargetEngine):
    """Frozen-target generation with vLLM.

    model: a path or hub name (loaded by vLLM), or an existing `vllm.LLM` (used as is).
    gpu_memory_utilization, tensor_parallel_size, dtype, max_model_len, seed: passed to `vllm.LLM`.
    max_prompt_length: longer prompts keep their last tokens (cut here: see the module docstring).
    llm_kwargs: any further `vllm.LLM` arguments (enforce_eager, enable_prefix_caching, ...).
    """

    def __init__(self, model, tokenizer: str | None = None, *, gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, max_prompt_length: int | None = None, trust_remote_code: bool = False,
                 llm_kwargs: dict | None = None):
        from alignfast.ops._checks import fail, in_range

        in_range("gpu_memory_utilization", gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            fail("tensor_parallel_size", f"must be an integer >= 1, got {tensor_parallel_size!r}")
        if max_prompt_length is not None and (not isinstance(max_prompt_length, int) or max_prompt_length < 1):
            fail("max_prompt_length", f"must be None or an integer >= 1, got {max_prompt_length!r}")
        self._vllm = _import_vllm()
        self.max_prompt_length = max_prompt_length
        if isinstance(model, self._vllm.LLM):
            self.llm = model
        else:
            kwargs = dict(model=str(model), tokenizer=tokenizer, gpu_memory_utilization=gpu_memory_utilization,
                          tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                          trust_remote_code=trust_remote_code)
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            kwargs.update(llm_kwargs or {})
            self.llm = self._vllm.LLM(**kwargs)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int | None = None) -> list[list[Completion]]:
        if getattr(self, "llm", None) is None:
            raise EngineRequestError("VLLMEngine: generate() called after close(); create a new engine")
        args, prompt_list = check_call(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, n=n, seed=seed)
        if not prompt_list:
            return []
        common = dict(n=args.requested_n, temperature=args.temperature,
                      top_p=args.top_p if not args.greedy else 1.0, max_tokens=args.max_new_tokens)
        params = [self._vllm.SamplingParams(**common, seed=s) for s in request_seeds(prompt_list, args.base_seed())]
        inputs = [self._input(p) for p in prompt_list]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(inputs)} prompts")
        results = [[self._completion(o, i) for o in sorted(req.outputs, key=lambda o: o.index)]
                   for i, req in enumerate(outputs)]
        return repeat_greedy(results, args)

    def _input(self, prompt: Prompt):
        """vLLM's input for one prompt: text as is, token ids as a TokensPrompt, either cut to its last
        max_prompt_length tokens when longer."""
        keep = self.max_prompt_length
        if isinstance(prompt, str):
            if keep is None:
                return prompt
            return {"prompt_token_ids": list(self.llm.get_tokenizer().encode(prompt))[-keep:]}  # encoded once
        return {"prompt_token_ids": prompt if keep is None else prompt[-keep:]}

    @staticmethod
    def _completion(o, i: int) -> Completion:
        reason = _ANSWERED.get(o.finish_reason)
        if reason is None:
            raise EngineRequestError(f"VLLMEngine: vLLM ended the request for prompts[{i}] with finish_reason "
                                     f"{o.finish_reason!r} and no answer (it rejected or aborted it)")
        return Completion(o.text, list(o.token_ids), reason)

    @property
    def chat_tokenizer(self):
        """The Hugging Face tokenizer vLLM's LLM loaded for the model (None once closed)."""
        return self.llm.get_tokenizer() if getattr(self, "llm", None) is not None else None

    def close(self) -> None:
        """Drops the vLLM engine and frees its GPU memory (vLLM keeps memory until the LLM is gone)."""
        if getattr(self, "llm", None) is None:
            return
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
