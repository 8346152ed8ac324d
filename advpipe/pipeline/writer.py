"""Writing a mask store: create it (or resume it) under a lock, write chunks, finalize (docs/mask-store.md).

One chunk index along N is one write unit: every per-sample array is chunked identically, and
``chunk_done[i]`` (its own storage object) is set only after all arrays of chunk ``i`` are written,
so a killed run loses at most the chunks in flight and different processes may write different
chunks at once. Each chunk's masks are tied to their images by a per-sample ``mask_hash``
recorded here (:func:`advpipe.pipeline.codecs.mask_hash`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from advpipe.errors import AdvpipeError, OverwriteRefused
from advpipe.pipeline.codecs import ARRAYS, ATTRS_KEY, DONE_ARRAY, METRICS, codec_kwargs, mask_hash, quiet_zarr
from advpipe.pipeline.layout import Chunked, check_chunk_bytes, expected_layout, open_arrays
from advpipe.pipeline.location import write_manifest
from advpipe.pipeline.lock import StoreLock
from advpipe.pipeline.provenance import SUMMARY_STATS, config_diff, config_of, new_attrs, now, parse_attrs, summarize, versions
from advpipe.pipeline.remote import is_url

__all__ = ["DEFAULT_CHUNK_SIZE", "MaskStoreWriter", "create_store"]

log = logging.getLogger(__name__)

# docs/mask-store.md ("Chunking"): size and read speed are flat from 500 CIFAR masks per chunk up,
# while the attack work a kill can lose grows with the chunk; 500 balances the two.
DEFAULT_CHUNK_SIZE = 500
MAX_LOCAL_ATTRS_BYTES = 16 << 20  # a root zarr.json read before a store is overwritten or resumed


def _lock_path(path: Path) -> Path:
    # Beside the store, not inside: it survives an overwrite and is never copied along with a store.
    return path.with_name(path.name + ".lock")


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise AdvpipeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    return value


def _read_local_attrs(path: Path) -> dict[str, Any]:
    """Return the raw attribute block of the mask store at ``path``; refuse a directory that is not one."""
    meta = path / "zarr.json"
    why = ""
    try:
        if not meta.is_file() or meta.is_symlink() or meta.stat().st_size > MAX_LOCAL_ATTRS_BYTES:
            why = " (its zarr.json is missing, not a plain file or over 16 MiB)" if meta.exists() else ""
            raise ValueError(why)
        raw = json.loads(meta.read_bytes())["attributes"][ATTRS_KEY]
        if isinstance(raw, dict) and str(raw.get("format", "")).startswith("advpipe-masks/"):
            return raw
    except RecursionError:  # a deeply nested zarr.json
        why = " (its zarr.json nests too deeply to be a store's)"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise AdvpipeError(f"{path} exists and is not an advpipe mask store{why}; refusing to touch it")


def _build(path: Path, attrs: dict[str, Any]) -> None:
    """Create an empty store with ``attrs`` beside ``path`` and move it into place (replacing any old store)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with quiet_zarr():
            group = zarr.open_group(LocalStore(tmp), mode="w-", zarr_format=3, attributes={ATTRS_KEY: attrs})
            for name, (shape, chunks, dtype) in expected_layout(attrs).items():
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
    if path.is_symlink():
        # Build and replace the store where the link points, so the link keeps naming it (renaming the
        # link itself aside would leave a ``.trash`` link behind and rmtree would refuse it).
        path = path.resolve()
    attrs = new_attrs(provenance, n=n, image_shape=image_shape, chunk_size=chunk_size)
    check_chunk_bytes(attrs)
    if path.is_file():
        raise AdvpipeError(f"{path} is a file, not a mask store")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = StoreLock.acquire(_lock_path(path), what=f"mask store {path}")
    except OSError as exc:
        raise AdvpipeError(f"cannot create mask store {path}: {exc.strerror or exc}") from exc
    try:
        exists = path.is_dir() and any(path.iterdir())
        raw = _read_local_attrs(path) if exists else None
        if raw is not None and not overwrite:
            old = parse_attrs(raw)
            diff = config_diff(config_of(old), config_of(attrs))
            if old["status"] == "complete":
                made = f" (it was made for another configuration: {'; '.join(diff)})" if diff else ""
                raise OverwriteRefused(f"mask store {path} is complete and immutable{made}; pass overwrite to "
                                       "recompute it", fields=("overwrite",))
            if diff:
                raise OverwriteRefused(f"mask store {path} was made for another configuration ({'; '.join(diff)}); "
                                       "pass overwrite to replace it", fields=("overwrite",))
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
        raise AdvpipeError(f"cannot create mask store {path}: {exc.strerror or exc}") from exc
    except BaseException:
        lock.release()
        raise


class MaskStoreWriter(Chunked):
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
        arrays = open_arrays(self._group, self._attrs, str(path))
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
        if "mask_hash" in self._arrays:  # stores resumed from before mask hashes keep their layout
            data["mask_hash"] = mask_hash(data["masks"], data["sample_hash"])
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
                               f"already done stay valid and rerunning the same command resumes") from exc

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


