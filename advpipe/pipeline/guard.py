"""The zarr store every read of a mask store goes through: it refuses unsafe objects before zarr decodes them.

zarr reads a store through :class:`GuardStore`, which wraps the local, zip or fsspec store of a
:class:`advpipe.pipeline.location.Location`. Local objects are read by ``Location.read`` (``lstat``
first: no symlink, FIFO or device is opened); remote ones with a ranged request of at most the
format's size limit; each chunk's zstd frame must declare exactly the chunk's decoded size; and
every object must be the one the store's manifest lists (size and sha256, hashed as it is read),
so what training reads passes the manifest check of ``advpipe masks verify``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from zarr.storage import WrapperStore

from advpipe.errors import AdvpipeError
from advpipe.pipeline.codecs import ARRAYS, check_decoded_size
from advpipe.pipeline.manifest import check_key, size_limit

if TYPE_CHECKING:
    from advpipe.pipeline.location import Location

__all__ = ["GuardStore"]


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

    def __init__(self, store: Any, location: Location) -> None:
        super().__init__(store)
        self.location = location

    def _with_store(self, store: Any) -> "GuardStore":
        other = type(self)(store, self.location)
        other.strict, other.chunk_shapes, other.check_manifest = self.strict, self.chunk_shapes, self.check_manifest
        return other

    async def _fetch(self, key: str, prototype: Any, byte_range: Any) -> Any:
        loc = self.location
        if not (loc.is_url or loc.is_zip) and byte_range is None:
            data = loc.read(key)  # lstat first: no symlink, FIFO or device is ever opened
            return None if data is None else prototype.buffer.from_bytes(data)
        if loc.is_url and byte_range is None:
            from zarr.abc.store import RangeByteRequest

            try:  # never more than the format allows, whatever the server would send
                return await super().get(key, prototype, RangeByteRequest(0, size_limit(key) + 1))
            except OSError as exc:  # S3 refuses a ranged read of an empty object
                if "InvalidRange" not in str(exc) and "416" not in str(exc):
                    raise
        return await super().get(key, prototype, byte_range)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        loc = self.location
        check_key(key, f"mask store {loc.root}")
        value = await self._fetch(key, prototype, byte_range)
        name, _, rest = key.partition("/")
        if value is None:
            # Whatever the key encoding, a missing object of an array of a complete store is a lost file.
            if self.strict and name in ARRAYS and rest and not rest.endswith("zarr.json"):
                raise FileNotFoundError(f"chunk object {key} is missing")
            return None
        if byte_range is None:
            data = value.to_bytes()
            if len(data) > size_limit(key):
                raise AdvpipeError(f"mask store {loc.root}: object {key} is over {size_limit(key)} bytes")
            if name in self.chunk_shapes and rest and not rest.endswith("zarr.json"):
                check_decoded_size(name, data, self.chunk_shapes[name], f"mask store {loc.root}: object {key}")
            if loc.manifest is not None and (self.check_manifest or loc.manifest.pinned):
                loc.manifest.check(key, data)
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(self, requests: Iterable[tuple[str, Any, Any]]) -> Any:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
