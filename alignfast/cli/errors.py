"""The one exception type the command line turns into a single line on stderr (exit code 2)."""


class CLIError(Exception):
    """A user-facing problem (missing file, unknown key, model not found offline): one clear line."""
