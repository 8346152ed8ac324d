"""Tiny-ImageNet (200 classes, 64x64) read from the official archive's layout.

``--data-dir`` holds ``tiny-imagenet-200/`` (as unpacked from ``tiny-imagenet-200.zip``) or is that
folder itself::

    wnids.txt                         the 200 class ids (WordNet ids), one a line
    words.txt                         optional: "<wnid><TAB><names>" (the first name is the class name)
    train/<wnid>/images/*.JPEG        500 training images per class
    val/images/*.JPEG                 10,000 validation images
    val/val_annotations.txt           "<file><TAB><wnid>[<TAB>box...]" per validation image

The test split is the official validation split (the official test images carry no labels), as in
the AdvMask paper (Sec. IV-A). Class indices follow the sorted wnids (the order ImageFolder gives
``train/``); files are in sorted path order. Images are read at ``--image-size`` (default 64, the
files' own size) by the center-crop policy (a no-op at 64).
"""

from __future__ import annotations

from pathlib import Path

from advpipe.data.datasets import DATASETS, DatasetSplit, file_split
from advpipe.errors import AdvpipeError

FOLDER = "tiny-imagenet-200"
_SUFFIXES = {".jpeg", ".jpg", ".png"}


def find_root(root: Path) -> Path:
    """The folder holding ``wnids.txt``: ``root/tiny-imagenet-200`` or ``root``; else a one-line error."""
    for cand in (root / FOLDER, root):
        if (cand / "wnids.txt").is_file():
            return cand
    raise AdvpipeError(
        f"no Tiny-ImageNet under {str(root)!r}: expected {FOLDER}/ (or its contents) with wnids.txt, "
        f"train/<wnid>/images/*.JPEG and val/images/ with val/val_annotations.txt; set data_dir",
        fields=("data_dir",))


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise AdvpipeError(f"cannot read {path}: {exc}") from exc


def class_names(folder: Path, wnids: list[str]) -> list[str]:
    """The first name of each wnid in ``words.txt`` when it is there, else the wnids themselves."""
    words = folder / "words.txt"
    if not words.is_file():
        return list(wnids)
    names: dict[str, str] = {}
    for line in _read_lines(words):
        wnid, _, text = line.partition("\t")
        names[wnid.strip()] = text.split(",")[0].strip() or wnid.strip()
    return [names.get(w, w) for w in wnids]


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise AdvpipeError(f"Tiny-ImageNet class {wnid} has no folder {images}")
        for path in sorted(images.iterdir()):
            if path.suffix.lower() in _SUFFIXES and path.is_file():
                files.append(path)
                labels.append(label)
    return files, labels


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    notes = folder / "val" / "val_annotations.txt"
    if not notes.is_file():
        raise AdvpipeError(f"Tiny-ImageNet's validation split needs {notes} (the test split is the official val split)",
                           fields=("data_dir",))
    index = {w: i for i, w in enumerate(wnids)}
    pairs: dict[str, int] = {}
    for number, line in enumerate(_read_lines(notes), 1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise AdvpipeError(f"{notes} line {number}: expected '<file><TAB><wnid>' with a wnid of wnids.txt, "
                               f"got {line[:80]!r}")
        if Path(parts[0]).name != parts[0]:
            raise AdvpipeError(f"{notes} line {number}: {parts[0]!r} is not a plain file name")
        pairs[parts[0]] = index[parts[1]]
    files = [folder / "val" / "images" / name for name in sorted(pairs)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise AdvpipeError(f"{len(missing)} annotated validation image(s) are missing, e.g. {missing[0]}")
    return files, [pairs[p.name] for p in files]


@DATASETS.register("tinyimagenet")
def _tinyimagenet(*, split: str, root: Path, image_size: int | None, download: bool) -> DatasetSplit:
    """Tiny-ImageNet: train from ``train/``, test from the official ``val/`` split."""
    if download:
        raise AdvpipeError("tinyimagenet cannot be downloaded by advpipe; unpack tiny-imagenet-200.zip "
                           "(http://cs231n.stanford.edu/tiny-imagenet-200.zip) into the data folder", fields=("download",))
    folder = find_root(root)
    wnids = sorted(set(_read_lines(folder / "wnids.txt")))
    if not wnids:
        raise AdvpipeError(f"{folder / 'wnids.txt'} lists no classes")
    files, labels = _train_files(folder, wnids) if split == "train" else _val_files(folder, wnids)
    if not files:
        raise AdvpipeError(f"no Tiny-ImageNet {split} images under {folder}")
    return file_split("tinyimagenet", split, files, labels, class_names(folder, wnids), image_size or 64,
                      "center-crop")
