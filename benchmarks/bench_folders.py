"""Image folders at speed: advpipe's loader against torchvision's ImageFolder + DataLoader, in one run.

Usage: python benchmarks/bench_folders.py [--quick] [--workers 2] [--later-epochs 3] [--batch-size 128]
                                          [--torch-threads 1]

The benchmark writes its own JPEGs into a temporary folder (20,000 at 64x64 in 100 classes and
2,000 at 224x224 in 20; ``--quick``: 5,000 and 500) and measures images/s of the first epoch and of
later epochs for:

- ``advpipe``: ``load_dataset("folder")`` + ``DeviceLoader``; the first epoch includes listing the
  files, the fingerprint and decoding the split into the image cache (a fresh cache folder), later
  epochs take the in-memory path;
- ``advpipe-stream``: the same with the cache off (``ADVPIPE_IMAGE_CACHE_BYTES=0``): batched
  decoding on ``--workers`` threads, every epoch;
- ``torchvision``: ``ImageFolder`` + ``DataLoader(num_workers=--workers, persistent_workers=True)``.

Both sides do the same work per image: decode, resize to the size (a no-op here: the files are
written at it), a training crop and flip, and conversion to float in [0,1]: pad-4 random crop at
64x64, RandomResizedCrop at 224x224. Both run with ``--torch-threads`` intra-op threads in the
main process (default 1, as torch gives each DataLoader worker): on a machine whose cores are
shared, two threads per op wait for each other and make every in-process transform several times
slower. Goal: later epochs at 64x64 at least 4x torchvision's
images/s, and the first epoch no slower. Writes benchmarks/results/bench_folders.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def write_jpegs(root: Path, n: int, size: int, classes: int, seed: int = 0) -> None:
    """Write ``n`` smooth random JPEGs of ``size`` x ``size`` into ``root/train/<class>/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = torch.rand(64, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    bases = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    bases = (bases.clamp(0, 1) * 200).permute(0, 2, 3, 1).numpy()
    for c in range(classes):
        (root / "train" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.normal(0, 12, (size, size, 3))
        pixels = np.clip(bases[i % 64] + 20 + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"c{i % classes:03d}" / f"{i:06d}.jpg", quality=90)


def _epochs(make_iter, epochs: int) -> list[dict]:
    """Time ``epochs`` passes of ``make_iter(epoch)`` (each yielding batch sizes); images/s per epoch."""
    out = []
    for epoch in range(epochs):
        start = time.perf_counter()
        images = sum(make_iter(epoch))
        seconds = time.perf_counter() - start
        out.append({"epoch": epoch, "images": images, "seconds": round(seconds, 3),
                    "images_per_s": round(images / seconds, 1)})
    return out


def run_advpipe(root: Path, size: int, crop: str, args: argparse.Namespace, epochs: int, cache: bool) -> dict:
    """advpipe's folder dataset and device loader; the first epoch includes loading and caching."""
    from advpipe.data.datasets import load_dataset
    from advpipe.data.loader import DeviceLoader

    os.environ["ADVPIPE_IMAGE_CACHE_BYTES"] = str(8 << 30) if cache else "0"
    os.environ["ADVPIPE_CACHE_DIR"] = str(root / f"cache-{size}-{int(cache)}")  # fresh: nothing decoded yet
    state: dict = {}

    def batches(epoch: int):
        if epoch == 0:  # listing, fingerprint and (cached mode) the one-time decode count as the first epoch
            ds = load_dataset("folder", "train", data_dir=root, image_size=size)
            state["loader"] = DeviceLoader(ds, batch_size=args.batch_size, workers=args.workers, crop=crop, seed=0)
        loader = state["loader"]
        loader.set_epoch(epoch)
        for batch in loader:
            yield len(batch)

    result = _epochs(batches, epochs)
    return {"epochs": result, "in_memory": state["loader"].images is not None}


def run_torchvision(root: Path, size: int, crop: str, args: argparse.Namespace, epochs: int) -> dict:
    """torchvision's ImageFolder + DataLoader with the same resize, crop, flip and float conversion."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    if crop == "pad":
        tf = [transforms.Resize((size, size)), transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize((size, size)), transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    state: dict = {}

    def batches(epoch: int):
        if epoch == 0:  # listing the folder and starting the workers count as the first epoch
            ds = datasets.ImageFolder(str(root / "train"), transform=transforms.Compose([*tf, transforms.ToTensor()]))
            state["loader"] = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))
        for images, _ in state["loader"]:
            yield len(images)

    result = _epochs(batches, epochs)
    del state["loader"]
    return {"epochs": result}


def _summary(rows: dict) -> dict:
    first = {k: v["epochs"][0]["images_per_s"] for k, v in rows.items()}
    later = {k: round(float(np.mean([e["images_per_s"] for e in v["epochs"][1:]])), 1)
             for k, v in rows.items() if len(v["epochs"]) > 1}
    tv_first, tv_later = first["torchvision"], later.get("torchvision")
    return {"first_epoch_images_per_s": first, "later_epochs_images_per_s": later,
            "first_epoch_vs_torchvision": round(first["advpipe"] / tv_first, 2),
            "later_epochs_vs_torchvision": round(later["advpipe"] / tv_later, 2) if tv_later else None}


def main() -> None:
    """Run the benchmark and write benchmarks/results/bench_folders.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 + 500 images and 2 later epochs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers / advpipe decode threads")
    parser.add_argument("--later-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the main process")
    parser.add_argument("--keep", type=Path, default=None, help="write the images here and keep them")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    later = 2 if args.quick else args.later_epochs
    settings = [("64px", 64, 5000 if args.quick else 20000, 100, "pad"),
                ("224px", 224, 500 if args.quick else 2000, 20, "random-resized")]
    base = args.keep or Path(tempfile.mkdtemp(prefix="advpipe-bench-folders-"))
    results: dict = {"workers": args.workers, "batch_size": args.batch_size, "quick": args.quick,
                     "torch_threads": torch.get_num_threads(), "uptime_before": _uptime(), "settings": {}}
    try:
        for name, size, n, classes, crop in settings:
            root = base / name
            if not (root / "train").is_dir():
                start = time.perf_counter()
                write_jpegs(root, n, size, classes)
                print(f"{name}: wrote {n} JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
            rows = {"torchvision": run_torchvision(root, size, crop, args, 1 + later),
                    "advpipe-stream": run_advpipe(root, size, crop, args, 2, cache=False),
                    "advpipe": run_advpipe(root, size, crop, args, 1 + later, cache=True)}
            summary = _summary(rows)
            results["settings"][name] = {"images": n, "size": size, "classes": classes, "crop": crop, **rows, **summary}
            print(f"{name}: first epoch {summary['first_epoch_images_per_s']}, later "
                  f"{summary['later_epochs_images_per_s']} images/s; advpipe/torchvision first "
                  f"{summary['first_epoch_vs_torchvision']}x, later {summary['later_epochs_vs_torchvision']}x", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    results["uptime_after"] = _uptime()
    print(f"wrote {write_result('bench_folders', results)}")


def _uptime() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


if __name__ == "__main__":
    main()
