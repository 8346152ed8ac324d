"""Content manifest of a mask store: every object's sha256 and size, and one digest over the manifest.

The manifest (``advpipe.manifest.json`` at the store's root) is canonical JSON, so the same store
content always gives the same bytes; its sha256, written ``sha256:<64 hex>``, is the store's
content digest. A consumer pins that digest: a store whose manifest hashes to anything else, or
whose objects differ from what the manifest lists, is refused naming the object or the digests.
The manifest says nothing about where a store lives, so a directory store, its published copy and
its single-file zip (:func:`advpipe.pipeline.sharing.pack`) have the same digest.

Manifests come from other teams, so :func:`parse_manifest` bounds and validates everything. The
operations on a store (load, compute, compare, write) take a
:class:`advpipe.pipeline.location.StoreReader`, whatever the backend.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from advpipe.errors import AdvpipeError, StoreUnreachable
from advpipe.files import atomic_write_bytes

if TYPE_CHECKING:
    from advpipe.pipeline.location import StoreReader

MANIFEST_KEY = "advpipe.manifest.json"
#: written last by ``advpipe masks publish``, after the published copy's manifest was re-read
PUBLISHED_KEY = "advpipe.published.json"
#: objects of the store that the manifest does not list (itself and the publish marker)
UNLISTED = (MANIFEST_KEY, PUBLISHED_KEY)
FORMAT = "advpipe-manifest/1"
MAX_MANIFEST_BYTES = 64 << 20  # about 500,000 objects
MAX_OBJECTS = 1_000_000
MAX_OBJECT_BYTES = (1 << 30) + (1 << 20)  # a decoded chunk is at most 1 GiB; encoded ones are smaller
MAX_METADATA_BYTES = 16 << 20  # one zarr.json
MAX_ROOT_METADATA_BYTES = 1 << 20  # the root zarr.json: attributes and consolidated metadata (about 20 KB)
MAX_KEY_LENGTH = 512
_HEX = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def check_key(key: Any, where: str = "store") -> str:
    """Return ``key`` if it is a safe relative object key (no ``..``, no absolute path, plain characters)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise AdvpipeError(f"{where}: refusing object key {key!r:.120}: keys are relative paths of letters, digits, "
                           f"'.', '_' and '-' (at most {MAX_KEY_LENGTH} characters)")
    if any(part in (".", "..") for part in key.split("/")):
        raise AdvpipeError(f"{where}: refusing object key {key!r:.120}: it contains '..' or '.'")
    return key


def size_limit(key: str) -> int:
    """The largest object a store may hold under ``key`` (metadata documents are kept small)."""
    if key == "zarr.json":
        return MAX_ROOT_METADATA_BYTES  # the attributes: no honest provenance comes near it
    return MAX_METADATA_BYTES if key.endswith("zarr.json") else MAX_OBJECT_BYTES


def normalize_digest(text: Any) -> str:
    """Return a content digest as ``sha256:<64 lowercase hex>``; accepts that form or the bare hex."""
    raw = str(text).strip().lower() if isinstance(text, str) else ""
    hexpart = raw.removeprefix("sha256:")
    if not _HEX.fullmatch(hexpart):
        raise AdvpipeError(f"a content digest is 'sha256:' and 64 hex digits (as `advpipe masks info` shows), "
                           f"got {text!r:.100}")
    return f"sha256:{hexpart}"


def digest_of(raw: bytes) -> str:
    """Return the content digest of a manifest's bytes."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sha256_hex(data: bytes) -> str:
    """Return the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


class ContentMismatch(Exception):
    """An object of a store differs from the store's manifest (raised inside zarr reads, turned into AdvpipeError)."""


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: object key -> (size, sha256 hex), its canonical bytes and its digest."""

    objects: dict[str, tuple[int, str]]
    raw: bytes = field(repr=False)
    pinned: bool = False

    @property
    def digest(self) -> str:
        """The content digest ``sha256:<hex>`` of the manifest bytes."""
        return digest_of(self.raw)

    @property
    def total_bytes(self) -> int:
        """The summed size of every listed object."""
        return sum(size for size, _ in self.objects.values())

    def _named(self) -> str:
        return f"manifest {self.digest}" + (" (pinned)" if self.pinned else "")

    def check(self, key: str, data: bytes) -> None:
        """Raise ContentMismatch unless ``data`` is exactly the object the manifest lists under ``key``."""
        if key in UNLISTED:
            return
        entry = self.objects.get(key)
        if entry is None:
            raise ContentMismatch(f"object {key!r} is not listed in {self._named()}")
        size, digest = entry
        got = sha256_hex(data)
        if len(data) != size or got != digest:
            raise ContentMismatch(f"object {key!r} differs from {self._named()}: sha256 {got[:16]}..., "
                                  f"{len(data)} bytes vs listed {digest[:16]}..., {size} bytes")

    def diff(self, listing: Mapping[str, int]) -> list[str]:
        """Describe every object missing from, added to or resized in ``listing`` (key -> size)."""
        problems = []
        missing = sorted(set(self.objects) - set(listing))
        extra = sorted(set(listing) - set(self.objects) - set(UNLISTED))
        resized = sorted(k for k in set(self.objects) & set(listing) if listing[k] != self.objects[k][0])
        if missing:
            problems.append(f"{len(missing)} object(s) listed in {self._named()} are missing (first {missing[:3]})")
        if extra:
            problems.append(f"{len(extra)} object(s) are not listed in {self._named()} (first {extra[:3]})")
        for key in resized[:5]:
            problems.append(f"object {key!r} is {listing[key]} bytes, {self._named()} lists {self.objects[key][0]}")
        if len(resized) > 5:
            problems.append(f"... and {len(resized) - 5} more objects of another size than listed")
        return problems

    def upload_order(self) -> list[str]:
        """Keys in the order that never exposes a partial store: chunk data, then array metadata, root metadata last."""
        def rank(key: str) -> tuple[int, str]:
            return (2 if key == "zarr.json" else 1 if key.endswith("zarr.json") else 0, key)

        return sorted(self.objects, key=rank)


def encode_manifest(objects: Mapping[str, tuple[int, str]]) -> bytes:
    """Return the canonical manifest bytes for ``objects`` (key -> (size, sha256 hex))."""
    body = {"format": FORMAT, "hash": "sha256",
            "objects": {key: {"size": size, "sha256": digest} for key, (size, digest) in sorted(objects.items())}}
    return (json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n").encode()


def build_manifest(objects: Mapping[str, tuple[int, str]]) -> Manifest:
    """Return the manifest of ``objects`` (key -> (size, sha256 hex)); the store's own marker files are left out."""
    listed = {check_key(k): v for k, v in objects.items() if k not in UNLISTED}
    if "zarr.json" not in listed:
        raise AdvpipeError("a mask store's manifest must list its root zarr.json")
    return Manifest(listed, encode_manifest(listed))


