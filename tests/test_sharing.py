"""Sharing mask stores through a real S3-compatible server the tests start (moto) and HTTP: publish, pin by
content digest, train, pull into the cache, pack into one zip, and one-line errors within a bounded time."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from conftest import TINY_CNN
from helpers.checkpoints import fit_checkpoint
from helpers.sharing import BUCKET, http_server, s3_server, silent_server, tiny_store
from advpipe.cli import app
from advpipe.data.datasets import load_dataset
from advpipe.errors import AdvpipeError, DamagedStore
from advpipe.pipeline import remote
from advpipe.pipeline.location import Location
from advpipe.pipeline.manifest import MANIFEST_KEY, PUBLISHED_KEY, digest_of, encode_manifest, sha256_hex
from advpipe.pipeline.sharing import publish, pull, pull_target
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.verify import verify_store
from advpipe.pipeline.streaming import attack_mask_source

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in:UserWarning",
                                        "ignore:Consolidated metadata is:UserWarning")
runner = CliRunner()
N, CHUNK = 32, 8
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str):
    return runner.invoke(app, list(args))


def one_error_line(result, *needles: str) -> str:
    """Exit code 2 and exactly one ``error:`` line (no traceback) that names every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A store precomputed here by `advpipe precompute-masks` and an S3 server (AWS_ENDPOINT_URL) with a bucket."""
    root = tmp_path_factory.mktemp("sharing")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, s3_server(mp) as s3:
        mp.chdir(root)
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            fit_checkpoint(root / "runs" / "embedded" / "resnet20" / "none" / "best.pt", N)
            result = cli("precompute-masks", "--model", "resnet20", "--data", "embedded", "--limit", str(N),
                         "--chunk-size", str(CHUNK), "--batch-size", "8", "--steps", "2", "--attack-opt", "init_steps=1",
                         "--workers", "0")
            assert result.exit_code == 0, result.output
            (store,) = [p for p in (root / "masks").iterdir() if p.suffix == ".zarr"]
            yield {"root": root, "store": store, **s3}
        finally:
            torch.set_num_threads(threads)


def s3_keys(world, prefix: str) -> dict[str, int]:
    pages = world["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["Size"] for page in pages for o in page.get("Contents", [])}


def train_args(world, masks: str, out: str, *extra: str) -> list[str]:
    return ["train", "--data", "embedded", "--limit", str(N), "--model", TINY_CNN, "--aug", "advmask", "--masks", masks,
            *extra, "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--device", "cpu",
            "--out", str(world["root"] / out)]


def test_precompute_publish_train_pinned_then_a_replaced_chunk_is_refused(world) -> None:
    store = world["store"]
    # the manifest is written when the precompute completes the store; info shows its digest
    digest = digest_of((store / MANIFEST_KEY).read_bytes())
    info = cli("masks", "info", str(store))
    assert info.exit_code == 0 and f"content digest: {digest}" in info.output, info.output

    url = f"s3://{BUCKET}/chain/embedded.zarr"
    published = cli("masks", "publish", str(store), url)
    assert published.exit_code == 0, published.output
    assert f"content digest: {digest}" in published.output
    keys = s3_keys(world, "chain/embedded.zarr")
    assert {"zarr.json", MANIFEST_KEY, PUBLISHED_KEY, "masks/c/0/0/0"} <= set(keys)
    marker = json.loads(world["client"].get_object(Bucket=BUCKET, Key=f"chain/embedded.zarr/{PUBLISHED_KEY}")["Body"].read())
    assert marker["digest"] == digest and marker["objects"] == len(keys) - 2
    remote_info = cli("masks", "info", url)
    assert remote_info.exit_code == 0 and f"content digest: {digest}" in remote_info.output
    assert "published " in remote_info.output

    trained = cli(*train_args(world, url, "run-pinned", "--masks-digest", digest))
    assert trained.exit_code == 0, trained.output
    run = world["root"] / "run-pinned"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert f"#sha256={digest[7:]}" in (run / "config.yaml").read_text()  # the pin is recorded with the run

    # Another team swaps chunk 0's masks for others and rewrites every row that describes a mask to
    # agree (l0 counts, mask hashes, the summary): valid checksums, consistent rows, other bytes.
    from advpipe.pipeline.codecs import mask_hash
    from advpipe.pipeline.provenance import SUMMARY_STATS, summarize

    forged = world["root"] / "forged.zarr"
    shutil.copytree(store, forged)
    group = zarr.open_group(str(forged), mode="r+")
    masks = ~group["masks"][0:CHUNK]
    pixels = masks.reshape(CHUNK, -1).sum(1)
    group["masks"][0:CHUNK] = masks
    group["l0_pixels"][0:CHUNK], group["l0"][0:CHUNK] = pixels, 3 * pixels
    group["mask_hash"][0:CHUNK] = mask_hash(masks, group["sample_hash"][0:CHUNK])
    root = json.loads((forged / "zarr.json").read_text())
    root["attributes"]["advpipe"]["summary"] = summarize(
        {name: group[name][:] for name in (*SUMMARY_STATS, "success", "clean_correct")})
    (forged / "zarr.json").write_text(json.dumps(root))
    chunk = (forged / "masks" / "c" / "0" / "0" / "0").read_bytes()
    assert chunk != (store / "masks" / "c" / "0" / "0" / "0").read_bytes()
    changed = {key: (forged / key).read_bytes()
               for key in ("masks/c/0/0/0", "l0_pixels/c/0", "l0/c/0", "mask_hash/c/0", "zarr.json")}
    for key, data in changed.items():
        if key != "zarr.json":  # the summary goes up with the forged manifest, below
            world["client"].put_object(Bucket=BUCKET, Key=f"chain/embedded.zarr/{key}", Body=data)
    assert verify_store(url, digest=None, fingerprint=None) != []  # the manifest still lists the old bytes
    with pytest.raises(DamagedStore, match="object 'masks/c/0/0/0' differs from manifest"):
        open_store(url).read_masks(0, CHUNK)  # unpinned, the store's own manifest still refuses it (issue 24)

    refused = cli(*train_args(world, url, "run-refused", "--masks-digest", digest))
    one_error_line(refused, digest, "masks/c/0/0/0")
    assert not (world["root"] / "run-refused" / "metrics.jsonl").exists()
    verified = cli("masks", "verify", f"{url}#sha256={digest[7:]}")
    assert verified.exit_code == 1 and "masks/c/0/0/0" in verified.output and digest in verified.output

    # A forger who also rewrites the manifest changes the digest, and the pin names both.
    objects = {k: v for k, v in Location(url).load_manifest().objects.items()}
    objects.update({key: (len(data), sha256_hex(data)) for key, data in changed.items()})
    forged_manifest = encode_manifest(objects)
    world["client"].put_object(Bucket=BUCKET, Key="chain/embedded.zarr/zarr.json", Body=changed["zarr.json"])
    world["client"].put_object(Bucket=BUCKET, Key=f"chain/embedded.zarr/{MANIFEST_KEY}", Body=forged_manifest)
    assert verify_store(url) == []  # consistent in itself
    assert open_store(url).read_masks(0, CHUNK).shape == (CHUNK, 32, 32)  # checksums, rows, manifest cannot tell
    refused = cli(*train_args(world, f"{url}#sha256={digest[7:]}", "run-refused-2"))
    one_error_line(refused, digest_of(forged_manifest), f"differs from the pinned {digest}")


@pytest.fixture(scope="module")
def published(world) -> dict:
    url = f"s3://{BUCKET}/shared/embedded.zarr"
    result = publish(str(world["store"]), url)
    return {"url": url, "digest": result.digest, "objects": result.objects}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_pull_into_the_cache_twice_and_the_second_does_nothing(world, published) -> None:
    url, digest = published["url"], published["digest"]
    first = cli("masks", "pull", f"{url}#sha256={digest[7:]}")
    assert first.exit_code == 0, first.output
    target = pull_target(digest)
    assert target.parent.parent == Path(os.environ["ADVPIPE_CACHE_DIR"]) and target.name == f"{digest[7:]}.zarr"
    assert f"pulled {published['objects']} objects" in first.output
    assert verify_store(target, digest=digest) == []
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    # pinned and cached: nothing is fetched, so it works even with the server unreachable
    again = cli("masks", "pull", f"{url}#sha256={digest[7:]}", "--storage-option",
                f"endpoint_url=http://127.0.0.1:{_closed_port()}")
    assert again.exit_code == 0 and "already pulled" in again.output and "nothing to do" in again.output, again.output
    unpinned = pull(url)  # learns the digest from the manifest, then finds it there
    assert unpinned.already and unpinned.downloaded == 0 and unpinned.path == target
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before


def test_interrupted_pull_resumes(world, published, tmp_path, monkeypatch) -> None:
    dest = tmp_path / "copy.zarr"
    original = Location.read_many

    def drops_after_20(self, keys, sizes=None):
        for i, item in enumerate(original(self, keys, sizes)):
            if i == 20:
                raise AdvpipeError("connection reset by peer (simulated)")
            yield item

    monkeypatch.setattr(Location, "read_many", drops_after_20)
    with pytest.raises(AdvpipeError, match="simulated"):
        pull(published["url"], dest)
    assert not dest.exists()  # the folder appears only once the pull is complete
    (staging,) = tmp_path.glob(".copy.zarr.pull-*")
    written = sorted(p for p in staging.rglob("*") if p.is_file())
    assert len(written) == 20
    written[0].write_bytes(written[0].read_bytes()[:-1])  # e.g. a disk that cut a file short
    monkeypatch.setattr(Location, "read_many", original)
    result = pull(published["url"], dest)
    assert (result.present, result.downloaded) == (19, published["objects"] - 19)
    assert not staging.exists() and verify_store(dest, digest=published["digest"]) == []


def _publish_killed_after(store: Path, url: str, uploads: int) -> int:
    """Run `advpipe masks publish` in a child process that dies (os._exit) once ``uploads`` uploads have finished."""
    script = textwrap.dedent(f"""
        import os, sys
        import s3fs
        original, count = s3fs.S3FileSystem._pipe_file, [0]
        async def pipe_file(self, *args, **kwargs):
            out = await original(self, *args, **kwargs)
            count[0] += 1
            if count[0] == {uploads}:
                os._exit(9)
            return out
        s3fs.S3FileSystem._pipe_file = pipe_file
        sys.argv = ["advpipe", "masks", "publish", {str(store)!r}, {url!r}]
        from advpipe.cli import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=300, capture_output=True).returncode


