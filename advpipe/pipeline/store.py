"""Mask store: the per-image AdvMask attack masks of a dataset in a chunked Zarr v3 group.

The format (``advpipe-masks/2``) is written down in docs/mask-store.md so other teams can read a
store with plain zarr. One chunk index along N is one write unit: every per-sample array is chunked
identically, and ``chunk_done[i]`` (its own storage object) is set only after all arrays of chunk
``i`` are written, so a killed run loses at most the chunks in flight and different processes may
write different chunks at once.

Writers use :func:`create_store` (a local or shared-filesystem path, one writer at a time under a
lock file); readers use :func:`open_store` on a path or any fsspec URL, and :func:`verify_store`
checks a store from elsewhere before use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import LocalStore

from advpipe.errors import AdvpipeError
from advpipe.pipeline.codecs import (
    ARRAYS,
    ATTRS_KEY,
    DONE_ARRAY,
    METRICS,
    codec_kwargs,
    encoded_chunks,
    pack_masks,
    quiet_zarr,
    sample_hash,
    unpack_masks,
)
from advpipe.pipeline.location import Location, write_manifest
from advpipe.pipeline.lock import StoreLock
from advpipe.pipeline.manifest import ContentMismatch, Manifest, sha256_hex
from advpipe.pipeline.provenance import (
    config_diff,
    config_of,
    image_shape_of,
    new_attrs,
    now,
    SUMMARY_STATS,
    parse_attrs,
    summarize,
    versions,
)
from advpipe.pipeline.remote import is_url
from advpipe.progress import track

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MaskStore",
    "MaskStoreWriter",
    "check_compatible",
    "create_store",
    "open_store",
    "sample_hash",
    "unpack_masks",
    "verify_store",
]

log = logging.getLogger(__name__)

# docs/mask-store.md ("Chunking"): size and read speed are flat from 500 CIFAR masks per chunk up,
# while the attack work a kill can lose grows with the chunk; 500 balances the two.
DEFAULT_CHUNK_SIZE = 500
_READ_BYTES = 256 << 20  # decoded bool masks fetched per read call in read_all_packed
REMOTE_CONCURRENCY = 32  # chunk requests in flight per read of a remote store (benchmarks/bench_sharing.py)


def _lock_path(path: Path) -> Path:
    # Beside the store, not inside: it survives an overwrite and is never copied along with a store.
    return path.with_name(path.name + ".lock")


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise AdvpipeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    return value


def _expected_layout(attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype]]:
    """Return name -> (shape, chunks, dtype) that every array of a store with ``attrs`` must have."""
    n, chunk = attrs["dataset"]["n"], attrs["chunk_size"]
    _, h, w = attrs["dataset"]["image_shape"]
    out = {}
    for name, spec in ARRAYS.items():
        trail = (h, w) if spec.per_pixel else ()
        out[name] = ((n, *trail), (chunk, *trail), spec.dtype)
    out[DONE_ARRAY] = ((math.ceil(n / chunk),), (1,), np.dtype(bool))
    return out


def _open_arrays(group: zarr.Group, attrs: dict[str, Any], where: str) -> dict[str, zarr.Array]:
    """Return every array of the store, refusing any whose shape, chunking or dtype is not the format's."""
    arrays = {}
    for name, (shape, chunks, dtype) in _expected_layout(attrs).items():
        with quiet_zarr():
            try:
                arr = group[name]
            except KeyError:
                raise AdvpipeError(f"{where}: array {name!r} is missing") from None
        if not isinstance(arr, zarr.Array):
            raise AdvpipeError(f"{where}: {name!r} is not an array")
        if arr.shape != shape or arr.chunks != chunks or arr.shards is not None or arr.dtype != dtype:
            raise AdvpipeError(
                f"{where}: array {name!r} is {arr.dtype} shape {arr.shape} chunks {arr.chunks}"
                f"{' sharded' if arr.shards is not None else ''}; the attributes require {dtype} shape {shape} chunks {chunks}"
            )
        arrays[name] = arr
    return arrays


