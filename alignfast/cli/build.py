"""From a checked run file to the objects a trainer takes: models, tokenizers, target engine, rewards, data.

Kept apart from the commands so `alignfast train` and `alignfast eval` build a run the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from alignfast.cli import config as run_config
from alignfast.cli.data import load_prompts
from alignfast.cli.errors import CLIError
from alignfast.cli.models import import_callable, load_causal_lm, load_reward_model, load_tokenizer

ENGINES = ("hf", "vllm", "openai")


def trainer_fields() -> set[str]:
    import dataclasses

    from alignfast.trainer import AlignProConfig

    return {f.name for f in dataclasses.fields(AlignProConfig)}


def trainer_config(config: dict, **forced):
    """AlignProConfig from the `trainer` section (unknown keys are one line, naming the key)."""
    from alignfast.ops import AlignfastArgumentError
    from alignfast.trainer import AlignProConfig

    values = {**run_config.section(config, "trainer"), **local_target_settings(config), **forced}
    try:
        return AlignProConfig.from_dict(values)
    except AlignfastArgumentError as err:
        message = (str(err).removeprefix("alignfast: ").replace("config key", "key trainer.")
                   .replace("key trainer. '", "key 'trainer."))
        reported = message.split("'trainer.", 1)[-1].split("'", 1)[0] if message.startswith("unknown key") else None
        if reported in _proxy_only_fields():  # a Proxy-RLHF run file without --method proxy
            message += f" ('{reported}' is a Proxy-RLHF setting: add --method proxy)"
        raise CLIError(message) from None


def _proxy_only_fields() -> set[str]:
    import dataclasses

    from alignfast.trainer import AlignProConfig
    from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig

    return {f.name for f in dataclasses.fields(ProxyRLHFConfig)} - {f.name for f in dataclasses.fields(AlignProConfig)}


def local_target_settings(config: dict) -> dict:
    """The trainer fields that the run file's target section sets when the target runs here (engine hf or vllm):
    target.system_prompt is then the trainer's target_system_prompt, put in the target tokenizer's chat template.
    An OpenAI-compatible target's server formats its own input: the engine sends it (build_target_engine)."""
    # reward.label_index is the trainer's reward_label_index, whichever the target
    out = {k: v for k, v in [("reward_label_index", run_config.section(config, "reward").get("label_index"))]
           if v is not None}
    spec = run_config.section(config, "target")
    if str(spec.get("engine") or "hf").lower() == "openai" or spec.get("system_prompt") is None:
        return out
    return {**out, "target_system_prompt": spec["system_prompt"]}


def run_file_dirs(config_path, overrides=()) -> list[str]:
    """Where `reward.functions: [my_rewards:score]` finds my_rewards.py (the console script, unlike `python -m`,
    puts neither folder on sys.path): the run file's folder, then the working directory; the working directory
    first when reward.functions was given on the command line, whose paths are the shell's, as for any override."""
    from pathlib import Path

    dirs = [str(Path(config_path).expanduser().resolve().parent)] if config_path else []
    cwd = str(Path.cwd())
    if any(key in ("reward.functions", "reward") for key, _ in run_config.parse_overrides(overrides)):
        return [cwd] + [d for d in dirs if d != cwd]
    return dirs + ([cwd] if cwd not in dirs else [])


def preflight_run(cfg, *, resume) -> None:
    """What a training command checks before it loads any model (minutes with real ones): a tracker in report_to
    that is not installed, a launcher config whose backend is not installed, an output_dir that cannot be written,
    that another run is using (one process: the lock is taken here and held for the run) or that holds a run
    this one would mix with; then it fits the thread count to the machine's free cores. cfg: any trainer config
    (AlignProConfig, ProxyRLHFConfig, AlignerConfig)."""
    from alignfast.cli.threads import fit_threads_to_machine
    from alignfast.ops import AlignfastArgumentError
    from alignfast.trainer.distributed import check_launcher_backend, launched_world_size
    from alignfast.trainer.metrics_logger import check_reporters
    from alignfast.trainer.output_lock import check_writable, hold_for_command
    from alignfast.trainer.checkpoint import check_model_folder
    from alignfast.trainer.run_loop import check_output_dir

    try:
        check_reporters(cfg.report_to)
        check_launcher_backend()
        check_writable(cfg.output_dir)
        if launched_world_size() <= 1:  # under a launcher the trainer's main process takes it, and tells the others
            hold_for_command(cfg.output_dir)
        found = check_output_dir(cfg, resume=resume)
        # The command saves the model in output_dir/final at the end: a folder save_model would refuse is found
        # before training. Not when the run's claim removes it (an overwrite of an earlier run it found).
        if not (found and getattr(cfg, "overwrite_output_dir", False)):
            check_model_folder(Path(cfg.output_dir) / "final", cfg.output_dir, before_run=True)
    except AlignfastArgumentError as err:
        raise CLIError(str(err).removeprefix("alignfast: ")) from None
    fit_threads_to_machine()


def default_device() -> str:
    """cuda when there is a GPU, else cpu; under a launcher (torchrun, accelerate launch) this process's GPU,
    cuda:LOCAL_RANK, so N processes do not all load their models onto GPU 0 first."""
    import torch

    from alignfast.trainer.distributed import launched_device

    return launched_device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Rewards:
    reward_model: object | None = None
    reward_tokenizer: object | None = None
    reward_funcs: list = field(default_factory=list)
    reward_weights: list[float] | None = None


