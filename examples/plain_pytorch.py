"""AdvMask in a plain PyTorch training loop: a DataLoader, your model, masks from a mask store.

The loader yields un-augmented images with their dataset indices (``advpipe.IndexedDataset``). On
the device, each batch is cropped and flipped together with its attack masks (so the masks stay on
the pixels they mark), then AdvMask occludes it on the incremental schedule.

    advpipe precompute-masks --model resnet20 --data embedded        # or examples/precompute_masks.py
    python examples/plain_pytorch.py --masks masks/embedded-train-resnet20-eps8_255.zarr
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import advpipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", required=True, help="mask store (path, .zip or URL) made for these images")
    parser.add_argument("--limit", type=int, default=None, help="the first N training images (as the store)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    # A torchvision-style dataset of (uint8 CHW image, label); here the CIFAR-10 images in the package.
    ds = advpipe.load_dataset("embedded", "train", limit=args.limit)
    train_set = TensorDataset(ds.images, ds.labels)
    loader = DataLoader(advpipe.IndexedDataset(train_set), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))

    masks = advpipe.open_masks(args.masks)
    masks.check_data(train_set)  # the store was made for exactly these images, in this order
    crop = advpipe.RandomCropFlip(pad=4)
    aug = advpipe.AdvMask(l=(2, 15), p=(0.2, 0.4), o=0.1, prob_max=0.8, mean=ds.mean)  # the paper's CIFAR-10 setting

    torch.manual_seed(0)
    model = advpipe.Normalized(advpipe.create_model("resnet20", num_classes=10), ds.mean, ds.std).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=args.epochs * len(loader))
    g = torch.Generator(device=device).manual_seed(0)  # all augmentation randomness, explicit

    for epoch in range(args.epochs):
        aug.set_epoch(epoch, args.epochs)  # the fraction of each batch occluded grows to 80%
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for images, labels, index in loader:
            images = images.to(device).float().div_(255)
            labels = labels.to(device)
            images, attack_masks = crop(images, masks.masks(index, device), generator=g)
            images = aug(images, attack_masks=attack_masks, generator=g)
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += loss.item() * len(labels)
        stats = aug.epoch_metrics()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / total:.3f}, train acc {correct / total:.3f}, "
              f"augmented {stats['fraction_augmented']:.2f} of samples, masked ratio {stats['mean_masked_ratio']:.2f}")


if __name__ == "__main__":
    main()
