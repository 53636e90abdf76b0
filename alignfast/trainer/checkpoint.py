"""Atomic, verified checkpoints: everything a run needs to continue exactly where it stopped.

Layout of output_dir/checkpoint-<step>/:
    policy/             the policy in save_pretrained form (what a user loads afterwards)
    trainable.pt        the trained parameters that policy/ does not already hold bit for bit (a value model or
                        value head, parameters save_pretrained stores under another name), and for the rest a map
                        {parameter: (file, key)} into policy/'s safetensors: one copy of the weights, never two;
                        no frozen weight (LoRA: the adapter only)
    optimizer.pt        optimizer state;   scheduler.pt: LR scheduler state
    rng.pt              python / numpy / torch (CPU and CUDA) generator states
    trainer_state.json  step, episode, KL controller, metrics so far, the config
    manifest.json       every other file's size and SHA-256, written last

Writing: into a temporary sibling `.tmp-checkpoint-<step>-<pid>-<random>` (created under the process's umask,
so other users of a shared machine can read it as they can read the run's other files), every file and folder
fsynced, then the manifest, then one rename into place and an fsync of output_dir. A crash or a power loss
therefore leaves either the previous checkpoints alone or a complete new one; never a half-written
checkpoint-<step>. What a killed writer leaves behind (`.tmp-checkpoint-*`) is removed by the next run
(`clean_stale`). The final model (save_model's folder, final/) is written the same way by
`new_folder_atomically`, which replaces an existing one whole.

Reading: `verify` checks a checkpoint against its manifest before anything trusts it; `resume_point` picks
the newest checkpoint that passes and warns, naming each newer one that does not and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
from pathlib import Path

import torch

from alignfast.files import readable_weights
from alignfast.ops._checks import AlignfastArgumentError, fail
from alignfast.trainer.output_lock import LOCK_FILE

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CorruptCheckpointError(AlignfastArgumentError):
    """A checkpoint that fails verification (missing or damaged files, no manifest); names it and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"alignfast: checkpoint {path} is damaged or incomplete: {reason}")
        self.path, self.reason = Path(path), reason


class UnverifiedCheckpoint(CorruptCheckpointError):
    """A checkpoint without a manifest: from an alignfast that wrote none (resumable, unverified), or damaged."""


class OutputWriteError(AlignfastArgumentError, OSError):
    """A checkpoint, the final model or metrics that could not be written (a full disk, a read-only file system).
    An OSError too, as the error it replaces."""


@contextlib.contextmanager
def writing(output_dir: str | os.PathLike, what: str, folder: str | os.PathLike | None = None):
    """A write into output_dir (or `folder`, a model's folder elsewhere) that fails for want of room or permission
    ends in one line naming the folder and the run's last good checkpoint (torch.save says only "[enforce fail at
    inline_container.cc] unexpected pos" on a full disk); any other error passes through."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - classified below; anything else re-raised as it was
        reason = _write_failure(err)
        if reason is None:
            raise
        last = latest_checkpoint(output_dir)
        where = f"argument 'output_dir' '{output_dir}': cannot write {what} there" if folder is None else \
            f"cannot write {what} in {folder}"
        raise OutputWriteError(
            f"alignfast: {where} ({reason}): free space or choose another folder (output_dir: "
            f"--trainer.output_dir); the last good checkpoint is "
            f"{last if last is not None else 'none (no checkpoint yet)'}") from err


_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "StorageFull",
                   "Permission denied")


def _write_failure(err: BaseException) -> str | None:
    if isinstance(err, OutputWriteError):
        return None
    if isinstance(err, OSError):
        return err.strerror or str(err)
    text = str(err)
    for phrase in _WRITE_FAILURES:
        if phrase in text:
            return phrase
    if isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text
                                          or "unexpected pos" in text):
        return "the file could not be written: is the disk full?"
    return None


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, trainable: dict, optimizer, scheduler,
                    trainer_state: dict, save_policy=None, total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically; `save_policy(dir)` writes the user-facing model. trainable["policy"]
    (name -> tensor) is stored only where policy/ does not already hold the same tensor."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = _fresh_dir(root, f"{TMP_PREFIX}{step}-")
    try:
        if save_policy is not None:
            save_policy(tmp / "policy")
            absolute_adapter_base(tmp / "policy")
            readable_weights(tmp)  # safetensors writes 0600: the checkpoint's files follow the umask, as promised
            if "policy" in trainable:
                kept, files = _split_policy(trainable["policy"], tmp / "policy")
                trainable = {**trainable, "policy": kept, POLICY_FILES: files}
        torch.save(trainable, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=1, default=_json_default)
        _write_manifest(tmp)  # fsyncs every file and folder, then the manifest: from here the copy is complete
        if final.exists():  # the same step written again (a rerun): replace it, still atomically
            _swap(tmp, final, parked=_fresh_dir(root, f"{TMP_PREFIX}replaced-{step}-"))
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None:
        for old in list_checkpoints(root)[:-total_limit]:
            _remove(old)
    return final


@contextlib.contextmanager
def new_folder_atomically(path: str | os.PathLike, *, warn=None):
    """Yield a temporary sibling of `path` to write into; on success it is fsynced and put in `path`'s place, on an
    error removed. So a kill never leaves a half-written `path` (the final model, say) that looks complete.

    An existing `path` stays whole until the new folder is complete, then is replaced by two renames (as
    save_checkpoint replaces a step written again): `path` then holds exactly what was written, never the new model
    mixed with the old one's files (a LoRA adapter beside full weights would be loaded instead of them). The old
    folder is deleted when the new one has every name it had; when it held anything more (a file of the user's, a
    report written into it), it is kept whole beside as `<name>.replaced-<time>` and a warning (`warn(msg)`) names
    what: nothing is deleted silently (a kill between its two renames leaves `path` missing and the earlier folder
    there, whole). What a killed writer leaves otherwise is put back or removed by the next write of `path` and by
    clean_stale: a temporary copy is deleted; an old folder caught between the two renames returns to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_folder(path)
    tmp = _fresh_dir(path.parent, f"{TMP_PREFIX}{path.name}-")
    try:
        yield tmp
        for dirpath, _dirs, names in os.walk(tmp):
            for name in names:
                _sha256(Path(dirpath) / name, fsync=True)
            _fsync_dir(Path(dirpath))
        if os.path.lexists(path):
            _replace_folder(tmp, path, warn or _log.warning)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# What every saved model folder holds (save_pretrained's config or a LoRA adapter's, a proxy's, a corrector's): an
