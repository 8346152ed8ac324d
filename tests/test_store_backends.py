"""Store access on zarr's model: one backend per way to reach a store, capabilities as flags, and the S3/HTTP
"range not satisfiable" fallback decided on the error's fields, never on its text."""

from __future__ import annotations

import asyncio
import errno
import shutil
from pathlib import Path

import pytest

from helpers.sharing import tiny_store
from advpipe.data.datasets import load_dataset
from advpipe.errors import CannotRead
from advpipe.pipeline.location import LocalBackend, Location, StoreReader, UrlBackend
from advpipe.pipeline.remote import is_invalid_range
from advpipe.pipeline.sharing import pack
from advpipe.pipeline.zipstore import ZipBackend

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in:UserWarning",
                                        "ignore:Consolidated metadata is:UserWarning")


def _s3_invalid_range() -> OSError:
    """What s3fs raises for S3's InvalidRange: an OSError(EINVAL) caused by botocore's ClientError."""
    from botocore.exceptions import ClientError

    cause = ClientError({"Error": {"Code": "InvalidRange", "Message": "The requested range is not satisfiable"},
                         "ResponseMetadata": {"HTTPStatusCode": 416}}, "GetObject")
    exc = OSError(errno.EINVAL, "The requested range is not satisfiable")
    exc.__cause__ = cause
    return exc


def _http_416() -> Exception:
    import aiohttp

    return aiohttp.ClientResponseError(None, (), status=416, message="Range Not Satisfiable")  # type: ignore[arg-type]


class _Coded(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__("something else entirely")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def test_invalid_range_is_decided_on_fields_not_text() -> None:
    assert is_invalid_range(_s3_invalid_range())
    assert is_invalid_range(_http_416())
    assert is_invalid_range(_Coded("InvalidRange", 400))
    assert is_invalid_range(_Coded("Whatever", 416))
    # the words alone prove nothing: rewording a message must not change behaviour
    assert not is_invalid_range(OSError("InvalidRange 416 range not satisfiable"))
    assert not is_invalid_range(_Coded("AccessDenied", 403))
    assert not is_invalid_range(FileNotFoundError("x"))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = _s3_invalid_range()
    assert is_invalid_range(wrapped)


class _FakeFs:
    """A sync fsspec filesystem whose ranged reads fail with ``error``, as S3 does on an empty object."""

    def __init__(self, error: Exception) -> None:
        self.error, self.calls = error, []

    def cat_file(self, path: str, start=None, end=None) -> bytes:
        self.calls.append((path, start, end))
        if start is not None:
            raise self.error
        return b""


@pytest.mark.parametrize("error, falls_back", [(_s3_invalid_range(), True), (_http_416(), True),
                                               (OSError("InvalidRange"), False)])
def test_url_read_falls_back_only_on_a_refused_range(error: Exception, falls_back: bool) -> None:
    backend = UrlBackend("s3://bucket/store", None)
    backend._fs = (_FakeFs(error), "bucket/store")
    if falls_back:
        assert backend.read("empty", 100) == b""
        assert backend._fs[0].calls == [("bucket/store/empty", 0, 101), ("bucket/store/empty", None, None)]
    else:
        with pytest.raises(CannotRead):
            backend.read("empty", 100)


class _FakeStore:
    def __init__(self, error: Exception) -> None:
        self.error, self.ranges = error, []

    async def get(self, key, prototype, byte_range):
        self.ranges.append(byte_range)
        if byte_range is not None:
            raise self.error
        return b""


def test_zarr_reads_fall_back_only_on_a_refused_range() -> None:
    backend = UrlBackend("s3://bucket/store", None)
    store = _FakeStore(_s3_invalid_range())
    assert asyncio.run(backend.get(store, "c/0", None, None)) == b""
    assert store.ranges[0].end == (1 << 30) + (1 << 20) + 1 and store.ranges[1] is None
    with pytest.raises(OSError):
        asyncio.run(backend.get(_FakeStore(OSError("InvalidRange")), "c/0", None, None))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load_dataset("embedded", "train", limit=40)
    return tiny_store(tmp_path_factory.mktemp("backends") / "masks.zarr", ds)


def test_every_backend_reads_lists_and_opens_the_same_store(pristine: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(pristine, tmp_path / "masks.zarr"))
    zipped = pack(str(folder), tmp_path / "masks.zip").path
    readers = [StoreReader(folder), StoreReader(zipped)]
    assert isinstance(readers[0].backend, LocalBackend) and isinstance(readers[1].backend, ZipBackend)
    listings = [r.list_objects() for r in readers]
    assert listings[0] == listings[1]
    for reader in readers:
        assert reader.can_list and reader.exists("zarr.json") and not reader.exists("nope/zarr.json")
        assert reader.read("nope") is None
        assert dict(reader.read_many(sorted(listings[0]))) == {k: (folder / k).read_bytes() for k in listings[0]}
        assert reader.load_manifest() is not None and reader.manifest_problems() == []
        assert set(reader.open_group()) >= {"masks", "l0_pixels"}
    assert Location is StoreReader  # the deprecated name still works


def test_plain_http_says_it_cannot_list_by_its_flag() -> None:
    reader = StoreReader("https://example.invalid/masks.zarr")
    assert not reader.can_list
    with pytest.raises(CannotRead, match="no listing"):
        reader.list_objects()
    assert StoreReader("s3://bucket/masks.zarr").can_list
