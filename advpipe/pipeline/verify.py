"""``verify_store``: check a store from elsewhere fully, one chunk at a time, and list every problem found.

Memory is bounded by one chunk of every array (at most 1 GiB decoded, see
:func:`advpipe.pipeline.layout.check_chunk_bytes`) plus 16 bytes per successful sample for the
summary's medians (up to 2^24 successes; beyond, medians are not compared). Existence is decided
from a listing where the protocol has one, and otherwise by reading the object through the strict
guard, so no request escapes the remote timeouts.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from advpipe.errors import AdvpipeError, CannotRead
from advpipe.pipeline.codecs import ARRAYS, DONE_ARRAY
from advpipe.pipeline.layout import layout_problem
from advpipe.pipeline.provenance import SUMMARY_STATS, summary_of
from advpipe.pipeline.reader import MaskStore, damage_text
from advpipe.pipeline.remote import is_network_error, read_error
from advpipe.pipeline.row_checks import bad_rows, describe
from advpipe.progress import track

__all__ = ["verify_store"]

_MEDIAN_LIMIT = 1 << 24  # successes whose norms are kept for the medians


def verify_store(
    path_or_url: str | os.PathLike[str],
    *,
    fingerprint: str | None = None,
    sample_hashes: np.ndarray | None = None,
    storage_options: dict[str, Any] | None = None,
    digest: str | None = None,
) -> list[str]:
    """Check a store fully and return the problems found (empty list = usable).

    Checks: attributes, array layout, codecs and key encoding (the ``open_store`` validation),
    and each array's own metadata against the consolidated copy; status complete and every chunk
    done; every chunk object of every array present, readable and checksum-valid (a problem names
    the array, chunk index and file); counts in range; each mask against its ``l0_pixels`` row and
    its recorded ``mask_hash``; the stored summary equals one recomputed from the arrays; if the
    store has a manifest, every object against it, and its digest against ``digest`` if pinned;
    and, if given, the dataset fingerprint and per-sample hashes. A store that cannot be reached
    raises AdvpipeError (``cannot read ...``) instead.
    """
    try:
        # every object is checked against the manifest once, below, so that each difference is listed
        store = MaskStore(path_or_url, storage_options=storage_options, digest=digest, check_manifest=False)
    except AdvpipeError as exc:
        return [str(exc)]
    problems: list[str] = store.location.manifest_problems()
    problems += _metadata_problems(store)
    store.location.wrapper.strict = True  # a done chunk must have every object, whatever the status
    listing = _listing(store, problems)
    done = _done_flags(store, listing, problems)
    if store.provenance["status"] != "complete":
        problems.append(f"status is {store.provenance['status']!r}, not 'complete'")
    pending = np.flatnonzero(~done)
    if pending.size:
        problems.append(f"{pending.size} of {store.n_chunks} chunks are not done (first {pending[:5].tolist()})")
    given = None
    if sample_hashes is not None:
        given = np.asarray(sample_hashes)
        if given.shape != (store.n,):
            problems.append(f"sample hashes: store has {store.n}, data has shape {given.shape}")
            given = None
    stats = _Summary()
    readable, hash_bad, hash_mismatches, hash_checked = True, [], 0, 0
    for i in track(np.flatnonzero(done).tolist(), "verifying chunks"):
        chunk = _read_chunk(store, i, listing, problems)
        if chunk is None:
            readable = False
            continue
        start, stop = store.chunk_bounds(i)
        problems += _range_problems(store, i, chunk)
        bad, why = bad_rows(chunk["masks"], chunk["l0_pixels"], chunk["sample_hash"], chunk.get("mask_hash"))
        if bad.size:
            problems.append(f"chunk {i}: {describe(bad + start, stop - start, why)}")
        stats.add(chunk)
        if given is not None:
            wrong = np.flatnonzero(chunk["sample_hash"] != given[start:stop].astype(np.uint64)) + start
            hash_bad += wrong[: max(0, 5 - len(hash_bad))].tolist()
            hash_checked += stop - start
            hash_mismatches += wrong.size
    if hash_mismatches:
        problems.append(f"sample hashes differ at {hash_mismatches} of {hash_checked} samples in done chunks "
                        f"(first indices {hash_bad})")
    summary = store.provenance.get("summary")
    if store.complete and not pending.size and readable:
        expected = stats.summary(store.n)
        if not isinstance(summary, dict) or any(
                key in expected and not _same(summary.get(key), value) for key, value in expected.items()):
            problems.append(f"stored summary {summary} does not match the arrays ({expected})")
    ds = store.provenance["dataset"]
    if fingerprint is not None and fingerprint != ds["fingerprint"]:
        problems.append(f"dataset fingerprint: store {ds['fingerprint']!r} vs data {fingerprint!r}")
    return problems


def _metadata_problems(store: MaskStore) -> list[str]:
    """Each array's own zarr.json must describe the same array as the consolidated copy readers use."""
    import json

    from zarr.core.array import Array, AsyncArray
    from zarr.core.metadata.v3 import ArrayV3Metadata

    problems = []
    for name, arr in store._arrays.items():
        raw = store.location.read(f"{name}/zarr.json")
        if raw is None:
            problems.append(f"array {name!r}: its own metadata {name}/zarr.json is missing")
            continue
        try:
            own = ArrayV3Metadata.from_dict(json.loads(raw))
        except Exception as exc:  # noqa: BLE001 - any malformed document
            problems.append(f"array {name!r}: {name}/zarr.json is not valid array metadata ({type(exc).__name__})")
            continue
        view = Array(AsyncArray(own, arr.store_path))  # the array its own document describes; never read
        if problem := layout_problem(name, view, arr.shape, arr.chunks, arr.dtype):
            problems.append(f"{name}/zarr.json differs from the consolidated metadata: {problem}")
    return problems


