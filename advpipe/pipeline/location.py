"""Reading a mask store's objects safely, wherever it lives: a directory, a zip file, either behind any fsspec URL.

A :class:`StoreReader` picks one backend (:class:`LocalBackend`, :class:`UrlBackend` or
:class:`~advpipe.pipeline.zipstore.ZipBackend`) and opens the zarr group read-only through a guard
store that refuses unsafe keys (``..``, absolute paths), objects that are symlinks pointing out of
a local store, objects larger than the format allows, zip members that declare a huge size, and
missing chunks of a complete store. The guard also checks every object it reads against the
store's manifest, pinned by the consumer or not (see :mod:`advpipe.pipeline.manifest`). Everything
is refused before the object's bytes are read or allocated, except that a remote object (and its
hash) is checked once fetched.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import zarr
from zarr.storage import FsspecStore, LocalStore

from advpipe.errors import AdvpipeError, CannotRead, DamagedStore, StoreUnreachable
from advpipe.pipeline import manifest as manifests
from advpipe.pipeline.codecs import quiet_zarr
from advpipe.pipeline.guard import Backend, GuardStore
from advpipe.pipeline.manifest import MAX_OBJECTS, UNLISTED, ContentMismatch, Manifest, check_key, size_limit
from advpipe.pipeline.remote import (
    error_line,
    filesystem,
    is_invalid_range,
    is_network_error,
    is_url,
    pin_location,
    read_error,
    split_pin,
)
from advpipe.pipeline.zipstore import ZipBackend

__all__ = ["BATCH_OBJECTS", "LocalBackend", "Location", "StoreReader", "UrlBackend", "write_manifest"]

BATCH_OBJECTS = 32  # concurrent requests per batch of a remote read or upload
_BATCH_BYTES = 64 << 20


class LocalBackend(Backend):
    """A directory store: plain files only, each ``lstat``ed before it is opened."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self._real_root = os.path.realpath(root)

    def name(self, key: str) -> str:
        return os.path.join(self.root, key)

    def check_object(self, key: str) -> os.stat_result | None:
        """Refuse an object that is a symlink, not a plain file, or too large (None: absent).

        Checked with ``lstat`` before anything opens it, so a FIFO, a device or a link to
        ``/dev/zero`` or ``/etc/passwd`` is refused without a read (or a wait).
        """
        full = os.path.join(self.root, key)
        try:
            info = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise CannotRead(f"cannot read {self.name(key)}: {exc.strerror or exc}") from exc
        parent = os.path.realpath(os.path.dirname(full))
        if parent != self._real_root and not parent.startswith(self._real_root + os.sep):
            raise AdvpipeError(f"mask store {self.root}: object {key} lies under a symlinked directory "
                               f"(to {parent}); refusing to read it")
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(full)
            where = ("pointing out of the store" if not real.startswith(self._real_root + os.sep)
                     else "inside the store")
            raise AdvpipeError(f"mask store {self.root}: object {key} is a symlink {where} (to {real}); refusing "
                               f"to read it (a store holds plain files only)")
        if not stat.S_ISREG(info.st_mode):
            raise AdvpipeError(f"mask store {self.root}: object {key} is not a plain file (a FIFO, device or "
                               f"socket); refusing to read it")
        if info.st_size > size_limit(key):
            raise AdvpipeError(f"mask store {self.root}: object {key} is {info.st_size} bytes (limit {size_limit(key)})")
        return info

    def read(self, key: str, limit: int) -> bytes | None:
        if self.check_object(key) is None:
            return None
        try:
            fd = os.open(os.path.join(self.root, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise CannotRead(f"cannot read {self.name(key)}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())  # the file opened, not a name swapped in after the check
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                raise AdvpipeError(f"mask store {self.root}: object {key} is not a plain file of at most {limit} bytes")
            return fh.read(info.st_size + 1)

    def exists(self, key: str) -> bool:
        return self.check_object(key) is not None

    def list(self) -> dict[str, int]:
        """Every object, refusing symlinked directories and any object :meth:`check_object` refuses.

        Not zarr's ``LocalStore.list``: it skips FIFOs, devices, dangling links and symlinked
        directories without a word, where a store from elsewhere must be refused for them.
        """
        out: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames:
                if os.path.islink(os.path.join(dirpath, name)):
                    rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                    raise AdvpipeError(f"mask store {self.root}: {rel} is a symlink to a directory; refusing it")
            for name in filenames:
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                info = self.check_object(key)
                if info is not None:
                    out[key] = info.st_size
                if len(out) > MAX_OBJECTS + len(UNLISTED):  # stop walking a hostile tree early
                    return out
        return out

    def zarr_store(self) -> Any:
        return LocalStore(self.root, read_only=True)

    async def get(self, store: Any, key: str, prototype: Any, byte_range: Any) -> Any:
        if byte_range is not None:
            return await store.get(key, prototype, byte_range)
        data = self.read(key, size_limit(key))  # lstat first: no symlink, FIFO or device is ever opened
        return None if data is None else prototype.buffer.from_bytes(data)


class UrlBackend(Backend):
    """A directory store behind an fsspec URL: ranged reads of at most the size limit, batched concurrent reads."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None) -> None:
        super().__init__(root)
        self.storage_options = storage_options
        self.can_list = not root.startswith(("http://", "https://"))
        self._fs: tuple[Any, str] | None = None

    def fs(self) -> tuple[Any, str]:
        """The (synchronous fsspec filesystem, path) of the URL."""
        if self._fs is None:
            self._fs = filesystem(self.root, self.storage_options)
        return self._fs

    def _path(self, key: str) -> str:
        return f"{self.fs()[1].rstrip('/')}/{key}"

    def open_file(self) -> Any:
        """The URL as one random-access file (a single-file store), read by range requests."""
        fs, path = self.fs()
        # A CIFAR chunk member is tens of KB, so 1 MiB blocks.
        return fs.open(path, "rb", block_size=1 << 20, cache_type="readahead")

    def read(self, key: str, limit: int) -> bytes | None:
        fs, _ = self.fs()
        try:
            try:
                return fs.cat_file(self._path(key), start=0, end=limit + 1)
            except Exception as exc:  # noqa: BLE001 - S3 and HTTP refuse a ranged read of an empty object
                if not is_invalid_range(exc):
                    raise
                return fs.cat_file(self._path(key))
        except FileNotFoundError as exc:
            self.missing = error_line(exc, self.root)
            return None
        except Exception as exc:  # every fsspec backend raises its own types
            raise read_error(self.name(key), exc, self.root) from exc

    def read_many(self, keys: list[str], sizes: dict[str, int]) -> Iterator[tuple[str, bytes | None]]:
        fs, _ = self.fs()
        for batch in _batches(keys, sizes):
            paths = {self._path(key): key for key in batch}
            try:
                got = fs.cat(list(paths), on_error="return")
            except Exception as exc:  # noqa: BLE001 - one line for any backend's failure
                raise read_error(self.root, exc, self.root) from exc
            for path, key in paths.items():
                value = got.get(path, FileNotFoundError(path)) if isinstance(got, dict) else got
                if isinstance(value, FileNotFoundError):
                    yield key, None
                elif isinstance(value, BaseException):
                    raise read_error(self.name(key), value, self.root)
                else:
                    yield key, value

    def exists(self, key: str) -> bool:
        fs, _ = self.fs()
        try:
            # Not fs.exists: fsspec's HTTP filesystem answers False on a timeout, which would read as "missing".
            fs.info(self._path(key))
            return True
        except FileNotFoundError as exc:
            cause = exc.__cause__
            if cause is not None and is_network_error(cause):
                raise read_error(self.name(key), cause, self.root) from exc
            return False
        except Exception as exc:  # noqa: BLE001
            raise read_error(self.name(key), exc, self.root) from exc

    def list(self) -> dict[str, int]:
        fs, path = self.fs()
        try:
            found = fs.find(path, detail=True)
        except Exception as exc:  # noqa: BLE001
            raise AdvpipeError(f"cannot list {self.root}: {error_line(exc, self.root)}") from exc
        prefix = path.rstrip("/") + "/"
        return {name[len(prefix):]: int(info.get("size") or 0) for name, info in found.items()
                if info.get("type", "file") == "file" and name.startswith(prefix)}

    def zarr_store(self) -> Any:
        fs, path = filesystem(self.root, self.storage_options, asynchronous=True)
        if not fs.async_impl:
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs = AsyncFileSystemWrapper(fs, asynchronous=True)
        return FsspecStore(fs, path=path, read_only=True)

    async def get(self, store: Any, key: str, prototype: Any, byte_range: Any) -> Any:
        if byte_range is None:
            from zarr.abc.store import RangeByteRequest

            try:  # never more than the format allows, whatever the server would send
                return await store.get(key, prototype, RangeByteRequest(0, size_limit(key) + 1))
            except Exception as exc:  # noqa: BLE001 - S3 and HTTP refuse a ranged read of an empty object
                if not is_invalid_range(exc):
                    raise
        return await store.get(key, prototype, byte_range)


class StoreReader:
    """Safe access to a store's objects (local directory, local zip, or either behind a URL) through one backend."""

    def __init__(self, location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 digest: str | None = None) -> None:
        """Parse ``location`` (``PATH``, ``URL`` or either with ``#sha256=HEX``); ``digest`` pins it too."""
        base, self.pin = split_pin(pin_location(os.fspath(location), digest))
        self.is_url = is_url(base)
        self.storage_options = storage_options
        self.root = base.rstrip("/") if self.is_url else str(Path(base.removeprefix("file://")).absolute())
        self.is_zip = self.root.lower().endswith(".zip") or (
            not self.is_url and os.path.isfile(self.root) and zipfile.is_zipfile(self.root))
        self.manifest: Manifest | None = None
        self.wrapper: GuardStore | None = None
        url = UrlBackend(self.root, storage_options) if self.is_url else None
        if self.is_zip:
            root = self.root
            self.backend: Backend = ZipBackend(root, url.open_file if url else lambda: open(root, "rb"))
        else:
            self.backend = url or LocalBackend(self.root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}{', zip' if self.is_zip else ''})"

    @property
    def can_list(self) -> bool:
        """Whether the store's objects can be listed (plain HTTP cannot)."""
        return self.backend.can_list

    @property
    def missing(self) -> str | None:
        """Why the last remote read found nothing (a missing bucket, key, ...)."""
        return self.backend.missing

    def name(self, key: str) -> str:
        """A human-readable name of object ``key`` (a file path for local directories)."""
        return self.backend.name(key)

    def fs(self) -> tuple[Any, str]:
        """The (synchronous fsspec filesystem, path) of a URL store."""
        if not isinstance(self.backend, UrlBackend):
            raise AdvpipeError(f"{self.root} is not a directory store behind a URL")
        return self.backend.fs()

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        """Return object ``key``'s bytes, or None if it does not exist; refuses unsafe or oversized objects."""
        check_key(key, f"mask store {self.root}")
        limit = size_limit(key) if limit is None else limit
        data = self.backend.read(key, limit)
        if data is not None and len(data) > limit:
            raise AdvpipeError(f"mask store {self.root}: object {key} is over {limit} bytes")
        return data

    def read_many(self, keys: Iterable[str], sizes: dict[str, int] | None = None) -> Iterator[tuple[str, bytes | None]]:
        """Yield (key, bytes or None if missing) for ``keys``; remote objects are fetched concurrently in batches."""
        keys = [check_key(key, f"mask store {self.root}") for key in keys]
        for key, data in self.backend.read_many(keys, sizes or {}):
            if data is not None and len(data) > size_limit(key):
                raise AdvpipeError(f"mask store {self.root}: object {key} is over {size_limit(key)} bytes")
            yield key, data

    def exists(self, key: str) -> bool:
        """Whether object ``key`` exists."""
        return self.backend.exists(check_key(key, f"mask store {self.root}"))

    def list_objects(self) -> dict[str, int]:
        """Return every object key -> size; only where :attr:`can_list` (plain HTTP has no listing)."""
        if not self.can_list:
            raise CannotRead(f"cannot list the objects of {self.root}: its protocol has no listing")
        listing = self.backend.list()
        if len(listing) > MAX_OBJECTS + len(UNLISTED):
            raise AdvpipeError(f"mask store {self.root} has over {MAX_OBJECTS} objects")
        for key in listing:
            check_key(key, f"mask store {self.root}")
        return listing

    def load_manifest(self) -> Manifest | None:
        """Read and validate the store's manifest (refused unless its digest is the pinned one, if pinned)."""
        self.manifest = manifests.load_manifest(self)
        return self.manifest

    def compute_manifest(self) -> Manifest:
        """Hash every object of the store into a fresh manifest."""
        return manifests.compute_manifest(self)

    def manifest_problems(self) -> list[str]:
        """Compare the store's objects with its manifest: missing, extra, resized and changed objects."""
        return manifests.manifest_problems(self, self.manifest)

    def open_group(self, check_manifest: bool = True) -> zarr.Group:
        """Load the manifest, then open the zarr group read-only through the guard store.

        The guard checks every object against the manifest; ``check_manifest=False`` only against a pinned one.
        """
        if self.storage_options and not self.is_url:
            raise AdvpipeError("storage_options only apply to URLs")
        try:
            self.load_manifest()
            self.wrapper = GuardStore(self.backend.zarr_store(), self.backend, self.manifest)
            self.wrapper.check_manifest = check_manifest
            with quiet_zarr():
                return zarr.open_group(self.wrapper, mode="r", zarr_format=3)
        except AdvpipeError:
            raise
        except ContentMismatch as exc:
            raise DamagedStore(f"mask store {self.root}: {exc}") from exc
        except Exception as exc:  # zarr, fsspec and aiohttp each raise their own types here
            why = error_line(exc, self.root)
            if isinstance(exc, FileNotFoundError) and self.missing:
                why = self.missing
            kind = StoreUnreachable if is_network_error(exc) else CannotRead
            raise kind(f"cannot open mask store {self.root}: {why}") from exc


#: deprecated alias of :class:`StoreReader` (it reads a store, it is not a place); kept for one release
Location = StoreReader


def _batches(keys: list[str], sizes: dict[str, int]) -> Iterator[list[str]]:
    batch: list[str] = []
    total = 0
    for key in keys:
        if batch and (len(batch) >= BATCH_OBJECTS or total + sizes.get(key, 0) > _BATCH_BYTES):
            yield batch
            batch, total = [], 0
        batch.append(key)
        total += sizes.get(key, 0)
    if batch:
        yield batch


def write_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Hash every object of the local directory store at ``path`` and write its manifest there (atomically)."""
    return manifests.write_manifest_of(StoreReader(path))
