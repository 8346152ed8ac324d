"""Tests of the advpipe-masks/2 store: writing, resuming, locking, reading (local, plain zarr, HTTP), verifying."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import zarr
import pytest
import torch

from advpipe.errors import AdvpipeError, DamagedStore, OverwriteRefused
from advpipe.pipeline.codecs import METRICS, pack_masks, sample_hash, unpack_masks
from advpipe.pipeline.reader import check_compatible, open_store
from advpipe.pipeline.verify import verify_store
from advpipe.pipeline.writer import MaskStoreWriter, create_store

N, C, H, W, CHUNK = 250, 3, 8, 12, 100  # three chunks, the last one partial
REPO = Path(__file__).resolve().parents[1]


def provenance(eps: object = "8/255", seed: int = 0) -> dict:
    return {
        "dataset": {"name": "toy", "split": "test", "fingerprint": "fp-toy-1"},
        "model": {"arch": "vgg19", "checkpoint_sha256": "ab" * 32, "clean_accuracy": 0.75},
        "attack": {"name": "advmask", "eps": eps, "steps": 200, "alpha": [0.1, 100.0]},
        "seed": seed,
    }


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    masks = rng.random((N, H, W)) < 0.1
    success = rng.random(N) < 0.8
    return {
        "images": images,
        "masks": masks,
        "labels": rng.integers(0, 10, N),
        "sample_hash": sample_hash(images),
        "success": success,
        "clean_correct": rng.random(N) < 0.9,
        "l0": masks.reshape(N, -1).sum(1) * 3,
        "l0_pixels": masks.reshape(N, -1).sum(1),
        "l2": rng.random(N).astype(np.float32),
        "linf": rng.random(N).astype(np.float32),
        "loss": rng.random(N).astype(np.float32),
    }


def write(writer: MaskStoreWriter, data: dict[str, np.ndarray], chunks: list[int] | None = None) -> None:
    for i in writer.pending_chunks() if chunks is None else chunks:
        a, b = writer.chunk_bounds(i)
        metrics = {k: data[k][a:b] for k in METRICS}
        writer.write_chunk(i, data["masks"][a:b], data["labels"][a:b], data["sample_hash"][a:b], metrics)


def new(path: Path, **kw) -> MaskStoreWriter:
    kw.setdefault("provenance", provenance())
    return create_store(path, n=N, image_shape=(C, H, W), chunk_size=CHUNK, **kw)


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return make_data()


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "masks.zarr"
    with new(path) as writer:
        write(writer, make_data())
        writer.finalize()
    return path


@pytest.fixture
def complete_store(pristine_store: Path, tmp_path: Path) -> Path:
    """A finished store of ``make_data()`` that the test may damage (a copy of the pristine one)."""
    return Path(shutil.copytree(pristine_store, tmp_path / "masks.zarr"))


def test_write_finalize_and_read_back(complete_store: Path, data: dict[str, np.ndarray]) -> None:
    store = open_store(complete_store)
    assert store.complete and store.n == N and store.image_shape == (C, H, W) and store.n_chunks == 3
    np.testing.assert_array_equal(store.read_masks(0, N), data["masks"])
    np.testing.assert_array_equal(store.read_masks(95, 105), data["masks"][95:105])
    np.testing.assert_array_equal(store.labels(), data["labels"])
    np.testing.assert_array_equal(store.sample_hashes(), data["sample_hash"])
    for key, values in store.metrics().items():
        np.testing.assert_array_equal(values, data[key].astype(values.dtype))
    prov = store.provenance
    assert prov["attack"]["eps"] == "8/255" and prov["attack"]["alpha"] == [0.1, 100.0]
    assert prov["model"]["checkpoint_sha256"] == "ab" * 32 and prov["seed"] == 0
    assert set(prov["versions"]) >= {"advpipe", "torch", "zarr"} and prov["created"] and prov["completed"]
    # the summary covers the images classified correctly before the attack (Table III's population)
    attacked = data["clean_correct"]
    ok = data["success"] & attacked
    summary = prov["summary"]
    assert summary["n"] == N and summary["n_clean_correct"] == attacked.sum() < N
    assert summary["asr"] == pytest.approx(ok.sum() / attacked.sum())
    assert summary["l0_mean"] == pytest.approx(data["l0"][ok].mean())
    assert summary["l0_pixels_median"] == pytest.approx(np.median(data["l0_pixels"][ok]))
    assert summary["linf_mean"] == pytest.approx(data["linf"][ok].mean())
    assert verify_store(complete_store, fingerprint="fp-toy-1", sample_hashes=data["sample_hash"]) == []


def test_float_eps_is_stored_as_fraction(tmp_path: Path) -> None:
    with new(tmp_path / "s", provenance=provenance(eps=16 / 255)) as writer:
        assert writer._attrs["attack"]["eps"] == "16/255"
    with pytest.raises(AdvpipeError, match="fraction"):
        new(tmp_path / "t", provenance=provenance(eps=0.1234567891))


def test_plain_zarr_reads_store_without_advpipe(complete_store: Path, data: dict[str, np.ndarray], tmp_path: Path) -> None:
    # A fresh interpreter with only zarr: what another team does with the documented example.
    script = textwrap.dedent(
        """
        import sys, numpy as np, zarr
        g = zarr.open_group(sys.argv[1], mode="r")
        a = g.attrs["advpipe"]
        assert a["format"] == "advpipe-masks/2" and a["status"] == "complete"
        assert g["chunk_done"][:].all()
        np.savez(sys.argv[2], masks=g["masks"][:], l0=g["l0"][:], sample_hash=g["sample_hash"][:])
        assert not any(m.startswith("advpipe") for m in sys.modules)
        """
    )
    out = tmp_path / "plain.npz"
    subprocess.run([sys.executable, "-W", "ignore", "-c", script, str(complete_store), str(out)], check=True, timeout=60)
    got = np.load(out)
    np.testing.assert_array_equal(got["masks"], data["masks"])
    np.testing.assert_array_equal(got["l0"], data["l0"])
    np.testing.assert_array_equal(got["sample_hash"], data["sample_hash"])


def test_resume_skips_done_chunks(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "s"
    with new(path) as writer:
        assert writer.pending_chunks() == [0, 1, 2]
        write(writer, data, [0, 2])
    other = make_data(seed=1)
    with new(path) as writer:
        assert writer.pending_chunks() == [1]
        with pytest.raises(AdvpipeError, match="already done"):
            write(writer, other, [0])
        write(writer, data)
        writer.finalize()
    store = open_store(path)
    np.testing.assert_array_equal(store.read_masks(0, N), data["masks"])
    assert len(store.provenance["resumed"]) == 1


def test_finalize_refuses_pending_chunks(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    with new(tmp_path / "s") as writer:
        write(writer, data, [1])
        with pytest.raises(AdvpipeError, match="2 of 3 chunks pending"):
            writer.finalize()


def test_config_change_refused_then_overwrite_replaces(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "s"
    with new(path) as writer:
        write(writer, data, [0])
    with pytest.raises(AdvpipeError, match=r"attack\.eps: store \"8/255\" vs requested \"16/255\""):
        new(path, provenance=provenance(eps="16/255"))
    with pytest.raises(AdvpipeError, match="chunk_size"):
        create_store(path, n=N, image_shape=(C, H, W), chunk_size=50, provenance=provenance())
    with new(path, provenance=provenance(eps="16/255"), overwrite=True) as writer:
        assert writer.pending_chunks() == [0, 1, 2]
        write(writer, data)
        writer.finalize()
    assert open_store(path).provenance["attack"]["eps"] == "16/255"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or trash left behind
    with pytest.raises(OverwriteRefused, match="complete and immutable; pass overwrite to recompute it") as refused:
        new(path, provenance=provenance(eps="16/255"))
    # typed, naming the field (the CLI writes --overwrite), and kept so across processes (dask workers)
    again = pickle.loads(pickle.dumps(refused.value))
    assert type(again) is OverwriteRefused and again.fields == ("overwrite",) and str(again) == str(refused.value)
    with new(path, provenance=provenance(eps="16/255"), overwrite=True) as writer:
        assert writer.pending_chunks() == [0, 1, 2]


def test_overwrite_never_deletes_a_foreign_directory(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.mkdir()
    (path / "thesis.tex").write_text("x")
    with pytest.raises(AdvpipeError, match="not an advpipe mask store"):
        new(path, overwrite=True)
    assert (path / "thesis.tex").exists()
    assert not (tmp_path / "precious.lock").exists()


def test_concurrent_writer_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    first = new(path)
    with pytest.raises(AdvpipeError, match=rf"already being written by pid {os.getpid()}"):
        new(path)
    first.close()
    new(path).close()


def test_lock_of_live_or_foreign_process_is_respected(tmp_path: Path) -> None:
    path = tmp_path / "s"
    for holder in ({"pid": os.getppid(), "hostname": socket.gethostname()}, {"pid": 1, "hostname": "elsewhere"}):
        (tmp_path / "s.lock").write_text(json.dumps({**holder, "time": "t", "token": "x"}))
        with pytest.raises(AdvpipeError, match=f"on host {holder['hostname']}"):
            new(path)
    assert json.loads((tmp_path / "s.lock").read_text())["token"] == "x"


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One child process (imports are slow on 2 shared cores) plays two roles.

    1. A dask-like worker: it unpickles the writer that this process created (and whose lock it
       holds) and writes chunk 1 of the "shared" store.
    2. A writer killed mid-run: it creates the "killed" store, writes chunk 1 and dies with
       os._exit, so nothing cleans up and its lock file stays behind.
    """
    root = tmp_path_factory.mktemp("child")
    data = make_data()
    np.savez(root / "data.npz", **data)
    owner = new(root / "shared")
    (root / "writer.pkl").write_bytes(pickle.dumps(owner))
    script = textwrap.dedent(
        f"""
        import os, pickle, sys
        from pathlib import Path
        import numpy as np
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        from test_store import new, write
        root = Path({str(root)!r})
        data = dict(np.load(root / "data.npz"))
        write(pickle.loads((root / "writer.pkl").read_bytes()), data, [1])
        write(new(root / "killed"), data, [1])
        os._exit(7)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    write(owner, data, [0, 2])  # while the child starts up
    assert proc.wait(timeout=120) == 7
    yield {"root": root, "owner": owner, "pid": proc.pid, "data": data}
    owner.close()


def test_chunks_written_from_another_process(child: dict) -> None:
    owner, data, path = child["owner"], child["data"], child["root"] / "shared"
    assert owner.pending_chunks() == []
    owner.finalize()
    copy = pickle.loads(pickle.dumps(owner))
    with pytest.raises(AdvpipeError, match="only the process that called create_store"):
        copy.finalize()
    with pytest.raises(AdvpipeError, match="no longer holds its lock"):
        write(copy, data, [0])
    assert verify_store(path) == []
    np.testing.assert_array_equal(open_store(path).read_masks(0, N), data["masks"])


def test_killed_writer_leaves_stale_lock_that_is_taken_over(child: dict) -> None:
    path, data = child["root"] / "killed", child["data"]
    lock = json.loads(path.with_name("killed.lock").read_text())
    assert lock["pid"] == child["pid"] and lock["hostname"] == socket.gethostname()
    with new(path) as writer:
        assert writer.pending_chunks() == [0, 2]
        write(writer, data)
        writer.finalize()
    assert not path.with_name("killed.lock").exists()
    np.testing.assert_array_equal(open_store(path).read_masks(0, N), data["masks"])


def test_verify_names_corrupt_truncated_and_missing_chunks(complete_store: Path) -> None:
    flipped = complete_store / "masks" / "c" / "1" / "0" / "0"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    truncated = complete_store / "l2" / "c" / "2"
    truncated.write_bytes(truncated.read_bytes()[:7])
    missing = complete_store / "labels" / "c" / "0"
    missing.unlink()
    problems = verify_store(complete_store)
    assert any(p.startswith("array 'masks' chunk 1:") and str(flipped) in p and "corrupt" in p for p in problems)
    assert any(p.startswith("array 'l2' chunk 2:") and str(truncated) in p and "corrupt" in p for p in problems)
    assert any(p.startswith("array 'labels' chunk 0:") and str(missing) in p and "missing" in p for p in problems)
    # the manifest written by finalize names the same three objects
    assert any("are missing" in p and "labels/c/0" in p for p in problems)
    assert any(p.startswith("object 'l2/c/2' is 7 bytes") for p in problems)
    assert any(p.startswith("object 'masks/c/1/0/0' differs from manifest sha256:") for p in problems)
    assert len(problems) == 6, problems
    # readers check every object against the manifest as they read it, before decoding
    with pytest.raises(DamagedStore, match=r"object 'masks/c/1/0/0' differs from manifest sha256:"):
        open_store(complete_store).read_masks(100, 101)
    (complete_store / "advpipe.manifest.json").unlink()  # without one, the chunk's own checksum still catches it
    with pytest.raises(DamagedStore, match=r"array 'masks' rows \[100, 101\) are unreadable .*checksum"):
        open_store(complete_store).read_masks(100, 101)


def test_verify_reports_incomplete_and_mismatched_data(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "s"
    with new(path) as writer:
        write(writer, data, [0])
    problems = verify_store(path, fingerprint="other-fp")
    assert "status is 'in-progress', not 'complete'" in problems
    assert "2 of 3 chunks are not done (first [1, 2])" in problems
    assert "dataset fingerprint: store 'fp-toy-1' vs data 'other-fp'" in problems
    hashes = data["sample_hash"].copy()
    hashes[[3, 7]] += np.uint64(1)
    assert any("differ at 2 of 100 samples in done chunks (first indices [3, 7])" in p for p in verify_store(path, sample_hashes=hashes))


def test_verify_detects_tampered_summary(complete_store: Path) -> None:
    _edit_attrs(complete_store, lambda a: a["summary"].update(asr=1.0))
    problems = verify_store(complete_store)
    assert len(problems) == 2 and problems[1].startswith("stored summary")
    assert problems[0].startswith("object 'zarr.json' is") and "manifest sha256:" in problems[0]
    (complete_store / "advpipe.manifest.json").unlink()  # a tamperer who also drops the manifest is still caught
    problems = verify_store(complete_store)
    assert len(problems) == 1 and problems[0].startswith("stored summary")


def test_check_compatible(complete_store: Path, tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    store = open_store(complete_store)
    check_compatible(store, fingerprint="fp-toy-1", split="test", n=N, image_shape=(C, H, W))
    with pytest.raises(AdvpipeError, match=r"fingerprint: store 'fp-toy-1' vs data 'fp-other'.*n: store 250 vs data 300"):
        check_compatible(store, fingerprint="fp-other", split="test", n=300, image_shape=(C, H, W))
    partial = tmp_path / "partial"
    with new(partial) as writer:
        write(writer, data, [0, 1])
    with pytest.raises(AdvpipeError, match=r"incomplete \(status 'in-progress', 2 of 3 chunks done\)"):
        check_compatible(open_store(partial), fingerprint="fp-toy-1", split="test", n=N, image_shape=(C, H, W))


def _edit_attrs(store: Path, edit) -> None:
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["advpipe"])
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a["dataset"].update(n=10**12), r"store dataset\.n must be an integer"),
        (lambda a: a["dataset"].update(image_shape=[3, "32", 32]), r"image_shape\[1\] \(height\)"),
        (lambda a: a["dataset"].update(image_shape=[3, 4096, 4096]), "bytes per chunk"),
        (lambda a: a.update(format="advpipe-masks/9"), "unsupported store format"),
        (lambda a: a.update(status="done"), "status must be one of"),
        (lambda a: a["dataset"].update(n=200), r"array 'masks' is bool shape \(250, 8, 12\)"),
        (lambda a: a["model"].update(checkpoint_sha256="__import__('os')"), "64 lowercase hex"),
    ],
)
def test_untrusted_attributes_refused(complete_store: Path, edit, message: str) -> None:
    _edit_attrs(complete_store, edit)
    with pytest.raises(DamagedStore, match="object 'zarr.json' differs from manifest"):
        open_store(complete_store)  # the store's own manifest catches the edit first
    (complete_store / "advpipe.manifest.json").unlink()  # a forger drops it: the attributes are still validated
    with pytest.raises(AdvpipeError, match=message):
        open_store(complete_store)
    problems = verify_store(complete_store)
    assert len(problems) == 1 and re.search(message, problems[0])


def test_open_missing_store_and_create_in_new_directory(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    with pytest.raises(AdvpipeError, match="cannot open mask store"):
        open_store(tmp_path / "missing")
    with new(tmp_path / "a" / "b" / "s") as writer:
        write(writer, data, [0])
    assert open_store(tmp_path / "a" / "b" / "s").chunk_done().tolist() == [True, False, False]


def test_write_chunk_validates_inputs(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    with new(tmp_path / "s") as writer:
        a, b = writer.chunk_bounds(2)
        assert (a, b) == (200, 250)
        metrics = {k: data[k][a:b] for k in METRICS}
        args = (data["masks"][a:b], data["labels"][a:b], data["sample_hash"][a:b])
        with pytest.raises(AdvpipeError, match="masks must be bool"):
            writer.write_chunk(2, args[0].astype(np.uint8), *args[1:], metrics)
        with pytest.raises(AdvpipeError, match=r"masks must be bool of shape \(50, 8, 12\)"):
            writer.write_chunk(2, data["masks"][:60], *args[1:], metrics)
        with pytest.raises(AdvpipeError, match="exactly the keys"):
            writer.write_chunk(2, *args, {**metrics, "l1": metrics["l2"]})
        with pytest.raises(AdvpipeError, match=r"l0_pixels must lie in \[0, 96\]"):
            writer.write_chunk(2, *args, {**metrics, "l0_pixels": metrics["l0_pixels"] + 1000})
        with pytest.raises(AdvpipeError, match=r"l0 must lie in \[0, 288\]"):
            writer.write_chunk(2, *args, {**metrics, "l0": np.full(50, 2**32 + 5)})  # would wrap to 5 in int32
        with pytest.raises(AdvpipeError, match="chunk index"):
            writer.chunk_bounds(3)
        tensors = [torch.from_numpy(x) for x in args[:2]] + [args[2]]
        writer.write_chunk(2, *tensors, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in metrics.items()})
        assert writer.pending_chunks() == [0, 1]


def test_read_over_http(complete_store: Path, data: dict[str, np.ndarray]) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(complete_store.parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        url = f"http://127.0.0.1:{port}/{complete_store.name}"
        store = open_store(url)
        assert store.complete and store.n == N
        np.testing.assert_array_equal(store.read_masks(0, N), data["masks"])
        np.testing.assert_array_equal(store.read_all_packed(), pack_masks(data["masks"]))
        assert verify_store(url, sample_hashes=data["sample_hash"]) == []
        with pytest.raises(AdvpipeError, match="cannot open mask store"):
            open_store(f"http://127.0.0.1:{port}/nothing-here")
    finally:
        server.terminate()
        server.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"http.server did not start on port {port}")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("height, width", [(32, 32), (5, 7)])
def test_unpack_masks_on_torch_equals_original(device: str, height: int, width: int) -> None:
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand((2, 6, height, width), generator=gen) < 0.3
    packed = torch.from_numpy(pack_masks(masks.reshape(-1, height, width).numpy())).reshape(2, 6, -1).to(device)
    assert packed.shape[-1] == math.ceil(height * width / 8)
    out = unpack_masks(packed, height, width)
    assert out.device.type == device and out.dtype == torch.bool
    assert torch.equal(out.cpu(), masks)


def test_read_all_packed_unpacks_to_masks(complete_store: Path, data: dict[str, np.ndarray]) -> None:
    packed = torch.from_numpy(open_store(complete_store).read_all_packed())
    assert torch.equal(unpack_masks(packed, H, W), torch.from_numpy(data["masks"]))


def test_sample_hash_follows_documented_rule(data: dict[str, np.ndarray]) -> None:
    images = data["images"]
    expected = [int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little") for img in images[:5]]
    assert sample_hash(images[:5]).tolist() == expected
    np.testing.assert_array_equal(sample_hash(images.transpose(0, 3, 1, 2).copy(), layout="NCHW"), sample_hash(images))
    assert len(set(sample_hash(images).tolist())) == N
    with pytest.raises(AdvpipeError, match="uint8"):
        sample_hash(images.astype(np.float32))


def test_mask_hash_follows_documented_rule(complete_store: Path, data: dict[str, np.ndarray]) -> None:
    from advpipe.pipeline.codecs import mask_hash

    stored = zarr.open_group(str(complete_store), mode="r")["mask_hash"][:]
    keys = data["sample_hash"].astype("<u8")
    expected = [int.from_bytes(hashlib.blake2b(keys[i].tobytes() + np.packbits(data["masks"][i].ravel()).tobytes(),
                                               digest_size=8).digest(), "little") for i in range(5)]
    assert stored[:5].tolist() == expected
    np.testing.assert_array_equal(stored, mask_hash(data["masks"], data["sample_hash"]))
    assert "mask_hash" in open_store(complete_store).provenance  # the rule, beside the sample_hash rule


def _make_legacy(store: Path) -> None:
    """Turn a store into one written before mask hashes existed: no mask_hash array, no rule attribute."""
    shutil.rmtree(store / "mask_hash")
    root = json.loads((store / "zarr.json").read_text())
    del root["consolidated_metadata"]["metadata"]["mask_hash"]
    del root["attributes"]["advpipe"]["mask_hash"]
    (store / "zarr.json").write_text(json.dumps(root))
    (store / "advpipe.manifest.json").unlink()


def test_a_store_without_mask_hashes_is_refused_naming_the_command_that_recomputes_it(complete_store: Path) -> None:
    # Issue 24 changed this: such a store used to be read with a WARNING and the l0_pixels check only,
    # so deleting the hashes turned any store into one whose masks could be moved at will.
    _make_legacy(complete_store)
    with pytest.raises(AdvpipeError, match=r"predates per-sample mask hashes.*refusing it. Recompute it: advpipe "
                                           r"precompute-masks --data toy --split test --limit 250 --model vgg19 --out .* --overwrite"):
        open_store(complete_store)
    problems = verify_store(complete_store)
    assert len(problems) == 1 and "predates per-sample mask hashes" in problems[0]
