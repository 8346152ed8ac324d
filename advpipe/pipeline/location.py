"""Where a mask store lives, and reading its objects safely: a directory, a zip file, either behind any fsspec URL.

A :class:`Location` opens the zarr group read-only through a guard store that refuses unsafe keys
(``..``, absolute paths), objects that are symlinks pointing out of a local store, objects larger
than the format allows, zip members that declare a huge size, and missing chunks of a complete
store. The guard also checks every object it reads against the store's manifest, pinned by the
consumer or not (see :mod:`advpipe.pipeline.manifest`). Everything is refused before the object's
bytes are read or allocated, except that a remote object (and its hash) is checked once fetched.
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
from advpipe.pipeline.codecs import quiet_zarr
from advpipe.pipeline.guard import GuardStore
from advpipe.pipeline.manifest import (
    MANIFEST_KEY,
    MAX_MANIFEST_BYTES,
    MAX_OBJECTS,
    UNLISTED,
    ContentMismatch,
    Manifest,
    build_manifest,
    check_key,
    parse_manifest,
    sha256_hex,
    size_limit,
)
from advpipe.pipeline.remote import error_line, filesystem, is_network_error, is_url, pin_location, read_error, split_pin
from advpipe.pipeline.zipstore import ZipReader
from advpipe.files import atomic_write_bytes

BATCH_OBJECTS = 32  # concurrent requests per batch of a remote read or upload
_BATCH_BYTES = 64 << 20


class Location:
    """A store's place (local directory, local zip, or either behind a URL) and safe access to its objects."""

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
        self._real_root = os.path.realpath(self.root) if not self.is_url else ""
        self._fs: tuple[Any, str] | None = None
        self._zip: ZipReader | None = None
        self.missing: str | None = None  # why the last remote read found nothing (a missing bucket, key, ...)

    def __repr__(self) -> str:
        return f"Location({self.root!r}{', zip' if self.is_zip else ''})"

    def name(self, key: str) -> str:
        """A human-readable name of object ``key`` (a file path for local directories)."""
        return os.path.join(self.root, key) if not (self.is_url or self.is_zip) else f"{self.root}/{key}"

    # -- raw object access -------------------------------------------------------------------
    def fs(self) -> tuple[Any, str]:
        """The (synchronous fsspec filesystem, path) of a URL."""
        if self._fs is None:
            self._fs = filesystem(self.root, self.storage_options)
        return self._fs

    def _remote_path(self, key: str) -> str:
        return f"{self.fs()[1].rstrip('/')}/{key}"

    def zip_reader(self) -> ZipReader:
        """The checked zip archive of a single-file store."""
        if self._zip is None:
            self._zip = ZipReader(self.root, self._zip_source)
            self._zip._sync_open()
        return self._zip

    def _zip_source(self) -> Any:
        if not self.is_url:
            return self.root
        fs, path = self.fs()
        # Random access by range requests; a CIFAR chunk member is tens of KB, so 1 MiB blocks.
        return fs.open(path, "rb", block_size=1 << 20, cache_type="readahead")

    def check_local_object(self, key: str) -> os.stat_result | None:
        """Refuse an object of a local directory that is a symlink, not a plain file, or too large (None: absent).

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

    def _read_local(self, key: str, limit: int) -> bytes | None:
        if self.check_local_object(key) is None:
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

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        """Return object ``key``'s bytes, or None if it does not exist; refuses unsafe or oversized objects."""
        check_key(key, f"mask store {self.root}")
        limit = size_limit(key) if limit is None else limit
        if self.is_zip:
            return self.zip_reader().member(key)
        if not self.is_url:
            data = self._read_local(key, limit)
            if data is None:
                return None
        else:
            fs, _ = self.fs()
            try:
                try:
                    data = fs.cat_file(self._remote_path(key), start=0, end=limit + 1)
                except OSError as exc:  # a ranged read of an empty object is refused by S3
                    if "InvalidRange" not in str(exc) and "416" not in str(exc):
                        raise
                    data = fs.cat_file(self._remote_path(key))
            except FileNotFoundError as exc:
                self.missing = error_line(exc, self.root)
                return None
            except Exception as exc:  # every fsspec backend raises its own types
                raise read_error(self.name(key), exc, self.root) from exc
        if len(data) > limit:
            raise AdvpipeError(f"mask store {self.root}: object {key} is over {limit} bytes")
        return data

    def read_many(self, keys: Iterable[str], sizes: dict[str, int] | None = None) -> Iterator[tuple[str, bytes | None]]:
        """Yield (key, bytes or None if missing) for ``keys``; remote objects are fetched concurrently in batches."""
        keys = list(keys)
        if not self.is_url or self.is_zip:
            for key in keys:
                yield key, self.read(key)
            return
        fs, _ = self.fs()
        for batch in _batches(keys, sizes or {}):
            for key in batch:
                check_key(key, f"mask store {self.root}")
            paths = {self._remote_path(key): key for key in batch}
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
                    if len(value) > size_limit(key):
                        raise AdvpipeError(f"mask store {self.root}: object {key} is over {size_limit(key)} bytes")
                    yield key, value

    def exists(self, key: str) -> bool:
        """Whether object ``key`` exists."""
        if self.is_zip:
            return self.zip_reader().member_size(key) is not None
        if not self.is_url:
            return self.check_local_object(key) is not None
        fs, _ = self.fs()
        try:
            # Not fs.exists: fsspec's HTTP filesystem answers False on a timeout, which would read as "missing".
            fs.info(self._remote_path(key))
            return True
        except FileNotFoundError as exc:
            cause = exc.__cause__
            if cause is not None and is_network_error(cause):
                raise read_error(self.name(key), cause, self.root) from exc
            return False
        except Exception as exc:  # noqa: BLE001
            raise read_error(self.name(key), exc, self.root) from exc

    def list_objects(self) -> dict[str, int] | None:
        """Return every object key -> size (None where the protocol cannot list, as plain HTTP)."""
        if self.is_zip:
            return self.zip_reader().sizes()
        if not self.is_url:
            return _walk(self)
        if self.root.startswith(("http://", "https://")):
            return None
        fs, path = self.fs()
        try:
            found = fs.find(path, detail=True)
        except Exception as exc:  # noqa: BLE001
            raise AdvpipeError(f"cannot list {self.root}: {error_line(exc, self.root)}") from exc
        prefix = path.rstrip("/") + "/"
        out = {}
        for name, info in found.items():
            if info.get("type", "file") == "file" and name.startswith(prefix):
                out[check_key(name[len(prefix):], f"mask store {self.root}")] = int(info.get("size") or 0)
        if len(out) > MAX_OBJECTS + len(UNLISTED):
            raise AdvpipeError(f"mask store {self.root} has over {MAX_OBJECTS} objects")
        return out

    # -- manifest ----------------------------------------------------------------------------
    def load_manifest(self) -> Manifest | None:
        """Read and validate the store's manifest (refused unless its digest is the pinned one, if pinned)."""
        raw = self.read(MANIFEST_KEY, MAX_MANIFEST_BYTES)
        if raw is None:
            if self.pin is not None:
                why = f" ({self.missing})" if self.missing else ""
                raise AdvpipeError(f"mask store {self.root} has no manifest {MANIFEST_KEY}{why}, so its content cannot be "
                                   f"checked against the pinned {self.pin}")
            return None
        self.manifest = parse_manifest(raw, f"mask store {self.root}", self.pin)
        return self.manifest

    def compute_manifest(self) -> Manifest:
        """Hash every object of the store into a fresh manifest."""
        listing = self.list_objects()
        if listing is None:
            raise AdvpipeError(f"cannot list the objects of {self.root}; make the manifest where the store was written")
        keys = sorted(k for k in listing if k not in UNLISTED)
        objects = {}
        for key, data in self.read_many(keys, listing):
            if data is None:
                raise AdvpipeError(f"object {self.name(key)} vanished while hashing the store")
            objects[key] = (len(data), sha256_hex(data))
        return build_manifest(objects)

    def manifest_problems(self) -> list[str]:
        """Compare the store's objects with its manifest: missing, extra, resized and changed objects."""
        manifest = self.manifest
        if manifest is None:
            return []
        try:
            listing = self.list_objects()
        except AdvpipeError as exc:
            return [str(exc)]
        problems = manifest.diff(listing) if listing is not None else []
        keys = [k for k in manifest.objects if listing is None or listing.get(k) == manifest.objects[k][0]]
        sizes = {k: v[0] for k, v in manifest.objects.items()}
        try:
            for key, data in self.read_many(keys, sizes):
                if data is None:
                    problems.append(f"object {key!r} listed in manifest {manifest.digest} is missing")
                    continue
                try:
                    manifest.check(key, data)
                except ContentMismatch as exc:
                    problems.append(str(exc))
        except StoreUnreachable:
            raise  # a store that does not answer is not a store with problems: one line, exit 2
        except AdvpipeError as exc:
            problems.append(str(exc))
        return problems

    # -- zarr --------------------------------------------------------------------------------
    def open_group(self, check_manifest: bool = True) -> zarr.Group:
        """Load the manifest, then open the zarr group read-only through the guard store.

        The guard checks every object against the manifest; ``check_manifest=False`` only against a pinned one.
        """
        if self.storage_options and not self.is_url:
            raise AdvpipeError("storage_options only apply to URLs")
        try:
            self.load_manifest()
            self.wrapper = GuardStore(self._zarr_base(), self)
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

    def _zarr_base(self) -> Any:
        if self.is_zip:
            return self.zip_reader()
        if not self.is_url:
            return LocalStore(self.root, read_only=True)
        fs, path = filesystem(self.root, self.storage_options, asynchronous=True)
        if not fs.async_impl:
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs = AsyncFileSystemWrapper(fs, asynchronous=True)
        return FsspecStore(fs, path=path, read_only=True)


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


def _walk(loc: Location) -> dict[str, int]:
    """Every object of a local directory store, refusing symlinked directories and symlinks out of it."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(loc.root):
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                rel = os.path.relpath(os.path.join(dirpath, name), loc.root).replace(os.sep, "/")
                raise AdvpipeError(f"mask store {loc.root}: {rel} is a symlink to a directory; refusing it")
        for name in filenames:
            key = os.path.relpath(os.path.join(dirpath, name), loc.root).replace(os.sep, "/")
            check_key(key, f"mask store {loc.root}")
            info = loc.check_local_object(key)
            if info is not None:
                out[key] = info.st_size
            if len(out) > MAX_OBJECTS + len(UNLISTED):
                raise AdvpipeError(f"mask store {loc.root} has over {MAX_OBJECTS} objects")
    return out


def write_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Hash every object of the local directory store at ``path`` and write its manifest there (atomically)."""
    loc = Location(path)
    manifest = loc.compute_manifest()
    atomic_write_bytes(Path(loc.root) / MANIFEST_KEY, manifest.raw)
    return manifest
