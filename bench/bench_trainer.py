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

    python -m bench.bench_trainer                      # demo, cpu-tiny and cpu-small
    python -m bench.bench_trainer --device cuda --record
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness import Row, append_results, device_description, format_table, peak_extra_memory

PRESETS = {
    "cpu-tiny": dict(arch="llama", vocab=2048, hidden=64, layers=2, heads=4, kv_heads=4, inter=128, batch=16,
                     prompt_words=12, response_length=24, target_max_new_tokens=16, dtype=torch.float32),
    "cpu-small": dict(arch="llama", vocab=16384, hidden=128, layers=4, heads=4, kv_heads=4, inter=352, batch=16,
                      prompt_words=16, response_length=32, target_max_new_tokens=16, dtype=torch.float32),
    "cpu-qwen2-mini": dict(arch="qwen2", vocab=4096, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, batch=8,
                           prompt_words=12, response_length=16, target_max_new_tokens=8, dtype=torch.bfloat16),
    "cuda-0.5b": dict(arch="qwen2", vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, batch=64,
                      prompt_words=48, response_length=64, target_max_new_tokens=64, dtype=torch.bfloat16),
}
PHASES = ["prompter_gen", "target_gen", "reward", "logprobs", "update"]


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
                  tie_word_embeddings=p["arch"] == "qwen2")
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


def make_world(preset_name: str, root: Path) -> World:
    if preset_name == "demo":
        return demo_world()
    p = PRESETS[preset_name]
    tok = build_tokenizer(root / "tok", p["vocab"])
    build_model(root / "prompter", p, seed=0, dtype=p["dtype"])
    build_model(root / "target", p, seed=1, dtype=p["dtype"])
    g = torch.Generator().manual_seed(0)
    n_words = p["vocab"] - 6
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, n_words, (p["prompt_words"],), generator=g))
               for _ in range(4 * p["batch"])]
    config = dict(per_device_train_batch_size=p["batch"] // 2, num_mini_batches=2, num_ppo_epochs=4,
                  response_length=p["response_length"], temperature=1.0,
                  target_max_new_tokens=p["target_max_new_tokens"], rewrite_template="{prompt}",
                  learning_rate=1e-6)
    label = f"{preset_name}: V={p['vocab']} H={p['hidden']} L={p['layers']} B={p['batch']} R={p['response_length']}"
    return World(label, root / "prompter", root / "target", tok, prompts, [word_overlap_reward], p["dtype"], config)


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


def make_trainer(backend: str, world: World, root: Path, device: str, *, reuse: bool | None):
    from transformers import AutoModelForCausalLM

    from alignfast.rollout import HFEngine
    from alignfast.trainer import AlignProConfig, AlignProTrainer

    prompter = AutoModelForCausalLM.from_pretrained(str(world.prompter), dtype=world.dtype).to(device)
    target = AutoModelForCausalLM.from_pretrained(str(world.target), dtype=world.dtype).to(device)
    cfg = AlignProConfig(**{**world.config, "output_dir": str(root / f"out-{backend}"), "backend": backend,
                            "seed": 0, "save_strategy": "no", "max_steps": 1000, "logging_steps": 1000,
                            "reuse_sampler_logprobs": reuse})
    return AlignProTrainer(cfg, prompter, world.tokenizer, HFEngine(target, world.tokenizer),
                           reward_funcs=world.reward_funcs, train_dataset=world.prompts)


def run(preset_name: str, device: str, reps: int, record: bool, value_head: str = "separate") -> str:
    """Time the providers' PPO steps interleaved (A, B, C, A, B, C, ...) so that load drifting on a shared
    machine hits every provider alike; report medians per provider and per phase."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = make_world(preset_name, root)
        world.config["value_head"] = value_head
        shape = world.label + ("" if value_head == "separate" else f" value_head={value_head}")
        variants = {"reference": ("reference", None), "fast": ("fast", None), "fast-recompute": ("fast", False)}
        trainers = {name: make_trainer(backend, world, root, device, reuse=reuse)
                    for name, (backend, reuse) in variants.items()}
        steps = {name: 0 for name in trainers}
        totals = {name: [] for name in trainers}
        phases = {name: {ph: [] for ph in PHASES} for name in trainers}

        def one_step(name):
            metrics, _ = trainers[name]._train_step(steps[name], None)
            steps[name] += 1
            return metrics

        for name in trainers:  # warm-up step each
            one_step(name)
        for _ in range(reps):
            for name in trainers:
                _sync(device)
                t0 = time.perf_counter()
                metrics = one_step(name)
                _sync(device)
                totals[name].append(time.perf_counter() - t0)
                for ph in PHASES:
                    phases[name][ph].append(metrics[f"timing_s/{ph}"])
        rows = []
        for name in trainers:
            peak = peak_extra_memory(lambda name=name: one_step(name), device=device)
            row = Row(shape, name, statistics.median(totals[name]), peak)
            for ph in PHASES:
                row.extra[f"{ph} ms"] = f"{statistics.median(phases[name][ph]) * 1e3:.1f}"
            rows.append(row)
        table = format_table(rows, baseline="reference", extra_columns=tuple(f"{ph} ms" for ph in PHASES))
    print(f"\n{device_description(device)}\n{table}")
    if record:
        append_results(f"bench_trainer ({preset_name}): one Align-Pro PPO step, fast vs reference", table,
                       device=device, notes=f"Median of {reps} interleaved steps per provider after one warm-up step; "
                       "phase columns: medians of each phase (num_ppo_epochs=4, num_mini_batches=2, one HFEngine "
                       "target of the same shape).")
    return table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", action="append", choices=["demo", *sorted(PRESETS)],
                    help="repeatable; default demo, cpu-tiny and cpu-small on CPU, cuda-0.5b on CUDA")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--value-head", default="separate", choices=["separate", "shared"],
                    help="the critic: a separate backbone (TRL's default) or a head on the policy's backbone")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="one preset (demo on CPU), two timed steps")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    presets = args.preset or (["cuda-0.5b"] if args.device == "cuda" else ["demo", "cpu-tiny", "cpu-small"])
    if args.quick:
        presets, args.reps = presets[:1], args.reps or 2
    for name in presets:
        run(name, args.device, args.reps or (10 if args.device == "cuda" else 5), args.record, args.value_head)


if __name__ == "__main__":
    main()
