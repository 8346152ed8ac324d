"""Datasets: CIFAR-10/100 (pickle or npz folders), image folders, the embedded mini set, synthetic.

Every split has a stable index order (file order for CIFAR, sorted paths for folders) and a
fingerprint over its content; ``--limit N`` keeps the first N samples and so gets its own
fingerprint. CIFAR-sized splits live in memory as a uint8 (N,C,H,W) tensor; image-file splits
(``folder`` here, ``tinyimagenet`` and ``flowers102`` in their own modules) list their files and
are decoded once into the image cache when they fit (:meth:`DatasetSplit.decoded_images`), else
streamed. ``NAME:OPTION`` passes an option to the datasets that take one (``flowers102-random:SEED``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pickle
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from advpipe.data.decode import MAX_IMAGE_PIXELS, RESIZE_POLICIES, decode_files, read_image  # noqa: F401 (re-exported)
from advpipe.data.fingerprint import cached_fingerprint, file_stat_key, fingerprint_arrays
from advpipe.errors import AdvpipeError
from advpipe.registry import Registry
from advpipe.files import atomic_write_bytes
from advpipe.paths import cache_dir

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EMBEDDED_FILE = Path(__file__).parent / "embedded" / "cifar10_mini.npz"
SPLITS = ("train", "test")
#: datasets that are subsets of another one (same classes, same images): a model of the parent fits them
SUBSET_OF = {"embedded": "cifar10"}


#: the fingerprint of the full split each embedded split is the first rows of (the shared offline
#: CIFAR-10 copy, whose first 2,000 train and 1,000 test rows the package embeds; checked in a test)
PREFIX_OF = {("embedded", "train"): "sha256:74edcbe6d698c8f845dd4dffcf587317c581e5dd4f569f057d0ec683b6a0244a",
             ("embedded", "test"): "sha256:1b6d5f0e657eeece0023d3b21944f4a8c526d41527793519ef8498edca5983ba"}


def drawn_from(ds: "DatasetSplit", fingerprint: str) -> bool:
    """Whether ``ds`` is the split with ``fingerprint`` or a documented prefix of it (the embedded subset)."""
    return fingerprint in (ds.fingerprint, PREFIX_OF.get((ds.name, ds.split)))


def dataset_family(name: str) -> str:
    """The dataset ``name`` is drawn from (``embedded`` is a CIFAR-10 prefix); itself for the others."""
    return SUBSET_OF.get(name, name)


@dataclass
class DatasetSplit:
    """One split of a dataset: labels, class names, normalization and (in memory or lazy) images."""

    name: str
    split: str
    labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]
    images: torch.Tensor | None = None  # uint8 (N,C,H,W) when in memory
    files: list[Path] | None = None  # image paths when read lazily
    fingerprint_fn: Callable[[], str] | None = field(default=None, repr=False)
    resize: str = "squash"  # how files reach image_shape: squash or center-crop (advpipe/data/decode.py)
    decoded: torch.Tensor | None = field(default=None, repr=False, compare=False)  # the image cache, once loaded

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        """Whether the whole split is held as one uint8 tensor."""
        return self.images is not None

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of this split (computed once, cached on disk where possible)."""
        if self.fingerprint_fn is not None:
            return self.fingerprint_fn()
        assert self.images is not None
        return fingerprint_arrays(self.images.permute(0, 2, 3, 1).numpy(), self.labels.numpy())

    def load_images(self, index: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Return contiguous uint8 (B,C,H,W) images for the given dataset indices (file splits: only those files are read)."""
        held = self.images if self.images is not None else self.decoded
        if held is not None:
            return held[torch.as_tensor(index, dtype=torch.long)].contiguous()
        files = [self.files[int(i)] for i in index]  # type: ignore[index]
        return decode_files(files, self.image_shape[-1], self.resize).contiguous()

    def decoded_images(self, threads: int = 1) -> torch.Tensor | None:
        """All images as one channels_last uint8 (N,C,H,W) tensor, or None for a file split over the cache bound.

        A file split is decoded once (on ``threads`` threads) into the image cache keyed by its
        fingerprint, size and resize policy (:mod:`advpipe.data.cache`), then kept here.
        """
        if self.images is not None:
            if self.decoded is None:  # one channels_last copy, shared by every loader of this split
                self.decoded = self.images.contiguous(memory_format=torch.channels_last)
            return self.decoded
        if self.decoded is None and self.files is not None:
            from advpipe.data.cache import decoded_split, fits

            if fits(len(self.files), self.image_shape[-1]):
                self.decoded = decoded_split(self.files, self.image_shape[-1], self.resize, self.fingerprint,
                                             threads=threads)
        return self.decoded

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["decoded"] = None  # a process that unpickles a split reads its own cache, not a copy sent along
        return state


DatasetLoader = Callable[..., DatasetSplit]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def default_data_dir() -> Path:
    """Return ``$ADVPIPE_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get("ADVPIPE_DATA_DIR") or "data")


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    download: bool = False,
) -> DatasetSplit:
    """Load a split of a registered dataset, optionally keeping only the first ``limit`` samples.

    ``name`` may be ``NAME:OPTION`` for a dataset that takes an option (e.g. ``flowers102-random:7``,
    the split seed); the split keeps the whole name.
    """
    base, colon, option = name.partition(":")
    loader = DATASETS.get(base)
    takes_option = "option" in inspect.signature(loader).parameters
    if colon and not takes_option:
        raise AdvpipeError(f"dataset {base!r} takes no option (got {name!r})", fields=("data",))
    if split not in SPLITS:
        raise AdvpipeError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if limit is not None and limit <= 0:
        raise AdvpipeError(f"limit must be a positive number of samples, got {limit}", fields=("limit",))
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if image_size is not None and image_size < 1:
        raise AdvpipeError(f"image_size must be a positive number, got {image_size}", fields=("image_size",))
    extra = {"option": option or None} if takes_option else {}
    ds = loader(split=split, root=root, image_size=image_size, download=download, **extra)
    ds.name = name
    return apply_limit(ds, limit) if limit is not None and limit < len(ds) else ds


