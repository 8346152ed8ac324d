"""The README's "The pipeline" block and its "Use it from Python" snippet run as written, in a fresh folder.

The pipeline runs on CIFAR-10 where a copy is at hand: ``$ADVPIPE_TEST_CIFAR10``, or the project's shared
copy beside the repository (``../shared/datasets/cifar10``), linked as ``./data`` as the README says;
elsewhere on the embedded data (the README's own ``--data embedded`` variant).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs_commands import ROOT, block_commands

README = ROOT / "README.md"


def readme_section(title: str) -> str:
    """The README text from the heading ``title`` to the next heading of any level."""
    text = README.read_text()
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", text, flags=re.S | re.M)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def pipeline_block() -> str:
    """The README's pipeline block, verbatim."""
    return re.search(r"```bash\n(.*?)```", readme_section("The pipeline"), flags=re.S).group(1)


def pipeline_commands() -> list[str]:
    """The advpipe commands of the pipeline block, in order (continuations joined, comments dropped)."""
    return [c.text for c in block_commands("README.md", 1, pipeline_block().splitlines())]


def cifar10_dir() -> Path | None:
    """A CIFAR-10 folder (train.npz/test.npz or the python pickles) to run the pipeline on, if any."""
    for candidate in (os.environ.get("ADVPIPE_TEST_CIFAR10"), ROOT.parent / "shared" / "datasets" / "cifar10"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def run_pipeline(block: str, cwd: Path) -> None:
    """Run the block as written with bash (``set -e``: the first failing step stops it), ``advpipe`` from this env."""
    bin_dir = str(Path(sys.executable).parent)
    # one intra-op thread: several times faster when the 2 cores are shared (as tests/conftest.py notes)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-e", "-x", "-c", block], cwd=cwd, capture_output=True, text=True, timeout=1200,
                          env=env)
    steps = [ln for ln in proc.stderr.splitlines() if ln.startswith("+ advpipe")]
    assert proc.returncode == 0, f"failed at: {steps[-1] if steps else '?'}\n{proc.stderr[-3000:]}"
    assert len(steps) == 6, steps  # train, precompute, train, evaluate x2, report


def check_outputs(cwd: Path) -> None:
    """What the five steps promise: two runs, a complete store, an evaluation with attacks and corruptions, a report."""
    assert (cwd / "runs/none/best.pt").is_file() and (cwd / "runs/advmask/best.pt").is_file()
    config = (cwd / "runs/advmask/config.yaml").read_text()
    assert "advmask" in config and "masks/none.zarr" in config
    from advpipe.pipeline.reader import open_store

    assert open_store(cwd / "masks/none.zarr").complete
    for run in ("none", "advmask"):
        result = json.loads((cwd / f"runs/{run}/eval.json").read_text())
        assert result["attacks"] and result["corruptions"], sorted(result)
    report = (cwd / "report/report.md").read_text()
    assert "none" in report and "advmask" in report


def test_the_pipeline_block_is_what_this_test_runs():
    """Five steps, each on the command line the README shows, all valid for the CLI."""
    commands = pipeline_commands()
    assert [c.split()[1] for c in commands] == ["train", "precompute-masks", "train", "evaluate", "report"]
    assert shutil.which("advpipe", path=str(Path(sys.executable).parent)), "the advpipe entry point is not installed"
    assert all("--data cifar10" in c for c in (commands[0], commands[2]))
    assert "--data embedded" in readme_section("The pipeline")  # the variant the embedded run uses


@pytest.mark.slow
def test_the_readme_pipeline_runs_as_written(tmp_path):
    """The block on CIFAR-10 where a copy is at hand ("CIFAR-10 goes in ./data"), else the README's own variant.

    Once, not twice: the two differ only in ``--data cifar10`` -> ``--data embedded``, which
    test_the_pipeline_block_is_what_this_test_runs checks, and each run costs about 100 s of the suite.
    """
    block, source = pipeline_block(), cifar10_dir()
    if source is None:
        assert block.count("--data cifar10") == 2
        block = block.replace("--data cifar10", "--data embedded")
    else:
        (tmp_path / "data").symlink_to(source.resolve(), target_is_directory=True)
    run_pipeline(block, tmp_path)
    check_outputs(tmp_path)


def test_the_use_it_from_python_snippet_runs_as_written(tmp_path):
    """The snippet, verbatim, in a folder where ``advpipe demo`` left its store (made here without an attack)."""
    from advpipe.data.datasets import load_dataset
    from helpers.sharing import tiny_store

    code = re.search(r"```python\n(.*?)```", readme_section("Use it from Python"), flags=re.S).group(1)
    store = re.search(r'open_masks\("([^"]+)"\)', code).group(1)
    assert store == "demo/masks/embedded-train-resnet20-cifar10.zarr"  # where `advpipe demo` writes it
    (tmp_path / store).parent.mkdir(parents=True)
    tiny_store(tmp_path / store, load_dataset("embedded", "train"), chunk_size=500)
    (tmp_path / "snippet.py").write_text(code)
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # prob_max 0.8 reached over 2 epochs: 40% of the images occluded in the first, 80% in the second
    fractions = [float(v) for v in re.findall(r"occluded ([0-9.]+) of the images", proc.stdout)]
    assert len(fractions) == 2 and abs(fractions[0] - 0.4) <= 0.05 and abs(fractions[1] - 0.8) <= 0.05, proc.stdout
