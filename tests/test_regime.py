"""Issue 22's training changes: the fixed per-epoch test subset, the embedded data's parent, unwrapped logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from advpipe.data.datasets import PREFIX_OF, drawn_from, load_dataset
from advpipe.data.split import fixed_test_subset

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def test_the_test_subset_is_fixed_sorted_and_the_same_for_every_run():
    a, b = fixed_test_subset(10_000, 2000), fixed_test_subset(10_000, 2000)
    assert torch.equal(a, b) and len(a) == 2000 and len(set(a.tolist())) == 2000
    assert torch.equal(a, a.sort().values) and int(a.max()) < 10_000
    assert not torch.equal(a, torch.arange(2000))  # a random draw, not the first rows
    assert fixed_test_subset(1000, 2000) is None and fixed_test_subset(1000, 0) is None and fixed_test_subset(1000, None) is None


@pytest.mark.slow
def test_epochs_evaluate_the_subset_and_the_last_epoch_the_full_test_set(tmp_path):
    from advpipe.train.config import TrainConfig
    from advpipe.train.loop import train

    train(TrainConfig(limit=256, epochs=2, batch_size=64, test_subset=100, device="cpu", out=str(tmp_path / "r")))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_images"] for r in rows] == [100, 1000]


def test_a_negative_test_subset_is_refused_naming_the_flag():
    from advpipe.errors import AdvpipeError
    from advpipe.train.config import TrainConfig

    with pytest.raises(AdvpipeError) as info:
        TrainConfig(test_subset=-1)
    assert info.value.fields == ("test_subset",)


@pytest.mark.skipif(not (SHARED_CIFAR10 / "train.npz").exists(), reason="needs the shared offline CIFAR-10 copy")
def test_the_embedded_splits_are_the_first_rows_of_the_recorded_parent():
    for split, rows in (("train", 2000), ("test", 1000)):
        full = load_dataset("cifar10", split, data_dir=str(SHARED_CIFAR10))
        emb = load_dataset("embedded", split)
        assert full.fingerprint == PREFIX_OF[("embedded", split)]
        assert torch.equal(full.images[:rows], emb.images) and torch.equal(full.labels[:rows], emb.labels)


def test_precompute_warns_only_when_the_victim_saw_other_data():
    from advpipe.pipeline.precompute import _check_fits
    from advpipe.pipeline.precompute_config import PrecomputeConfig

    ds = load_dataset("embedded", "train")
    cfg = PrecomputeConfig(data="embedded", checkpoint="builtin:resnet20-cifar10")

    def warnings_for(fingerprint: str) -> list[str]:
        ckpt = SimpleNamespace(arch="resnet20", dataset="cifar10", num_classes=10, image_size=32,
                               fingerprint=fingerprint)
        found: list[str] = []
        _check_fits(ckpt, ds, Path("victim.pt"), cfg, found)
        return found

    assert drawn_from(ds, PREFIX_OF[("embedded", "train")]) and drawn_from(ds, ds.fingerprint)
    assert warnings_for(PREFIX_OF[("embedded", "train")]) == []  # the shipped victim on the embedded subset
    assert warnings_for(ds.fingerprint) == []
    assert len(warnings_for("sha256:" + "0" * 64)) == 1  # really other data: still warned


def test_logs_and_tables_are_not_wrapped_when_stderr_and_stdout_are_files(tmp_path):
    code = ("import logging, sys; from advpipe.commands.reporting import setup_logging; from advpipe.cli import out; "
            "from rich.table import Table; setup_logging(False); logging.getLogger('x').warning('w' * 300); "
            "t = Table(); t.add_column('run folder'); t.add_row('/tmp/' + 'r' * 200); out.print(t)")
    err, std = tmp_path / "err.txt", tmp_path / "out.txt"
    with open(err, "w") as e, open(std, "w") as o:
        subprocess.run([sys.executable, "-c", code], check=True, stderr=e, stdout=o)
    assert err.read_text().splitlines() == ["WARNING " + "w" * 300]
    assert any("/tmp/" + "r" * 200 in line for line in std.read_text().splitlines())


def _fake_run(folder: Path, aug: str, seed: int, train_acc: float, test_acc: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"aug: {aug}\nseed: {seed}\nlimit: 5000\nepochs: 2\n")
    rows = [{"epoch": e, "train_acc": train_acc, "test_images": 2000, "epoch_time_s": 10.0} for e in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.json").write_text(json.dumps({"clean": {"top1": test_acc, "n": 10000}}))


def test_the_sweep_summary_checks_the_three_conditions(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from regime_sweep import read_run, summarise_point

    runs_dir = tmp_path / "n5000-e2" / "runs"
    # none over-fits (98% train, 70% test); cutout beats it by 2, 3 and 4 points (paired interval above 0)
    for seed, (n_test, c_test) in enumerate([(0.70, 0.72), (0.71, 0.74), (0.69, 0.73)]):
        _fake_run(runs_dir / f"n{seed}", "none", seed, 0.98, n_test)
        _fake_run(runs_dir / f"c{seed}", "cutout", seed, 0.90, c_test)
    runs = [read_run(r) for r in sorted(runs_dir.iterdir())]
    point = summarise_point(runs, idle_rate=1000.0)
    assert point["overfits"] and point["none"]["gap"]["mean"] == pytest.approx(28.0)
    assert point["cutout_minus_none"]["diff"] == pytest.approx(3.0) and point["cutout_beats_none"]
    # 10,000 training samples + a third of (2,000 + 10,000) evaluated images at 1,000 images/s
    assert point["idle_run_s_estimate"] == pytest.approx((10_000 + 12_000 / 3) / 1000)
    assert point["meets_all"]
    # a baseline that does not reach 97% train accuracy fails the first condition, and so all three
    assert not summarise_point([dict(r, train_acc=0.9) if r["aug"] == "none" else r for r in runs], 1000.0)["meets_all"]
    # two points with the same size and epochs (e.g. bf16 and fp32) pool into one, each seed paired within its point
    from regime_sweep import pool

    other = [dict(r, precision="fp32", test_acc=r["test_acc"] + (0.01 if r["aug"] == "cutout" else 0.0)) for r in runs]
    pooled = pool({"a": runs, "b": other, "c": [dict(runs[0], limit=10)]}, 1000.0)
    assert list(pooled) == ["n5000-e2-pooled"] and pooled["n5000-e2-pooled"]["points"] == ["a", "b"]
    both = pooled["n5000-e2-pooled"]
    assert both["cutout_minus_none"]["n_pairs"] == 6 and both["cutout_minus_none"]["diff"] == pytest.approx(3.5)
    assert both["precision"] == ["auto", "fp32"]
    assert both["paired_std"] == pytest.approx(1.1 ** 0.5)  # the six differences 2, 3, 4, 3, 4, 5 points
    from regime_sweep import seeds_to_detect

    # mdd = (t(0.975, n-1) + t(0.8, n-1)) * std / sqrt(n): 1.065 at 9 pairs, 0.995 at 10 (std 1)
    assert seeds_to_detect(1.0, 1.0) == 10 and seeds_to_detect(1.0, 0.0) == 2 and seeds_to_detect(0.01, 5.0) is None


@pytest.mark.slow
def test_a_run_saved_before_a_config_field_existed_still_resumes(tmp_path):
    from advpipe.models.checkpoint import load_checkpoint, save_checkpoint
    from advpipe.train.config import TrainConfig
    from advpipe.train.loop import train
    from advpipe.train.resume import run_state

    cfg = TrainConfig(limit=128, epochs=2, batch_size=64, device="cpu", out=str(tmp_path / "r"))
    train(TrainConfig(**{**cfg.to_dict(), "epochs": 1, "milestones": tuple(cfg.milestones)}))
    last = tmp_path / "r" / "last.pt"
    ckpt = load_checkpoint(last)
    # an older advpipe wrote neither test_subset nor a newer field at its default (here: seed, default 0)
    ckpt.config = {k: v for k, v in ckpt.config.items() if k not in ("test_subset", "seed", "epochs")}
    ckpt.config["epochs"] = 2
    save_checkpoint(last, ckpt)
    state = run_state(cfg)
    assert state.same_config and state.epochs_done == 1, state.differences
    # a real difference is still one
    assert run_state(TrainConfig(**{**cfg.to_dict(), "lr": 0.05, "milestones": tuple(cfg.milestones)})).differences == ("lr",)
