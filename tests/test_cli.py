"""The CLI as a user runs it: help, version, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from advpipe.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for needle in needles:
        assert needle in text, text


def test_help_lists_every_command_with_a_description():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("train", "evaluate", "info"):
        assert command in result.output
    from advpipe.commands import COMMAND_MODULES

    for module in COMMAND_MODULES:
        assert module.replace("_", "-") in result.output


def test_version_via_subprocess():
    proc = subprocess.run([sys.executable, "-m", "advpipe", "--version"], capture_output=True, text=True, timeout=120)
    from advpipe import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"advpipe {__version__}"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "resnet9000"], ["unknown model", "resnet20"]),
        (["--data", "mnist3d"], ["unknown dataset", "embedded"]),
        (["--aug", "sparkles"], ["unknown --aug", "none"]),
        (["--data", "cifar10", "--data-dir", "/nonexistent/cifar"], ["no cifar10 data", "--download"]),
        (["--epochs", "0"], ["--epochs must be at least 1"]),
        (["--batch-size", "5000"], ["larger than the training set"]),
        (["--data", "synthetic", "--limit", "0"], ["--limit"]),
        (["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], ["device"]),
    ],
)
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needles):
    out = tmp_path / "run"
    result = run("train", "--out", str(out), *args)
    _one_line_error(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "--bogus"], ["--bogus", "the closest is --"]),
        (["train", "--epochs", "abc"], ["--epochs", "integer", "train --help'"]),
        (["evaluate"], ["--checkpoint"]),
        (["masks", "info"], ["store"]),
        (["train", "--aug"], ["--aug"]),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, needles):
    """Unknown options, values of the wrong type and missing options: one ``error:`` line, not typer's usage box."""
    result = run(*args)
    _one_line_error(result, *needles)
    assert "Usage:" not in result.output


def _train_flags() -> set[str]:
    import typer.main

    train = typer.main.get_command(app).commands["train"]
    return {opt for param in train.params for opt in param.opts + param.secondary_opts}


def test_an_unknown_option_names_the_closest_valid_flag():
    result = run("train", "--epoch", "3")
    _one_line_error(result, "no such option --epoch", "the closest is --epochs")
    named = run("train", "--bogus").output.split("the closest is ")[1].split()[0]
    assert named in _train_flags(), named  # a real flag of that command, whatever the spelling
    _one_line_error(run("--verbos", "info"), "the closest is --verbose")


def test_usage_errors_are_one_line_from_a_real_process():
    """The installed entry point (not only the test runner) prints one stderr line and exits 2."""
    for args, flag in ((["train", "--bogus"], "--bogus"), (["train", "--epochs", "abc"], "--epochs"),
                       (["evaluate"], "--checkpoint")):
        proc = subprocess.run([sys.executable, "-m", "advpipe", *args], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], (args, proc.stderr)


def test_help_still_works_for_the_group_and_each_command():
    result = run("train", "--help")
    assert result.exit_code == 0 and "Usage:" in result.output and "--epochs" in result.output
    assert run("masks", "verify", "--help").exit_code == 0
    assert run("--help").exit_code == 0


def test_non_writable_out_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("train", "--data", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "1",
                 "--out", str(blocker / "run"))
    _one_line_error(result, "cannot write to --out folder")
    assert blocker.read_text() == "not a folder"


def test_bad_config_file_and_key_values(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 3\n")
    _one_line_error(run("train", "--config", str(cfg)), "unknown keys", "epochz")
    _one_line_error(run("train", "--aug-opt", "novalue"), "KEY=VALUE")


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    _one_line_error(run("evaluate", "--checkpoint", str(corrupt)), "not a readable advpipe checkpoint")
    import torch

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    _one_line_error(run("evaluate", "--checkpoint", str(foreign)), "not an advpipe checkpoint")
    _one_line_error(run("evaluate", "--checkpoint", str(tmp_path / "missing.pt")), "does not exist")


def test_info_lists_registries():
    result = run("info")
    assert result.exit_code == 0
    assert "resnet20" in result.output and "embedded" in result.output and "none" in result.output


def test_python_m_advpipe_bad_input_has_no_traceback(tmp_path):
    env = {**os.environ, "ADVPIPE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "advpipe", "train", "--model", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown model" in proc.stderr


def test_progress_without_a_terminal_prints_periodic_plain_lines(capsys):
    """Logs and CI get readable progress lines (count, percent, rate, eta), not a silent rich bar."""
    from advpipe import progress
    from advpipe.commands.reporting import LogReporter

    previous = progress.use_reporter(LogReporter(interval=0.0))
    try:
        for _ in progress.track(range(4), "attack", unit="img"):
            pass
        with progress.task("idle", total=10):
            pass  # never advanced: prints nothing
        slow = LogReporter(interval=3600.0)
        progress.use_reporter(slow)
        with progress.task("precompute", total=2) as outer:
            for _ in progress.track(range(3), "attack batch"):
                pass  # nested and short: no line of its own
            outer.advance(2)
    finally:
        progress.use_reporter(previous)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[0].startswith("attack: 1/4") and "25%" in lines[0] and "img/s" in lines[0] and "eta" in lines[0]
    attack = [ln for ln in lines if ln.startswith("attack:")]
    assert attack[-1].startswith("attack: 4/4") and "100%" in attack[-1]
    assert not any(ln.startswith(("idle", "attack batch")) for ln in lines)
    assert lines[-1].startswith("precompute: 2/2")


def test_an_error_exit_lets_zarrs_leftover_reads_finish_first():
    """A failed multi-chunk read leaves sibling reads on zarr's loop; the error exit waits for them."""
    import asyncio

    from zarr.core.sync import _get_loop

    from advpipe.commands.errors_cli import settle_zarr_tasks

    loop = _get_loop()
    finished = []

    async def sibling_read():
        await asyncio.sleep(0.3)
        finished.append(True)

    asyncio.run_coroutine_threadsafe(sibling_read(), loop)  # left running, as after a damaged chunk
    settle_zarr_tasks(timeout_s=5)
    assert finished == [True]
    started = __import__("time").monotonic()
    hung = asyncio.run_coroutine_threadsafe(asyncio.sleep(30), loop)  # a read that never ends: waited for, boundedly
    settle_zarr_tasks(timeout_s=0.2)
    assert __import__("time").monotonic() - started < 3
    hung.cancel()
