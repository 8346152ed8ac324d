"""Single-file mask stores: a zip over a local file or a random-access remote one, members checked first.

A zip from another team is untrusted: before any member is read, every member must have a safe
name (no ``..``, no absolute path), not be a symlink, appear once, and declare an uncompressed size
within the format's limits, so a zip bomb is refused from its central directory alone. The archive
is opened once, from a file object (a local file, or an fsspec file that reads by range requests),
as fsspec's ``ZipFileSystem``; the checks read its ``ZipFile``, and zarr reads the same archive
through its public ``FsspecStore``, so no member can change between the check and the read.
"""

from __future__ import annotations

import stat
import zipfile
from typing import Any, Callable

from advpipe.errors import AdvpipeError, CannotRead
from advpipe.pipeline.guard import Backend
from advpipe.pipeline.manifest import MANIFEST_KEY, MAX_MANIFEST_BYTES, MAX_OBJECTS, UNLISTED, check_key, size_limit
from advpipe.pipeline.remote import error_line, read_error

__all__ = ["ZipBackend", "check_zip"]


class ZipBackend(Backend):
    """The members of the zip named ``root`` (a path or URL, for messages), read from the file ``source()`` opens."""

    def __init__(self, root: str, source: Callable[[], Any]) -> None:
        super().__init__(root)
        self._source = source
        self._archive: Any = None
        self._sizes: dict[str, int] = {}

    def archive(self) -> Any:
        """The opened, checked archive (fsspec's ``ZipFileSystem``); opened on first use."""
        if self._archive is None:
            from fsspec.implementations.zip import ZipFileSystem

            try:
                archive = ZipFileSystem(self._source())
            except AdvpipeError:
                raise
            except zipfile.BadZipFile as exc:
                raise CannotRead(f"cannot open mask store {self.root}: not a zip file ({exc})") from exc
            except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types
                raise CannotRead(f"cannot open mask store {self.root}: {error_line(exc, self.root)}") from exc
            self._sizes = check_zip(archive.zip, self.root)
            self._archive = archive
        return self._archive

    def read(self, key: str, limit: int) -> bytes | None:
        archive = self.archive()
        if key not in self._sizes:
            return None
        try:  # the member's declared size was checked at open, and zipfile reads no more than it declares
            return archive.cat_file(key)
        except Exception as exc:  # noqa: BLE001 - bad CRC, truncated archive, remote failure
            raise read_error(self.name(key), exc, self.root) from exc

    def exists(self, key: str) -> bool:
        self.archive()
        return key in self._sizes

    def list(self) -> dict[str, int]:
        self.archive()
        return dict(self._sizes)

    def zarr_store(self) -> Any:
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
        from zarr.storage import FsspecStore

        return FsspecStore(AsyncFileSystemWrapper(self.archive(), asynchronous=True), path="", read_only=True)


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
