"""One byte range of an http(s) URL, on a kept-alive socket, with as little Python per request as it takes.

The engine makes hundreds of range requests per chunk task, each answered with one ``206`` and a
``Content-Length``. Through urllib3 one costs ~410 us of CPU (its pool manager parses the URL, builds retry and
header objects, and :mod:`http.client` parses the headers with the :mod:`email` package); here ~150 us, measured
on the benchmark's 700 kB ranges. On 2 cores that is ~0.16 CPU s of the benchmark's 620 requests.

Only that common case is handled here: a ``GET`` with a ``Range`` header, an answer with a ``Content-Length``
(any status). Anything else raises :class:`Unsupported` before a byte of the body is taken, and the caller makes
the request with urllib3 instead: a redirect, a chunked or unsized body, an informational answer, a URL with
user information or characters that need quoting. Errors are ``OSError`` (the caller's retry policy decides),
``socket.timeout`` included; a reused connection the server closed while idle is retried once on a new one, as
urllib3 does.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import SplitResult

import numpy as np

__all__ = ["Answer", "Unsupported", "get_range", "reset"]

#: Idle connections kept per (scheme, host, port): the engine's read and range threads (see :mod:`.ranges`).
MAX_IDLE = 128

#: Bytes of a response's status line and headers at most (object stores send well under 2 kB).
MAX_HEAD = 64 * 1024

#: What may stand in a request target as it is (RFC 3986 unreserved, reserved and ``%``): anything else would
#: need quoting, which urllib3 does.
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


class Unsupported(Exception):
    """The request or its answer is not the plain case: make it with urllib3."""


@dataclass(frozen=True)
class Answer:
    """A response: its status, its body, and the value of its ``Retry-After`` header (or None)."""

    status: int
    body: memoryview
    retry_after: str | None


_lock = threading.Lock()
_idle: dict[tuple[str, str, int], list[socket.socket]] = {}
_pid = os.getpid()
_tls: ssl.SSLContext | None = None


def reset() -> None:
    """Close every idle connection (tests; a process that forked)."""
    global _pid
    with _lock:
        for socks in _idle.values():
            for s in socks:
                s.close()
        _idle.clear()
        _pid = os.getpid()


def get_range(parts: SplitResult, offset: int, length: int, connect_timeout: float, read_timeout: float) -> Answer:
    """``GET`` bytes ``[offset, offset + length)`` of the URL ``parts``. Raises :class:`Unsupported` (make the
    request with urllib3) or ``OSError`` (connection refused or dropped, timeout, a truncated answer)."""
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or parts.username is not None or parts.password is not None:
        raise Unsupported()
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not host or not _PLAIN_TARGET.fullmatch(target) or not host.isascii():
        raise Unsupported()
    host_header = parts.netloc.rpartition("@")[2]
    request = (f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nRange: bytes={offset}-{offset + length - 1}\r\n"
               "Accept-Encoding: identity\r\nUser-Agent: ndvi-scale\r\n\r\n").encode("ascii")
    key = (scheme, host, port)
    sock = _take(key)
    if sock is not None:
        try:
            return _exchange(key, sock, request, read_timeout)
        except _Stale:
            pass  # the server closed the idle connection: once more on a new one
    sock = _connect(scheme, host, port, connect_timeout)
    try:
        return _exchange(key, sock, request, read_timeout)
    except _Stale:
        raise ConnectionResetError("the server closed the connection without an answer") from None


class _Stale(Exception):
    """A connection closed before any byte of the answer."""


def _take(key: tuple[str, str, int]) -> socket.socket | None:
    global _pid
    with _lock:
        if _pid != os.getpid():  # a forked child: the parent's sockets are not its own, new ones are
            _idle.clear()
            _pid = os.getpid()
            return None
        socks = _idle.get(key)
        return socks.pop() if socks else None


def _give(key: tuple[str, str, int], sock: socket.socket) -> None:
    with _lock:
        socks = _idle.setdefault(key, [])
        if len(socks) < MAX_IDLE and _pid == os.getpid():
            socks.append(sock)
            return
    sock.close()


def _connect(scheme: str, host: str, port: int, timeout: float) -> socket.socket:
    global _tls
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            if _tls is None:
                _tls = ssl.create_default_context()
            sock = _tls.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(key: tuple[str, str, int], sock: socket.socket, request: bytes, read_timeout: float) -> Answer:
    """Send ``request`` and read its answer; the socket goes back to the idle ones when it can be reused, else is
    closed. Raises :class:`_Stale` when nothing at all came back."""
    reuse = False
    try:
        sock.settimeout(read_timeout)
        try:
            sock.sendall(request)
            head, rest = _read_head(sock)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError, _Stale):
            raise _Stale() from None
        status, headers, keep_alive = _parse_head(head)
        if 100 <= status < 200 or 300 <= status < 400 or "transfer-encoding" in headers:
            raise Unsupported()
        size = headers.get("content-length")
        if size is None or not size.isdigit():
            raise Unsupported()
        body = _read_body(sock, rest, int(size))
        reuse = keep_alive and len(rest) <= int(size)  # more bytes than the answer: not a connection to reuse
        return Answer(status, body, headers.get("retry-after"))
    finally:
        if reuse:
            _give(key, sock)
        else:
            sock.close()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            if data:
                raise ConnectionResetError("the connection closed in the answer's headers")
            raise _Stale()
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end], data[end + 4 :]
        if len(data) > MAX_HEAD:
            raise Unsupported()


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """(status, headers by lower-case name, whether the connection stays open)."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise Unsupported()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or name != name.strip():
            raise Unsupported()  # folded or malformed headers: http.client's business
        headers[name.lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    return int(code), headers, keep_alive


def _read_body(sock: socket.socket, rest: bytes, size: int) -> memoryview:
    # not a bytearray: that zero-fills every byte before the socket overwrites it (~450 MB per benchmark run)
    view = memoryview(np.empty(size, dtype=np.uint8).data)
    have = min(len(rest), size)
    view[:have] = rest[:have]
    while have < size:
        got = sock.recv_into(view[have:])
        if not got:
            raise ConnectionResetError(f"the answer ended after {have} of {size} bytes")
        have += got
    return view
