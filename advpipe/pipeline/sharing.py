"""Sharing finished mask stores: publish to any fsspec URL, pull into a local cache by digest, pack into one zip.

``publish`` uploads so that readers never see a partial store: chunk data first, then the arrays'
metadata, the manifest, the root ``zarr.json`` (without which nothing opens) and, once the
published manifest was read back and matched, the completion marker. ``pull`` downloads into
``<cache>/masks/<digest hex>.zarr`` (or a given folder), checking every object's sha256 against
the manifest; it writes into a staging folder beside the target, renamed into place at the end, so
a second pull of the same digest does nothing and an interrupted one resumes. ``pack`` writes the
store as one zarr ZipStore file with the same manifest, hence the same digest. See docs/sharing.md.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import advpipe
from advpipe.errors import AdvpipeError, CannotRead, OverwriteRefused
from advpipe.pipeline.location import BATCH_OBJECTS, Location
from advpipe.pipeline.manifest import (
    MANIFEST_KEY,
    MAX_MANIFEST_BYTES,
    PUBLISHED_KEY,
    ContentMismatch,
    Manifest,
    digest_of,
    sha256_hex,
)
from advpipe.pipeline.provenance import now
from advpipe.pipeline.remote import error_line, filesystem, is_url, protocol_of
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.verify import verify_store
from advpipe.progress import task
from advpipe.files import atomic_write_bytes
from advpipe.paths import cache_dir

__all__ = ["PackResult", "PublishResult", "PullResult", "pack", "publish", "pull", "pull_target"]

MARKER_FORMAT = "advpipe-published/1"


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` uploaded: where, the content digest, objects and bytes, seconds taken."""

    url: str
    digest: str
    objects: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class PullResult:
    """What ``pull`` did: the local store, its digest, objects downloaded and already present, bytes fetched."""

    path: Path
    digest: str
    downloaded: int
    present: int
    bytes: int
    already: bool


@dataclass(frozen=True)
class PackResult:
    """The zip ``pack`` wrote, its content digest, objects and size in bytes."""

    path: Path
    digest: str
    objects: int
    bytes: int


def _sound_source(source: str) -> tuple[Location, Manifest]:
    """Refuse a store that is incomplete or fails verification; return it with its (possibly new) manifest."""
    problems = verify_store(source)
    if problems:
        raise AdvpipeError(f"refusing {source}: it fails verification ({len(problems)} problem(s), first: "
                           f"{problems[0]}); run `advpipe masks verify {source}`")
    loc = Location(source)
    manifest = loc.load_manifest()
    if manifest is None:  # a store finished before manifests existed
        manifest = loc.compute_manifest()
        if not loc.is_zip:
            try:
                atomic_write_bytes(Path(loc.root) / MANIFEST_KEY, manifest.raw)
            except OSError:
                pass  # a read-only source: the manifest still travels with the upload
    return loc, manifest


def _object(loc: Location, manifest: Manifest, key: str) -> bytes:
    data = loc.read(key)
    try:
        if data is None:
            raise ContentMismatch(f"object {key!r} listed in its manifest is missing")
        manifest.check(key, data)
    except ContentMismatch as exc:
        raise AdvpipeError(f"{loc.root} changed while it was being copied: {exc}") from exc
    return data


def _phases(manifest: Manifest) -> list[list[str]]:
    """Upload phases, each finished before the next: chunk data, array metadata, manifest, root metadata."""
    order = manifest.upload_order()
    data = [k for k in order if not k.endswith("zarr.json")]
    meta = [k for k in order if k.endswith("zarr.json") and k != "zarr.json"]
    return [data, meta, [MANIFEST_KEY], ["zarr.json"]]


