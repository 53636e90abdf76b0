"""The one exception type the command line turns into a single line on stderr (exit code 2)."""


class CLIError(Exception):
    """A user-facing problem (missing file, unknown key, model not found offline): one clear line."""


def known_error_line(err: BaseException) -> str | None:
    """The one line for an error alignfast raises about the user's input, run or endpoint (a bad setting, a reward
    function that failed, a damaged checkpoint, a target endpoint that failed for good); None for a bug."""
    from alignfast.ops._checks import AlignfastArgumentError
    from alignfast.rollout.engine import EngineRequestError
    from alignfast.trainer.results import TrainingDivergedError

    if isinstance(err, (AlignfastArgumentError, EngineRequestError, TrainingDivergedError)):
        return str(err).removeprefix("alignfast: ")
    return None


# Trainer fields whose run-file key lives in another section: an error the trainer raises about the field names the
# key the user wrote.
RUN_FILE_KEYS = {"argument 'target_system_prompt'": "target.system_prompt",
                 "argument 'prompter_tokenizer'": "prompter.tokenizer",
                 "argument 'target_tokenizer'": "target.tokenizer", "argument 'reward_tokenizer'": "reward.tokenizer",
                 "argument 'response_length'": "trainer.response_length",
                 "argument 'max_prompt_length'": "trainer.max_prompt_length",
                 "argument 'attn_implementation'": "target.attn_implementation",
                 "argument 'label_index'": "reward.label_index", "argument 'reward_label_index'": "reward.label_index"}


# This command's own names for trainer fields it sets from other keys (train --oracle: response_length is
# trainer.target_max_new_tokens); reset by every command (alignfast.cli.main).
_command_keys: dict[str, str] = {}


def name_fields_for_this_command(keys: dict[str, str]) -> None:
    _command_keys.clear()
    _command_keys.update(keys)


def in_run_file_terms(line: str) -> str:
    for field, key in {**RUN_FILE_KEYS, **_command_keys}.items():
        line = line.replace(field, key)
    return line


def flag_error(flag: str, argument: str, path, err: BaseException) -> CLIError:
    """An AlignfastArgumentError about `argument` (the folder a flag names) in the flag's terms: '--aligner ... has
    no aligner_config.json'; one about a setting inside the folder names the folder: '--aligner DIR: argument ...'."""
    message = str(err).removeprefix("alignfast: ")
    if message.startswith(f"argument '{argument}' "):
        return CLIError(f"{flag} " + message.removeprefix(f"argument '{argument}' "))
    return CLIError(f"{flag} {path}: {message}")
