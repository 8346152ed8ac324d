"""Evaluation on the released CIFAR-10-C / CIFAR-100-C files (Hendrycks & Dietterich 2019).

The release is one folder with ``labels.npy`` and one ``<name>.npy`` per corruption (``gaussian_noise``,
..., ``jpeg_compression``; see :data:`advpipe.eval.corruptions.CIFAR_C_FILES`). Each holds the N
test images corrupted at severities 1 to 5, one block of N after the other: an (5N, H, W, 3) uint8
array; ``labels.npy`` holds the 5N labels. Files are opened with ``np.load(mmap_mode="r")`` and
read one batch at a time, so memory stays at one batch whatever the file size.

Every file is checked before any pass runs; a missing or malformed one raises one
:class:`~advpipe.errors.AdvpipeError` that names it and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from advpipe.data.batch import Batch
from advpipe.errors import AdvpipeError
from advpipe.eval.corruptions import CIFAR_C_FILES, CORRUPTIONS, SEVERITIES
from advpipe.eval.robustness import accuracy_pass, mean_or_none, public, robustness_score
from advpipe.files import sha256_file

LABELS_FILE = "labels.npy"


@dataclass(frozen=True)
class CorruptionFiles:
    """A checked release folder: per-severity block length, the labels and the open image files."""

    folder: Path
    per_severity: int
    labels: np.ndarray
    images: dict[str, np.ndarray]

    def provenance(self) -> dict[str, Any]:
        """Folder, block length and the sha256 of every file used (for the result JSON)."""
        files = {LABELS_FILE: sha256_file(self.folder / LABELS_FILE)}
        files.update({f"{CIFAR_C_FILES[n]}.npy": sha256_file(self.folder / f"{CIFAR_C_FILES[n]}.npy")
                      for n in self.images})
        return {"kind": "files", "dir": str(self.folder), "per_severity": self.per_severity, "sha256": files}


def available_corruptions(folder: str | Path) -> list[str]:
    """The release corruptions whose ``<name>.npy`` is in ``folder``, in the benchmark's order."""
    folder = Path(folder)
    return [name for name, stem in CIFAR_C_FILES.items() if (folder / f"{stem}.npy").is_file()]


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise AdvpipeError(f"{path} is missing: a CIFAR-10-C / CIFAR-100-C folder holds {what}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AdvpipeError(f"cannot read {path} as a .npy array: {exc}") from exc


def open_corruption_files(folder: str | Path, names: Sequence[str], *, image_shape: tuple[int, int, int],
                          labels: torch.Tensor, num_classes: int) -> CorruptionFiles:
    """Open and check ``labels.npy`` and the files of ``names`` against the evaluated test split.

    ``image_shape`` is (C,H,W) of the model's input and ``labels`` the test split's labels (its
    first ``len(labels)`` images are compared with each severity block). Raises AdvpipeError on a
    missing folder or file, a wrong dtype, shape or length, labels that differ from the test
    split's, or a name without a release file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdvpipeError(f"corruptions_dir {str(folder)!r} is not a folder", fields=("corruptions_dir",))
    unknown = [n for n in names if n not in CIFAR_C_FILES]
    if unknown:
        raise AdvpipeError(f"{unknown[0]} has no file in the CIFAR-10-C release; with corruptions_dir choose "
                           f"among: {', '.join(CIFAR_C_FILES)}", fields=("corruptions_dir",))
    file_labels = _load(folder / LABELS_FILE, f"{LABELS_FILE} (5 x N labels) and <corruption>.npy files")
    if file_labels.ndim != 1 or file_labels.dtype.kind not in "iu" or len(file_labels) == 0 or len(file_labels) % 5:
        raise AdvpipeError(f"{folder / LABELS_FILE} must be a 1-D integer array of 5 x N labels, got "
                           f"shape {file_labels.shape} dtype {file_labels.dtype}")
    file_labels = np.asarray(file_labels).astype(np.int64)
    n = len(file_labels) // 5
    expected = labels.cpu().numpy().astype(np.int64)
    if len(expected) > n:
        raise AdvpipeError(f"{folder} holds {n} images per severity but the evaluated split has {len(expected)}; "
                           "use limit or the matching data", fields=("limit", "data"))
    for s in SEVERITIES:
        block = file_labels[(s - 1) * n: (s - 1) * n + len(expected)]
        if not np.array_equal(block, expected):
            first = int(np.nonzero(block != expected)[0][0])
            raise AdvpipeError(f"{folder / LABELS_FILE} does not match the evaluated test split's labels (severity "
                               f"{s}, image {first}): the files must be the corrupted test split of the evaluated "
                               "dataset, in its order")
    if file_labels.max() >= num_classes or file_labels.min() < 0:
        raise AdvpipeError(f"{folder / LABELS_FILE} has labels outside 0..{num_classes - 1}")
    c, h, w = image_shape
    images = {}
    for name in names:
        path = folder / f"{CIFAR_C_FILES[name]}.npy"
        array = _load(path, f"one <corruption>.npy per corruption, e.g. {CIFAR_C_FILES[name]}.npy")
        if array.dtype != np.uint8 or array.shape != (len(file_labels), h, w, c):
            raise AdvpipeError(f"{path} must be a uint8 array of shape {(len(file_labels), h, w, c)} (5 severities "
                               f"x {n} HWC images, like {LABELS_FILE}), got shape {array.shape} dtype {array.dtype}")
        images[name] = array
    return CorruptionFiles(folder, n, file_labels, images)


def file_batches(files: CorruptionFiles, name: str, severity: int, count: int, batch_size: int,
                 device: torch.device) -> Iterator[Batch]:
    """Batches of the first ``count`` images of one severity block, read from the memory map."""
    array = files.images[name]
    start = (severity - 1) * files.per_severity
    for lo in range(0, count, batch_size):
        hi = min(lo + batch_size, count)
        chunk = torch.from_numpy(np.array(array[start + lo: start + hi]))  # one batch read from the map
        images = chunk.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        labels = torch.from_numpy(files.labels[start + lo: start + hi]).to(device)
        yield Batch(images=images, labels=labels, index=torch.arange(lo, hi, device=device))


class _Batches:
    """A re-iterable, sized view of :func:`file_batches` for the progress bar."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __iter__(self) -> Iterator[Batch]:
        return file_batches(*self.args)

    def __len__(self) -> int:
        count, batch_size = self.args[3], self.args[4]
        return -(-count // batch_size)


def corruption_file_pass(model: nn.Module, files: CorruptionFiles, name: str, severities: Sequence[int],
                         num_classes: int, *, clean: dict[str, Any], count: int, batch_size: int,
                         device: torch.device, precision: str = "fp32") -> dict[str, Any]:
    """Accuracy and robustness score on one release file at each severity, in :func:`corruption_pass`'s schema."""
    stem = f"{CIFAR_C_FILES[name]}.npy"
    levels = []
    for severity in severities:
        batches = _Batches(files, name, severity, count, batch_size, device)
        result = public(accuracy_pass(model, batches, num_classes, precision=precision,
                                      description=f"{stem} s{severity}", total=len(batches)))
        start = (severity - 1) * files.per_severity
        levels.append({"severity": severity, "params": {"file": stem, "rows": [start, start + count]},
                       "top1": result["top1"], "robustness": robustness_score(result["top1"], clean.get("top1")),
                       "per_class": result["per_class"], "n": result["n"], "seconds": result["seconds"]})
    return {
        "name": name,
        "family": CORRUPTIONS.get(name).family,
        "source": f"CIFAR-10-C / CIFAR-100-C release file {files.folder / stem}",
        "severities": levels,
        "top1": mean_or_none(lv["top1"] for lv in levels),
        "robustness": mean_or_none(lv["robustness"] for lv in levels),
        "seconds": sum(lv["seconds"] for lv in levels),
    }
