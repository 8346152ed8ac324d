"""Hostile mask stores (issue 18, the store side): each is refused by the CLI, as a user runs it, with exit code 2,
exactly one ``error:`` line, no traceback, in bounded time and (in a subprocess, measured with ``wait4``) under
2 GB peak memory.

One test per failure class: masks that lie about their rows (1), metadata that makes training read something
other than verify checks (2), objects that would allocate or wait without bound (6), and the store's messages
and overwrite (7, 8). ``masks verify`` reports a damaged store as problems with exit code 1; a store it cannot
reach or that breaks a bound is bad input, exit code 2.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers.hostile import MEMORY_LIMIT_KB, cli
from helpers.sharing import RangeHandler, tiny_store
from advpipe.data.datasets import load_dataset

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in:UserWarning",
                                        "ignore:Consolidated metadata is:UserWarning")

N, CHUNK = 48, 16  # three chunks
TIME_LIMIT_S = 60


def run(*args: str, env: dict | None = None) -> dict:
    """Run the CLI in this process (typer's runner): for the cases where memory is not the question."""
    from typer.testing import CliRunner

    from advpipe.cli import app

    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        result = CliRunner().invoke(app, list(args))
    text = result.output + ("".join(__import__("traceback").format_exception(result.exc_info[1]))
                            if result.exc_info and not isinstance(result.exc_info[1], SystemExit) else "")
    return {"rc": result.exit_code, "out": text, "seconds": time.monotonic() - started, "rss_kb": 0}


def refused(result: dict, *needles: str, rc: int = 2) -> str:
    """Assert a one-line refusal (or, with rc=1, a verify problem report) within the bounds; return its line."""
    out = result["out"]
    assert result["rc"] == rc, out
    assert "Traceback" not in out, out
    assert result["seconds"] < TIME_LIMIT_S, result
    assert result["rss_kb"] < MEMORY_LIMIT_KB, result
    if rc == 2:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out
        line = errors[0]
    else:
        line = out
    for needle in needles:
        assert needle in line, out
    return line


@pytest.fixture(scope="module")
def ds():
    return load_dataset("embedded", "train", limit=N)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, ds) -> Path:
    return tiny_store(tmp_path_factory.mktemp("hostile") / "masks.zarr", ds, chunk_size=CHUNK)


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "masks.zarr"))


def _show(store: str, tmp_path: Path, sub: bool = False) -> dict:
    """``masks show`` reads masks through the same reader as training (open_store, read_masks)."""
    return (cli if sub else run)("masks", "show", store, "--n", str(N), "--out", str(tmp_path / "grid.png"))


def _mask_chunk(store: Path, i: int) -> Path:
    return store / "masks" / "c" / str(i) / "0" / "0"


def _drop_manifest(store: Path) -> None:
    """Delete the store's manifest, as a forger would: every object read is checked against it (issue 24)."""
    (store / "advpipe.manifest.json").unlink()


# -- class 1: masks tied to the rows that describe them ----------------------------------------------------------
def test_lying_masks_are_refused_naming_the_rows(store: Path, tmp_path: Path, pristine: Path) -> None:
    swapped = Path(shutil.copytree(store, tmp_path / "swapped.zarr"))
    a, b = _mask_chunk(swapped, 1), _mask_chunk(swapped, 2)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    refused(_show(str(swapped), tmp_path), "object 'masks/c/1/0/0' differs from manifest")  # its own manifest
    _drop_manifest(swapped)  # a forger would: the rows still give the swap away
    line = refused(_show(str(swapped), tmp_path), "masks disagree with their rows", "first indices [16,")
    assert "mask_hash" in line
    report = refused(run("masks", "verify", str(swapped)), "chunk 1:", "chunk 2:", "disagree with their rows", rc=1)
    assert "first indices [16," in report and "first indices [32," in report

    for value in (True, False):  # rewritten through zarr: every checksum valid
        forged = Path(shutil.copytree(store, tmp_path / f"all-{value}.zarr"))
        masks = zarr.open_group(str(forged), mode="r+")["masks"]
        masks.with_config({"write_empty_chunks": True})[...] = np.full(masks.shape, value)
        _drop_manifest(forged)
        refused(_show(str(forged), tmp_path), "masks disagree with their rows", "first indices [")
        refused(run("masks", "verify", str(forged)), "disagree with their rows", rc=1)

    # a mask chunk linked to a valid chunk of another store (same layout, other masks)
    other = tiny_store(tmp_path / "other.zarr", load_dataset("embedded", "train", limit=N), chunk_size=CHUNK,
                       invert=True)
    linked = Path(shutil.copytree(store, tmp_path / "linked.zarr"))
    _mask_chunk(linked, 1).unlink()
    _mask_chunk(linked, 1).symlink_to(_mask_chunk(other, 1))
    refused(_show(str(linked), tmp_path), "object masks/c/1/0/0 is a symlink pointing out of the store")
    refused(run("masks", "verify", str(linked)), "masks/c/1/0/0 is a symlink", rc=1)
    # the honest store passes both
    assert run("masks", "verify", str(pristine))["rc"] == 0


