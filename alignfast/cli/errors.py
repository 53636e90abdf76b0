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