def _listing(store: MaskStore, problems: list[str]) -> dict[str, int] | None:
    if not store.location.can_list:
        return None  # existence is then decided by reading each object through the strict guard
    try:
        return store.location.list_objects()
    except AdvpipeError as exc:
        problems.append(str(exc))
        return None


def _key(store: MaskStore, name: str, i: int) -> str:
    arr = store._arrays[name]
    return f"{name}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}"


def _done_flags(store: MaskStore, listing: dict[str, int] | None, problems: list[str]) -> np.ndarray:
    """The chunk_done flags, reading only the flag objects that exist when the store can be listed."""
    if listing is None:
        try:
            return store.chunk_done().astype(bool)
        except CannotRead:
            raise
        except AdvpipeError as exc:
            problems.append(str(exc))
            return np.zeros(store.n_chunks, dtype=bool)
    done = np.zeros(store.n_chunks, dtype=bool)
    arr = store._arrays[DONE_ARRAY]
    for i in range(store.n_chunks):
        key = _key(store, DONE_ARRAY, i)
        if key not in listing:
            continue  # an absent flag just means "not done"
        try:
            done[i] = bool(arr[i])
        except AdvpipeError as exc:
            problems.append(f"array {DONE_ARRAY!r} chunk {i}: file {store.location.name(key)} is corrupt ({exc})")
        except Exception as exc:  # noqa: BLE001 - crc32c fails on damaged bytes
            problems.append(f"array {DONE_ARRAY!r} chunk {i}: file {store.location.name(key)} is corrupt "
                            f"({type(exc).__name__}: {damage_text(exc)})")
    return done


def _read_chunk(store: MaskStore, i: int, listing: dict[str, int] | None,
                problems: list[str]) -> dict[str, np.ndarray] | None:
    start, stop = store.chunk_bounds(i)
    chunk: dict[str, np.ndarray] = {}
    for name in (n for n in ARRAYS if n in store._arrays):
        key = _key(store, name, i)
        if listing is not None and key not in listing:
            problems.append(f"array {name!r} chunk {i}: file {store.location.name(key)} is missing")
            continue
        try:
            chunk[name] = store._arrays[name][start:stop]
        except AdvpipeError as exc:  # refused before decoding: a symlink, a special file, a zstd bomb
            problems.append(f"array {name!r} chunk {i}: file {store.location.name(key)} is corrupt ({exc})")
        except Exception as exc:  # noqa: BLE001 - crc32c, zstd and packbits each fail differently
            if is_network_error(exc):
                raise read_error(store.location.name(key), exc, store.location.root) from exc
            state = ("is missing" if isinstance(exc, FileNotFoundError)
                     else f"is corrupt ({type(exc).__name__}: {damage_text(exc)})")
            problems.append(f"array {name!r} chunk {i}: file {store.location.name(key)} {state}")
    return chunk if len(chunk) == len([n for n in ARRAYS if n in store._arrays]) else None


def _range_problems(store: MaskStore, i: int, chunk: dict[str, np.ndarray]) -> list[str]:
    c, h, w = store.image_shape
    out = []
    for name, hi in (("l0", c * h * w), ("l0_pixels", h * w), ("labels", None)):
        v = chunk[name]
        if v.size and (v.min() < 0 or (hi is not None and v.max() > hi)):
            out.append(f"array {name!r} chunk {i}: values outside [0, {hi if hi is not None else 'inf'}]")
    return out


class _Summary:
    """The store summary computed chunk by chunk, keeping only the norms of successful attacked images."""

    def __init__(self) -> None:
        self.attacked = self.successes = 0
        self.norms: dict[str, list[np.ndarray]] = {name: [] for name in SUMMARY_STATS}

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        attacked = chunk["clean_correct"].astype(bool)
        chosen = attacked & chunk["success"].astype(bool)
        self.attacked += int(attacked.sum())
        self.successes += int(chosen.sum())
        if self.successes <= _MEDIAN_LIMIT:
            for name in SUMMARY_STATS:
                self.norms[name].append(chunk[name][chosen])

    def summary(self, n: int) -> dict[str, Any]:
        norms = ({name: np.concatenate(parts) for name, parts in self.norms.items()}
                 if self.successes <= _MEDIAN_LIMIT else None)  # beyond, means and medians are not compared
        return summary_of(n, self.attacked, self.successes, norms)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b
