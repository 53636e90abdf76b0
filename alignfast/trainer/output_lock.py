"""One run at a time per output_dir.

Two runs writing into one output_dir (two commands started together, a second launch of the same job) would
interleave their metrics.jsonl lines and overwrite each other's checkpoints and final model; the loser's work
is silently lost, and overwrite_output_dir would delete the other run's checkpoint being written. So the main
process of a run holds an exclusive flock on output_dir/.alignfast.lock for as long as it runs (its trainer
lives): a second run is refused in one line naming output_dir. An flock goes when its process ends, however it
ends (a crash, SIGKILL), so a killed run never leaves a lock behind that blocks its resume.

Within one process the lock is re-entrant (a test, a notebook, or `alignfast train` itself building a trainer
after its preflight took the lock): runs in one process are sequential. Only the main process of a launched
run takes it; the others wait for its answer (trainer/run_loop.py).
"""

from __future__ import annotations

import errno
import logging
import os
import weakref
from pathlib import Path

from alignfast.ops._checks import fail

LOCK_FILE = ".alignfast.lock"
_log = logging.getLogger("alignfast.trainer")
_held: dict[str, weakref.ref] = {}  # realpath of output_dir -> the lock this process holds on it


class OutputDirLock:
    """An flock on output_dir/LOCK_FILE held while this object lives (or until release())."""

    def __init__(self, key: str, fd: int | None):
        self.key, self.fd = key, fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the open file releases the flock
            self.fd = None
        ref = _held.get(self.key)
        if ref is not None and ref() in (self, None):
            _held.pop(self.key, None)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def check_writable(output_dir: str | os.PathLike) -> Path:
    """Create output_dir (and its parents) and check a file can be written there: a read-only file system or a
    folder without write permission is one line naming output_dir, before any model loads."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".alignfast-write-test-{os.getpid()}"
        with open(probe, "w") as f:
            f.write("ok\n")
        probe.unlink()
    except OSError as err:
        fail("output_dir", f"'{out}' cannot be written ({_why(out, err)}): choose another output_dir "
             "(--trainer.output_dir)")
    return out


def _why(out: Path, err: OSError) -> str:
    """What is in the way, in words: mkdir's 'File exists' for a file or a dangling link says neither."""
    if out.is_symlink() and not out.exists():
        return f"it is a symbolic link to {os.readlink(out)}, which does not exist"
    if out.exists() and not out.is_dir():
        return "it is a file, not a folder"
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    return err.strerror or str(err)


def lock_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """The exclusive lock on output_dir for this process (the one it already holds, if any); an error naming
    output_dir when another process holds it."""
    key = os.path.realpath(output_dir)
    ref = _held.get(key)
    held = ref() if ref is not None else None
    if held is not None and held.fd is not None:
        return held  # this process's own (the command's preflight took it; its trainer asks again): checked then
    out = check_writable(output_dir)
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        fail("output_dir", f"'{out}' cannot be written ({err.strerror or err}): choose another output_dir "
             "(--trainer.output_dir)")
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(path)
            fail("output_dir", f"'{out}' is in use by another run{holder}: two runs in one output_dir would "
                 "overwrite each other's checkpoints and metrics; wait for it to end, or choose another output_dir "
                 "(--trainer.output_dir)")
        # A file system without flock (some network mounts): run unlocked rather than not at all.
        _log.warning("cannot lock %s (%s): nothing keeps a second run from writing into it at the same time", out,
                     err.strerror or err)
        lock = OutputDirLock(key, None)
        _held[key] = weakref.ref(lock)
        return lock
    except ImportError:  # no fcntl (Windows): unlocked
        lock = OutputDirLock(key, fd)
        _held[key] = weakref.ref(lock)
        return lock
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is for the message only
    lock = OutputDirLock(key, fd)
    _held[key] = weakref.ref(lock)
    return lock


def _holder(path: Path) -> str:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    return f" (process {pid})"


_command_locks: list[OutputDirLock] = []


def hold_for_command(output_dir: str | os.PathLike) -> OutputDirLock:
    """lock_output_dir, held until release_command_locks() (a command takes the lock before loading any model;
    its trainer then holds the same lock)."""
    lock = lock_output_dir(output_dir)
    _command_locks.append(lock)
    return lock


def release_command_locks() -> None:
    """At the end of a command: every output_dir lock this process holds is released (the run is over; a test
    that runs commands in one process and then another in a subprocess must not find its own lock held)."""
    _command_locks.clear()
    for ref in list(_held.values()):
        lock = ref()
        if lock is not None:
            lock.release()
