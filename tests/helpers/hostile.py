"""Running the CLI as a hostile user would, in a subprocess, with its time and peak memory measured."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

TIME_LIMIT_S = 90
MEMORY_LIMIT_KB = 2 << 20  # 2 GB, as ru_maxrss counts it (KB)
#: every training test's data: the first 128 embedded images, one epoch, on the CPU
TINY = ("--data", "embedded", "--limit", "128", "--epochs", "1", "--device", "cpu")


def cli(*args: str, python: Sequence[str] = ("-m", "advpipe"), env: dict | None = None, timeout: float = TIME_LIMIT_S,
        cwd: Path | None = None) -> dict:
    """Run ``python -m advpipe ARGS``; return its exit code, output, seconds and peak RSS (KB, children included)."""
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"hostile-{os.getpid()}-{time.monotonic_ns()}.out"
    started = time.monotonic()
    with open(out_path, "w+b") as out:
        proc = subprocess.Popen([sys.executable, *python, *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        out.seek(0)
        text = out.read().decode(errors="replace")
    out_path.unlink()
    return {"rc": os.waitstatus_to_exitcode(status), "out": text, "seconds": time.monotonic() - started,
            "rss_kb": usage.ru_maxrss}


def invoke(*args: str) -> dict:
    """Run the CLI in this process (no interpreter start-up); peak memory is this process's own ru_maxrss."""
    import resource

    from typer.testing import CliRunner

    from advpipe.cli import app

    started = time.monotonic()
    result = CliRunner().invoke(app, list(args))
    text = result.output + ("".join(__import__("traceback").format_exception(result.exception))
                            if result.exception and not isinstance(result.exception, SystemExit) else "")
    return {"rc": result.exit_code, "out": text, "seconds": time.monotonic() - started,
            "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def refused(result: dict, *needles: str) -> str:
    """Assert exit code 2, exactly one ``error:`` line and no traceback, within the bounds; return that line."""
    out = result["out"]
    assert result["rc"] == 2, out
    assert "Traceback" not in out, out
    assert result["seconds"] < TIME_LIMIT_S, result
    assert result["rss_kb"] < MEMORY_LIMIT_KB, result
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], out
    return errors[0]


def succeeded(result: dict) -> str:
    """Assert exit code 0 with no traceback and no error line, within the bounds; return the output."""
    out = result["out"]
    assert result["rc"] == 0, out
    assert "Traceback" not in out and "error:" not in out, out
    assert result["seconds"] < TIME_LIMIT_S and result["rss_kb"] < MEMORY_LIMIT_KB, result
    return out


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file directly in ``folder``, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
