"""The single-writer lock of a mask store: a JSON lock file with pid, host and time, taken over when stale."""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from advpipe.errors import AdvpipeError

log = logging.getLogger(__name__)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(info: dict[str, Any]) -> bool:
    # Only a lock from this host can be judged: a pid on another machine means nothing here.
    pid = info.get("pid")
    if info.get("hostname") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool):
        return False
    return not _pid_alive(pid)


class StoreLock:
    """An acquired lock file; :meth:`release` removes it only if it is still ours."""

    def __init__(self, path: Path, token: str) -> None:
        """Wrap an already acquired lock (use :meth:`acquire`)."""
        self.path = path
        self.token = token

    @classmethod
    def acquire(cls, path: Path, *, what: str) -> "StoreLock":
        """Create the lock file at ``path`` or raise AdvpipeError naming the live holder; stale locks are taken over."""
        token = uuid.uuid4().hex
        info = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": token,
        }
        tmp = path.with_name(f"{path.name}.{token}.tmp")
        tmp.write_text(json.dumps(info))
        try:
            for _ in range(5):
                try:
                    # link() fails if the target exists, so the lock appears whole or not at all.
                    os.link(tmp, path)
                    return cls(path, token)
                except FileExistsError:
                    pass
                holder = _read(path)
                if holder is None:
                    continue  # released between our two calls
                if not holder:
                    raise AdvpipeError(f"the lock file {path} of {what} is unreadable; delete it if no writer is running")
                if not _is_stale(holder):
                    raise AdvpipeError(
                        f"{what} is already being written by pid {holder.get('pid')} on host "
                        f"{holder.get('hostname')} since {holder.get('time')} (lock file {path}); wait for it, "
                        "or delete the lock file if that process is gone"
                    )
                cls._break_stale(path, holder, token)
            raise AdvpipeError(f"could not take the lock {path}: other writers keep racing for it")
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _break_stale(path: Path, holder: dict[str, Any], token: str) -> None:
        # Renaming claims the file atomically; if what we moved is no longer the stale lock we judged
        # (another writer took it over first), put it back and give up.
        claimed = path.with_name(f"{path.name}.{token}.stale")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return
        if _read(claimed) != holder:
            try:
                os.link(claimed, path)
            except FileExistsError:
                pass
            claimed.unlink(missing_ok=True)
            raise AdvpipeError(f"another writer took over the stale lock {path} first")
        claimed.unlink(missing_ok=True)
        log.warning("took over stale lock %s of dead pid %s on %s", path, holder.get("pid"), holder.get("hostname"))

    def held(self) -> bool:
        """Return whether the lock file still exists and carries our token."""
        return (_read(self.path) or {}).get("token") == self.token

    def release(self) -> None:
        """Remove the lock file if it is still ours (never someone else's)."""
        try:
            if self.held():
                self.path.unlink(missing_ok=True)
        except OSError as exc:  # e.g. the filesystem went read-only: the lock goes stale and is taken over later
            log.warning("could not remove lock %s: %s", self.path, exc.strerror or exc)
