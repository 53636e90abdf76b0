"""`alignfast correct`: an upstream model answers, a trained Aligner corrector rewrites each answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "correct", help="answer questions with an upstream model and correct the answers with an Aligner",
        description="Reads questions (a .jsonl/.json/.csv file with a 'question' column, or 'prompt'), has the "
                    "upstream model answer them (a local/hub model through the batched HF engine, or an "
                    "OpenAI-compatible endpoint), has the corrector in --aligner rewrite each answer, and writes one "
                    "JSON line per question: its other columns (an id) and {question, answer, correction, truncated, "
                    "answer_tokens_dropped}: \"truncated\" true where the correction was cut at --max-new-tokens, "
                    "\"answer_tokens_dropped\" the answer's last tokens the corrector's max_length left out; with "
                    "an upstream, also \"answer_truncated\": true where its answer was cut at "
                    "--upstream-max-new-tokens (the corrector rewrote a cut answer). Without "
                    "--upstream/--upstream-url the file's own 'answer' column is corrected; with one, a file that "
                    "has an 'answer' column is refused (the upstream's answers would replace it).")
    p.add_argument("--aligner", required=True, metavar="DIR", help="a corrector saved by `alignfast aligner train`")
    up = p.add_mutually_exclusive_group()
    up.add_argument("--upstream", metavar="MODEL", help="upstream model: hub name, local folder, or toy:target")
    up.add_argument("--upstream-url", metavar="URL", help="an OpenAI-compatible endpoint serving the upstream")
    # The endpoint's settings default to None so that one given without --upstream-url is an error, not ignored.
    p.add_argument("--upstream-model", metavar="NAME", help="the served model's name at --upstream-url")
    p.add_argument("--api", choices=["chat", "completions"], help="--upstream-url's API (default chat)")
    p.add_argument("--api-key-env", help="environment variable holding --upstream-url's API key (OPENAI_API_KEY)")
    p.add_argument("--data", required=True, metavar="FILE", help="questions (.jsonl/.json/.csv)")
    p.add_argument("--output", required=True, metavar="FILE", help="where the JSON lines go")
    p.add_argument("--max-new-tokens", type=int, default=256, help="corrector's budget per correction (256)")
    p.add_argument("--upstream-system-prompt", metavar="TEXT",
                   help="the upstream's system message (in --upstream's chat template, or the chat's system message "
                        "at --upstream-url with --api chat)")
    p.add_argument("--upstream-max-new-tokens", type=int, default=256, help="upstream's budget per answer (256)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per generation batch (32)")
    p.add_argument("--dtype", default=None, help="dtype of the local models (float32, bfloat16, ...)")
    p.set_defaults(run=run)


def _questions(path: str) -> list[dict]:
    from alignfast.cli.data import FILE_SUFFIXES, _read_file
    from alignfast.cli.errors import CLIError

    p = Path(path)
    if p.suffix not in FILE_SUFFIXES:
        raise CLIError(f"--data must be a .jsonl, .json or .csv file, got {p}")
    if not p.is_file():
        raise CLIError(f"--data: file not found: {p}")
    try:
        rows = _read_file(p, "correct")
    except CLIError as err:  # its messages name the run file's data.<what>; here the file is --data
        raise CLIError("--data: " + str(err).removeprefix("data.correct: ")) from None
    for r in rows:
        if "question" not in r and "prompt" in r:
            r["question"] = r.pop("prompt")  # the question's column, written back as 'question'
    return rows


def _served_upstream(args, api: str):
    """The OpenAI-compatible upstream, asked for its model list first: a wrong URL or key is one line in seconds,
    as in train and eval, not after the corrector has loaded and the retry budget is spent."""
    import os

    from alignfast.cli.errors import CLIError
    from alignfast.rollout import EngineRequestError, OpenAIEngine

    engine = OpenAIEngine(args.upstream_url, args.upstream_model, api=api,
                          api_key=os.environ.get(args.api_key_env or "OPENAI_API_KEY"),
                          system_prompt=args.upstream_system_prompt)
    try:
        engine.check_endpoint(timeout=min(10.0, engine.timeout),
                              names={"base_url": "--upstream-url", "api_key": "--api-key-env"})
    except EngineRequestError as err:
        engine.close()
        raise CLIError(f"--upstream-url: {err}") from None
    return engine


def _check_room(model, budget: int, flag: str) -> None:
    """A budget that leaves a model no position for the prompt is the flag's error, up front (the engine's own
    error named its 'max_new_tokens' argument, whichever of the two budgets it was)."""
    from alignfast.cli.errors import flag_error
    from alignfast.ops import AlignfastArgumentError
    from alignfast.trainer.align_pro import check_target_room

    try:
        check_target_room(model, budget, name=flag)
    except AlignfastArgumentError as err:
        raise flag_error(flag, flag, None, err) from None


def run(args, extra) -> int:
    from alignfast.aligner import AlignerPipeline, Corrector
    from alignfast.aligner.data import check_rows
    from alignfast.cli import build
    from alignfast.cli.errors import CLIError, flag_error
    from alignfast.cli.models import load_causal_lm, load_tokenizer, quiet_transformers, torch_dtype
    from alignfast.ops import AlignfastArgumentError

    quiet_transformers()
    for name in ("max_new_tokens", "upstream_max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.upstream_url and not args.upstream_model:
        raise CLIError("--upstream-url needs --upstream-model (the served model's name)")
    for name in ("upstream_model", "api", "api_key_env"):
        if getattr(args, name) is not None and not args.upstream_url:
            raise CLIError(f"--{name.replace('_', '-')} is a setting of --upstream-url, which is not given"
                           + (" (--upstream is a local model, asked in its own chat format)" if args.upstream else ""))
    api = args.api or "chat"
    if args.upstream_system_prompt is not None and not (args.upstream or args.upstream_url):
        raise CLIError("--upstream-system-prompt needs --upstream or --upstream-url (without either, --data holds "
                       "the answers, and no upstream is asked)")
    if args.upstream_system_prompt is not None and not args.upstream_system_prompt.strip():
        raise CLIError("--upstream-system-prompt must be a non-empty text")
    if args.upstream_system_prompt is not None and args.upstream_url and api != "chat":
        raise CLIError("--upstream-system-prompt is the chat's system message, sent only with --api chat; with --api "
                       "completions the question is sent as it is")
    rows = _questions(args.data)
    have_answers = not (args.upstream or args.upstream_url)
    if not have_answers and rows and "answer" in rows[0]:  # the upstream's answers would silently replace them
        flag = "--upstream-url" if args.upstream_url else "--upstream"
        raise CLIError(f"--data {args.data} has an 'answer' column, which {flag} would replace: drop {flag} to "
                       "correct the file's own answers, or remove (rename) the column")
    try:
        rows = check_rows(rows, name="--data", need_correction=False) if have_answers else _with_question(rows)
    except AlignfastArgumentError as err:
        message = str(err).removeprefix("alignfast: argument ").replace("'--data'", "--data")
        if "has no 'answer' field" in message:  # a file of questions only, given without an upstream to answer them
            message += "; to have an upstream model answer the questions, pass --upstream or --upstream-url"
        raise CLIError(message) from None
    served = _served_upstream(args, api) if args.upstream_url else None  # before any model loads
    try:  # the endpoint's client (a thread and its connections) is closed however the command ends
        device = build.default_device()
        try:
            corrector = Corrector.from_pretrained(args.aligner, device=device, dtype=torch_dtype(args.dtype),
                                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        except AlignfastArgumentError as err:  # the folder ('aligner'), or a setting its aligner_config.json holds
            raise flag_error("--aligner", "aligner", args.aligner, err) from None
        except OSError as err:
            raise CLIError(f"cannot load the corrector from {args.aligner}: {str(err).splitlines()[0]}") from None
        questions = [r["question"] for r in rows]
        _check_room(corrector.model, args.max_new_tokens, "--max-new-tokens")
        answer_cut: list[bool] | None = None  # the upstream's answers cut at its budget (None: --data's answers)
        if have_answers:
            answers = [r["answer"] for r in rows]
            generated = corrector.generate(questions, answers)
            corrections = [c.text for c in generated]
            truncated = [c.truncated for c in generated]
            dropped = corrector.answer_tokens_dropped
        else:
            if args.upstream:
                from alignfast.rollout import HFEngine

                spec = {"model": args.upstream, "dtype": args.dtype}
                tok = load_tokenizer(spec, "upstream")
                engine = HFEngine(load_causal_lm(spec, "upstream", device=device), tok)
                _check_room(engine.model, args.upstream_max_new_tokens, "--upstream-max-new-tokens")
            else:
                tok, engine = None, served
            try:
                pipeline = AlignerPipeline(engine, corrector, upstream_tokenizer=tok,
                                           upstream_system_prompt=(args.upstream_system_prompt if tok is not None
                                                                   else None),
                                           upstream_max_new_tokens=args.upstream_max_new_tokens,
                                           batch_size=args.batch_size)
            except AlignfastArgumentError as err:
                if "'upstream_system_prompt' " not in str(err):  # the budgets were checked above, in flag terms
                    raise
                raise CLIError("--upstream-system-prompt "
                               + str(err).split("'upstream_system_prompt' ", 1)[-1]) from None
            results = pipeline(questions)
            answers = [r.answer for r in results]
            corrections = [r.correction for r in results]
            truncated = [r.truncated for r in results]
            dropped = [r.answer_tokens_dropped for r in results]
            answer_cut = [bool(r.answer_truncated) for r in results]
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        from alignfast.files import write_text_atomically

        # The file's other columns (an id to join on) come first, as they were. "truncated" is always written, so
        # that it says what this run did: a file from an earlier round of correction may carry its own.
        # "answer_tokens_dropped": the answer's last tokens the corrector did not see (its max_length), as in training.
        # "answer_truncated" (with an upstream only): its answer stopped at --upstream-max-new-tokens, so the corrector
        # rewrote a cut answer; --data's own answers are not this run's to judge (a column of theirs is kept).
        written = [{**row, "question": q, "answer": a, "correction": c, "truncated": bool(cut),
                    "answer_tokens_dropped": int(d)}
                   for row, q, a, c, cut, d in zip(rows, questions, answers, corrections, truncated, dropped,
                                                   strict=True)]
        if answer_cut is not None:
            written = [{**w, "answer_truncated": u} for w, u in zip(written, answer_cut, strict=True)]
        write_text_atomically(out, "".join(json.dumps(w) + "\n" for w in written))
        changed = sum(a.strip() != c.strip() for a, c in zip(answers, corrections))
        cut = f", {sum(truncated)} cut at --max-new-tokens ({args.max_new_tokens}; \"truncated\": true)" \
            if any(truncated) else ""
        if answer_cut and any(answer_cut):
            cut = f", {sum(answer_cut)} upstream answers cut at --upstream-max-new-tokens " \
                f"({args.upstream_max_new_tokens}; \"answer_truncated\": true){cut}"
        long = sum(d > 0 for d in dropped)
        long = f", {long} answers longer than the corrector's max_length seen without their end " \
            f"(\"answer_tokens_dropped\")" if long else ""
        print(f"alignfast correct: {len(questions)} answers, {changed} changed by the corrector{cut}{long}; wrote "
              f"{out}", file=sys.stderr)
        return 0
    finally:
        if served is not None:
            served.close()


def _with_question(rows: list[dict]) -> list[dict]:
    from alignfast.cli.errors import CLIError

    for i, r in enumerate(rows):
        q = r.get("question")
        if not isinstance(q, str) or not q.strip():
            raise CLIError(f"--data row {i} has no text in column 'question' (or 'prompt')")
    return rows
