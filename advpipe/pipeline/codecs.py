"""Array layout, codecs and bit packing of the ``advpipe-masks/2`` store (see docs/mask-store.md).

Everything a reader and a writer must agree on byte for byte lives here: the array names, dtypes
and fill values, the codec chain of each array, the per-sample hash and the bit order of packed
masks.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator, Literal

import numpy as np
import torch
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import PackBits
from zarr.errors import ZarrUserWarning

from advpipe.errors import AdvpipeError

FORMAT = "advpipe-masks/2"
ATTRS_KEY = "advpipe"
ZSTD_LEVEL = 3
SAMPLE_HASH_RULE = "blake2b(digest_size=8) of the image's uint8 HWC C-order bytes, read as little-endian uint64"
MASK_HASH_RULE = ("blake2b(digest_size=8) of the sample_hash as 8 little-endian bytes followed by np.packbits of the "
                  "C-order mask (most significant bit first), read as little-endian uint64")


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array of the store: dtype and the fill value that marks unwritten rows."""

    dtype: np.dtype
    fill_value: Any
    per_pixel: bool = False


# Fill values are impossible results (-1 counts, NaN norms), so rows of a chunk that was never
# written cannot be mistaken for data even by a reader that ignores ``chunk_done``.
ARRAYS: dict[str, ArraySpec] = {
    "masks": ArraySpec(np.dtype(bool), False, per_pixel=True),
    "success": ArraySpec(np.dtype(bool), False),
    "clean_correct": ArraySpec(np.dtype(bool), False),
    "l0": ArraySpec(np.dtype("int32"), -1),
    "l0_pixels": ArraySpec(np.dtype("int32"), -1),
    "l2": ArraySpec(np.dtype("float32"), float("nan")),
    "linf": ArraySpec(np.dtype("float32"), float("nan")),
    "loss": ArraySpec(np.dtype("float32"), float("nan")),
    "labels": ArraySpec(np.dtype("int64"), -1),
    "sample_hash": ArraySpec(np.dtype("uint64"), 0),
    "mask_hash": ArraySpec(np.dtype("uint64"), 0),
}
METRICS = ("success", "clean_correct", "l0", "l0_pixels", "l2", "linf", "loss")
DONE_ARRAY = "chunk_done"


def codec_kwargs(name: str) -> dict[str, Any]:
    """Return the ``filters``/``serializer``/``compressors`` keywords of ``create_array`` for ``name``."""
    # crc32c comes last so it covers the stored (compressed) bytes: a flipped or cut file fails the
    # checksum before zstd ever sees it.
    compressors = [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]
    if name == DONE_ARRAY:
        compressors = [Crc32cCodec()]  # one byte per object: compression would only add a header
    filters: list[Any] = []
    if name == "masks":
        with quiet_zarr():
            filters = [PackBits()]
    return {"filters": filters, "serializer": BytesCodec(endian="little"), "compressors": compressors}


def encoded_chunks(name: str, values: np.ndarray, chunks: tuple[int, ...]) -> dict[str, bytes]:
    """Return the stored objects (``c/<i>...`` -> bytes) of array ``name`` holding ``values`` in ``chunks``.

    The same values encode to the same bytes with the same zarr and codec versions, so comparing
    their sha256 with a pinned manifest proves an array's content without fetching it.
    """
    import zarr
    from zarr.storage import MemoryStore

    spec = ARRAYS.get(name, ArraySpec(np.dtype(bool), False))  # chunk_done: bool, False
    objects: dict[str, Any] = {}
    with quiet_zarr():
        arr = zarr.create_array(MemoryStore(objects), shape=values.shape, chunks=chunks, dtype=spec.dtype,
                                fill_value=spec.fill_value, **codec_kwargs(name))
        arr.with_config({"write_empty_chunks": True})[...] = values
    return {key: bytes(value.to_bytes()) for key, value in objects.items() if key.startswith("c/")}


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence zarr's notices that numcodecs codecs and consolidated metadata are outside the v3 spec."""
    # Both are deliberate format choices documented in docs/mask-store.md; repeating them on every
    # open would only bury real warnings.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in", category=ZarrUserWarning)
        warnings.filterwarnings("ignore", message="Consolidated metadata is", category=ZarrUserWarning)
        yield