# existing folder with none of them is not a model that a new save may replace whole.
MODEL_FOLDER_MARKERS = ("config.json", "adapter_config.json", "proxy_config.json", "aligner_config.json")


def check_model_folder(path: str | os.PathLike, output_dir: str | os.PathLike, *, before_run: bool = False) -> None:
    """save_model replaces its folder whole (new_folder_atomically), so the folder must be the model's own. Refused
    in one line naming it: the run's output_dir or a folder containing it (the run's checkpoints, metrics and lock
    would be moved aside with it), the working or home folder or a root, a folder holding a training run, and an
    existing non-empty folder that holds no saved model (its files would be moved aside, not replaced; a symlink is
    not: the swap moves the link, and what it points to stays). before_run: checked by a training command before it
    trains, for the final/ it saves at the end (the message names output_dir's final/, not save_model's argument)."""
    path = Path(path)
    real, run = Path(os.path.realpath(path)), Path(os.path.realpath(output_dir))
    suggestion = f"pass a folder of its own such as '{run / 'final'}'"
    if not real.name or real in (Path(os.path.realpath(Path.cwd())), Path(os.path.realpath(Path.home()))):
        fail("output_dir", f"of save_model, '{path}', is {'a root' if not real.name else 'the working or home folder'}"
             f": the model's folder is replaced whole by every save; {suggestion}")
    try:
        held = [p.name for p in list_checkpoints(path)][-2:] + \
            [n for n in ("metrics.jsonl", LOCK_FILE) if (path / n).exists()]
    except FileNotFoundError:  # being replaced by the main process (every process checks, one writes)
        held = []
    if not held and (run == real or real in run.parents):
        held = ["the run's output_dir" if run == real else f"the run's output_dir {output_dir}"]
    if held:
        fail("output_dir", f"of save_model, '{path}', holds a training run ({', '.join(held)}): the model is saved "
             f"into a folder of its own, which a later save replaces whole; {suggestion}")
    try:  # one listing decides: the main process may swap the folder between two looks at it
        names = sorted(p.name for p in real.iterdir()) if real.is_dir() and not path.is_symlink() else []
    except FileNotFoundError:  # the same: a folder the main process is swapping holds a model
        names = []
    if names and not any(m in names for m in MODEL_FOLDER_MARKERS):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if before_run:
            fail("output_dir", f"'{output_dir}' has a final/ holding files that are not a saved model ({shown}): "
                 "the run saves its model there at the end, replacing the folder whole; move or delete it, or "
                 "choose another output_dir")
        fail("output_dir", f"of save_model, '{path}', holds files that are not a saved model ({shown}): the "
             f"model's folder is replaced whole by every save; pass a new or empty folder")


