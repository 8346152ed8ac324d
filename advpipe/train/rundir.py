"""The run folder: checks before a run starts, ``--overwrite`` built aside, disk errors as one line, metrics on resume.

``--overwrite`` never deletes the old run first: the new run is written into a hidden sibling
folder (``.<name>.new-<pid>``) and replaces the old one only once its first checkpoint is saved, by
an atomic exchange of the two folders (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two
renames, between which the old run waits in ``.<name>.old-<pid>``). Where the folder's parent is
read-only, the staging folder is ``<name>/.new-<pid>`` and the files move one by one. A run that
fails before that, or is killed, leaves the old run as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from advpipe.errors import AdvpipeError
from advpipe.files import atomic_write_text, check_writable_dir

log = logging.getLogger(__name__)

#: the files a run writes; ``--overwrite`` replaces these and carries every other file across
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml")


class RunFolder:
    """Where a run writes now: its folder, or (overwriting an old run) the staging folder until :meth:`commit`."""

    def __init__(self, final: Path, staging: Path | None = None) -> None:
        """``final`` is the run folder; ``staging`` the folder the new run is built in, if any."""
        self.final, self.staging = final, staging

    @property
    def path(self) -> Path:
        """The folder to write the run's files to."""
        return self.staging or self.final

    def commit(self) -> None:
        """Put the staged run in place of the old one (after its first checkpoint); a no-op otherwise."""
        if self.staging is None:
            return
        real = Path(os.path.realpath(self.final))  # a symlinked run folder: replace what it points at
        staging, self.staging = self.staging, None  # from here on, a failure keeps what it has not moved
        if staging.parent == real:  # staged inside the run folder (its parent is read-only): file by file
            with disk_errors(f"replacing the old run in {str(self.final)!r}"):
                for name in RUN_FILES:
                    if (staging / name).exists():
                        os.replace(staging / name, real / name)
                    else:
                        (real / name).unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            return
        with disk_errors(f"replacing the old run in {str(self.final)!r}"):
            old = _exchange(staging, real)
        with disk_errors(f"moving your files from the old run {str(old)!r} to {str(self.final)!r}"):
            for entry in old.iterdir():  # notes, eval outputs, ...: everything that is not the run's own
                if entry.name not in RUN_FILES and not _is_temp(entry.name) and not (real / entry.name).exists():
                    os.replace(entry, real / entry.name)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """Remove a staged run that failed; the old run stays as it was."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run without ``--overwrite``, or to resume one that is not there."""
    last = run_dir / "last.pt"
    try:
        has_run = last.is_file()
    except OSError as exc:  # a path component over 255 bytes, a loop of symlinks, ...
        raise AdvpipeError(f"cannot use out folder {str(run_dir)!r}: {exc.strerror or exc}", fields=("out",)) from exc
    if resume and not has_run:
        raise AdvpipeError(f"resume: no checkpoint {last} to continue from", fields=("resume",))
    if not resume and not overwrite and has_run:
        raise AdvpipeError(f"{run_dir} already holds a run; pass resume to continue it or overwrite to start over",
                           fields=("resume", "overwrite"))


def open_run_folder(run_dir: Path, *, overwrite: bool) -> RunFolder:
    """Create the run folder; with ``overwrite`` over an existing run, a staging folder beside it."""
    check_writable_dir(run_dir, "--out folder")
    if not overwrite or not any((run_dir / name).exists() for name in RUN_FILES):
        return RunFolder(run_dir)
    real = Path(os.path.realpath(run_dir))
    _remove_stale(real.parent, f".{real.name[:200]}.new-")
    _remove_stale(real, ".new-")
    try:
        return RunFolder(run_dir, _fresh_dir(real.parent / f".{real.name[:200]}.new-{os.getpid()}"))
    except AdvpipeError:  # a read-only parent: stage inside the run folder
        return RunFolder(run_dir, _fresh_dir(real / f".new-{os.getpid()}"))


def _remove_stale(folder: Path, prefix: str) -> None:
    """Remove staging folders ``<prefix><pid>`` in ``folder`` whose process is gone (a killed --overwrite)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(prefix):]
        if not (entry.name.startswith(prefix) and pid.isdigit()) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (PermissionError, OverflowError):  # alive under another user, or not a pid
            pass


def _fresh_dir(path: Path) -> Path:
    """An empty, writable folder at ``path`` (one left by a killed run with this pid is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    return check_writable_dir(path, "staging folder for --overwrite")


@contextlib.contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn an OSError (a full disk, a file size limit, a read-only folder) into one AdvpipeError line."""
    try:
        yield
    except OSError as exc:
        hint = ("; the checkpoints saved before stay as they were: free space and run the command again "
                "(with --resume where last.pt exists)") \
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise AdvpipeError(f"{what} failed: {exc.strerror or exc}{hint}") from exc


def trim_metrics(path: Path, epochs_done: int) -> None:
    """Keep the metric lines up to the checkpoint a run resumes from (later ones belong to lost work).

    A broken last line (a kill in the middle of its write) is dropped; a broken line before it means
    the file was edited or damaged, and is refused.
    """
    if not path.is_file():
        return
    with disk_errors(f"reading {path}"):
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    keep = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            epoch = entry.get("epoch", 0) if isinstance(entry, dict) else None
        except json.JSONDecodeError:
            epoch = None
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            if number == len(lines):
                log.warning("%s: dropping the broken last line (an interrupted write)", path)
                continue
            raise AdvpipeError(f"{path} line {number} is not a metrics record; fix or remove it before resume",
                               fields=("resume",))
        if epoch <= epochs_done:
            keep.append(line)
    with disk_errors(f"writing {path}"):
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _is_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file of an atomic write or a write probe."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".write-probe-"))


def _exchange(new: Path, old: Path) -> Path:
    """Swap folders ``new`` and ``old``; return where the old folder is now."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) == 0:
            return new
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(old))
    trash = old.parent / f".{old.name[:200]}.old-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(old, trash)  # a kill between these two renames leaves the old run in trash, never nothing
    os.replace(new, old)
    return trash
