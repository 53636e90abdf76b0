"""Result files written whole or not at all.

A report (eval.json, results.md, a run's config.json) rewritten in place with open(path, "w") is truncated first:
a kill, a full disk or an exception mid-write leaves an empty or half file that looks like a result. Here the text
goes to a temporary sibling, is flushed to disk, and replaces `path` in one rename (POSIX rename is atomic within
a file system), so a reader sees the old file or the new one. Checkpoint folders have their own
(alignfast.trainer.checkpoint.new_folder_atomically).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path`, replacing any earlier file in one step; returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
        os.replace(tmp, path)
    except IsADirectoryError as err:  # a folder where the file goes: named, not the temporary file that is gone
        Path(tmp).unlink(missing_ok=True)
        raise IsADirectoryError(err.errno, "a folder is in the way of a file alignfast writes", str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def readable_weights(folder: str | os.PathLike) -> None:
    """Give the *.safetensors under `folder` the usual permissions (0666 less the umask): safetensors' save_file
    creates them 0600, so other users of a shared machine could not read a model they can read the rest of."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*.safetensors"):
        os.chmod(path, mode)


def _umask() -> int:
    """The process's umask, read from /proc where Linux shows it (setting it to read it back would change it for
    every thread for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
