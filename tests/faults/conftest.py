"""Shared fixtures of the fault-injection tests: a fast checkpoint, a reference store, process helpers.

The checkpoint is a ResNet-20 whose BatchNorm statistics come from one pass over the first N
embedded images and whose last layer is then fitted to them (a few seconds), so the attack has
correctly classified images to work on. The reference store is one uninterrupted ``--workers 0``
run made in this process with one CPU thread; every subprocess runs with OMP_NUM_THREADS=1, since
float reductions, and so the attack's results, depend on the thread count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.checkpoints import in_default_run_folder
from helpers.stores import PER_SAMPLE, assert_same_store, store_arrays  # noqa: F401 (re-exported)
from advpipe.cli import app
from advpipe.pipeline.reader import open_store

N, CHUNK = 96, 8
N_CHUNKS = N // CHUNK
#: the attack settings of every store these tests make: tiny, so startup dominates
ATTACK = ["--data", "embedded", "--limit", str(N), "--chunk-size", str(CHUNK), "--batch-size", "8", "--steps", "2",
          "--attack-opt", "init_steps=1"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Plain zarr warns that numcodecs.packbits and consolidated metadata are outside the v3 spec:
# deliberate format choices (docs/mask-store.md).
ZARR_WARNINGS = ("ignore:Numcodecs codecs are not in:UserWarning", "ignore:Consolidated metadata is:UserWarning")

runner = CliRunner()


@pytest.fixture(scope="session")
def faults_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A folder with runs/embedded/resnet20/none/best.pt, an uninterrupted reference store and its seconds per chunk."""
    root = tmp_path_factory.mktemp("faults")
    with in_default_run_folder(root, N) as ckpt:
        ref = root / "reference.zarr"
        result = runner.invoke(app, ["precompute-masks", "--model", "resnet20", *ATTACK, "--workers", "0",
                                     "--out", str(ref)])
        assert result.exit_code == 0, result.output
    # How long one chunk takes on this machine right now, from the write times of the done flags:
    # kill delays are drawn relative to it, so they land inside a chunk on a quiet or a busy machine.
    written = sorted(p.stat().st_mtime for p in (ref / "chunk_done" / "c").iterdir())
    chunk_seconds = float(np.median(np.diff(written)))
    yield {"root": root, "ckpt": ckpt, "ref": ref, "chunk_seconds": chunk_seconds}


def precompute_args(out: Path, *extra: str) -> list[str]:
    """The ``advpipe precompute-masks`` arguments of the reference configuration, writing to ``out``."""
    return ["precompute-masks", "--model", "resnet20", *ATTACK, "--out", str(out), *extra]


class AdvpipeProcess:
    """``python -m advpipe ARGS`` running in the background with one CPU thread; killed on leaving a ``with``.

    Output goes to temporary files, not pipes: a chatty run (dask logs) can never block on a full pipe
    while the test is busy polling its store.
    """

    def __init__(self, args: list[str], cwd: Path, python: Sequence[str] = ("-m", "advpipe")) -> None:
        """Start the command in ``cwd``; ``python`` is what runs it (a wrapper script instead of ``-m advpipe``)."""
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, *python, *args], cwd=cwd, stdout=self._out,
                                     stderr=self._err, text=True, env=SUBPROCESS_ENV)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.proc.poll()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and return the exit status once the process is gone."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for the end and return exit code and output."""
        code = self.proc.wait(timeout=timeout)
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, code, self._out.read(), self._err.read())

    def __enter__(self) -> "AdvpipeProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self._out.close()
        self._err.close()


def run_advpipe(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m advpipe ARGS`` in ``cwd`` to completion with one CPU thread."""
    with AdvpipeProcess(args, cwd) as proc:
        return proc.finish(timeout)


def done_chunks(store: Path) -> int:
    """Count the chunk_done flags a writer has set, from the files alone (cheap enough to poll)."""
    folder = store / "chunk_done" / "c"
    # Only True flags are ever written; zarr's atomic writes leave *.partial names while writing.
    return sum(1 for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else 0


def wait_for_chunks(proc: AdvpipeProcess, store: Path, k: int, timeout: float = 300) -> None:
    """Poll until at least ``k`` chunks of ``store`` are done; fail if ``proc`` ends or time runs out."""
    deadline = time.monotonic() + timeout
    while done_chunks(store) < k:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {k} chunks were done"
        assert time.monotonic() < deadline, f"fewer than {k} chunks done within {timeout} s"
        time.sleep(0.01)


def assert_done_chunks_match(path: Path, ref: Path) -> np.ndarray:
    """The chunks ``path`` marks done hold exactly the reference's rows; return the done flags."""
    store = open_store(path)
    done = store.chunk_done()
    got, want = store_arrays(path), store_arrays(ref)
    for i in np.flatnonzero(done):
        start, stop = store.chunk_bounds(int(i))
        for name in PER_SAMPLE:
            np.testing.assert_array_equal(got[name][start:stop], want[name][start:stop], err_msg=f"{name} chunk {i}")
    return done


def verify_ok(store: Path) -> None:
    """``advpipe masks verify STORE --data embedded`` passes (store intact and matching the data)."""
    result = runner.invoke(app, ["masks", "verify", str(store), "--data", "embedded"])
    assert result.exit_code == 0 and result.output.splitlines()[-1].startswith("ok:"), result.output


#: asyncio's messages when the interpreter exits while zarr's event loop still holds the sibling reads
#: of a failed multi-chunk read (intermittent; reported as a bug, see docs/scaling.md "Known issues")
_SHUTDOWN_NOISE = ("Task was destroyed but it is pending!", "Task exception was never retrieved")


def command_stderr(stderr: str) -> str:
    """``stderr`` up to asyncio's shutdown messages: what the command itself printed."""
    lines = stderr.splitlines()
    cut = next((i for i, line in enumerate(lines) if any(noise in line for noise in _SHUTDOWN_NOISE)), len(lines))
    return "\n".join(lines[:cut])


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines a command printed (the CLI prints exactly one for a user error)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """Serve ``directory`` with ``python -m http.server`` on 127.0.0.1; yield (process, base URL)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` at ``mountpoint`` (needs root; skips the test otherwise) and unmount it after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def remount(mountpoint: Path, options: str, timeout: float = 30) -> None:
    """Change the options of a mounted tmpfs in place, e.g. ``ro`` or ``rw,size=4m``.

    Turning read-only fails (EBUSY) while a file is open for writing, so it is retried until the
    writer is between two files.
    """
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(["mount", "-o", f"remount,{options}", str(mountpoint)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"cannot remount {mountpoint} {options}: {done.stderr.strip()}"
        time.sleep(0.005)
