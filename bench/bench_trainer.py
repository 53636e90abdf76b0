"""End-to-end Align-Pro PPO step time: backend="fast" vs backend="reference", broken down by phase.

One timed call = one full PPO step of AlignProTrainer (prompter sampling, frozen-target generation
through HFEngine, reward, old/ref log-probs and values, num_ppo_epochs x num_mini_batches updates).
Both providers start from the same saved weights and run the same config and seeds, so they draw the
same rollouts; only the numerics differ:

    reference       model(...).logits over every position + alignfast.reference (TRL's PPO, plainly)
    fast            backbone hidden states -> alignfast.ops.linear_token_logprobs on the response rows
                    only; old log-probs taken from the sampler; alignfast.ops for GAE and the loss
    fast-recompute  fast, but old log-probs from a second forward pass (isolates the sampler reuse)

Models are random-weight Llama/Qwen2-shaped configs with a word-level tokenizer of V words, saved and
loaded as in the tests, and the toy world of `alignfast demo`. Presets:

    demo        alignfast.toy's prompter (V=51, H=64, 2 layers) and target, its prompts, reward and
                demo hyperparameters (64 episodes per step): the goal's yardstick
    cpu-tiny    V=2048,   H=64,  2 layers: demo-sized models (the default on CPU)
    cpu-small   V=16384,  H=128, 4 layers: a larger vocabulary, where the LM head dominates
    cpu-qwen2-mini  the cuda-0.5b code path (Qwen2, tied embeddings, grouped KV heads, bf16) at toy size
    cuda-0.5b   a Qwen2-0.5B-shaped prompter (V=151936, H=896, 24 layers, bf16) and target
    smollm2-135m  a real model's shape: SmolLM2-135M's Llama config (V=49152, H=576, 30 layers, 9 heads /
                3 KV heads, intermediate 1536, tied embeddings), random weights, prompter and target alike;
                fast and reference only (three 135M trainers would not fit beside the others on 16 GB)

Fine-tuning: --finetune full (every weight) or lora (PEFT LoRA r=16 on every projection; the reference
policy is then the base model with the adapter disabled). --gradient-checkpointing turns on the
config option of that name. --torch-compile turns on `torch_compile` (regional compilation of the decoder
layers) for the fast providers only; the warm-up step column then shows what the compilation costs.

Memory (--memory): each provider runs one PPO step alone in a fresh process; the table gives that
process's peak RSS (what /usr/bin/time -v reports as "Maximum resident set size"), the bytes of every
copy of the weights and of the optimizer state, the gradients, and the tensors autograd saves for the
backward of one micro-batch (activations, and the [N, V] logits on the reference path).

    python -m bench.bench_trainer                      # demo, cpu-tiny and cpu-small
    python -m bench.bench_trainer --quick              # the demo preset, two timed steps: seconds
    flock /work/wt/bigmem.lock python -m bench.bench_trainer --preset smollm2-135m [--finetune lora]
    flock /work/wt/bigmem.lock python -m bench.bench_trainer --preset smollm2-135m --memory
    python -m bench.bench_trainer --preset smollm2-135m --thread-counts 1,2   # the fast step at 1 vs 2 threads

Threads (--thread-counts 1,2): the fast provider once per thread count, interleaved in one process (each
step runs under torch.set_num_threads(count)), ratios against the first count: what a second OpenMP thread
buys a whole step, on an idle machine or beside a competing process (issue 13 item 3).
    python -m bench.bench_trainer --device cuda --record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import harness
from bench.harness import Row, append_results, device_description, format_table, peak_extra_memory

SMOLLM2_135M = dict(arch="llama", vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, inter=1536, tied=True,
                    dtype=torch.float32, variants=("reference", "fast"))
PRESETS = {
    "cpu-tiny": dict(arch="llama", vocab=2048, hidden=64, layers=2, heads=4, kv_heads=4, inter=128, batch=16,
                     prompt_words=12, response_length=24, target_max_new_tokens=16, dtype=torch.float32),
    "cpu-small": dict(arch="llama", vocab=16384, hidden=128, layers=4, heads=4, kv_heads=4, inter=352, batch=16,
                      prompt_words=16, response_length=32, target_max_new_tokens=16, dtype=torch.float32),
    "cpu-qwen2-mini": dict(arch="qwen2", vocab=4096, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, batch=8,
                           prompt_words=12, response_length=16, target_max_new_tokens=8, dtype=torch.bfloat16),
    "cuda-0.5b": dict(arch="qwen2", vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, batch=64,
                      prompt_words=48, response_length=64, target_max_new_tokens=64, dtype=torch.bfloat16),
    "smollm2-135m": dict(**SMOLLM2_135M, batch=4, prompt_words=24, response_length=16, target_max_new_tokens=8,
                         config=dict(num_ppo_epochs=1)),
    # The sizes of the first real run (issue 14: CLI defaults, 8 episodes per micro-batch, ~70 prompt tokens,
    # 53 response tokens): for --memory (one step of two epochs: the second optimizer step is the steady state).
    "smollm2-135m-run": dict(**SMOLLM2_135M, batch=8, prompt_words=68, response_length=53, target_max_new_tokens=32,
                             config=dict(num_ppo_epochs=2, num_mini_batches=1, per_device_train_batch_size=8)),
}
# The step's phases as the trainer's metrics name them (timing_s/<phase>); "logprobs" is the scoring phase:
# old log-probs, reference log-probs and values of the rollout.
PHASES = ["prompter_gen", "target_gen", "reward", "logprobs", "update"]
VARIANTS = {"reference": ("reference", None), "fast": ("fast", None), "fast-recompute": ("fast", False)}


def build_tokenizer(path: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                 unk_token="<unk>", additional_special_tokens=["<user>", "<assistant>"])
    hf.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    hf.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def build_model(path: Path, p: dict, seed: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_cfg, cls_model = (Qwen2Config, Qwen2ForCausalLM) if p["arch"] == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cls_cfg(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                  num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                  max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=p.get("tied", p["arch"] == "qwen2"))
    torch.manual_seed(seed)
    cls_model(cfg).to(dtype).save_pretrained(str(path))
    return path


def word_overlap_reward(prompts, completions, **columns):
    """r(x, y): the share of the answer's words that also occur in the original prompt."""
    out = []
    for x, y in zip(prompts, completions):
        xs, ys = set(x.split()), y.split()
        out.append(sum(w in xs for w in ys) / max(1, len(ys)))
    return out