@pytest.mark.parametrize("phase", ["data", "before-root-metadata"])
def test_publish_killed_midway_leaves_no_readable_partial_store(world, phase: str) -> None:
    store = world["store"]
    manifest = Location(store).load_manifest()
    data = sum(not k.endswith("zarr.json") for k in manifest.objects)
    # every object but the root zarr.json (the array metadata and the manifest went up before it)
    uploads = 5 if phase == "data" else len(manifest.objects)
    url = f"s3://{BUCKET}/killed-{phase}/embedded.zarr"
    assert _publish_killed_after(store, url, uploads) == 9
    keys = s3_keys(world, f"killed-{phase}/embedded.zarr")
    assert len(keys) >= uploads and "zarr.json" not in keys and PUBLISHED_KEY not in keys
    if phase == "data":
        assert all(not k.endswith("zarr.json") for k in keys) and len(keys) <= data
    with pytest.raises(AdvpipeError, match="cannot open mask store"):
        open_store(url)
    one_error_line(cli("masks", "verify", url), "cannot open mask store")
    one_error_line(cli(*train_args(world, url, f"run-killed-{phase}")), url)
    one_error_line(cli("masks", "publish", str(store), url), "unfinished publish", "--overwrite")
    again = cli("masks", "publish", str(store), url, "--overwrite")
    assert again.exit_code == 0, again.output
    assert verify_store(url, digest=manifest.digest) == []


