"""AdvMask with a timm model, timm's optimizer factory and timm's scheduler factory.

timm's models expect normalized images; ``advpipe.Normalized`` puts the normalization inside, so
AdvMask occludes in [0,1] pixel space with the dataset mean (zero after normalization, as the
paper occludes). timm's own per-sample transforms (``create_transform``) would move pixels under
the masks: keep geometric augmentation on the device, with ``advpipe.RandomCropFlip``.

    python examples/timm_model.py --masks masks/embedded-train-resnet20-eps8_255.zarr --model resnet18
"""

from __future__ import annotations

import argparse

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, TensorDataset

import advpipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", required=True, help="mask store (path, .zip or URL) made for these images")
    parser.add_argument("--model", default="resnet18", help="any timm model name (built without pretrained weights)")
    parser.add_argument("--limit", type=int, default=None, help="the first N training images (as the store)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    ds = advpipe.load_dataset("embedded", "train", limit=args.limit)
    train_set = TensorDataset(ds.images, ds.labels)
    loader = DataLoader(advpipe.IndexedDataset(train_set), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    masks = advpipe.open_masks(args.masks)
    masks.check_data(train_set)

    torch.manual_seed(0)
    net = timm.create_model(args.model, pretrained=False, num_classes=ds.num_classes)
    model = advpipe.Normalized(net, ds.mean, ds.std).to(device)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                                warmup_epochs=min(2, args.epochs - 1), warmup_lr=0.01)

    crop = advpipe.RandomCropFlip(pad=4)
    aug = advpipe.AdvMask(prob_max=0.8, mean=ds.mean)  # l, p, o: the paper's CIFAR-10 defaults
    g = torch.Generator(device=device).manual_seed(0)
    for epoch in range(num_epochs):
        aug.set_epoch(epoch, num_epochs)
        model.train()
        lr, losses = optimizer.param_groups[0]["lr"], []
        for images, labels, index in loader:
            images, attack_masks = crop(images.to(device).float().div_(255), masks.masks(index, device), generator=g)
            images = aug(images, attack_masks=attack_masks, generator=g)
            loss = torch.nn.functional.cross_entropy(model(images), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step(epoch + 1)  # timm schedulers step per epoch, given the next epoch
        stats = aug.epoch_metrics()
        print(f"epoch {epoch + 1}/{num_epochs}: loss {sum(losses) / len(losses):.3f}, "
              f"lr {lr:.4f}, augmented {stats['fraction_augmented']:.2f} of samples")


if __name__ == "__main__":
    main()
