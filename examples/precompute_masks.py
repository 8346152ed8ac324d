"""Precompute AdvMask attack masks from Python, for your own model and your own dataset.

Your model is any ``nn.Module`` that maps (B,C,H,W) images in [0,1] to logits (put the
normalization inside it); your dataset is any map-style dataset of ``(image, label)`` (or a pair of
tensors). The store is the one ``advpipe precompute-masks`` writes: chunked, resumable (run the
script again after an interruption), with provenance, and readable by ``advpipe masks info``.

    python examples/precompute_masks.py --out masks/mine.zarr            # 2,000 images, 200 steps
    python examples/precompute_masks.py --limit 64 --steps 5 --out /tmp/m.zarr   # a quick look
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

import advpipe


class SmallNet(nn.Module):
    """Your own classifier: [0,1] images in, logits out (normalization inside)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="masks/smallnet-embedded.zarr", help="the mask store to write")
    parser.add_argument("--limit", type=int, default=None, help="the first N training images only")
    parser.add_argument("--train-steps", type=int, default=300, help="SGD steps to fit the victim first")
    parser.add_argument("--steps", type=int, default=200, help="sparse-attack steps per image")
    parser.add_argument("--init-extra-steps", type=int, default=90, help="more PGD steps for L_init if needed")
    parser.add_argument("--workers", type=int, default=0, help="0: this process; K: a local dask cluster")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    # Your dataset: here the CIFAR-10 images that ship with advpipe, as a plain TensorDataset (uint8).
    ds = advpipe.load_dataset("embedded", "train", limit=args.limit)
    dataset = TensorDataset(ds.images, ds.labels)

    # Your model, fitted briefly so the attack has something to fool.
    torch.manual_seed(0)
    model = SmallNet(ds.mean, ds.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True)
    step = 0
    while step < args.train_steps:
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images.float() / 255), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == args.train_steps:
                break

    # The attack of the AdvMask paper; docs/attack.md recommends the adaptive rule for precompute.
    attack = advpipe.SparseAttackConfig(steps=args.steps, lambda_rule="adaptive", alpha_schedule="linear",
                                        init_steps=min(10, args.steps), init_extra_steps=args.init_extra_steps)
    result = advpipe.precompute_masks(model, dataset, args.out, attack=attack, name="embedded",
                                      workers=args.workers, device=args.device)
    s = result.summary
    print(f"{result.path}: {s['n']} masks, {result.chunks_run} chunks run, {result.chunks_already_done} already done")
    median = "-" if s["l0_pixels_median"] is None else f"{s['l0_pixels_median']:.0f}"
    print(f"clean accuracy {result.provenance['model']['clean_accuracy']:.3f}, attack success rate {s['asr']:.3f}, "
          f"median {median} pixels perturbed")


if __name__ == "__main__":
    main()