def parse_manifest(raw: bytes, where: str, pinned: str | None = None) -> Manifest:
    """Validate a (possibly foreign) manifest's bytes; refuse it unless its digest equals ``pinned`` (if given)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise AdvpipeError(f"{where}: manifest is {len(raw)} bytes (limit {MAX_MANIFEST_BYTES})")
    if pinned is not None and digest_of(raw) != pinned:
        raise AdvpipeError(f"{where}: content digest {digest_of(raw)} differs from the pinned {pinned}: "
                           f"this is not the store that was pinned")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdvpipeError(f"{where}: manifest is not JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("hash") != "sha256":
        raise AdvpipeError(f"{where}: manifest format must be {FORMAT!r} with hash 'sha256'")
    entries = body.get("objects")
    if not isinstance(entries, dict) or not 0 < len(entries) <= MAX_OBJECTS:
        raise AdvpipeError(f"{where}: manifest must list between 1 and {MAX_OBJECTS} objects")
    objects: dict[str, tuple[int, str]] = {}
    for key, entry in entries.items():
        check_key(key, f"{where} manifest")
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= size_limit(key):
            raise AdvpipeError(f"{where}: manifest size of {key!r} must be an integer in [0, {size_limit(key)}], "
                               f"got {size!r:.40}")
        if not isinstance(digest, str) or not _HEX.fullmatch(digest):
            raise AdvpipeError(f"{where}: manifest sha256 of {key!r} must be 64 lowercase hex digits")
        objects[key] = (size, digest)
    if "zarr.json" not in objects or set(objects) & set(UNLISTED):
        raise AdvpipeError(f"{where}: manifest must list the root zarr.json and not itself")
    return Manifest(objects, bytes(raw), pinned=pinned is not None)


def load_manifest(reader: StoreReader) -> Manifest | None:
    """Read and validate the store's manifest (refused unless its digest is the pinned one, if pinned)."""
    raw = reader.read(MANIFEST_KEY, MAX_MANIFEST_BYTES)
    if raw is None:
        if reader.pin is not None:
            why = f" ({reader.missing})" if reader.missing else ""
            raise AdvpipeError(f"mask store {reader.root} has no manifest {MANIFEST_KEY}{why}, so its content cannot be "
                               f"checked against the pinned {reader.pin}")
        return None
    return parse_manifest(raw, f"mask store {reader.root}", reader.pin)


def compute_manifest(reader: StoreReader) -> Manifest:
    """Hash every object of the store into a fresh manifest."""
    if not reader.can_list:
        raise AdvpipeError(f"cannot list the objects of {reader.root}; make the manifest where the store was written")
    listing = reader.list_objects()
    keys = sorted(k for k in listing if k not in UNLISTED)
    objects = {}
    for key, data in reader.read_many(keys, listing):
        if data is None:
            raise AdvpipeError(f"object {reader.name(key)} vanished while hashing the store")
        objects[key] = (len(data), sha256_hex(data))
    return build_manifest(objects)


def write_manifest_of(reader: StoreReader) -> Manifest:
    """Hash every object of the local directory store ``reader`` reads and write its manifest there (atomically)."""
    manifest = compute_manifest(reader)
    atomic_write_bytes(Path(reader.root) / MANIFEST_KEY, manifest.raw)
    return manifest


def manifest_problems(reader: StoreReader, manifest: Manifest | None) -> list[str]:
    """Compare the store's objects with ``manifest``: missing, extra, resized and changed objects."""
    if manifest is None:
        return []
    try:
        listing = reader.list_objects() if reader.can_list else None
    except AdvpipeError as exc:
        return [str(exc)]
    problems = manifest.diff(listing) if listing is not None else []
    keys = [k for k in manifest.objects if listing is None or listing.get(k) == manifest.objects[k][0]]
    try:
        for key, data in reader.read_many(keys, {k: v[0] for k, v in manifest.objects.items()}):
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
