"""Reading image files: a bounded JPEG fast path (torchvision.io), PIL for other formats, one resize policy.

Every path that turns a file into pixels (the streamed batches, the one-time image cache, ``load_images``)
goes through :func:`decode_file` and :func:`resize_image`, so a split's pixels do not depend on which
path read them. The one exception is the GPU decoder (:func:`decode_batch` on a CUDA device): nvjpeg
may differ from libjpeg-turbo by a level or so in some pixels.

Resize policies (``DatasetSplit.resize``):

- ``squash``: resize to SxS, ignoring the aspect ratio (the ``folder`` dataset, as it always did);
- ``center-crop``: resize the shorter side to S, then cut the central SxS square (``tinyimagenet``,
  ``flowers102``), the usual evaluation transform of ImageNet-style models.

Both use bilinear interpolation with antialiasing on uint8 (within one level of PIL's BILINEAR).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from advpipe.errors import AdvpipeError

#: the most pixels an image file may declare before it is decoded (PIL's own default bound, about
#: 9459 x 9459; about 270 MB decoded as RGB): a larger one is refused, not decompressed
MAX_IMAGE_PIXELS = 89_478_485
RESIZE_POLICIES = ("squash", "center-crop")
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency); they still
# work, and this one warning would otherwise come with every decoded batch
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

#: JPEG start-of-frame markers (every SOFn except DHT C4, JPG C8 and DAC CC) carry the image size
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) a JPEG's start-of-frame declares, or None when it cannot be found."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS and pos + 9 <= end:
            return int.from_bytes(data[pos + 7 : pos + 9], "big"), int.from_bytes(data[pos + 5 : pos + 7], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def _too_large(path: Path, width: int, height: int) -> AdvpipeError:
    return AdvpipeError(f"image {str(path)!r} declares {width}x{height} pixels, over the "
                        f"{MAX_IMAGE_PIXELS:,}-pixel bound; it is not decoded")


def _unreadable(path: Path, exc: BaseException) -> AdvpipeError:
    text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return AdvpipeError(f"cannot read image {str(path)!r}: {text}")


def _decode_pil(path: Path, data: bytes) -> torch.Tensor:
    """Any format PIL reads, as uint8 (3,h,w); the declared size is checked before decoding."""
    import io

    import numpy as np
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_large(path, width, height)
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        # PIL reports a truncated or foreign file as OSError (UnidentifiedImageError), some plugins as SyntaxError
        raise _unreadable(path, exc) from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_bytes(path: Path) -> bytes:
    """A file's bytes; an unreadable file raises AdvpipeError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AdvpipeError(f"cannot read image {str(path)!r}: {exc.strerror or exc}") from exc


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_file(path: Path, data: bytes | None = None) -> torch.Tensor:
    """Decode one image file (or its ``data``) to uint8 (3,h,w) RGB; oversized or unreadable files raise AdvpipeError."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = read_bytes(path) if data is None else data
    if _is_jpeg(data):
        size = jpeg_size(data)
        if size is not None:
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise _too_large(path, *size)
            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:
                pass  # a JPEG flavour libjpeg-turbo refuses (or a damaged file): PIL decides below
    return _decode_pil(path, data)


def resize_image(image: torch.Tensor, size: int, policy: str) -> torch.Tensor:
    """Resize (...,C,h,w) uint8 or float images to (...,C,size,size) by ``policy`` (squash or center-crop)."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    if policy == "squash":
        return TF.resize(image, [size, size], antialias=True)
    if policy != "center-crop":
        raise AdvpipeError(f"unknown resize policy {policy!r}; choose one of: {', '.join(RESIZE_POLICIES)}")
    if min(h, w) != size:
        image = TF.resize(image, size, antialias=True)  # an int resizes the shorter side
    return TF.center_crop(image, [size, size])


def read_image(path: Path, size: tuple[int, int], policy: str = "squash") -> torch.Tensor:
    """Read an image file as uint8 (3,H,W) at the square ``size`` by ``policy``; bad files raise AdvpipeError."""
    if size[0] != size[1]:
        raise AdvpipeError(f"image folders are read at square sizes, got {size}")
    return resize_image(decode_file(Path(path)), int(size[0]), policy).contiguous()


def decode_files(files: Sequence[Path], size: int, policy: str, *, pool: ThreadPoolExecutor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode and resize ``files`` into one channels_last uint8 (N,3,size,size) CPU tensor, on ``pool``'s threads.

    torchvision's decoder and resize release the GIL, so threads decode in parallel without the
    start-up and copy costs of worker processes. ``out`` (preallocated, on the CPU) receives the images.
    """
    if out is None:
        out = torch.empty((len(files), size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)

    def one(i: int) -> None:
        out[i] = resize_image(decode_file(Path(files[i])), size, policy)

    if pool is None or len(files) < 2:
        for i in range(len(files)):
            one(i)
    else:
        list(pool.map(one, range(len(files))))
    return out


def decode_batch(files: Sequence[Path], size: int, policy: str, *, device: torch.device,
                 pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """One batch of files as uint8 (B,3,size,size) on ``device``; on CUDA the JPEGs are decoded on the GPU.

    ``pool`` (CPU threads) reads the files and, off CUDA, decodes them; without it everything runs here.
    """
    if device.type != "cuda":
        return decode_files(files, size, policy, pool=pool).to(device)
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = list(pool.map(read_bytes, files)) if pool is not None else [read_bytes(f) for f in files]
    out = torch.empty((len(files), size, size, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    gpu = [i for i, d in enumerate(datas) if _is_jpeg(d) and (s := jpeg_size(d)) is not None
           and s[0] * s[1] <= MAX_IMAGE_PIXELS]
    decoded: dict[int, torch.Tensor] = {}
    if gpu:
        try:
            images = decode_jpeg([torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in gpu],
                                 mode=ImageReadMode.RGB, device=device)
            decoded = dict(zip(gpu, images))
        except RuntimeError:  # one file nvjpeg refuses spoils the batch call: decode those on the CPU
            decoded = {}
    for i, path in enumerate(files):
        image = decoded[i] if i in decoded else decode_file(Path(path), datas[i]).to(device)
        out[i] = resize_image(image, size, policy)
    return out