# -- class 2: one validation path for every read ----------------------------------------------------------------
def _edit_masks_metadata(store: Path, edit) -> None:
    root = json.loads((store / "zarr.json").read_text())
    edit(root["consolidated_metadata"]["metadata"]["masks"])
    (store / "zarr.json").write_text(json.dumps(root))
    own = json.loads((store / "masks" / "zarr.json").read_text())
    edit(own)
    (store / "masks" / "zarr.json").write_text(json.dumps(own))


def test_metadata_that_would_read_fill_values_or_skip_checksums_is_refused(store: Path, tmp_path: Path) -> None:
    _drop_manifest(store)
    v2 = Path(shutil.copytree(store, tmp_path / "v2.zarr"))
    _edit_masks_metadata(v2, lambda m: m.update(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}},
                                                fill_value=True))
    refused(_show(str(v2), tmp_path), "chunk_key_encoding", "'v2'")
    refused(run("masks", "info", str(v2)), "chunk_key_encoding")
    refused(run("masks", "verify", str(v2)), "chunk_key_encoding", rc=1)

    no_crc = Path(shutil.copytree(store, tmp_path / "no-crc.zarr"))
    _edit_masks_metadata(no_crc, lambda m: m.update(codecs=[c for c in m["codecs"] if c["name"] != "crc32c"]))
    refused(_show(str(no_crc), tmp_path), "no crc32c codec")


