"""For the sharing tests: a tiny store of the embedded data, and servers started on 127.0.0.1 (S3 through
moto's server mode, HTTP with range requests, one that accepts and never answers)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

BUCKET = "team"


def tiny_store(path: Path, ds, *, chunk_size: int = 16, finalize: bool = True, invert: bool = False,
               masks: np.ndarray | None = None) -> Path:
    """A store of ``ds`` with masks derived from the images (``invert`` flips them: same layout, other bytes), or ``masks``."""
    from advpipe.pipeline.codecs import sample_hash
    from advpipe.pipeline.writer import create_store

    masks = ((ds.images[:, 0] > 200).numpy() ^ invert) if masks is None else masks
    prov = {"dataset": {"name": ds.name, "split": ds.split, "fingerprint": ds.fingerprint},
            "model": {"arch": "resnet20", "checkpoint_sha256": "0" * 64, "clean_accuracy": 0.5},
            "attack": {"eps": "8/255", "steps": 1}, "seed": 0}
    hashes = sample_hash(ds.images.numpy(), layout="NCHW")
    with create_store(path, n=len(ds), image_shape=ds.image_shape, chunk_size=chunk_size, provenance=prov) as w:
        for i in w.pending_chunks():
            a, b = w.chunk_bounds(i)
            px = masks[a:b].reshape(b - a, -1).sum(1)
            w.write_chunk(i, masks[a:b], ds.labels[a:b].numpy(), hashes[a:b],
                          {"success": np.ones(b - a, bool), "clean_correct": np.ones(b - a, bool), "l0": 3 * px,
                           "l0_pixels": px, "l2": np.full(b - a, 0.5, np.float32),
                           "linf": np.full(b - a, 8 / 255, np.float32), "loss": np.zeros(b - a, np.float32)})
        if finalize:
            w.finalize()
    return path


@contextlib.contextmanager
def s3_server(mp: pytest.MonkeyPatch) -> Iterator[dict]:
    """A moto S3 server on a free local port, found through AWS_ENDPOINT_URL, with the bucket ``team``."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"endpoint": endpoint, "client": client, "bucket": BUCKET}
    finally:
        server.stop()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers ``Range: bytes=a-b`` (python -m http.server does not)."""

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[override]
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path):
            return super().send_head()
        data = Path(path).read_bytes()
        start = int(match[1])
        end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        if start >= len(data):
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        import io

        return io.BytesIO(data[start:end + 1])


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP with range requests; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(directory)))
    server.request_queue_size = 64
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_server() -> Iterator[dict]:
    """A server that accepts connections and never answers; ``connections`` counts them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.settimeout(0.2)
    state = {"port": sock.getsockname()[1], "connections": 0, "held": []}
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            state["connections"] += 1
            state["held"].append(conn)  # keep it open, say nothing

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in state["held"]:
            conn.close()
        sock.close()
