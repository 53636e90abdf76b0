"""Where `alignfast train` / `alignfast eval` report while they run: a progress bar on a terminal, one log line
per logging step everywhere else.

The trainer logs one INFO line per `logging_steps` (logger 'alignfast.trainer') and the progress bar turns
itself off when stderr is not a terminal. Without a handler those INFO lines went nowhere, so a run under
nohup, CI or `> log` printed nothing for its whole length. Inside `command_logging()`:

    stderr is a terminal      the bar redraws in place; the 'alignfast' loggers show WARNING and above
    stderr is not a terminal  no bar; the 'alignfast' loggers show INFO: one line per logging step
"""

from __future__ import annotations

import contextlib
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (a test's capture, a redirected stream),
    not to the object that stderr was when the handler was made."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler's __init__ and setStream assign it; the property wins
        pass


def per_step_lines() -> bool:
    """Whether the run reports by log lines (stderr is not a terminal) rather than by the progress bar."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not (isatty is not None and isatty())


@contextlib.contextmanager
def command_logging():
    """The 'alignfast' loggers on stderr for the length of one command, then as they were (main() may run
    several commands in one process, as the tests do)."""
    logger = logging.getLogger("alignfast")
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    level = logger.level
    logger.setLevel(logging.INFO if per_step_lines() else logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
