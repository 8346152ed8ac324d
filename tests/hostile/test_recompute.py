"""``advpipe masks verify --recompute K``: the attack re-run from a store's own recorded configuration convicts a
store that every other check passes.

The forgeries here are self-consistent: their masks are real attack masks (made with another seed), with
matching pixel counts, mask hashes, summary and a fresh manifest, so structural verification passes and only
recomputing the attack tells them apart. Everything runs with one CPU thread, as the attack's floats depend on
the thread count (tests/faults/conftest.py).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.checkpoints import in_default_run_folder
from helpers.hostile import cli, refused, succeeded
from advpipe.cli import app
from advpipe.pipeline.location import write_manifest
from advpipe.pipeline.provenance import summarize
from advpipe.pipeline.reader import open_store

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in:UserWarning",
                                        "ignore:Consolidated metadata is:UserWarning")

N, CHUNK = 24, 8
ATTACK = ["--model", "resnet20", "--data", "embedded", "--limit", str(N), "--chunk-size", str(CHUNK),
          "--batch-size", "8", "--steps", "2", "--attack-opt", "init_steps=1", "--workers", "0"]
#: per-sample arrays of a store whose chunk objects move together when a chunk is replaced
ROW_ARRAYS = ("masks", "mask_hash", "labels", "success", "clean_correct", "l0", "l0_pixels", "l2", "linf", "loss")

runner = CliRunner()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder with the fitted checkpoint at precompute's default place, an honest store and one made with seed 1."""
    root = tmp_path_factory.mktemp("recompute")
    with in_default_run_folder(root, N):
        for name, seed in (("honest", "0"), ("other-seed", "1")):
            result = runner.invoke(app, ["precompute-masks", *ATTACK, "--seed", seed, "--out", f"{name}.zarr"])
            assert result.exit_code == 0, result.output
    return {"root": root, "honest": root / "honest.zarr", "other": root / "other-seed.zarr"}


def _rewrite_attrs(path: Path, **changes: object) -> None:
    """Set root attributes (and the summary recomputed from the arrays), then write a fresh manifest, as a forger would."""
    meta = json.loads((path / "zarr.json").read_text())
    attrs = meta["attributes"]["advpipe"]
    attrs.update(changes)
    (path / "advpipe.manifest.json").unlink()
    (path / "zarr.json").write_text(json.dumps(meta))
    attrs["summary"] = summarize(open_store(path).metrics())
    (path / "zarr.json").write_text(json.dumps(meta))
    write_manifest(path)


def _copy_chunk(source: Path, target: Path, index: int) -> None:
    """Replace chunk ``index`` of every per-sample array of ``target`` by ``source``'s objects."""
    for name in ROW_ARRAYS:
        chunk_dir = source / name / "c"
        for obj in chunk_dir.rglob("*"):
            rel = obj.relative_to(chunk_dir)
            if obj.is_file() and rel.parts[0] == str(index):
                shutil.copyfile(obj, target / name / "c" / rel)


def cli_here(*args: str, cwd: Path) -> dict:
    """Run the CLI in this process (one CPU thread, see the fixture below) in ``cwd``, as :func:`cli` reports it.

    Peak memory is not measured in process (``rss_kb`` 0); the subprocess run in
    ``test_a_store_lying_about_its_seed_passes_verify_but_not_recompute`` measures it.
    """
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = runner.invoke(app, list(args))
    return {"rc": result.exit_code, "out": result.output, "seconds": time.monotonic() - started, "rss_kb": 0}


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """The attack's floats depend on the thread count; the stores were made with one thread."""


def test_an_honest_store_is_recomputed_exactly(stores: dict[str, Path]) -> None:
    output = succeeded(cli_here("masks", "verify", str(stores["honest"]), "--recompute", "2", cwd=stores["root"]))
    lines = [line for line in output.splitlines() if line.startswith("recomputed chunk")]
    assert len(lines) == 2 and all(line.endswith(": identical") for line in lines), output
    assert "2 recomputed chunk(s) agree with it (2 identical)" in output


def test_a_store_lying_about_its_seed_passes_verify_but_not_recompute(stores: dict[str, Path], tmp_path: Path) -> None:
    forged = Path(shutil.copytree(stores["other"], tmp_path / "forged.zarr"))
    _rewrite_attrs(forged, seed=0)
    succeeded(cli_here("masks", "verify", str(forged), "--data", "embedded", cwd=stores["root"]))
    # nothing but the attack itself tells it apart, and it tells every chunk apart
    refused(cli_here("masks", "verify", str(forged), "--recompute", "3", cwd=stores["root"]),
            "recomputed masks disagree with the store: chunk 0 ", "(and 2 more of the 3 recomputed)")
    # as a user runs it, in a subprocess with bounded time and peak memory; any one chunk convicts it
    refused(cli("masks", "verify", str(forged), "--recompute", "1", cwd=stores["root"]),
            "recomputed masks disagree with the store: chunk ")


def test_one_replaced_chunk_is_named(stores: dict[str, Path], tmp_path: Path) -> None:
    forged = Path(shutil.copytree(stores["honest"], tmp_path / "forged.zarr"))
    _copy_chunk(stores["other"], forged, 1)  # real masks of the same images, from another attack run
    _rewrite_attrs(forged)
    succeeded(cli_here("masks", "verify", str(forged), cwd=stores["root"]))
    result = cli_here("masks", "verify", str(forged), "--recompute", "3", cwd=stores["root"])
    line = refused(result, "chunk 1 (samples 8-15)")
    assert "more of the" not in line  # chunks 0 and 2 are still the honest ones
    assert "recomputed chunk 0 (samples 0-7): identical" in result["out"]


def test_a_wrong_checkpoint_is_refused(stores: dict[str, Path], tmp_path: Path) -> None:
    wanted = open_store(stores["honest"]).provenance["model"]["checkpoint_sha256"]
    result = cli_here("masks", "verify", str(stores["honest"]), "--recompute", "1", "--checkpoint",
                      "builtin:resnet20-cifar10", cwd=stores["root"])
    refused(result, "builtin:resnet20-cifar10 has sha256", wanted)
    assert "recomputed chunk" not in result["out"]  # refused before any attack runs


def test_no_checkpoint_with_the_recorded_sha256(stores: dict[str, Path], tmp_path: Path) -> None:
    refused(cli_here("masks", "verify", str(stores["honest"]), "--recompute", "1", cwd=tmp_path),
            "no checkpoint with the store's sha256")
    refused(cli_here("masks", "verify", str(stores["honest"]), "--checkpoint", "x.pt", cwd=tmp_path),
            "--checkpoint is only used with --recompute")
