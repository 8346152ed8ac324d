"""Reading a published 50,000-mask CIFAR-shaped store from a local S3 server (moto), as training does.

Usage: python benchmarks/bench_sharing.py [--n 50000] [--repeat 3]   (from the repo root)

Writes a store of N random 32x32 masks (10% density, scattered: the worst case for compression)
in chunks of 500, publishes it with ``advpipe.pipeline.sharing.publish`` to a moto S3 server run
in its own process (so it does not share this process's GIL), then times what ``advpipe train
--masks s3://... --masks-digest sha256:...`` does before its first step, by calling the same
function (``attack_mask_source``) on N in-memory random images: open the store pinned by digest
(manifest, then root metadata), check the data (fingerprint, and the per-sample hashes, which the
pinned manifest proves without fetching them when they match), and read every mask into the
bit-packed resident form, with each object's sha256 checked against the manifest. Goal: under 2 s. Also times the same read of the store packed into one zip object, and
pulling the store into a fresh cache folder.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from advpipe.pipeline.sharing import pack, publish, pull  # noqa: E402
from advpipe.data.datasets import DatasetSplit  # noqa: E402
from advpipe.pipeline.codecs import sample_hash  # noqa: E402
from advpipe.pipeline.reader import check_compatible, open_store  # noqa: E402
from advpipe.pipeline.writer import create_store  # noqa: E402
from advpipe.pipeline.streaming import ResidentMasks, attack_mask_source  # noqa: E402

H = W = 32
CHUNK = 500


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dataset(n: int) -> DatasetSplit:
    """N random CIFAR-shaped images in memory, as training holds CIFAR-10 train."""
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, H, W), dtype=np.uint8))
    return DatasetSplit(name="bench", split="train", labels=torch.from_numpy(rng.integers(0, 10, n)),
                        class_names=[str(i) for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3,
                        image_shape=(3, H, W), images=images, fingerprint_fn=lambda: "bench-fp")


def _make_store(path: Path, ds: DatasetSplit) -> None:
    rng = np.random.default_rng(0)
    n = len(ds)
    hashes = sample_hash(ds.images.numpy(), layout="NCHW")
    prov = {"dataset": {"name": "bench", "split": "train", "fingerprint": "bench-fp"},
            "model": {"arch": "none", "checkpoint_sha256": "0" * 64, "clean_accuracy": 0.5},
            "attack": {"eps": "8/255"}, "seed": 0}
    with create_store(path, n=n, image_shape=(3, H, W), chunk_size=CHUNK, provenance=prov) as writer:
        for i in writer.pending_chunks():
            a, b = writer.chunk_bounds(i)
            r = b - a
            masks = rng.random((r, H, W)) < 0.10
            px = masks.reshape(r, -1).sum(1)
            writer.write_chunk(i, masks, ds.labels[a:b].numpy(), hashes[a:b],
                               {"success": rng.random(r) < 0.9, "clean_correct": np.ones(r, bool), "l0": 3 * px,
                                "l0_pixels": px, "l2": rng.random(r), "linf": rng.random(r), "loss": rng.random(r)})
        writer.finalize()


def _read_like_training(url: str, digest: str, ds: DatasetSplit, hashes: np.ndarray) -> tuple[float, float]:
    """Seconds to read the store as training does (its open_for_training checks, then every mask), and for
    the whole of ``attack_mask_source``, which also hashes the N training images (the same for a local store)."""
    pinned = f"{url}#sha256={digest.removeprefix('sha256:')}"
    started = time.perf_counter()
    store = open_store(pinned)
    check_compatible(store, fingerprint=ds.fingerprint, split=ds.split, n=len(ds), image_shape=ds.image_shape)
    if not store.pinned_equal("sample_hash", hashes):
        assert (store.sample_hashes() == hashes).all()
    ResidentMasks(store, torch.device("cpu"))
    read = time.perf_counter() - started
    started = time.perf_counter()
    masks = attack_mask_source(pinned, ds, torch.device("cpu"))
    assert isinstance(masks, ResidentMasks) and masks.packed.shape == (len(ds), H * W // 8)
    return read, time.perf_counter() - started


def main() -> None:
    """Build, publish and time; write benchmarks/results/bench_sharing.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.1)
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            store = Path(tmp) / "cifar-train.zarr"
            ds = _dataset(args.n)
            hashes = sample_hash(ds.images.numpy(), layout="NCHW")
            t0 = time.perf_counter()
            _make_store(store, ds)
            write_s = time.perf_counter() - t0
            url = "s3://bench/cifar-train.zarr"
            result = publish(str(store), url)
            _read_like_training(url, result.digest, ds, hashes)  # warm-up: imports, first connections, moto's first GETs
            runs = [_read_like_training(url, result.digest, ds, hashes) for _ in range(args.repeat)]
            zipped = pack(str(store), Path(tmp) / "cifar-train.zip")
            zip_url = "s3://bench/cifar-train.zip"
            publish(str(zipped.path), zip_url)
            _read_like_training(zip_url, result.digest, ds, hashes)
            zip_runs = [_read_like_training(zip_url, result.digest, ds, hashes) for _ in range(args.repeat)]
            os.environ["ADVPIPE_CACHE_DIR"] = str(Path(tmp) / "cache")
            t0 = time.perf_counter()
            pulled = pull(url)
            pull_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=10)
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    reads, setups = [r for r, _ in runs], [t for _, t in runs]
    zip_reads = [r for r, _ in zip_runs]
    out = write_result("bench_sharing", {
        "n_masks": args.n, "image": [3, H, W], "chunk_size": CHUNK, "objects": result.objects,
        "store_bytes": result.bytes, "write_store_s": round(write_s, 2), "publish_s": round(result.seconds, 2),
        "read_store_s": [round(t, 3) for t in reads], "read_store_median_s": round(median(reads), 3),
        "goal_s": 2.0, "goal_met": median(reads) < 2.0,
        "attack_mask_source_s": [round(t, 3) for t in setups], "attack_mask_source_median_s": round(median(setups), 3),
        "zip_read_store_s": [round(t, 3) for t in zip_reads], "zip_bytes": zipped.bytes, "pull_s": round(pull_s, 2), "pulled_objects": pulled.downloaded,
        "server": "moto server mode in its own process on 127.0.0.1",
    })
    print(f"{args.n} masks, {result.objects} objects, {result.bytes:,} bytes: publish {result.seconds:.2f} s, "
          f"read as training does {median(reads):.3f} s (median of {args.repeat}; goal < 2 s; with hashing the "
          f"images {median(setups):.3f} s), as one zip {median(zip_reads):.3f} s, pull {pull_s:.2f} s -> {out}")


if __name__ == "__main__":
    main()
