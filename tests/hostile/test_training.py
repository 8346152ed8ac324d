"""Hostile training input (issue 18, the training side), run as a user runs the CLI.

One test per failure class: non-finite settings and checkpoints (3), an ``--overwrite`` that must
not lose the old run (4) and a full disk while saving (5). Each refusal is exit code 2, exactly one
``error:`` line, no traceback, in bounded time and under 2 GB peak memory. Kills, write limits and
injected disk errors run the CLI in a subprocess (peak memory from ``wait4``); the other refusals run it
in this process (no interpreter start-up; peak memory is this process's own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from faults.conftest import AdvpipeProcess
from helpers.hostile import TINY, cli, file_bytes, invoke, refused, succeeded
from advpipe.models.checkpoint import BUILTIN_DIR, load_checkpoint

VICTIM = BUILTIN_DIR / "resnet20-cifar10.pt"
STOP_AT_SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "stop_at.py"
pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process runs too use one CPU thread


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A finished one-epoch run (with a note of the user's beside it), made once; tests copy it."""
    out = tmp_path_factory.mktemp("old") / "run"
    succeeded(invoke("train", *TINY, "--out", str(out)))
    (out / "notes.txt").write_text("my notes on this run\n")
    return out


def copy_run(old_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(old_run, target)
    return target


def leftovers(run: Path) -> list[str]:
    """Staging, trash or temporary files an --overwrite or a save left beside or inside the run."""
    beside = [p.name for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.")]
    inside = [p.name for p in run.iterdir() if p.name.endswith(".tmp")] if run.is_dir() else []
    return beside + inside


# ------------------------------------------------------------------ class 3: non-finite settings and checkpoints


@pytest.mark.parametrize("flags, config, needle", [
    (["--weight-decay", "nan"], None, "--weight-decay must be a finite number"),
    (["--warmup-epochs", "nan"], None, "--warmup-epochs must be a finite number"),
    (["--lr", "inf"], None, "--lr must be a finite number"),
    ([], "momentum: .nan\n", "momentum must be a finite number"),
])
def test_non_finite_settings_are_refused_before_anything_is_written(tmp_path, flags, config, needle):
    args = list(flags)
    if config:
        (tmp_path / "c.yaml").write_text(config)
        args += ["--config", str(tmp_path / "c.yaml")]
    refused(invoke("train", *TINY, "--out", str(tmp_path / "run"), *args), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "1e30", "--batch-size", "32"], "loss is nan"),  # the loss turns NaN at the second step
    (["--lr", "3e38", "--weight-decay", "10"], "weight tensors are not finite"),  # one step, loss still finite
    (["--lr", "1e30"], "outputs are not finite on"),  # one step: finite weights near 1e29, logits overflow
])
def test_a_diverging_run_stops_and_never_saves_its_weights(tmp_path, flags, needle):
    refused(invoke("train", *TINY, "--out", str(tmp_path / "run"), *flags), "training diverged at epoch 1", needle)
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def _first_float(payload: dict) -> torch.Tensor:
    return next(v for v in payload["model_state"].values() if v.is_floating_point())


DAMAGE = {
    "nan-weights": (lambda p: _first_float(p).view(-1)[0].fill_(float("nan")), "hold NaN or infinite values"),
    "std-zero": (lambda p: p.update(std=[0.0, 0.0, 0.0]), "std > 0"),
    "mean-empty": (lambda p: p.update(mean=[]), "mean=[]"),
    "mean-wrong-length": (lambda p: p.update(mean=[0.5, 0.5]), "does not fit a model of 3 input channels"),
    "mean-infinite": (lambda p: p.update(mean=[float("inf"), 0.5, 0.5]), "must be finite"),
}


def damaged(source: Path, target: Path, kind: str) -> Path:
    payload = torch.load(source, weights_only=True)
    DAMAGE[kind][0](payload)
    torch.save(payload, target)
    return target


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_evaluate_refuses_a_checkpoint_with_non_finite_weights_or_a_bad_normalization(tmp_path, kind):
    ckpt = damaged(VICTIM, tmp_path / f"{kind}.pt", kind)
    refused(invoke("evaluate", "--checkpoint", str(ckpt), "--limit", "64", "--device", "cpu"),
            "damaged advpipe checkpoint", DAMAGE[kind][1])


