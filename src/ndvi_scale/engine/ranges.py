"""Byte ranges of a file, over HTTP(S) or from local disk, for the reader's own COG path.

One blocking call per read: :func:`fetch` takes the byte ranges of the tiles a window needs, merges the ones
that (nearly) touch, and returns their bytes. Over HTTP each merged range is one ``GET`` with a ``Range`` header;
several ranges of one read are fetched at once (the first in the calling thread, the others in
:data:`RANGE_POOL`), so a read costs one round trip, not one per tile row. Connections are kept alive, so a
request seldom pays for a connect: a plain range answer is read by :mod:`.httpget` (a fraction of urllib3's CPU
per request), anything else (a redirect, a chunked body) by one urllib3 pool per process (at most
:data:`MAX_CONNECTIONS` per host).

Requests follow the one retry policy of :mod:`ndvi_scale.http` through the same settings as GDAL's reads
(:func:`ndvi_scale.http.gdal_retry_options`: ``GDAL_HTTP_MAX_RETRY``, ``GDAL_HTTP_RETRY_DELAY``,
``GDAL_HTTP_RETRY_CODES``, ``GDAL_HTTP_TIMEOUT``, ``GDAL_HTTP_CONNECTTIMEOUT``, environment first), so a user's
setting means the same on both paths. A status that is still an error after those retries raises ``OSError``
with GDAL's wording (``HTTP response code: 500``): the reader's :class:`~ndvi_scale.faults.ReadPolicy` then
decides (a retry from scratch with a re-signed href, or give up).

s3:// and gs:// hrefs are read through GDAL (its credential chains are the user's configuration), not here; so are
http(s) hrefs when a proxy, extra headers or credentials are configured for GDAL (:func:`supported`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from ..http import BACKOFF_MAX, RETRY_AFTER_MAX, capped_retry_class, gdal_retry_options
from . import httpget
from .fetch import LazyPool

__all__ = ["MAX_CONNECTIONS", "MERGE_GAP", "RANGE_POOL", "fetch", "local_path", "supported"]

#: Ranges of one read less than this many bytes apart are fetched as one. A COG's tiles follow each other with
#: 8 bytes of GDAL's leader/trailer between them: a row of needed tiles becomes one request, and never more
#: than this is fetched for nothing per gap.
MERGE_GAP = 16 * 1024

#: Keep-alive connections per host: the read pool's threads plus the range pool's.
MAX_CONNECTIONS = 128

#: Threads fetching the second and further ranges of a read (the first is fetched by the reading thread). They
#: only wait on sockets, never on other work of the engine, so the read pool's threads waiting for them cannot
#: deadlock.
RANGE_POOL = LazyPool(32, "ndvi-scale-range")

_http_lock = threading.Lock()
_http: tuple[int, Any, _Settings] | None = None


#: Settings of the environment that GDAL applies to its HTTP requests and this module does not (a proxy, extra
#: headers, credentials, TLS options): with any of them set, http(s) files are read through GDAL, which honours
#: them, instead of being fetched here without them.
GDAL_ONLY_HTTP_SETTINGS = (
    "GDAL_HTTP_PROXY", "GDAL_HTTPS_PROXY", "GDAL_HTTP_PROXYUSERPWD", "GDAL_HTTP_HEADERS", "GDAL_HTTP_HEADER_FILE",
    "GDAL_HTTP_AUTH", "GDAL_HTTP_USERPWD", "GDAL_HTTP_BEARER", "GDAL_HTTP_COOKIE", "GDAL_HTTP_COOKIEFILE",
    "GDAL_HTTP_UNSAFESSL", "GDAL_HTTP_USERAGENT", "GDAL_HTTP_SSLCERT", "GDAL_HTTP_SSLKEY", "GDAL_HTTP_VERSION",
    "CPL_CURL_VERBOSE", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy",
)


def supported(url: str) -> bool:
    """Whether :func:`fetch` reads ``url``: local paths (``file://`` or plain) and http(s) URLs, the latter unless
    the environment configures GDAL's HTTP requests in a way this module does not follow
    (:data:`GDAL_ONLY_HTTP_SETTINGS`)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return not any(os.environ.get(k, "").strip() for k in GDAL_ONLY_HTTP_SETTINGS)
    return local_path(url) is not None


def local_path(url: str) -> str | None:
    """The local file path of ``url`` (a plain path or a ``file://`` URL), or None for anything else."""
    if url.startswith("/vsi"):
        return None
    parts = urlsplit(url)
    if parts.scheme == "file":
        return unquote(parts.path)
    if parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):
        return url
    return None


def fetch(url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes | memoryview]:
    """The bytes of each ``(offset, length)`` range of ``url``, in order (fewer bytes than asked only at the end of
    the file). Raises ``OSError`` (HTTP error status after retries, I/O error, connection failure)."""
    if not ranges:
        return []
    merged = _merge(ranges)
    path = local_path(url)
    if path is not None:
        with open(path, "rb", buffering=0) as fh:
            blobs: list[bytes | memoryview] = [os.pread(fh.fileno(), n, a) for a, n in merged]
    else:
        futures: list[Future[bytes | memoryview]] = [RANGE_POOL.submit(_get, url, a, n) for a, n in merged[1:]]
        try:
            blobs = [_get(url, *merged[0])]
            blobs += [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
    if len(merged) == len(ranges) and list(ranges) == merged:
        return list(blobs)
    out: list[bytes | memoryview] = []
    for a, n in ranges:
        k, start = _find(merged, a)
        out.append(memoryview(blobs[k])[a - start : a - start + n])
    return out


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for a, n in sorted((int(a), int(n)) for a, n in ranges):
        if merged and a <= merged[-1][0] + merged[-1][1] + MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], a + n - merged[-1][0])
        else:
            merged.append([a, n])
    return [(a, n) for a, n in merged]