def apply_limit(ds: DatasetSplit, limit: int) -> DatasetSplit:
    """Keep the first ``limit`` samples; the fingerprint is recomputed over exactly those."""
    parent_fp = ds.fingerprint_fn
    images = ds.images[:limit].clone() if ds.images is not None else None
    files = ds.files[:limit] if ds.files is not None else None
    out = DatasetSplit(ds.name, ds.split, ds.labels[:limit].clone(), ds.class_names, ds.mean, ds.std,
                       ds.image_shape, images=images, files=files, resize=ds.resize)
    if files is not None and parent_fp is not None:
        # a partial, not a lambda: lazy splits travel to spawned processes by pickle
        out.fingerprint_fn = functools.partial(folder_fingerprint, files, out.labels, ds.image_shape, ds.resize)
        if ds.decoded is not None:
            out.decoded = ds.decoded[:limit]
    return out


# --------------------------------------------------------------------------- CIFAR


def _from_arrays(name: str, split: str, images_nhwc: np.ndarray, labels: np.ndarray, classes: list[str],
                 mean: tuple, std: tuple, fp_key: dict | None) -> DatasetSplit:
    images = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    ds = DatasetSplit(name, split, labels_t, classes, mean, std, tuple(images.shape[1:]), images=images)  # type: ignore[arg-type]
    if fp_key is not None:
        compute = lambda: fingerprint_arrays(images_nhwc, labels)  # noqa: E731
        ds.fingerprint_fn = lambda: cached_fingerprint(fp_key, compute)
    return ds


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read an npz split (decoded once into the cache as .npy, since LZMA members are slow)."""
    key = file_stat_key(path)
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:32]
    cached = cache_dir() / "npz" / digest
    try:
        if (cached / "labels.npy").is_file():
            images = np.load(cached / "images.npy", mmap_mode="r")
            labels = np.load(cached / "labels.npy")
            names = (cached / "classes.txt").read_text().split("\n") if (cached / "classes.txt").is_file() else None
            return np.asarray(images), labels, names
    except (OSError, ValueError):
        pass  # a broken cache entry is rebuilt below
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data or "labels" not in data:
                raise AdvpipeError(f"{path} must hold arrays 'images' (uint8 NHWC) and 'labels'; found {sorted(data.files)}")
            images, labels = data["images"], data["labels"]
            names = [str(n) for n in data["class_names"]] if "class_names" in data else None
    except (OSError, ValueError) as exc:
        raise AdvpipeError(f"cannot read {path}: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise AdvpipeError(f"{path}: 'images' must be uint8 NHWC with 1 or 3 channels, got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise AdvpipeError(f"{path}: 'labels' must have shape ({images.shape[0]},), got {labels.shape}")
    try:
        import io

        for fname, arr in (("images.npy", images), ("labels.npy", labels.astype(np.int64))):
            buf = io.BytesIO()
            np.save(buf, arr)
            atomic_write_bytes(cached / fname, buf.getvalue())
        if names:
            atomic_write_bytes(cached / "classes.txt", "\n".join(names).encode())
    except OSError:
        pass
    return images, labels.astype(np.int64), names


def _unpickle(path: Path) -> dict:
    # The CIFAR python batches are pickles by design; they are only read from the user's own data
    # folder (never from a store or checkpoint of another team).
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def _find_cifar(root: Path, variant: str) -> tuple[str, Path]:
    """Locate a CIFAR folder under ``root``: the pickle batches or train.npz/test.npz."""
    pickle_dir = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    marker = "data_batch_1" if variant == "cifar10" else "train"
    for cand in (root / pickle_dir, root):
        if (cand / marker).is_file() and not (cand / "train.npz").is_file():
            return "pickle", cand
    for cand in (root / variant, root):
        if (cand / "train.npz").is_file() and (cand / "test.npz").is_file():
            return "npz", cand
    raise AdvpipeError(
        f"no {variant} data under {str(root)!r}: expected {pickle_dir}/ (the python version from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html) or train.npz/test.npz with 'images' and 'labels'; "
        f"set data_dir or ADVPIPE_DATA_DIR, or pass download", fields=("data_dir", "download"))


def _load_cifar(variant: str, split: str, root: Path, download: bool) -> DatasetSplit:
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=(split == "train"), download=True)
    kind, folder = _find_cifar(root, variant)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if variant == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    if kind == "npz":
        path = folder / f"{split}.npz"
        images, labels, names = _load_npz(path)
        classes = names or (CIFAR10_CLASSES if variant == "cifar10" else [str(i) for i in range(100)])
        return _from_arrays(variant, split, images, labels, classes, mean, std, {"file": file_stat_key(path)})
    if variant == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        files, label_key, meta_file, names_key = [split], "fine_labels", "meta", "fine_label_names"
    try:
        parts = [_unpickle(folder / f) for f in files]
        classes = list(_unpickle(folder / meta_file)[names_key])
        data = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.concatenate([np.asarray(p[label_key]) for p in parts]).astype(np.int64)
    except (OSError, KeyError, pickle.UnpicklingError, ValueError) as exc:
        raise AdvpipeError(f"cannot read {variant} batches in {folder}: {exc}") from exc
    key = {"files": [file_stat_key(folder / f) for f in files]}
    return _from_arrays(variant, split, np.ascontiguousarray(data), labels, classes, mean, std, key)


@DATASETS.register("cifar10")
def _cifar10(*, split: str, root: Path, image_size: int | None, download: bool) -> DatasetSplit:
    return _load_cifar("cifar10", split, root, download)


@DATASETS.register("cifar100")
def _cifar100(*, split: str, root: Path, image_size: int | None, download: bool) -> DatasetSplit:
    return _load_cifar("cifar100", split, root, download)


@DATASETS.register("embedded")
def _embedded(*, split: str, root: Path, image_size: int | None, download: bool) -> DatasetSplit:
    """About 2,000 train and 1,000 test CIFAR-10 images shipped with the package (JPEG-sourced)."""
    with np.load(EMBEDDED_FILE, allow_pickle=False) as data:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].astype(np.int64)
    return _from_arrays("embedded", split, images, labels, list(CIFAR10_CLASSES), CIFAR10_MEAN, CIFAR10_STD, None)


@DATASETS.register("synthetic")
def _synthetic(*, split: str, root: Path, image_size: int | None, download: bool) -> DatasetSplit:
    """A learnable in-memory task: 10 smooth random colour templates plus noise (for tests)."""
    size = image_size or 32
    n = 1024 if split == "train" else 512
    gen = torch.Generator().manual_seed(1234)  # templates are shared by both splits
    coarse = torch.rand(10, 3, 4, 4, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(1 if split == "train" else 2)
    labels = torch.randint(0, 10, (n,), generator=gen)
    noise = torch.rand(n, 3, size, size, generator=gen)
    images = (0.65 * templates[labels] + 0.35 * noise).mul(255).round().clamp(0, 255).to(torch.uint8)
    ds = DatasetSplit("synthetic", split, labels, [f"class{i}" for i in range(10)], (0.5, 0.5, 0.5),
                      (0.25, 0.25, 0.25), (3, size, size), images=images)
    return ds


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


def folder_fingerprint(files: list[Path], labels: torch.Tensor, image_shape: tuple[int, ...],
                       resize: str = "squash") -> str:
    """Fingerprint an image-file split over its files' bytes, labels, the resized shape and the resize policy.

    The ``squash`` policy (the ``folder`` dataset's) leaves the policy out of the hash, so folder
    fingerprints stay those of earlier versions.
    """
    policy = "" if resize == "squash" else f"resize={resize}|"

    def compute() -> str:
        h = hashlib.sha256(f"advpipe-fp1-folder|{tuple(image_shape)}|{len(files)}|{policy}".encode())
        for path in files:
            with open(path, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        h.update(labels.numpy().astype("<i8").tobytes())
        return "sha256:" + h.hexdigest()

    # the labels are in the key: Tiny-ImageNet's val labels come from a file the stats do not cover
    key = {"folder": [file_stat_key(p) for p in files], "shape": list(image_shape),
           "labels": hashlib.sha256(labels.numpy().astype("<i8").tobytes()).hexdigest()}
    if policy:
        key["resize"] = resize
    return cached_fingerprint(key, compute)


def file_split(name: str, split: str, files: list[Path], labels: list[int], classes: list[str], size: int,
               resize: str) -> DatasetSplit:
    """A split read from image files at ``size`` x ``size`` by ``resize``, with ImageNet normalization."""
    if resize not in RESIZE_POLICIES:
        raise AdvpipeError(f"unknown resize policy {resize!r}; choose one of: {', '.join(RESIZE_POLICIES)}")
    labels_t = torch.tensor(labels, dtype=torch.long)
    shape = (3, size, size)
    ds = DatasetSplit(name, split, labels_t, classes, IMAGENET_MEAN, IMAGENET_STD, shape, files=files, resize=resize)
    ds.fingerprint_fn = functools.partial(folder_fingerprint, files, labels_t, shape, resize)  # picklable
    return ds


@DATASETS.register("folder")
def _folder(*, split: str, root: Path, image_size: int | None, download: bool) -> DatasetSplit:
    """An ImageFolder-style tree ``root/{train,val|test}/<class>/<image>``, squashed to ``image_size`` (224)."""
    names = ["train"] if split == "train" else ["val", "test"]
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise AdvpipeError(
            f"no image folder for split {split!r} under {str(root)!r}: expected {root}/train/<class>/*.png and "
            f"{root}/val/ or {root}/test/ (ImageFolder layout); set data_dir", fields=("data_dir",))
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if split != "train" and (root / "train").is_dir():  # class indices must agree with the train split
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).rglob("*")) if (folder / cls).is_dir() else []:
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append(path)
                labels.append(label)
    if not files:
        raise AdvpipeError(f"no images found in {folder} (expected <class>/<image> files with one of {sorted(IMAGE_EXTENSIONS)})")
    return file_split("folder", split, files, labels, classes, image_size or 224, "squash")


from advpipe.data import flowers, tinyimagenet  # noqa: E402,F401  (they register their datasets)