@dataclass
class World:
    """What a preset trains on: model folders, tokenizer, prompts, reward, and config fields."""

    label: str
    prompter: Path
    target: Path
    tokenizer: object
    prompts: list
    reward_funcs: list
    dtype: torch.dtype
    config: dict
    variants: tuple = tuple(VARIANTS)


def make_world(preset_name: str, root: Path, *, build: bool = True) -> World:
    """build=False: the world an earlier call saved under `root` (the memory bench's child processes)."""
    if preset_name == "demo":
        return demo_world()
    p = PRESETS[preset_name]
    if build:
        tok = build_tokenizer(root / "tok", p["vocab"])
        build_model(root / "prompter", p, seed=0, dtype=p["dtype"])
        build_model(root / "target", p, seed=1, dtype=p["dtype"])
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    g = torch.Generator().manual_seed(0)
    n_words = p["vocab"] - 6
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, n_words, (p["prompt_words"],), generator=g))
               for _ in range(4 * p["batch"])]
    config = dict(per_device_train_batch_size=p["batch"] // 2, num_mini_batches=2, num_ppo_epochs=4,
                  response_length=p["response_length"], temperature=1.0,
                  target_max_new_tokens=p["target_max_new_tokens"], rewrite_template="{prompt}",
                  learning_rate=1e-6)
    config.update(p.get("config", {}))
    label = f"{preset_name}: V={p['vocab']} H={p['hidden']} L={p['layers']} B={p['batch']} R={p['response_length']}"
    return World(label, root / "prompter", root / "target", tok, prompts, [word_overlap_reward], p["dtype"], config,
                 p.get("variants", tuple(VARIANTS)))


