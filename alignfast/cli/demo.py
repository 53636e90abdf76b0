"""`alignfast demo`: the paper's comparison on the embedded toy world, offline, on a laptop CPU.

1. Load the toy world (alignfast.toy): a frozen tiny target that misreads terse commands, an SFT
   prompter ρsft that mostly copies its input, and a reward that checks the target's answer against
   what the ORIGINAL command meant.
2. Score the held-out prompts with No fine-tuning (the target answers x) and with ρsft.
3. Train the prompter with Align-Pro (PPO, KL penalty λ = kl_coef to ρsft), then score it.
4. Train the target itself with PPO (the Oracle arm), then score it.
   Train an Aligner corrector by SFT on the target's answers to the training prompts, then score it.
5. Print the table (mean reward, variance, win rate vs No fine-tuning), a few prompts before and after,
   and write results.json, results.md, reward_curve.png and each run's metrics.jsonl to the output dir.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from alignfast.files import write_text_atomically

BASELINE = "No fine-tuning"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _configs(world, out: Path, *, seed: int, episodes: int | None, backend: str):
    from alignfast.trainer import AlignProConfig

    base = dict(world.demo_config, seed=seed, backend=backend, rewrite_template=world.rewrite_template,
                target_prompt_template=world.target_prompt_template, save_strategy="no", logging_steps=5,
                report_to="none", overwrite_output_dir=True)  # a rerun of the demo replaces its own runs
    if episodes is not None:
        base["total_episodes"] = episodes
    align = AlignProConfig.from_dict({**base, "output_dir": str(out / "align_pro")})
    oracle = AlignProConfig.from_dict({**base, **world.oracle_overrides, "output_dir": str(out / "oracle")})
    return align, oracle


def _examples(arms: dict, world, k: int = 4) -> list[dict]:
    """The first held-out prompt of each task (up to k), as it went through each arm."""
    seen, rows = set(), []
    for i, row in enumerate(world.eval_prompts):
        task = row.get("task")
        if task in seen:
            continue
        seen.add(task)
        rows.append({"prompt": row["prompt"], "true answer": row.get("answer"),
                     **{name: {"rewrite": a.rewrites[i], "answer": a.answers[i], "reward": round(a.scores[i], 3)}
                        for name, a in arms.items()}})
        if len(rows) == k:
            break
    return rows


def _print_examples(rows: list[dict], names: list[str]) -> str:
    lines = []
    width = max(len(n) for n in names) + 2
    for r in rows:
        lines.append(f"prompt: {r['prompt']!r}    (meant: {r['true answer']})")
        for name in names:
            a = r[name]
            rewrite = "" if a["rewrite"] == r["prompt"] else f"rewrite {a['rewrite']!r} -> "
            lines.append(f"  {name:<{width}}{rewrite}answer {a['answer']!r}  reward {a['reward']}")
        lines.append("")
    return "\n".join(lines)


def run_demo(output_dir: str | Path, *, seed: int = 0, episodes: int | None = None, oracle: bool = True,
             backend: str = "fast", show_progress: bool | None = None, aligner: bool = True,
             proxy: bool = True) -> dict:
    """Run the whole demo; returns the results dict also written to output_dir/results.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.cli.progress import ProgressCallback
    from alignfast.eval import arms as arm_eval
    from alignfast.eval import compare_arms, reward_curves, to_json, to_markdown
    from alignfast.rollout import HFEngine
    from alignfast.toy import load_world
    from alignfast.trainer import AlignProTrainer, OracleTrainer

    from alignfast.cli.models import quiet_transformers

    quiet_transformers()
    t_start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A rerun replaces its own runs (overwrite_output_dir); the folders of the arms this run skips go too, or the
    # earlier run's Oracle or proxy (its model, metrics.jsonl, seed) would sit beside results that do not list it.
    # Only in a folder an earlier demo wrote (its results.json): `alignfast train --oracle` writes <output_dir>/oracle.
    earlier_demo = (out / "results.json").is_file()
    for arm_dir, skipped in (("oracle", not oracle), ("aligner", not aligner), ("proxy_rlhf", not proxy)):
        if earlier_demo and skipped and (out / arm_dir).is_dir():
            import shutil

            shutil.rmtree(out / arm_dir)
            _log(f"alignfast demo: removed the earlier run's {out / arm_dir} (this run skips that arm)")
    always = bool(show_progress)
    torch.manual_seed(seed)
    world = load_world()
    align_cfg, oracle_cfg = _configs(world, out, seed=seed, episodes=episodes, backend=backend)
    prompts = [r["prompt"] for r in world.eval_prompts]
    columns = {k: [r[k] for r in world.eval_prompts] for k in world.eval_prompts[0] if k != "prompt"}
    _log(f"alignfast demo: toy world with {len(world.train_prompts)} training and {len(prompts)} held-out "
         f"prompts; output in {out}")

    tok = AutoTokenizer.from_pretrained(world.target_path)
    target = AutoModelForCausalLM.from_pretrained(world.target_path).eval().requires_grad_(False)
    target_engine = HFEngine(target, tok)
    prompter_tok = AutoTokenizer.from_pretrained(world.prompter_path)
    prompter = AutoModelForCausalLM.from_pretrained(world.prompter_path)
    align = AlignProTrainer(align_cfg, prompter, prompter_tok, target_engine, target_tokenizer=tok,
                            reward_funcs=world.reward_funcs, reward_weights=world.reward_weights,
                            train_dataset=world.train_prompts,
                            callbacks=[ProgressCallback("Align-Pro PPO", always=always)])
    env = align.environment
    timings = {}

    t0 = time.perf_counter()
    results = {BASELINE: arm_eval.no_fine_tuning(env, prompts, columns, seed=seed)}
    prompter_engine = HFEngine(align.model, prompter_tok)
    results["SFT prompter (before PPO)"] = arm_eval.with_policy(
        "SFT prompter (before PPO)", env, prompter_engine, prompter_tok, prompts, columns,
        max_new_tokens=align_cfg.response_length, seed=seed)
    timings["eval_before_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    align.train()
    timings["align_pro_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["Align-Pro"] = arm_eval.with_policy("Align-Pro", env, prompter_engine, prompter_tok, prompts, columns,
                                                max_new_tokens=align_cfg.response_length, seed=seed)
    timings["align_pro_eval_s"] = time.perf_counter() - t0
    align.save_model(out / "align_pro" / "final")
    curves = {"Align-Pro (training prompts, sampled)": out / "align_pro" / "metrics.jsonl"}

    if oracle:
        t0 = time.perf_counter()
        oracle_model = AutoModelForCausalLM.from_pretrained(world.target_path)
        oracle_trainer = OracleTrainer(oracle_cfg, oracle_model, tok, reward_funcs=world.reward_funcs,
                                       reward_weights=world.reward_weights, train_dataset=world.train_prompts,
                                       callbacks=[ProgressCallback("Oracle PPO", always=always)])
        oracle_trainer.train()
        timings["oracle_train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["Oracle (PPO on the target)"] = arm_eval.with_policy(
            "Oracle (PPO on the target)", oracle_trainer.environment, HFEngine(oracle_trainer.model, tok), tok,
            prompts, columns, max_new_tokens=oracle_cfg.response_length, seed=seed, rewrites=False)
        timings["oracle_eval_s"] = time.perf_counter() - t0
        curves["Oracle (training prompts, sampled)"] = out / "oracle" / "metrics.jsonl"
    if aligner:  # Aligner: a corrector trained by SFT after the frozen target (alignfast.aligner)
        from alignfast.cli.demo_aligner import NAME as ALIGNER, aligner_arm

        t0 = time.perf_counter()
        results[ALIGNER] = aligner_arm(world, env, target_engine, tok, results[BASELINE], out / "aligner", seed=seed,
                                       backend=backend, always=always, episodes=episodes)
        timings["aligner_s"] = time.perf_counter() - t0
    if proxy:  # Proxy-RLHF: a small proxy accepts or rejects the frozen target's tokens (alignfast.cli.demo_proxy)
        from alignfast.cli.demo_proxy import PROXY_ARM, run_proxy_arm

        t0 = time.perf_counter()
        results[PROXY_ARM], _ = run_proxy_arm(world, world.target_path, tok, prompts, columns, out, seed=seed,
                                              backend=backend, episodes=episodes,
                                              callbacks=[ProgressCallback("Proxy-RLHF PPO", always=always)])
        timings["proxy_rlhf_s"] = time.perf_counter() - t0
        curves["Proxy-RLHF (training prompts, sampled)"] = out / "proxy_rlhf" / "metrics.jsonl"
    timings["total_s"] = time.perf_counter() - t_start

    rows = compare_arms({name: r.scores for name, r in results.items()}, baseline=BASELINE)
    table = to_markdown(rows, baseline=BASELINE)
    examples = _examples({k: results[k] for k in (BASELINE, "SFT prompter (before PPO)", "Align-Pro")}, world)
    plot = reward_curves(curves, out / "reward_curve.png", title="alignfast demo: reward during PPO",
                         baselines={f"{BASELINE} (held-out, greedy)": results[BASELINE].mean})
    meta = {"seed": seed, "backend": backend, "episodes": align_cfg.total_episodes,
            "kl_coef": align_cfg.kl_coef, "held_out_prompts": len(prompts), "timings_s": timings,
            "torch_threads": torch.get_num_threads()}
    write_text_atomically(out / "results.json", to_json(rows, baseline=BASELINE, extra={**meta, "examples": examples}))
    write_text_atomically(out / "results.md", f"# alignfast demo (seed {seed})\n\n{table}\n")
    arm_eval.write_rollouts(results, out / "held_out_rollouts.jsonl")

    print(f"\nHeld-out comparison ({len(prompts)} prompts the prompter never trained on; seed {seed}):\n")
    print(table)
    print("\nBefore and after Align-Pro (the target is the same frozen model in every row):\n")
    print(_print_examples(examples, [BASELINE, "SFT prompter (before PPO)", "Align-Pro"]))
    print(f"Wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'held_out_rollouts.jsonl'}"
          + (f", {plot}" if plot else "") + f" and metrics.jsonl per run. Total {timings['total_s']:.0f} s.")
    return {"rows": [r.to_dict() for r in rows], **meta, "examples": examples}