@pytest.mark.parametrize("kind", ["nan-weights", "std-zero"])
def test_precompute_refuses_a_damaged_victim(tmp_path, kind):
    ckpt = damaged(VICTIM, tmp_path / f"{kind}.pt", kind)
    refused(invoke("precompute-masks", "--data", "embedded", "--limit", "16", "--checkpoint", str(ckpt),
                "--out", str(tmp_path / "m.zarr"), "--device", "cpu", "--workers", "0"),
            "damaged advpipe checkpoint", DAMAGE[kind][1])
    assert not (tmp_path / "m.zarr" / "zarr.json").exists()


@pytest.mark.parametrize("kind", ["nan-weights", "mean-empty"])
def test_resume_refuses_a_damaged_last_checkpoint(old_run, tmp_path, kind):
    run = copy_run(old_run, tmp_path)
    damaged(run / "last.pt", run / "last.pt", kind)
    before = file_bytes(run)
    refused(invoke("train", *TINY[:-4], "--epochs", "2", "--device", "cpu", "--out", str(run), "--resume"),
            "damaged advpipe checkpoint", DAMAGE[kind][1])
    assert file_bytes(run) == before


# ------------------------------------------------------------------ class 4: --overwrite keeps the old run until the new one has a checkpoint


@pytest.mark.parametrize("flags", [
    ["--lr", "1e30", "--batch-size", "32"],  # fails mid-epoch ("diverged")
    ["--lr", "1e30"],  # one step: fails at the epoch's evaluation (outputs not finite)
    ["--warmup-epochs", "nan"],  # refused at validation
    ["--batch-size", "100000"],  # refused after the data is loaded
])
def test_a_failed_overwrite_leaves_the_old_run_byte_identical(old_run, tmp_path, flags):
    run = copy_run(old_run, tmp_path)
    before = file_bytes(run)
    refused(invoke("train", *TINY, "--out", str(run), "--overwrite", *flags))
    assert file_bytes(run) == before
    assert not leftovers(run)


def test_a_successful_overwrite_replaces_the_run_and_keeps_other_files(old_run, tmp_path):
    run = copy_run(old_run, tmp_path)
    before = file_bytes(run)
    succeeded(invoke("train", *TINY, "--out", str(run), "--overwrite", "--seed", "5"))
    after = file_bytes(run)
    assert yaml.safe_load(after["config.yaml"])["seed"] == 5
    assert after["notes.txt"] == before["notes.txt"]
    assert after["last.pt"] != before["last.pt"] and after["best.pt"] != before["best.pt"]
    assert load_checkpoint(run / "last.pt").config["seed"] == 5
    assert not leftovers(run)


