"""Where a command's one-line error goes, so that N processes under a launcher do not print it N times.

Every process of `torchrun` / `accelerate launch` runs the same command on the same run file, so a bad setting
fails identically in all of them: eight GPUs printed the same line eight times, above the launcher's own report
of the failed workers. Under a launcher (WORLD_SIZE > 1) each process therefore

* prints its line only if no process of the same launch on this node printed the same line before it (an atomic
  O_EXCL marker file named by the launch and the line): a line that only one process hits (a file missing on one
  node, one process's data shard) is still printed, by that process;
* writes the line into the error file torch's elastic launcher reads (TORCHELASTIC_ERROR_FILE), so the launcher's
  failure summary says why the process exited instead of "To enable traceback see ...".

One process (no launcher) just prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time

from alignfast.launch_env import launched_world_size


def print_error(line: str) -> None:
    if launched_world_size() <= 1:
        print(line, file=sys.stderr)
        return
    _record_for_launcher(line)
    if _first_to_say(line):
        print(line, file=sys.stderr)


def _record_for_launcher(line: str) -> None:
    # torch.distributed.elastic's error-file format (ErrorHandler.record_exception) without a call stack, so the
    # summary shows the line itself; its first observed failure is the one with the earliest timestamp.
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the launcher then reports the exit code alone; the line is still printed


def _first_to_say(line: str) -> bool:
    """True for the first process of this launch on this node to say `line` (then it prints it), else False."""
    launch = _launch_identity()
    if launch is None:
        return True
    folder = os.path.join(tempfile.gettempdir(), f"alignfast-errors-{os.getuid()}")
    marker = os.path.join(folder, hashlib.sha256(f"{launch}\0{line}".encode()).hexdigest()[:32])
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no writable temp folder: better twice than never
    _remove_old_markers(folder)
    return True


def _launch_identity() -> str | None:
    """The launcher process (the parent of every worker on a node), when it started and which restart of its workers
    this is: a new launch, even one that reuses the parent's pid, and a restart by `torchrun --max-restarts` are
    other identities. None where /proc cannot tell (then every process prints)."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = fields[19]  # field 22 of stat: start time in clock ticks since boot
    except (OSError, IndexError):
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return f"{parent}:{started}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{restart}"


def _remove_old_markers(folder: str, older_than_s: float = 86400.0) -> None:
    now = time.time()
    try:
        for entry in os.scandir(folder):
            if now - entry.stat().st_mtime > older_than_s:
                os.unlink(entry.path)
    except OSError:
        pass