def clean_stale_folder(path: str | os.PathLike) -> list[str]:
    """Remove what a killed new_folder_atomically(path) left beside `path` (its temporary copy; the old folder it
    was replacing, put back first when `path` is missing), unless its writer still runs. Returns the names removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    name = re.escape(path.name)
    own = re.compile(rf"^{re.escape(TMP_PREFIX)}(?:{REPLACED_FOLDER})?{name}-\d+-[0-9a-f]{{8}}$")
    removed = []
    for p in sorted(path.parent.iterdir()):
        if own.match(p.name) and not _writer_alive(p.name):
            _put_back(p, path)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _replace_folder(tmp: Path, path: Path, warn) -> None:
    """Put the complete folder `tmp` in the place of the existing `path` (see new_folder_atomically)."""
    new_names = {p.name for p in tmp.iterdir()}
    extra = sorted({p.name for p in path.iterdir()} - new_names) if path.is_dir() and not path.is_symlink() \
        else [path.name]
    if extra:  # kept whole, in plain sight: a kill between the renames leaves it there, never in a temporary folder
        aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        while os.path.lexists(aside):
            aside = aside.with_name(aside.name + "-1")
        os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(aside, path)  # the old folder back where it was (tmp is removed by the caller)
            raise
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        warn(f"alignfast: {path} held {shown}, which the model saved there now does not write: the earlier folder "
             f"is kept whole as {aside} (delete it once nothing in it is needed)")
        return
    _swap(tmp, path, parked=_fresh_dir(path.parent, f"{TMP_PREFIX}{REPLACED_FOLDER}{path.name}-"))


def _swap(tmp: Path, path: Path, *, parked: Path) -> None:
    """Put `tmp` in the place of the existing `path` by two renames: `path` to `parked`/c, then `tmp` to `path`.
    A failed second rename puts the old folder back; a kill between the two leaves it in `parked`, whose name
    (a step's, or REPLACED_FOLDER + the folder's) tells clean_stale where it returns."""
    os.replace(path, parked / "c")
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(parked / "c", path)
        shutil.rmtree(parked, ignore_errors=True)
        raise
    shutil.rmtree(parked, ignore_errors=True)


def _put_back(temp: Path, path: Path) -> None:
    """A folder that was being replaced when its writer died (`temp`/c, `path` missing) returns to `path`."""
    if temp.name.startswith(TMP_PREFIX + REPLACED_FOLDER) and (temp / "c").exists() and not os.path.lexists(path):
        os.replace(temp / "c", path)


def step_of(path: str | os.PathLike) -> int:
    """N of a checkpoint-N folder; -1 for a folder named otherwise (a copy a user renamed)."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else -1


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-<step> folders under output_dir (not yet verified), oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def belongs_to(requested, output_dir: str | os.PathLike) -> bool:
    """Whether a resume request (True: output_dir's latest; or a checkpoint folder) resumes output_dir's own run."""
    if requested is True:
        return True
    return os.path.realpath(Path(requested).parent) == os.path.realpath(output_dir)