def _wait_for(proc: AdvpipeProcess, condition, deadline_s: float = 120) -> None:
    """Poll until ``condition`` holds; a run that ends first must have reached it on its way out."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if proc.poll() is not None:  # ended between two polls: the moment passed only if it left its mark
            assert condition(), "the run ended before the moment to kill it"
            return
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (by a signal), from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


# "staging started" and "staged checkpoint written" last milliseconds to a second (the staging folder
# lives until the first epoch's checkpoints; the staged best.pt only until last.pt is saved beside
# it), so those runs stop themselves right at the moment (tests/helpers/stop_at.py) and are
# killed stopped there; a poll could miss them on a fast machine. "replaced" waits for the end.
STOP_AT = {"staging started": "staging", "staged checkpoint written": "*/.run.new-*/best.pt"}
STOPPED_HOLDS = {"staging started": [], "staged checkpoint written": ["best.pt"]}  # the staged .pt files then


@pytest.mark.parametrize("moment", ["staging started", "staged checkpoint written", "replaced"])
def test_kill_9_during_an_overwrite_leaves_the_old_or_the_new_run(old_run, tmp_path, moment):
    run = copy_run(old_run, tmp_path)
    before = file_bytes(run)
    staging = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".run.new-")]
    args = ["train", *TINY[:-4], "--epochs", "2", "--device", "cpu", "--out", str(run), "--overwrite", "--seed", "5"]
    python = ("-m", "advpipe")
    if moment in STOP_AT:
        python, args = (str(STOP_AT_SCRIPT),), [STOP_AT[moment], *args]
    with AdvpipeProcess(args, cwd=tmp_path, python=python) as proc:
        if moment in STOP_AT:  # stopped at the moment: the staging folder holds just what it should
            _wait_for(proc, lambda: _stopped(proc.pid))
            assert [sorted(p.name for p in folder.glob("*.pt")) for folder in staging()] == [STOPPED_HOLDS[moment]]
        else:
            _wait_for(proc, lambda: (run / "config.yaml").read_bytes() != before["config.yaml"])
        proc.kill(signal.SIGKILL)
    after = file_bytes(run)
    if after["config.yaml"] == before["config.yaml"]:  # the old run, untouched
        assert after == before
    else:  # the new run, whole: its checkpoint loads and belongs to its config
        assert load_checkpoint(run / "last.pt").config["seed"] == 5
        assert yaml.safe_load(after["config.yaml"])["seed"] == 5
        assert after.get("notes.txt") == before["notes.txt"] or any(
            (p / "notes.txt").exists() for p in tmp_path.iterdir() if p.name.startswith(".run."))
    if moment == "replaced":
        assert load_checkpoint(run / "last.pt").config["seed"] == 5


def test_a_killed_overwrites_staging_folder_is_cleared_by_the_next_one(tmp_path):
    import subprocess
    import sys

    from advpipe.train import rundir

    old = tmp_path / "run"
    old.mkdir()
    (old / "last.pt").write_text("old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    stale, live = tmp_path / f".run.new-{dead.pid}", tmp_path / f".run.new-{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "best.pt").write_text("half")
    folder = rundir.open_run_folder(old, overwrite=True)
    assert not stale.exists(), "a dead run's staging folder is removed"
    assert live.exists(), "a running process's staging folder is left alone"
    assert folder.staging is not None and folder.path.name == f".run.new-{os.getpid()}"


def test_the_folder_swap_without_renameat2_still_replaces_the_run(tmp_path, monkeypatch):
    from advpipe.train import rundir

    old = tmp_path / "run"
    old.mkdir()
    for name, text in (("last.pt", "old"), ("metrics.jsonl", "old"), ("notes.txt", "mine")):
        (old / name).write_text(text)
    folder = rundir.open_run_folder(old, overwrite=True)
    assert folder.staging is not None and folder.path != old
    (folder.path / "last.pt").write_text("new")

    class NoRenameat2:  # a libc without renameat2 (macOS, old glibc): two renames instead
        pass

    monkeypatch.setattr(rundir.ctypes, "CDLL", lambda *a, **k: NoRenameat2())
    folder.commit()
    assert folder.path == old
    assert {p.name: p.read_text() for p in old.iterdir()} == {"last.pt": "new", "notes.txt": "mine"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# ------------------------------------------------------------------ class 5: a full disk while saving


#: the CLI with a file size limit: writes past it fail with EFBIG (SIGXFSZ ignored), as on a full disk
FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from advpipe.cli import main
sys.argv = ["advpipe", *sys.argv[1:]]
main()
"""


def test_a_write_limit_during_a_save_keeps_the_saved_files_and_prints_one_line(tmp_path):
    run = tmp_path / "run"
    # best.pt (about 1.1 MB) fits, last.pt (about 2.2 MB) does not
    refused(cli("1600000", "train", *TINY, "--out", str(run), python=("-c", FILE_SIZE_LIMIT)),
            "saving epoch 1", "File too large", "--resume")
    assert load_checkpoint(run / "best.pt").epoch == 1
    assert not (run / "last.pt").exists() and not leftovers(run)
    succeeded(invoke("train", *TINY, "--out", str(run)))  # no last.pt: the same command starts the run again
    assert load_checkpoint(run / "last.pt").epoch == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


