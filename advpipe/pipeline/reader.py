"""Reading a mask store: :func:`open_store` validates it, and every mask read is checked against its rows.

Every reader (training, ``masks info|report|show``, ``verify``) opens through :class:`MaskStore`,
so one validation path covers them all: the attributes, the array layout, codecs and key encoding
(:func:`advpipe.pipeline.layout.open_arrays`), and the guarded object reads of
:class:`advpipe.pipeline.location.Location` (sizes, symlinks, special files, declared zstd sizes,
missing chunks, and every object against the store's manifest). Masks are returned only after
they agree with their ``l0_pixels`` rows and their recorded ``mask_hash``
(:mod:`advpipe.pipeline.row_checks`); a store without mask hashes is refused on open.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import zarr

from advpipe.errors import AdvpipeError, DamagedStore
from advpipe.pipeline.codecs import ATTRS_KEY, DONE_ARRAY, METRICS, encoded_chunks, mask_hash, pack_masks
from advpipe.pipeline.layout import Chunked, has_mask_hash, open_arrays
from advpipe.pipeline.location import Location
from advpipe.pipeline.manifest import ContentMismatch, Manifest, sha256_hex
from advpipe.pipeline.provenance import parse_attrs
from advpipe.pipeline.remote import is_network_error, read_error
from advpipe.pipeline.row_checks import bad_rows, describe
from advpipe.progress import track

__all__ = ["MaskStore", "check_compatible", "open_store"]

_READ_BYTES = 256 << 20  # decoded bool masks fetched per read call in read_all_packed
REMOTE_CONCURRENCY = 32  # chunk requests in flight per read of a remote store (benchmarks/bench_sharing.py)
_ROWS_CACHE_BYTES = 64 << 20  # l0_pixels, sample_hash and mask_hash are kept whole up to this size


class MaskStore(Chunked):
    """A read-only mask store (local or remote) whose attributes and array layout have been validated."""

    #: always True: a store without per-sample mask hashes is refused on open (kept for callers that ask)
    has_mask_hash = True

    def __init__(self, path_or_url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                 digest: str | None = None, check_manifest: bool = True) -> None:
        """Open and validate the store (prefer :func:`open_store`); ``check_manifest=False`` is for ``verify``,
        which checks every object against an unpinned manifest itself and lists what differs."""
        self._state = (path_or_url, storage_options, digest, check_manifest)
        self.location = Location(path_or_url, storage_options, digest)
        group = self.location.open_group(check_manifest)
        self.manifest: Manifest | None = self.location.manifest
        self.provenance: dict[str, Any] = parse_attrs(group.attrs.get(ATTRS_KEY))
        if not has_mask_hash(self.provenance):
            raise AdvpipeError(_recompute_line(self.location.root, self.provenance))
        self.location.wrapper.strict = self.provenance["status"] == "complete"
        self._arrays = open_arrays(group, self.provenance, self.location.root)
        self.location.wrapper.chunk_shapes = {name: arr.chunks for name, arr in self._arrays.items()}
        self._init_layout(self.provenance)
        self._rows: dict[str, np.ndarray] = {}
        #: the training data's own sample hashes, once a pinned manifest proved the store holds them
        self.known_sample_hashes: np.ndarray | None = None

    def __getstate__(self) -> tuple[Any, ...]:
        return self._state

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.__init__(state[0], storage_options=state[1], digest=state[2], check_manifest=state[3])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"MaskStore({self.location.root!r}, n={self.n}, image_shape={self.image_shape}, status={self.provenance['status']!r})"

    @property
    def complete(self) -> bool:
        """Whether the writer finalized the store (all chunks done, summary written)."""
        return self.provenance["status"] == "complete"

    @property
    def digest(self) -> str | None:
        """The content digest ``sha256:<hex>`` of the store's manifest (None if it has none)."""
        return self.manifest.digest if self.manifest is not None else None

    def array(self, name: str) -> zarr.Array:
        """The validated zarr array ``name`` (read-only, through the guarded store)."""
        return self._arrays[name]

    def _read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        try:
            if not self.location.is_url:
                return self._arrays[name][start:stop]
            # Remote reads wait on round trips, not on the CPU: more in flight than zarr's default 10.
            with zarr.config.set({"async.concurrency": REMOTE_CONCURRENCY}):
                return self._arrays[name][start:stop]
        except AdvpipeError:
            raise
        except ContentMismatch as exc:
            raise DamagedStore(f"mask store {self.location.root}: {exc}") from exc
        except Exception as exc:  # crc32c, zstd and packbits each fail differently on damaged bytes
            if is_network_error(exc):
                raise read_error(self.location.root, exc, self.location.root) from exc
            raise DamagedStore(
                f"mask store {self.location.root}: array {name!r} rows [{start or 0}, {stop or self.n}) are unreadable "
                f"({type(exc).__name__}: {damage_text(exc)}); run `advpipe masks verify` on it to find the damaged chunk files"
            ) from exc

    def require_complete(self) -> None:
        """Raise AdvpipeError unless the writer finalized the store and every chunk is done."""
        done = self.chunk_done()
        if not self.complete or not done.all():
            raise AdvpipeError(f"mask store {self.location.root} is incomplete (status {self.provenance['status']!r}, "
                               f"{int(done.sum())} of {self.n_chunks} chunks done); finish its precompute run first")

    def check_samples(self, ours: np.ndarray) -> None:
        """Raise AdvpipeError unless the (N,) per-sample hashes ``ours`` are the store's; then use them for the row checks."""
        # proven by a pinned manifest without a fetch, else compared with the stored hashes
        theirs = ours if self.pinned_equal("sample_hash", ours) else self.sample_hashes()
        bad = np.flatnonzero(ours != theirs)
        if len(bad):
            raise AdvpipeError(f"mask store {self.location.root}: {len(bad)} samples do not match the data by content "
                               f"hash (first at index {int(bad[0])}); is the data in another order, or another dataset?")
        self.known_sample_hashes = theirs

    def chunk_done(self) -> np.ndarray:
        """Return the (n_chunks,) bool done flags."""
        done = np.ones(self.n_chunks, dtype=bool)
        # A pinned manifest that lists every flag object as "done" proves it: no n_chunks tiny requests.
        return done if self.pinned_equal(DONE_ARRAY, done) else self._read(DONE_ARRAY)

    def pinned_equal(self, name: str, values: np.ndarray, start: int | None = None) -> bool:
        """Whether array ``name`` provably holds ``values``: they encode to the objects the pinned manifest lists.

        ``values`` is the whole array, or with ``start`` its rows from there, which must begin on a
        chunk boundary and end on one or at the array's end. False when unpinned or when anything
        differs (then read the array to compare); never fetches.
        """
        arr = self._arrays.get(name)
        values = np.asarray(values)
        if self.manifest is None or not self.manifest.pinned or arr is None:
            return False
        if start is None and values.shape != arr.shape:
            return False
        start = start or 0
        step, stop = arr.chunks[0], start + len(values)
        if values.shape[1:] != arr.shape[1:] or start % step or stop > arr.shape[0] \
                or (stop % step and stop != arr.shape[0]) or not len(values):
            return False
        first = start // step
        objects = {"/".join(["c", str(first + int(key.split("/")[1])), *key.split("/")[2:]]): data
                   for key, data in encoded_chunks(name, values, arr.chunks).items()}
        listed = self.manifest.objects
        return len(objects) == math.ceil(len(values) / step) * math.prod(arr.cdata_shape[1:]) and all(
            listed.get(f"{name}/{key}", (0, ""))[1] == sha256_hex(data) for key, data in objects.items())

    def _row_values(self, name: str, start: int, stop: int) -> np.ndarray:
        if name == "sample_hash" and self.known_sample_hashes is not None:
            return self.known_sample_hashes[start:stop]
        if self.n * 20 <= _ROWS_CACHE_BYTES:
            if name not in self._rows:
                self._rows[name] = self._read(name)
            return self._rows[name][start:stop]
        return self._read(name, start, stop)

    def check_rows(self, masks: np.ndarray, start: int) -> np.ndarray:
        """Return ``masks`` (rows ``start...``) if each agrees with its ``l0_pixels`` row and ``mask_hash``; else AdvpipeError."""
        stop = start + len(masks)
        l0p = self._row_values("l0_pixels", start, stop)
        hashes, recorded = self._row_values("sample_hash", start, stop), None
        # a pinned manifest that lists exactly the mask_hash objects these masks hash to proves the
        # comparison below without fetching mask_hash (the same check, not a weaker one)
        pinned = self.complete and self.manifest is not None and self.manifest.pinned  # else hash once, below
        if not (pinned and self.pinned_equal("mask_hash", mask_hash(masks, hashes), start)):
            recorded = self._row_values("mask_hash", start, stop)
        keep = slice(None)
        if not self.complete:  # rows of chunks not yet written hold the fill values
            keep = np.flatnonzero(l0p >= 0)
        bad, why = bad_rows(masks[keep], l0p[keep], hashes[keep] if recorded is not None else None,
                            recorded[keep] if recorded is not None else None)
        if bad.size:
            rows = np.arange(start, stop)[keep][bad]
            raise DamagedStore(f"mask store {self.location.root}: {describe(rows, stop - start, why)} in rows "
                               f"[{start}, {stop}); refusing it (the masks were moved, rewritten or linked in)")
        return masks

    def read_masks(self, start: int, stop: int) -> np.ndarray:
        """Return masks ``[start, stop)`` as (stop-start, H, W) bool, each checked against its rows."""
        if not 0 <= start <= stop <= self.n:
            raise AdvpipeError(f"mask range [{start}, {stop}) is outside [0, {self.n})")
        return self.check_rows(self._read("masks", start, stop), start)

    def read_all_packed(self) -> np.ndarray:
        """Return every mask bit-packed row by row: (N, ceil(H*W/8)) uint8 for :func:`unpack_masks`."""
        _, h, w = self.image_shape
        out = np.empty((self.n, math.ceil(h * w / 8)), dtype=np.uint8)
        # Read several chunks per call so remote stores fetch them concurrently, within a memory cap.
        step = max(1, _READ_BYTES // (h * w * self.chunk_size)) * self.chunk_size
        for start in track(range(0, self.n, step), "reading masks"):
            stop = min(start + step, self.n)
            out[start:stop] = pack_masks(self.read_masks(start, stop))
        return out

    def metrics(self) -> dict[str, np.ndarray]:
        """Return the per-image metric arrays: success, clean_correct, l0, l0_pixels, l2, linf, loss."""
        return {name: self._read(name) for name in METRICS}

    def labels(self) -> np.ndarray:
        """Return the (N,) int64 labels the attack used."""
        return self._read("labels")

    def sample_hashes(self) -> np.ndarray:
        """Return the (N,) uint64 per-sample content hashes (see :func:`sample_hash`)."""
        return self._read("sample_hash")


def damage_text(exc: BaseException) -> str:
    """The message of a decoding error, without the stored bytes some codecs quote (they may be any file's)."""
    text = " ".join(str(exc).split())
    if "checksum" in text.lower():
        return "Stored and computed checksum do not match"
    return text[:200]


def _recompute_line(root: str, prov: dict[str, Any]) -> str:
    """The refusal of a store without mask hashes, with the command that recomputes it."""
    ds = prov["dataset"]
    return (f"mask store {root} predates per-sample mask hashes, so its masks cannot be tied to their images; "
            f"refusing it. Recompute it: advpipe precompute-masks --data {ds['name']} --split {ds['split']} "
            f"--limit {ds['n']} --model {prov['model']['arch']} --out {root} --overwrite (with the attack "
            "settings it was made with)")


def open_store(path_or_url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
               digest: str | None = None) -> MaskStore:
    """Open a mask store read-only from a local path, a zip file or an fsspec URL (http(s)://, s3://, ...).

    ``digest`` (or a ``LOCATION#sha256=HEX`` location) pins the content: the store's manifest must
    hash to it and every object read must be the one the manifest lists, else AdvpipeError.
    """
    return MaskStore(path_or_url, storage_options=storage_options, digest=digest)


def check_compatible(
    store: MaskStore, *, fingerprint: str, split: str, n: int, image_shape: tuple[int, int, int]
) -> None:
    """Raise AdvpipeError, naming both sides, unless ``store`` is complete and made for exactly this data."""
    store.require_complete()
    ds = store.provenance["dataset"]
    pairs = [
        ("fingerprint", ds["fingerprint"], fingerprint),
        ("split", ds["split"], split),
        ("n", store.n, n),
        ("image_shape", tuple(store.image_shape), tuple(image_shape)),
    ]
    diff = [f"{key}: store {mine!r} vs data {theirs!r}" for key, mine, theirs in pairs if mine != theirs]
    if diff:
        raise AdvpipeError(f"mask store {store.location.root} does not match the data: {'; '.join(diff)}")