def demo_world() -> World:
    """The models, prompts, reward and hyperparameters of `alignfast demo` (alignfast.toy)."""
    import json

    from transformers import AutoTokenizer

    from alignfast.toy import load_world

    w = load_world()
    cfg = json.loads((Path(w.prompter_path) / "config.json").read_text())
    config = {k: v for k, v in w.demo_config.items() if k not in ("total_episodes", "seed")}
    config.update(rewrite_template=w.rewrite_template, target_prompt_template=w.target_prompt_template)
    batch = config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] * config["num_mini_batches"]
    label = (f"demo (alignfast.toy): V={cfg['vocab_size']} H={cfg['hidden_size']} L={cfg['num_hidden_layers']} "
             f"B={batch} R={config['response_length']}")
    return World(label, Path(w.prompter_path), Path(w.target_path), AutoTokenizer.from_pretrained(w.prompter_path),
                 w.train_prompts, list(w.reward_funcs), torch.float32, config)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Setup:
    """How the trainers of one table are configured, beyond the preset."""

    finetune: str = "full"            # "full" | "lora"
    value_head: str = "separate"      # "separate" | "shared"
    gradient_checkpointing: bool = False
    torch_compile: bool = False       # the fast providers compile their decoder layers (config.torch_compile)
    memory: tuple = ()                # --memory's settings: ("optim=adamw_torch_8bit", "same-target", ...)

    def label(self) -> str:
        parts = [] if self.finetune == "full" else [f"finetune={self.finetune}"]
        parts += list(self.memory)
        parts += [] if self.value_head == "separate" else [f"value_head={self.value_head}"]
        parts += ["gradient_checkpointing"] if self.gradient_checkpointing else []
        parts += ["torch_compile (fast)"] if self.torch_compile else []
        return (" " + " ".join(parts)) if parts else ""


def load_target(world: World, device: str, same_as_prompter: bool = False, dtype=None):
    """The frozen target behind an HFEngine; one engine serves every provider (it never changes).
    same_as_prompter: the prompter's weights, as in a run with one chat model for both roles (issue 14)."""
    from transformers import AutoModelForCausalLM

    from alignfast.rollout import HFEngine

    path = world.prompter if same_as_prompter else world.target
    target = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or world.dtype).to(device).requires_grad_(False)
    return HFEngine(target, world.tokenizer)


def make_trainer(variant: str, world: World, root: Path, device: str, setup: Setup, engine):
    from transformers import AutoModelForCausalLM

    from alignfast.trainer import AlignProConfig, AlignProTrainer

    backend, reuse = VARIANTS[variant]
    prompter = AutoModelForCausalLM.from_pretrained(str(world.prompter), dtype=world.dtype).to(device)
    peft_config = None
    if setup.finetune == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                 task_type="CAUSAL_LM")
    extra = {"gradient_checkpointing": True} if setup.gradient_checkpointing else {}
    if setup.torch_compile and backend == "fast":
        extra["torch_compile"] = True
    extra.update(memory_config(setup))
    cfg = AlignProConfig(**{**world.config, "output_dir": str(root / f"out-{variant}"), "backend": backend,
                            "seed": 0, "save_strategy": "no", "max_steps": 1000, "logging_steps": 1000,
                            "reuse_sampler_logprobs": reuse, "value_head": setup.value_head, **extra})
    return AlignProTrainer(cfg, prompter, world.tokenizer, engine, reward_funcs=world.reward_funcs,
                           train_dataset=world.prompts, peft_config=peft_config)