#: the CLI with the second save of last.pt failing as a full disk fails
FULL_DISK_AT_EPOCH_2 = """
import errno, sys
import advpipe.models.checkpoint as checkpoint
real, lasts = checkpoint.atomic_write_bytes, []
def write(path, data):
    if path.name == "last.pt":
        lasts.append(path)
        if len(lasts) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real(path, data)
checkpoint.atomic_write_bytes = write
from advpipe.cli import main
sys.argv = ["advpipe", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("lose_best", [False, True])
def test_a_full_disk_at_epoch_2_keeps_epoch_1_and_resume_recreates_what_is_missing(tmp_path, lose_best):
    run = tmp_path / "run"
    args = [*TINY[:-4], "--epochs", "2", "--device", "cpu", "--out", str(run)]
    refused(cli("train", *args, python=("-c", FULL_DISK_AT_EPOCH_2)), "saving epoch 2", "No space left on device")
    assert load_checkpoint(run / "last.pt").epoch == 1 and not leftovers(run)
    if lose_best:
        (run / "best.pt").unlink()
    succeeded(invoke("train", *args, "--resume"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert load_checkpoint(run / "last.pt").epoch == 2
    best = load_checkpoint(run / "best.pt")
    assert best.metrics["test_acc"] == max(m["test_acc"] for m in metrics) == best.metrics["best_test_acc"]


def test_an_overwrite_under_a_read_only_parent_stages_inside_the_run_folder(tmp_path, monkeypatch):
    from advpipe.errors import AdvpipeError
    from advpipe.train import rundir

    old = tmp_path / "run"
    old.mkdir()
    for name, text in (("last.pt", "old"), ("best.pt", "old"), ("notes.txt", "mine")):
        (old / name).write_text(text)
    real_check = rundir.check_writable_dir

    def parent_read_only(path, what):
        if path.parent == tmp_path and path != old:
            raise AdvpipeError(f"cannot write to {what}")
        return real_check(path, what)

    monkeypatch.setattr(rundir, "check_writable_dir", parent_read_only)
    folder = rundir.open_run_folder(old, overwrite=True)
    assert folder.path.parent == old
    (folder.path / "last.pt").write_text("new")
    assert (old / "last.pt").read_text() == "old"  # kept until the commit
    folder.commit()
    assert {p.name: p.read_text() for p in old.iterdir()} == {"last.pt": "new", "notes.txt": "mine"}


def test_evaluate_accuracy_counts_images_whose_logits_are_not_finite():
    from advpipe.data.batch import Batch
    from advpipe.models.accuracy import evaluate_accuracy

    class Overflowing(torch.nn.Module):  # image i gives inf logits when its first pixel is 1
        def forward(self, x):
            return torch.where(x[:, :1, 0, 0] == 1, float("inf"), 0.0) * torch.ones(1, 3)

    images = torch.zeros(5, 3, 2, 2)
    images[[1, 3], 0, 0, 0] = 1
    batch = Batch(images=images, labels=torch.zeros(5, dtype=torch.long), index=torch.arange(5))
    result = evaluate_accuracy(Overflowing(), [batch], 3, reduce=lambda t: 2 * t)  # two equal shards
    assert result["non_finite"] == 4 and result["n"] == 10
    assert evaluate_accuracy(Overflowing(), [batch], 3)["non_finite"] == 2


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "over-limit"])
def test_evaluate_refuses_a_checkpoint_that_is_not_a_bounded_regular_file(tmp_path, monkeypatch, kind):
    ckpt = tmp_path / "victim.pt"
    if kind == "fifo":  # reading it would block forever
        os.mkfifo(ckpt)
    elif kind == "dev-zero":  # reading it would never end
        ckpt.symlink_to("/dev/zero")
    elif kind == "directory":
        ckpt.mkdir()
    else:  # a real checkpoint, over a limit lowered to below its size
        shutil.copy(VICTIM, ckpt)
        monkeypatch.setenv("ADVPIPE_MAX_CHECKPOINT_BYTES", str(VICTIM.stat().st_size - 1))
    needle = "GiB limit for checkpoints" if kind == "over-limit" else "is not a regular file"
    refused(invoke("evaluate", "--checkpoint", str(ckpt), "--limit", "64", "--device", "cpu"), needle)


def test_a_bad_checkpoint_size_limit_is_refused(monkeypatch):
    monkeypatch.setenv("ADVPIPE_MAX_CHECKPOINT_BYTES", "2GB")
    refused(invoke("evaluate", "--checkpoint", str(VICTIM), "--limit", "64", "--device", "cpu"),
            "ADVPIPE_MAX_CHECKPOINT_BYTES must be a positive number of bytes")
