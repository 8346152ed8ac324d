"""A store from another team is untrusted: oversized metadata, zip bombs, symlinks out of the store and keys with
``..`` are refused before anything is read or allocated, with one clear message."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.sharing import tiny_store
from advpipe.cli import app
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError
from advpipe.pipeline.location import Location
from advpipe.pipeline.manifest import MANIFEST_KEY, check_key, encode_manifest, parse_manifest
from advpipe.pipeline.sharing import pack, publish, pull
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.verify import verify_store

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in:UserWarning",
                                        "ignore:Consolidated metadata is:UserWarning")
runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load_dataset("embedded", "train", limit=40)
    return tiny_store(tmp_path_factory.mktemp("untrusted") / "masks.zarr", ds)


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "masks.zarr"))


def refused_cheaply(call, match: str, limit_bytes: int = 32 << 20) -> None:
    """``call`` raises AdvpipeError matching ``match`` while Python allocates at most ``limit_bytes``."""
    tracemalloc.start()
    try:
        with pytest.raises(AdvpipeError, match=match):
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit_bytes, peak


def _edit_masks_metadata(store: Path, **changes) -> None:
    """Change the masks array's metadata both in masks/zarr.json and in the root's consolidated copy."""
    root = json.loads((store / "zarr.json").read_text())
    for meta in (root["consolidated_metadata"]["metadata"]["masks"], None):
        if meta is None:
            meta = json.loads((store / "masks" / "zarr.json").read_text())
        if "shape" in changes:
            meta["shape"] = changes["shape"]
        if "chunks" in changes:
            meta["chunk_grid"]["configuration"]["chunk_shape"] = changes["chunks"]
        if meta is not root["consolidated_metadata"]["metadata"]["masks"]:
            (store / "masks" / "zarr.json").write_text(json.dumps(meta))
    (store / "zarr.json").write_text(json.dumps(root))


@pytest.mark.parametrize("changes, match", [
    ({"chunks": [10**9, 32, 32]}, r"array 'masks' is bool shape \(40, 32, 32\) chunks \(1000000000, 32, 32\)"),
    ({"shape": [10**15, 32, 32], "chunks": [10**15, 32, 32]}, r"shape \(1000000000000000, 32, 32\)"),
])
def test_metadata_declaring_a_huge_shape_or_chunk_is_refused(store: Path, changes: dict, match: str) -> None:
    (store / MANIFEST_KEY).unlink()  # a forger would drop it; its checks are tested elsewhere
    _edit_masks_metadata(store, **changes)
    refused_cheaply(lambda: open_store(store), match)
    result = runner.invoke(app, ["masks", "info", str(store)])
    assert result.exit_code == 2 and "the attributes require" in result.output


def test_attributes_declaring_too_many_chunks_and_huge_metadata_are_refused(store: Path) -> None:
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["advpipe"]["dataset"]["n"] = 10**8
    root["attributes"]["advpipe"]["chunk_size"] = 1
    (store / "zarr.json").write_text(json.dumps(root))
    refused_cheaply(lambda: open_store(store), "object 'zarr.json' differs from manifest")  # its own manifest
    (store / MANIFEST_KEY).unlink()  # a forger would drop it
    refused_cheaply(lambda: open_store(store), "more than 1000000 chunks")
    with open(store / "zarr.json", "r+b") as fh:  # a 4 GiB metadata document (sparse: no disk used)
        fh.truncate(4 << 30)
    refused_cheaply(lambda: open_store(store), r"object zarr.json is 4294967296 bytes \(limit 1048576\)")


def _set_declared_size(zip_path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size the central directory declares for ``member``."""
    raw = bytearray(zip_path.read_bytes())
    at = raw.find(b"PK\x01\x02" + b"\0" * 0)  # first central directory header
    while at != -1:
        name_len = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46: at + 46 + name_len].decode() == member:
            struct.pack_into("<I", raw, at + 24, size)
            zip_path.write_bytes(bytes(raw))
            return
        at = raw.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} not in {zip_path}")


def test_zip_member_declaring_a_huge_size_is_refused_before_reading(pristine: Path, tmp_path: Path) -> None:
    out = pack(str(pristine), tmp_path / "bomb.zip").path
    _set_declared_size(out, "masks/c/0/0/0", 0xFFFFFFF0)
    refused_cheaply(lambda: open_store(out), "zip member masks/c/0/0/0 declares 4294967280 bytes uncompressed")
    result = runner.invoke(app, ["masks", "verify", str(out)])
    # the store is reachable but hostile: verify judges it and reports a problem (exit 1, docs/precompute.md),
    # while exit 2 is for bad input and stores that cannot be reached at all
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == f"1 problem(s) in {out}:" and len(lines) == 2, result.output
    assert lines[1].startswith("- ") and "declares 4294967280 bytes" in lines[1], result.output


