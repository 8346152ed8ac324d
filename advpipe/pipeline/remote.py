"""Remote mask stores: URLs with a pinned digest, storage options, timeouts and retries, one-line errors.

Any fsspec URL works (``s3://``, ``http(s)://``, ``gs://``, ``memory://`` ...; each needs its fsspec
package, s3fs for S3). Options come, lowest precedence first, from the defaults below, the JSON
object in ``$ADVPIPE_STORAGE_OPTIONS`` and the caller's (``--storage-option KEY=VALUE``).
Credentials and the endpoint otherwise come the usual ways of each filesystem: for S3,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` and
``AWS_DEFAULT_REGION``.

Timeout and retry policy (docs/sharing.md): every request must connect within
``min(5, T)`` seconds and answer within ``T`` seconds (``$ADVPIPE_REMOTE_TIMEOUT``, default 20).
S3 requests that time out, lose the connection, get a 5xx or are throttled are retried ``R`` times
(``$ADVPIPE_REMOTE_RETRIES``, default 1) by botocore's "standard" mode (jittered exponential
backoff, under 1 s for the first retry); s3fs's own retry loops are off, so the two never
multiply. HTTP requests are not retried. Access denied, not found and bad requests are never
retried. So one failing request ends within about ``(R + 1) * (5 + T) + 2`` seconds: 52 s by default.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

from advpipe.errors import AdvpipeError, CannotRead, StoreUnreachable
from advpipe.pipeline.manifest import normalize_digest

TIMEOUT_ENV = "ADVPIPE_REMOTE_TIMEOUT"
RETRIES_ENV = "ADVPIPE_REMOTE_RETRIES"
OPTIONS_ENV = "ADVPIPE_STORAGE_OPTIONS"
DEFAULT_TIMEOUT_S = 20.0
MAX_CONNECT_S = 5.0
DEFAULT_RETRIES = 1


def is_url(location: Any) -> bool:
    """Whether ``location`` names a remote store (any ``scheme://`` except ``file://``)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def split_pin(location: str) -> tuple[str, str | None]:
    """Split ``URL#sha256=HEX`` into the location and its pinned digest ``sha256:HEX`` (None if unpinned)."""
    if "#" not in location:
        return location, None
    base, fragment = location.rsplit("#", 1)
    key, _, value = fragment.partition("=")
    if key != "sha256" or not value:
        raise AdvpipeError(f"the only fragment a mask store location takes is '#sha256=<64 hex>', got '#{fragment:.80}'")
    return base, normalize_digest(value)


def pin_location(location: str, digest: str | None) -> str:
    """Return ``location`` pinned to ``digest`` (``LOCATION#sha256=HEX``); refuse two different pins."""
    if digest is None:
        return location
    base, existing = split_pin(location)
    digest = normalize_digest(digest)
    if existing is not None and existing != digest:
        raise AdvpipeError(f"{location} is pinned to {existing} but the digest option says {digest}")
    return f"{base}#sha256={digest.removeprefix('sha256:')}"


def _value(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (bool, int, float)) or value is None else text


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` items into fsspec options; ``a.b=VALUE`` nests, and true/false/numbers are typed."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise AdvpipeError(f"storage_option takes KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000), got {item!r}",
                               fields=("storage_option",))
        *parents, leaf = key.strip().split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise AdvpipeError(f"storage_option {key}: {part!r} is already given a value",
                                   fields=("storage_option",))
            node = child
        node[leaf] = _value(text)
    return options


@contextlib.contextmanager
def storage_options_env(items: list[str] | None) -> Iterator[None]:
    """Within the block, later store opens see ``items`` (KEY=VALUE) through ``$ADVPIPE_STORAGE_OPTIONS``."""
    options = parse_storage_options(items)
    previous = os.environ.get(OPTIONS_ENV)
    if options:
        os.environ[OPTIONS_ENV] = json.dumps(_merge(_env_options(), options))
    try:
        yield
    finally:
        if options:
            if previous is None:
                os.environ.pop(OPTIONS_ENV, None)
            else:
                os.environ[OPTIONS_ENV] = previous


def policy() -> tuple[float, int]:
    """Return (timeout seconds, retries) for remote requests from the environment (see the module doc)."""
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
        retries = int(os.environ.get(RETRIES_ENV) or DEFAULT_RETRIES)
    except ValueError as exc:
        raise AdvpipeError(f"${TIMEOUT_ENV} must be seconds and ${RETRIES_ENV} a count") from exc
    if not 0 < timeout <= 3600 or not 0 <= retries <= 10:
        raise AdvpipeError(f"${TIMEOUT_ENV} must lie in (0, 3600] s and ${RETRIES_ENV} in [0, 10]")
    return timeout, retries


def _env_options() -> dict[str, Any]:
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise AdvpipeError(f"${OPTIONS_ENV} must be a JSON object of fsspec options, got {raw[:80]!r}")
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def protocol_of(url: str) -> str:
    """The URL's scheme (``s3``, ``https`` ...)."""
    return url.split("://", 1)[0].lower()


def storage_options(url: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """Return the fsspec options for ``url``: the timeout defaults, then ``$ADVPIPE_STORAGE_OPTIONS``, then ``given``."""
    timeout, retries = policy()
    connect = min(MAX_CONNECT_S, timeout)
    defaults: dict[str, Any] = {}
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a"):
        defaults = {"config_kwargs": {"connect_timeout": connect, "read_timeout": timeout,
                                      "retries": {"total_max_attempts": retries + 1, "mode": "standard"}}}
    elif protocol in ("http", "https"):
        import aiohttp

        defaults = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=connect,
                                                                       sock_read=timeout)}}
    return _merge(_merge(defaults, _env_options()), given or {})


def filesystem(url: str, given: dict[str, Any] | None, *, asynchronous: bool = False) -> tuple[Any, str]:
    """Return (fsspec filesystem, path) for ``url`` under the options and retry policy above."""
    import fsspec

    options = storage_options(url, given)
    try:
        fs, path = fsspec.core.url_to_fs(url, **({"asynchronous": True} if asynchronous else {}), **options)
    except ImportError as exc:
        extra = " (pip install 'advpipe[s3]')" if protocol_of(url) in ("s3", "s3a") else ""
        raise CannotRead(f"cannot read {url}: {exc}{extra}") from exc
    except Exception as exc:  # fsspec and its backends raise their own types for bad options
        raise CannotRead(f"cannot use {url}: {error_line(exc, url)}") from exc
    if protocol_of(url) in ("s3", "s3a"):
        fs.retries = 1  # s3fs nests its retry loops (attempts = retries squared); botocore retries instead
    return fs, path


_TIMEOUTS = ("TimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError", "FSTimeoutError",
             "timeout", "SocketTimeoutError", "ConnectionTimeoutError")
_UNREACHABLE = ("EndpointConnectionError", "ClientConnectorError", "ConnectionRefusedError", "ConnectionError",
                "ServerDisconnectedError", "ClientOSError")
_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403", "ExpiredToken")


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a timeout or a lost connection (not damaged bytes): report it as such, never as corruption."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & (set(_TIMEOUTS) | set(_UNREACHABLE))) or isinstance(exc, (TimeoutError, ConnectionError))


def error_line(exc: BaseException, url: str = "") -> str:
    """Describe a filesystem error on ``url`` in one line: what kind it is, then the exception's own text."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = " ".join(str(exc).split()) or repr(exc)
    if len(text) > 300:
        text = text[:300] + "..."
    timeout, retries = policy()
    if names & set(_TIMEOUTS):
        kind = f"no answer within {timeout:g} s"
        tries = retries + 1 if protocol_of(url) in ("s3", "s3a") else 1
        kind += f" ({tries} attempt{'s' if tries > 1 else ''}; ${TIMEOUT_ENV}, ${RETRIES_ENV})"
    elif "NoCredentialsError" in names or "PartialCredentialsError" in names:
        kind = ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or pass --storage-option anon=true for a public bucket")
    elif isinstance(exc, PermissionError) or any(word in text for word in _DENIED):
        kind = "access denied (check the credentials and the bucket's permissions)"
    elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "404" in text:
        kind = "not found" + (" (the bucket does not exist)" if "bucket" in text.lower() else "")
    elif names & set(_UNREACHABLE) or isinstance(exc, ConnectionError):
        kind = "cannot connect (check the endpoint: AWS_ENDPOINT_URL or --storage-option endpoint_url=...)"
    else:
        kind = "failed"
    return f"{kind}: {type(exc).__name__}: {text}"


def is_invalid_range(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a server refusing a byte range, as S3 and HTTP do for an empty object.

    Decided on fields, never text: s3fs raises an OSError caused by botocore's ClientError
    (``response`` Error Code ``InvalidRange``, HTTPStatusCode 416); aiohttp's error has ``status``.
    """
    seen: BaseException | None = exc
    for _ in range(4):  # the error, then what caused it
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            error, meta = response.get("Error"), response.get("ResponseMetadata")
            if (isinstance(error, dict) and error.get("Code") in ("InvalidRange", "416")
                    or isinstance(meta, dict) and meta.get("HTTPStatusCode") == 416):
                return True
        if getattr(seen, "status", None) == 416:
            return True
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
    return False


def read_error(name: str, exc: BaseException, url: str = "") -> CannotRead:
    """The error for a failed read of ``name``: StoreUnreachable for a timeout or lost connection, else CannotRead."""
    kind = StoreUnreachable if is_network_error(exc) else CannotRead
    return kind(f"cannot read {name}: {error_line(exc, url)}")