def _read_local_attrs(path: Path) -> dict[str, Any]:
    """Return the raw attribute block of the mask store at ``path``; refuse a directory that is not one."""
    try:
        raw = json.loads((path / "zarr.json").read_text())["attributes"][ATTRS_KEY]
        if isinstance(raw, dict) and str(raw.get("format", "")).startswith("advpipe-masks/"):
            return raw
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise AdvpipeError(f"{path} exists and is not an advpipe mask store; refusing to touch it")


def _build(path: Path, attrs: dict[str, Any]) -> None:
    """Create an empty store with ``attrs`` beside ``path`` and move it into place (replacing any old store)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with quiet_zarr():
            group = zarr.open_group(LocalStore(tmp), mode="w-", zarr_format=3, attributes={ATTRS_KEY: attrs})
            for name, (shape, chunks, dtype) in _expected_layout(attrs).items():
                spec = ARRAYS.get(name)
                fill = spec.fill_value if spec is not None else False
                dims = ("sample", "y", "x") if len(shape) == 3 else (("chunk",) if name == DONE_ARRAY else ("sample",))
                group.create_array(
                    name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, dimension_names=dims, **codec_kwargs(name)
                )
            # Array metadata never changes after this point, so consolidating once is enough: a remote
            # reader then opens the whole store with a single request for the root zarr.json.
            zarr.consolidate_metadata(LocalStore(tmp))
        if path.exists():
            # Move the old store aside first so the path always holds one whole store.
            trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex}")
            os.rename(path, trash)
            os.rename(tmp, path)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def create_store(
    path: str | os.PathLike[str],
    *,
    n: int,
    image_shape: tuple[int, int, int],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    provenance: dict[str, Any],
    overwrite: bool = False,
) -> "MaskStoreWriter":
    """Create a mask store at a local ``path`` (or reopen it to resume) and return its locked writer.

    An existing in-progress store is resumed if its configuration (dataset, n, image shape,
    checkpoint sha256, attack, seed, chunk size) equals the requested one; otherwise, or if it is
    complete, AdvpipeError unless ``overwrite`` (then it is replaced by a fresh store). A second
    concurrent writer gets AdvpipeError; see :class:`~advpipe.pipeline.lock.StoreLock`.
    """
    if is_url(path) or str(path).lower().endswith(".zip"):
        raise AdvpipeError(f"mask stores are written to a local or shared-filesystem directory, not {path}; "
                           "`advpipe masks publish` uploads a finished store and `advpipe masks pack` zips it")
    path = Path(path).absolute()
    attrs = new_attrs(provenance, n=n, image_shape=image_shape, chunk_size=chunk_size)
    if path.is_file():
        raise AdvpipeError(f"{path} is a file, not a mask store")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = StoreLock.acquire(_lock_path(path), what=f"mask store {path}")
    except OSError as exc:
        raise AdvpipeError(f"cannot create mask store {path}: {exc.strerror or exc}") from None
    try:
        exists = path.is_dir() and any(path.iterdir())
        raw = _read_local_attrs(path) if exists else None
        if raw is not None and not overwrite:
            old = parse_attrs(raw)
            diff = config_diff(config_of(old), config_of(attrs))
            if old["status"] == "complete":
                made = f" (it was made for another configuration: {'; '.join(diff)})" if diff else ""
                raise AdvpipeError(f"mask store {path} is complete and immutable{made}; "
                                   "pass overwrite=True to recompute it")
            if diff:
                raise AdvpipeError(
                    f"mask store {path} was made for another configuration ({'; '.join(diff)}); "
                    "pass overwrite=True to replace it"
                )
            writer = MaskStoreWriter(path, lock.token, owns_lock=True)
            writer._set_attrs({**old, "resumed": [*old.get("resumed", []), {"time": now(), "versions": versions()}]})
            log.info("resuming mask store %s: %d of %d chunks pending", path, len(writer.pending_chunks()), writer.n_chunks)
            return writer
        if path.is_dir() and not exists:
            path.rmdir()
        _build(path, attrs)
        return MaskStoreWriter(path, lock.token, owns_lock=True)
    except OSError as exc:
        lock.release()
        raise AdvpipeError(f"cannot create mask store {path}: {exc.strerror or exc}") from None
    except BaseException:
        lock.release()
        raise


class _Chunked:
    """The N / image shape / chunk geometry that writer and reader share, read from validated attributes."""

    def _init_layout(self, attrs: dict[str, Any]) -> None:
        self.n: int = attrs["dataset"]["n"]
        self.image_shape: tuple[int, int, int] = image_shape_of(attrs["dataset"]["image_shape"])
        self.chunk_size: int = attrs["chunk_size"]
        self.n_chunks: int = math.ceil(self.n / self.chunk_size)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Return the [start, stop) sample range of chunk ``i``."""
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < self.n_chunks:
            raise AdvpipeError(f"chunk index must be in [0, {self.n_chunks}), got {i!r}")
        start = int(i) * self.chunk_size
        return start, min(start + self.chunk_size, self.n)