# What the providers' first (warm-up) steps must agree on before any is timed. They start from the same weights
# and seeds, so they draw the same rollouts: the rollout metrics match to the last digit of their rounding, the
# losses to the numerics of the path (float32 summation order; bfloat16 presets round every activation). Not
# policy/approxkl_avg: in a first epoch it measures only that numerical gap (0 on the reference path, whose old
# log-probs are the same forward's; ~3e-5 on the 135M model for `fast`, whose are the sampler's), not training.
ROLLOUT_METRICS = ("objective/scores", "completions/mean_length", "val/num_eos_tokens")
LOSS_METRICS = ("loss/policy_avg", "loss/value_avg", "objective/entropy")
LOSS_TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (5e-2, 1e-3), torch.float16: (2e-2, 5e-4)}


def check_same_first_step(shape: str, first: dict[str, dict], dtype: torch.dtype) -> None:
    """Refuse to time providers whose first PPO step disagrees with the first provider's: a fast path that trains
    on other rollouts or computes another loss would otherwise be timed as a speed-up (harness.ProviderMismatch,
    the check run_rounds makes of the kernels' outputs). |a - b| <= atol + rtol * |b|, per metric."""
    names = list(first)
    base = first[names[0]]
    rtol, atol = LOSS_TOLERANCE.get(dtype, LOSS_TOLERANCE[torch.float32])
    for name in names[1:]:
        for key in ROLLOUT_METRICS + LOSS_METRICS:
            if key not in base or key not in first[name]:
                continue  # a metric this configuration does not log (no EOS token, say)
            a, b = float(first[name][key]), float(base[key])
            r, t = (1e-6, 1e-9) if key in ROLLOUT_METRICS else (rtol, atol)
            if not abs(a - b) <= t + r * abs(b):
                raise harness.ProviderMismatch(
                    f"bench: {shape}: {name!r} first step {key} = {a:.6g}, {names[0]!r} = {b:.6g} "
                    f"(tolerance {t:g} + {r:g}*|b|): the providers no longer train alike; not timed")


