"""AdvMask in a PyTorch Lightning module (``pip install 'advpipe[lightning]'``).

The augmentation lives on the module: ``on_train_epoch_start`` advances its schedule from the
trainer's epoch, ``training_step`` crops, flips and occludes the batch on the module's device
with a generator of its own, and the epoch's statistics go to ``self.log``.

    python examples/lightning_module.py --masks masks/embedded-train-resnet20-eps8_255.zarr
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import advpipe


class AdvMaskClassifier(L.LightningModule):
    """A classifier trained with AdvMask; ``masks`` is an opened store for the training set."""

    def __init__(self, masks: advpipe.AttackMasks, mean: tuple[float, ...], std: tuple[float, ...],
                 lr: float = 0.1) -> None:
        super().__init__()
        self.model = advpipe.Normalized(advpipe.create_model("resnet20", num_classes=10), mean, std)
        self.masks, self.lr = masks, lr
        self.crop = advpipe.RandomCropFlip(pad=4)
        self.aug = advpipe.AdvMask(prob_max=0.8, mean=mean)
        self.generator: torch.Generator | None = None

    def on_fit_start(self) -> None:
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def on_train_epoch_start(self) -> None:
        self.aug.set_epoch(self.current_epoch, self.trainer.max_epochs)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels, index = batch
        images, attack_masks = self.crop(images.float().div_(255), self.masks.masks(index, self.device),
                                         generator=self.generator)
        images = self.aug(images, attack_masks=attack_masks, generator=self.generator)
        loss = torch.nn.functional.cross_entropy(self.model(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        stats = self.aug.epoch_metrics()
        self.log_dict({f"advmask/{k}": v for k, v in stats.items()})
        print(f"epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: "
              f"augmented {stats['fraction_augmented']:.2f} of samples, masked ratio {stats['mean_masked_ratio']:.2f}")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return [opt], [sched]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", required=True, help="mask store (path, .zip or URL) made for these images")
    parser.add_argument("--limit", type=int, default=None, help="the first N training images (as the store)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    ds = advpipe.load_dataset("embedded", "train", limit=args.limit)
    train_set = TensorDataset(ds.images, ds.labels)
    masks = advpipe.open_masks(args.masks)
    masks.check_data(train_set)
    loader = DataLoader(advpipe.IndexedDataset(train_set), batch_size=args.batch_size, shuffle=True)

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(AdvMaskClassifier(masks, ds.mean, ds.std), loader)


if __name__ == "__main__":
    main()