def checkpoints_after(requested, output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of output_dir later than `requested`, one of its own (a resume from an earlier step)."""
    if not isinstance(requested, (str, os.PathLike)) or not belongs_to(requested, output_dir):
        return []  # True: the latest, nothing after it
    match = _NAME.match(Path(requested).name)
    if match is None:
        return []
    step = int(match.group(1))
    return [p for p in list_checkpoints(output_dir) if int(_NAME.match(p.name).group(1)) > step]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def verify(path: str | os.PathLike) -> None:
    """Raise CorruptCheckpointError unless every file the manifest lists is there with its size and SHA-256."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(path, "not a folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        raise UnverifiedCheckpoint(path, f"no {MANIFEST} (written by an alignfast without manifests, or "
                                         "damaged)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(path, f"{MANIFEST} is unreadable ({err})") from None
    for rel, meta in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(path, f"{rel} is missing")
        size = f.stat().st_size
        if size != meta.get("size"):
            raise CorruptCheckpointError(path, f"{rel} has {size} bytes, the manifest says {meta.get('size')}")
        digest, _ = _sha256(f)
        if digest != meta.get("sha256"):
            raise CorruptCheckpointError(path, f"{rel} does not match its SHA-256 in the manifest")


def resume_point(output_dir: str | os.PathLike, requested: str | os.PathLike | bool, *, warn=None) -> Path:
    """The checkpoint to resume from: `requested` itself (verified; an error if it is damaged), or with
    requested=True the newest checkpoint of output_dir that verifies, with a warning (`warn(msg)`) naming
    each newer one that does not."""
    if requested is not True:
        path = Path(requested)
        if not path.is_dir():
            raise FileNotFoundError(f"alignfast: checkpoint {path} not found")
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"alignfast: {path} is not a checkpoint (no {STATE_FILE}); pass a "
                                    "checkpoint-<step> folder of the run, or --resume alone for the latest")
        _verify_or_accept_legacy(path, warn)
        return path
    candidates = list_checkpoints(output_dir)
    if not candidates:
        raise FileNotFoundError(f"alignfast: no checkpoint to resume from in {output_dir}")
    skipped = []
    for path in reversed(candidates):
        try:
            _verify_or_accept_legacy(path, warn)
        except CorruptCheckpointError as err:
            skipped.append(err)
            continue
        for err in skipped:
            (warn or _log.warning)(f"alignfast: not resuming from {err.path.name}: {err.reason}; resuming from "
                                   f"{path.name} instead (the damaged checkpoint is not deleted)")
        return path
    raise CorruptCheckpointError(Path(output_dir), "no checkpoint in it passes verification ("
                                 + "; ".join(f"{e.path.name}: {e.reason}" for e in skipped) + ")")


def _verify_or_accept_legacy(path: Path, warn) -> None:
    """verify(path); a checkpoint without a manifest whose trainer_state.json reads is accepted with a warning
    (alignfast wrote no manifests before; a write of this version cannot lose its manifest and keep its name)."""
    try:
        verify(path)
    except UnverifiedCheckpoint as err:
        try:
            json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise CorruptCheckpointError(path, f"no {MANIFEST} and an unreadable {STATE_FILE}") from None
        (warn or _log.warning)(f"alignfast: {path.name} has {err.reason}: resuming from it unverified")


def clean_stale(output_dir: str | os.PathLike) -> list[str]:
    """Remove what killed writers left in output_dir: `.tmp-checkpoint-*` of processes no longer running, and
    `.tmp-sharded-*`, the per-process shards of a sharded checkpoint (FSDP2, ZeRO-3: gigabytes) that were never
    moved into one (at the start of a run nothing of its own is being written). A checkpoint that was being
    replaced when the writer died is put back first, as is a folder new_folder_atomically was replacing (final/).
    Returns the names removed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.glob(TMP_PREFIX + "*")) + sorted(root.glob(".old-checkpoint-*")) + \
            sorted(root.glob(TMP_SHARDS_PREFIX + "*")):
        if _writer_alive(p.name):
            continue
        m = re.match(rf"^{re.escape(TMP_PREFIX)}replaced-(\d+)-", p.name)
        if m and (p / "c").is_dir() and not (root / f"checkpoint-{m.group(1)}").exists():
            os.replace(p / "c", root / f"checkpoint-{m.group(1)}")  # killed between the two renames
        folder = re.match(rf"^{re.escape(TMP_PREFIX)}{REPLACED_FOLDER}(.+)-\d+-[0-9a-f]{{8}}$", p.name)
        if folder:  # final/ (new_folder_atomically) replaced when the writer died
            _put_back(p, root / folder.group(1))
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def load_checkpoint(path: str | os.PathLike, *, map_location=None) -> dict:
    """{'trainable', 'optimizer', 'scheduler', 'rng', 'state'} of a checkpoint directory. A file that cannot be
    read raises CorruptCheckpointError naming it."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"alignfast: {path} is not a complete checkpoint (no {STATE_FILE})")
    out = {}
    for key, name, weights_only in (("trainable", "trainable.pt", True), ("optimizer", "optimizer.pt", True),
                                    ("scheduler", "scheduler.pt", False), ("rng", "rng.pt", False)):
        try:
            out[key] = torch.load(path / name, map_location=None if key == "rng" else map_location,
                                  weights_only=weights_only)
        except FileNotFoundError:
            raise CorruptCheckpointError(path, f"{name} is missing") from None
        except Exception as err:  # noqa: BLE001 - torch.load raises many types on a damaged file
            raise CorruptCheckpointError(path, f"{name} cannot be read ({type(err).__name__}: "
                                               f"{str(err).splitlines()[0] if str(err) else ''})") from None
    try:
        out["state"] = json.loads((path / STATE_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(path, f"{STATE_FILE} is not JSON ({err})") from None
    files = out["trainable"].pop(POLICY_FILES, None)
    if files:
        out["trainable"]["policy"] = {**_read_policy_tensors(path / "policy", files, map_location),
                                      **out["trainable"].get("policy", {})}
    return out


# --- internals -----------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-checkpoint-"
# TMP_PREFIX + REPLACED_FOLDER + <name>-<pid>-<hex>/c: the folder <name> while new_folder_atomically replaces it
REPLACED_FOLDER = "replaced-folder-"
TMP_SHARDS_PREFIX = ".tmp-sharded-"  # + step: accelerate's save_state of every process, before the checkpoint exists
POLICY_FILES = "policy_files"  # trainable.pt key: {parameter name: [file under policy/, tensor key]}
_log = logging.getLogger("alignfast.trainer")


def _fresh_dir(root: Path, prefix: str) -> Path:
    """A new folder root/<prefix><pid>-<random>, created with the process's umask (tempfile.mkdtemp's would be
    0700: unreadable to the other users of a shared machine)."""
    while True:
        p = root / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue


def _writer_alive(name: str) -> bool:
    """Whether the process that named this temporary folder (…-<pid>-<hex>) is still running (a concurrent
    writer's folder is not stale). Names without a pid (older alignfast) are stale."""
    m = re.search(r"-(\d+)-[0-9a-f]{8}$", name)
    if not m:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False  # this process is starting a run: nothing of its own is being written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a checkpoint so that a crash halfway leaves no half-deleted checkpoint-<step>: rename, then delete."""
    doomed = path.parent / f"{TMP_PREFIX}deleted-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _sha256(path: Path, *, fsync: bool = False) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
        size = f.tell()
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    files = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in sorted(names):
            f = Path(dirpath) / name
            digest, size = _sha256(f, fsync=True)
            files[f.relative_to(folder).as_posix()] = {"size": size, "sha256": digest}
        _fsync_dir(Path(dirpath))
    with open(folder / MANIFEST, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _name_candidates(name: str) -> list[str]:
    """Keys under which save_pretrained may store parameter `name`: as is, or (PEFT) without the adapter name."""
    out = [name]
    stripped = re.sub(r"\.default(?=\.)", "", name)
    if stripped != name:
        out.append(stripped)
    return out


def _split_policy(params: dict, policy_dir: Path) -> tuple[dict, dict]:
    """(params policy/ does not hold bit for bit, {name: [file, key]} for those it does). Each match is checked
    by value, so a format that renames or converts a tensor only costs the second copy, never a wrong resume."""
    try:
        from safetensors import safe_open
    except ImportError:
        return params, {}
    index: dict[str, str] = {}
    for f in sorted(policy_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                index.setdefault(k, f.name)
    kept, files = {}, {}
    handles = {}
    try:
        for name, value in params.items():
            match = None
            for key in _name_candidates(name):
                fname = index.get(key)
                if fname is None:
                    continue
                st = handles.get(fname) or handles.setdefault(fname, safe_open(str(policy_dir / fname),
                                                                               framework="pt"))
                stored = st.get_tensor(key)
                if stored.dtype == value.dtype and stored.shape == value.shape and \
                        torch.equal(stored, value.detach().to("cpu")):
                    match = [fname, key]
                    break
            if match is None:
                kept[name] = value
            else:
                files[name] = match
    finally:
        handles.clear()
    return kept, files


def _read_policy_tensors(policy_dir: Path, files: dict, map_location) -> dict:
    from safetensors import safe_open

    out = {}
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (fname, key) in files.items():
        by_file.setdefault(fname, []).append((name, key))
    for fname, entries in by_file.items():
        try:
            with safe_open(str(policy_dir / fname), framework="pt") as st:
                for name, key in entries:
                    t = st.get_tensor(key)
                    out[name] = t.to(map_location) if map_location is not None else t
        except Exception as err:  # noqa: BLE001 - a damaged or missing safetensors file
            raise CorruptCheckpointError(policy_dir.parent, f"policy/{fname} cannot be read ({err})") from None
    return out


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def absolute_adapter_base(folder: str | os.PathLike) -> None:
    """A LoRA adapter saved in `folder` names its base model in adapter_config.json as it was given: a local folder
    given relative to the working directory (`--init models/policy`) then loads only from that directory. Such a
    path is made absolute; a hub name, or a path that is no folder here, stays as it is."""
    config = Path(folder) / "adapter_config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    base = data.get("base_model_name_or_path")
    if not isinstance(base, str) or not base or os.path.isabs(base) or not Path(base).expanduser().is_dir():
        return
    data["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