def publish(source: str, url: str, *, storage_options: dict[str, Any] | None = None,
            overwrite: bool = False) -> PublishResult:
    """Verify the local store ``source`` and upload it to ``url`` so that no reader sees a partial store.

    A directory store goes under the prefix ``url``; a zip store (from :func:`pack`) becomes the
    single object ``url``. Refuses an incomplete or failing store, and a destination that holds
    anything unless ``overwrite``. After the upload, the published manifest is read back and must
    match before the completion marker ``advpipe.published.json`` is written.
    """
    if is_url(source):
        raise AdvpipeError(f"publish uploads a local store; `advpipe masks pull {source}` copies a remote one here first")
    if not is_url(url):
        raise AdvpipeError(f"publish uploads to a URL (s3://bucket/prefix, gs://..., any fsspec URL), got {url}; "
                           "`advpipe masks pull STORE DIR` makes a verified local copy")
    started = time.perf_counter()
    is_zip = Location(source).is_zip
    if is_zip != url.lower().endswith(".zip"):
        raise AdvpipeError("a zip store is published as one object whose URL ends in .zip, a directory store "
                           f"under a prefix that does not; got {source} -> {url}")
    # The destination first: a wrong credential or bucket should not wait for a long verification.
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(root)
        existing = {p[len(root) + 1:] for p in fs.find(root)} if not is_zip else set()
        if is_zip and fs.exists(root):
            existing = {""}
        bucket = root.split("/", 1)[0]
        if protocol_of(url) in ("s3", "s3a", "gs", "gcs") and not existing and not fs.exists(bucket):
            raise FileNotFoundError(f"The specified bucket does not exist: {bucket}")
    except Exception as exc:  # noqa: BLE001 - any backend's failure, one line
        raise AdvpipeError(f"cannot publish to {url}: {error_line(exc, url)}") from exc
    if existing and not overwrite:
        state = ("a published store" if PUBLISHED_KEY in existing else
                 "an unfinished publish or another upload (no completion marker)") if not is_zip else "an object"
        raise OverwriteRefused(f"{url} already holds {state}; pass overwrite to replace it", fields=("overwrite",))
    loc, manifest = _sound_source(source)
    try:
        if loc.is_zip:
            fs.put_file(loc.root, root)  # one object: it appears whole or not at all
        else:
            _take_down(fs, root, existing)
            _upload(fs, root, loc, manifest)
    except AdvpipeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise AdvpipeError(f"cannot publish to {url}: {error_line(exc, url)}") from exc
    _confirm(url, storage_options, manifest)
    if not loc.is_zip:
        marker = {"format": MARKER_FORMAT, "digest": manifest.digest, "objects": len(manifest.objects),
                  "bytes": manifest.total_bytes, "published": now(), "advpipe": advpipe.__version__,
                  "host": socket.gethostname()}
        try:
            fs.pipe_file(f"{root}/{PUBLISHED_KEY}", json.dumps(marker, indent=1).encode())
        except Exception as exc:  # noqa: BLE001
            raise AdvpipeError(f"cannot publish to {url}: {error_line(exc, url)}") from exc
    return PublishResult(url, manifest.digest, len(manifest.objects), manifest.total_bytes,
                         time.perf_counter() - started)


def _take_down(fs: Any, root: str, existing: set[str]) -> None:
    """Delete an old copy so that readers see no store, never a mix: marker and metadata first, then the rest."""
    first = [k for k in (PUBLISHED_KEY, "zarr.json", MANIFEST_KEY) if k in existing]
    for key in first:
        fs.rm_file(f"{root}/{key}")
    rest = [f"{root}/{k}" for k in sorted(existing - set(first))]
    if rest:
        fs.rm(rest)
    fs.invalidate_cache(root)


def _upload(fs: Any, root: str, loc: Location, manifest: Manifest) -> None:
    with task("publish", total=manifest.total_bytes + len(manifest.raw), unit="B") as bar:
        for phase in _phases(manifest):
            for start in range(0, len(phase), BATCH_OBJECTS):
                batch = phase[start:start + BATCH_OBJECTS]
                blobs = {f"{root}/{key}": (manifest.raw if key == MANIFEST_KEY else _object(loc, manifest, key))
                         for key in batch}
                fs.pipe(blobs)  # concurrent within the batch; the batch ends before the next begins
                bar.advance(sum(map(len, blobs.values())))


def _confirm(url: str, storage_options: dict[str, Any] | None, manifest: Manifest) -> None:
    """Read the published copy's manifest back and compare it and the object listing with what was sent."""
    remote = Location(url, storage_options)
    if not remote.is_zip:
        remote.fs()[0].invalidate_cache(remote.fs()[1])
        raw = remote.read(MANIFEST_KEY, MAX_MANIFEST_BYTES)
        problems = [] if raw is not None and digest_of(raw) == manifest.digest else ["its manifest differs"]
        if remote.can_list:
            problems += manifest.diff(remote.list_objects())
    else:
        got = open_store(url, storage_options=storage_options).digest
        problems = [] if got == manifest.digest else [f"its digest is {got}"]
    if problems:
        raise AdvpipeError(f"the published copy at {url} does not match {manifest.digest}: {'; '.join(problems)}")


def pull_target(digest: str) -> Path:
    """The cache folder a pull of ``digest`` goes to: ``<cache>/masks/<hex>.zarr``."""
    return cache_dir() / "masks" / f"{digest.removeprefix('sha256:')}.zarr"