def run(preset_name: str, device: str, reps: int, record: bool, setup: Setup,
        thread_counts: tuple[int, ...] = (), variants: tuple[str, ...] | None = None) -> str:
    """Time the providers' PPO steps interleaved (one round = one step of each, the order rotated from round to
    round: A B, B A, ...) so that load drifting on a shared machine hits every provider alike; report medians per
    provider and per phase, and the per-round ratio to the reference (its median and inter-quartile range).
    thread_counts: the providers are the fast trainer once per count instead, and the ratios are against the first
    count. variants: the providers (default the preset's; "reference", the baseline, among them)."""
    # Time the step as a long-running process's glibc serves it: blocks up to 32 MiB from the heap, and the heap
    # not trimmed below 64 MiB. A 32 MiB threshold alone (this bench until 2026-11-30) left glibc's trim
    # threshold at 128 KiB, so every freed top of the heap went back to the system and faulted in again; that
    # cost the reference path's larger allocations more (LoRA: reference 7444 vs 7765 ms, fast 5345 vs
    # 5401; glibc's untouched dynamic mode gave 7707 / 5512: bench/NOTES-trainer.md).
    harness.normal_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = make_world(preset_name, root)
        shape = world.label + setup.label()
        engine = load_target(world, device)
        threads = {f"fast, {t} thread{'s' if t > 1 else ''}": t for t in thread_counts}
        if threads:  # identical trainers (same seed, same rollouts): only the thread count differs
            trainers = {name: make_trainer("fast", world, root, device, setup, engine) for name in threads}
        else:
            chosen = ["reference", *(v for v in VARIANTS if v in variants and v != "reference")] if variants \
                else world.variants
            trainers = {name: make_trainer(name, world, root, device, setup, engine) for name in chosen}
        baseline = next(iter(trainers)) if threads else "reference"
        steps = {name: 0 for name in trainers}
        totals = {name: [] for name in trainers}
        phases = {name: {ph: [] for ph in PHASES} for name in trainers}

        def one_step(name):
            if name in threads:
                torch.set_num_threads(threads[name])
            metrics, _ = trainers[name]._train_step(steps[name], None)
            steps[name] += 1
            return metrics

        warmup, first = {}, {}
        for name in trainers:  # warm-up step each (with torch_compile: the compilation, mostly)
            t0 = time.perf_counter()
            first[name] = one_step(name)
            warmup[name] = time.perf_counter() - t0
        check_same_first_step(shape, first, world.dtype)
        names = list(trainers)
        for rnd in range(reps):
            shift = rnd % len(names)  # the order rotates from round to round, as in harness.run_rounds
            for name in names[shift:] + names[:shift]:
                _sync(device)
                t0 = time.perf_counter()
                metrics = one_step(name)
                _sync(device)
                totals[name].append(time.perf_counter() - t0)
                for ph in PHASES:
                    phases[name][ph].append(metrics[f"timing_s/{ph}"])
        rows = []
        big = PRESETS.get(preset_name, {}).get("vocab", 0) * PRESETS.get(preset_name, {}).get("hidden", 0) > 1e7
        for name in trainers:
            # The peak-memory step is not timed; on the 135M preset the process-wide RSS says more (--memory).
            peak = None if big else peak_extra_memory(lambda name=name: one_step(name), device=device)
            row = Row(shape, name, statistics.median(totals[name]), peak, samples=totals[name])
            ratios = [r / t for r, t in zip(totals[baseline], totals[name])]
            q1, q2, q3 = harness.quartiles(ratios)
            row.ratios[baseline] = (q1, q2, q3)  # also what the spread column judges
            row.extra["warm-up step s"] = f"{warmup[name]:.1f}"
            row.extra["per-round ratio (IQR)"] = f"{q2:.2f}x ({q1:.2f}-{q3:.2f})"
            for ph in PHASES:
                row.extra[f"{ph} ms"] = f"{statistics.median(phases[name][ph]) * 1e3:.1f}"
            rows.append(row)
        extra_cols = ("per-round ratio (IQR)", "warm-up step s", *(f"{ph} ms" for ph in PHASES))
        table = format_table(rows, baseline=baseline, extra_columns=extra_cols)
        spread = harness.spread_note(rows)
        cfg = trainers[baseline].config
    print(f"\n{device_description(device)}, load average {os.getloadavg()[0]:.1f}\n{table}" +
          (f"\n{spread}" if spread else ""))
    others = [n for n in trainers if n != "reference"]
    what = f"the fast step at {' vs '.join(map(str, thread_counts))} threads" if threads else \
        (f"{' and '.join(others)} vs reference" if others else "reference alone")  # the preset's: "fast vs reference"
    if record:
        append_results(f"bench_trainer ({preset_name}{setup.label()}): one Align-Pro PPO step, {what}",
                       table, device=device, rounds=reps,
                       notes=f"{reps} rounds, providers interleaved, after one warm-up step each; load average "
                       f"{os.getloadavg()[0]:.1f} at the end. Phase columns: medians of each phase (num_ppo_epochs="
                       f"{cfg.num_ppo_epochs}, num_mini_batches={cfg.num_mini_batches}, "
                       f"per_device_train_batch_size={cfg.per_device_train_batch_size}, one HFEngine target of the "
                       "same shape shared by the providers); logprobs = the scoring phase (old and reference "
                       "log-probs, values)." + (f" {spread}" if spread else ""))
    return table


# --------------------------------------------------------------------------------------------------
# memory: one provider per process
# --------------------------------------------------------------------------------------------------
def _plain(t):
    """A tensor subclass's inner tensors (torchao's quantised optimizer state: codes, scales, code map)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from _plain(getattr(t, name))
    else:
        yield t


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in (u for t in tensors for u in _plain(t)):
        st = t.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def memory_config(setup: Setup) -> dict:
    """The config fields of --memory's settings ("optim=...", "frozen_dtype=...", "no-share")."""
    out = {}
    for item in setup.memory:
        key, _, value = item.partition("=")
        if key in ("optim", "frozen_dtype"):
            out[key] = value
        elif key == "no-share":
            out["share_frozen_weights"] = False
    return out


