"""The CUDA paths: each test takes a device, runs on the CPU in the normal suite and on a GPU with ``-m cuda``.

The ``cuda`` cases are skipped without a GPU; benchmarks/gpu/run_kit.py runs them on a lent one
(docs/gpu.md). The CPU cases keep the same bodies exercised everywhere, at small sizes. The CPU twin
of the one-GPU dask precompute is tests/test_precompute.py::test_dask_worker_gives_identical_store.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from helpers.checkpoints import fit_checkpoint
from helpers.stores import assert_same_store
from test_augment import blob_masks, mixed_masks
from test_streaming import write_store
from advpipe.augment import greedy_numba
from advpipe.augment.advmask import sample_squares
from advpipe.cli import app
from advpipe.data.datasets import load_dataset
from advpipe.data.loader import DeviceLoader
from advpipe.precision import autocast_context
from advpipe.models.build import build_model
from advpipe.pipeline.streaming import ResidentMasks, attack_mask_source
from advpipe.train import loop
from advpipe.train.config import TrainConfig
from advpipe.train.distributed import DistInfo
from advpipe.train.methods import MethodContext, build_method

HAS_CUDA = torch.cuda.is_available()
TINY_CNN = "test-tiny-cnn"  # registered by conftest.py
ON_GPU = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def on_gpu(*values: object) -> pytest.param:
    """A parameter set for the GPU case: marked ``cuda`` and skipped without a GPU."""
    return pytest.param(*values, marks=ON_GPU, id="cuda")


# ------------------------------------------------------------------------------ AdvMask kernel


class ReplayDraws:
    """Records every ``torch.rand``/``torch.randint`` result of one call, then feeds the same numbers to another.

    The kernel draws all its randomness with those two before its scan, so a run on the GPU and a
    run on the CPU fed its recorded draws must give the same squares, bit for bit.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.draws, self.replaying = [], False
        self.real = {name: getattr(torch, name) for name in ("rand", "randint")}
        for name in self.real:
            monkeypatch.setattr(torch, name, self._wrap(name))

    def _wrap(self, name: str):
        def draw(*args, **kwargs):
            if not self.replaying:
                out = self.real[name](*args, **kwargs)
                self.draws.append((name, out.detach().cpu().clone()))
                return out
            recorded_name, value = self.draws.pop(0)
            assert recorded_name == name, f"draw order differs: {name} instead of {recorded_name}"
            device = kwargs.get("device") or "cpu"
            return value.to(device)

        return draw

    def replay(self) -> None:
        """From now on, return the recorded draws in order instead of drawing."""
        self.replaying = True


@pytest.mark.parametrize("device,n", [("cpu", 64), on_gpu("cuda", 1024)])
@pytest.mark.parametrize("fallback", ["random", "gridmask"])
def test_torch_kernel_equals_the_cpu_scan_on_the_same_draws(device, n, fallback, monkeypatch):
    """The torch backend (the CUDA default) on ``device`` and the compiled CPU scan accept the same squares."""
    masks = torch.cat([mixed_masks(), blob_masks(n - 8, seed=31)])
    settings = dict(l_range=(2, 15), p_range=(0.2, 0.4), o_max=0.1, fallback=fallback)
    draws = ReplayDraws(monkeypatch)
    gen = torch.Generator(device=device).manual_seed(3)
    ours = sample_squares(masks.to(device), generator=gen, backend="torch", **settings)
    assert ours.keep.device.type == device
    draws.replay()
    # the compiled scan where numba imports (the CPU default), else the same rounds on the CPU
    cpu = sample_squares(masks, generator=torch.Generator(), backend="numba" if greedy_numba.AVAILABLE else "torch",
                         **settings)
    assert not draws.draws, "the CPU scan drew fewer numbers than the torch rounds"
    for field in ("keep", "squares", "valid", "fallback_used", "p", "o"):
        assert torch.equal(getattr(ours, field).cpu(), getattr(cpu, field)), field
    assert ours.fallback_used[:2].all() and ours.valid.any(1).float().mean() > 0.8  # the batch is not degenerate


# ------------------------------------------------------------------------------ mixed-precision training step