def _find(merged: list[tuple[int, int]], offset: int) -> tuple[int, int]:
    for k, (a, n) in enumerate(merged):
        if a <= offset < a + max(n, 1):
            return k, a
    raise AssertionError("range not in the merged ranges")


@dataclass(frozen=True)
class _Settings:
    """The retry policy's numbers for this module's requests (:func:`~ndvi_scale.http.gdal_retry_options`)."""

    retries: int
    delay: float
    codes: frozenset[int]
    connect_timeout: float
    read_timeout: float


def _pool() -> tuple[Any, _Settings]:
    """This process's urllib3 PoolManager and the settings both paths follow (made after a fork anew: sockets
    are not shared across processes)."""
    global _http
    with _http_lock:
        if _http is None or _http[0] != os.getpid():
            import urllib3

            opts = gdal_retry_options()
            settings = _Settings(
                retries=int(opts["GDAL_HTTP_MAX_RETRY"]),
                delay=float(opts["GDAL_HTTP_RETRY_DELAY"]),
                codes=frozenset(int(s) for s in opts["GDAL_HTTP_RETRY_CODES"].split(",") if s.strip()),
                connect_timeout=float(opts["GDAL_HTTP_CONNECTTIMEOUT"]),
                read_timeout=float(opts["GDAL_HTTP_TIMEOUT"]),
            )
            # the lean path's caps too (_backoff, _retry_after): urllib3's own are 120 s and none
            retry = capped_retry_class()(
                total=settings.retries,
                status_forcelist=sorted(settings.codes),
                backoff_factor=settings.delay,
                backoff_max=BACKOFF_MAX,
                allowed_methods=None,
                raise_on_status=False,
                respect_retry_after_header=True,
            )
            timeout = urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout)
            manager = urllib3.PoolManager(num_pools=64, maxsize=MAX_CONNECTIONS, block=False, retries=retry,
                                          timeout=timeout)
            httpget.reset()
            _http = (os.getpid(), manager, settings)
        return _http[1], _http[2]


def _get(url: str, offset: int, length: int) -> bytes | memoryview:
    """One range over HTTP(S) under the retry policy: through :mod:`.httpget` (the plain case, most of the CPU
    of a request saved), else through urllib3, which follows redirects and reads any kind of body. The same
    policy on both: ``GDAL_HTTP_MAX_RETRY`` retries of a dropped connection, a timeout or a status in
    ``GDAL_HTTP_RETRY_CODES``, urllib3's waits (none before the first retry, then ``GDAL_HTTP_RETRY_DELAY``
    doubling; a server's ``Retry-After`` in seconds on 429/503, capped)."""
    _, settings = _pool()
    parts = urlsplit(url)
    failure: OSError | None = None
    wait = 0.0
    for attempt in range(settings.retries + 1):
        if attempt:
            time.sleep(wait)
        try:
            answer = httpget.get_range(parts, offset, length, settings.connect_timeout, settings.read_timeout)
        except httpget.Unsupported:
            return _get_urllib3(url, offset, length)
        except OSError as e:
            failure = e
            wait = _backoff(settings.delay, attempt + 1)
            continue
        if answer.status in settings.codes and attempt < settings.retries:
            after = _retry_after(answer) if answer.status in (429, 503) else None
            wait = _backoff(settings.delay, attempt + 1) if after is None else after
            continue
        return _content(answer.status, answer.body, offset, length)
    # a connection that failed every attempt: its reason, never the URL (its query may be a signature)
    raise OSError(f"request failed after retries: {type(failure).__name__}: {failure}")


def _backoff(delay: float, failures: int) -> float:
    """urllib3's wait before the next attempt after ``failures`` consecutive failures: none after the first."""
    return 0.0 if failures <= 1 else min(BACKOFF_MAX, delay * 2 ** (failures - 1))


def _retry_after(answer: httpget.Answer) -> float | None:
    """A ``Retry-After`` in seconds, capped (a date or anything else: None, the backoff applies)."""
    try:
        return min(max(0.0, float(answer.retry_after or "")), RETRY_AFTER_MAX)
    except ValueError:
        return None


def _content(status: int, data: bytes | memoryview, offset: int, length: int) -> bytes | memoryview:
    if status == 206:
        return data
    if status == 200:  # a server that ignores Range sends the whole file
        return data[offset : offset + length]
    raise OSError(f"HTTP response code: {status}")


def _get_urllib3(url: str, offset: int, length: int) -> bytes | memoryview:
    import urllib3

    manager, _ = _pool()
    try:
        r = manager.request("GET", url, headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                            preload_content=True, decode_content=False)
    except urllib3.exceptions.MaxRetryError as e:
        # urllib3's own message quotes the path with its query string (a signature): keep the reason only
        raise OSError(f"request failed after retries: {e.reason}") from None
    except urllib3.exceptions.HTTPError as e:
        raise OSError(f"request failed: {type(e).__name__}: {e}") from None
    return _content(r.status, r.data, offset, length)
