"""One retry policy for every HTTP request ndvi-scale makes: STAC API pages and (through GDAL) pixel reads.

The constants below are the single source of truth. :func:`stac_retry` turns them into a ``urllib3``
``Retry`` for pystac-client's ``StacApiIO(max_retries=...)``; :func:`gdal_retry_options` turns them into the
GDAL ``/vsicurl/`` settings used by :data:`ndvi_scale.load.GDAL_ENV`. Change a number here and both follow.

What is retried, and why:

* HTTP 408, 429, 500, 502, 503, 504 (:data:`RETRY_STATUS`): a request timeout, throttling (CDSE answers 429
  under load, pystac-client #873) and transient server or gateway errors. Other 4xx are the caller's fault (a
  bad parameter, a missing file, an expired signature) and are not retried: retrying cannot fix them.
* Read timeouts and dropped connections, on every method: a STAC search ``POST`` is a read, safe to repeat.
* Refused connections only :data:`CONNECT_RETRIES` times: a mistyped URL must fail in seconds, not minutes.

How long it waits: ``Retry-After`` when the server sends one (capped at :data:`RETRY_AFTER_MAX` so a server
cannot park a job for an hour), else capped exponential backoff with jitter (:data:`BACKOFF_FACTOR`,
:data:`BACKOFF_MAX`, :data:`BACKOFF_JITTER`), for at most :data:`MAX_ATTEMPTS` attempts in all. The worst
case without ``Retry-After`` is about 0 + 2 + 4 + 8 + 16 = 30 s of waiting per request before giving up.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "BACKOFF_FACTOR",
    "BACKOFF_JITTER",
    "BACKOFF_MAX",
    "CONNECT_RETRIES",
    "CONNECT_TIMEOUT",
    "MAX_ATTEMPTS",
    "READ_TIMEOUT",
    "RETRY_AFTER_MAX",
    "RETRY_STATUS",
    "gdal_retry_options",
    "stac_retry",
    "stac_timeout",
]

#: HTTP statuses worth another attempt: request timeout, throttling, transient server/gateway errors.
RETRY_STATUS: tuple[int, ...] = (408, 429, 500, 502, 503, 504)

#: Attempts per request in all (the first one plus ``MAX_ATTEMPTS - 1`` retries). Bounded: a dead endpoint
#: must end in a clear error, not hang a scheduled job.
MAX_ATTEMPTS = 6

#: Exponential backoff base (seconds): urllib3 waits 0, 2, 4, 8, 16 s before retries 1..5
#: (``BACKOFF_FACTOR * 2 ** (n - 1)`` from the second retry on); GDAL waits 1, 2, 4, 8, 16 s.
BACKOFF_FACTOR = 1.0

#: Cap of one backoff wait (seconds).
BACKOFF_MAX = 30.0

#: Random extra wait (0..BACKOFF_JITTER s) added to each backoff, so that many workers throttled at the same
#: moment do not come back at the same moment.
BACKOFF_JITTER = 0.5

#: Cap of a server's ``Retry-After`` (seconds). Longer requests are shortened to this, not obeyed blindly.
RETRY_AFTER_MAX = 120.0

#: Retries of a connection that is refused or cannot be opened (within MAX_ATTEMPTS): few, so that a typo in
#: a URL fails fast.
CONNECT_RETRIES = 2

#: Seconds to open a connection, and to wait for the server's next bytes (STAC pages can take a while).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


def stac_timeout() -> tuple[float, float]:
    """``(connect, read)`` timeout for ``StacApiIO(timeout=...)`` / requests."""
    return (CONNECT_TIMEOUT, READ_TIMEOUT)


def capped_retry_class() -> type:
    """urllib3's ``Retry`` whose wait for a server's ``Retry-After`` is capped at :data:`RETRY_AFTER_MAX`."""
    from urllib3.util.retry import Retry

    class CappedRetry(Retry):
        """``Retry`` that honours ``Retry-After`` but never waits longer than :data:`RETRY_AFTER_MAX`."""

        def get_retry_after(self, response: Any) -> float | None:
            value = super().get_retry_after(response)
            return None if value is None else min(float(value), RETRY_AFTER_MAX)

    return CappedRetry


def stac_retry() -> Any:
    """A fresh ``urllib3.util.Retry`` implementing the policy, for ``StacApiIO(max_retries=...)``.

    ``raise_on_status=False``: when the attempts are used up the last error response is returned, so the
    caller reports the real status and body (pystac-client turns it into an ``APIError``) instead of "too many
    retries".
    """
    cls = capped_retry_class()
    kwargs: dict[str, Any] = dict(
        total=MAX_ATTEMPTS - 1,
        connect=CONNECT_RETRIES,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,  # every method: STAC searches are POSTs, and they are reads
        backoff_factor=BACKOFF_FACTOR,
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )
    try:
        return cls(backoff_max=BACKOFF_MAX, backoff_jitter=BACKOFF_JITTER, **kwargs)
    except TypeError:  # urllib3 < 2: no backoff_max/backoff_jitter arguments (its cap is 120 s)
        return cls(**kwargs)


def gdal_retry_options() -> dict[str, str]:
    """GDAL configuration options implementing the policy for ``/vsicurl/`` (COG reads over HTTP, S3, GCS).

    GDAL retries with its own doubling delay starting at ``GDAL_HTTP_RETRY_DELAY``; ``GDAL_HTTP_RETRY_CODES``
    (GDAL >= 3.10; ignored by older versions, which retry 429/500/502/503/504) names the statuses.
    ``GDAL_HTTP_TIMEOUT`` bounds a whole request (one range read of a tile), ``GDAL_HTTP_CONNECTTIMEOUT`` the
    connection.

    A variable of the same name in the environment wins (e.g. ``GDAL_HTTP_TIMEOUT=10`` on a network where a
    tile never takes that long): options set here would otherwise override the user's environment, as GDAL
    gives explicitly set options precedence.
    """
    options = {
        "GDAL_HTTP_MAX_RETRY": str(MAX_ATTEMPTS - 1),
        "GDAL_HTTP_RETRY_DELAY": f"{BACKOFF_FACTOR:g}",
        "GDAL_HTTP_RETRY_CODES": ",".join(str(s) for s in RETRY_STATUS),
        "GDAL_HTTP_TIMEOUT": f"{READ_TIMEOUT:g}",
        "GDAL_HTTP_CONNECTTIMEOUT": f"{CONNECT_TIMEOUT:g}",
    }
    return {k: os.environ.get(k, "").strip() or v for k, v in options.items()}