class MaskStoreWriter(_Chunked):
    """Writes chunks of an in-progress store; picklable so dask workers can write other chunks.

    The process that called :func:`create_store` owns the lock and alone may :meth:`finalize`;
    unpickled copies only write chunks, and stop with AdvpipeError once the lock is gone.
    """

    def __init__(self, path: Path, token: str, *, owns_lock: bool) -> None:
        """Attach to the store at ``path`` whose lock carries ``token`` (use :func:`create_store`)."""
        self.path = path
        self._lock = StoreLock(_lock_path(path), token)
        self._owns_lock = owns_lock
        with quiet_zarr():
            self._group = zarr.open_group(LocalStore(path), mode="r+", zarr_format=3)
        self._attrs = parse_attrs(self._group.attrs.get(ATTRS_KEY))
        arrays = _open_arrays(self._group, self._attrs, str(path))
        # Every chunk of a done write unit exists as an object, even an all-False one, so verify can
        # tell a missing file from an empty mask.
        self._arrays = {name: arr.with_config({"write_empty_chunks": True}) for name, arr in arrays.items()}
        self._init_layout(self._attrs)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "token": self._lock.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["token"], owns_lock=False)  # type: ignore[misc]

    def __enter__(self) -> "MaskStoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_attrs(self, attrs: dict[str, Any]) -> None:
        self._group.attrs.update({ATTRS_KEY: attrs})
        self._attrs = attrs

    def _require_lock(self) -> None:
        if not self._lock.held():
            raise AdvpipeError(f"the writer of {self.path} no longer holds its lock (closed, finalized or taken over)")

    def pending_chunks(self) -> list[int]:
        """Return the indices of chunks not yet marked done, in order."""
        return np.flatnonzero(~self._arrays[DONE_ARRAY][:]).tolist()

    def write_chunk(
        self,
        i: int,
        masks: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        sample_hash: np.ndarray | torch.Tensor,
        metrics: dict[str, np.ndarray | torch.Tensor],
    ) -> None:
        """Write every array of chunk ``i``, then mark it done; refuses chunks already done.

        ``masks`` is (rows,H,W) bool; ``labels``, ``sample_hash`` (uint64, see :func:`sample_hash`)
        and the ``metrics`` success (bool: misclassified, or the target reached, after the attack),
        clean_correct (bool: classified correctly before it), l0 (nonzero elements of the C*H*W perturbation), l0_pixels
        (pixels with any nonzero channel), l2, linf, loss are (rows,), with rows = stop - start of
        :meth:`chunk_bounds`. Numpy arrays or torch tensors on any device.
        """
        start, stop = self.chunk_bounds(i)
        rows = stop - start
        c, h, w = self.image_shape
        if not isinstance(metrics, dict) or set(metrics) != set(METRICS):
            got = sorted(metrics) if isinstance(metrics, dict) else type(metrics).__name__
            raise AdvpipeError(f"metrics must have exactly the keys {list(METRICS)}, got {got}")
        values = {"masks": masks, "labels": labels, "sample_hash": sample_hash, **metrics}
        data: dict[str, np.ndarray] = {}
        for name, value in values.items():
            arr = _as_numpy(value, name)
            spec = ARRAYS[name]
            shape = (rows, h, w) if spec.per_pixel else (rows,)
            kinds = {"b": "b", "i": "iu", "u": "iu", "f": "f"}[spec.dtype.kind]
            if arr.shape != shape or arr.dtype.kind not in kinds:
                raise AdvpipeError(f"chunk {i}: {name} must be {spec.dtype} of shape {shape}, got {arr.dtype} {arr.shape}")
            data[name] = arr
        # Range-check before casting, so an int64 count cannot wrap into a valid-looking int32.
        if problem := self._out_of_range(data, c * h * w, h * w):
            raise AdvpipeError(f"chunk {i}: {problem}")
        data = {name: arr.astype(ARRAYS[name].dtype, copy=False) for name, arr in data.items()}
        self._require_lock()
        done = self._arrays[DONE_ARRAY]
        if done[int(i)]:
            raise AdvpipeError(f"chunk {i} of {self.path} is already done; a store keeps the first result")
        try:
            for name, arr in data.items():
                self._arrays[name][start:stop] = arr
            done[int(i)] = True
        except OSError as exc:
            raise AdvpipeError(f"cannot write chunk {i} of mask store {self.path}: {exc.strerror or exc}; the chunks "
                               f"already done stay valid and rerunning the same command resumes") from None

    @staticmethod
    def _out_of_range(data: dict[str, np.ndarray], elements: int, pixels: int) -> str | None:
        for name, hi in (("l0", elements), ("l0_pixels", pixels)):
            if data[name].size and (data[name].min() < 0 or data[name].max() > hi):
                return f"{name} must lie in [0, {hi}]"
        if data["labels"].size and data["labels"].min() < 0:
            return "labels must be >= 0"
        return None

    def finalize(self) -> dict[str, Any]:
        """Compute the summary metrics, mark the store complete (immutable) and release the lock."""
        if not self._owns_lock:
            raise AdvpipeError("only the process that called create_store may finalize the store")
        self._require_lock()
        pending = self.pending_chunks()
        if pending:
            raise AdvpipeError(f"cannot finalize {self.path}: {len(pending)} of {self.n_chunks} chunks pending (first {pending[:5]})")
        summary = summarize({name: self._arrays[name][:] for name in (*SUMMARY_STATS, "success", "clean_correct")})
        self._set_attrs({**self._attrs, "status": "complete", "completed": now(), "summary": summary})
        try:
            write_manifest(self.path)  # the content digest consumers pin (docs/sharing.md)
        except OSError as exc:  # the store is complete and valid; `advpipe masks publish` makes the manifest
            log.warning("mask store %s: could not write its manifest (%s)", self.path, exc.strerror or exc)
        self.close()
        return summary

    def close(self) -> None:
        """Release the lock (owner only; idempotent). Chunks written so far stay done for a later resume."""
        if self._owns_lock:
            self._lock.release()


