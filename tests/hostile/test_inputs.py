"""Hostile flags, config files, image folders and run folders (issue 18, classes 7 and 8 outside the stores).

Each is refused with exit code 2, exactly one ``error:`` line and no traceback, in bounded time and
under 2 GB peak memory, or succeeds correctly. Image bombs and loader workers run the CLI in a
subprocess (peak memory from ``wait4``, children included); the rest run it in this process.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.hostile import TINY, cli, invoke, refused, succeeded
from advpipe.models.checkpoint import BUILTIN_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
VICTIM = str(BUILTIN_DIR / "resnet20-cifar10.pt")


@pytest.mark.parametrize("eps", ["1e-5000", "1e-10000000", "1e5000", "0." + "1" * 5000])
def test_eps_that_no_float_can_hold_is_refused_quickly(tmp_path, eps):
    result = invoke("precompute-masks", "--data", "embedded", "--limit", "16", "--checkpoint", VICTIM,
                    "--eps", eps, "--out", str(tmp_path / "m.zarr"), "--device", "cpu")
    refused(result, "--eps")
    assert result["seconds"] < 20


@pytest.mark.parametrize("text, needle", [
    (b"epochs: abc\n", "--epochs must be an integer, got 'abc'"),
    (b'lr: "0.1"\n', "--lr must be a finite number, got '0.1'"),
    (b"milestones: 5\n", "milestones must be a list of finite numbers, got 5"),
    (b"milestones: [0.5, 2]\n", "milestones are fractions of training"),
    (b'gamma: "x"\n', "gamma must be a finite number, got 'x'"),
    (b"limit: 1.5\n", "--limit must be an integer"),
    (b"aug: [cutout]\n", "--aug must be a string"),
    (b"lr: 0.1\n\xff\xfe: 1\n", "is not UTF-8 text"),
    (b"lr: [0.1\n", "is not valid YAML"),
])
def test_config_files_of_the_wrong_kind_are_refused(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_bytes(text)
    refused(invoke("train", "--data", "embedded", "--device", "cpu", "--config", str(tmp_path / "c.yaml"),
                   "--out", str(tmp_path / "run")), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [
    ["train", *TINY, "--device", "meta"],
    ["evaluate", "--checkpoint", VICTIM, "--limit", "16", "--device", "meta"],
])
def test_a_device_that_holds_no_data_is_refused(tmp_path, command):
    refused(invoke(*command, "--out" if command[0] == "train" else "--json", str(tmp_path / "x")),
            "unknown device 'meta'")


def _image_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _png_bomb(side: int) -> bytes:
    """A grey PNG of side x side zeros: about 400 KB for 20000 (which decodes to 400 MB, 1.2 GB as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, row = zlib.compressobj(9), b"\x00" * (side + 1)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()[:60]


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _png_bomb(20000)


@pytest.mark.parametrize("kind, workers, needle", [
    ("truncated", "0", "image file is truncated"),
    ("not an image", "0", "cannot identify image file"),
    ("20000x20000", "0", "exceeds limit"),
    ("10000x10000", "0", "exceeds limit"),  # over PIL's bound but under twice it: PIL only warns
    ("20000x20000", "1", "exceeds limit"),  # in a loader worker: still one line
])
def test_a_bad_image_in_a_folder_is_refused_without_decoding_it(tmp_path, bomb, kind, workers, needle):
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "a" / "0.png"
    content = {"truncated": _truncated_png, "not an image": lambda: b"not a png", "20000x20000": lambda: bomb,
               "10000x10000": lambda: _png_bomb(10000)}[kind]()
    bad.write_bytes(content)
    run = cli if "x" in kind else invoke  # bombs in a subprocess, where their peak memory is measured
    line = refused(run("train", "--data", "folder", "--data-dir", str(root), "--image-size", "16", "--epochs", "1",
                       "--batch-size", "4", "--device", "cpu", "--workers", workers, "--out", str(tmp_path / "run")),
                   needle)
    assert str(bad) in line


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    """A run of 2 planned epochs stopped after 1 (trained as 1 of 1, resumed with --epochs 2)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    succeeded(invoke("train", *TINY, "--out", str(out)))
    return out


def test_resume_drops_a_metrics_line_cut_by_a_kill(two_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "train_loss": 2.3')  # a kill in the middle of epoch 2's line
    succeeded(invoke("train", *TINY[:-4], "--epochs", "2", "--device", "cpu", "--out", str(run), "--resume"))
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


@pytest.mark.parametrize("middle", ['{"epoch": 1, "train', "[1, 2]", '{"epoch": "one"}'])
def test_resume_refuses_a_broken_metrics_line_before_the_last(two_epoch_run, tmp_path, middle):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(middle + "\n" + good)
    refused(invoke("train", *TINY[:-4], "--epochs", "2", "--device", "cpu", "--out", str(run), "--resume"),
            "line 1 is not a metrics record")
    assert (run / "metrics.jsonl").read_text() == middle + "\n" + good


def test_an_out_path_component_over_255_bytes_is_refused(tmp_path):
    refused(invoke("train", *TINY, "--out", str(tmp_path / ("r" * 300))), "--out folder", "File name too long")
    refused(invoke("evaluate", "--checkpoint", str(tmp_path / ("c" * 300 + ".pt")), "--device", "cpu"),
            "cannot read checkpoint", "File name too long")


# ------------------------------------------------------------------ class 8: text from users and stores is never markup


@pytest.mark.parametrize("args, shown", [
    (["--aug", "advmask", "--advmask-p", "nan,nan"], "got p=[nan, nan]"),
    (["--aug", "advmask", "--masks", "[x]secret.zarr"], "[x]secret.zarr"),
    (["--aug", "advmask", "--masks", "[/red]x.zarr"], "[/red]x.zarr"),
    (["--out", "[bold]run[/bold]", "--resume"], "no checkpoint [bold]run[/bold]/last.pt"),
])
def test_square_brackets_survive_in_error_lines(tmp_path, monkeypatch, args, shown):
    monkeypatch.chdir(tmp_path)
    refused(invoke("train", *TINY, *args), shown)


def test_checkpoint_paths_with_brackets_survive_in_error_lines(tmp_path):
    refused(invoke("evaluate", "--checkpoint", str(tmp_path / "[x]secret.pt"), "--device", "cpu"), "[x]secret.pt")


def test_class_names_with_brackets_survive_in_the_evaluate_table(tmp_path):
    root = _image_folder(tmp_path / "data", n=4)
    for split in ("train", "test"):
        (root / split / "a").rename(root / split / "[x]a")
    run = tmp_path / "run"
    common = ["--data-dir", str(root), "--device", "cpu"]
    succeeded(invoke("train", "--data", "folder", "--image-size", "16", "--epochs", "1", "--batch-size", "4",
                     "--workers", "0", "--out", str(run), *common))
    out = succeeded(invoke("evaluate", "--checkpoint", str(run / "last.pt"), *common))
    assert "[x]a" in out


def test_progress_bars_show_user_text_as_text(monkeypatch):
    from rich.console import Console

    from advpipe.commands import reporting

    monkeypatch.setattr(reporting, "console", Console(file=io.StringIO(), force_terminal=True, width=300))
    reporter = reporting.RichReporter()
    task = reporter.open("store [x]secret.zarr [/red]", 3, "chunk")
    task.advance(1, path="[y]p [/bold]")
    reporter.close(task)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", reporting.console.file.getvalue())
    assert "store [x]secret.zarr [/red]" in text and "path [y]p [/bold]" in text
