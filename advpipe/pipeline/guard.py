"""The zarr store every read of a mask store goes through, and the backends it wraps: refusals before zarr decodes.

Each way to reach a store (a local folder, a zip, a URL) is one :class:`Backend`: bounded reads
of whole objects, existence, a listing where the protocol has one (``can_list``) and the zarr
store that zarr reads through. Local objects are ``lstat``ed first (no symlink, FIFO or device is
opened); remote ones are read with a ranged request of at most the format's size limit; zip
members are checked from the central directory before any is read. :class:`GuardStore` wraps a
backend's zarr store and adds the checks every backend shares: safe keys, sizes, each chunk's zstd
frame declaring exactly the chunk's decoded size, no missing chunk in a complete store, and every
object equal to the one the store's manifest lists (size and sha256, hashed as it is read), so what
training reads passes the manifest check of ``advpipe masks verify``.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from zarr.storage import WrapperStore

from advpipe.errors import AdvpipeError
from advpipe.pipeline.codecs import ARRAYS, check_decoded_size
from advpipe.pipeline.manifest import Manifest, check_key, size_limit

__all__ = ["Backend", "GuardStore"]


class Backend:
    """One way to reach a store's objects; subclasses bound every read by the format's size limits."""

    #: whether :meth:`list` works (plain HTTP has no listing)
    can_list = True

    def __init__(self, root: str) -> None:
        self.root = root
        self.missing: str | None = None  # why the last read found nothing (a missing bucket, key, ...)

    def name(self, key: str) -> str:
        """A human-readable name of object ``key``."""
        return f"{self.root}/{key}"

    def read(self, key: str, limit: int) -> bytes | None:
        """Object ``key``'s bytes (None if absent), refusing unsafe objects and reading at most ``limit + 1`` bytes."""
        raise NotImplementedError

    def read_many(self, keys: list[str], sizes: dict[str, int]) -> Iterator[tuple[str, bytes | None]]:
        """Yield (key, bytes or None if absent) for ``keys``; ``sizes`` (key -> expected size) may batch requests."""
        for key in keys:
            yield key, self.read(key, size_limit(key))

    def exists(self, key: str) -> bool:
        """Whether object ``key`` exists."""
        raise NotImplementedError

    def list(self) -> dict[str, int]:
        """Every object key -> size (only where ``can_list``)."""
        raise NotImplementedError

    def zarr_store(self) -> Any:
        """The read-only zarr store that zarr reads this backend through (wrapped by :class:`GuardStore`)."""
        raise NotImplementedError

    async def get(self, store: Any, key: str, prototype: Any, byte_range: Any) -> Any:
        """Read ``key`` from ``store`` (this backend's zarr store) within the bounds; the default reads it as asked."""
        return await store.get(key, prototype, byte_range)


class GuardStore(WrapperStore):  # type: ignore[type-arg]
    """Read-only access that refuses unsafe keys and objects, missing chunks of a complete store and
    any object whose bytes differ from the store's manifest (when it has one; pinned or not).

    Every chunk of a finished store is written (even all-false ones), so a missing object means a
    damaged or partial copy; plain zarr would silently read it as empty masks. Only a complete
    store is strict (``strict`` is set by the reader): an in-progress one lacks the chunks not yet written.
    """

    strict = False
    #: whether to check objects against an unpinned manifest (verify checks every object itself, once)
    check_manifest = True
    #: array name -> chunk shape, set by the reader once the layout is validated (for the zstd size check)
    chunk_shapes: dict[str, tuple[int, ...]] = {}

    def __init__(self, store: Any, backend: Backend, manifest: Manifest | None = None) -> None:
        super().__init__(store)
        self.backend, self.manifest = backend, manifest

    def _with_store(self, store: Any) -> "GuardStore":
        other = type(self)(store, self.backend, self.manifest)
        other.strict, other.chunk_shapes, other.check_manifest = self.strict, self.chunk_shapes, self.check_manifest
        return other

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        root = self.backend.root
        check_key(key, f"mask store {root}")
        value = await self.backend.get(self._store, key, prototype, byte_range)
        name, _, rest = key.partition("/")
        if value is None:
            # Whatever the key encoding, a missing object of an array of a complete store is a lost file.
            if self.strict and name in ARRAYS and rest and not rest.endswith("zarr.json"):
                raise FileNotFoundError(f"chunk object {key} is missing")
            return None
        if byte_range is None:
            data = value.to_bytes()
            if len(data) > size_limit(key):
                raise AdvpipeError(f"mask store {root}: object {key} is over {size_limit(key)} bytes")
            if name in self.chunk_shapes and rest and not rest.endswith("zarr.json"):
                check_decoded_size(name, data, self.chunk_shapes[name], f"mask store {root}: object {key}")
            if self.manifest is not None and (self.check_manifest or self.manifest.pinned):
                self.manifest.check(key, data)
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(self, requests: Iterable[tuple[str, Any, Any]]) -> Any:
        # WrapperStore hands this straight to the wrapped store, past get and its checks
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