def _pulled(path: Path, digest: str) -> bool:
    try:
        return digest_of((path / MANIFEST_KEY).read_bytes()) == digest
    except OSError:
        return False


def pull(url: str, dest: str | os.PathLike[str] | None = None, *, storage_options: dict[str, Any] | None = None,
         digest: str | None = None) -> PullResult:
    """Download the store at ``url`` into ``dest`` (default: the cache folder of its digest), verifying every object.

    ``digest`` (or ``url#sha256=...``) pins it. Pulling a digest already present does nothing (with
    a pin and no ``dest``, without even asking the server); an interrupted pull resumes, keeping the
    objects it had written whose sha256 matches the manifest.
    """
    loc = Location(url, storage_options, digest)
    if loc.pin is not None and dest is None and _pulled(pull_target(loc.pin), loc.pin):
        return PullResult(pull_target(loc.pin), loc.pin, 0, 0, 0, already=True)
    manifest = loc.load_manifest()
    if manifest is None and not loc.exists("zarr.json"):
        raise CannotRead(f"cannot open mask store {loc.root}: {loc.missing or 'not found'}")
    if manifest is None:
        raise AdvpipeError(f"{url} has no manifest ({MANIFEST_KEY}), so it cannot be pulled and verified; "
                           "its publisher makes one with `advpipe masks publish`")
    target = Path(dest).absolute() if dest is not None else pull_target(manifest.digest)
    if _pulled(target, manifest.digest):
        return PullResult(target, manifest.digest, 0, len(manifest.objects), 0, already=True)
    if target.exists():
        raise AdvpipeError(f"{target} exists and is not a copy of {manifest.digest}; choose another folder")
    staging = target.with_name(f".{target.name}.pull-{manifest.digest[7:23]}")
    present, needed = [], []
    for key in manifest.upload_order():
        size, sha = manifest.objects[key]
        path = staging / key
        if path.is_file() and path.stat().st_size == size and sha256_hex(path.read_bytes()) == sha:
            present.append(key)
        else:
            needed.append(key)
    fetched = 0
    real = os.path.realpath(staging)
    with task("pull", total=sum(manifest.objects[k][0] for k in needed), unit="B") as bar:
        for key, data in loc.read_many(needed, {k: manifest.objects[k][0] for k in needed}):
            try:
                if data is None:
                    raise ContentMismatch(f"object {key!r} listed in its manifest is missing")
                manifest.check(key, data)
            except ContentMismatch as exc:
                raise AdvpipeError(f"refusing {loc.root}: {exc}") from exc
            path = staging / key
            if not os.path.realpath(path).startswith(real + os.sep):
                raise AdvpipeError(f"refusing to write {key!r} outside {staging}")
            atomic_write_bytes(path, data)  # whole or not at all: a killed pull leaves no half object
            fetched += len(data)
            bar.advance(len(data))
    atomic_write_bytes(staging / MANIFEST_KEY, manifest.raw)
    problems = verify_store(staging, digest=manifest.digest)
    if problems:
        raise AdvpipeError(f"the copy of {url} in {staging} fails verification: {problems[0]}")
    os.rename(staging, target)
    return PullResult(target, manifest.digest, len(needed), len(present), fetched, already=False)


def pack(source: str, out: str | os.PathLike[str], *, overwrite: bool = False) -> PackResult:
    """Write the verified local directory store ``source`` as the single-file zarr ZipStore ``out`` (same digest)."""
    if is_url(source):
        raise AdvpipeError(f"pack reads a local store; `advpipe masks pull {source}` copies a remote one here first")
    out = Path(out).absolute()
    if out.suffix.lower() != ".zip":
        raise AdvpipeError(f"the single-file store must end in .zip, got {out}")
    if out.exists() and not overwrite:
        raise OverwriteRefused(f"{out} exists; pass overwrite to replace it", fields=("overwrite",))
    loc, manifest = _sound_source(source)
    if loc.is_zip:
        raise AdvpipeError(f"{source} is already a single-file store")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # Stored, not deflated: the chunks are zstd-compressed already, and stored members can be
        # read by offset from HTTP and S3. Fixed timestamps make the same store give the same bytes.
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key in [*manifest.upload_order(), MANIFEST_KEY]:
                    info = zipfile.ZipInfo(key, date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, manifest.raw if key == MANIFEST_KEY else _object(loc, manifest, key))
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename publishes it, as files.atomic_write_bytes does
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    got = open_store(out).digest
    if got != manifest.digest:
        out.unlink()
        raise AdvpipeError(f"the zip written for {source} reads back with digest {got}, not {manifest.digest}")
    return PackResult(out, manifest.digest, len(manifest.objects), out.stat().st_size)
