"""Single-file mask stores: zarr's ZipStore over a local file or a random-access remote one, members checked first.

A zip from another team is untrusted: before any member is read, every member must have a safe
name (no ``..``, no absolute path), not be a symlink, appear once, and declare an uncompressed size
within the format's limits, so a zip bomb is refused from its central directory alone.
"""

from __future__ import annotations

import stat
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

from zarr.storage import ZipStore

from advpipe.errors import AdvpipeError, CannotRead
from advpipe.pipeline.manifest import MANIFEST_KEY, MAX_MANIFEST_BYTES, MAX_OBJECTS, UNLISTED, check_key, size_limit
from advpipe.pipeline.remote import error_line, read_error


class ZipReader(ZipStore):
    """zarr's ZipStore, read-only, over what ``source()`` opens (a path or a seekable file), members checked first."""

    def __init__(self, where: str, source: Callable[[], Any]) -> None:
        """Read the zip named ``where`` (a path or URL, for messages) from ``source()``."""
        super().__init__(Path(where if "://" not in where else "remote.zip"), mode="r")
        self.where, self._source = where, source

    def _sync_open(self) -> None:
        if self._is_open:
            return
        self._lock = threading.RLock()
        try:
            self._zf = zipfile.ZipFile(self._source())
        except AdvpipeError:
            raise
        except zipfile.BadZipFile as exc:
            raise CannotRead(f"cannot open mask store {self.where}: not a zip file ({exc})") from exc
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types
            raise CannotRead(f"cannot open mask store {self.where}: {error_line(exc, self.where)}") from exc
        self._sizes = check_zip(self._zf, self.where)
        self._is_open = True

    def sizes(self) -> dict[str, int]:
        """Member name -> uncompressed size."""
        return dict(self._sizes)

    def member_size(self, key: str) -> int | None:
        """The declared size of member ``key`` (None if absent)."""
        return self._sizes.get(key)

    def member(self, key: str) -> bytes | None:
        """Member ``key``'s bytes (its declared size was checked at open), or None if absent."""
        if key not in self._sizes:
            return None
        try:
            with self._lock, self._zf.open(key) as fh:
                return fh.read()
        except Exception as exc:  # noqa: BLE001 - bad CRC, truncated archive, remote failure
            raise read_error(f"{self.where}/{key}", exc, self.where) from exc


def check_zip(zf: zipfile.ZipFile, where: str) -> dict[str, int]:
    """Refuse a zip whose members are too many, unsafe, symlinks, duplicated or declare a huge size."""
    infos = zf.infolist()
    if len(infos) > MAX_OBJECTS + len(UNLISTED):
        raise AdvpipeError(f"mask store {where}: the zip has {len(infos)} members (limit {MAX_OBJECTS})")
    sizes: dict[str, int] = {}
    for info in infos:
        if info.is_dir():
            continue
        key = check_key(info.filename, f"mask store {where}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise AdvpipeError(f"mask store {where}: zip member {key} is a symlink; refusing it")
        limit = MAX_MANIFEST_BYTES if key == MANIFEST_KEY else size_limit(key)
        if info.file_size > limit:
            raise AdvpipeError(f"mask store {where}: zip member {key} declares {info.file_size} bytes uncompressed "
                               f"(limit {limit}); refusing it before reading")
        if key in sizes:
            raise AdvpipeError(f"mask store {where}: zip member {key} appears twice")
        sizes[key] = info.file_size
    return sizes