def _train_step(model: torch.nn.Module, batch, precision: str, device: torch.device):
    """One step as the training loop takes it (autocast, GradScaler); returns (loss, unscaled grads, new params)."""
    method = build_method("standard", MethodContext(10, 1, (32, 32)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    for _ in range(8):  # a step the scaler skips (inf/nan at its scale) is retried at half the scale, as the loop does
        with autocast_context(device, precision):
            out = method.step(model, batch, torch.Generator(device=device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(opt)
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if bool(torch.isfinite(grads).all()):
            break
        assert scaler.get_scale() < scale  # the scaler saw the overflow and skipped the step
    params = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    return out["loss"].detach().float(), grads, params


@pytest.mark.parametrize("device,precision,rel", [("cpu", "bf16", 0.15), on_gpu("cuda", "fp16", 0.05)])
def test_autocast_channels_last_step_matches_fp32(device, precision, rel, monkeypatch):
    """``--precision auto`` on CUDA (fp16 autocast, channels_last model) takes the step fp32 takes.

    ``rel`` bounds the relative error of the gradient and of the update, about twice what the CPU
    measured (fp16 2.6%, bf16 7.7% on this ResNet-20 batch); the loss agrees to a tenth of that.
    """
    device = torch.device(device)
    if device.type == "cuda":  # a true fp32 reference, not TF32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ds = load_dataset("embedded", "train", limit=64)
    batch = next(iter(DeviceLoader(ds, batch_size=64, device=device, train=True, seed=0)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("resnet20", ds).to(device).train()
    start = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    mixed = copy.deepcopy(model).to(memory_format=torch.channels_last)
    conv = next(m for m in mixed.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    loss32, grad32, params32 = _train_step(model, batch, "fp32", device)
    loss, grad, params = _train_step(mixed, batch, precision, device)
    assert torch.isfinite(loss) and abs(float(loss - loss32)) <= rel / 10 * float(loss32)
    assert float((grad - grad32).norm() / grad32.norm()) <= rel
    step32, step = params32 - start, params - start  # the update itself, not the (nearly identical) weights
    assert step32.norm() > 0 and float((step - step32).norm() / step32.norm()) <= rel


# ------------------------------------------------------------------------------ resident masks


@pytest.mark.parametrize("device", ["cpu", on_gpu("cuda")])
def test_packed_masks_stay_resident_on_the_device(device, tmp_path, monkeypatch):
    """A CIFAR-sized store is read once into device memory, bit-packed; batches unpack there, with no store reads."""
    device = torch.device(device)
    ds = load_dataset("embedded", "train", limit=300)
    path = write_store(tmp_path / "m.zarr", ds)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    source = attack_mask_source(str(path), ds, device)
    assert isinstance(source, ResidentMasks)
    assert source.packed.device.type == device.type and source.packed.dtype == torch.uint8
    assert source.packed.shape == (300, 32 * 32 // 8)  # packed bits, not one byte per pixel
    if device.type == "cuda":
        assert torch.cuda.memory_allocated(device) - allocated >= source.packed.numel()
    from advpipe.pipeline.reader import MaskStore

    def no_reads(*args, **kwargs):
        raise AssertionError("the store was read again after loading")

    for name in ("read_masks", "read_all_packed"):
        monkeypatch.setattr(MaskStore, name, no_reads)
    pointer = source.packed.data_ptr()
    loader = DeviceLoader(ds, batch_size=100, device=device, seed=4, side={"attack_mask": source})
    seen = 0
    for batch in loader:
        mask = batch.side["attack_mask"]
        assert mask.device.type == device.type and mask.dtype == torch.bool
        assert torch.equal(mask, (batch.images[:, 0] * 255).round() > 200)  # the store's masks, cropped alike
        seen += len(batch)
    assert seen == 300 and source.packed.data_ptr() == pointer


# ------------------------------------------------------------------------------ dask precompute on one GPU


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_one_gpu_dask_precompute_equals_in_process(tmp_path, monkeypatch):
    """``--workers 1`` on CUDA (a dask worker pinned to the GPU) writes the store ``--workers 0`` writes."""
    monkeypatch.chdir(tmp_path)
    fit_checkpoint(tmp_path / "runs" / "embedded" / "resnet20" / "none" / "best.pt", 32)
    args = ["precompute-masks", "--model", "resnet20", "--data", "embedded", "--limit", "32", "--chunk-size", "8",
            "--batch-size", "8", "--steps", "3", "--attack-opt", "init_steps=2", "--device", "cuda"]
    runner = CliRunner()
    stores = {}
    for name, workers in (("in-process", "0"), ("again", "0"), ("dask", "1")):
        stores[name] = tmp_path / f"{name}.zarr"
        result = runner.invoke(app, [*args, "--workers", workers, "--out", str(stores[name])])
        assert result.exit_code == 0, result.output
    # first the attack itself: two in-process runs on this GPU must agree, or the comparison says nothing
    assert_same_store(stores["again"], stores["in-process"])
    assert_same_store(stores["dask"], stores["in-process"])


# ------------------------------------------------------------------------------ DDP


@dataclasses.dataclass(frozen=True)
class _OneRankJob(DistInfo):
    """A one-process job that still takes the multi-process path (DDP, all-reduce, barriers)."""

    @property
    def enabled(self) -> bool:
        return True


@pytest.mark.parametrize("device", ["cpu", on_gpu("cuda")])
def test_ddp_one_process_trains_like_a_plain_run(device, tmp_path, monkeypatch):
    """The loop's DDP path on one process (NCCL on CUDA, gloo on the CPU) trains the model a plain run trains."""
    backend = "nccl" if device == "cuda" else "gloo"
    cfg = TrainConfig(data="embedded", limit=128, model=TINY_CNN, epochs=1, batch_size=32, lr=0.05, device=device,
                      seed=1, workers=0, out=str(tmp_path / "plain"))
    plain = loop.train(cfg).model
    seen: dict[str, object] = {"backends": set(), "ddp": 0}

    def join(dev: torch.device):
        dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        if dev.type == "cuda":
            dev = torch.device("cuda", 0)
            torch.cuda.set_device(dev)
        return _OneRankJob(), dev

    real_reduce, real_ddp = loop.all_reduce_sum, loop.DistributedDataParallel

    def reduce(tensor, info):
        seen["backends"].add(dist.get_backend())
        return real_reduce(tensor, info)

    def ddp(*args, **kwargs):
        seen["ddp"] += 1
        return real_ddp(*args, **kwargs)

    monkeypatch.setattr(loop, "init_distributed", join)
    monkeypatch.setattr(loop, "all_reduce_sum", reduce)
    monkeypatch.setattr(loop, "DistributedDataParallel", ddp)
    try:
        result = loop.train(dataclasses.replace(cfg, out=str(tmp_path / "ddp")))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == {"backends": {backend}, "ddp": 1}
    assert (Path(tmp_path / "ddp") / "last.pt").is_file()
    for (name, a), b in zip(plain.state_dict().items(), result.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