class RssSampler:
    """Peak resident set per phase of the step: a thread reads /proc/self/statm every millisecond; the phase
    label is set by wrappers around the trainer's methods. statm's third field is the file-backed part
    (mapped model files, shared libraries), the rest is anonymous (tensors, the Python and glibc heaps)."""

    def __init__(self, trim: bool = False):
        import threading

        self.phase, self.peaks, self._stop, self.trim = "setup", {}, False, trim
        self.seconds: dict[str, list[float]] = {}  # each wrapped call's duration
        self.call_peaks: dict[str, list[int]] = {}  # each wrapped call's peak RSS
        self._call = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self):
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        rss, shared = int(fields[1]) * self._page, int(fields[2]) * self._page
        self._call = max(self._call, rss)
        peak = self.peaks.setdefault(self.phase, [0, 0])
        if rss > peak[0]:
            self.peaks[self.phase] = [rss, shared]

    def _run(self):
        while not self._stop:
            self.sample()
            time.sleep(0.001)

    def wrap(self, obj, name: str, phase: str):
        fn = getattr(obj, name)

        def wrapped(*args, **kwargs):
            before, self.phase = self.phase, phase
            self._call = 0
            self.sample()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds.setdefault(phase, []).append(time.perf_counter() - t0)
                self.sample()
                self.call_peaks.setdefault(phase, []).append(self._call)
                self.phase = before
                if self.trim:  # give the heap's free pages back to the system
                    harness.malloc_trim()
        setattr(obj, name, wrapped)

    def stop(self) -> dict:
        self._stop = True
        self._thread.join()
        return {k: v for k, v in self.peaks.items()}


