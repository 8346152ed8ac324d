"""A fast ResNet-20 checkpoint for precompute tests (BN statistics from one pass, only the head fitted)."""

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from advpipe.data.datasets import load_dataset
from advpipe.models.checkpoint import Checkpoint, save_checkpoint
from advpipe.models.normalize import Normalized
from advpipe.models.registry import create_model


def fit_checkpoint(path: Path, n: int) -> None:
    """Save a ResNet-20 that classifies most of the first n embedded images (fitted in a few seconds)."""
    ds = load_dataset("embedded", "train", limit=n)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create_model("resnet20", num_classes=10, image_size=32)
    model = Normalized(net, ds.mean, ds.std)
    x = ds.images.float() / 255
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass gives the exact batch statistics
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(x)
        model.eval()
        feats: list[torch.Tensor] = []
        hook = net.fc.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
        model(x)
        hook.remove()
    opt = torch.optim.SGD(net.fc.parameters(), lr=1.0, momentum=0.9)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(net.fc(feats[0]), ds.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_checkpoint(path, Checkpoint(arch="resnet20", num_classes=10, dataset="embedded", fingerprint=ds.fingerprint,
                                     mean=ds.mean, std=ds.std, image_size=32, model_state=state,
                                     metrics={"test_acc": 0.5}))


@contextlib.contextmanager
def in_default_run_folder(root: Path, n: int) -> Iterator[Path]:
    """Work in ``root`` on one CPU thread, with a fitted checkpoint where precompute looks for --model resnet20."""
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(root)
    torch.set_num_threads(1)  # the attack's floats, and so the stores, depend on the thread count
    try:
        ckpt = root / "runs" / "embedded" / "resnet20" / "none" / "best.pt"
        fit_checkpoint(ckpt, n)
        yield ckpt
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
