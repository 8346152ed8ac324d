"""Small replicas of the Tiny-ImageNet and Flowers-102 layouts, written for tests and smoke runs.

Each class gets its own mean colour plus noise, so a model can learn the replica a little; the
files are real JPEGs in the official folder layouts that ``advpipe/data/tinyimagenet.py`` and
``advpipe/data/flowers.py`` read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(path: Path, colour: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """Write one RGB JPEG of ``size`` (h, w): ``colour`` plus uniform noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    pixels = colour[None, None, :] * 0.7 + rng.integers(0, 77, (h, w, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def write_tinyimagenet_replica(root: Path, classes: int = 3, per_class: int = 4, val_per_class: int = 2,
                               size: int = 64, seed: int = 0) -> Path:
    """Write ``root/tiny-imagenet-200`` with ``classes`` wnids; return that folder."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{9000000 + 7 * i:08d}" for i in range(classes)]
    colours = rng.integers(0, 256, (classes, 3))
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # unsorted, as in the real file
    (base / "words.txt").write_text("".join(f"{w}\tclass {i}, other name\n" for i, w in enumerate(wnids)))
    lines = []
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            _jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colours[c], rng, (size, size))
        for i in range(val_per_class):
            name = f"val_{c * val_per_class + i}.JPEG"
            _jpeg(base / "val" / "images" / name, colours[c], rng, (size, size))
            lines.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_flowers_replica(root: Path, classes: int = 3, per_class: int = 5, seed: int = 0) -> Path:
    """Write ``root/flowers-102`` (jpg/, imagelabels.mat, setid.mat) with images of varying sizes; return it."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = Path(root) / "flowers-102"
    colours = rng.integers(0, 256, (classes, 3))
    labels = np.repeat(np.arange(1, classes + 1), per_class)
    for i, label in enumerate(labels, 1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", colours[label - 1], rng, (240 + 8 * (i % 3), 250 + 6 * (i % 5)))
    savemat(base / "imagelabels.mat", {"labels": labels[None, :].astype(np.uint8)})
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "setid.mat", {"trnid": ids[0::3][None, :], "valid": ids[1::3][None, :], "tstid": ids[2::3][None, :]})
    return base