@pytest.mark.parametrize("name, mode, match", [
    ("../outside", 0o644, r"refusing object key '\.\./outside'"),
    ("masks/../../outside", 0o644, "contains '..'"),
    ("/etc/passwd", 0o644, "refusing object key '/etc/passwd'"),
    ("extra/link", 0o120777, "zip member extra/link is a symlink"),
])
def test_zip_with_unsafe_members_is_refused(pristine: Path, tmp_path: Path, name: str, mode: int, match: str) -> None:
    out = pack(str(pristine), tmp_path / "store.zip").path
    with zipfile.ZipFile(out, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, b"/etc/passwd")
    refused_cheaply(lambda: open_store(out), match)


def test_symlink_pointing_out_of_the_store_is_refused(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-labels"
    target = store / "labels" / "c" / "0"
    outside.write_bytes(target.read_bytes())  # same bytes even: the link itself is refused
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(AdvpipeError, match=rf"object labels/c/0 is a symlink pointing out of the store \(to {outside}\)"):
        open_store(store).labels()
    assert any("symlink pointing out of the store" in p for p in verify_store(store))
    for command in (["pack", str(store), str(tmp_path / "x.zip")], ["pull", str(store), str(tmp_path / "copy.zarr")]):
        result = runner.invoke(app, ["masks", *command])
        assert result.exit_code == 2 and "symlink pointing out of the store" in result.output, result.output
    with pytest.raises(AdvpipeError, match="symlink pointing out"):
        publish(str(store), "memory://shared/masks.zarr")
    root = store / "zarr.json"
    (tmp_path / "root.json").write_bytes(root.read_bytes())
    root.unlink()
    root.symlink_to(tmp_path / "root.json")
    with pytest.raises(AdvpipeError, match="object zarr.json is a symlink pointing out"):
        open_store(store)


def test_keys_with_dotdot_are_refused(store: Path, tmp_path: Path) -> None:
    for key in ("masks/c/0/0/0", "zarr.json", ".zattrs"):
        assert check_key(key) == key
    for key in ("../x", "a/../b", "a/./b", "/abs", "a//b", "a\\b", "", "x" * 600, "a/b/", "naïve"):
        with pytest.raises(AdvpipeError, match="refusing object key"):
            check_key(key)
    with pytest.raises(AdvpipeError, match="refusing object key"):
        Location(store).read("../masks.zarr.lock")
    # a manifest that lists a key outside the store: a pull would write it outside the target folder
    manifest = parse_manifest((store / MANIFEST_KEY).read_bytes(), "test")
    objects = dict(manifest.objects)
    objects["../../escaped"] = (1, "0" * 64)
    (store / MANIFEST_KEY).write_bytes(encode_manifest(objects))
    refused_cheaply(lambda: open_store(store), r"refusing object key '\.\./\.\./escaped'")
    with pytest.raises(AdvpipeError, match="refusing object key"):
        pull(str(store), tmp_path / "pulled" / "copy.zarr")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "pulled").exists()
    assert not os.path.exists(tmp_path.parent / "escaped")


def test_a_missing_object_of_a_complete_store_is_an_error_whatever_its_key_encoding(store: Path) -> None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    guard = open_store(store).location.wrapper
    for key in ("masks/c/9/0/0", "masks/9.0.0", "l0/9", "labels/c/9"):  # default and v2 encodings
        with pytest.raises(FileNotFoundError, match=f"chunk object {re.escape(key)} is missing"):
            sync(guard.get(key, default_buffer_prototype()))
    assert sync(guard.get("chunk_done/c/9", default_buffer_prototype())) is None  # an absent flag: not done


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}), "chunk_key_encoding"),
    (lambda m: m.update(codecs=[c for c in m["codecs"] if c["name"] != "crc32c"]), "no crc32c codec"),
    (lambda m: m.update(fill_value=True), "fill value True"),
])
def test_layout_edits_are_refused_on_every_read_path(store: Path, edit, message: str) -> None:
    for meta_path in (None, store / "masks" / "zarr.json"):
        if meta_path is None:
            root = json.loads((store / "zarr.json").read_text())
            edit(root["consolidated_metadata"]["metadata"]["masks"])
            (store / "zarr.json").write_text(json.dumps(root))
        else:
            meta = json.loads(meta_path.read_text())
            edit(meta)
            meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdvpipeError, match="object 'zarr.json' differs from manifest"):
        open_store(store)  # the store's own manifest catches the edit first
    (store / MANIFEST_KEY).unlink()  # a forger would drop it
    with pytest.raises(AdvpipeError, match=re.escape(message)):
        open_store(store)  # what training, info, report and show open
    assert any(message in p for p in verify_store(store))


def test_own_array_metadata_that_differs_from_the_consolidated_copy_is_a_problem(store: Path) -> None:
    meta = json.loads((store / "masks" / "zarr.json").read_text())
    meta["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}
    (store / "masks" / "zarr.json").write_text(json.dumps(meta))
    open_store(store)  # readers use the consolidated copy, which is the format's
    assert any("masks/zarr.json differs from the consolidated metadata" in p for p in verify_store(store))