def test_publish_refuses_incomplete_failing_and_existing_stores(world, published, tmp_path) -> None:
    ds = load_dataset("embedded", "train", limit=40)
    partial = tiny_store(tmp_path / "partial.zarr", ds, finalize=False)
    one_error_line(cli("masks", "publish", str(partial), f"s3://{BUCKET}/p.zarr"), "fails verification", "in-progress")
    broken = tiny_store(tmp_path / "broken.zarr", ds)
    chunk = broken / "masks" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\0")
    one_error_line(cli("masks", "publish", str(broken), f"s3://{BUCKET}/b.zarr"), "fails verification", "masks")
    assert s3_keys(world, "p.zarr") == {} and s3_keys(world, "b.zarr") == {}
    one_error_line(cli("masks", "publish", str(world["store"]), published["url"]), "already holds a published store")
    one_error_line(cli("masks", "publish", str(world["store"]), str(tmp_path / "copy.zarr")), "uploads to a URL")
    one_error_line(cli("masks", "publish", str(world["store"]), f"s3://no-such-bucket/{ds.name}.zarr"),
                   "bucket does not exist")


def test_single_file_store_reads_from_disk_http_and_s3(world, tmp_path) -> None:
    store = world["store"]
    digest = digest_of((store / MANIFEST_KEY).read_bytes())
    out = tmp_path / "share" / "embedded.zip"
    packed = cli("masks", "pack", str(store), str(out))
    assert packed.exit_code == 0 and f"content digest: {digest}" in packed.output, packed.output
    expected = open_store(store).read_masks(0, N)
    ds = load_dataset("embedded", "train", limit=N)
    for command in (["info"], ["verify", "--data", "embedded"], ["report"], ["show", "--n", "4", "--out", str(tmp_path / "g.png")]):
        result = cli("masks", command[0], str(out), *command[1:])
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "g.png").stat().st_size > 0
    source = attack_mask_source(f"{out}#sha256={digest[7:]}", ds, torch.device("cpu"))
    assert torch.equal(source(torch.arange(N)), torch.from_numpy(expected))
    with http_server(out.parent) as base:
        url = f"{base}/embedded.zip"
        assert open_store(url, digest=digest).digest == digest
        np.testing.assert_array_equal(open_store(url).read_masks(0, N), expected)
        assert cli("masks", "verify", url, "--digest", digest).exit_code == 0
    s3_url = f"s3://{BUCKET}/zips/embedded.zip"
    assert cli("masks", "publish", str(out), s3_url).exit_code == 0
    assert cli("masks", "verify", s3_url, "--digest", digest).exit_code == 0
    np.testing.assert_array_equal(open_store(s3_url).read_masks(0, N), expected)
    pulled = pull(s3_url, tmp_path / "unzipped.zarr")  # a pulled zip becomes a directory store, same digest
    assert pulled.digest == digest and verify_store(pulled.path, digest=digest) == []