def memory_child(preset_name: str, variant: str, root: Path, device: str, setup: Setup) -> dict:
    """One PPO step of one provider in this process (with num_ppo_epochs >= 2 its second optimizer step
    runs with the AdamW state allocated: the run's steady-state peak); the accounting of what it holds."""
    import alignfast.trainer.base as trainer_base

    sampler = RssSampler(trim="malloc-trim" in setup.memory)
    sampler.phase = "imports"
    world = make_world(preset_name, root, build=False)
    sampler.phase = "setup"
    engine = load_target(world, device, same_as_prompter="same-target" in setup.memory,
                         dtype=torch.bfloat16 if "target-bf16" in setup.memory else None)
    trainer = make_trainer(variant, world, root, device, setup, engine)
    sampler.phase = "other"  # between the phases below (after the update: its state and gradients stay)
    sampler.wrap(trainer_base, "score_rollout", "scoring")
    sampler.wrap(trainer, "_sample", "sampling")
    sampler.wrap(trainer.environment, "step", "target")
    sampler.wrap(trainer.updater, "update", "update")
    sampler.wrap(trainer.optimizer, "step", "optimizer step")
    if "per-call" in setup.memory:  # the update's micro-batches: forward + loss, then backward
        sampler.wrap(trainer.updater, "_micro_step", "micro forward")
        sampler.wrap(torch.autograd, "backward", "backward")
    policy = _storages(trainer.model.parameters())
    critic_params = trainer.value_model.parameters() if trainer.value_model is not None else \
        trainer.shared_value_head.parameters()
    critic = _storages(critic_params)
    params = {p.untyped_storage().data_ptr() for p in trainer.params} | set(policy) | set(critic)
    saved: dict[int, int] = {}
    largest = [0]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
            largest[0] = max(largest[0], st.nbytes())
        return t

    # What autograd keeps for the backward of the first micro-batch (policy and critic forward, PPO loss).
    micro_step = trainer.updater._micro_step

    def first_micro_step_recorded(*args, **kwargs):
        trainer.updater._micro_step = micro_step
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return micro_step(*args, **kwargs)

    trainer.updater._micro_step = first_micro_step_recorded
    trainer._train_step(0, None)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    phases = sampler.stop()
    ref = _storages(trainer.ref_model.parameters()) if trainer.ref_model is not None else {}
    target = _storages(engine.model.parameters())
    opt = _storages(t for st in trainer.optimizer.state.values() for t in st.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    grads = sum(p.numel() * p.element_size() for p in trainer.params)
    return {"peak_rss": peak_rss, "policy": sum(policy.values()),
            "ref": sum(v for k, v in ref.items() if k not in policy and k not in target), "critic": sum(critic.values()),
            "target": sum(v for k, v in target.items() if k not in policy), "optimizer": sum(opt.values()), "grads": grads,
            "saved": sum(saved.values()), "largest_saved": largest[0], "phases": phases,
            "seconds": sampler.seconds, "call_peaks": sampler.call_peaks, "shared_frozen": trainer.shared_frozen}


def run_memory(preset_name: str, device: str, record: bool, setup: Setup, variants=None) -> str:
    """Each provider alone in a fresh process (peak RSS is per process); one table row each."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = make_world(preset_name, root)
        for variant in variants or world.variants:
            cmd = [sys.executable, "-m", "bench.bench_trainer", "--memory-child", variant, "--root", str(root),
                   "--preset", preset_name, "--device", device, "--finetune", setup.finetune,
                   "--value-head", setup.value_head, "--threads", str(torch.get_num_threads())] + \
                (["--gradient-checkpointing"] if setup.gradient_checkpointing else []) + \
                [a for item in setup.memory for a in ("--mem", item)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if out.returncode != 0:
                raise RuntimeError(f"memory child {variant} failed:\n{out.stderr[-3000:]}")
            rows.append((variant, json.loads(out.stdout.strip().splitlines()[-1])))
    cols = ["peak_rss", "policy", "ref", "critic", "target", "optimizer", "grads", "saved", "largest_saved"]
    names = ["peak RSS", "policy", "reference (not shared)", "critic / value head", "target (not in policy)", "optimizer state",
             "gradients", "saved for backward (1 micro-batch)", "largest saved tensor"]
    lines = ["| shape | provider | " + " | ".join(f"{n} MiB" for n in names) + " |",
             "|" + "---|" * (len(names) + 2)]
    for variant, m in rows:
        lines.append(f"| {world.label}{setup.label()} | {variant} | " + " | ".join(_mib(m[c]) for c in cols) + " |")
    lines += ["", "Peak RSS per phase, MiB (of which file-backed): " + "; ".join(
        f"{variant}: " + ", ".join(f"{ph} {_mib(v[0])} ({_mib(v[1])})" for ph, v in m["phases"].items())
        for variant, m in rows)]
    if "per-call" in setup.memory:
        lines += ["", "Peak RSS of each call, MiB: " + "; ".join(
            f"{variant}: " + ", ".join(f"{ph} " + "/".join(_mib(v) for v in vs) for ph, vs in m["call_peaks"].items())
            for variant, m in rows)]
    lines += ["", "Seconds per call (the optimizer's first step includes torchao's compile): " + "; ".join(
        f"{variant}: " + ", ".join(f"{ph} " + "/".join(f"{t:.2f}" for t in ts) for ph, ts in m["seconds"].items())
        for variant, m in rows)]
    table = "\n".join(lines)
    print(f"\n{device_description(device)}, load average {os.getloadavg()[0]:.1f}\n{table}")
    if record:
        append_results(f"bench_trainer --memory ({preset_name}{setup.label()}): what one Align-Pro run holds",
                       table, device=device,
                       timing="one PPO step per provider, each in a fresh process (a peak, not a median)",
                       notes="Each provider alone in a fresh process, one PPO step of two epochs; peak RSS = getrusage ru_maxrss "
                       "(/usr/bin/time -v's maximum resident set size) at glibc's normal mmap threshold. Bytes of "
                       "unique tensor storages; 'saved for backward' = the tensors autograd keeps for one "
                       "micro-batch's backward (policy, critic, PPO loss), parameters excluded.")
    return table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def apply_run_flags(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """After parsing, what every trainer bench does: refuse --device cuda without a GPU (one line), apply --threads,
    and turn off Hugging Face's progress bars and warnings."""
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", action="append", choices=["demo", *sorted(PRESETS)],
                    help="repeatable; default demo, cpu-tiny and cpu-small on CPU, cuda-0.5b on CUDA")
    ap.add_argument("--reps", type=int, default=None, help="rounds (one step of each provider per round)")
    ap.add_argument("--value-head", default="separate", choices=["separate", "shared"],
                    help="the critic: a separate backbone (TRL's default) or a head on the policy's backbone")
    ap.add_argument("--finetune", default="full", choices=["full", "lora"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--torch-compile", action="store_true",
                    help="the fast providers compile their decoder layers (config torch_compile); the warm-up "
                    "step column then shows the compile time")
    ap.add_argument("--mem", action="append", default=[],
                    choices=["optim=adamw_torch_8bit", "optim=adamw_torch_4bit", "frozen_dtype=bfloat16",
                             "same-target", "target-bf16", "no-share",
                             "malloc-trim", "mmap-64k", "per-call"],
                    help="--memory settings (repeatable): an optimizer, a bf16 reference, the target loaded from the "
                    "prompter's weights (a run with one model for both roles), the target in bfloat16, glibc's malloc_trim after each phase, glibc's mmap threshold at 64 KiB instead of 32 MiB, no sharing of identical frozen weights")
    ap.add_argument("--memory", action="store_true", help="peak RSS and what holds it, one process per provider")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                    help="the providers to time or (--memory) measure (repeatable; default the preset's; timing "
                    "always adds reference, the baseline)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--thread-counts", default=None, metavar="N,M,...",
                    help="time the fast provider at each of these torch thread counts instead, interleaved")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="one preset (demo on CPU), two timed rounds")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    harness.refuse_unrecordable(ap, args)
    if args.variant and args.thread_counts and not args.memory:
        ap.error("--variant and --thread-counts: --thread-counts times the fast provider alone, at each count")
    apply_run_flags(ap, args)
    setup = Setup(args.finetune, args.value_head, args.gradient_checkpointing, args.torch_compile, tuple(args.mem))
    presets = args.preset or (["cuda-0.5b"] if args.device == "cuda" else ["demo", "cpu-tiny", "cpu-small"])
    if args.memory_child:
        # glibc with a 32 MiB mmap threshold and its default 128 KiB trim threshold, as the recorded peaks were
        # taken (a long-running process's 64 MiB trim threshold keeps more of the heap resident; the timing runs
        # use that one), or, mmap-64k, every tensor over 64 KiB mapped and unmapped on free
        harness.set_mmap_threshold(64 * 1024 if "mmap-64k" in setup.memory else harness.TIMING_MMAP_THRESHOLD)
        print(json.dumps(memory_child(presets[0], args.memory_child, Path(args.root), args.device, setup)))
        return
    if args.quick:  # a recorded table keeps harness.ROUNDS rounds at least, quick or not
        presets, args.reps = presets[:1], args.reps or (harness.ROUNDS if args.record else 2)
    if args.record and args.reps is not None and args.reps < harness.ROUNDS:
        ap.error(f"--reps must be >= {harness.ROUNDS} with --record (got {args.reps})")
    for name in presets:
        if args.memory:
            run_memory(name, args.device, args.record, setup, args.variant)
        else:
            run(name, args.device, args.reps or (10 if args.device == "cuda" else 5), args.record, setup,
                thread_counts=tuple(int(t) for t in args.thread_counts.split(",")) if args.thread_counts else (),
                variants=tuple(args.variant) if args.variant else None)


if __name__ == "__main__":
    main()