class MaskStore(_Chunked):
    """A read-only mask store (local or remote) whose attributes and array layout have been validated."""

    def __init__(self, path_or_url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                 digest: str | None = None) -> None:
        """Open and validate the store (prefer :func:`open_store`)."""
        self._state = (path_or_url, storage_options, digest)
        self.location = Location(path_or_url, storage_options, digest)
        group = self.location.open_group()
        self.manifest: Manifest | None = self.location.manifest
        self.provenance: dict[str, Any] = parse_attrs(group.attrs.get(ATTRS_KEY))
        self.location.wrapper.strict = self.provenance["status"] == "complete"
        self._arrays = _open_arrays(group, self.provenance, self.location.root)
        self._init_layout(self.provenance)

    def __getstate__(self) -> tuple[Any, Any, Any]:
        return self._state

    def __setstate__(self, state: tuple[Any, Any, Any]) -> None:
        self.__init__(state[0], storage_options=state[1], digest=state[2])  # type: ignore[misc]

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

    def _read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        try:
            if not self.location.is_url:
                return self._arrays[name][start:stop]
            # Remote reads wait on round trips, not on the CPU: more in flight than zarr's default 10.
            with zarr.config.set({"async.concurrency": REMOTE_CONCURRENCY}):
                return self._arrays[name][start:stop]
        except ContentMismatch as exc:
            raise AdvpipeError(f"mask store {self.location.root}: {exc}") from None
        except Exception as exc:  # crc32c, zstd and packbits each fail differently on damaged bytes
            raise AdvpipeError(
                f"mask store {self.location.root}: array {name!r} rows [{start or 0}, {stop or self.n}) are unreadable "
                f"({type(exc).__name__}: {exc}); run `advpipe masks verify` on it to find the damaged chunk files"
            ) from None

    def chunk_done(self) -> np.ndarray:
        """Return the (n_chunks,) bool done flags."""
        done = np.ones(self.n_chunks, dtype=bool)
        # A pinned manifest that lists every flag object as "done" proves it: no n_chunks tiny requests.
        return done if self.pinned_equal(DONE_ARRAY, done) else self._read(DONE_ARRAY)

    def pinned_equal(self, name: str, values: np.ndarray) -> bool:
        """Whether array ``name`` provably holds ``values``: they encode to the objects the pinned manifest lists.

        False when unpinned or when anything differs (then read the array to compare); never fetches.
        """
        arr = self._arrays.get(name)
        values = np.asarray(values)
        if self.manifest is None or not self.manifest.pinned or arr is None or values.shape != arr.shape:
            return False
        objects = encoded_chunks(name, values, arr.chunks)
        listed = self.manifest.objects
        return len(objects) == math.prod(arr.cdata_shape) and all(
            listed.get(f"{name}/{key}", (0, ""))[1] == sha256_hex(data) for key, data in objects.items())

    def read_masks(self, start: int, stop: int) -> np.ndarray:
        """Return masks ``[start, stop)`` as (stop-start, H, W) bool."""
        if not 0 <= start <= stop <= self.n:
            raise AdvpipeError(f"mask range [{start}, {stop}) is outside [0, {self.n})")
        return self._read("masks", start, stop)

    def read_all_packed(self) -> np.ndarray:
        """Return every mask bit-packed row by row: (N, ceil(H*W/8)) uint8 for :func:`unpack_masks`."""
        _, h, w = self.image_shape
        out = np.empty((self.n, math.ceil(h * w / 8)), dtype=np.uint8)
        # Read several chunks per call so remote stores fetch them concurrently, within a memory cap.
        step = max(1, _READ_BYTES // (h * w * self.chunk_size)) * self.chunk_size
        for start in track(range(0, self.n, step), "reading masks"):
            stop = min(start + step, self.n)
            out[start:stop] = pack_masks(self._read("masks", start, stop))
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
    done = store.chunk_done()
    if not store.complete or not done.all():
        raise AdvpipeError(
            f"mask store {store.location.root} is incomplete (status {store.provenance['status']!r}, "
            f"{int(done.sum())} of {store.n_chunks} chunks done); finish its precompute run first"
        )
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


def verify_store(
    path_or_url: str | os.PathLike[str],
    *,
    fingerprint: str | None = None,
    sample_hashes: np.ndarray | None = None,
    storage_options: dict[str, Any] | None = None,
    digest: str | None = None,
) -> list[str]:
    """Check a store fully and return the problems found (empty list = usable).

    Checks: attributes and array layout; a crc32c codec on every array; status complete and every
    chunk done; every chunk object of every array present, readable and checksum-valid (a problem
    names the array, chunk index and file); counts in range; the stored summary equals one
    recomputed from the arrays; if the store has a manifest, every object against it (names,
    sizes, sha256), and its digest against ``digest`` if pinned; and, if given, the dataset
    fingerprint and per-sample hashes.
    """
    try:
        store = open_store(path_or_url, storage_options=storage_options, digest=digest)
    except AdvpipeError as exc:
        return [str(exc)]
    problems: list[str] = store.location.manifest_problems()
    loc, arrays = store.location, store._arrays
    for name, arr in arrays.items():
        if not any(isinstance(codec, Crc32cCodec) for codec in arr.metadata.codecs):
            problems.append(f"array {name!r} has no crc32c codec: corruption in it cannot be detected")

    def read(name: str, i: int, sel: slice) -> np.ndarray | None:
        arr = arrays[name]
        key = f"{name}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}"
        if not loc.exists(key):
            # An absent done flag just means "not done"; any other absent chunk is a lost file.
            if name != DONE_ARRAY:
                problems.append(f"array {name!r} chunk {i}: file {loc.name(key)} is missing")
            return None
        try:
            return arr[sel]
        except Exception as exc:  # crc32c, zstd and packbits each fail differently on damaged bytes
            problems.append(f"array {name!r} chunk {i}: file {loc.name(key)} is corrupt ({type(exc).__name__}: {exc})")
            return None

    flags = [read(DONE_ARRAY, i, slice(i, i + 1)) for i in range(store.n_chunks)]
    done = [flag is not None and bool(flag.all()) for flag in flags]
    if store.provenance["status"] != "complete":
        problems.append(f"status is {store.provenance['status']!r}, not 'complete'")
    pending = [i for i, d in enumerate(done) if not d]
    if pending:
        problems.append(f"{len(pending)} of {store.n_chunks} chunks are not done (first {pending[:5]})")

    c, h, w = store.image_shape
    readable = True
    for i in track([i for i, d in enumerate(done) if d], "verifying chunks"):
        start, stop = store.chunk_bounds(i)
        chunk = {name: read(name, i, slice(start, stop)) for name in ARRAYS}
        readable &= all(v is not None for v in chunk.values())
        for name, hi in (("l0", c * h * w), ("l0_pixels", h * w), ("labels", None)):
            v = chunk[name]
            if v is not None and (v.min() < 0 or (hi is not None and v.max() > hi)):
                problems.append(f"array {name!r} chunk {i}: values outside [0, {hi if hi is not None else 'inf'}]")

    summary = store.provenance.get("summary")
    if store.complete and not pending and readable:
        stats = store.metrics()
        expected = summarize(stats)
        if not isinstance(summary, dict) or any(
            not _same(summary.get(key), value) for key, value in expected.items()
        ):
            problems.append(f"stored summary {summary} does not match the arrays ({expected})")

    ds = store.provenance["dataset"]
    if fingerprint is not None and fingerprint != ds["fingerprint"]:
        problems.append(f"dataset fingerprint: store {ds['fingerprint']!r} vs data {fingerprint!r}")
    if sample_hashes is not None:
        given = np.asarray(sample_hashes)
        stored = store.sample_hashes()
        if given.shape != stored.shape:
            problems.append(f"sample hashes: store has {stored.shape[0]}, data has shape {given.shape}")
        else:
            # Rows of chunks not done hold the fill value; they are already reported as not done.
            checked = np.repeat(np.asarray(done, dtype=bool), store.chunk_size)[: store.n]
            bad = np.flatnonzero((stored != given.astype(np.uint64)) & checked)
            if bad.size:
                problems.append(
                    f"sample hashes differ at {bad.size} of {int(checked.sum())} samples in done chunks "
                    f"(first indices {bad[:5].tolist()})"
                )
    return problems


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b
