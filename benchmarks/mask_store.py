"""Mask-store chunking benchmark: size and throughput for 10,000 CIFAR-like masks per chunk size.

Usage: python benchmarks/mask_store.py OUT.json  (from the repo root, project venv)
"""
import json, os, shutil, subprocess, socket, sys, tempfile, time
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import PackBits
from advpipe.pipeline.reader import open_store
from advpipe.pipeline.writer import create_store
from advpipe.pipeline.codecs import quiet_zarr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

N, H, W = 10_000, 32, 32
ROOT = os.path.join(tempfile.gettempdir(), "advpipe-mask-store-bench")
LOG = f"{ROOT}.httplog"
# python -m http.server listens with a backlog of 5: more concurrent connects than that stall for a
# 1 s SYN retry, which no real server does. This one only raises the backlog.
SERVER = """
import functools, http.server, sys
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 128
h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
S(("127.0.0.1", int(sys.argv[1])), h).serve_forever()
"""


def blobs(n, rng, density=0.10):
    """~10% density random blobs: disks of radius 1-3 px around random centers."""
    k = 8
    yy, xx = np.mgrid[:H, :W]
    cy, cx = rng.uniform(0, H, (n, k, 1, 1)), rng.uniform(0, W, (n, k, 1, 1))
    r = rng.uniform(1.0, 3.2, (n, k, 1, 1))
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).any(axis=1)


def scattered(n, rng, density=0.10):
    return rng.random((n, H, W)) < density


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def prov():
    return {"dataset": {"name": "bench", "split": "test", "fingerprint": "x"},
            "model": {"arch": "none", "checkpoint_sha256": "0" * 64, "clean_accuracy": 0.5},
            "attack": {"eps": "8/255"}, "seed": 0}


def metrics(r, rng):
    return {"success": rng.random(r) < 0.9, "clean_correct": rng.random(r) < 0.95, "l0": rng.integers(0, 3072, r), "l0_pixels": rng.integers(0, 1024, r),
            "l2": rng.random(r), "linf": rng.random(r), "loss": rng.random(r)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_bench(masks, chunk, url_base):
    rng = np.random.default_rng(1)
    path = f"{ROOT}/c{chunk}"
    shutil.rmtree(path, ignore_errors=True)
    extra = metrics(N, rng)
    labels, hashes = rng.integers(0, 10, N), rng.integers(0, 2**63, N).astype(np.uint64)
    t = time.perf_counter()
    with create_store(path, n=N, image_shape=(3, H, W), chunk_size=chunk, provenance=prov()) as w:
        for i in w.pending_chunks():
            a, b = w.chunk_bounds(i)
            w.write_chunk(i, masks[a:b], labels[a:b], hashes[a:b], {k: v[a:b] for k, v in extra.items()})
        w.finalize()
    t_write = time.perf_counter() - t
    s = open_store(path)
    t = time.perf_counter(); s.read_all_packed(); t_read = time.perf_counter() - t
    idx = np.random.default_rng(2).choice(N, 128, replace=False)
    t = time.perf_counter()
    for j in idx:
        s.read_masks(int(j), int(j) + 1)
    t_rand = (time.perf_counter() - t) / 128
    n_log = len(open(LOG).readlines())
    t = time.perf_counter(); r = open_store(f"{url_base}/c{chunk}"); t_open = time.perf_counter() - t
    open_requests = len(open(LOG).readlines()) - n_log
    t = time.perf_counter(); r.read_all_packed(); t_http = time.perf_counter() - t
    files = sum(len(fs) for _, _, fs in os.walk(path))
    return {"chunk_size": chunk, "masks_bytes": du(f"{path}/masks"), "store_bytes": du(path), "files": files,
            "write_masks_per_s": N / t_write, "read_all_packed_masks_per_s": N / t_read,
            "random_single_mask_read_ms": 1e3 * t_rand, "http_open_s": t_open, "http_open_requests": open_requests, "http_read_all_packed_s": t_http}


def codec_bench(masks, chunk=1000):
    out = []
    variants = {
        "bool+zstd3 (no packbits)": ([], [ZstdCodec(level=3)]),
        "packbits only": ("pb", []),
        "packbits+zstd1": ("pb", [ZstdCodec(level=1)]),
        "packbits+zstd3": ("pb", [ZstdCodec(level=3)]),
        "packbits+zstd9": ("pb", [ZstdCodec(level=9)]),
        "packbits+zstd19": ("pb", [ZstdCodec(level=19)]),
    }
    for name, (filt, comp) in variants.items():
        path = f"{ROOT}/codec"
        shutil.rmtree(path, ignore_errors=True)
        with quiet_zarr():
            filters = [PackBits()] if filt == "pb" else []
            a = zarr.create_array(path, shape=masks.shape, chunks=(chunk, H, W), dtype=bool, filters=filters,
                                  serializer=BytesCodec(), compressors=[*comp, Crc32cCodec()], fill_value=False)
            t = time.perf_counter(); a[:] = masks; tw = time.perf_counter() - t
            t = time.perf_counter(); a[:]; tr = time.perf_counter() - t
        out.append({"codec": name, "chunk_size": chunk, "bytes": du(path), "write_masks_per_s": N / tw, "read_masks_per_s": N / tr})
    return out


def main():
    os.makedirs(ROOT, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {"blobs": blobs(N, rng), "scattered": scattered(N, rng)}
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", SERVER, str(port), ROOT], stdout=subprocess.DEVNULL, stderr=open(LOG, "w"))
    time.sleep(1.0)
    res = {"n": N, "shape": [H, W], "density": {k: float(v.mean()) for k, v in data.items()},
           "raw_bool_bytes": N * H * W, "raw_packed_bytes": N * H * W // 8, "chunking": [], "codecs": {}}
    try:
        for chunk in [100, 250, 500, 1000, 2500, 10000]:
            runs = [store_bench(data["blobs"], chunk, f"http://127.0.0.1:{port}") for _ in range(3)]
            row = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}  # median of 3
            res["chunking"].append(row); print(row, flush=True)
        for kind, masks in data.items():
            res["codecs"][kind] = codec_bench(masks); print(kind, res["codecs"][kind], flush=True)
    finally:
        srv.terminate(); srv.wait()
        shutil.rmtree(ROOT, ignore_errors=True)
    res = {"benchmark": "mask_store", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), **res}
    json.dump(res, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
