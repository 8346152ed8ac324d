"""Running the CLI as a hostile user would, with each command's time and peak memory measured.

:func:`cli` runs it in a subprocess (peak RSS of that process and its children, from ``wait4``);
:func:`invoke` runs it in this process with the peak RSS reset just before the command, so each
command's bound is checked on its own peak, never on the test run's lifetime peak.
"""

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


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``/proc/self/clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _peak_rss_kb() -> int:
    """This process's peak RSS (KB) since the last reset: ``VmHWM`` of ``/proc/self/status``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def invoke(*args: str) -> dict:
    """Run the CLI in this process (no interpreter start-up), with the peak memory of this command alone.

    The peak RSS is reset just before the command and read just after it, so ``rss_kb`` is the
    largest RSS this process had *while the command ran* (the test runner's own memory included:
    an upper bound of the command's). Where the peak cannot be reset (not Linux), the command runs
    in a subprocess instead (:func:`cli`), where ``wait4`` measures it.
    """
    from typer.testing import CliRunner

    from advpipe.cli import app

    if not _reset_peak_rss():
        return cli(*args)
    started = time.monotonic()
    result = CliRunner().invoke(app, list(args))
    rss_kb = _peak_rss_kb()
    text = result.output + ("".join(__import__("traceback").format_exception(result.exception))
                            if result.exception and not isinstance(result.exception, SystemExit) else "")
    return {"rc": result.exit_code, "out": text, "seconds": time.monotonic() - started, "rss_kb": rss_kb}


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