def sample_hash(images_uint8: np.ndarray, *, layout: Literal["NHWC", "NCHW"] = "NHWC") -> np.ndarray:
    """Return the (N,) uint64 content hash of each image, as stored in ``sample_hash``.

    The hash is ``blake2b(digest_size=8)`` of the image's uint8 bytes in HWC C-order, read as a
    little-endian uint64. NCHW input is transposed to HWC first, so both layouts of the same pixels
    hash alike; (N,H,W) grayscale is hashed as is.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise AdvpipeError(f"sample_hash needs uint8 images, got {images.dtype}")
    if layout not in ("NHWC", "NCHW"):
        raise AdvpipeError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if images.ndim == 4 and layout == "NCHW":
        images = images.transpose(0, 2, 3, 1)
    elif images.ndim not in (3, 4):
        raise AdvpipeError(f"sample_hash needs (N,H,W,C), (N,C,H,W) or (N,H,W) images, got shape {images.shape}")
    digests = b"".join(hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=8).digest() for img in images)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def mask_hash(masks: np.ndarray, sample_hashes: np.ndarray) -> np.ndarray:
    """Return the (N,) uint64 hash tying each (H,W) mask to its image's ``sample_hash`` (see ``MASK_HASH_RULE``).

    A mask moved to another row, or rewritten, no longer matches the hash recorded at write time.
    """
    packed = pack_masks(masks)
    keys = np.asarray(sample_hashes, dtype="<u8")
    if keys.shape != (len(packed),):
        raise AdvpipeError(f"mask_hash needs one sample hash per mask, got {keys.shape} for {len(packed)} masks")
    digests = b"".join(hashlib.blake2b(key.tobytes() + row.tobytes(), digest_size=8).digest()
                       for key, row in zip(keys, packed))
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def decoded_chunk_bytes(name: str, chunk_shape: tuple[int, ...]) -> int:
    """The exact size of the bytes zstd must return for one chunk of array ``name`` (after packbits for masks)."""
    elements = math.prod(chunk_shape)
    if name == "masks":
        return 1 + math.ceil(elements / 8)  # numcodecs.packbits: one byte of padding count, then the bits
    return elements * ARRAYS.get(name, ArraySpec(np.dtype(bool), False)).dtype.itemsize


_ZSTD_MAGIC = 0xFD2FB528


def zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size a zstd frame header declares (None when it declares none or is not a zstd frame)."""
    if len(frame) < 6 or int.from_bytes(frame[:4], "little") != _ZSTD_MAGIC:
        return None
    fhd = frame[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(frame) < pos + size:
        return None
    value = int.from_bytes(frame[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def check_decoded_size(name: str, stored: bytes, chunk_shape: tuple[int, ...], where: str) -> None:
    """Refuse a stored chunk whose zstd frame does not declare exactly the chunk's decoded size.

    numcodecs allocates what the frame header declares (and streams frames that declare nothing
    without bound), so a 98 KB frame declaring 3 GiB is refused here, before anything decodes it.
    """
    if name not in ARRAYS:
        return  # chunk_done has no zstd stage; crc32c checks its 5 bytes
    expected = decoded_chunk_bytes(name, chunk_shape)
    declared = zstd_content_size(stored[:-4])  # crc32c's 4 bytes come last
    if declared != expected:
        got = "no content size" if declared is None else f"{declared} bytes"
        raise AdvpipeError(f"{where}: its zstd frame declares {got}; a chunk of {name!r} decodes to exactly "
                           f"{expected} bytes; refusing to decompress it")


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Bit-pack (N,H,W) bool masks row by row into (N, ceil(H*W/8)) uint8, most significant bit first."""
    masks = np.asarray(masks, dtype=bool)
    return np.packbits(masks.reshape(masks.shape[0], -1), axis=1, bitorder="big")


def unpack_masks(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unpack (..., ceil(H*W/8)) uint8 bit-packed masks into (..., H, W) bool on the same device.

    Inverse of :func:`pack_masks` (and of ``MaskStore.read_all_packed``): keep a whole store packed
    on the GPU (1024 bits = 128 bytes per CIFAR mask) and unpack only the rows of each batch.
    """
    if packed.dtype != torch.uint8:
        raise AdvpipeError(f"packed masks must be uint8, got {packed.dtype}")
    n_bits = height * width
    if packed.shape[-1] != math.ceil(n_bits / 8):
        raise AdvpipeError(f"packed masks have {packed.shape[-1]} bytes per row; {height}x{width} needs {math.ceil(n_bits / 8)}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :n_bits].reshape(*packed.shape[:-1], height, width).bool()


def format_eps(eps: str | float | int | Fraction) -> str:
    """Return eps as a reduced fraction string such as ``"8/255"`` (floats must be an exact small fraction)."""
    if isinstance(eps, bool):
        raise AdvpipeError(f"eps must be a number or a fraction string, got {eps!r}")
    if isinstance(eps, str):
        try:
            frac = Fraction(eps.strip())
        except (ValueError, ZeroDivisionError) as exc:
            raise AdvpipeError(f"eps {eps!r} is not a fraction like '8/255' or a decimal") from exc
    elif isinstance(eps, (int, Fraction)):
        frac = Fraction(eps)
    elif isinstance(eps, float) and math.isfinite(eps):
        # 8/255 arrives as 0.03137254901960784; recover the fraction only if it is exact.
        frac = Fraction(eps).limit_denominator(10_000)
        if float(frac) != eps:
            raise AdvpipeError(f"eps {eps!r} is not a fraction with denominator <= 10000; pass it as a string like '8/255'")
    else:
        raise AdvpipeError(f"eps must be a number or a fraction string, got {eps!r}")
    if frac < 0:
        raise AdvpipeError(f"eps must be >= 0, got {eps!r}")
    return str(frac)