def test_endpoint_and_credentials_from_storage_options(world, published, monkeypatch) -> None:
    endpoint = world["endpoint"]
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    result = cli("masks", "info", published["url"], "--storage-option", f"endpoint_url={endpoint}",
                 "--storage-option", "key=testing", "--storage-option", "secret=testing")
    assert result.exit_code == 0 and published["digest"] in result.output, result.output
    monkeypatch.setenv(remote.OPTIONS_ENV, json.dumps({"endpoint_url": endpoint, "key": "testing", "secret": "testing"}))
    assert open_store(published["url"]).digest == published["digest"]


def test_remote_failures_are_one_line_and_exit_2_within_bounded_time(world, published, monkeypatch) -> None:
    one_error_line(cli("masks", "info", "s3://no-such-bucket/m.zarr"), "not found", "bucket does not exist")
    for command in ("info", "verify", "report", "pull"):
        one_error_line(cli("masks", command, f"s3://{BUCKET}/nothing-here.zarr"), "not found")
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():  # the server now checks keys: ours is unknown to it (403)
        one_error_line(cli("masks", "info", published["url"]), "access denied", "Access Key Id")
        one_error_line(cli("masks", "publish", str(world["store"]), f"s3://{BUCKET}/denied.zarr"), "access denied")

    monkeypatch.setenv(remote.TIMEOUT_ENV, "1")
    monkeypatch.setenv(remote.RETRIES_ENV, "1")
    one_error_line(cli("masks", "info", published["url"], "--storage-option",
                       f"endpoint_url=http://127.0.0.1:{_closed_port()}"), "cannot connect")
    with silent_server() as silent:
        started = time.monotonic()
        line = one_error_line(cli("masks", "info", published["url"], "--storage-option",
                                  f"endpoint_url=http://127.0.0.1:{silent['port']}"), "no answer within 1 s", "2 attempts")
        s3_seconds = time.monotonic() - started
        assert silent["connections"] == 2, line  # one retry, then give up
        started = time.monotonic()
        one_error_line(cli("masks", "info", f"http://127.0.0.1:{silent['port']}/embedded.zarr"), "no answer within 1 s",
                       "1 attempt")
        http_seconds = time.monotonic() - started
        assert silent["connections"] == 3  # HTTP is not retried
    # (R + 1) * (connect + T) + backoff, with slack for a loaded machine
    assert s3_seconds < 12 and http_seconds < 8, (s3_seconds, http_seconds)


