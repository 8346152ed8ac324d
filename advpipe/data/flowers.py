"""Oxford Flowers-102 read from the official files: the official split and a seeded random one.

``--data-dir`` holds ``flowers-102/`` (torchvision's folder name) or is that folder itself::

    jpg/image_00001.jpg ...   the 8,189 images (from 102flowers.tgz)
    imagelabels.mat           'labels': the class (1..102) of image i at position i-1
    setid.mat                 'trnid', 'valid', 'tstid': the official 1-based image ids per split

Two datasets:

- ``flowers102``: the official split. ``train`` is ``trnid`` plus ``valid`` (2,040 images, 20 per
  class); ``test`` is ``tstid`` (6,149). Hold a validation split out of train with ``--val-size``.
- ``flowers102-random`` (``flowers102-random:SEED``, default seed 0): the AdvMask paper's protocol
  (Sec. IV-D: "we randomly divide the dataset"; it gives no ratios): a class-stratified random
  split of all images, 80% train and 20% test, drawn from SEED. ``setid.mat`` is not needed.

Class indices are the labels minus one; files are in image-id order. Images are read at
``--image-size`` (default 224) by the center-crop policy (shorter side to the size, central square).
The ``.mat`` files are read with ``scipy.io.loadmat`` (no code runs; MATLAB v7.3 files are refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from advpipe.data.datasets import DATASETS, DatasetSplit, file_split
from advpipe.errors import AdvpipeError

FOLDER = "flowers-102"
#: the share of each class the random split puts in train
RANDOM_TRAIN_FRACTION = 0.8


def find_root(root: Path, need_setid: bool = True) -> Path:
    """The folder holding ``jpg/`` and ``imagelabels.mat`` (and ``setid.mat``); else a one-line error."""
    wanted = ("imagelabels.mat", "setid.mat") if need_setid else ("imagelabels.mat",)
    for cand in (root / FOLDER, root):
        if (cand / "jpg").is_dir() and all((cand / name).is_file() for name in wanted):
            return cand
    raise AdvpipeError(
        f"no Flowers-102 under {str(root)!r}: expected {FOLDER}/ (or its contents) with jpg/image_00001.jpg ..., "
        f"{' and '.join(wanted)} (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/); set data_dir",
        fields=("data_dir",))


def read_mat_vector(path: Path, key: str) -> np.ndarray:
    """The 1-D int64 vector ``key`` of a MATLAB file; unreadable files or keys raise AdvpipeError."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        data = loadmat(str(path), variable_names=[key])
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError) as exc:  # v7.3: NotImplementedError
        raise AdvpipeError(f"cannot read {path}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}") from exc
    if key not in data:
        raise AdvpipeError(f"{path} has no variable {key!r}")
    value = np.asarray(data[key])
    if value.dtype.kind not in "iuf" or value.size == 0 or (value.dtype.kind == "f" and not np.all(value == np.round(value))):
        raise AdvpipeError(f"{path}: {key!r} must be a non-empty vector of whole numbers, got {value.dtype} {value.shape}")
    return value.reshape(-1).astype(np.int64)


def read_labels(folder: Path) -> np.ndarray:
    """The 1-based class of every image (position i-1 for image i), checked against ``jpg/``."""
    labels = read_mat_vector(folder / "imagelabels.mat", "labels")
    if labels.min() < 1:
        raise AdvpipeError(f"{folder / 'imagelabels.mat'}: labels start at 1, got {labels.min()}")
    return labels


def image_path(folder: Path, image_id: int) -> Path:
    """The file of 1-based image ``image_id``: ``jpg/image_00001.jpg``."""
    return folder / "jpg" / f"image_{image_id:05d}.jpg"


def official_ids(folder: Path, split: str, n_images: int) -> np.ndarray:
    """The sorted 1-based image ids of the official split (train = trnid + valid, test = tstid)."""
    keys = ("trnid", "valid") if split == "train" else ("tstid",)
    ids = np.concatenate([read_mat_vector(folder / "setid.mat", k) for k in keys])
    if ids.min() < 1 or ids.max() > n_images or len(np.unique(ids)) != len(ids):
        raise AdvpipeError(f"{folder / 'setid.mat'}: {'+'.join(keys)} must be distinct ids in 1..{n_images}")
    return np.sort(ids)


def random_ids(labels: np.ndarray, split: str, seed: int) -> np.ndarray:
    """The sorted 1-based image ids of the seeded, class-stratified 80/20 split (train or test)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in np.unique(labels):  # every class in label order, so one seed gives one split
        members = np.flatnonzero(labels == cls) + 1
        perm = members[torch.randperm(len(members), generator=gen).numpy()]
        n_train = int(round(RANDOM_TRAIN_FRACTION * len(members)))
        chosen.append(perm[:n_train] if split == "train" else perm[n_train:])
    return np.sort(np.concatenate(chosen))


def _split(name: str, split: str, folder: Path, labels: np.ndarray, ids: np.ndarray,
           image_size: int | None) -> DatasetSplit:
    files = [image_path(folder, int(i)) for i in ids]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise AdvpipeError(f"{len(missing)} Flowers-102 image(s) are missing, e.g. {missing[0]}")
    classes = [str(c) for c in range(1, int(labels.max()) + 1)]
    return file_split(name, split, files, (labels[ids - 1] - 1).tolist(), classes, image_size or 224, "center-crop")


def _no_download(download: bool) -> None:
    if download:
        raise AdvpipeError("flowers102 cannot be downloaded by advpipe; unpack 102flowers.tgz, imagelabels.mat and "
                           "setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into the data folder",
                           fields=("download",))


@DATASETS.register("flowers102")
def _flowers102(*, split: str, root: Path, image_size: int | None, download: bool) -> DatasetSplit:
    """Flowers-102, official split (setid.mat): train = trnid + valid, test = tstid."""
    _no_download(download)
    folder = find_root(root)
    labels = read_labels(folder)
    return _split("flowers102", split, folder, labels, official_ids(folder, split, len(labels)), image_size)


@DATASETS.register("flowers102-random")
def _flowers102_random(*, split: str, root: Path, image_size: int | None, download: bool,
                       option: str | None = None) -> DatasetSplit:
    """Flowers-102, class-stratified random 80/20 split drawn from the seed in ``option`` (default 0)."""
    _no_download(download)
    try:
        seed = int(option) if option is not None else 0
    except ValueError:
        seed = -1
    if seed < 0:
        raise AdvpipeError(f"flowers102-random:SEED takes a whole number >= 0 as the split seed, got {option!r}",
                           fields=("data",))
    folder = find_root(root, need_setid=False)
    labels = read_labels(folder)
    return _split("flowers102-random", split, folder, labels, random_ids(labels, split, seed), image_size)