# -- class 6: bounds before any allocation or wait --------------------------------------------------------------
def _zstd_bomb(size: int) -> bytes:
    """A real zstd frame declaring ``size`` bytes: RLE blocks of 128 KiB, 4 bytes each (3 GiB in 96 KiB)."""
    block = 1 << 17
    frame = bytearray(struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", size))  # single segment, 8-byte size
    n_blocks = size // block
    for i in range(n_blocks):
        header = (1 if i == n_blocks - 1 else 0) | (1 << 1) | (block << 3)  # last flag, type RLE, block size
        frame += header.to_bytes(3, "little") + b"\0"
    return bytes(frame)


def _with_crc32c(data: bytes) -> bytes:
    from zarr.codecs import Crc32cCodec
    from zarr.core.array_spec import ArrayConfig, ArraySpec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.buffer.cpu import Buffer
    from zarr.core.dtype import parse_data_type
    from zarr.core.sync import sync

    spec = ArraySpec(shape=(1,), dtype=parse_data_type("uint8", zarr_format=3), fill_value=0,
                     config=ArrayConfig.from_dict({}), prototype=default_buffer_prototype())
    return sync(Crc32cCodec()._encode_single(Buffer.from_bytes(data), spec)).to_bytes()


def test_bombs_special_files_and_huge_declarations_stay_bounded(store: Path, tmp_path: Path) -> None:
    bomb = Path(shutil.copytree(store, tmp_path / "bomb.zarr"))
    frame = _with_crc32c(_zstd_bomb(3 << 30))
    assert len(frame) < 100_000
    _mask_chunk(bomb, 1).write_bytes(frame)
    refused(_show(str(bomb), tmp_path, sub=True), "zstd frame declares 3221225472 bytes", "refusing to decompress")
    refused(cli("masks", "verify", str(bomb)), "zstd frame declares 3221225472 bytes", rc=1)

    zero = Path(shutil.copytree(store, tmp_path / "zero.zarr"))
    _mask_chunk(zero, 1).unlink()
    _mask_chunk(zero, 1).symlink_to("/dev/zero")
    refused(_show(str(zero), tmp_path, sub=True), "is a symlink pointing out of the store (to /dev/zero)")
    refused(run("masks", "verify", str(zero)), "is a symlink pointing out of the store", rc=1)

    fifo = Path(shutil.copytree(store, tmp_path / "fifo.zarr"))
    _mask_chunk(fifo, 1).unlink()
    os.mkfifo(_mask_chunk(fifo, 1))
    refused(_show(str(fifo), tmp_path), "object masks/c/1/0/0 is not a plain file")
    refused(run("masks", "verify", str(fifo)), "is not a plain file", rc=1)

    inside = Path(shutil.copytree(store, tmp_path / "inside.zarr"))  # a link to a chunk of the same store
    _mask_chunk(inside, 1).unlink()
    _mask_chunk(inside, 1).symlink_to(_mask_chunk(inside, 0))
    refused(_show(str(inside), tmp_path), "is a symlink inside the store")

    # a 50 MB attribute: refused from the size of the root zarr.json, before it is parsed or printed
    big = Path(shutil.copytree(store, tmp_path / "big-attr.zarr"))
    root = json.loads((big / "zarr.json").read_text())
    root["attributes"]["advpipe"]["attack"]["note"] = "x" * (50 << 20)
    (big / "zarr.json").write_text(json.dumps(root))
    refused(cli("masks", "info", str(big)), "object zarr.json is", "(limit 1048576)")
    refused(run("masks", "show", str(big), "--out", str(tmp_path / "g.png")), "object zarr.json is")
    assert run("masks", "verify", str(big))["rc"] == 1


def test_a_store_declaring_1e8_samples_is_verified_in_bounded_memory(tmp_path: Path) -> None:
    from advpipe.pipeline.writer import create_store

    prov = {"dataset": {"name": "x", "split": "train", "fingerprint": "f"},
            "model": {"arch": "a", "checkpoint_sha256": "0" * 64, "clean_accuracy": 0.5},
            "attack": {"eps": "8/255"}, "seed": 0}
    path = tmp_path / "huge.zarr"
    create_store(path, n=10**8, image_shape=(1, 1, 1), chunk_size=10**6, provenance=prov).close()
    group = zarr.open_group(str(path), mode="r+")
    group["chunk_done"][...] = True  # every chunk claims to be done; no data object exists
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["advpipe"].update(status="complete", summary={"n": 10**8})
    (path / "zarr.json").write_text(json.dumps(root))
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 300_000
    refused(cli("masks", "verify", str(path)), "chunk 99: file", "is missing", rc=1)

    # one chunk of 10^8 samples would decode to 4.7 GB: refused from the attributes
    root["attributes"]["advpipe"]["chunk_size"] = 10**8
    (path / "zarr.json").write_text(json.dumps(root))
    refused(run("masks", "info", str(path)), "makes one chunk of every array decode to")


class _SilentOnChunks(RangeHandler):
    """Serves metadata; never answers a chunk request."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "/c/" in self.path:
            time.sleep(30)
            return
        super().do_GET()


def test_verify_over_http_gives_up_within_the_timeout(store: Path) -> None:
    import functools

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_SilentOnChunks, directory=str(store)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = cli("masks", "verify", url, env={"ADVPIPE_REMOTE_TIMEOUT": "1"}, timeout=30)
        line = refused(result, "no answer within 1 s")
        assert "corrupt" not in line and result["seconds"] < 20, result
    finally:
        server.shutdown()
        server.server_close()


# -- classes 7 and 8: messages, and the store side of overwrite -------------------------------------------------
def test_messages_never_leak_files_and_summaries_never_lie(store: Path, tmp_path: Path) -> None:
    passwd = Path(shutil.copytree(store, tmp_path / "passwd.zarr"))
    _mask_chunk(passwd, 1).unlink()
    _mask_chunk(passwd, 1).symlink_to("/etc/passwd")
    tail = Path("/etc/passwd").read_bytes()[-4:]
    for result in (_show(str(passwd), tmp_path), run("masks", "verify", str(passwd))):
        assert "root:" not in result["out"] and repr(tail)[2:-1] not in result["out"], result["out"]
    refused(_show(str(passwd), tmp_path), "symlink pointing out of the store")

    lying = Path(shutil.copytree(store, tmp_path / "summary.zarr"))
    root = json.loads((lying / "zarr.json").read_text())
    root["attributes"]["advpipe"]["summary"]["asr"] = 0.123
    root["attributes"]["advpipe"]["model"]["arch"] = "[/red][bold]x"  # store text is never rich markup
    (lying / "zarr.json").write_text(json.dumps(root))
    refused(run("masks", "info", str(lying)), "object 'zarr.json' differs from manifest")  # its own manifest
    (lying / "advpipe.manifest.json").unlink()  # a forger drops it: the summary is still checked
    info = run("masks", "info", str(lying))
    assert info["rc"] == 0 and "Traceback" not in info["out"], info["out"]
    assert "warning: the stored summary disagrees with the arrays (asr: stored 0.123" in info["out"]
    assert "[/red][bold]x" in info["out"]

    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "zarr.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(run("masks", "info", str(nested)), "cannot open mask store")


def test_overwrite_through_a_symlink_and_a_nested_zarr_json(tmp_path: Path, ds) -> None:
    from advpipe.errors import AdvpipeError
    from advpipe.pipeline.reader import open_store
    from advpipe.pipeline.writer import create_store

    real = tiny_store(tmp_path / "real.zarr", ds, chunk_size=CHUNK)
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    prov = json.loads((real / "zarr.json").read_text())["attributes"]["advpipe"]
    caller = {key: prov[key] for key in ("model", "attack", "seed")}
    caller["dataset"] = {k: prov["dataset"][k] for k in ("name", "split", "fingerprint")}
    writer = create_store(link, n=N, image_shape=ds.image_shape, chunk_size=CHUNK, provenance=caller, overwrite=True)
    writer.close()
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert not [p for p in tmp_path.iterdir() if ".trash" in p.name or ".tmp" in p.name]
    assert open_store(link).provenance["status"] == "in-progress"  # the fresh store, where the link points

    nested = tmp_path / "nested.zarr"
    nested.mkdir()
    (nested / "zarr.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdvpipeError, match="is not an advpipe mask store .*nests too deeply"):
        create_store(nested, n=N, image_shape=ds.image_shape, chunk_size=CHUNK, provenance=caller, overwrite=True)


# -- issue 24: training trusts no less than `masks verify` -------------------------------------------------------
def _random_masks_same_counts(store: Path) -> None:
    """Move every mask to random pixels, keeping each row's pixel count, and recompute ``mask_hash`` to match."""
    from advpipe.pipeline.codecs import mask_hash

    group = zarr.open_group(str(store), mode="r+")
    masks = group["masks"][:]
    rng = np.random.default_rng(0)
    moved = np.stack([rng.permutation(m.ravel()).reshape(m.shape) for m in masks])
    assert (moved != masks).any() and (moved.sum((1, 2)) == masks.sum((1, 2))).all()
    group["masks"].with_config({"write_empty_chunks": True})[...] = moved
    group["mask_hash"][...] = mask_hash(moved, group["sample_hash"][:])


def _drop_mask_hashes(store: Path) -> None:
    """Delete the ``mask_hash`` array and its rule attribute: what once made a store read as written before them."""
    shutil.rmtree(store / "mask_hash")
    root = json.loads((store / "zarr.json").read_text())
    del root["consolidated_metadata"]["metadata"]["mask_hash"]
    del root["attributes"]["advpipe"]["mask_hash"]
    (store / "zarr.json").write_text(json.dumps(root))


def _train(store: Path, tmp_path: Path) -> dict:
    return run("train", "--data", "embedded", "--limit", str(N), "--epochs", "1", "--batch-size", "16",
               "--device", "cpu", "--aug", "advmask", "--masks", str(store), "--out", str(tmp_path / "run"))


def test_training_refuses_what_verify_refuses(store: Path, tmp_path: Path) -> None:
    import advpipe
    from advpipe.errors import AdvpipeError, DamagedStore
    from advpipe.pipeline.location import write_manifest

    # masks moved with their hashes recomputed, the store's own manifest left as it was
    moved = Path(shutil.copytree(store, tmp_path / "moved.zarr"))
    _random_masks_same_counts(moved)
    refused(run("masks", "verify", str(moved)), "differs from manifest", rc=1)
    refused(_train(moved, tmp_path), "mask store", "object 'masks/c/0/0/0' differs from manifest sha256:")
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(DamagedStore, match="differs from manifest"):
        advpipe.open_masks(moved).masks(range(N))

    # the same store with its mask hashes deleted and its manifest rewritten: refused, saying how to recompute it
    legacy = Path(shutil.copytree(moved, tmp_path / "legacy.zarr"))
    _drop_mask_hashes(legacy)
    write_manifest(legacy)
    result = _train(legacy, tmp_path)
    line = refused(result, "predates per-sample mask hashes", "refusing it",
                   "Recompute it: advpipe precompute-masks --data embedded --split train")
    assert "--overwrite" in line and "WARNING" not in result["out"]  # no longer read with a warning
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(AdvpipeError, match="predates per-sample mask hashes"):
        advpipe.open_masks(legacy)
    refused(run("masks", "verify", str(legacy)), "predates per-sample mask hashes", rc=1)
    assert advpipe.open_masks(store).masks(range(N)).shape == (N, 32, 32)  # the honest store reads