def test_an_empty_object_reads_over_s3_through_the_refused_range_fallback(world) -> None:
    world["client"].put_object(Bucket=BUCKET, Key="empty-object/obj", Body=b"")
    # S3 answers the bounded ranged read of an empty object with 416 InvalidRange; the reader then reads it whole
    assert Location(f"s3://{BUCKET}/empty-object").read("obj") == b""


def test_timeout_retry_policy_and_storage_option_parsing(monkeypatch) -> None:
    options = remote.storage_options("s3://b/m.zarr", {"config_kwargs": {"read_timeout": 7}})
    assert options["config_kwargs"] == {"connect_timeout": 5.0, "read_timeout": 7,
                                        "retries": {"total_max_attempts": 2, "mode": "standard"}}
    assert remote.policy() == (20.0, 1)
    timeout = remote.storage_options("https://host/m.zarr", None)["client_kwargs"]["timeout"]
    assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (5.0, 20.0, None)
    monkeypatch.setenv(remote.TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(remote.RETRIES_ENV, "3")
    assert remote.storage_options("s3://b/m.zarr", None)["config_kwargs"] == {
        "connect_timeout": 2.5, "read_timeout": 2.5, "retries": {"total_max_attempts": 4, "mode": "standard"}}
    monkeypatch.setenv(remote.RETRIES_ENV, "many")
    with pytest.raises(AdvpipeError, match="ADVPIPE_REMOTE_RETRIES"):
        remote.policy()
    assert remote.parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=true",
                                         "config_kwargs.read_timeout=5", "profile=team-a"]) == {
        "endpoint_url": "http://127.0.0.1:9000", "anon": True, "config_kwargs": {"read_timeout": 5}, "profile": "team-a"}
    with pytest.raises(AdvpipeError, match="KEY=VALUE"):
        remote.parse_storage_options(["endpoint_url"])
    assert remote.split_pin("s3://b/m.zarr#sha256=" + "A" * 64) == ("s3://b/m.zarr", "sha256:" + "a" * 64)
    for bad in ("s3://b/m.zarr#sha256=abc", "s3://b/m.zarr#md5=" + "a" * 32):
        with pytest.raises(AdvpipeError):
            remote.split_pin(bad)
    with pytest.raises(AdvpipeError, match="pinned to"):
        remote.pin_location("m.zarr#sha256=" + "a" * 64, "sha256:" + "b" * 64)