def build_rewards(config: dict, *, device, search_dirs=()) -> Rewards:
    """search_dirs: where reward.functions' own modules and relative .py paths are found (see
    run_file_dirs)."""
    spec = run_config.section(config, "reward")
    out = Rewards(reward_weights=spec.get("weights"))
    if spec.get("model"):
        out.reward_model = load_reward_model(spec, device=device).eval()
        out.reward_tokenizer = load_tokenizer(spec, "reward model")
    funcs = spec.get("functions") or []
    if isinstance(funcs, str):
        funcs = [funcs]
    out.reward_funcs = [import_callable(f, "reward function", search_dirs=search_dirs) for f in funcs]
    if out.reward_model is None and not out.reward_funcs:
        raise CLIError("the config needs a reward: set reward.model (a sequence-classification reward model) "
                       "and/or reward.functions ['package.module:function', ...]")
    return out


def build_target_engine(config: dict, *, device):
    """The frozen target behind the TargetEngine interface chosen by target.engine (hf | vllm | openai)."""
    spec = run_config.section(config, "target")
    kind = (spec.get("engine") or "hf").lower()
    if kind not in ENGINES:
        raise CLIError(f"target.engine must be one of {', '.join(ENGINES)}, got '{kind}'")
    model = run_config.require(config, "target.model")
    if kind == "hf":
        from alignfast.rollout import HFEngine

        kwargs = {k: spec[k] for k in ("max_batch_tokens", "attn_implementation") if spec.get(k) is not None}
        tokenizer = load_tokenizer(spec, "target")
        # Frozen as the method says, in eval mode and without gradients: what lets the trainer hold one copy for
        # the target and the reference when they are the same weights (share_frozen_weights).
        lm = load_causal_lm(spec, "target", device=device).eval().requires_grad_(False)
        return HFEngine(lm, tokenizer, **kwargs), tokenizer
    if kind == "vllm":
        from alignfast.rollout import VLLMEngine

        kwargs = {k: spec[k] for k in ("gpu_memory_utilization", "tensor_parallel_size", "max_model_len",
                                       "trust_remote_code") if spec.get(k) is not None}
        # vLLM reserves this fraction of the whole GPU at start-up, after the prompter, its optimizer and the
        # reward model are already there: its own default (0.9) would not start. Override with
        # target.gpu_memory_utilization when the target has a GPU to itself.
        kwargs.setdefault("gpu_memory_utilization", 0.4)
        if spec.get("dtype"):
            kwargs["dtype"] = str(spec["dtype"])
        try:
            engine = VLLMEngine(str(model), spec.get("tokenizer"), **kwargs)
        except ImportError as err:  # vllm not installed: the engine says how to install it
            raise CLIError(f"target.engine vllm: {err}") from None
        return engine, load_tokenizer(spec, "target")
    from alignfast.rollout import OpenAIEngine

    base_url = run_config.require(config, "target.base_url")
    key_env = spec.get("api_key_env") or "OPENAI_API_KEY"
    kwargs = {k: spec[k] for k in ("api", "max_concurrency", "timeout", "max_retries", "retry_budget", "call_timeout",
                                   "system_prompt") if spec.get(k) is not None}
    if "api" not in kwargs:
        # The input the hf and vllm engines give the same target: its chat template (api: chat lets the server
        # apply it) unless trainer.target_use_chat_template is false. A completions default sent an instruct
        # model the bare rewrite when a run moved its target onto a server, and changed what the target saw.
        use_template = run_config.section(config, "trainer").get("target_use_chat_template", True)
        kwargs["api"] = "chat" if use_template else "completions"
    # A remote endpoint formats its own input (api: chat applies the served model's chat template), so
    # the trainer sends plain text: no local target tokenizer.
    try:
        return OpenAIEngine(str(base_url), str(model), api_key=os.environ.get(key_env), **kwargs), None
    except ImportError as err:  # openai not installed
        raise CLIError(f"target.engine openai: {err}") from None


def preflight_target(config: dict) -> None:
    """Before any model loads: an OpenAI-compatible target is asked for its model list, so a wrong base_url
    (a missing /v1, a wrong port, a server that is down) is one line naming the URL in seconds, not after the
    prompter, the reward model and the first rollout (minutes with real models)."""
    spec = run_config.section(config, "target")
    if (spec.get("engine") or "hf").lower() != "openai":
        return
    from alignfast.ops import AlignfastArgumentError
    from alignfast.rollout import EngineRequestError

    try:
        engine, _ = build_target_engine(config, device="cpu")
    except AlignfastArgumentError as err:
        raise CLIError(f"target: {str(err).removeprefix('alignfast: ')}") from None
    try:
        engine.check_endpoint(timeout=min(10.0, engine.timeout))
    except EngineRequestError as err:
        raise CLIError(f"target.base_url: {err}") from None
    finally:
        engine.close()


def lora_config(spec: dict | None, section: str = "prompter"):
    """peft's LoraConfig from the run file's <section>.lora (prompter, or aligner for the Aligner's corrector)."""
    if not spec:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise CLIError(f"{section}.lora needs the `peft` package (pip install 'alignfast[peft]')") from None
    values = {"task_type": "CAUSAL_LM", **spec}
    try:
        return LoraConfig(**values)
    except TypeError as err:
        raise CLIError(f"{section}.lora: {err}") from None


def load_data(config: dict, *, need_train: bool, need_eval: bool) -> tuple[list[dict] | None, list[dict] | None]:
    data = run_config.section(config, "data")
    train = load_prompts(data["train"], what="train") if need_train and data.get("train") else None
    if need_train and train is None:
        raise CLIError("the config needs data.train (a .jsonl/.csv file with a prompt column, or a datasets name)")
    evals = load_prompts(data["eval"], what="eval") if data.get("eval") else None
    if need_eval and evals is None:
        raise CLIError("the config needs data.eval (held-out prompts)")
    return train, evals
